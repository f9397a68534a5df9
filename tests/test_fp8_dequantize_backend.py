"""The "dequantize_bf16" and "reference_bf16" FP8 backends (`kernels/fp8_gemm.py`,
`config.model.fp8_backend`): the recipe's E4M3 codes and scales, multiplied as bf16 operands by
the unquantised model's GEMMs; quantised as "auto" (the Triton kernels on a GPU) or as the
reference (XLA)."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from configs import ling2
from kernels import fp8_gemm
from kernels import fp8_quant as fq
from ling_jax import config as config_lib
from ling_jax import model as model_lib
from ling_jax import profiling
from ling_jax import sharding

BF16 = "dequantize_bf16"
BACKENDS = (BF16, "reference_bf16")


def _bf16(a):
  """fp32 values rounded to bf16 (round to nearest even, as XLA converts), back in float64."""
  return np.asarray(a, np.float32).astype(ml_dtypes.bfloat16).astype(np.float64)


def test_quantisation_follows_auto_or_the_reference():
  assert fp8_gemm._quant_backend(BF16) == fp8_gemm._quant_backend("auto") == "auto"
  assert fp8_gemm._quant_backend("reference_bf16") == fp8_gemm._quant_backend("reference")
  with pytest.raises(ValueError, match="Unknown FP8 GEMM backend 'bf16'"):
    fp8_gemm._quant_backend("bf16")


@pytest.mark.parametrize("backend", BACKENDS)
def test_gemms_multiply_the_codes_dequantised_to_bf16(backend):
  """Each GEMM equals NumPy's product of the same codes times their scales rounded once to bf16
  (fp32 accumulation: ~1e-6), and so differs from the fp32 reference by that rounding (2^-9
  an element; the test fails if the backend kept fp32 operands or took other codes)."""
  rng = np.random.default_rng(0)
  x = rng.standard_normal((64, 384)).astype(np.float32)
  w = (rng.standard_normal((384, 256)) * 0.05).astype(np.float32)
  dy = rng.standard_normal((64, 256)).astype(np.float32)
  xq, xs = fq.quantize_tiles(x)
  wq, ws = fq.quantize_blocks(w)
  ids, nt = fq.row_tile_ids(64)
  xtq, xts = fq.quantize_rows_transposed(x, ids, nt)
  dytq, dyts = fq.quantize_rows_transposed(dy, ids, nt)
  xd = _bf16(fq.dequantize_tiles(xq, xs))
  wd = _bf16(fq.dequantize_blocks(wq, ws))
  xtd, dytd = _bf16(fq.dequantize_tiles(xtq, xts)), _bf16(fq.dequantize_tiles(dytq, dyts))

  def both(fn, **kw):
    return (np.asarray(fn(backend=backend, out_dtype=jnp.float32, **kw)),
            np.asarray(fn(backend="reference", out_dtype=jnp.float32, **kw)))

  # Dense: a weight's 128x128 blocks, and the wgrad form (both operands 1x128-tiled).
  got, ref = both(lambda **kw: fp8_gemm.fp8_matmul(xq, xs, wq.T, ws.T, **kw))
  checks = [(got, ref, xd @ wd)]
  got, ref = both(lambda **kw: fp8_gemm.fp8_matmul(xtq, xts, dytq, dyts, b_scaling="tile", **kw))
  checks.append((got, ref, xtd @ dytd.T))
  # Grouped: rows 0-23 to expert 0, 24-63 to expert 2 (expert 1 empty).
  sizes = jnp.asarray([24, 0, 40], jnp.int32)
  w3 = (rng.standard_normal((3, 256, 384)) * 0.05).astype(np.float32)  # [G, N, K]
  w3q, w3s = fq.quantize_blocks(w3)
  w3d = _bf16(fq.dequantize_blocks(w3q, w3s))
  got, ref = both(lambda **kw: fp8_gemm.fp8_grouped_matmul(xq, xs, w3q, w3s, sizes, **kw))
  checks.append((got, ref, np.concatenate([xd[:24] @ w3d[0].T, xd[24:] @ w3d[2].T])))
  # Grouped wgrad: tiles restart per group.
  gids, gnt = fq.row_tile_ids(64, sizes)
  gxq, gxs = fq.quantize_rows_transposed(x, gids, gnt)
  gdq, gds = fq.quantize_rows_transposed(dy, gids, gnt)
  gx, gd = (_bf16(fq.dequantize_rows_transposed(q, s, gids)) for q, s in ((gxq, gxs), (gdq, gds)))
  got, ref = both(lambda **kw: fp8_gemm.fp8_transposed_grouped_matmul(
      gxq, gxs, gdq, gds, gids, sizes, **kw))
  checks.append((got, ref, np.stack([gx[:, :24] @ gd[:, :24].T, np.zeros((384, 256)),
                                     gx[:, 24:] @ gd[:, 24:].T])))
  for got, ref, want in checks:
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
    assert 1e-5 < profiling.rel_error(got, ref) < 4e-3


def test_linear_ops_and_their_gradients_stay_on_the_backend():
  """fp8_linear and fp8_grouped_linear forward and backward: within bf16's rounding of the
  reference's dequantised operands."""
  rng = np.random.default_rng(1)
  x = rng.standard_normal((96, 256)).astype(np.float32)
  w = (rng.standard_normal((256, 128)) * 0.05).astype(np.float32)
  wg = (rng.standard_normal((2, 256, 128)) * 0.05).astype(np.float32)
  sizes = jnp.asarray([40, 56], jnp.int32)
  cot = rng.standard_normal((96, 128)).astype(np.float32)

  def grads(backend):
    lin = lambda a, b: jnp.sum(fp8_gemm.fp8_linear(a, b, jnp.zeros(2), backend) * cot)
    grp = lambda a, b: jnp.sum(
        fp8_gemm.fp8_grouped_linear(a, b, sizes, jnp.zeros(2), backend) * cot)
    return jax.jit(lambda: (jax.grad(lin, (0, 1))(x, w), jax.grad(grp, (0, 1))(x, wg)))()

  for got, want in zip(jax.tree.leaves(grads(BF16)), jax.tree.leaves(grads("reference")),
                       strict=True):
    assert 1e-5 < profiling.rel_error(got, want) < 4e-3


def _tiny(**fields):
  m = ling2.model_config("tiny")
  m.num_hidden_layers, m.first_k_dense_replace = 2, 1
  m.quant = "fp8_blockwise"
  m.update(fields)
  return m


def test_model_config_reaches_every_fp8_gemm(monkeypatch):
  """model.fp8_backend goes to the FP8 linears and the routed experts (fused and separate
  paths, and under an expert-parallel mesh); the model's loss moves by bf16's rounding only.
  (The threading is the same for every backend name; "reference_bf16" differs from this one in
  its quantisation only, `test_quantisation_follows_auto_or_the_reference`.)"""
  backend = BF16
  seen = []
  for name in ("fp8_matmul", "fp8_grouped_matmul", "fp8_transposed_grouped_matmul"):
    real = getattr(fp8_gemm, name)

    def spy(*args, _real=real, _name=name, **kw):
      seen.append((_name, kw.get("backend", "auto")))
      return _real(*args, **kw)
    monkeypatch.setattr(fp8_gemm, name, spy)

  ids = jnp.asarray(np.random.default_rng(2).integers(0, 256, (8, 16)), jnp.int32)
  pos = jnp.broadcast_to(jnp.arange(16), (8, 16))
  seg = jnp.ones((8, 16), jnp.int32)
  variables = jax.jit(lambda k: model_lib.init_variables(_tiny(), k))(jax.random.key(0))
  params = variables["params"]

  def loss(m):
    def f(p):
      out, _ = model_lib.apply(m, {**variables, "params": p}, ids, pos, seg, ids)
      return jnp.mean(jax.nn.logsumexp(out.logits_BLV, -1))
    seen.clear()
    value, g = jax.jit(jax.value_and_grad(f))(params)
    return float(value), g, sorted(set(seen))

  flat = lambda g: jnp.concatenate([a.ravel() for a in jax.tree.leaves(g)])
  _, g_fp32, _ = loss(_tiny(quant="none"))
  want, g_want, seen_auto = loss(_tiny())
  fp8_error = profiling.rel_error(flat(g_want), flat(g_fp32))  # FP8's own error in the gradients
  kinds = {"fp8_matmul", "fp8_grouped_matmul", "fp8_transposed_grouped_matmul"}
  assert {n for n, _ in seen_auto} == kinds and {b for _, b in seen_auto} == {"auto"}
  for fields in ({}, {"fp8_fused_dispatch": False}):
    got, g_got, seen_bf16 = loss(_tiny(fp8_backend=backend, **fields))
    assert {n for n, _ in seen_bf16} == kinds and {b for _, b in seen_bf16} == {backend}
    assert abs(got - want) < 1e-3 * abs(want)
    # bf16's rounding moves a few codes of the quantised intermediates by one step, so the
    # gradients differ by a share of FP8's error, not by 2^-9.
    assert profiling.rel_error(flat(g_got), flat(g_want)) < 0.5 * fp8_error
  cfg = sharding.default_mesh_config()
  cfg.data, cfg.expert = 2, 4
  with jax.set_mesh(sharding.make_mesh(cfg)):
    _, _, seen_mesh = loss(_tiny(fp8_backend=backend))
  assert {n for n, _ in seen_mesh} == kinds and {b for _, b in seen_mesh} == {backend}


@pytest.mark.parametrize("fields,fragment", [
    ({"fp8_backend": "cublas"}, r"config\.model\.fp8_backend.*unknown 'cublas'"),
    ({"quant": "none", "fp8_backend": BF16}, r"config\.model\.fp8_backend.*quant='fp8_blockwise'"),
])
def test_fp8_backend_config_is_validated(fields, fragment):
  m = _tiny(**fields)
  with pytest.raises(config_lib.ConfigError, match=fragment):
    config_lib.validate_model_config(m)
  config_lib.validate_model_config(_tiny(fp8_backend=BF16))
