"""FP8 (E4M3) quantisation with fine-grained block scaling, as Ling 2.0 and DeepSeek-V3 train.

Activations and gradients get one fp32 scale per 1x128 tile along their contraction axis, weights
one per 128x128 block. A scale is amax / 448 (the E4M3 maximum), so every tile's largest element
maps to +-448 and nothing saturates; an all-zero tile gets scale 1. Dequantisation is q * scale.

The backward pass contracts over tokens (wgrad), so it needs the tokens-axis tiles of x and of the
output gradient: `quantize_tiles_with_transpose` returns both layouts from one read of x. For
grouped (expert) operands those tiles restart at every group's first row, so that no scale spans
two experts; `row_tile_ids` maps each row to its tile.

The functions here are the pure-JAX (XLA) reference; they run everywhere and are the oracle for
the GPU kernels. `quantize_tiles`, `quantize_rows_transposed`, `quantize_tiles_with_transpose`
and `quantize_blocks_with_transpose` (a weight's codes in both layouts) take a `backend`:
  - "xla": the reference;
  - "pallas_triton": kernels/fp8_quant_triton.py, one read of x for both layouts (GPU);
  - "pallas_triton_interpret": the same kernel in Pallas's interpreter (CPU tests);
  - "auto": "pallas_triton" on Hopper GPUs (`_AUTO_USES_KERNEL`: the measurement), else "xla".
Kernel and reference give bit-identical codes and scales (on the GPU, see `_inv` for the one gap).
Dequantisation reads the E4M3 codes through an optimisation barrier (`_codes_f32`): XLA:GPU's
default `--xla_allow_excess_precision` otherwise rewrites an f32 -> e4m3 -> f32 convert chain to
the identity (its SimplifyFPConversions pass), and the "FP8" reference silently computes with
the unquantised values (the 2.6% "kernel error" of BENCHMARKS.md's session-3 FP8 check).

Scales are amax / 448 by default; with `pow2_scales` they are rounded up to a power of two
(DeepSeek-V3.1's UE8M0 scales), so that scaling is exact and codes keep <= 448.

Shape key:
  M: rows (tokens), K: the axis tiled by 128, N: the other axis of a weight,
  Kt / Mt / Nt: tiles (ceil(dim / 128)), C: tiles along M when they restart per group,
  G: groups (experts).
"""

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

from kernels.grouped_matmul import prefix_sum
from kernels.grouped_matmul import swiglu_f32
from kernels.grouped_matmul import swiglu_grad_f32

E4M3 = jnp.float8_e4m3fn
E4M3_MAX = 448.0
E4M3_INV_MAX = np.float32(1.0 / 448.0)  # scale = amax * this (see _scale_of)
TILE = 128
_BACKENDS = ("xla", "pallas_triton", "pallas_triton_interpret")
# "auto" takes the Triton kernels on sm_90. On an H200 (BENCHMARKS.md, "Blockwise FP8 kernels",
# session 5), against XLA's GB/s: 1x128 tiles 1.4x at 16384 rows (2.1x before `quantize_tiles`
# transposes the scales back) and 2.0x at 131072; both layouts at once 4.9x (128-row tiles) and
# 1.9x (per-expert tiles). The jitted fp8_linear forward + backward at 16384 x 2048 -> 3072: 389
# TFLOP/s against 242 with XLA quantisation.
_AUTO_USES_KERNEL = True
# `quantize_tiles_with_transpose(with_metrics=True)` takes the metrics' partial sums from the
# Triton kernel (no second read of x) on the interpret backend, and on "pallas_triton" only while
# this is True. Off: on an H200 (session 11, `python -m kernels.fp8_quant_triton`) the kernel's
# metrics were identical to XLA's but slower, 2.62 ms against 2.28 for the quantise kernel plus
# XLA's re-read of x at [397056, 2048] bf16 (1.34 against 1.15 at width 1024): the kernel's extra
# reductions cost more than a second read.
_METRICS_IN_KERNEL_ON_GPU = False
# `quantize_blocks_with_transpose` on "pallas_triton": the one-pass Triton weight quantiser
# while True, else XLA. On an H200 (session 11, same check) its codes, transposed codes and
# block scales were bit-identical to XLA's for both Ling-mini expert weights, in 0.71 ms against
# 1.07 ([256, 2048, 1024] bf16) and 0.36 against 0.54 ([256, 512, 2048]).
_BLOCKS_KERNEL_ON_GPU = True


def _resolve_backend(backend: str) -> str:
  if backend == "auto":
    on_hopper = (jax.default_backend() == "gpu"
                 and getattr(jax.devices()[0], "compute_capability", None) == "9.0")
    return "pallas_triton" if _AUTO_USES_KERNEL and on_hopper else "xla"
  if backend not in _BACKENDS:
    raise ValueError(f"Unknown FP8 quantisation backend {backend!r}; expected 'auto' or one of "
                     f"{list(_BACKENDS)}.")
  return backend


def _kernel_takes(x: jax.Array) -> bool:
  """Shapes and dtypes the Triton kernel covers (others take the reference on any backend)."""
  return (x.size > 0 and x.ndim >= 1
          and jnp.dtype(x.dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16),
                                     jnp.dtype(jnp.float32)))


def _pad_axis(x: jax.Array, axis: int, multiple: int) -> jax.Array:
  pad = -x.shape[axis] % multiple
  if not pad:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, pad)
  return jnp.pad(x, widths)


def _scale_of(amax: jax.Array, pow2_scales: bool = False) -> jax.Array:
  """amax / 448 in fp32; 1 where the tile is all zeros, so that q = 0 and dequant is exact.

  Written as a multiply by fp32(1/448): XLA rewrites division by a constant that way anyway,
  so spelling it out keeps the scale bit-exact and reproducible by any reference. With
  `pow2_scales`, the smallest power of two >= that (frexp gives it exactly).
  """
  scale = amax.astype(jnp.float32) * E4M3_INV_MAX
  if pow2_scales:
    mantissa, exponent = jnp.frexp(scale)  # scale = mantissa * 2^exponent, mantissa in [0.5, 1)
    scale = jnp.ldexp(jnp.ones_like(scale), jnp.where(mantissa == 0.5, exponent - 1, exponent))
  return jnp.where(amax > 0, scale, 1.0).astype(jnp.float32)


def _codes_f32(q: jax.Array) -> jax.Array:
  """E4M3 codes as fp32, read through a barrier so that XLA cannot fold quant + dequant away."""
  return jax.lax.optimization_barrier(q).astype(jnp.float32)


def _inv(scale: jax.Array) -> jax.Array:
  """1 / scale, correctly rounded: codes are x * (1 / scale), never x / scale.

  XLA rewrites a division by a broadcast into a multiply by the reciprocal (its algebraic
  simplifier, on CPU and GPU alike) but not a division by a gathered scale, and the two differ
  in the last bit, so a code could differ by one E4M3 step between layouts. Spelled out, the
  rule is the same in every function here and in the GPU kernels (kernels/fp8_quant_triton.py).
  One known gap, on the GPU only: XLA's code for the transposed layouts misrounds a few E4M3
  subnormal near-ties of bf16 inputs (20 of 2,048,000 codes, one step each, in BENCHMARKS.md's
  session-5 check), where the Triton kernel keeps the rule as NumPy computes it.
  """
  return 1.0 / scale


def _to_e4m3(x32: jax.Array) -> jax.Array:
  # x * (448 / amax) can round to a hair above 448; clip so the cast never makes NaN.
  return jnp.clip(x32, -E4M3_MAX, E4M3_MAX).astype(E4M3)


def quantize_tiles(x: jax.Array, tile: int = TILE, pow2_scales: bool = False, *,
                   backend: str = "auto") -> tuple[jax.Array, jax.Array]:
  """Quantises x [..., K] in 1 x `tile` tiles along its last axis (`pow2_scales`, `backend`:
  module doc; the kernel takes tile 128 only).

  Returns:
    q [..., K] in E4M3 and scales [..., Kt] in fp32 (a partial last tile has its own scale).
  """
  backend = _resolve_backend(backend)
  if backend != "xla" and tile == TILE and _kernel_takes(x):
    from kernels import fp8_quant_triton as fqt
    q_MK, scale_KtM = fqt.quantize(x.reshape(-1, x.shape[-1]), pow2=pow2_scales,
                                   interpret=backend == "pallas_triton_interpret")
    return q_MK.reshape(x.shape), scale_KtM.T.reshape(*x.shape[:-1], -1)
  k_dim = x.shape[-1]
  x32 = _pad_axis(x.astype(jnp.float32), x.ndim - 1, tile)
  x_tiles = x32.reshape(*x32.shape[:-1], -1, tile)
  scale = _scale_of(jnp.max(jnp.abs(x_tiles), axis=-1), pow2_scales)
  q = _to_e4m3(x_tiles * _inv(scale)[..., None]).reshape(x32.shape)[..., :k_dim]
  return q, scale


def dequantize_tiles(q: jax.Array, scale: jax.Array, dtype=jnp.float32,
                     tile: int = TILE) -> jax.Array:
  """Inverse of `quantize_tiles`: q [..., K] times its tile's scale, in `dtype`."""
  scale_full = jnp.repeat(scale, tile, axis=-1)[..., :q.shape[-1]]
  return (_codes_f32(q) * scale_full).astype(dtype)


def quantize_blocks(w: jax.Array, block: int = TILE,
                    pow2_scales: bool = False) -> tuple[jax.Array, jax.Array]:
  """Quantises w [..., K, N] in `block` x `block` blocks over its last two axes.

  Leading axes (experts) are batch axes. The transpose of the result is the quantisation of w's
  transpose, so the backward pass builds its operand on demand instead of storing it.

  Returns:
    q [..., K, N] in E4M3 and scales [..., Kt, Nt] in fp32.
  """
  k_dim, n_dim = w.shape[-2:]
  w32 = _pad_axis(_pad_axis(w.astype(jnp.float32), w.ndim - 2, block), w.ndim - 1, block)
  kt, nt = w32.shape[-2] // block, w32.shape[-1] // block
  w_blocks = w32.reshape(*w32.shape[:-2], kt, block, nt, block)
  scale = _scale_of(jnp.max(jnp.abs(w_blocks), axis=(-3, -1)), pow2_scales)
  q = _to_e4m3(w_blocks * _inv(scale)[..., :, None, :, None]).reshape(w32.shape)
  return q[..., :k_dim, :n_dim], scale


def quantize_blocks_with_transpose(w: jax.Array, pow2_scales: bool = False, *,
                                   backend: str = "auto"
                                   ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """`quantize_blocks` of w [..., K, N] and its codes transposed, [..., N, K] (the forward
  GEMM's K-major operand; the dgrad reads the first): (q, q_T, scale).

  The kernel backends read w once for both (`fp8_quant_triton.quantize_blocks_transposed`,
  for [K, N] and [G, K, N] weights in multiples of 128; on "pallas_triton" only while
  `_BLOCKS_KERNEL_ON_GPU` is set); the reference quantises, then swaps the codes' axes.
  """
  backend = _resolve_backend(backend)
  if backend != "xla" and (backend != "pallas_triton" or _BLOCKS_KERNEL_ON_GPU):
    from kernels import fp8_quant_triton as fqt
    if fqt.blocks_take(w):
      return fqt.quantize_blocks_transposed(w, pow2=pow2_scales,
                                            interpret=backend == "pallas_triton_interpret")
  q, scale = quantize_blocks(w, pow2_scales=pow2_scales)
  return q, jnp.swapaxes(q, -1, -2), scale


def dequantize_blocks(q: jax.Array, scale: jax.Array, dtype=jnp.float32,
                      block: int = TILE) -> jax.Array:
  """Inverse of `quantize_blocks`."""
  k_dim, n_dim = q.shape[-2:]
  scale_full = jnp.repeat(jnp.repeat(scale, block, axis=-2), block, axis=-1)
  return (_codes_f32(q) * scale_full[..., :k_dim, :n_dim]).astype(dtype)


def row_tile_ids(num_rows: int, group_sizes_G: jax.Array | None = None,
                 tile: int = TILE) -> tuple[jax.Array, int]:
  """Returns each row's tile along M and the (static) number of tiles C.

  Without groups the tiles are rows [128 i, 128 (i + 1)). With groups (rows sorted by group, as
  for `grouped_matmul`) tiles restart at every group's first row; the rows past the last group
  form one more group, so their contents never share a scale with an expert's rows.
  """
  if group_sizes_G is None:
    return jnp.arange(num_rows, dtype=jnp.int32) // tile, pl.cdiv(num_rows, tile)
  sizes_G = group_sizes_G.astype(jnp.int32)
  sizes_G1 = jnp.concatenate([sizes_G, (num_rows - jnp.sum(sizes_G))[None]])
  ends_G1 = prefix_sum(sizes_G1)
  tiles_G1 = (sizes_G1 + tile - 1) // tile
  tile_starts_G1 = prefix_sum(tiles_G1) - tiles_G1
  rows_M = jnp.arange(num_rows, dtype=jnp.int32)
  # All [M, G + 1] comparisons in one fusion: the default binary search is a while loop of
  # log2(G) steps on the GPU.
  group_M = jnp.searchsorted(ends_G1, rows_M, side="right", method="compare_all")
  offset_M = rows_M - (ends_G1 - sizes_G1)[group_M]
  # Each group adds at most one partial tile to the cdiv(M, 128) full ones.
  num_tiles = pl.cdiv(num_rows, tile) + sizes_G1.shape[0] - 1
  return (tile_starts_G1[group_M] + offset_M // tile).astype(jnp.int32), num_tiles


def _tile_bounds(tile_ids_M: jax.Array, num_tiles: int) -> tuple[jax.Array, jax.Array]:
  """Each tile's first row and row count, for sorted tile ids as `row_tile_ids` makes them.

  Scatters of the rows where the id changes, rather than a binary search per tile (a while loop
  of ~17 steps on the GPU): at 131072 rows the per-expert public op ran at 0.32 of copy against
  its kernel's 0.42 with the searches, 0.41 with these (BENCHMARKS.md, sessions 5 and 7).
  A tile that holds no row starts at M with 0 rows.
  """
  num_rows = tile_ids_M.shape[0]
  ids_M = tile_ids_M.astype(jnp.int32)
  rows_M = jnp.arange(num_rows, dtype=jnp.int32)
  change_M1 = ids_M[1:] != ids_M[:-1]
  edge = jnp.ones((1,), bool)

  def at(rows_M, where_M):  # the row of each tile where `where_M` holds, else M
    ids_or_out_M = jnp.where(where_M, ids_M, num_tiles)
    return jnp.full((num_tiles,), num_rows, jnp.int32).at[ids_or_out_M].set(rows_M, mode="drop")
  starts_C = at(rows_M, jnp.concatenate([edge, change_M1]))
  ends_C = at(rows_M + 1, jnp.concatenate([change_M1, edge]))
  return starts_C, ends_C - starts_C


def _check_untiled(fn: str, num_rows: int, tile_ids_M: jax.Array | None, num_tiles: int):
  """Without tile ids the tiles are the 128-row tiles from row 0: num_tiles must count them."""
  if tile_ids_M is None and num_tiles != pl.cdiv(num_rows, TILE):
    raise ValueError(f"{fn}: without tile_ids_M num_tiles must be ceil(M / 128) = "
                     f"{pl.cdiv(num_rows, TILE)} for {num_rows} rows, got {num_tiles}. Pass "
                     f"row_tile_ids' ids and count.")


def _check_row_align(fn: str, num_rows: int, row_align: int):
  if not 1 <= row_align <= TILE or row_align & (row_align - 1) or num_rows % row_align:
    raise ValueError(f"{fn}: row_align must be a power of two <= {TILE} that divides M = "
                     f"{num_rows}, got {row_align}. Pad the groups to it (dispatch.permute's "
                     f"group_align) or pass row_align=1.")


def apply_prologue(x_MK: jax.Array, prologue: str | None, aux: jax.Array | None) -> jax.Array:
  """What `quantize_tiles_with_transpose(prologue=...)` quantises, in x's dtype (XLA)."""
  if prologue is None:
    return x_MK
  gate, up = jnp.split(x_MK.astype(jnp.float32), 2, axis=-1)
  if prologue == "swiglu":
    return swiglu_f32(gate, up).astype(x_MK.dtype)
  if prologue == "swiglu_grad":
    return jnp.concatenate(swiglu_grad_f32(gate, up, aux.astype(jnp.float32)),
                           axis=-1).astype(x_MK.dtype)
  raise ValueError(f"Unknown prologue {prologue!r}; use None, 'swiglu' or 'swiglu_grad'.")


def gather_rows(x_TK: jax.Array, src_M: jax.Array, mult_M: jax.Array | None = None) -> jax.Array:
  """x's rows src_M, zeros where src_M is past x's rows; times mult_M per row in fp32 where
  given. What `quantize_tiles_with_transpose(src_M=..., mult_M=...)` quantises, in XLA."""
  ok_M = (src_M >= 0) & (src_M < x_TK.shape[0])
  rows_MK = x_TK[jnp.where(ok_M, src_M, 0)]
  if mult_M is not None:
    rows_MK = rows_MK.astype(jnp.float32) * mult_M.astype(jnp.float32)[:, None]
  return jnp.where(ok_M[:, None], rows_MK, jnp.zeros((), rows_MK.dtype))


def _transposed_kernel(x_MK, tile_ids_M, num_tiles, pow2_scales, backend, want_rows, row_align,
                       metrics=False, src_M=None, mult_M=None, prologue=None, aux=None):
  """The Triton kernel's outputs in the public layouts (scales transposed back), and with
  `metrics` the row codes' [underflow, cosine] last."""
  from kernels import fp8_quant_triton as fqt
  # Groups of whole 128-row tiles (row_align 128, M a multiple of it): every group's tiles, and
  # those of the rows past the groups, are rows [128 i, 128 (i + 1)), the tiles from row 0. The
  # kernel's aligned launch reads no bounds and masks nothing (0.78 of copy against 0.66 for the
  # per-group launch on an H200, BENCHMARKS.md session 12); the tiles no row reaches get scale 1,
  # as the per-group launch and the XLA path give them.
  whole_tiles = tile_ids_M is not None and row_align >= TILE
  if tile_ids_M is None or whole_tiles:
    bounds, kernel_tiles = (None, None), None
  else:
    bounds, kernel_tiles = _tile_bounds(tile_ids_M, num_tiles), num_tiles
  outs = fqt.quantize(x_MK, *bounds, src_M=src_M, mult_M=mult_M, prologue=prologue, aux=aux,
                      want_rows=want_rows, want_cols=True, num_tiles=kernel_tiles,
                      row_align=row_align, pow2=pow2_scales,
                      interpret=backend == "pallas_triton_interpret", metrics=metrics)
  if metrics:
    *outs, sums, counts = outs
  if whole_tiles:
    q_KM, scale_CK = outs[-2:]
    scale_CK = jnp.pad(scale_CK, ((0, num_tiles - scale_CK.shape[0]), (0, 0)),
                       constant_values=1.0)
    outs = (*outs[:-2], q_KM, scale_CK)
  public = tuple(o.T if i % 2 else o for i, o in enumerate(outs))
  return (*public, fqt.metrics_of_partials(sums, counts)) if metrics else public


def quantize_rows_transposed(x_MK: jax.Array, tile_ids_M: jax.Array | None, num_tiles: int,
                             pow2_scales: bool = False, *, backend: str = "auto",
                             row_align: int = 1) -> tuple[jax.Array, jax.Array]:
  """Quantises x^T [K, M] in 1 x 128 tiles along M given by `row_tile_ids`.

  tile_ids_M None stands for `row_tile_ids(M)` without groups (128-row tiles from row 0), which
  the kernel reads with aligned stores; num_tiles must then be ceil(M / 128).
  row_align: a promise that M and every group's first row and size are multiples of it (a power
  of two <= 128), so that the kernel stores the per-group tiles aligned (`fp8_quant_triton`); the
  results do not depend on it.

  Returns:
    q_KM in E4M3 (K-major for the wgrad GEMM) and scales [K, C] in fp32.
  """
  backend = _resolve_backend(backend)
  num_rows = x_MK.shape[0]
  _check_untiled("quantize_rows_transposed", num_rows, tile_ids_M, num_tiles)
  _check_row_align("quantize_rows_transposed", num_rows, row_align)
  if backend != "xla" and _kernel_takes(x_MK):
    return _transposed_kernel(x_MK, tile_ids_M, num_tiles, pow2_scales, backend,
                              want_rows=False, row_align=row_align)
  # Jax arrays: NumPy ones cannot be indexed by traced rows (under a cond or jit).
  tile_ids_M = row_tile_ids(num_rows)[0] if tile_ids_M is None else jnp.asarray(tile_ids_M)
  x32 = jnp.asarray(x_MK, jnp.float32)
  # Each tile is <= 128 consecutive rows: gather them as [C, 128, K] and reduce, instead of a
  # segment max (a scatter, 50 GB/s on an H200 against ~1 TB/s for this; the max is the same).
  starts_C = jnp.searchsorted(tile_ids_M, jnp.arange(num_tiles, dtype=tile_ids_M.dtype))
  rows_CR = starts_C[:, None] + jnp.arange(TILE, dtype=starts_C.dtype)[None, :]
  in_tile_CR = (rows_CR < num_rows) & (
      tile_ids_M[jnp.minimum(rows_CR, num_rows - 1)] == jnp.arange(num_tiles)[:, None])
  abs_CRK = jnp.abs(x32[jnp.minimum(rows_CR, num_rows - 1)])
  amax_CK = jnp.max(jnp.where(in_tile_CR[:, :, None], abs_CRK, 0.0), axis=1)
  scale_CK = _scale_of(amax_CK, pow2_scales)  # empty tiles: scale 1
  q_MK = _to_e4m3(x32 * _inv(scale_CK)[tile_ids_M])
  return q_MK.T, scale_CK.T


def quantize_columns(x_MK: jax.Array, tile: int = TILE) -> tuple[jax.Array, jax.Array]:
  """`quantize_rows_transposed` for tiles at multiples of 128 rows (no groups), in XLA.

  A reshape instead of a gather; the same codes and scales (both multiply by `_inv`).

  Returns:
    q_KM in E4M3 and scales [K, Mt] in fp32.
  """
  num_rows = x_MK.shape[0]
  x32 = _pad_axis(x_MK.astype(jnp.float32), 0, tile)
  x_tiles = x32.reshape(-1, tile, x32.shape[1])
  scale_MtK = _scale_of(jnp.max(jnp.abs(x_tiles), axis=1))
  q_MK = _to_e4m3(x_tiles * _inv(scale_MtK)[:, None, :]).reshape(x32.shape)[:num_rows]
  return q_MK.T, scale_MtK.T


def dequantize_rows_transposed(q_KM: jax.Array, scale_KC: jax.Array, tile_ids_M: jax.Array,
                               dtype=jnp.float32) -> jax.Array:
  """Inverse of `quantize_rows_transposed`: x^T [K, M]."""
  return (_codes_f32(q_KM) * scale_KC[:, tile_ids_M]).astype(dtype)


def quantize_tiles_with_transpose(
    x_MK: jax.Array, tile_ids_M: jax.Array | None, num_tiles: int, pow2_scales: bool = False,
    *, backend: str = "auto", row_align: int = 1, with_metrics: bool = False,
    src_M: jax.Array | None = None, mult_M: jax.Array | None = None,
    prologue: str | None = None, aux: jax.Array | None = None,
) -> tuple[jax.Array, ...]:
  """Both FP8 layouts of x for the backward pass: K-tiles of x and M-tiles of x^T.

  tile_ids_M and row_align as for `quantize_rows_transposed` (None: 128-row tiles). The kernel
  backends read x once for both.
  src_M, mult_M: quantise `gather_rows(x, src_M, mult_M)` instead of x (M is src_M's length):
  the kernel reads x's rows by index, so a permutation's copy (and an un-permutation's router
  weights, mult_M) is never written out in x's dtype; XLA gathers first. Both apply the same
  arithmetic (fp32 product, then the rule).
  prologue, aux: quantise `apply_prologue(x, prologue, aux)` (the experts' SwiGLU, or its
  gradient, fused into the quantisation: the kernel computes it from x's tiles; XLA first).

  Returns:
    (q_MK, scale_MKt) as `quantize_tiles`, and (q_KM, scale_KC) as `quantize_rows_transposed`;
    with `with_metrics`, then `quant_metrics` of the K-tiles, [underflow, cosine]: from the
    kernel's partial sums where it runs them (`_METRICS_IN_KERNEL_ON_GPU`), else from x and the
    codes in XLA.
  """
  backend = _resolve_backend(backend)
  if mult_M is not None and src_M is None:
    raise ValueError("quantize_tiles_with_transpose: mult_M scales gathered rows; pass src_M.")
  num_rows = x_MK.shape[0] if src_M is None else src_M.shape[0]
  _check_untiled("quantize_tiles_with_transpose", num_rows, tile_ids_M, num_tiles)
  _check_row_align("quantize_tiles_with_transpose", num_rows, row_align)
  if prologue is not None and src_M is not None:
    raise ValueError(f"quantize_tiles_with_transpose: prologue {prologue!r} reads x's rows in "
                     "order; pass src_M=None (gather x first).")
  if prologue is not None and x_MK.shape[-1] % (2 * TILE):
    # The kernel's prologues read whole 128-column tiles of gate and up: XLA makes the values.
    x_MK, prologue, aux = apply_prologue(x_MK, prologue, aux), None, None

  def values():  # what is quantised, in XLA
    x = x_MK if src_M is None else gather_rows(x_MK, src_M, mult_M)
    return apply_prologue(x, prologue, aux)
  if backend != "xla" and _kernel_takes(x_MK):
    in_kernel = with_metrics and (backend != "pallas_triton" or _METRICS_IN_KERNEL_ON_GPU)
    outs = _transposed_kernel(x_MK, tile_ids_M, num_tiles, pow2_scales, backend,
                              want_rows=True, row_align=row_align, metrics=in_kernel,
                              src_M=src_M, mult_M=mult_M, prologue=prologue, aux=aux)
    if with_metrics and not in_kernel and (src_M is not None or prologue is not None):
      x_MK = values()  # the metrics' XLA read (logged steps only)
  else:
    x_MK = values()
    outs = (*quantize_tiles(x_MK, pow2_scales=pow2_scales, backend="xla"),
            *quantize_rows_transposed(x_MK, tile_ids_M, num_tiles, pow2_scales, backend="xla"))
    in_kernel = False
  if with_metrics and not in_kernel:
    q_MK, scale_MKt = outs[:2]
    outs = (*outs, quant_metrics(x_MK, q_MK, dequantize_tiles(q_MK, scale_MKt)))
  return outs


def quant_metrics(x: jax.Array, q: jax.Array, x_dq: jax.Array) -> jax.Array:
  """Safeguard metrics of one quantisation: [underflow, cosine] in fp32.

  underflow: the fraction of x's nonzero elements that quantise to 0 (exact zeros, such as
  padding rows, lose nothing and are not counted); 0 when x has no nonzero element.
  cosine: the cosine similarity of x and dequant(quant(x)); 1 when x is all zeros.
  """
  x32, dq32 = x.astype(jnp.float32).reshape(-1), x_dq.astype(jnp.float32).reshape(-1)
  nonzero = x32 != 0
  flushed = nonzero & (_codes_f32(q).reshape(-1) == 0)
  return metrics_from_sums(jnp.sum(x32 * x32), jnp.sum(dq32 * dq32), jnp.sum(x32 * dq32),
                           jnp.sum(nonzero), jnp.sum(flushed))


def metrics_from_sums(xx: jax.Array, dd: jax.Array, xd: jax.Array, nonzero: jax.Array,
                      flushed: jax.Array) -> jax.Array:
  """`quant_metrics` from its sums over the elements: x.x, dq.dq, x.dq (fp32), and the counts
  of nonzero x and of those flushed to code 0 (integers); also how the quantise kernel's
  per-program partial sums are combined (`fp8_quant_triton.metrics_of_partials`)."""
  underflow = flushed.astype(jnp.float32) / jnp.maximum(nonzero, 1).astype(jnp.float32)
  norms = jnp.sqrt(xx) * jnp.sqrt(dd)
  cosine = jnp.where(norms > 0, xd / jnp.where(norms > 0, norms, 1.0), 1.0)
  return jnp.stack([underflow, cosine]).astype(jnp.float32)
