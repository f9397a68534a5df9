"""FP8 blockwise quantisation, GEMMs, the FP8 linear's gradients and the safeguard metrics,
against NumPy references and hand-worked cases."""

import json
import os
import subprocess
import sys
import textwrap

import flax
import jax
import jax.numpy as jnp
import ml_collections
import ml_dtypes
import numpy as np
import pytest

from configs import ling2
from kernels import dispatch
from kernels import fp8_gemm
from kernels import fp8_quant as fq
from ling_jax import config as config_lib
from ling_jax import expert_parallel
from ling_jax import fp8
from ling_jax import model as model_lib
from ling_jax import sharding
from ling_jax import train

# E4M3 keeps 3 mantissa bits: round-to-nearest is within 2^-4 relative for normal numbers, and
# within half the smallest subnormal step (2^-10 of the scale) below them.
REL, ABS_OF_SCALE = 2.0 ** -4, 2.0 ** -10


def _rng_matrix(rng, shape, spread=True):
  x = rng.standard_normal(shape).astype(np.float32)
  if spread:  # magnitudes over six decades, so tiles get very different scales
    x *= 10.0 ** rng.uniform(-3, 3, shape[:-1] + (1,)).astype(np.float32)
  return x


def _np_tile_scales(x, tile=128):
  pad = -x.shape[-1] % tile
  xp = np.pad(np.abs(x), [(0, 0)] * (x.ndim - 1) + [(0, pad)])
  amax = xp.reshape(*x.shape[:-1], -1, tile).max(-1)
  return np.where(amax > 0, amax * fq.E4M3_INV_MAX, 1.0).astype(np.float32)


def _np_dequant_tiles(q, s, tile=128):
  return q.astype(np.float32) * np.repeat(s, tile, axis=-1)[..., :q.shape[-1]]


def _np_dequant_blocks(q, s, tile=128):
  full = np.repeat(np.repeat(s, tile, axis=-2), tile, axis=-1)
  return q.astype(np.float32) * full[..., :q.shape[-2], :q.shape[-1]]


def _assert_within_e4m3(x, dq, scale_full):
  bound = np.maximum(REL * np.abs(x), ABS_OF_SCALE * scale_full) * (1 + 1e-6)
  assert np.all(np.abs(dq - x) <= bound)


def test_tile_round_trip_exact_scales():
  rng = np.random.default_rng(0)
  x = _rng_matrix(rng, (24, 300))  # 300 = two full tiles and a partial one
  x[3, 128:256] = 0.0  # an all-zero tile: scale 1, exact zeros back
  q, s = jax.jit(fq.quantize_tiles)(x)
  q, s = np.asarray(q), np.asarray(s)
  assert q.dtype == ml_dtypes.float8_e4m3fn and s.shape == (24, 3)
  np.testing.assert_array_equal(s, _np_tile_scales(x))
  # Every tile's largest magnitude lands on the E4M3 maximum.
  amax_q = np.abs(np.pad(q.astype(np.float32), ((0, 0), (0, 84)))).reshape(24, 3, 128).max(-1)
  np.testing.assert_array_equal(amax_q, np.where(_np_tile_scales(x) == 1.0, 0.0, 448.0))
  dq = np.asarray(fq.dequantize_tiles(q, s))
  np.testing.assert_array_equal(dq, _np_dequant_tiles(q, s))
  _assert_within_e4m3(x, dq, np.repeat(s, 128, -1)[:, :300])
  assert np.all(dq[3, 128:256] == 0)


def test_block_round_trip_and_transpose():
  rng = np.random.default_rng(1)
  w = _rng_matrix(rng, (2, 200, 136), spread=False) * 0.02
  w[1, :128, :128] *= 1e4  # one loud block must not change its neighbours' scales
  q, s = fq.quantize_blocks(w)
  q, s = np.asarray(q), np.asarray(s)
  want_s = np.zeros((2, 2, 2), np.float32)
  for g in range(2):
    for i in range(2):
      for j in range(2):
        block = w[g, 128 * i:128 * (i + 1), 128 * j:128 * (j + 1)]
        want_s[g, i, j] = np.abs(block).max() * fq.E4M3_INV_MAX
  np.testing.assert_array_equal(s, want_s)
  dq = np.asarray(fq.dequantize_blocks(q, s))
  full = np.repeat(np.repeat(s, 128, -2), 128, -1)[:, :200, :136]
  _assert_within_e4m3(w, dq, full)
  # Blocks are square, so quant(w)^T == quant(w^T): dgrad builds its operand on demand.
  qt, st = fq.quantize_blocks(np.swapaxes(w, 1, 2))
  np.testing.assert_array_equal(np.asarray(qt).astype(np.float32),
                                np.swapaxes(q, 1, 2).astype(np.float32))
  np.testing.assert_array_equal(np.asarray(st), np.swapaxes(s, 1, 2))


def test_pow2_scales_round_up_to_powers_of_two():
  rng = np.random.default_rng(8)
  x = _rng_matrix(rng, (16, 256))
  x[0, :128] = 0.0  # all zeros: scale 1
  x[1, 5] = 448.0 * 2.0 ** -3  # amax / 448 already a power of two: kept as it is
  x[1, 6:128] = np.clip(x[1, 6:128], -1.0, 1.0) * 2.0 ** -4
  x[1, :5] = 0.0
  q, s = fq.quantize_tiles(x, pow2_scales=True)
  q, s = np.asarray(q), np.asarray(s)
  exact = _np_tile_scales(x)
  assert np.all(np.exp2(np.round(np.log2(s))) == s)  # powers of two
  assert np.all((s >= exact) & ((s < 2 * exact) | (exact == 1.0)))
  assert s[0, 0] == 1.0 and s[1, 0] == 2.0 ** -3
  dq = np.asarray(fq.dequantize_tiles(q, s))
  _assert_within_e4m3(x, dq, np.repeat(s, 128, -1))
  w = _rng_matrix(rng, (256, 128), spread=False)
  wq, ws = fq.quantize_blocks(w, pow2_scales=True)
  ws = np.asarray(ws)
  assert np.all(np.exp2(np.round(np.log2(ws))) == ws)
  _assert_within_e4m3(w, np.asarray(fq.dequantize_blocks(wq, ws)),
                      np.repeat(np.repeat(ws, 128, 0), 128, 1))


# The test below runs XLA:CPU with its oneDNN rewrites on: they include the SimplifyFPConversions
# pass that XLA:GPU runs by default, which turns an f32 -> e4m3 -> f32 chain into the identity.
_FOLD_SCRIPT = textwrap.dedent("""
    import json
    import jax, jax.numpy as jnp, numpy as np
    from kernels import fp8_gemm
    rng = np.random.default_rng(0)
    x = rng.standard_normal((128, 256)).astype(np.float32)
    w = (rng.standard_normal((256, 128)) * 0.05).astype(np.float32)
    dy = rng.standard_normal((128, 128)).astype(np.float32)
    plain = jax.jit(lambda a: a.astype(jnp.float8_e4m3fn).astype(jnp.float32))(x)
    def fwd_bwd(x, w, dy, p):
      y, vjp = jax.vjp(lambda x, w, p: fp8_gemm.fp8_linear(x, w, p), x, w, p)
      return (y, *vjp(dy))
    outs = jax.jit(fwd_bwd)(x, w, dy, jnp.zeros(2))
    print(json.dumps({"plain_round_trip_folded": bool(np.array_equal(plain, x)),
                      "outs": [np.asarray(o, np.float64).tolist() for o in outs]}))
""")


def _np_quant_tiles(x, axis):
  """NumPy quantise-dequantise in 1x128 tiles along `axis`."""
  xt = np.moveaxis(x, axis, -1)
  s = _np_tile_scales(xt)
  q = np.clip(xt / np.repeat(s, 128, -1), -448, 448).astype(ml_dtypes.float8_e4m3fn)
  return np.moveaxis(_np_dequant_tiles(q, s), -1, axis).astype(np.float64)


def test_reference_stays_fp8_where_xla_folds_conversion_chains():
  env = dict(os.environ, XLA_FLAGS="--xla_cpu_experimental_onednn_custom_call=true",
             JAX_PLATFORMS="cpu", PYTHONPATH=os.path.dirname(os.path.dirname(__file__)))
  proc = subprocess.run([sys.executable, "-c", _FOLD_SCRIPT], env=env, capture_output=True,
                        text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  got = json.loads(proc.stdout.strip().splitlines()[-1])
  # The control: this XLA folds a bare round trip (else the test proves nothing; if a jaxlib
  # stops folding here, find another way to run SimplifyFPConversions on CPU).
  assert got["plain_round_trip_folded"]
  y, dx, dw, dprobe = (np.asarray(o) for o in got["outs"])
  rng = np.random.default_rng(0)
  x = rng.standard_normal((128, 256)).astype(np.float32)
  w = (rng.standard_normal((256, 128)) * 0.05).astype(np.float32)
  dy = rng.standard_normal((128, 128)).astype(np.float32)
  wq, ws = fq.quantize_blocks(w)
  wd = _np_dequant_blocks(np.asarray(wq), np.asarray(ws)).astype(np.float64)
  # Exactly the FP8 products (a folded round trip is ~3% off them: the unquantised product).
  np.testing.assert_allclose(y, _np_quant_tiles(x, 1) @ wd, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(dx, _np_quant_tiles(dy, 1) @ wd.T, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(dw, _np_quant_tiles(x, 0).T @ _np_quant_tiles(dy, 0),
                             rtol=1e-5, atol=1e-4)
  assert dprobe[1] < 0.9999  # the gradient metric sees the quantisation


def test_row_tiles_restart_per_group():
  # Groups of 3, 0 and 5 rows in 10 (2 past the groups), tiles of 4: hand-worked.
  ids, num_tiles = fq.row_tile_ids(10, jnp.array([3, 0, 5]), tile=4)
  np.testing.assert_array_equal(ids, [0, 0, 0, 1, 1, 1, 1, 2, 3, 3])
  assert num_tiles == 6  # cdiv(10, 4) + 3 groups (with the rows past them)
  ids, num_tiles = fq.row_tile_ids(10, tile=4)
  np.testing.assert_array_equal(ids, [0, 0, 0, 0, 1, 1, 1, 1, 2, 2])


def test_transposed_quantisation_fused_with_rowwise():
  rng = np.random.default_rng(2)
  x = _rng_matrix(rng, (300, 40), spread=False)
  sizes = jnp.array([100, 0, 150], jnp.int32)  # 50 rows past the groups
  ids, num_tiles = fq.row_tile_ids(300, sizes)
  q, s, qt, st = fq.quantize_tiles_with_transpose(x, ids, num_tiles)
  q_alone, s_alone = fq.quantize_tiles(x)
  np.testing.assert_array_equal(np.asarray(s), np.asarray(s_alone))
  np.testing.assert_array_equal(np.asarray(q).astype(np.float32),
                                np.asarray(q_alone).astype(np.float32))
  ids = np.asarray(ids)
  st = np.asarray(st)
  for tile in np.unique(ids):  # scales from each tile's own rows only
    rows = ids == tile
    np.testing.assert_array_equal(st[:, tile], np.abs(x[rows]).max(0) * fq.E4M3_INV_MAX)
  dq = np.asarray(fq.dequantize_rows_transposed(qt, st, ids)).T
  _assert_within_e4m3(x, dq, st[:, ids].T)


def test_fp8_matmul_matches_fp32_reference():
  rng = np.random.default_rng(3)
  x, w = _rng_matrix(rng, (64, 384), spread=False), _rng_matrix(rng, (384, 200), False) * 0.05
  xq, xs = fq.quantize_tiles(x)
  wq, ws = fq.quantize_blocks(w)
  y = np.asarray(fp8_gemm.fp8_matmul(xq, xs, wq.T, ws.T, out_dtype=jnp.float32))
  # Exactly the fp32 product of the dequantised operands ...
  want = _np_dequant_tiles(np.asarray(xq), np.asarray(xs)) @ _np_dequant_blocks(
      np.asarray(wq), np.asarray(ws))
  np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)
  # ... and within FP8's error of the exact one: two operands at <= 2^-4 each, ~2.5% typical.
  exact = x.astype(np.float64) @ w
  assert np.linalg.norm(y - exact) / np.linalg.norm(exact) < 0.05
  # bf16 output, as the recipe has it.
  y16 = fp8_gemm.fp8_matmul(xq, xs, wq.T, ws.T)
  assert y16.dtype == jnp.bfloat16
  # Tile-scaled B (the wgrad form): x^T-tiles times y^T-tiles.
  ids, nt = fq.row_tile_ids(64)
  xtq, xts = fq.quantize_rows_transposed(x, ids, nt)
  dy = _rng_matrix(rng, (64, 96), spread=False)
  dytq, dyts = fq.quantize_rows_transposed(dy, ids, nt)
  dw = np.asarray(fp8_gemm.fp8_matmul(xtq, xts, dytq, dyts, b_scaling="tile",
                                      out_dtype=jnp.float32))
  np.testing.assert_allclose(dw, _np_dequant_tiles(np.asarray(xtq), np.asarray(xts)) @
                             _np_dequant_tiles(np.asarray(dytq), np.asarray(dyts)).T,
                             rtol=1e-5, atol=1e-4)
  exact = x.T.astype(np.float64) @ dy
  assert np.linalg.norm(dw - exact) / np.linalg.norm(exact) < 0.05
  with pytest.raises(ValueError, match="float8_e4m3fn"):
    fp8_gemm.fp8_matmul(x, xs, wq.T, ws.T)


def test_fp8_grouped_matmuls_match_per_group_loop():
  rng = np.random.default_rng(4)
  sizes = np.array([37, 0, 150, 3], np.int32)  # an empty group; 10 rows past the groups
  x, w = _rng_matrix(rng, (200, 160), False), _rng_matrix(rng, (4, 160, 72), False) * 0.05
  dy = _rng_matrix(rng, (200, 72), False)
  starts = np.r_[0, np.cumsum(sizes)]
  # Jitted: op by op, the forward and its VJP compile ~150 small programs.
  linear = jax.jit(lambda a, b: fp8_gemm.fp8_grouped_linear(a, b, jnp.asarray(sizes),
                                                            jnp.zeros(2)))
  y = np.asarray(linear(x, w))
  dx, dw = jax.vjp(linear, x, w)[1](dy)
  want_y, want_dx = np.zeros((200, 72)), np.zeros((200, 160))
  want_dw = np.zeros((4, 160, 72))
  for g in range(4):
    r = slice(starts[g], starts[g + 1])
    want_y[r] = x[r].astype(np.float64) @ w[g]
    want_dx[r] = dy[r].astype(np.float64) @ w[g].T
    want_dw[g] = x[r].T.astype(np.float64) @ dy[r]
  assert np.all(y[190:] == 0) and np.all(np.asarray(dx)[190:] == 0)
  assert np.all(np.asarray(dw)[1] == 0)
  for got, want in ((y, want_y), (dx, want_dx), (dw, want_dw)):
    got = np.asarray(got)
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < 0.05
  # The grouped GEMM alone is exactly dequantise-then-multiply.
  xq, xs = fq.quantize_tiles(x)
  wq, ws = fq.quantize_blocks(np.swapaxes(w, 1, 2))
  got = np.asarray(fp8_gemm.fp8_grouped_matmul(xq, xs, wq, ws, jnp.asarray(sizes),
                                               out_dtype=jnp.float32))
  xd, wd = _np_dequant_tiles(np.asarray(xq), np.asarray(xs)), _np_dequant_blocks(
      np.asarray(wq), np.asarray(ws))
  for g in range(4):
    r = slice(starts[g], starts[g + 1])
    np.testing.assert_allclose(got[r], xd[r] @ wd[g].T, rtol=1e-5, atol=1e-5)


def test_fp8_linear_gradients_match_bf16_autodiff():
  rng = np.random.default_rng(5)
  x, w = _rng_matrix(rng, (96, 256), False), _rng_matrix(rng, (256, 160), False) * 0.05
  cot = _rng_matrix(rng, (96, 160), False)
  loss8 = lambda a, b, p: jnp.sum(fp8_gemm.fp8_linear(a, b, p) * cot)
  loss16 = lambda a, b: jnp.sum((a.astype(jnp.bfloat16) @ b.astype(jnp.bfloat16)
                                 ).astype(jnp.float32) * cot)
  dx8, dw8, dprobe = jax.jit(jax.grad(loss8, (0, 1, 2)))(x, w, jnp.zeros(2))
  dx16, dw16 = jax.grad(loss16, (0, 1))(x, w)
  exact_dx, exact_dw = cot.astype(np.float64) @ w.T, x.T.astype(np.float64) @ cot
  for got8, got16, exact in ((dx8, dx16, exact_dx), (dw8, dw16, exact_dw)):
    rel8 = np.linalg.norm(np.asarray(got8, np.float64) - exact) / np.linalg.norm(exact)
    assert rel8 < 0.05  # E4M3 on both operands; bf16 autodiff sits at ~0.5%
    assert np.linalg.norm(np.asarray(got8) - np.asarray(got16)) / np.linalg.norm(
        np.asarray(got16)) < 0.05
  # The dgrad is exactly FP8: dequant(quant(dy)) @ dequant(quant(w))^T.
  cq, cs = fq.quantize_tiles(cot)
  wq, ws = fq.quantize_blocks(w)
  want_dx = _np_dequant_tiles(np.asarray(cq), np.asarray(cs)) @ _np_dequant_blocks(
      np.asarray(wq), np.asarray(ws)).T
  np.testing.assert_allclose(dx8, want_dx, rtol=1e-5, atol=1e-5)
  # The probe's gradient is the output gradient's [underflow, cosine].
  np.testing.assert_allclose(dprobe, fq.quant_metrics(cot, cq, fq.dequantize_tiles(cq, cs)),
                             rtol=1e-6)
  # A probe that skips the metrics: the same gradients bit for bit, zeros for the metrics.
  dx_skip, dw_skip, dprobe_skip = jax.jit(jax.grad(loss8, (0, 1, 2)))(
      x, w, jnp.asarray(fp8_gemm.SKIP_METRICS))
  np.testing.assert_array_equal(dx_skip, dx8)
  np.testing.assert_array_equal(dw_skip, dw8)
  np.testing.assert_array_equal(dprobe_skip, np.zeros(2))


@pytest.mark.parametrize("fp8_gemms", [("wgrad",), ("fprop", "dgrad")])
def test_recipe_quantises_only_its_gemms(fp8_gemms):
  """An FP8 GEMM is the product of the dequantised operands; one the recipe keeps is the plain
  product (fp32 inputs here, so it is exact to fp32 rounding). The two cases take every GEMM
  of both ops once each way."""
  recipe = fp8_gemm.Fp8Recipe(**{p: p in fp8_gemms for p in ("fprop", "dgrad", "wgrad")})
  rng = np.random.default_rng(9)
  x, w = _rng_matrix(rng, (128, 256), False), _rng_matrix(rng, (256, 128), False) * 0.05
  dy = _rng_matrix(rng, (128, 128), False)
  sizes = np.array([40, 0, 88], np.int32)
  wg = _rng_matrix(rng, (3, 256, 128), False) * 0.05
  wq, ws = fq.quantize_blocks(w)
  wd = _np_dequant_blocks(np.asarray(wq), np.asarray(ws)).astype(np.float64)
  x64, dy64 = x.astype(np.float64), dy.astype(np.float64)
  fp8_want = {"fprop": _np_quant_tiles(x, 1) @ wd, "dgrad": _np_quant_tiles(dy, 1) @ wd.T,
              "wgrad": _np_quant_tiles(x, 0).T @ _np_quant_tiles(dy, 0)}
  plain_want = {"fprop": x64 @ w, "dgrad": dy64 @ w.T, "wgrad": x64.T @ dy64}
  # Jitted: op by op, each op and its VJP compile ~100 small programs.
  y, vjp = jax.vjp(jax.jit(lambda a, b: fp8_gemm.fp8_linear(a, b, jnp.zeros(2), "auto", recipe)),
                   x, w)
  got = {"fprop": y, "dgrad": vjp(dy)[0], "wgrad": vjp(dy)[1]}
  for name in ("fprop", "dgrad", "wgrad"):
    want = fp8_want[name] if name in fp8_gemms else plain_want[name]
    np.testing.assert_allclose(np.asarray(got[name]), want, rtol=2e-5, atol=2e-5,
                               err_msg=name)
  # The grouped op, per group: the same switch (its wgrad tiles restart per group).
  starts = np.r_[0, np.cumsum(sizes)]
  y, vjp = jax.vjp(jax.jit(lambda a, b: fp8_gemm.fp8_grouped_linear(
      a, b, jnp.asarray(sizes), jnp.zeros(2), "auto", recipe)), x, wg)
  dx, dwg = vjp(dy)
  for g in (0, 2):
    r = slice(starts[g], starts[g + 1])
    wq, ws = fq.quantize_blocks(wg[g])
    wd = _np_dequant_blocks(np.asarray(wq), np.asarray(ws)).astype(np.float64)
    xt = np.pad(x[r], ((0, 128 - (r.stop - r.start)), (0, 0)))  # one M tile per group
    dyt = np.pad(dy[r], ((0, 128 - (r.stop - r.start)), (0, 0)))
    fp8_g = {"fprop": _np_quant_tiles(x[r], 1) @ wd, "dgrad": _np_quant_tiles(dy[r], 1) @ wd.T,
             "wgrad": _np_quant_tiles(xt, 0).T @ _np_quant_tiles(dyt, 0)}
    plain_g = {"fprop": x64[r] @ wg[g], "dgrad": dy64[r] @ wg[g].T, "wgrad": x64[r].T @ dy64[r]}
    for name, out in (("fprop", y[r]), ("dgrad", dx[r]), ("wgrad", dwg[g])):
      want = fp8_g[name] if name in fp8_gemms else plain_g[name]
      np.testing.assert_allclose(np.asarray(out), want, rtol=2e-5, atol=5e-5,
                                 err_msg=f"grouped {name} group {g}")


def test_metrics_on_crafted_tile():
  # One tile: amax 448 (scale 1), ten 1.0s, five 1e-4s (below half of E4M3's smallest
  # subnormal, 2^-9: they flush to zero) and 112 exact zeros (not counted).
  x = np.zeros((1, 128), np.float32)
  x[0, 0], x[0, 1:11], x[0, 11:16] = 448.0, 1.0, 1e-4
  q, s = fq.quantize_tiles(x)
  dq = fq.dequantize_tiles(q, s)
  underflow, cosine = np.asarray(fq.quant_metrics(x, q, dq))
  assert underflow == pytest.approx(5 / 16)
  x64, dq64 = x.astype(np.float64).ravel(), np.asarray(dq, np.float64).ravel()
  assert cosine == pytest.approx(x64 @ dq64 / np.linalg.norm(x64) / np.linalg.norm(dq64),
                                 abs=1e-7)
  # All zeros: nothing lost.
  z = np.zeros((2, 128), np.float32)
  np.testing.assert_array_equal(fp8.activation_metrics(z), [0.0, 1.0])
  # A weight block with a known number of flushed entries.
  w = np.full((128, 128), 0.5, np.float32)
  w[0, 0], w[1, :7] = 448.0, 1e-5
  np.testing.assert_allclose(fp8.weight_metrics(w)[0], 7 / w.size)


def test_metrics_carry_no_gradient_through_the_quantise_kernel(monkeypatch):
  """On Hopper the metrics quantise with a Pallas kernel, which has no JVP: a model step once
  failed there (an AssertionError in Pallas's JVP rule). Here the interpreted kernel stands in."""
  x = jnp.asarray(_rng_matrix(np.random.default_rng(0), (8, 256)))
  want = fp8.activation_metrics(x)
  real = fq._resolve_backend
  monkeypatch.setattr(fq, "_resolve_backend",
                      lambda b: "pallas_triton_interpret" if b == "auto" else real(b))
  loss = lambda x: jnp.sum(x * x) + jnp.sum(fp8.activation_metrics(x))
  np.testing.assert_allclose(jax.grad(loss)(x), 2 * x, rtol=1e-6)
  np.testing.assert_allclose(fp8.activation_metrics(x), want, rtol=1e-6)


def test_summarize_mean_and_worst():
  stats = {"a": {"fp8_act": jnp.array([[0.1, 0.99], [0.3, 0.97]]), "counts": jnp.ones(4)},
           "b": {"fp8_act": jnp.array([0.2, 0.98]), "fp8_weight_down": jnp.array([0.0, 1.0])}}
  probes = {"a": {"grad": jnp.array([0.5, 0.9])}}
  got = fp8.summarize(stats, probes)
  assert float(got["fp8_act_underflow"]) == pytest.approx(0.2)
  assert float(got["fp8_act_underflow_max"]) == pytest.approx(0.3)
  assert float(got["fp8_act_cos_min"]) == pytest.approx(0.97)
  assert float(got["fp8_weight_cos"]) == pytest.approx(1.0)
  assert float(got["fp8_grad_underflow"]) == pytest.approx(0.5)
  assert fp8.summarize({}, {}) == {}


def test_quant_config_is_validated():
  m = ling2.model_config("tiny")
  m.quant = "fp8_e5m2"
  with pytest.raises(config_lib.ConfigError, match=r"config\.model\.quant"):
    config_lib.validate_model_config(m)
  m.quant = "fp8_blockwise"
  for align in (24, 0, 256):
    m.fp8_group_align = align
    with pytest.raises(config_lib.ConfigError, match=r"config\.model\.fp8_group_align"):
      config_lib.validate_model_config(m)


def test_fp8_recipe_config_and_which_projections_quantise():
  m = ling2.model_config("tiny")
  m.quant, m.fp8_recipe = "fp8_blockwise", "fp16_wgrad"
  with pytest.raises(config_lib.ConfigError, match=r"config\.model\.fp8_recipe"):
    config_lib.validate_model_config(m)
  m.quant, m.fp8_recipe = "none", "wgrad_only"
  with pytest.raises(config_lib.ConfigError, match=r"fp8_recipe.*quant='fp8_blockwise'"):
    config_lib.validate_model_config(m)

  def probes(recipe):  # shapes only: nothing compiles
    m = _tiny("fp8_blockwise")
    m.fp8_recipe = recipe
    shapes = jax.eval_shape(lambda key: model_lib.init_variables(m, key), jax.random.key(0))
    return sorted("/".join(str(getattr(k, "key", k)) for k in path)
                  for path, _ in jax.tree_util.tree_flatten_with_path(shapes[fp8.PROBES])[0])
  full = probes("full")
  # The attention output projection of the dense layer, the MoE layer and the MTP block.
  attn_out = [p for p in full if "/out/" in p]
  assert len(attn_out) == 3
  assert probes("bf16_attn_out") == [p for p in full if p not in attn_out]
  experts = [p for p in full if p.endswith(("grad_gate_up", "grad_down"))]
  assert len(experts) == 4 and probes("experts_only") == experts


def _tiny(quant):
  m = ling2.model_config("tiny")
  m.num_hidden_layers, m.first_k_dense_replace = 2, 1
  m.quant = quant
  return m


def test_model_fp8_forward_and_probes():
  ids = jnp.asarray(np.random.default_rng(6).integers(0, 256, (2, 16)), jnp.int32)
  pos = jnp.broadcast_to(jnp.arange(16), (2, 16))
  seg = jnp.ones((2, 16), jnp.int32)
  # Jitted: op-by-op, the whole model runs for minutes on CPU.
  v_none = jax.jit(lambda key: model_lib.init_variables(_tiny("none"), key))(jax.random.key(0))
  # Only its structure and probe shapes are used: no need to compile its init.
  v_fp8 = jax.eval_shape(lambda: model_lib.init_variables(_tiny("fp8_blockwise"),
                                                          jax.random.key(0)))
  m_mtp = _tiny("none").num_nextn_predict_layers
  # Same parameters either way: checkpoints move between the two.
  assert jax.tree.structure(v_none["params"]) == jax.tree.structure(v_fp8["params"])
  probes = fp8.init_probes(v_fp8)
  # Dense layer: QKV, out, gate_up, down; MoE layer and MTP block: those plus 2 expert projections.
  assert len(jax.tree.leaves(probes)) == 4 + 6 + 6 * m_mtp

  def logits(m, probes):
    variables = dict(v_none)
    if probes:
      variables[fp8.PROBES] = probes
    out, stats = model_lib.apply(m, variables, ids, pos, seg, ids)
    # The MTP logits too: an op the loss does not reach gets no gradient to measure.
    loss = sum(jnp.sum(z * jnp.cos(z)) for z in (out.logits_BLV, *out.mtp_logits))
    return loss, (out.logits_BLV, stats)

  _, (want, _) = jax.jit(lambda: logits(_tiny("none"), None))()
  m_fp8 = _tiny("fp8_blockwise")
  grad_fn = jax.jit(jax.grad(lambda p: logits(m_fp8, p), has_aux=True))
  probe_grads, (got, stats) = grad_fn(probes)
  err = np.linalg.norm(got - want) / np.linalg.norm(want)
  assert 0 < err < 0.05
  scalars = fp8.summarize(stats, probe_grads)
  for kind in ("act", "weight", "grad"):
    assert 0.99 < float(scalars[f"fp8_{kind}_cos_min"]) <= 1.0 + 1e-6
    assert 0.0 <= float(scalars[f"fp8_{kind}_underflow_max"]) < 0.01
  # Probes that skip the metrics (the trainer's unlogged steps): the same logits, and every
  # metric, forward (experts' and dense ops') and backward, reads zero.
  skip = jax.tree.map(lambda p: jnp.broadcast_to(jnp.asarray(fp8_gemm.SKIP_METRICS), p.shape),
                      probes)
  skip_grads, (got_skip, stats_skip) = grad_fn(skip)
  np.testing.assert_array_equal(got_skip, got)
  flat = flax.traverse_util.flatten_dict(stats_skip)
  fp8_stats = [v for k, v in flat.items() if k[-1].startswith("fp8_")]
  assert len(fp8_stats) == len([k for k in flax.traverse_util.flatten_dict(stats)
                                if k[-1].startswith("fp8_")]) > 0
  for v in fp8_stats + jax.tree.leaves(skip_grads):
    np.testing.assert_array_equal(v, 0.0)


def test_fp8_metrics_due_on_logged_steps_only():
  t = ml_collections.ConfigDict({"log_every": 10, "num_steps": 25})
  due = [bool(train.fp8_metrics_due(jnp.int32(s), t)) for s in range(25)]
  # The trainer logs after steps 10, 20 and the last (25): state.step 9, 19 and 24 before them.
  assert [s for s, d in enumerate(due) if d] == [9, 19, 24]
  t.fp8_metrics_every_step = True
  assert all(bool(train.fp8_metrics_due(jnp.int32(s), t)) for s in range(25))
  m = _tiny("fp8_blockwise")
  on, off = train.fp8_probes(m, True), train.fp8_probes(m, jnp.bool_(False))
  assert jax.tree.structure(on) == jax.tree.structure(off) and jax.tree.leaves(on)
  for a, b in zip(jax.tree.leaves(on), jax.tree.leaves(off)):
    np.testing.assert_array_equal(a, 0.0)
    np.testing.assert_array_equal(b[..., 0], -1.0)
  assert train.fp8_probes(_tiny("none"), False) == {}


def _routed_experts(seed: int, f: int, t: int = 24, k: int = 2, d: int = 128, e: int = 4):
  """x [t, d], expert ids [t, k] from experts 0-2 and dropped slots (id e; expert 3 gets no
  rows), router weights [t, k], w_gate_up [e, d, 2f] and w_down [e, f, d], all fp32."""
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((t, d)).astype(np.float32)
  ids = np.stack([rng.choice([0, 1, 2, e], k, replace=False) for _ in range(t)]).astype(np.int32)
  w = rng.uniform(0.1, 1.0, (t, k)).astype(np.float32)
  w1 = (rng.standard_normal((e, d, 2 * f)) / np.sqrt(d)).astype(np.float32)
  w2 = (rng.standard_normal((e, f, d)) / np.sqrt(f)).astype(np.float32)
  return x, ids, w, w1, w2


def test_fp8_experts_padded_groups_match_unpadded():
  """The FP8 expert FFN pads each expert to fp8_group_align rows (dispatch.FP8_GROUP_ALIGN by
  default; zero rows, no weight): output and input gradients are bit-identical to the unpadded
  path; router-weight gradients (summed in the rows' sorted order when padded,
  `dispatch._unpermute_bwd`) and expert weight gradients (the reference wgrad sums other row
  tiles) equal up to fp32 summation order. An empty expert and dropped slots included."""
  x, ids, w, w1, w2 = _routed_experts(seed=3, f=64)

  def loss(x, w, w1, w2, align):
    y = dispatch.expert_ffn(x, ids, w, w1, w2, backend="reference", quant="fp8_blockwise",
                            fp8_group_align=align)
    return jnp.sum(y * jnp.cos(jnp.arange(y.size, dtype=y.dtype).reshape(y.shape))), y

  assert dispatch.FP8_GROUP_ALIGN > 1
  grads = jax.jit(jax.grad(loss, (0, 1, 2, 3), has_aux=True), static_argnums=4)
  (dx, dw, dw1, dw2), y = grads(x, w, w1, w2, dispatch.FP8_GROUP_ALIGN)
  (dx_1, dw_1, dw1_1, dw2_1), y_1 = grads(x, w, w1, w2, 1)
  for got, want in ((y, y_1), (dx, dx_1)):
    np.testing.assert_array_equal(got, want)
  for got, want in ((dw, dw_1), (dw1, dw1_1), (dw2, dw2_1)):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6 * np.abs(want).max())
  assert not np.any(dw1[3]) and all(np.any(dw1[i]) for i in range(3))  # expert 3: no rows


@pytest.mark.parametrize("align,grad_in_quantize", [(1, False), (16, False), (16, True)])
def test_fp8_experts_fused_dispatch_matches_separate_ops(align, grad_in_quantize, monkeypatch):
  """fp8_fused_dispatch (the default, `kernels/fp8_experts.py`): the token copies read by index
  inside x's quantisation, the SwiGLU inside its output's, the output gradient's rows (router
  weights multiplied in) inside dy's, the SwiGLU's gradient inside dh's (or in XLA first). In
  fp32 the separate ops (permute, FP8 GEMMs, unpermute) quantise the same values forward, so
  the outputs are identical; the gradients agree to summation order and the SwiGLU gradient's
  formula against autodiff; in bf16 the separate path rounds weight * dout to bf16 before
  quantising, so they agree to that rounding. Dropped slots, an empty expert, padded and
  unpadded groups. Checked to fail with the router weights left out of dy's rows, with dx
  summed over a token's first copy only, and with the SwiGLU's input perturbed."""
  from kernels import fp8_experts
  monkeypatch.setattr(fp8_experts, "_SWIGLU_GRAD_IN_QUANTIZE", grad_in_quantize)
  x, ids, w, w1, w2 = _routed_experts(seed=11, f=64)
  cos = lambda y: jnp.cos(jnp.arange(y.size, dtype=jnp.float32).reshape(y.shape))

  def loss(x, w, w1, w2, probes, fused, dtype):
    y = dispatch.expert_ffn(x.astype(dtype), ids, w, w1.astype(dtype), w2.astype(dtype),
                            backend="reference", quant="fp8_blockwise", fp8_probes=probes,
                            fp8_group_align=align, fp8_fused_dispatch=fused)
    return jnp.sum(y.astype(jnp.float32) * cos(y)), y

  grads = jax.jit(jax.grad(loss, (0, 1, 2, 3, 4), has_aux=True), static_argnums=(5, 6))
  probes = (jnp.zeros(2), jnp.zeros(2))
  for dtype, rtol in ((jnp.float32, 1e-5), (jnp.bfloat16, 0.05)):
    got, y = grads(x, w, w1, w2, probes, True, dtype)
    want, y_sep = grads(x, w, w1, w2, probes, False, dtype)
    scale = lambda a: np.abs(np.asarray(a, np.float32)).max()
    np.testing.assert_allclose(np.asarray(y, np.float32), np.asarray(y_sep, np.float32),
                               rtol=rtol, atol=rtol * scale(y_sep))
    for g, r in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
      g, r = np.asarray(g, np.float32), np.asarray(r, np.float32)
      np.testing.assert_allclose(g, r, rtol=rtol, atol=rtol * scale(r))
    if dtype == jnp.float32:
      np.testing.assert_array_equal(y, y_sep)  # the same codes forward
      assert 0 < float(got[4][0][0]) or 0.99 < float(got[4][0][1]) <= 1.0 + 1e-6
  assert not np.any(np.asarray(got[2])[3]) and all(np.any(np.asarray(got[2])[i])
                                                   for i in range(3))  # expert 3: no rows


def test_fp8_experts_with_32_row_groups_run_the_fp8_wgrad_kernel(monkeypatch):
  """fp8_group_align=32 (config.model.fp8_group_align) routes the experts' weight gradient
  through the FP8 wgrad kernel (here interpreted) and matches the reference backend."""
  from kernels import fp8_tgmm_mgpu

  x, ids, w, w1, w2 = _routed_experts(seed=5, f=128)  # K = 128 for the down projection too
  calls = []
  kernel = fp8_tgmm_mgpu.tgmm_fp8
  monkeypatch.setattr(fp8_tgmm_mgpu, "tgmm_fp8",
                      lambda *a, **kw: calls.append(kw["row_align"]) or kernel(*a, **kw))

  def grads():
    def loss(w1, w2):
      y = dispatch.expert_ffn(x, ids, w, w1, w2, backend="reference", quant="fp8_blockwise",
                              fp8_group_align=32)
      return jnp.sum(y * jnp.cos(jnp.arange(y.size, dtype=y.dtype).reshape(y.shape)))
    return jax.jit(jax.grad(loss, (0, 1)))(w1, w2)

  want = grads()  # The FP8 GEMMs' "auto" backend: the reference on the CPU.
  resolve = fp8_gemm._resolve_backend  # "auto" as on a Hopper GPU, with interpreted kernels
  monkeypatch.setattr(fp8_gemm, "_resolve_backend", lambda b: resolve(
      "pallas_mosaic_gpu_interpret" if b == "auto" else b))
  got = grads()
  assert calls == [32, 32]  # both projections' weight gradients
  for g, r in zip(got, want):
    np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-5 * np.abs(r).max())
  assert not np.any(got[0][3]) and all(np.any(got[0][i]) for i in range(3))  # expert 3: no rows


def test_fp8_experts_under_expert_parallel_mesh():
  rng = np.random.default_rng(7)
  t, k, d, f, e = 64, 2, 128, 64, 8
  x = rng.standard_normal((t, d)).astype(np.float32)
  ids = np.stack([rng.permutation(e)[:k] for _ in range(t)]).astype(np.int32)
  w = rng.uniform(0.1, 1.0, (t, k)).astype(np.float32)
  w1 = (rng.standard_normal((e, d, 2 * f)) / np.sqrt(d)).astype(np.float32)
  w2 = (rng.standard_normal((e, f, d)) / np.sqrt(f)).astype(np.float32)

  def loss(fn, x, w1, w2, probes):
    y = fn(x, ids, w, w1, w2, quant="fp8_blockwise", fp8_probes=probes)
    return jnp.sum(y * jnp.cos(jnp.arange(y.size, dtype=y.dtype).reshape(y.shape)))

  zero = (jnp.zeros(2), jnp.zeros(2))
  single = lambda *a, **kw: dispatch.expert_ffn(*a, backend="reference", **kw)
  want = jax.jit(jax.grad(loss, (1, 2, 3, 4)), static_argnums=0)(single, x, w1, w2, zero)
  cfg = sharding.default_mesh_config()
  cfg.data, cfg.expert = 4, 2
  parallel = lambda *a, **kw: expert_parallel.expert_ffn(*a, backend="reference",
                                                         all_to_all="padded", **kw)
  with jax.set_mesh(sharding.make_mesh(cfg)):
    got = jax.jit(jax.grad(loss, (1, 2, 3, 4)), static_argnums=0)(parallel, x, w1, w2, zero)
  # x's tiles are per row, so dgrad matches; wgrad's tiles along tokens differ per shard, so
  # the sharded weight gradients are held to the single-device FP8 error against fp32.
  np.testing.assert_allclose(got[0], want[0], rtol=1e-4, atol=1e-5)
  exact = jax.jit(jax.grad(lambda a, b: loss(
      lambda *z, **kw: dispatch.expert_ffn(*z, backend="reference"), x, a, b, zero), (0, 1)))(
          w1, w2)
  for g, g1, wt in zip(got[1:3], want[1:3], exact):
    err, err1 = (np.linalg.norm(a - wt) / np.linalg.norm(wt) for a in (g, g1))
    assert err < 0.1 and err < 1.5 * err1
  # Per-device metrics come back averaged over the 8 devices, not summed.
  for probe in got[3]:
    assert 0.0 <= float(probe[0]) < 0.01 and 0.99 < float(probe[1]) <= 1.0 + 1e-6
