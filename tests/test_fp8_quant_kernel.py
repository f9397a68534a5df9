"""Tests for kernels/fp8_quant_triton.py (the one-pass quantise kernel) on CPU.

The kernel runs in Pallas's interpreter through kernels/fp8_quant.py's "pallas_triton_interpret"
backend and must give exactly the codes and scales of the XLA reference ("xla"), which a NumPy
computation of the rule checks in turn. What only a GPU checks (Triton's compiled arithmetic,
bandwidth) is in experiments/bench_fp8.py.

Key: M rows, K columns, Kt 128-tiles along K, C tiles along M.
"""

import functools

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from kernels import fp8_quant as fq
from kernels import fp8_quant_triton as fqt
from kernels import grouped_matmul as gmm_lib

_INTERP = "pallas_triton_interpret"


def _x(rng, shape, dtype):
  """Rows over 130 binades (the smallest keep scales normal), a zero tile and exact zeros."""
  x = rng.standard_normal(shape) * np.exp2(rng.integers(-100, 30, shape[:-1] + (1,)))
  x[..., 5, 128:256] = 0.0
  return jnp.asarray(x, dtype)


def _jit(fn, *args, **static):
  """fn jitted with its static arguments bound: one compile each instead of one per op."""
  return jax.jit(functools.partial(fn, **static))(*args)


def _bits(a):
  a = np.asarray(a)
  return a.view(np.uint8) if a.dtype == ml_dtypes.float8_e4m3fn else a.view(np.uint32)


def _assert_same(got, want):
  for g, w in zip(got, want, strict=True):
    assert g.shape == w.shape and g.dtype == w.dtype
    np.testing.assert_array_equal(_bits(g), _bits(w))


def test_tiles_kernel_bit_identical_to_xla_and_numpy():
  """Leading axes, K off the tile (333), rows off the launch's 64 (pow2 scales: below)."""
  rng = np.random.default_rng(0)
  x = _x(rng, (2, 75, 333), jnp.float32)
  q_got, s_got = _jit(fq.quantize_tiles, x, backend=_INTERP)
  _assert_same((q_got, s_got), _jit(fq.quantize_tiles, x, backend="xla"))
  # The rule itself, in NumPy (exact scales only): scale = amax * fp32(1/448), q = x * (1/scale).
  x32 = np.pad(np.asarray(x), ((0, 0), (0, 0), (0, 51))).reshape(2, 75, 3, 128)
  amax = np.abs(x32).max(-1)
  scale = np.where(amax > 0, amax * fq.E4M3_INV_MAX, np.float32(1)).astype(np.float32)
  q = np.clip(x32 * (np.float32(1) / scale)[..., None], -448, 448).astype(ml_dtypes.float8_e4m3fn)
  np.testing.assert_array_equal(_bits(s_got), _bits(scale))
  np.testing.assert_array_equal(_bits(q_got), _bits(q.reshape(2, 75, 384)[..., :333]))
  assert np.asarray(s_got)[0, 5, 1] == 1.0 and np.all(np.asarray(q_got)[0, 5, 128:256] == 0)


@pytest.mark.parametrize("case", ["groups_fused_pow2", "aligned_transposed_bf16",
                                  "groups_row_align_16_bf16", "groups_row_align_128_pow2"])
def test_transposed_kernels_bit_identical_to_xla(case):
  """Both layouts from one read, with tiles restarting per group (empty groups, tiny ones, one
  over 128 rows, rows past the groups, K off the tile); the transposed layout alone over
  128-row tiles of a shape that needs no masks; both layouts over groups padded to 16 rows (as
  dispatch.permute pads them: a group of one real row and zeros, one of 144 rows, rows past the
  groups) with the kernel told so; groups of whole 128-row tiles (empty ones, one real row then
  zeros, rows past the groups), which take the launch of tiles from row 0, their unreached
  tiles padded with scale 1."""
  rng = np.random.default_rng(1)
  row_align = 1
  if case == "groups_fused_pow2":
    x = _x(rng, (300, 200), jnp.float32)
    tile_ids, num_tiles = fq.row_tile_ids(300, jnp.asarray([0, 70, 3, 0, 150, 1], jnp.int32))
    op = functools.partial(fq.quantize_tiles_with_transpose, num_tiles=num_tiles,
                           pow2_scales=True)
  elif case == "aligned_transposed_bf16":
    x, tile_ids = _x(rng, (256, 256), jnp.bfloat16), None  # no masks: the GPU's fast path
    op = functools.partial(fq.quantize_rows_transposed, num_tiles=2)
  elif case == "groups_row_align_128_pow2":
    row_align, x = 128, np.array(_x(rng, (640, 256), jnp.float32))
    x[129:256] = 0.0  # group 1: one real row, then padding
    tile_ids, num_tiles = fq.row_tile_ids(640, jnp.asarray([0, 256, 128, 0, 128], jnp.int32))
    op = functools.partial(fq.quantize_tiles_with_transpose, num_tiles=num_tiles,
                           pow2_scales=True)
  else:
    row_align, x = 16, np.array(_x(rng, (256, 200), jnp.float32))
    x[1:16] = 0.0  # group 1: one real row, then padding
    x = jnp.asarray(x, jnp.bfloat16)
    tile_ids, num_tiles = fq.row_tile_ids(256, jnp.asarray([0, 16, 144, 0, 48], jnp.int32))
    op = functools.partial(fq.quantize_tiles_with_transpose, num_tiles=num_tiles)
  got = _jit(op, x, tile_ids, backend=_INTERP, row_align=row_align)
  _assert_same(got, _jit(op, x, tile_ids, backend="xla"))
  if tile_ids is not None:  # empty tiles get scale 1
    empty = np.setdiff1d(np.arange(num_tiles), np.asarray(tile_ids))
    assert empty.size and np.all(np.asarray(got[3])[:, empty] == 1.0)


def _kernel_matches_xla_of(values, x, sizes, row_align, metrics, **fused):
  """The kernel on x with `fused` (src_M / mult_M / prologue / aux) gives the codes, scales and
  metrics XLA gives for `values`, what those arguments stand for; returns the kernel's."""
  tile_ids, num_tiles = fq.row_tile_ids(values.shape[0], jnp.asarray(sizes, jnp.int32))
  op = functools.partial(fq.quantize_tiles_with_transpose, num_tiles=num_tiles,
                         with_metrics=metrics)
  got = _jit(op, x, tile_ids, backend=_INTERP, row_align=row_align, **fused)
  want = _jit(op, values, tile_ids, backend="xla")
  _assert_same(got[:4], want[:4])
  if metrics:
    np.testing.assert_array_equal(np.asarray(got[4])[0], np.asarray(want[4])[0])
    np.testing.assert_allclose(np.asarray(got[4])[1], np.asarray(want[4])[1], rtol=1e-6)
  return got


@pytest.mark.parametrize("case", ["groups_row_align_16_scaled", "whole_tiles_gathered",
                                  "groups_unaligned_scaled_metrics"])
def test_gathered_rows_bit_identical_to_xla(case):
  """src_M / mult_M: the kernel reads x's rows by index (a token repeated, padding copies past
  x's rows as zeros, row counts off the launch), times a per-row fp32 weight, as XLA quantises
  the rows gathered first (`fq.gather_rows`); with per-group tiles aligned to 16 rows, with
  groups of whole 128-row tiles (the launch of tiles from row 0), and unaligned with the
  metrics. Checked to fail with the weight left out, and with the padding copies read as a
  real row."""
  rng = np.random.default_rng(4)
  num_src, row_align, metrics, mult = 40, 1, False, None
  if case == "groups_row_align_16_scaled":
    row_align, sizes = 16, [0, 16, 144, 0, 48]
  elif case == "whole_tiles_gathered":
    row_align, sizes = 128, [128, 0, 256, 128]
  else:
    sizes, metrics = [3, 70, 0, 150, 1], True
  num_rows = sum(sizes) + row_align * 2  # rows past the groups
  src = rng.integers(0, num_src, num_rows)
  src[rng.random(num_rows) < 0.2] = num_src + 3  # padding copies
  src = jnp.asarray(src, jnp.int32)
  if case != "whole_tiles_gathered":
    mult = jnp.asarray(rng.uniform(0.01, 2.0, num_rows), jnp.float32)
  x = _x(rng, (num_src, 200), jnp.bfloat16)
  _kernel_matches_xla_of(fq.gather_rows(x, src, mult), x, sizes, row_align, metrics, src_M=src,
                         mult_M=mult)
  # The gathered rows themselves: padding copies are zeros, the rest x's rows times the weight.
  rows = np.asarray(fq.gather_rows(x, src, mult), np.float32)
  pad = np.asarray(src) >= num_src
  assert np.all(rows[pad] == 0)
  want_rows = np.asarray(x, np.float32)[np.asarray(src)[~pad]]
  if mult is not None:
    want_rows = want_rows * np.asarray(mult)[~pad, None]
  np.testing.assert_array_equal(rows[~pad], want_rows)
  with pytest.raises(ValueError, match="mult_M scales gathered rows; pass src_M"):
    fq.quantize_tiles_with_transpose(x, None, 1, mult_M=jnp.ones((40,)), backend=_INTERP)


@pytest.mark.parametrize("case", ["swiglu_row_align_16", "swiglu_grad_unaligned_metrics",
                                  "swiglu_grad_whole_tiles"])
def test_swiglu_prologues_bit_identical_to_xla(case):
  """prologue="swiglu" (silu(gate) * up of h = [gate | up]) and "swiglu_grad" ([dgate | dup]
  from h and d_act): the kernel computes them from its tiles (swiglu_grad: both output tiles of
  a step from one read) as XLA does on the whole array, rounds them to h's dtype, and quantises
  them to the same codes and scales: groups padded to 16 rows, unaligned groups with the
  metrics, groups of whole 128-row tiles. F = 256 (two tiles each side); F = 96 (off the tile)
  takes XLA's values. Checked against the SwiGLU's autodiff gradient too, and to fail with
  dgate and dup swapped."""
  rng = np.random.default_rng(5)
  row_align, metrics = {"swiglu_row_align_16": (16, False),
                        "swiglu_grad_unaligned_metrics": (1, True),
                        "swiglu_grad_whole_tiles": (128, False)}[case]
  sizes = [0, 16, 144, 0, 48] if row_align == 16 else [3, 70, 0, 150, 1] if row_align == 1 \
      else [128, 0, 256]
  num_rows, f = sum(sizes) + 2 * row_align, 256
  h = jnp.asarray(rng.standard_normal((num_rows, 2 * f)) * 2, jnp.bfloat16)
  prologue = "swiglu" if case.startswith("swiglu_row") else "swiglu_grad"
  aux = (jnp.asarray(rng.standard_normal((num_rows, f)), jnp.bfloat16)
         if prologue == "swiglu_grad" else None)
  got = _kernel_matches_xla_of(fq.apply_prologue(h, prologue, aux), h, sizes, row_align,
                               metrics, prologue=prologue, aux=aux)
  assert got[0].shape == (num_rows, f if prologue == "swiglu" else 2 * f)
  if prologue == "swiglu_grad":  # the formula against autodiff of the forward
    gate, up = jnp.split(h.astype(jnp.float32), 2, axis=-1)
    _, vjp = jax.vjp(gmm_lib.swiglu_f32, gate, up)
    np.testing.assert_allclose(
        np.concatenate([np.asarray(g) for g in vjp(aux.astype(jnp.float32))], axis=-1),
        np.asarray(jnp.concatenate(gmm_lib.swiglu_grad_f32(gate, up, aux.astype(jnp.float32)),
                                   -1)),
        rtol=1e-5, atol=1e-6)
  # F off the tile (96): XLA computes the values, the kernel quantises them.
  narrow = jnp.concatenate([h[:, :96], h[:, f:f + 96]], axis=1)
  narrow_aux = None if aux is None else aux[:, :96]
  _kernel_matches_xla_of(fq.apply_prologue(narrow, prologue, narrow_aux), narrow, sizes, 1,
                         metrics, prologue=prologue, aux=narrow_aux)
  with pytest.raises(ValueError, match="prologue 'swiglu' reads x's rows in order"):
    fq.quantize_tiles_with_transpose(h, None, 1, prologue="swiglu",
                                     src_M=jnp.zeros((8,), jnp.int32), backend=_INTERP)


def test_backend_choice_and_errors():
  assert fq._resolve_backend("auto") == "xla"  # CPU
  with pytest.raises(ValueError, match="Unknown FP8 quantisation backend 'triton'"):
    fq.quantize_tiles(jnp.ones((4, 128)), backend="triton")
  with pytest.raises(ValueError, match="num_tiles must be ceil"):
    fq.quantize_tiles_with_transpose(jnp.ones((300, 128)), None, 2, backend=_INTERP)
  with pytest.raises(ValueError, match="row_align must be a power of two <= 128 that divides"):
    fq.quantize_rows_transposed(jnp.ones((300, 128)), None, 3, backend=_INTERP, row_align=16)
  # tile_ids None is row_tile_ids(M) in the reference too.
  x = jnp.asarray(np.random.default_rng(2).standard_normal((130, 40)), jnp.float32)
  ids, num_tiles = fq.row_tile_ids(130)
  _assert_same(_jit(fq.quantize_rows_transposed, x, None, num_tiles=2, backend="xla"),
               _jit(fq.quantize_rows_transposed, x, ids, num_tiles=num_tiles, backend="xla"))


@pytest.mark.parametrize("case", ["groups_bf16", "aligned_fp32"])
def test_metrics_from_the_kernel_match_the_xla_metrics(case):
  """with_metrics: the kernel's per-program partial sums give quant_metrics' underflow exactly
  (counts) and its cosine to fp32 rounding, tiles restarting per group with rows past them,
  or 128-row tiles with K off the tile; crafted underflow: one tile whose small values flush
  to code 0 under a large one."""
  rng = np.random.default_rng(3)
  if case == "groups_bf16":
    x = np.array(_x(rng, (256, 200), jnp.float32))
    tile_ids, num_tiles = fq.row_tile_ids(256, jnp.asarray([0, 16, 144, 0, 48], jnp.int32))
  else:
    x = np.array(_x(rng, (300, 333), jnp.float32))
    tile_ids, num_tiles = None, 3
  x[7, :128] = 1e-12
  x[7, 0] = 1.0  # 127 values under 2^-9 * 1.0 / 448: flushed to code 0
  x = jnp.asarray(x, jnp.bfloat16 if case == "groups_bf16" else jnp.float32)
  op = functools.partial(fq.quantize_tiles_with_transpose, num_tiles=num_tiles,
                         with_metrics=True)
  *codes, metrics = _jit(op, x, tile_ids, backend=_INTERP)
  *codes_xla, metrics_xla = _jit(op, x, tile_ids, backend="xla")
  _assert_same(codes, codes_xla)
  nonzero = np.count_nonzero(np.asarray(x, np.float32))
  flushed = np.count_nonzero((np.asarray(x, np.float32) != 0)
                             & (np.asarray(codes[0], np.float32) == 0))
  assert flushed >= 127
  np.testing.assert_array_equal(np.asarray(metrics)[0], np.float32(flushed / nonzero))
  np.testing.assert_array_equal(np.asarray(metrics_xla)[0], np.asarray(metrics)[0])
  np.testing.assert_allclose(np.asarray(metrics)[1], np.asarray(metrics_xla)[1], rtol=1e-6)
  assert 0.99 < float(metrics[1]) < 1.0


@pytest.mark.parametrize("case", ["experts_bf16", "linear_fp32_pow2"])
def test_blocks_kernel_bit_identical_to_xla(case):
  """The one-pass weight quantiser: codes, transposed codes and block scales equal to
  quantize_blocks' (and its codes swapped), for [G, K, N] expert weights in bf16 and a [K, N]
  weight in fp32 with pow2 scales; an all-zero block gets scale 1."""
  rng = np.random.default_rng(4)
  shape, dtype, pow2 = {"experts_bf16": ((3, 256, 384), jnp.bfloat16, False),
                        "linear_fp32_pow2": ((384, 256), jnp.float32, True)}[case]
  w = np.array(rng.standard_normal(shape) * np.exp2(rng.integers(-20, 10, shape[:-1] + (1,))))
  w[..., :128, :128] = 0.0
  w = jnp.asarray(w, dtype)
  op = functools.partial(fq.quantize_blocks_with_transpose, pow2_scales=pow2)
  got = _jit(op, w, backend=_INTERP)
  _assert_same(got, _jit(op, w, backend="xla"))
  q, q_t, scale = got
  np.testing.assert_array_equal(_bits(q_t), _bits(jnp.swapaxes(q, -1, -2)))
  assert np.all(np.asarray(scale)[..., 0, 0] == 1.0)
  with pytest.raises(ValueError, match="multiples of 128"):
    fqt.quantize_blocks_transposed(jnp.ones((100, 128)), interpret=True)


@pytest.mark.parametrize("want_cols", [False, True])
def test_looped_launch_matches_unrolled(want_cols):
  """num_stages > 1: a program's T tiles along K run as a pipelined loop, not unrolled; codes,
  scales and metric partials are the same bits (K = 512: 4 tiles, 2 per program; groups
  restarting per expert and rows past them for the column tiles)."""
  rng = np.random.default_rng(4)
  x = _x(rng, (256, 512), jnp.bfloat16)
  tile_ids, num_tiles = fq.row_tile_ids(256, jnp.asarray([0, 16, 144, 0, 48], jnp.int32))
  bounds = fq._tile_bounds(tile_ids, num_tiles) if want_cols else (None, None)
  outs = {}
  for stages in (1, 2):
    outs[stages] = jax.jit(lambda x, b, stages=stages: fqt.quantize(
        x, *b, want_cols=want_cols, num_tiles=num_tiles if want_cols else None,
        tiles_per_prog=2, rows_per_prog=None if want_cols else 32, num_warps=4,
        num_stages=stages, metrics=True, interpret=True))(x, bounds)
  _assert_same(outs[2], outs[1])
  assert outs[2][-2].shape[-1] == 2  # two programs along K: the loop ran twice in each


def test_mismatch_report_sides_with_numpy(capsys):
  """The GPU check's report on codes that differ from XLA's (`check_gathered`): codes of XLA's
  two layouts nudged by one step are put on XLA's side by NumPy's rule, not the nudged one."""
  x = jax.random.normal(jax.random.key(0), (64, 256), jnp.bfloat16)
  src_M = jnp.asarray(np.random.default_rng(0).integers(0, 64, 256), jnp.int32)
  mult_M = jax.random.uniform(jax.random.key(1), (256,), jnp.float32, 0.1, 1.0)
  want = [np.asarray(a) for a in fq.quantize_tiles_with_transpose(
      fq.gather_rows(x, src_M, mult_M), None, 2, backend="xla")]
  got = [a.copy() for a in want]
  rows, cols = got[0].view(np.uint8), got[2].view(np.uint8)
  rows[9, 17] ^= 1
  cols[5, 130] ^= 1
  cols[7, 3] ^= 2
  fqt._explain_mismatch(x, src_M, mult_M, got, want)
  out = capsys.readouterr().out
  assert "(row codes, row scales, column codes, column scales): [1, 0, 2, 0]" in out
  assert "2 column codes differ; NumPy agrees with the kernel at 0 and with XLA at 2" in out
  assert ("1 row codes in 1 rows and 0 scales differ; on those rows NumPy agrees with the kernel "
          "at 255 and with XLA at 256 of 256 codes") in out
