"""Sort-based MoE dispatch: copy tokens to their experts, run the experts, combine the results.

Dropless: every (token, expert) pair is computed. The copies are sorted by expert so that the expert
FFN is two grouped matmuls; the custom VJPs make both directions of the permutation plain gathers
(a permutation's transpose is its inverse), never scatter-adds.

Shape key:
  T: tokens
  K: experts per token (top_k)
  M: token copies (T * K), sorted by expert
  D: model dim
  E: experts
  F: expert width
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from kernels import grouped_matmul as gmm_lib


def _inverse_permutation(perm_M: jax.Array) -> jax.Array:
  """Returns inv with inv[perm[i]] = i, in O(M) instead of a second sort."""
  iota_M = jnp.arange(perm_M.shape[0], dtype=perm_M.dtype)
  return jnp.zeros_like(perm_M).at[perm_M].set(iota_M, unique_indices=True)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _copy_tokens(x_TD: jax.Array, sort_idx_M: jax.Array, top_k: int) -> jax.Array:
  return x_TD[sort_idx_M // top_k]


def _copy_tokens_fwd(x_TD, sort_idx_M, top_k):
  return _copy_tokens(x_TD, sort_idx_M, top_k), sort_idx_M


def _copy_tokens_bwd(top_k, sort_idx_M, dx_MD):
  # Undo the sort with a gather, then add up each token's K copies in fp32.
  dx_TKD = dx_MD[_inverse_permutation(sort_idx_M)].reshape(-1, top_k, dx_MD.shape[-1])
  dx_TD = jnp.sum(dx_TKD.astype(jnp.float32), axis=1).astype(dx_MD.dtype)
  return dx_TD, np.zeros(sort_idx_M.shape, jax.dtypes.float0)


_copy_tokens.defvjp(_copy_tokens_fwd, _copy_tokens_bwd)


def permute(
    x_TD: jax.Array, expert_ids_TK: jax.Array, num_experts: int
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Copies each token once per chosen expert and sorts the copies by expert.

  Args:
    x_TD: token activations.
    expert_ids_TK: chosen experts per token, in [0, num_experts]; the id num_experts (or more)
      marks a dropped slot: its copy sorts last, outside every group, and contributes zero.
    num_experts: E.

  Returns:
    x_MD: the copies, sorted by expert id; ties keep (token, slot) order.
    group_sizes_E: int32 copies per expert.
    sort_idx_M: for each sorted row, its index into the flattened (token, slot) list.
  """
  x_TD, expert_ids_TK = jnp.asarray(x_TD), jnp.asarray(expert_ids_TK)
  if x_TD.ndim != 2 or expert_ids_TK.ndim != 2 or x_TD.shape[0] != expert_ids_TK.shape[0]:
    raise ValueError(
        f"permute: expected x [T, D] and expert_ids [T, K] with the same T, got x "
        f"{list(x_TD.shape)} and expert_ids {list(expert_ids_TK.shape)}.")
  if not jnp.issubdtype(expert_ids_TK.dtype, jnp.integer):
    raise ValueError(f"permute: expert_ids must be integers, got {expert_ids_TK.dtype}.")
  top_k = expert_ids_TK.shape[1]
  ids_M = expert_ids_TK.reshape(-1).astype(jnp.int32)
  sort_idx_M = jnp.argsort(ids_M, stable=True).astype(jnp.int32)
  group_sizes_E = jnp.bincount(ids_M, length=num_experts).astype(jnp.int32)
  return _copy_tokens(x_TD, sort_idx_M, top_k), group_sizes_E, sort_idx_M


def _gather_copies(y_MD: jax.Array, sort_idx_M: jax.Array, top_k: int) -> jax.Array:
  """Puts sorted rows back in (token, slot) order as [T, K, D]."""
  y_MD = y_MD[_inverse_permutation(sort_idx_M)]
  return y_MD.reshape(-1, top_k, y_MD.shape[-1])


def _combine(y_TKD: jax.Array, weights_TK: jax.Array) -> jax.Array:
  # A multiply and a sum rather than an einsum: a dot in fp32 may run as TF32 on GPU.
  return jnp.sum(y_TKD.astype(jnp.float32) * weights_TK.astype(jnp.float32)[:, :, None], axis=1)


@jax.custom_vjp
def _unpermute(y_MD: jax.Array, sort_idx_M: jax.Array, weights_TK: jax.Array) -> jax.Array:
  y_TKD = _gather_copies(y_MD, sort_idx_M, weights_TK.shape[1])
  return _combine(y_TKD, weights_TK).astype(y_MD.dtype)


def _unpermute_fwd(y_MD, sort_idx_M, weights_TK):
  return _unpermute(y_MD, sort_idx_M, weights_TK), (y_MD, sort_idx_M, weights_TK)


def _unpermute_bwd(res, dout_TD):
  y_MD, sort_idx_M, weights_TK = res
  top_k = weights_TK.shape[1]
  dout_TD = dout_TD.astype(jnp.float32)
  # Row m of y is copy (t, k) = divmod(sort_idx[m], K): its cotangent is weights[t, k] * dout[t].
  weights_M = weights_TK.reshape(-1)[sort_idx_M].astype(jnp.float32)
  dy_MD = (dout_TD[sort_idx_M // top_k] * weights_M[:, None]).astype(y_MD.dtype)
  y_TKD = _gather_copies(y_MD, sort_idx_M, top_k).astype(jnp.float32)
  dweights_TK = jnp.sum(y_TKD * dout_TD[:, None, :], axis=-1).astype(weights_TK.dtype)
  return dy_MD, np.zeros(sort_idx_M.shape, jax.dtypes.float0), dweights_TK


_unpermute.defvjp(_unpermute_fwd, _unpermute_bwd)


def unpermute(y_MD: jax.Array, sort_idx_M: jax.Array, weights_TK: jax.Array) -> jax.Array:
  """Inverse of `permute` fused with the router weights: y_TD[t] = sum_k w[t, k] * y[row of (t, k)].

  Args:
    y_MD: expert outputs in the sorted order of `permute`.
    sort_idx_M: from `permute`.
    weights_TK: router weights; differentiable.

  Returns:
    y_TD in y_MD's dtype, combined in fp32.
  """
  y_MD, sort_idx_M, weights_TK = map(jnp.asarray, (y_MD, sort_idx_M, weights_TK))
  if (y_MD.ndim != 2 or sort_idx_M.shape != (y_MD.shape[0],) or weights_TK.ndim != 2
      or weights_TK.size != y_MD.shape[0]):
    raise ValueError(
        f"unpermute: expected y [M, D], sort_idx [M] and weights [T, K] with M = T * K, got y "
        f"{list(y_MD.shape)}, sort_idx {list(sort_idx_M.shape)}, weights "
        f"{list(weights_TK.shape)}.")
  return _unpermute(y_MD, sort_idx_M, weights_TK)


def expert_ffn(
    x_TD: jax.Array,
    expert_ids_TK: jax.Array,
    weights_TK: jax.Array,
    w_gate_up_EDF2: jax.Array,
    w_down_EFD: jax.Array,
    *,
    backend: str = "auto",
) -> jax.Array:
  """Runs the routed SwiGLU experts of a Ling 2.0 MoE layer and sums them with the router weights.

  Args:
    x_TD: token activations.
    expert_ids_TK: chosen experts per token, in [0, E); E drops the slot (see `permute`).
    weights_TK: router weights (already normalised and scaled); differentiable.
    w_gate_up_EDF2: fused gate and up projections: columns [0, F) are gate, [F, 2F) are up.
    w_down_EFD: down projections.
    backend: grouped matmul backend, see `grouped_matmul`.

  Returns:
    y_TD = sum_k weights[t, k] * down_e(silu(gate_e(x_t)) * up_e(x_t)), e = expert_ids[t, k],
    in x's dtype.
  """
  x_TD, expert_ids_TK, weights_TK, w_gate_up_EDF2, w_down_EFD = map(
      jnp.asarray, (x_TD, expert_ids_TK, weights_TK, w_gate_up_EDF2, w_down_EFD))
  num_experts, d_model, two_f = w_gate_up_EDF2.shape
  if (x_TD.ndim != 2 or x_TD.shape[1] != d_model or two_f % 2
      or w_down_EFD.shape != (num_experts, two_f // 2, d_model)):
    raise ValueError(
        f"expert_ffn: expected x [T, D], w_gate_up [E, D, 2F] and w_down [E, F, D], got x "
        f"{list(x_TD.shape)}, w_gate_up {list(w_gate_up_EDF2.shape)}, w_down "
        f"{list(w_down_EFD.shape)}.")
  if weights_TK.shape != expert_ids_TK.shape:
    raise ValueError(
        f"expert_ffn: weights {list(weights_TK.shape)} and expert_ids "
        f"{list(expert_ids_TK.shape)} must both be [T, K].")
  x_MD, group_sizes_E, sort_idx_M = permute(x_TD, expert_ids_TK, num_experts)
  h_MF2 = gmm_lib.grouped_matmul(x_MD, w_gate_up_EDF2, group_sizes_E, backend=backend)
  gate_MF, up_MF = jnp.split(h_MF2.astype(jnp.float32), 2, axis=-1)
  act_MF = (jax.nn.silu(gate_MF) * up_MF).astype(x_TD.dtype)
  y_MD = gmm_lib.grouped_matmul(act_MF, w_down_EFD, group_sizes_E, backend=backend)
  return unpermute(y_MD, sort_idx_M, weights_TK)
