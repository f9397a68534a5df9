"""The FP8 grouped weight gradient on Hopper GPUs through Pallas Mosaic GPU (e4m3 wgmma, TMA).

`tgmm_fp8` computes out[g] = sum over rows m of group g of dequant(A)[:, m] (x) dequant(B)[:, m],
[G, K, N], from the transposed operands the FP8 expert layer saves for its backward pass
(`fp8_quant.quantize_rows_transposed`): A = x^T codes [K, M] and B = dy^T codes [N, M] in E4M3,
both K-major along M (what FP8 wgmma reads, so no transpose here), each with one fp32 scale per
row and 1x128 tile along M. The tiles restart at every group's first row (`fp8_quant.row_tile_ids`),
so group g's tiles are c = first_g, first_g + 1, ... with first_g the number of tiles of the
groups before it, and a tile never spans two groups.

Structure, as `grouped_matmul_mgpu._tgmm_body` (the bf16 wgrad): one warpgroup per CTA walks the
(group, K tile, N tile) units persistently, with one CTA per SM or two (`ctas_per_sm`: a unit runs
only its group's ~10 tiles, and a second CTA keeps the tensor cores busy through the other's
pipeline start and epilogue); a unit's output stores run on while the next unit's pipeline does.
With `ws` the CTA is warp-specialised instead (`_tgmm_fp8_ws_body`): a memory warpgroup runs the
TMA ring and two compute warpgroups split the unit's tile_k rows, sharing the B box, so that one's
promotion can overlap the other's wgmma (from 128-row groups 671 / 681 TFLOP/s with bf16 out at
Ling-mini's up / down wgrads against 589 / 579 for two CTAs, session 12). A CTA takes the units
largest group first (`by_size`): with skewed routing, units in group order left a few CTAs a run
of large groups' units at the end (the step's four wgrads: 13.9 -> 8.7 ms). Per unit,
`plgpu.emit_pipeline` runs over the group's cdiv(size_g, 128) tiles (a traced count: empty groups
run none and store zeros). Each step loads an A box [tk, 128] and a B box [tn, 128] at the tile's
first row (an element offset along M, `pl.Element`) with both tiles' scale vectors, runs one e4m3
wgmma per accumulator and adds partial * (sa [tk] column x sb [tn] row) to a running fp32 sum, as
`fp8_gemm_mgpu` promotes its "tile"-scaled B (its `mma_promote`, `zero_sums` and `store_sums` are
reused here).

Rows past the group's end. A group's last tile reads a full 128 rows of M, so when the group's
size is not a multiple of 128 the box also holds the first rows of the next group (or rows past
M, which TMA fills with zeros: the operands are never padded). Scales cannot mask them (one per
row and tile, not per column of M), so that step zeroes those columns of A's box in shared memory
before its wgmma: a load of the whole box, an AND of each code's byte with 0x00 or 0xFF from a
column iota (Mosaic GPU has bitwise ops on 8-bit values, no select), a store of the whole box
back through the same swizzled ref, then a fence for the async proxy. This is the scheme of the
bf16 `_tgmm_body`, which runs on the GPU; it never stores into a slice of a swizzled tile
(session 8's GPU-only bug), and only a group's last tile pays for it. Zeroing A alone suffices
(the product of a zero with any finite code is zero; E4M3 codes from the quantiser are never
NaN); B's out-of-group columns are left as they are.

Alignment. Mosaic GPU addresses a TMA box along the minor dim in whole swizzle tiles, and its
wgmma takes swizzles of 32, 64 or 128 bytes: boxes at group starts along M need those starts to
be multiples of 32 rows at least. So the caller promises `row_align` >= `MIN_ROW_ALIGN` (M and
every group size multiples of it; the expert layer pads groups to `model.fp8_group_align`),
and the boxes take the widest swizzle that it allows (128 bytes from row_align 128 up). Interpret
mode neither swizzles nor checks the promise.

Supported: K a multiple of tile_k, N of tile_n, bf16 or fp32 out (`supports`), row_align as above.
Tilings (`default_config`, timed on an H200 in sessions 11-12): 128 x 128, one CTA per SM, below
128-row alignment; from 128 rows (no masked tiles, 128-byte swizzles) the warp-specialised body,
128 x 128 for fp32 out and 256 x 128 for bf16.

Shape key: M rows, K and N the output's dims, G groups, C 128-row tiles of M that restart per
group.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from kernels.fp8_gemm_mgpu import TILE_K as TILE_M  # one wgmma step = one scale tile along M
from kernels.fp8_gemm_mgpu import Fp8TileConfig
from kernels.fp8_gemm_mgpu import mma_promote
from kernels.fp8_gemm_mgpu import store_sums
from kernels.fp8_gemm_mgpu import swizzled
from kernels.fp8_gemm_mgpu import zero_sums
from kernels.grouped_matmul import prefix_sum
from kernels.grouped_matmul_mgpu import device_num_sms
from kernels.grouped_matmul_mgpu import shrink_to_fit

# Group starts along M are multiples of row_align >= this: Mosaic GPU's TMA reads a box at a
# multiple of its swizzle along the minor dim, and its wgmma takes swizzles of 32 bytes and up.
MIN_ROW_ALIGN = 32
_SMEM_BUDGET = 232448 - 4096  # 227 KiB per CTA on Hopper, less room for barriers


@dataclasses.dataclass(frozen=True)
class Fp8WgradConfig:
  """Static tiling of the FP8 weight-gradient kernel."""

  tile_k: int = 128  # rows of the [K, N] output tile (wgmma rows)
  tile_n: int = 128  # columns of the output tile
  stages: int = 4  # pipeline depth
  # Columns per wgmma accumulator (0: all tile_n). One warpgroup holds the tile_k x tile_n fp32
  # running sum and one accumulator of partial sums at a time (`fp8_gemm_mgpu.mma_promote`).
  acc_cols: int = 64
  # The next accumulator's wgmma issued before the current one is promoted
  # (`Fp8TileConfig.overlap`): two accumulators live at once.
  overlap: bool = False
  # CTAs per SM (each a single warpgroup with its own pipeline): a unit runs only its group's
  # ~M / (G * 128) steps, so one CTA's pipeline start and epilogue leave the tensor cores idle;
  # a second CTA on the SM fills those gaps. Each CTA gets 1 / ctas_per_sm of shared memory.
  ctas_per_sm: int = 1
  # Warp-specialised (`_tgmm_fp8_ws_body`): a memory warpgroup runs the TMA ring and two compute
  # warpgroups take tile_k // 2 rows of the unit each, both reading the same B box; while one
  # promotes, the other's wgmma can run. ctas_per_sm must be 1.
  ws: bool = False
  # Units taken largest group first. The grid hands units to CTAs in turn, and a unit costs its
  # group's rows: with skewed routing, groups in index order can leave some CTAs a run of large
  # units at the end; in size order every CTA's last units are the smallest (":unsorted": off).
  by_size: bool = True

  @property
  def wg_rows(self) -> int:
    """Rows of the output tile one compute warpgroup holds."""
    return self.tile_k // 2 if self.ws else self.tile_k

  @property
  def mma(self) -> Fp8TileConfig:
    """The tiling `fp8_gemm_mgpu`'s step helpers read: one warpgroup's wg_rows x tile_n."""
    return Fp8TileConfig(tile_m=self.wg_rows, tile_n=self.tile_n, acc_cols=self.acc_cols,
                         overlap=self.overlap)

  @classmethod
  def parse(cls, spec: str) -> "Fp8WgradConfig":
    """"tile_k:tile_n:stages:acc_cols[:overlap][:ws][:unsorted][:x<ctas per SM>]", e.g.
    "64:128:3:64:x2"."""
    fields = spec.split(":")
    extra = fields[4:]
    ctas = [f for f in extra if f.startswith("x") and f[1:].isdigit()]
    if (len(fields) < 4 or len(ctas) > 1
        or any(f not in ("overlap", "ws", "unsorted") and f not in ctas for f in extra)
        or not all(f.isdigit() for f in fields[:4])):
      raise ValueError(f"wgrad tiling {spec!r}: expected "
                       "tile_k:tile_n:stages:acc_cols[:overlap][:ws][:unsorted][:x<ctas per SM>]")
    tk, tn, stages, acc = map(int, fields[:4])
    return cls(tile_k=tk, tile_n=tn, stages=stages, acc_cols=acc, overlap="overlap" in extra,
               ctas_per_sm=int(ctas[0][1:]) if ctas else 1, ws="ws" in extra,
               by_size="unsorted" not in extra)

  def smem_bytes(self, out_itemsize: int) -> int:
    operands = (self.tile_k + self.tile_n) * (TILE_M + 4)  # e4m3 boxes and fp32 scale vectors
    return self.stages * operands + self.tile_k * self.tile_n * out_itemsize

  @property
  def smem_budget(self) -> int:
    return _SMEM_BUDGET // self.ctas_per_sm

  def fit_smem(self, out_itemsize: int) -> "Fp8WgradConfig":
    """Drops stages (not below 2), then halves tile_n, until shared memory fits."""
    return shrink_to_fit(self, lambda cfg: cfg.smem_bytes(out_itemsize), self.smem_budget)


# H200, session 11 (`python -m kernels.fp8_tgmm_mgpu 32 128 --rows=397056 --fp32_only`, Ling-mini
# up / down wgrads at 12 x 4096 tokens, fp32 out; BENCHMARKS.md): with groups padded to 32 rows
# (32-byte swizzled boxes, most groups' last tile masked) one CTA of 128 x 128 per SM is best,
# 348 / 338 TFLOP/s (two CTAs of 128 x 64: 314 / 308). Session 12 (`... 128 --rows=397056
# --configs=...`), groups padded to 128 rows: the warp-specialised body beats two CTAs of
# 128 x 64 (526 / 531 fp32 out, 589 / 579 bf16): 630 / 595 fp32 out with 128 x 128 tiles and 4
# stages, 671 / 681 bf16 out with 256 x 128 and 3 stages, against the bf16 tgmm's 530 / 444 on
# the unquantised operands in the same run.
DEFAULT_CONFIG = Fp8WgradConfig()
ALIGNED_128_CONFIGS = {
    jnp.dtype(jnp.float32): Fp8WgradConfig(tile_k=128, tile_n=128, stages=4, ws=True),
    jnp.dtype(jnp.bfloat16): Fp8WgradConfig(tile_k=256, tile_n=128, stages=3, ws=True),
}
# Interpret mode (CPU tests): small tiles, since the interpreter's cost grows with tile sizes;
# two accumulators per unit, as on the GPU.
INTERPRET_CONFIG = Fp8WgradConfig(tile_k=64, tile_n=64, stages=2, acc_cols=32)


def default_config(row_align: int, out_dtype=jnp.float32) -> Fp8WgradConfig:
  """The tuned tiling for groups padded to row_align rows and an out_dtype output."""
  if row_align >= TILE_M:  # other dtypes: the fp32 tiling (`supports` then refuses them)
    return ALIGNED_128_CONFIGS.get(jnp.dtype(out_dtype), ALIGNED_128_CONFIGS[jnp.dtype("float32")])
  return DEFAULT_CONFIG


def supports(k_dim: int, n_dim: int, out_dtype, cfg: Fp8WgradConfig | None = None) -> bool:
  """Whether the kernel covers a weight gradient of K x N in out_dtype."""
  out_dtype = jnp.dtype(out_dtype)
  if out_dtype not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float32)):
    return False
  cfg = (cfg or DEFAULT_CONFIG).fit_smem(out_dtype.itemsize)
  acc_n = cfg.mma.acc_n
  return (cfg.smem_bytes(out_dtype.itemsize) <= cfg.smem_budget
          and cfg.wg_rows % 64 == 0 and cfg.tile_n % acc_n == 0 and acc_n % 8 == 0
          and not (cfg.ws and cfg.ctas_per_sm != 1)
          and k_dim % cfg.tile_k == 0 and n_dim % cfg.tile_n == 0)


def _in_specs(cfg: Fp8WgradConfig, row_align: int, ki, ni, start, first, a_dtype, b_dtype):
  """The pipeline's boxes for unit (group, ki, ni) and its tiles j: A [tk, 128] and B [tn, 128]
  at the tile's first row of M (an element offset; TMA fills rows past M with zeros, and the
  step masks the next group's rows), and both tiles' scale vectors."""
  tk, tn = cfg.tile_k, cfg.tile_n
  swizzle_m = min(row_align, TILE_M)  # no wider than the alignment of the offsets along M
  return [
      plgpu.BlockSpec((tk, pl.Element(TILE_M)), lambda j: (ki, start + j * TILE_M),
                      transforms=swizzled((tk, swizzle_m), a_dtype)),
      plgpu.BlockSpec((tn, pl.Element(TILE_M)), lambda j: (ni, start + j * TILE_M),
                      transforms=swizzled((tn, swizzle_m), b_dtype)),
      plgpu.BlockSpec((1, tk), lambda j: (first + j, ki)),
      plgpu.BlockSpec((1, tn), lambda j: (first + j, ni)),
  ]


def _mma_step(mma: Fp8TileConfig, a_smem, b_smem, sa_smem_R, sb_smem, sums: tuple, valid):
  """One 128-row tile of a warpgroup: its rows of A (a_smem, [R, 128], with their scales
  sa_smem_R) against all of B. `valid`: rows of the group in the tile; the rest belong to others
  and their columns of A are zeroed first."""
  rows, acc_n = mma.tile_m, mma.acc_n

  @pl.when(valid < TILE_M)
  def _():
    # Mosaic GPU has no 8-bit arithmetic or select, but has 8-bit bitwise ops: AND the codes'
    # bits with an all-ones or all-zeros byte (E4M3's zero is the zero byte).
    cols = plgpu.broadcasted_iota(jnp.int32, (rows, TILE_M), 1, layout=plgpu.Layout.WGMMA_8BIT)
    keep = jnp.where(cols < valid, -1, 0).astype(jnp.int8)
    bits = jax.lax.bitcast_convert_type(a_smem[...], jnp.int8)
    a_smem[...] = jax.lax.bitcast_convert_type(bits & keep, a_smem.dtype)
    plgpu.commit_smem()

  sa_R = plgpu.load(sa_smem_R, layout=plgpu.Layout.WGMMA.reduce(1))

  def scale_of(c):
    sb_N = plgpu.load(sb_smem.at[0, pl.ds(c * acc_n, acc_n)], layout=plgpu.Layout.WGMMA.reduce(0))
    return (jax.lax.broadcast_in_dim(sa_R, (rows, acc_n), [0])
            * jax.lax.broadcast_in_dim(sb_N, (rows, acc_n), [1]))

  return mma_promote(mma, a_smem, b_smem, sums, scale_of)


def _store_unit(out_smem_wg, sums: tuple, out_gmem, group, row_start, col_start):
  """A warpgroup's rows of a unit's output: its sums into its tiles in shared memory (one per
  accumulator), then TMA stores into out[group, rows, cols], committed but not waited for; the
  wait before the tiles are written again covers the previous unit's stores."""
  plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the last unit's stores read out_smem
  store_sums(out_smem_wg, sums)
  plgpu.commit_smem()
  num_acc, rows, acc_n = out_smem_wg.shape
  for c in range(num_acc):
    plgpu.copy_smem_to_gmem(
        out_smem_wg.at[c],
        out_gmem.at[group, pl.ds(row_start, rows), pl.ds(col_start + c * acc_n, acc_n)],
        commit_group=False)
  plgpu.commit_smem_to_gmem_group()


def _tgmm_fp8_body(cfg: Fp8WgradConfig, row_align: int, order_gmem, starts_gmem, sizes_gmem,
                   first_tile_gmem, a_gmem, sa_gmem, b_gmem, sb_gmem, out_gmem):
  """One warpgroup per CTA (cfg.ctas_per_sm CTAs per SM); each (group, K tile, N tile) unit
  contracts its group's 128-row tiles."""
  tk, tn, acc_n = cfg.tile_k, cfg.tile_n, cfg.mma.acc_n

  # The output tiles in shared memory outlive a unit: a unit's stores to global memory run on
  # while the next unit's pipeline does, and are waited for only before its tiles are rewritten.
  @functools.partial(pl.run_scoped, out_smem=plgpu.SMEM(
      (tn // acc_n, tk, acc_n), out_gmem.dtype,
      transforms=swizzled((tk, acc_n), out_gmem.dtype)))
  def _scope(out_smem):
    _units(cfg, row_align, order_gmem, starts_gmem, sizes_gmem, first_tile_gmem, a_gmem, sa_gmem,
           b_gmem, sb_gmem, out_gmem, out_smem)
    plgpu.wait_smem_to_gmem(0, wait_read_only=True)


def _unit_group(info, row_align: int, order_gmem, starts_gmem, sizes_gmem, first_tile_gmem):
  """Unit (rank, ki, ni) of the grid's loop: its group (the rank-th in `order_gmem`, see
  `Fp8WgradConfig.by_size`), the group's first row, size and first 128-row tile, and ki, ni."""
  rank, ki, ni = info.index
  group = order_gmem[rank]
  start = pl.multiple_of(starts_gmem[group], row_align)
  return group, start, sizes_gmem[group], first_tile_gmem[group], ki, ni


def _units(cfg: Fp8WgradConfig, row_align: int, order_gmem, starts_gmem, sizes_gmem,
           first_tile_gmem, a_gmem, sa_gmem, b_gmem, sb_gmem, out_gmem, out_smem):
  num_groups, k_dim, n_dim = out_gmem.shape
  tk, tn, mma = cfg.tile_k, cfg.tile_n, cfg.mma

  @plgpu.nd_loop((num_groups, k_dim // tk, n_dim // tn), collective_axes="sm")
  def _unit(info):
    group, start, size, first, ki, ni = _unit_group(info, row_align, order_gmem, starts_gmem,
                                                    sizes_gmem, first_tile_gmem)

    def step(idx, a_smem, b_smem, sa_smem, sb_smem, sums):
      return _mma_step(mma, a_smem, b_smem, sa_smem.at[0], sb_smem, sums,
                       valid=size - idx[0] * TILE_M)

    sums = plgpu.emit_pipeline(
        step,
        grid=((size + TILE_M - 1) // TILE_M,),
        in_specs=_in_specs(cfg, row_align, ki, ni, start, first, a_gmem.dtype, b_gmem.dtype),
        max_concurrent_steps=cfg.stages,
        init_carry=zero_sums(mma),
    )(a_gmem, b_gmem, sa_gmem, sb_gmem)

    _store_unit(out_smem, sums, out_gmem, group, ki * tk, ni * tn)


def _tgmm_fp8_ws_body(cfg: Fp8WgradConfig, row_align: int, order_gmem, starts_gmem, sizes_gmem,
                      first_tile_gmem, a_gmem, sa_gmem, b_gmem, sb_gmem, out_gmem):
  """Warp-specialised: a memory warpgroup runs the TMA ring; compute warpgroup w takes rows
  [w * R, (w + 1) * R) of each unit's tile (R = tile_k / 2) against the shared B box."""
  num_groups, k_dim, n_dim = out_gmem.shape
  tk, tn, rows, mma = cfg.tile_k, cfg.tile_n, cfg.wg_rows, cfg.mma
  acc_n = mma.acc_n
  operands = (a_gmem, b_gmem, sa_gmem, sb_gmem)

  def pipeline(step, compute_context, num_tiles=None, ki=0, ni=0, start=0, first=0):
    # The allocations' pipeline (no num_tiles) gets a static grid of `stages` steps: a shorter
    # one would get fewer slots than the units' (traced) grids use.
    return plgpu.emit_pipeline_warp_specialized(
        step,
        grid=(cfg.stages if num_tiles is None else num_tiles,),
        memory_registers=40,
        in_specs=_in_specs(cfg, row_align, ki, ni, start, first, a_gmem.dtype, b_gmem.dtype),
        wg_axis="wg",
        num_compute_wgs=2,
        max_concurrent_steps=cfg.stages,
        compute_context=compute_context,
    )

  ignore = lambda *_, **__: None

  @functools.partial(
      pl.run_scoped,
      allocs=pipeline(ignore, ignore).get_allocations(*operands),
      # [warpgroup, accumulator]: one output tile per accumulator (`store_sums`); Mosaic GPU's
      # layout inference rejects 64-row stores into a swizzled tile.
      out_smem=plgpu.SMEM((2, tn // acc_n, rows, acc_n), out_gmem.dtype,
                          transforms=() if rows < 128 else swizzled((rows, acc_n),
                                                                    out_gmem.dtype)),
      collective_axes="wg",
  )
  def _scope(allocs, out_smem):
    wg = jax.lax.axis_index("wg")
    row0 = wg * rows

    @plgpu.nd_loop((num_groups, k_dim // tk, n_dim // tn), collective_axes="sm")
    def _unit(info):
      group, start, size, first, ki, ni = _unit_group(info, row_align, order_gmem, starts_gmem,
                                                      sizes_gmem, first_tile_gmem)
      num_tiles = (size + TILE_M - 1) // TILE_M

      def store(sums):
        _store_unit(out_smem.at[wg], sums, out_gmem, group, ki * tk + row0, ni * tn)

      def compute_context(run_pipeline):
        store(run_pipeline(zero_sums(mma)))

      def step(idx, a_smem, b_smem, sa_smem, sb_smem, sums):
        return _mma_step(mma, a_smem.at[pl.ds(row0, rows)], b_smem,
                         sa_smem.at[0, pl.ds(row0, rows)], sb_smem, sums,
                         valid=size - idx[0] * TILE_M)

      @pl.when((num_tiles == 0) & (wg < 2))  # an empty group: zeros, no pipeline
      def _():
        store(zero_sums(mma))

      @pl.when(num_tiles > 0)
      def _():
        pipeline(step, compute_context, num_tiles, ki, ni, start, first)(
            *operands, allocations=allocs)

    plgpu.wait_smem_to_gmem(0, wait_read_only=True)


def group_tiles(group_sizes_G: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Each group's first row and first 128-row tile (`fp8_quant.row_tile_ids`' numbering)."""
  sizes_G = group_sizes_G.astype(jnp.int32)
  tiles_G = (sizes_G + TILE_M - 1) // TILE_M
  return prefix_sum(sizes_G) - sizes_G, prefix_sum(tiles_G) - tiles_G


@functools.partial(jax.jit, static_argnames=("row_align", "out_dtype", "config", "interpret",
                                             "num_sms"))
def tgmm_fp8(a_q_KM: jax.Array, a_scale_KC: jax.Array, b_q_NM: jax.Array, b_scale_NC: jax.Array,
             group_sizes_G: jax.Array, *, row_align: int, out_dtype=jnp.float32,
             config: Fp8WgradConfig | None = None, interpret=None,
             num_sms: int | None = None) -> jax.Array:
  """out[g] = dequant(A)[:, rows of g] @ dequant(B)[:, rows of g]^T, fp32-promoted: [G, K, N].

  Args:
    a_q_KM, a_scale_KC: x^T in E4M3 and its scales per row and per-group 128-row tile of M.
    b_q_NM, b_scale_NC: dy^T likewise, with the same tiles.
    group_sizes_G: rows per group, sorted along M from row 0; non-negative, summing to at most M.
      Groups without rows give zeros.
    row_align: a promise that M and every group's size are multiples of it (a power of two,
      at least `MIN_ROW_ALIGN`; the module doc says why), as `fp8_quant.quantize_rows_transposed`
      takes it. Interpret mode cannot check it: on the GPU a group start off it reads wrong rows.
  """
  (k_dim, num_rows), (n_dim, m_b) = a_q_KM.shape, b_q_NM.shape
  num_tiles = a_scale_KC.shape[1]
  out_dtype = jnp.dtype(out_dtype)
  cfg = (config or default_config(row_align, out_dtype)).fit_smem(out_dtype.itemsize)
  if (not supports(k_dim, n_dim, out_dtype, cfg) or m_b != num_rows
      or b_scale_NC.shape != (n_dim, num_tiles) or a_scale_KC.shape[0] != k_dim
      or a_q_KM.dtype != jnp.float8_e4m3fn or b_q_NM.dtype != jnp.float8_e4m3fn):
    raise ValueError(
        f"tgmm_fp8: no Mosaic GPU kernel for A^T {a_q_KM.shape} {a_q_KM.dtype}, scales "
        f"{a_scale_KC.shape}, B^T {b_q_NM.shape} {b_q_NM.dtype}, scales {b_scale_NC.shape}, out "
        f"{out_dtype}, {cfg}: it needs E4M3 codes with the same M, scales [K, C] and [N, C], K a "
        f"multiple of tile_k, N of tile_n and a bf16 or fp32 output (fp8_tgmm_mgpu.supports).")
  if row_align < MIN_ROW_ALIGN or row_align & (row_align - 1) or num_rows % row_align:
    raise ValueError(
        f"tgmm_fp8: row_align must be a power of two >= {MIN_ROW_ALIGN} that divides M = "
        f"{num_rows}, got {row_align}. Pad every group to a multiple of {MIN_ROW_ALIGN} rows "
        f"(dispatch.FP8_GROUP_ALIGN) or use the dequantising path of "
        f"fp8_gemm.fp8_transposed_grouped_matmul.")
  starts_G, first_tile_G = group_tiles(group_sizes_G)
  kernel = plgpu.kernel(
      functools.partial(_tgmm_fp8_ws_body if cfg.ws else _tgmm_fp8_body, cfg, row_align),
      out_type=jax.ShapeDtypeStruct((group_sizes_G.shape[0], k_dim, n_dim), out_dtype),
      grid=(cfg.ctas_per_sm * (num_sms or device_num_sms()),),
      grid_names=("sm",),
      **(dict(num_threads=3, thread_name="wg") if cfg.ws else {}),
      compiler_params=plgpu.CompilerParams(
          lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
      interpret=interpret,
  )
  # Scales transposed, so that a tile's scales of one K (or N) tile are one contiguous TMA box.
  sizes_G = group_sizes_G.astype(jnp.int32)
  # The order units take their groups in (Fp8WgradConfig.by_size): largest first, ties by index.
  order_G = (jnp.argsort(-sizes_G, stable=True) if cfg.by_size
             else jnp.arange(sizes_G.shape[0])).astype(jnp.int32)
  return kernel(order_G, starts_G, sizes_G, first_tile_G, a_q_KM,
                a_scale_KC.T.astype(jnp.float32), b_q_NM, b_scale_NC.T.astype(jnp.float32))


def self_check(num_rows: int = 131072, num_groups: int = 256, row_align: int = 32,
               shapes: tuple[tuple[int, int], ...] = ((2048, 1024), (512, 2048)),
               configs: tuple[Fp8WgradConfig | None, ...] = (None,),
               out_dtypes=(jnp.float32, jnp.bfloat16), skew: str = "balanced") -> None:
  """Prints the kernel's error against the reference backend and its TFLOP/s at Ling-mini's
  expert wgrad shapes (K, N) for each tiling (None: the default), after the dequantise + bf16
  `tgmm` path on the same operands (GPU only; a kernel failure is printed, and the next one
  still runs if it can). skew: "balanced" routing, or "zipf" (expert i of a random order gets
  a share of rows proportional to 1 / (i + 1): the largest ~16%)."""
  from kernels import fp8_gemm
  from kernels import fp8_quant as fq
  from kernels.grouped_matmul_mgpu import tgmm as tgmm_bf16
  from ling_jax.profiling import time_queued

  rng = np.random.default_rng(0)
  # Balanced routing padded to row_align rows per expert: sizes near M / G, mostly not multiples
  # of 128 (masked last tiles), and a few rows past the groups.
  if skew not in ("balanced", "zipf"):
    raise ValueError(f"self_check: skew {skew!r}; expected 'balanced' or 'zipf'")
  shares = np.full(num_groups, 1.0)
  if skew == "zipf":
    shares = 1 / rng.permutation(np.arange(1, num_groups + 1))
  counts = rng.multinomial(num_rows // row_align - num_groups, shares / shares.sum())
  sizes_G = jnp.asarray(row_align * counts, jnp.int32)
  tile_ids_M, num_tiles = fq.row_tile_ids(num_rows, sizes_G)
  print(f"{jax.devices()[0].device_kind}: M={num_rows}, G={num_groups}, {skew}, "
        f"row_align={row_align}, "
        f"{int(sizes_G.sum())} rows in groups of {int(sizes_G.min())}..{int(sizes_G.max())}, "
        f"{int(np.sum(np.asarray(sizes_G) % TILE_M != 0))} not a multiple of 128")
  for k_dim, n_dim in shapes:
    x = jax.random.normal(jax.random.key(1), (num_rows, k_dim), jnp.bfloat16)
    dy = jax.random.normal(jax.random.key(2), (num_rows, n_dim), jnp.bfloat16) * 1e-3
    operands = (*fq.quantize_rows_transposed(x, tile_ids_M, num_tiles, row_align=row_align),
                *fq.quantize_rows_transposed(dy, tile_ids_M, num_tiles, row_align=row_align),
                tile_ids_M, sizes_G)
    with jax.default_matmul_precision("highest"):  # no TF32 in the oracle
      ref = fp8_gemm.fp8_transposed_grouped_matmul(*operands, backend="reference")
    flops = 2.0 * int(sizes_G.sum()) * k_dim * n_dim
    # The bf16 model's weight gradient on the unquantised operands: what FP8 has to beat.
    bf16_wgrad = jax.jit(lambda x, dy: tgmm_bf16(x, dy, sizes_G, out_dtype=jnp.float32))
    seconds = time_queued(bf16_wgrad, x, dy)
    print(f"K={k_dim:5d} N={n_dim:5d} bf16 tgmm, bf16 operands, fp32 out {seconds * 1e3:7.3f} ms "
          f"{flops / seconds / 1e12:6.1f} TFLOP/s")
    for out_dtype in out_dtypes:
      def kernel(a_q, sa, b_q, sb, tile_ids, sizes, out_dtype=out_dtype, config=None):
        del tile_ids  # the kernel numbers the tiles from the group sizes
        return tgmm_fp8(a_q, sa, b_q, sb, sizes, row_align=row_align, out_dtype=out_dtype,
                        config=config)
      current = functools.partial(fp8_gemm.fp8_transposed_grouped_matmul, out_dtype=out_dtype,
                                  backend="pallas_mosaic_gpu", row_align=1)
      # row_align 1: the dequantise + bf16 path, whatever _WGRAD_KERNEL_ON_GPU says.
      paths = {"dequant+bf16": jax.jit(current)}
      for cfg in configs:
        paths[f"fp8 {_spec(cfg or default_config(row_align, out_dtype))}"] = jax.jit(
            functools.partial(kernel, config=cfg))
      for name, fn in paths.items():
        try:
          out = fn(*operands)
          err = float(jnp.max(jnp.abs(out.astype(jnp.float32) - ref)) / jnp.max(jnp.abs(ref)))
          seconds = time_queued(fn, *operands)
        except Exception as e:  # noqa: BLE001 (print it and go on to the next shape)
          print(f"K={k_dim:5d} N={n_dim:5d} {jnp.dtype(out_dtype).name:8s} {name:13s} FAILED: "
                f"{type(e).__name__}: {str(e)[:300]}")
          continue
        print(f"K={k_dim:5d} N={n_dim:5d} {jnp.dtype(out_dtype).name:8s} {name:13s} "
              f"max err / max |ref| {err:.2e}  {seconds * 1e3:7.3f} ms  "
              f"{flops / seconds / 1e12:6.1f} TFLOP/s")


def _spec(cfg: Fp8WgradConfig) -> str:
  return (f"{cfg.tile_k}:{cfg.tile_n}:{cfg.stages}:{cfg.acc_cols}"
          + (":overlap" if cfg.overlap else "") + (":ws" if cfg.ws else "")
          + ("" if cfg.by_size else ":unsorted")
          + (f":x{cfg.ctas_per_sm}" if cfg.ctas_per_sm > 1 else ""))


if __name__ == "__main__":
  # python -m kernels.fp8_tgmm_mgpu [ROW_ALIGN ...] [--configs=SPEC,SPEC] [--rows=M,M]
  #   [--fp32_only] [--skews=balanced,zipf]
  #   (M: routed rows; 397056 is a Ling-mini MoE layer at 12 x 4096 tokens)
  import sys
  args = sys.argv[1:]
  option = lambda name: [a.split("=", 1)[1].split(",") for a in args if a.startswith(name)]
  specs, rows, skews = option("--configs="), option("--rows="), option("--skews=")
  configs = tuple(Fp8WgradConfig.parse(s) for s in specs[0]) if specs else (None,)
  dtypes = (jnp.float32,) if "--fp32_only" in args else (jnp.float32, jnp.bfloat16)
  for num_rows in map(int, rows[0] if rows else ["131072"]):
    for align in map(int, [a for a in args if not a.startswith("--")] or ["32"]):
      for skew in skews[0] if skews else ["balanced"]:
        self_check(num_rows=num_rows, row_align=align, configs=configs, out_dtypes=dtypes,
                   skew=skew)
