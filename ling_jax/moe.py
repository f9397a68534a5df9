"""Dropless Ling 2.0 MoE block: fp32 sigmoid router, routed experts and one shared expert.

Key: B batch, L length, T tokens (B*L), D model dim, E experts, F expert width, K experts per token.

Collections: `params` (trained), `moe_state` (the fp32 expert bias, updated by the train step, never
by the optimiser), `moe_stats` (written on every call: per-expert token counts and router z-loss).
"""

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from kernels import dispatch
from ling_jax import config as config_lib
from ling_jax import expert_parallel
from ling_jax import fp8
from ling_jax import layers
from ling_jax import router

STATE = "moe_state"
STATS = "moe_stats"


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def router_logits(x_TD: jax.Array, w_DE: jax.Array, precision: Any,
                  grad_precision: Any) -> jax.Array:
  """Returns the fp32 router logits x @ w, with `precision` forward and `grad_precision` for
  the two backward products (dx = g @ w^T, dw = x^T @ g).

  x may be bf16: it is saved as it is and cast to fp32 where used. dx comes back in x's dtype.
  """
  return jnp.dot(x_TD.astype(jnp.float32), w_DE.astype(jnp.float32), precision=precision)


def _router_logits_fwd(x_TD, w_DE, precision, grad_precision):
  return router_logits(x_TD, w_DE, precision, grad_precision), (x_TD, w_DE)


def _router_logits_bwd(precision, grad_precision, res, g_TE):
  del precision
  x_TD, w_DE = res
  x32_TD, w32_DE = x_TD.astype(jnp.float32), w_DE.astype(jnp.float32)
  dx_TD = jnp.dot(g_TE, w32_DE.T, precision=grad_precision)
  dw_DE = jnp.dot(x32_TD.T, g_TE, precision=grad_precision)
  return dx_TD.astype(x_TD.dtype), dw_DE.astype(w_DE.dtype)


router_logits.defvjp(_router_logits_fwd, _router_logits_bwd)


class MoE(nn.Module):
  """Routed experts plus shared experts (added with weight 1), without the residual."""
  m: Any

  @nn.compact
  def __call__(self, x_BLD: jax.Array, token_mask_BL: jax.Array) -> jax.Array:
    m = self.m
    batch, length, d = x_BLD.shape
    e, f = m.num_experts, m.moe_intermediate_size
    param_dtype, dtype = config_lib.dtype_of(m.param_dtype), config_lib.dtype_of(m.dtype)
    init = layers.kernel_init(m)
    w_router_DE = self.param("router", init, (d, e), param_dtype)
    w_gate_up_EDF2 = self.param("wi_gate_up", init, (e, d, 2 * f), param_dtype)
    w_down_EFD = self.param("wo", init, (e, f, d), param_dtype)
    bias_E = self.variable(STATE, "expert_bias", jnp.zeros, (e,), jnp.float32).value
    if not m.moe_router_enable_expert_bias:
      bias_E = jnp.zeros_like(bias_E)

    x_TD = x_BLD.reshape(batch * length, d)
    # The router always runs in fp32, whatever the activation dtype (m.router_precision: XLA's
    # fp32 dot, or its emulation on bf16 tensor cores; m.router_grad_precision: its backward's).
    with jax.named_scope("router"):  # Named for profiles (ling_jax/profiling.py).
      logits_TE = router_logits(x_TD, w_router_DE, config_lib.router_precision(m),
                                config_lib.router_grad_precision(m))
      if m.get("router_random_logits", False):
        logits_TE = router.random_logits(logits_TE)
      routing = router.route_tokens(
          logits_TE, bias_E, top_k=m.num_experts_per_tok, n_group=m.n_group,
          topk_group=m.topk_group, routed_scaling_factor=m.routed_scaling_factor,
          token_mask_T=token_mask_BL.reshape(-1))
    self.variable(STATS, "counts", jnp.zeros, (e,), jnp.float32).value = routing.counts_E
    self.variable(STATS, "z_loss", jnp.zeros, (), jnp.float32).value = routing.z_loss

    # Under a mesh, tokens and experts are split and exchanged with all-to-alls; the routing
    # above ran on the global batch, so its counts already cover every shard.
    recipe = fp8.recipe_for(m, "experts")  # None: the experts stay in the model dtype
    quant, probes = ("none" if recipe is None else "fp8_blockwise"), None
    if recipe is not None:
      # Token copies repeat x's rows, so x's tiles give the first projection's input metrics.
      pow2 = recipe.pow2_scales
      probes = (fp8.probe(self, "grad_gate_up"), fp8.probe(self, "grad_down"))
      measured = functools.partial(fp8.measured, probes[0])  # both probes carry the same ask
      fp8.record(self, "fp8_act", measured(lambda: fp8.activation_metrics(x_TD.astype(dtype),
                                                                          pow2)))
      fp8.record(self, "fp8_weight_gate_up", measured(
          lambda: fp8.weight_metrics(w_gate_up_EDF2.astype(dtype), pow2)))
      fp8.record(self, "fp8_weight_down", measured(
          lambda: fp8.weight_metrics(w_down_EFD.astype(dtype), pow2)))
    y_TD = expert_parallel.expert_ffn(
        x_TD.astype(dtype), routing.expert_ids_TK, routing.weights_TK,
        w_gate_up_EDF2.astype(dtype), w_down_EFD.astype(dtype), backend=m.moe_backend,
        all_to_all=m.get("moe_all_to_all", "auto"), quant=quant, fp8_probes=probes,
        fp8_recipe=recipe, fp8_group_align=m.get("fp8_group_align", dispatch.FP8_GROUP_ALIGN),
        fp8_fused_dispatch=m.get("fp8_fused_dispatch", True),
        fp8_backend=m.get("fp8_backend", "auto"))
    y_BLD = y_TD.reshape(batch, length, d)
    if m.num_shared_experts:
      y_BLD = y_BLD + layers.SwiGLU(m, f * m.num_shared_experts, name="shared_experts")(x_BLD)
    return y_BLD
