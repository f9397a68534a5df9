"""One-pass FP8 (E4M3) quantisation kernels on GPU, through Pallas's Triton lowering.

`kernels.fp8_quant`'s XLA functions read x twice (once for the tile amax, once to scale it); these
kernels read each 128-row x 128-column block of x once and write, from registers, whichever of
the two layouts is asked for:
  - rows: 1x128 tiles along K (the forward's and dgrad's operand): codes q_MK, scales [Kt, M];
  - columns: 1x128 tiles along M, transposed (the wgrad's operand): codes q_KM, scales [C, K].
The column tiles follow `fp8_quant.row_tile_ids`: 128-row tiles from row 0 (`aligned`), or tiles
that restart at every group's first row, given to the kernel as each tile's first row and row
count (at most 128). Per-group tiles store their transposed codes at the tile's first row along
the codes' contiguous axis: at an arbitrary row those are single-byte stores. With `row_align`
(every tile's first row and row count a multiple of it, as `dispatch.permute`'s `group_align`
makes them) Triton is told so and stores 16 bytes at a time: both layouts of [131072, 2048]
bf16 over 256 experts at 0.64 of copy on an H200, against 0.42 (BENCHMARKS.md, session 7).
Scales come out with the tile axis leading, the layout the FP8 GEMM kernels read;
`kernels.fp8_quant` transposes them back to its public layout (XLA cancels the two transposes
when a GEMM consumes them).

The arithmetic is fp8_quant's, op for op, so codes and scales are bit-identical: amax of |x| in
fp32, scale = amax * fp32(1/448) (1 for an all-zero tile; with pow2 the next power of two, taken
from the bits), q = clip(x * (1 / scale), +-448) rounded to nearest even. Triton lowers an fp32
division to the approximate `div.full.f32`, so on the GPU the reciprocal (one per tile) is PTX
`div.rn.f32` (IEEE, as XLA divides) through inline assembly; interpret mode divides plainly.
On an H200 every code and scale equals XLA's, and NumPy's computation of the rule, except 20 of
2,048,000 transposed codes of a bf16 input where XLA misrounds E4M3 subnormal near-ties (the
kernel agrees with NumPy there; BENCHMARKS.md, session 5).

Shape key: M rows, K columns (the axis of the 1x128 row tiles), Kt = ceil(K / 128), C column
tiles along M, R rows per program.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

# fp8_quant imports this module only inside its functions, so no import cycle.
from kernels.fp8_quant import E4M3
from kernels.fp8_quant import E4M3_INV_MAX
from kernels.fp8_quant import E4M3_MAX
from kernels.fp8_quant import TILE
from kernels.fp8_quant import _check_row_align

# Launches, the best of experiments/bench_fp8.py's on an H200 (2026-11-30, BENCHMARKS.md, session
# 5). Rows alone, R rows x T 128-column tiles per program: 32 x 4 with 4 warps (every launch tried
# ran at 0.96-1.11 of the copy bandwidth). With column tiles (R = 128): one tile per program, 8
# warps, codes transposed in E4M3: 0.82 of copy for both layouts at [16384, 2048], against 0.60
# with two tiles per program and the fp32 values transposed.
ROWS_LAUNCH = {"rows_per_prog": 32, "tiles_per_prog": 4, "num_warps": 4}
COLS_LAUNCH = {"rows_per_prog": TILE, "tiles_per_prog": 1, "num_warps": 8,
               "transpose_codes": True}


def _recip_rn(scale: jax.Array, interpret: bool) -> jax.Array:
  """1 / scale in fp32, correctly rounded (IEEE), as XLA divides."""
  if interpret:
    return 1.0 / scale
  (out,) = pltriton.elementwise_inline_asm(
      "div.rn.f32 $0, $1, $2;", args=[jnp.ones_like(scale), scale], constraints="=r,r,r",
      pack=1, result_shape_dtypes=[jax.ShapeDtypeStruct(scale.shape, jnp.float32)])
  return out


def _scale_of(amax: jax.Array, pow2: bool) -> jax.Array:
  """fp8_quant._scale_of for amax >= 0, in ops the Triton lowering has.

  The power of two >= s is read off its bits: s itself where its mantissa is zero, else the next
  exponent up (exact for normal s, that is amax >= 448 * 2^-126; below that the reciprocal
  overflows on every backend and no tile of real data gets there).
  """
  scale = amax * E4M3_INV_MAX
  if pow2:
    bits = jax.lax.bitcast_convert_type(scale, jnp.int32)
    exp_bits = bits & np.int32(0x7F800000)
    up = jnp.where((bits & np.int32(0x007FFFFF)) == 0, exp_bits, exp_bits + np.int32(1 << 23))
    scale = jax.lax.bitcast_convert_type(up, jnp.float32)
  return jnp.where(amax > 0, scale, np.float32(1.0))


def _to_e4m3(x32: jax.Array) -> jax.Array:
  return jnp.minimum(jnp.maximum(x32, -E4M3_MAX), E4M3_MAX).astype(E4M3)


def _kernel(starts_ref, counts_ref, x_ref, *out_refs, num_rows, k_dim, rows_per_prog,
            tiles_per_prog, want_rows, want_cols, aligned, row_align, pow2, interpret,
            transpose_codes):
  """Program (c, j): rows [start_c, start_c + count_c), tiles j*T .. j*T + T - 1 along K.

  Masks only where a shape needs them (partial row blocks, groups, K off the tile): Triton
  narrows masked stores along their contiguous axis to single bytes, unless it can prove the
  mask constant over aligned runs (row_align).
  """
  r, t_per = rows_per_prog, tiles_per_prog
  c, j = pl.program_id(0), pl.program_id(1)
  if aligned:
    start = pl.multiple_of(c * r, r)
    count = jnp.minimum(num_rows - start, r)
  else:
    start, count = starts_ref[c], counts_ref[c]
    if row_align > 1:
      # Aligned stores, and masks constant over row_align rows: Triton reads the alignment off
      # the product (a hint on a loaded value alone may be dropped), and the multiple_of hint.
      start, count = (pl.multiple_of(jax.lax.div(v, np.int32(row_align)) * np.int32(row_align),
                                     row_align) for v in (start, count))
  row_mask = not aligned or num_rows % r != 0
  col_mask = k_dim % TILE != 0
  refs = list(out_refs)
  q_ref, srow_ref = (refs.pop(0), refs.pop(0)) if want_rows else (None, None)
  qt_ref, scol_ref = (refs.pop(0), refs.pop(0)) if want_cols else (None, None)
  row_ok_R = jax.lax.broadcasted_iota(jnp.int32, (r,), 0) < count
  for t in range(t_per):
    kt = j * t_per + t
    col0 = pl.multiple_of(kt * TILE, TILE)
    col_ok_T = col0 + jax.lax.broadcasted_iota(jnp.int32, (TILE,), 0) < k_dim
    if row_mask and col_mask:
      mask_RT = row_ok_R[:, None] & col_ok_T[None, :]
    elif row_mask or col_mask:
      mask_RT = jnp.broadcast_to(row_ok_R[:, None] if row_mask else col_ok_T[None, :],
                                 (r, TILE))
    else:
      mask_RT = None
    x_tile = x_ref.at[pl.ds(start, r), pl.ds(col0, TILE)]
    x_RT = (x_tile[...] if mask_RT is None
            else pltriton.load(x_tile, mask=mask_RT, other=0)).astype(jnp.float32)
    abs_RT = jnp.abs(x_RT)
    if want_rows:
      scale_R = _scale_of(jnp.max(abs_RT, axis=1), pow2)
      q_RT = _to_e4m3(x_RT * _recip_rn(scale_R, interpret)[:, None])
      pltriton.store(q_ref.at[pl.ds(start, r), pl.ds(col0, TILE)], q_RT, mask=mask_RT)
      pltriton.store(srow_ref.at[kt, pl.ds(start, r)], scale_R,
                     mask=row_ok_R if row_mask else None)
    if want_cols:
      scale_T = _scale_of(jnp.max(abs_RT, axis=0), pow2)
      if transpose_codes:  # transpose the E4M3 codes (a quarter of the bytes of fp32)
        q_TR = _to_e4m3(x_RT * _recip_rn(scale_T, interpret)[None, :]).T
      else:
        q_TR = _to_e4m3(x_RT.T * _recip_rn(scale_T, interpret)[:, None])
      # The mask built along [T, R] rather than transposed, so that Triton sees it constant
      # over row_align rows of the codes' contiguous axis.
      mask_TR = None
      if row_mask:
        mask_TR = jnp.broadcast_to(
            (jax.lax.broadcasted_iota(jnp.int32, (1, r), 1) < count), (TILE, r))
      if col_mask:
        col_TR = jnp.broadcast_to(col_ok_T[:, None], (TILE, r))
        mask_TR = col_TR if mask_TR is None else mask_TR & col_TR
      pltriton.store(qt_ref.at[pl.ds(col0, TILE), pl.ds(start, r)], q_TR, mask=mask_TR)
      pltriton.store(scol_ref.at[c, pl.ds(col0, TILE)], scale_T,
                     mask=col_ok_T if col_mask else None)


def _tiles_per_prog(kt: int, want: int) -> int:
  t = want
  while kt % t:
    t //= 2
  return t


@functools.partial(jax.jit, static_argnames=(
    "want_rows", "want_cols", "num_tiles", "row_align", "pow2", "interpret", "rows_per_prog",
    "tiles_per_prog", "num_warps", "transpose_codes"))
def quantize(x_MK: jax.Array, starts_C: jax.Array | None = None,
             counts_C: jax.Array | None = None, *, want_rows: bool = True,
             want_cols: bool = False, num_tiles: int | None = None, row_align: int = 1,
             pow2: bool = False, interpret: bool = False, rows_per_prog: int | None = None,
             tiles_per_prog: int | None = None, num_warps: int | None = None,
             transpose_codes: bool | None = None):
  """One read of x [M, K]; returns the asked layouts, scales tile-axis first.

  Args:
    x_MK: bf16, fp16 or fp32.
    starts_C, counts_C: the column tiles' first rows and row counts (<= 128 each); None for
      128-row tiles from row 0.
    want_rows / want_cols: return (q_MK [M, K], scale_KtM [Kt, M]) / (q_KM [K, M],
      scale_CK [C, K]), in that order.
    num_tiles: C (static) when starts_C is given.
    row_align: a promise that every starts_C and counts_C is a multiple of it (a power of two
      <= 128); a broken promise gives wrong codes and scales (starts and counts are rounded
      down to it).
    rows_per_prog, tiles_per_prog, num_warps: the launch (R rows and T 128-column tiles per
      program); R is 128 whenever column tiles are asked for. None: `ROWS_LAUNCH` or
      `COLS_LAUNCH`.
    transpose_codes: transpose the column tiles' codes rather than their fp32 values.
  """
  num_rows, k_dim = x_MK.shape
  _check_row_align("quantize", num_rows, row_align)
  kt = pl.cdiv(k_dim, TILE)
  aligned = starts_C is None
  launch = COLS_LAUNCH if want_cols else ROWS_LAUNCH
  tiles_per_prog = tiles_per_prog or launch["tiles_per_prog"]
  num_warps = num_warps or launch["num_warps"]
  if transpose_codes is None:
    transpose_codes = COLS_LAUNCH["transpose_codes"]
  if want_cols:
    r = TILE
    num_c = pl.cdiv(num_rows, TILE) if aligned else num_tiles
  else:
    r = rows_per_prog or launch["rows_per_prog"]
    num_c = pl.cdiv(num_rows, r)
  if aligned:
    starts_C = counts_C = jnp.zeros((1,), jnp.int32)
  t_per = _tiles_per_prog(kt, tiles_per_prog)
  out_shape = []
  if want_rows:
    out_shape += [jax.ShapeDtypeStruct((num_rows, k_dim), E4M3),
                  jax.ShapeDtypeStruct((kt, num_rows), jnp.float32)]
  if want_cols:
    out_shape += [jax.ShapeDtypeStruct((k_dim, num_rows), E4M3),
                  jax.ShapeDtypeStruct((num_c, k_dim), jnp.float32)]
  kernel = functools.partial(
      _kernel, num_rows=num_rows, k_dim=k_dim, rows_per_prog=r, tiles_per_prog=t_per,
      want_rows=want_rows, want_cols=want_cols, aligned=aligned, row_align=row_align, pow2=pow2,
      interpret=interpret, transpose_codes=transpose_codes)
  return pl.pallas_call(
      kernel,
      out_shape=tuple(out_shape),
      grid=(num_c, kt // t_per),
      compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=1),
      interpret=interpret,
  )(starts_C.astype(jnp.int32), counts_C.astype(jnp.int32), x_MK)
