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
Groups of whole 128-row tiles are tiles from row 0: `fp8_quant` sends them through the aligned
launch, 0.76 of copy (session 12).
Scales come out with the tile axis leading, the layout the FP8 GEMM kernels read;
`kernels.fp8_quant` transposes them back to its public layout (XLA cancels the two transposes
when a GEMM consumes them).

With `metrics` the row codes' safeguard metrics come out too, as per-program partial sums
(x.x, dq.dq, x.dq, nonzero and flushed counts; `metrics_of_partials`), so that the backward pass
need not read the gradient again for them (`fp8_quant._METRICS_IN_KERNEL_ON_GPU`, off: on an
H200 the extra reductions cost more than XLA's second read; the GPU check is
`python -m kernels.fp8_quant_triton`).

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
from kernels.fp8_quant import metrics_from_sums
from kernels.grouped_matmul import swiglu_f32
from kernels.grouped_matmul import swiglu_grad_f32

# Launches, the best of experiments/bench_fp8.py's on an H200 (2026-11-30, BENCHMARKS.md, session
# 5). Rows alone, R rows x T 128-column tiles per program: 32 x 4 with 4 warps (every launch tried
# ran at 0.96-1.11 of the copy bandwidth). With column tiles (R = 128): one tile per program, 8
# warps, codes transposed in E4M3: 0.82 of copy for both layouts at [16384, 2048], against 0.60
# with two tiles per program and the fp32 values transposed.
ROWS_LAUNCH = {"rows_per_prog": 32, "tiles_per_prog": 4, "num_warps": 4}
COLS_LAUNCH = {"rows_per_prog": TILE, "tiles_per_prog": 1, "num_warps": 8,
               "transpose_codes": True}
# Column tiles from row 0 (no starts: nothing masked along M), session 12: 4 warps, 0.78 of copy
# for both layouts at [131072, 2048] against 0.73 with 8 (equal at [16384, 2048]). Per-group
# tiles keep 8: with 4, unpadded groups fell from 0.43 to 0.17 of copy.
COLS_ALIGNED_LAUNCH = {**COLS_LAUNCH, "num_warps": 4}
# With a prologue (the experts' SwiGLU or its gradient computed from the tiles it reads), two or
# three input tiles and two outputs a program: 8 warps. On an H200 at Ling-mini (session 13,
# [425728, 1024] bf16, both layouts): "swiglu" 0.51 ms at 8 warps, 0.63 at 4, 0.75 at 16 (XLA's
# SwiGLU then this kernel: 0.68); "swiglu_grad" 1.27 at 8, 3.81 at 4, 1.29 at 16 (XLA then
# this kernel: 1.23).
PROLOGUE_WARPS = 8
# Rows read by index (`src_M`: the experts' token copies and weighted output-gradient rows),
# both layouts, column tiles from row 0: 4 warps, as the aligned launch. On an H200 at
# Ling-mini (session 14, [425728, 2048] bf16, `python -m kernels.fp8_quant_triton --gathered`,
# two calls): the copies 1.29 ms at 4 warps, 1.31-1.32 at 8, 2.15-2.17 at 16; the weighted
# rows 1.49-1.50 at 4, 2.07-2.08 at 8, 2.22-2.25 at 16.
GATHER_WARPS = COLS_ALIGNED_LAUNCH["num_warps"]
# Launches may also set "num_stages" (default 1): above 1 a program's tiles run as a loop that
# Triton pipelines. None of the launches set it: on an H200 (session 12) the pipelined rows
# launches ran as the unrolled one (1.13 of copy) and the column ones slower (0.48 against 0.64).


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


def _kernel(starts_ref, counts_ref, src_ref, mult_ref, x_ref, aux_ref, *out_refs, num_rows,
            k_dim, rows_per_prog, tiles_per_prog, want_rows, want_cols, aligned, row_align, pow2,
            interpret, transpose_codes, metrics, loop, gather, scaled, prologue):
  """Program (c, j): rows [start_c, start_c + count_c), tiles j*T .. j*T + T - 1 along K.

  Masks only where a shape needs them (partial row blocks, groups, K off the tile): Triton
  narrows masked stores along their contiguous axis to single bytes, unless it can prove the
  mask constant over aligned runs (row_align). With `metrics`, the program also writes its
  partial sums of the row codes' safeguard metrics (`metrics_of_partials`). With `loop` the T
  tiles are a loop (`fori_loop`) rather than unrolled, which Triton software-pipelines over the
  launch's num_stages: the next tile's load is in flight while this one is quantised and stored.
  With `gather`, row m is x's row src[m] (zeros where src[m] is past x's rows), read by index;
  with `scaled`, times mult[m] in fp32. With a `prologue` (`quantize`'s), the values quantised
  are computed from x (and aux) in fp32 and rounded to x's dtype first.
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
  msum_ref, mcount_ref = (refs.pop(0), refs.pop(0)) if metrics else (None, None)
  row_ok_R = jax.lax.broadcasted_iota(jnp.int32, (r,), 0) < count
  if gather:
    # Each row's source; rows past x (padding copies) and, where masked, past the tile read 0.
    num_src = x_ref.shape[0]
    src_R = (src_ref[pl.ds(start, r)] if not row_mask else
             pltriton.load(src_ref.at[pl.ds(start, r)], mask=row_ok_R, other=num_src))
    src_ok_R = (src_R >= 0) & (src_R < num_src)
    src_R = jnp.where(src_ok_R, src_R, 0)
  if scaled:
    mult_R = (mult_ref[pl.ds(start, r)] if not row_mask else
              pltriton.load(mult_ref.at[pl.ds(start, r)], mask=row_ok_R, other=0.0))
  # Partial sums over this program's elements: x.x, dq.dq, x.dq; nonzero x, flushed to code 0.
  # Masked elements load as 0 and add nothing.
  total = lambda v: jnp.sum(jnp.sum(v, axis=1))

  def tile_masks(kt):
    """Output tile kt's first column, its columns' mask [T] and the loads' mask [R, T]."""
    col0 = pl.multiple_of(kt * TILE, TILE)
    col_ok_T = col0 + jax.lax.broadcasted_iota(jnp.int32, (TILE,), 0) < k_dim
    if row_mask and col_mask:
      mask_RT = row_ok_R[:, None] & col_ok_T[None, :]
    elif row_mask or col_mask:
      mask_RT = jnp.broadcast_to(row_ok_R[:, None] if row_mask else col_ok_T[None, :],
                                 (r, TILE))
    else:
      mask_RT = None
    return col0, col_ok_T, mask_RT

  def load(ref, col, mask_RT):
    """This program's rows of ref, columns [col, col + 128), in fp32."""
    if gather:
      # Array indices on both axes (interpret mode takes no slice beside an array index).
      col_RT = col + jax.lax.broadcasted_iota(jnp.int32, (r, TILE), 1)
      load_RT = jnp.broadcast_to(src_ok_R[:, None], (r, TILE))
      x_RT = pltriton.load(
          ref.at[jnp.broadcast_to(src_R[:, None], (r, TILE)), col_RT],
          mask=load_RT if mask_RT is None else load_RT & mask_RT, other=0)
    else:
      x_tile = ref.at[pl.ds(start, r), pl.ds(col, TILE)]
      x_RT = x_tile[...] if mask_RT is None else pltriton.load(x_tile, mask=mask_RT, other=0)
    return x_RT.astype(jnp.float32)

  def in_dtype(v_RT):  # a prologue's result rounded as the separate op would store it
    return v_RT.astype(x_ref.dtype).astype(jnp.float32)

  def emit(kt, x_RT, sums, counts):
    """Output tile kt of this program's rows: its codes, scales and metric partials."""
    col0, col_ok_T, mask_RT = tile_masks(kt)
    abs_RT = jnp.abs(x_RT)
    if want_rows:
      scale_R = _scale_of(jnp.max(abs_RT, axis=1), pow2)
      q_RT = _to_e4m3(x_RT * _recip_rn(scale_R, interpret)[:, None])
      pltriton.store(q_ref.at[pl.ds(start, r), pl.ds(col0, TILE)], q_RT, mask=mask_RT)
      pltriton.store(srow_ref.at[kt, pl.ds(start, r)], scale_R,
                     mask=row_ok_R if row_mask else None)
      if metrics:
        dq_RT = q_RT.astype(jnp.float32) * scale_R[:, None]  # fp8_quant.dequantize_tiles
        nonzero_RT = x_RT != 0
        sums = [sums[0] + total(x_RT * x_RT), sums[1] + total(dq_RT * dq_RT),
                sums[2] + total(x_RT * dq_RT)]
        counts = [counts[0] + total(nonzero_RT.astype(jnp.int32)),
                  counts[1] + total((nonzero_RT & (dq_RT == 0)).astype(jnp.int32))]
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
    return sums, counts

  def tile(kt, sums, counts):
    """Step kt of the program's loop: output tile kt, or with "swiglu_grad" tiles kt and
    kt + F / 128 (the gate's and the up's gradients, from one read of their inputs)."""
    col0, _, mask_RT = tile_masks(kt)
    if prologue is None:
      x_RT = load(x_ref, col0, mask_RT)
      return emit(kt, x_RT * mult_R[:, None] if scaled else x_RT, sums, counts)
    # x is h = [gate | up] with k_dim / 2 (swiglu_grad) or k_dim (swiglu) columns each.
    width = k_dim // 2 if prologue == "swiglu_grad" else k_dim
    gate_RT, up_RT = load(x_ref, col0, mask_RT), load(x_ref, width + col0, mask_RT)
    if prologue == "swiglu":
      return emit(kt, in_dtype(swiglu_f32(gate_RT, up_RT)), sums, counts)
    dgate_RT, dup_RT = swiglu_grad_f32(gate_RT, up_RT, load(aux_ref, col0, mask_RT))
    sums, counts = emit(kt, in_dtype(dgate_RT), sums, counts)
    return emit(kt + width // TILE, in_dtype(dup_RT), sums, counts)

  sums = [jnp.float32(0.0)] * 3
  counts = [jnp.int32(0)] * 2
  if loop and t_per > 1:
    sums, counts = jax.lax.fori_loop(
        0, t_per, lambda t, carry: tile(j * t_per + t, *carry), (sums, counts))
  else:
    for t in range(t_per):
      sums, counts = tile(j * t_per + t, sums, counts)
  if metrics:
    for i, v in enumerate(sums):
      msum_ref[i, c, j] = v
    for i, v in enumerate(counts):
      mcount_ref[i, c, j] = v


def metrics_of_partials(sums_3: jax.Array, counts_2: jax.Array) -> jax.Array:
  """[underflow, cosine] from the kernel's per-program partial sums (`quantize(metrics=True)`),
  as `fp8_quant.quant_metrics` defines them (its sums in another order)."""
  return metrics_from_sums(*(jnp.sum(v) for v in sums_3), *(jnp.sum(v) for v in counts_2))


def _tiles_per_prog(kt: int, want: int) -> int:
  t = want
  while kt % t:
    t //= 2
  return t


@functools.partial(jax.jit, static_argnames=(
    "want_rows", "want_cols", "num_tiles", "row_align", "pow2", "interpret", "rows_per_prog",
    "tiles_per_prog", "num_warps", "transpose_codes", "metrics", "num_stages", "prologue"))
def quantize(x_MK: jax.Array, starts_C: jax.Array | None = None,
             counts_C: jax.Array | None = None, *, src_M: jax.Array | None = None,
             mult_M: jax.Array | None = None, prologue: str | None = None,
             aux: jax.Array | None = None, want_rows: bool = True,
             want_cols: bool = False, num_tiles: int | None = None, row_align: int = 1,
             pow2: bool = False, interpret: bool = False, rows_per_prog: int | None = None,
             tiles_per_prog: int | None = None, num_warps: int | None = None,
             transpose_codes: bool | None = None, metrics: bool = False,
             num_stages: int | None = None):
  """One read of x [M, K]; returns the asked layouts, scales tile-axis first.

  Args:
    x_MK: bf16, fp16 or fp32.
    src_M: with it, the rows quantised are x's rows src_M (int32, one per output row; rows at
      or past x's, such as a permutation's padding copies, read as zeros), read by index: the
      permutation's copy fused into the quantisation. M is then src_M's length.
    mult_M: fp32 per output row, multiplied into it before quantisation (the router weights of
      an un-permutation's backward); needs src_M.
    prologue: what is quantised, computed from x in the kernel and rounded to x's dtype
      (`fp8_quant.apply_prologue`): "swiglu", silu(gate) * up of x = [gate | up] [M, 2F]
      (K = F); "swiglu_grad", the gradient [dgate | dup] [M, 2F] of that from x and
      aux = d(silu(gate) * up) [M, F] (K = 2F). F a multiple of 128; not with src_M.
    starts_C, counts_C: the column tiles' first rows and row counts (<= 128 each); None for
      128-row tiles from row 0.
    want_rows / want_cols: return (q_MK [M, K], scale_KtM [Kt, M]) / (q_KM [K, M],
      scale_CK [C, K]), in that order.
    num_tiles: C (static) when starts_C is given.
    row_align: a promise that every starts_C and counts_C is a multiple of it (a power of two
      <= 128); a broken promise gives wrong codes and scales (starts and counts are rounded
      down to it).
    rows_per_prog, tiles_per_prog, num_warps: the launch (R rows and T 128-column tiles per
      program); R is 128 whenever column tiles are asked for. None: `ROWS_LAUNCH`, or
      `COLS_ALIGNED_LAUNCH` / `COLS_LAUNCH` for column tiles from row 0 / per group.
    transpose_codes: transpose the column tiles' codes rather than their fp32 values.
    num_stages: above 1, a program's T tiles run as a loop that Triton pipelines this deep (the
      next tile's load issued before this one's stores); 1, unrolled. None: the launch's.
    metrics: also return the row codes' metric partials, fp32 [3, P, J] (x.x, dq.dq, x.dq) and
      int32 [2, P, J] (nonzero x, nonzero x flushed to 0) over the grid's programs, last;
      `metrics_of_partials` turns them into fp8_quant.quant_metrics' [underflow, cosine].
      Needs want_rows.
  """
  num_rows, k_dim = x_MK.shape
  gather, scaled = src_M is not None, mult_M is not None
  if scaled and not gather:
    raise ValueError("quantize: mult_M scales gathered rows; pass src_M too.")
  if gather:
    num_rows = src_M.shape[0]
    if src_M.ndim != 1 or (scaled and mult_M.shape != src_M.shape):
      raise ValueError(f"quantize: src_M must be [M] and mult_M the same shape, got src_M "
                       f"{src_M.shape} and mult_M {None if mult_M is None else mult_M.shape}.")
  if prologue is not None:
    half = k_dim // 2
    if prologue not in ("swiglu", "swiglu_grad") or gather or k_dim % (2 * TILE) or (
        (aux is None) != (prologue == "swiglu")) or (
            aux is not None and aux.shape != (num_rows, half)):
      raise ValueError(
          f"quantize: prologue {prologue!r} takes x = [gate | up] [M, 2F] with F a multiple of "
          f"128 (got {x_MK.shape}), aux [M, F] for 'swiglu_grad' only (got "
          f"{None if aux is None else aux.shape}), and no src_M.")
    k_dim = half if prologue == "swiglu" else k_dim
  _check_row_align("quantize", num_rows, row_align)
  if metrics and not want_rows:
    raise ValueError("quantize: metrics are of the row codes; pass want_rows=True.")
  kt = pl.cdiv(k_dim, TILE)
  aligned = starts_C is None
  launch = (COLS_ALIGNED_LAUNCH if aligned else COLS_LAUNCH) if want_cols else ROWS_LAUNCH
  tiles_per_prog = tiles_per_prog or launch["tiles_per_prog"]
  num_warps = num_warps or (PROLOGUE_WARPS if prologue else
                            GATHER_WARPS if gather and want_cols and aligned else
                            launch["num_warps"])
  if transpose_codes is None:
    transpose_codes = COLS_LAUNCH["transpose_codes"]
  num_stages = num_stages or launch.get("num_stages", 1)
  if want_cols:
    r = TILE
    num_c = pl.cdiv(num_rows, TILE) if aligned else num_tiles
  else:
    r = rows_per_prog or launch["rows_per_prog"]
    num_c = pl.cdiv(num_rows, r)
  if aligned:
    starts_C = counts_C = jnp.zeros((1,), jnp.int32)
  steps = kt // 2 if prologue == "swiglu_grad" else kt  # swiglu_grad: two tiles a step
  t_per = _tiles_per_prog(steps, tiles_per_prog)
  out_shape = []
  if want_rows:
    out_shape += [jax.ShapeDtypeStruct((num_rows, k_dim), E4M3),
                  jax.ShapeDtypeStruct((kt, num_rows), jnp.float32)]
  if want_cols:
    out_shape += [jax.ShapeDtypeStruct((k_dim, num_rows), E4M3),
                  jax.ShapeDtypeStruct((num_c, k_dim), jnp.float32)]
  grid = (num_c, steps // t_per)
  if metrics:
    out_shape += [jax.ShapeDtypeStruct((3, *grid), jnp.float32),
                  jax.ShapeDtypeStruct((2, *grid), jnp.int32)]
  kernel = functools.partial(
      _kernel, num_rows=num_rows, k_dim=k_dim, rows_per_prog=r, tiles_per_prog=t_per,
      want_rows=want_rows, want_cols=want_cols, aligned=aligned, row_align=row_align, pow2=pow2,
      interpret=interpret, transpose_codes=transpose_codes, metrics=metrics,
      loop=num_stages > 1, gather=gather, scaled=scaled, prologue=prologue)
  unused = jnp.zeros((1,), jnp.int32)
  return pl.pallas_call(
      kernel,
      out_shape=tuple(out_shape),
      grid=grid,
      compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages),
      interpret=interpret,
  )(starts_C.astype(jnp.int32), counts_C.astype(jnp.int32),
    src_M.astype(jnp.int32) if gather else unused,
    mult_M.astype(jnp.float32) if scaled else unused.astype(jnp.float32), x_MK,
    unused.astype(x_MK.dtype) if aux is None else aux.astype(x_MK.dtype))


def _blocks_kernel(w_ref, q_ref, qt_ref, s_ref, *, pow2, interpret):
  """Program (g, a, b): the 128x128 block (a, b) of w[g] [K, N]: its scale, codes and the
  codes transposed into [G, N, K]."""
  g, a, b = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  rows, cols = pl.ds(pl.multiple_of(a * TILE, TILE), TILE), pl.ds(pl.multiple_of(b * TILE, TILE),
                                                                   TILE)
  w_RC = w_ref[g, rows, cols].astype(jnp.float32)
  scale = _scale_of(jnp.max(jnp.max(jnp.abs(w_RC), axis=1)), pow2)
  # The reciprocal's inline assembly takes a tensor, not a scalar: one copy per row.
  recip_R = _recip_rn(jnp.broadcast_to(scale, (TILE,)), interpret)
  q_RC = _to_e4m3(w_RC * recip_R[:, None])
  q_ref[g, rows, cols] = q_RC
  qt_ref[g, cols, rows] = q_RC.T
  s_ref[g, a, b] = scale


def blocks_take(w: jax.Array) -> bool:
  """Weights `quantize_blocks_transposed` covers: [K, N] or [G, K, N], both multiples of 128."""
  return (w.ndim in (2, 3) and w.shape[-1] % TILE == 0 and w.shape[-2] % TILE == 0
          and w.size > 0 and jnp.dtype(w.dtype) in (jnp.dtype(jnp.bfloat16),
                                                    jnp.dtype(jnp.float32)))


@functools.partial(jax.jit, static_argnames=("pow2", "interpret"))
def quantize_blocks_transposed(w: jax.Array, *, pow2: bool = False, interpret: bool = False):
  """One read of a weight w [(G,) K, N]: its 128x128-block codes [(G,) K, N], the same codes
  transposed [(G,) N, K] and the block scales [(G,) Kt, Nt], as `fp8_quant.quantize_blocks` and
  a swap of its codes' last two axes give them (`blocks_take` says which weights)."""
  if not blocks_take(w):
    raise ValueError(f"quantize_blocks_transposed: w {w.shape} {w.dtype} must be [K, N] or "
                     "[G, K, N] in bf16 or fp32 with K and N multiples of 128; use "
                     "fp8_quant.quantize_blocks.")
  w3 = w if w.ndim == 3 else w[None]
  groups, k_dim, n_dim = w3.shape
  kt, nt = k_dim // TILE, n_dim // TILE
  q, qt, scale = pl.pallas_call(
      functools.partial(_blocks_kernel, pow2=pow2, interpret=interpret),
      out_shape=(jax.ShapeDtypeStruct((groups, k_dim, n_dim), E4M3),
                 jax.ShapeDtypeStruct((groups, n_dim, k_dim), E4M3),
                 jax.ShapeDtypeStruct((groups, kt, nt), jnp.float32)),
      grid=(groups, kt, nt),
      compiler_params=pltriton.CompilerParams(num_warps=8, num_stages=1),
      interpret=interpret,
  )(w3)
  return (q, qt, scale) if w.ndim == 3 else (q[0], qt[0], scale[0])


def self_check(num_rows: int = 397056, num_groups: int = 256, row_align: int = 16,
               widths: tuple[int, ...] = (2048, 1024), backend: str = "pallas_triton") -> None:
  """GPU check of `fp8_quant`'s switched kernel paths against XLA, at Ling-mini's expert shapes.

  The metrics in the kernel (`_METRICS_IN_KERNEL_ON_GPU`), at the experts' output gradients
  (12 x 4096 tokens x top-8, groups padded to 16 rows): the kernel's [underflow, cosine]
  against XLA's, whether the codes are bit-identical, and the ms of both layouts with the
  metrics from the kernel and re-read in XLA. Then the weight quantiser
  (`_BLOCKS_KERNEL_ON_GPU`) on both expert weights: bit-identical to XLA or not, and the ms of
  each."""
  from kernels import fp8_quant as fq
  from ling_jax.profiling import time_queued
  rng = np.random.default_rng(0)
  counts = rng.multinomial(num_rows // row_align - num_groups, np.full(num_groups, 1 / num_groups))
  sizes_G = jnp.asarray(row_align * counts, jnp.int32)
  tile_ids_M, num_tiles = fq.row_tile_ids(num_rows, sizes_G)
  print(f"{jax.devices()[0].device_kind}: M={num_rows}, G={num_groups}, row_align={row_align}")
  bits = lambda a: a.view(jnp.uint8) if a.dtype == E4M3 else a  # compare codes bit for bit

  def off_and_on(flag, fn, arg):
    """fn(arg)'s outputs and seconds with fp8_quant.<flag> off, then on; the flag keeps its
    module value after. Each run traces its own jit (the flag is read at trace time)."""
    runs, saved = [], getattr(fq, flag)
    for on in (False, True):
      setattr(fq, flag, on)
      jitted = jax.jit(lambda a: fn(a))  # a new function: a trace of its own, not a cache hit
      runs.append((jitted(arg), time_queued(jitted, arg)))
    setattr(fq, flag, saved)
    (off, off_s), (on, on_s) = runs
    return off, on, f"{off_s * 1e3:.3f} ms (XLA) vs {on_s * 1e3:.3f} ms (kernel)"

  for width in widths:
    x = jax.random.normal(jax.random.key(width), (num_rows, width), jnp.bfloat16) * 1e-3
    xla_out, ker_out, times = off_and_on("_METRICS_IN_KERNEL_ON_GPU", lambda x: (
        fq.quantize_tiles_with_transpose(x, tile_ids_M, num_tiles, backend=backend,
                                         row_align=row_align, with_metrics=True)), x)
    same = all(bool(jnp.array_equal(bits(a), bits(b)))
               for a, b in zip(xla_out[:4], ker_out[:4], strict=True))
    print(f"[{num_rows}, {width}]: metrics XLA {np.asarray(xla_out[4])}, kernel "
          f"{np.asarray(ker_out[4])}; codes and scales identical: {same}; metrics {times}")
  for shape in ((num_groups, 2048, 1024), (num_groups, 512, 2048)):
    w = jax.random.normal(jax.random.key(shape[1]), shape, jnp.bfloat16) * 0.02
    xla_out, ker_out, times = off_and_on(
        "_BLOCKS_KERNEL_ON_GPU", lambda w: fq.quantize_blocks_with_transpose(w, backend=backend),
        w)
    same = all(bool(jnp.array_equal(bits(a), bits(b))) for a, b in zip(xla_out, ker_out))
    print(f"weights {list(shape)}: identical {same}; {times}")


def _numpy_codes(x, amax):
  """The quantisation rule in NumPy, E4M3 rounded by ml_dtypes (correctly): x * (1 / scale),
  scale = amax / 448 (1 for an all-zero tile), as uint8 codes."""
  import ml_dtypes
  scale = np.where(amax > 0, amax * np.float32(E4M3_INV_MAX), np.float32(1)).astype(np.float32)
  return np.clip(x * (np.float32(1) / scale), -448, 448).astype(
      ml_dtypes.float8_e4m3fn).view(np.uint8)


def _explain_mismatch(x_TK, src_M, mult_M, got, want) -> None:
  """Prints how many elements of each output differ, and for differing row and column codes
  which side NumPy's rule agrees with (ml_dtypes rounds E4M3 correctly)."""
  from kernels import fp8_quant as fq
  bits_np = lambda a: np.asarray(a).view(np.uint8 if a.dtype == E4M3 else np.uint32)
  differ = [int(np.sum(bits_np(a) != bits_np(b))) for a, b in zip(got, want, strict=True)]
  print(f"  differing elements of (row codes, row scales, column codes, column scales): {differ}")
  _explain_column_mismatch(x_TK, src_M, mult_M, bits_np(got[2]), bits_np(want[2]))
  q_got, q_want = (bits_np(a[0]) for a in (got, want))
  rows = np.nonzero((q_got != q_want).any(axis=1))[0]
  if not len(rows):
    return
  scales_differ = differ[1]
  x32 = np.asarray(fq.gather_rows(x_TK, src_M[rows], None if mult_M is None else mult_M[rows]),
                   np.float32)
  tiles = x32.reshape(len(rows), -1, TILE)
  q_np = _numpy_codes(tiles, np.abs(tiles).max(-1, keepdims=True)).reshape(len(rows), -1)
  codes_differ = int(np.sum(q_got[rows] != q_want[rows]))
  print(f"  {codes_differ} row codes in {len(rows)} rows and {scales_differ} scales differ; on "
        f"those rows NumPy agrees with the kernel at {int(np.sum(q_np == q_got[rows]))} and with "
        f"XLA at {int(np.sum(q_np == q_want[rows]))} of {q_np.size} codes")


def _explain_column_mismatch(x_TK, src_M, mult_M, qc_got, qc_want) -> None:
  """For the column codes (q_KM, 128-row tiles from row 0) that differ: which side NumPy's
  rule (amax of the tile's column, then x * (1 / scale) in fp32, rounded by ml_dtypes) agrees
  with."""
  from kernels import fp8_quant as fq
  ks, ms = np.nonzero(qc_got != qc_want)
  if not len(ks):
    return
  tiles, where = np.unique(ms // TILE, return_inverse=True)
  rows = (tiles[:, None] * TILE + np.arange(TILE)).reshape(-1)
  rows = np.minimum(rows, src_M.shape[0] - 1)
  x32 = np.asarray(fq.gather_rows(x_TK, src_M[rows], None if mult_M is None else mult_M[rows]),
                   np.float32).reshape(len(tiles), TILE, -1)
  cols = x32[where, :, ks]  # [differing, 128]: each code's column tile
  q_np = _numpy_codes(x32[where, ms % TILE, ks], np.abs(cols).max(-1))
  print(f"  {len(ks)} column codes differ; NumPy agrees with the kernel at "
        f"{int(np.sum(q_np == qc_got[ks, ms]))} and with XLA at "
        f"{int(np.sum(q_np == qc_want[ks, ms]))} of them")


def check_gathered(num_tokens: int = 49152, top_k: int = 8, num_groups: int = 256,
                   row_align: int = 128, widths: tuple[int, ...] = (2048,),
                   backend: str = "pallas_triton") -> None:
  """GPU check of the quantisation with the permutation inside (`src_M`, `mult_M`), at
  Ling-mini's expert shapes (balanced routing, groups padded to row_align): codes and scales
  bit-identical to XLA's quantisation of the rows gathered first (where not, which side NumPy
  agrees with), and the ms of the fused kernel against the copy then the kernel (the separate
  ops' path), with and without weights, and at 4, 8 and 16 warps; then the same for the
  SwiGLU prologues."""
  from kernels import dispatch
  from kernels import fp8_quant as fq
  from ling_jax.profiling import time_queued
  rng = np.random.default_rng(0)
  ids_TK = jnp.asarray(np.stack([rng.permutation(num_groups)[:top_k] for _ in range(num_tokens)]),
                       jnp.int32)
  sizes_G, sort_M = dispatch._route(ids_TK, num_groups, row_align)
  src_M, num_rows = sort_M // top_k, sort_M.shape[0]
  mult_M = jax.random.uniform(jax.random.key(1), (num_rows,), jnp.float32, 0.01, 1.0)
  tile_ids_M, num_tiles = fq.row_tile_ids(num_rows, sizes_G)
  bits = lambda a: a.view(jnp.uint8) if a.dtype == E4M3 else a
  impl = "pallas" if backend == "pallas_triton" else "xla"  # the permutation's copy kernel
  print(f"{jax.devices()[0].device_kind}: T={num_tokens} x top-{top_k} -> M={num_rows}, "
        f"G={num_groups}, row_align={row_align}")
  quant = functools.partial(fq.quantize_tiles_with_transpose, tile_ids_M=tile_ids_M,
                            num_tiles=num_tiles, row_align=row_align)
  copy = lambda x, s, m: (fq.gather_rows(x, s, m).astype(x.dtype) if m is not None
                          else dispatch._copy_tokens(x, sort_M, top_k, impl, num_tokens))
  fused = jax.jit(lambda x, s, m: quant(x, src_M=s, mult_M=m, backend=backend))
  separate = jax.jit(lambda x, s, m: quant(copy(x, s, m), backend=backend))
  xla = jax.jit(lambda x, s, m: quant(fq.gather_rows(x, s, m), backend="xla"))
  for width in widths:
    x = jax.random.normal(jax.random.key(width), (num_tokens, width), jnp.bfloat16)
    for mult in (None, mult_M):
      got, want = fused(x, src_M, mult), xla(x, src_M, mult)
      same = all(bool(jnp.array_equal(bits(a), bits(b))) for a, b in zip(got, want, strict=True))
      if not same:
        _explain_mismatch(x, src_M, mult, got, want)
      t_fused, t_sep = (time_queued(f, x, src_M, mult) for f in (fused, separate))
      gbytes = num_rows * width * (2 + 2) / 1e9  # rows read in bf16, two E4M3 layouts written
      print(f"[{num_rows}, {width}] {'weighted' if mult is not None else 'copies'}: identical to "
            f"XLA {same}; fused {t_fused * 1e3:.3f} ms ({gbytes / t_fused:.0f} GB/s), copy + "
            f"quantise {t_sep * 1e3:.3f} ms")
      for warps in (4, 8, 16) if row_align >= TILE else ():
        # Groups of whole tiles take the aligned launch: the kernel itself, at each warp count.
        launch = jax.jit(lambda x, s, m, w=warps: quantize(
            x, src_M=s, mult_M=m, want_cols=True, num_warps=w,
            interpret=backend != "pallas_triton"))
        outs = launch(x, src_M, mult)
        differ = sum(int(jnp.sum(bits(a) != bits(b))) for a, b in zip(
            (outs[0], outs[2]), (want[0], want[2]), strict=True))
        t = time_queued(launch, x, src_M, mult)
        print(f"  {warps} warps: {t * 1e3:.3f} ms ({gbytes / t:.0f} GB/s); {differ} codes "
              f"differ from XLA's")
  # The SwiGLU and its gradient computed in the kernel against XLA's, then the kernel.
  width = 512
  h = jax.random.normal(jax.random.key(2), (num_rows, 2 * width), jnp.bfloat16)
  d_act = jax.random.normal(jax.random.key(3), (num_rows, width), jnp.bfloat16)
  for prologue, aux in (("swiglu", None), ("swiglu_grad", d_act)):
    separate = jax.jit(
        lambda h, a, p=prologue: quant(fq.apply_prologue(h, p, a), backend=backend))
    want, t_sep = separate(h, aux), time_queued(separate, h, aux)
    print(f"{prologue} [{num_rows}, {2 * width}]: XLA then the kernel {t_sep * 1e3:.3f} ms")
    for warps in (4, 8, 16) if row_align >= TILE else (None,):
      # Groups of whole tiles take the aligned launch: the kernel itself, at each warp count.
      fused = jax.jit(lambda h, a, p=prologue, w=warps: (
          quant(h, prologue=p, aux=a, backend=backend) if w is None
          else quantize(h, prologue=p, aux=a, want_cols=True, num_warps=w,
                        interpret=backend != "pallas_triton")))
      got = fused(h, aux)
      differ = int(jnp.sum(bits(got[0]) != bits(want[0])))
      scale_err = float(jnp.max(jnp.abs(got[1] / want[1].T - 1))) if warps else float(
          jnp.max(jnp.abs(got[1] / want[1] - 1)))
      t_fused = time_queued(fused, h, aux)
      print(f"  fused, {warps or 'default'} warps: {t_fused * 1e3:.3f} ms; {differ} of "
            f"{got[0].size} row codes differ (largest row-scale ratio - 1 {scale_err:.1e})")


if __name__ == "__main__":  # python -m kernels.fp8_quant_triton [--weights_only|--gathered]
  import sys
  if "--gathered" in sys.argv[1:]:
    check_gathered()
  else:
    self_check(widths=() if "--weights_only" in sys.argv[1:] else (2048, 1024))
