"""The model through the Pallas dispatch matches the model through the reference dispatch (CPU).

The tiny Ling 2.0 config (bf16 activations, one dense and one MoE layer, MTP off to halve the
interpreter's work; the MTP block runs the same MoE code) runs once with
`moe_backend="reference"` and once with `moe_backend="pallas_mosaic_gpu_interpret"`: the Mosaic GPU
forward, dgrad and wgrad kernels of kernels/grouped_matmul_mgpu.py under Pallas's GPU interpreter,
called through `dispatch.expert_ffn` exactly as on an H200. Logits, loss and the gradient of every
parameter are compared; a kernel that misplaces a row or a group would move them by O(1).

Key: B batch, L length, V vocabulary.
"""

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels import grouped_matmul as gmm_lib
from ling_jax import model
from tests.test_model_reference import _config
from tests.test_model_reference import _randomise

SEED = 0
BATCH, LENGTH = 1, 16
BACKENDS = ("reference", "pallas_mosaic_gpu_interpret")


def _model_config(backend):
  m = _config("bfloat16")
  m.num_hidden_layers = 2  # first_k_dense_replace = 1: one dense layer, one MoE layer
  m.num_nextn_predict_layers = 0
  m.moe_backend = backend
  return m


@pytest.fixture(scope="module")
def runs():
  """Loss, logits and parameter gradients of the same batch through each backend."""
  shapes = jax.eval_shape(functools.partial(model.init_variables, _model_config("reference")),
                          jax.random.PRNGKey(SEED))
  variables = jax.tree.map(jnp.asarray, _randomise(shapes, np.random.default_rng(SEED)))
  rng = np.random.default_rng(SEED + 1)
  inputs_BL = jnp.asarray(rng.integers(1, 500, (BATCH, LENGTH)), jnp.int32)
  targets_BL = jnp.asarray(rng.integers(1, 500, (BATCH, LENGTH)), jnp.int32)
  positions_BL = jnp.broadcast_to(jnp.arange(LENGTH, dtype=jnp.int32), (BATCH, LENGTH))
  segments_BL = jnp.ones((BATCH, LENGTH), jnp.int32)

  out = {}
  for backend in BACKENDS:
    m = _model_config(backend)

    def loss_fn(params, m=m):
      result, _ = model.apply(m, {**variables, "params": params}, inputs_BL, positions_BL,
                              segments_BL, targets_BL)
      logp_BLV = jax.nn.log_softmax(result.logits_BLV)
      nll = -jnp.mean(jnp.take_along_axis(logp_BLV, targets_BL[..., None], -1))
      return nll, result.logits_BLV

    (loss, logits_BLV), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(
        variables["params"])
    out[backend] = (float(loss), np.asarray(logits_BLV, np.float64),
                    jax.tree.map(lambda g: np.asarray(g, np.float64), grads))
  return out


def _rel(a, b):
  return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def test_logits_and_loss_match_reference_dispatch(runs):
  loss_ref, logits_ref, _ = runs["reference"]
  loss_ker, logits_ker, _ = runs["pallas_mosaic_gpu_interpret"]
  assert np.isfinite(logits_ker).all()
  # Same fp32-accumulated products rounded to bf16 at the same points: ~1 bf16 ulp at most.
  assert _rel(logits_ker, logits_ref) < 5e-3
  assert np.abs(logits_ker - logits_ref).max() < 0.05 * np.abs(logits_ref).max()
  np.testing.assert_allclose(loss_ker, loss_ref, rtol=1e-3)


def test_gradients_match_reference_dispatch(runs):
  _, _, grads_ref = runs["reference"]
  _, _, grads_ker = runs["pallas_mosaic_gpu_interpret"]
  flat_ref = dict(jax.tree_util.tree_flatten_with_path(grads_ref)[0])
  flat_ker = dict(jax.tree_util.tree_flatten_with_path(grads_ker)[0])
  assert flat_ref.keys() == flat_ker.keys()
  moe_leaves = 0
  for path, g_ref in flat_ref.items():
    name = jax.tree_util.keystr(path)
    assert np.linalg.norm(g_ref) > 0, name  # every parameter is reached
    # bf16 backward passes: the dgrad kernel rounds once per product, as the reference does, but
    # differences of an ulp reach the layers below. Measured: <= 0.7% (dense layer), <= 0.08%
    # for the expert weights.
    assert _rel(flat_ker[path], g_ref) < 3e-2, name
    if "wi_gate_up" in name or "'wo'" in name or "router" in name:
      assert _rel(flat_ker[path], g_ref) < 1e-2, name
      moe_leaves += 1
  assert moe_leaves == 3  # the routed experts' two weights and the router were compared


def test_interpret_backend_refuses_operands_it_cannot_run():
  """Strict: an fp32 model must not silently fall back to the reference under this backend."""
  lhs = jnp.ones((64, 128), jnp.float32)
  rhs = jnp.ones((2, 128, 128), jnp.float32)
  with pytest.raises(ValueError, match="pallas_mosaic_gpu_interpret.*bfloat16"):
    gmm_lib.grouped_matmul(lhs, rhs, jnp.asarray([30, 34]), backend="pallas_mosaic_gpu_interpret")


def kernel_sized_config(quant: str, intermediate_size: int = 512, batch_size: int = 2) -> Any:
  """The tiny config at dimensions every GPU kernel covers (multiples of 128): one dense and one
  MoE layer, no MTP, bf16, 128-token rows."""
  from configs import ling2
  c = ling2.get_config("tiny")
  m, t = c.model, c.train
  m.hidden_size, m.moe_intermediate_size, m.intermediate_size = 256, 128, intermediate_size
  m.num_attention_heads, m.num_key_value_heads, m.head_dim = 2, 1, 128
  m.num_experts, m.num_experts_per_tok, m.n_group, m.topk_group = 8, 2, 2, 1
  m.num_hidden_layers, m.num_nextn_predict_layers = 2, 0
  m.dtype, m.quant = "bfloat16", quant
  t.batch_size, t.seq_len = batch_size, 128
  return c


@pytest.mark.parametrize("quant", ["none", "fp8_blockwise"])
def test_train_step_traces_with_the_hopper_kernels(monkeypatch, quant):
  """The whole train step as `auto` builds it on an H200, traced here on the CPU: every GPU
  kernel in place (Mosaic GPU GEMMs and permutation; with FP8 the Triton quantise kernels too).
  A kernel reached by autodiff outside its custom VJP fails at trace time, as the FP8 model
  once did on the GPU only. bf16 is also lowered for CUDA (Mosaic GPU lowers without a GPU;
  Triton does not, hence trace only for FP8)."""
  from kernels import fp8_gemm
  from kernels import fp8_quant
  from ling_jax import train
  monkeypatch.setattr(gmm_lib, "_is_hopper_gpu", lambda: True)
  monkeypatch.setattr(fp8_gemm, "_is_hopper_gpu", lambda: True)
  real = fp8_quant._resolve_backend
  monkeypatch.setattr(fp8_quant, "_resolve_backend",
                      lambda b: "pallas_triton" if b == "auto" else real(b))
  c = kernel_sized_config(quant)
  m, t = c.model, c.train
  state = jax.eval_shape(train.init_state_fn(m, t))
  batch = {k: jax.ShapeDtypeStruct((2, 128), jnp.int32)
           for k in ("inputs", "targets", "positions", "segment_ids")}
  traced = jax.jit(functools.partial(train.train_step, m=m, t=t)).trace(state, batch)
  if quant == "none":
    assert "mosaic_gpu" in traced.lower(lowering_platforms=("cuda",)).as_text()
  else:  # the FP8 metrics' quantisation, outside any custom VJP
    assert "pallas_call" in str(traced.jaxpr)
