"""Grouped matmul on Hopper GPUs through Pallas Mosaic GPU (wgmma, TMA, warp specialisation).

The forward op `gmm` computes out[rows of g] = lhs[rows of g] @ rhs[g] (or @ rhs[g].T for the
dgrad); `tgmm`, the weight gradient, computes out[g] = lhs[rows of g].T @ rhs[rows of g]. Both are
registered as the "pallas_mosaic_gpu" backend of kernels/grouped_matmul.py, which ties them
together with custom VJPs and falls back to its reference for operands these kernels do not cover.

How ragged groups are handled: JAX computes a tile schedule before the kernel starts. The rows are
cut into tiles of R; every (row tile, group) pair that holds rows becomes one work item, in row
order, and rows past the last group become items of an extra "tail" group whose output is zero.
For each item the schedule records the group, the first row the tile reads (the last tile is
shifted back so that reads stay inside the M rows, with no padding of the operands), and which
rows of the tile the item owns. The kernel is persistent: each SM walks the (item, column tile)
units with stride equal to the SM count. Each unit multiplies its R rows by the group's matrix
and stores only the rows it owns, with a ladder of power-of-two TMA stores (TMA boxes are
static, the row count is not), so neighbouring groups that share a tile never overwrite each
other.

Kernel bodies that share the schedule and the store:
  - "ws": warp-specialised: a memory warpgroup issues TMA loads into a ring of `stages` buffers,
    two compute warpgroups each own half of the CTA's columns and run wgmma.
  - "ws_chain": the same, with one pipeline chained across all of an SM's units (START, STEADY,
    STOP), so that loads for the next unit overlap this unit's epilogue. Needs K / tile_k to be
    a multiple of `stages`.
  - "pipe": one warpgroup, `plgpu.emit_pipeline` (simpler; kept as a fallback and a baseline).

The weight gradient `tgmm` loops, per (group, K tile, N tile) unit, over the group's rows in
chunks; chunks at the group's edges zero the rows of other groups in SMEM before the wgmma.

Shape key:
  M: rows, sorted by group
  K: contraction dim
  N: output dim
  G: groups (experts); the schedule adds one tail group, index G
  I: work items of the schedule (static upper bound cdiv(M, R) + G)
  R: rows of one tile (tile_m)
"""

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu


@dataclasses.dataclass(frozen=True)
class TileConfig:
  """Static tiling of one kernel launch."""

  tile_m: int = 128  # rows per tile (R)
  tile_n: int = 128  # output columns per compute warpgroup
  tile_k: int = 64  # contraction step per pipeline stage
  stages: int = 4  # pipeline depth (buffers in flight)
  body: str = "ws"  # "ws" (warp-specialised, 2 compute warpgroups), "ws_chain" or "pipe"

  @property
  def cta_n(self) -> int:
    return self.tile_n * (1 if self.body == "pipe" else 2)

  def smem_bytes(self, in_itemsize: int, out_itemsize: int) -> int:
    ring = self.stages * (self.tile_m + self.cta_n) * self.tile_k * in_itemsize
    return ring + self.tile_m * self.cta_n * out_itemsize

  def fit_smem(self, in_itemsize: int, out_itemsize: int) -> "TileConfig":
    """Drops pipeline stages (not below 2), then halves tile_n, until shared memory fits."""
    cfg = self
    while cfg.smem_bytes(in_itemsize, out_itemsize) > _SMEM_BUDGET:
      if cfg.stages > 2:
        cfg = dataclasses.replace(cfg, stages=cfg.stages - 1)
      elif cfg.tile_n > 64:
        cfg = dataclasses.replace(cfg, tile_n=cfg.tile_n // 2, stages=self.stages)
      else:
        break
    return cfg


# Chosen from measurements on an H200 on 2026-11-29 (experiments/bench_kernels.py; the figures are
# in BENCHMARKS_kernels.md). Differences under ~5% between tilings were noise there.
# Key: (K, N, transpose_rhs, dtype name) of the forward op as the kernel sees it. "ws" tiles of
# 128x(2x128) hold 3 stages after `fit_smem`.
TILE_CONFIGS: dict[tuple[int, int, bool, str], TileConfig] = {
    # Ling-mini up-projection (hidden 2048 -> gate+up 1024) and its dgrad.
    (2048, 1024, False, "bfloat16"): TileConfig(128, 128, 64, 4, "ws"),
    (1024, 2048, True, "bfloat16"): TileConfig(128, 128, 64, 4, "ws"),
    # Ling-mini down-projection (expert width 512 -> hidden 2048) and its dgrad.
    (512, 2048, False, "bfloat16"): TileConfig(128, 64, 64, 4, "ws_chain"),
    (2048, 512, True, "bfloat16"): TileConfig(128, 128, 64, 4, "ws"),
}
DEFAULT_TILE_CONFIG = TileConfig()


def tile_config(k_dim: int, n_dim: int, transpose_rhs: bool, dtype) -> TileConfig:
  """Returns the tuned tiling for a problem shape, or the default one."""
  return TILE_CONFIGS.get(
      (k_dim, n_dim, bool(transpose_rhs), jnp.dtype(dtype).name), DEFAULT_TILE_CONFIG)


class TileSchedule(NamedTuple):
  """Per-item metadata of the kernel's work list; items at and past num_items are unused."""

  group_I: jax.Array  # group of the item; G marks the zero tail
  read_start_I: jax.Array  # first row of the R rows the item reads
  own_offset_I: jax.Array  # first owned row, relative to read_start
  own_rows_I: jax.Array  # owned rows (0 for unused items)
  num_items: jax.Array  # [1] items in use


# Row offsets of lhs tiles are multiples of this, which the swizzled SMEM tiling needs.
_ROW_ALIGN = 8
# Shared memory one CTA may use on Hopper is 227 KiB; keep 4 KiB for barriers and the like.
_SMEM_BUDGET = 232448 - 4096


def _cdiv(a: int, b: int) -> int:
  return -(-a // b)


def make_tile_schedule(group_sizes_G: jax.Array, num_rows: int, tile_m: int) -> TileSchedule:
  """Lists the (row tile, group) pairs that hold rows, with the zero tail as group G.

  Needs num_rows >= tile_m (the caller pads tiny inputs) and group sizes that sum to at most
  num_rows.
  """
  if num_rows < tile_m:
    raise ValueError(f"make_tile_schedule: num_rows={num_rows} < tile_m={tile_m}; pad first.")
  num_groups = group_sizes_G.shape[0]
  sizes_G = group_sizes_G.astype(jnp.int32)
  tail = num_rows - jnp.sum(sizes_G)
  sizes_H = jnp.concatenate([sizes_G, tail[None]])  # H = G + 1 groups, tail last
  ends_H = jnp.cumsum(sizes_H)
  starts_H = ends_H - sizes_H
  first_tile_H = starts_H // tile_m
  last_tile_H = (ends_H - 1) // tile_m
  tiles_H = jnp.where(sizes_H > 0, last_tile_H - first_tile_H + 1, 0)
  item_ends_H = jnp.cumsum(tiles_H)
  item_starts_H = item_ends_H - tiles_H
  max_items = _cdiv(num_rows, tile_m) + num_groups
  items_I = jnp.arange(max_items, dtype=jnp.int32)
  group_I = jnp.searchsorted(item_ends_H, items_I, side="right").astype(jnp.int32)
  group_I = jnp.minimum(group_I, num_groups)
  tile_I = first_tile_H[group_I] + items_I - item_starts_H[group_I]
  tile_start_I = tile_I * tile_m
  read_start_I = jnp.minimum(tile_start_I, num_rows - tile_m)
  lo_I = jnp.maximum(starts_H[group_I], tile_start_I)
  hi_I = jnp.minimum(ends_H[group_I], tile_start_I + tile_m)
  num_items = item_ends_H[-1]
  used_I = items_I < num_items
  own_rows_I = jnp.where(used_I, jnp.maximum(hi_I - lo_I, 0), 0)
  own_offset_I = jnp.where(used_I, lo_I - read_start_I, 0)
  read_start_I = jnp.where(used_I, read_start_I, 0)
  return TileSchedule(group_I, read_start_I, own_offset_I, own_rows_I,
                      num_items.astype(jnp.int32)[None])


def _swizzled(block_shape, dtype, tile_rows: int = 8):
  """Tiling + swizzle transforms for an SMEM block whose minor dim is block_shape[-1].

  Operand blocks use 8-row tiles (what wgmma reads). The output block uses 1-row tiles: still
  swizzled (conflict-free writes from the accumulator), yet sliceable at any row for the
  ragged TMA stores.
  """
  swizzle = plgpu.find_swizzle(block_shape[-1] * jnp.dtype(dtype).itemsize * 8)
  return (plgpu.TilingTransform((tile_rows, swizzle // jnp.dtype(dtype).itemsize)),
          plgpu.SwizzleTransform(swizzle))


def _store_owned_rows(out_smem, out_gmem, read_start, own_offset, own_rows, col_start, tile_m):
  """Copies rows [own_offset, own_offset + own_rows) of the tile to HBM, in power-of-two pieces."""
  offset = own_offset
  piece = tile_m
  while piece >= 1:
    @pl.when((own_rows & piece) != 0)
    def _(offset=offset, piece=piece):  # traced right here; the defaults only satisfy linters
      plgpu.copy_smem_to_gmem(
          out_smem.at[pl.ds(offset, piece)],
          out_gmem.at[pl.ds(read_start + offset, piece), pl.ds(col_start, out_smem.shape[1])],
          commit_group=False)
    offset = offset + (own_rows & piece)
    piece //= 2
  plgpu.commit_smem_to_gmem_group()


def _pipe_body(cfg: TileConfig, transpose_rhs: bool, num_groups: int,
               count_gmem, group_gmem, start_gmem, offset_gmem, rows_gmem,
               lhs_gmem, rhs_gmem, out_gmem):
  """One warpgroup per SM: emit_pipeline over K for each (item, column tile) unit."""
  k_dim = lhs_gmem.shape[1]
  n_tiles = out_gmem.shape[1] // cfg.tile_n
  tm, tn, tk = cfg.tile_m, cfg.tile_n, cfg.tile_k
  dtype = lhs_gmem.dtype
  rhs_block = (tn, tk) if transpose_rhs else (tk, tn)

  @plgpu.nd_loop((count_gmem[0] * n_tiles,), collective_axes="sm")
  def _unit(info):
    unit = info.index[0]
    item, ni = unit // n_tiles, unit % n_tiles
    group = group_gmem[item]
    start, offset, rows = start_gmem[item], offset_gmem[item], rows_gmem[item]
    start = pl.multiple_of(start, _ROW_ALIGN)
    is_tail = group == num_groups

    rhs_index = (lambda k: (ni, k)) if transpose_rhs else (lambda k: (k, ni))

    def acc_scope(acc_ref):
      @pl.when(jnp.logical_not(is_tail))
      def _():
        def step(_, lhs_smem, rhs_smem):
          plgpu.wgmma(acc_ref, lhs_smem, rhs_smem.transpose((1, 0)) if transpose_rhs else rhs_smem)
          plgpu.wgmma_wait(1)

        plgpu.emit_pipeline(
            step,
            grid=(k_dim // tk,),
            in_specs=[
                plgpu.BlockSpec((tm, tk), lambda k: (0, k), transforms=_swizzled((tm, tk), dtype),
                                delay_release=1),
                plgpu.BlockSpec(rhs_block, rhs_index, transforms=_swizzled(rhs_block, dtype),
                                delay_release=1),
            ],
            max_concurrent_steps=cfg.stages,
        )(lhs_gmem.at[pl.ds(start, tm)], rhs_gmem.at[jnp.minimum(group, num_groups - 1)])
      return acc_ref[...]

    # The accumulator starts at zero, so a tail item stores zeros.
    acc = pl.run_scoped(acc_scope, plgpu.ACC((tm, tn), jnp.float32))

    @functools.partial(pl.run_scoped, out_smem=plgpu.SMEM(
        (tm, tn), out_gmem.dtype, transforms=_swizzled((tm, tn), out_gmem.dtype, tile_rows=1)))
    def _(out_smem):
      out_smem[...] = acc.astype(out_smem.dtype)
      plgpu.commit_smem()
      _store_owned_rows(out_smem, out_gmem, start, offset, rows, ni * tn, tm)
      plgpu.wait_smem_to_gmem(0, wait_read_only=True)


def _ws_body(cfg: TileConfig, transpose_rhs: bool, num_groups: int,
             count_gmem, group_gmem, start_gmem, offset_gmem, rows_gmem,
             lhs_gmem, rhs_gmem, out_gmem):
  """A memory warpgroup feeds two compute warpgroups, each owning tile_n of the CTA's columns."""
  k_dim = lhs_gmem.shape[1]
  tm, tn, tk = cfg.tile_m, cfg.tile_n, cfg.tile_k
  cta_n = cfg.cta_n
  n_tiles = out_gmem.shape[1] // cta_n
  dtype = lhs_gmem.dtype
  rhs_block = (cta_n, tk) if transpose_rhs else (tk, cta_n)

  chained = cfg.body == "ws_chain"

  def pipeline(mma_step, compute_context, rhs_col, state=None):
    rhs_index = (lambda k: (rhs_col, k)) if transpose_rhs else (lambda k: (k, rhs_col))
    return plgpu.emit_pipeline_warp_specialized(
        mma_step,
        grid=(k_dim // tk,),
        memory_registers=40,
        in_specs=[
            plgpu.BlockSpec((tm, tk), lambda k: (0, k), transforms=_swizzled((tm, tk), dtype),
                            memory_space=plgpu.SMEM),
            plgpu.BlockSpec(rhs_block, rhs_index, transforms=_swizzled(rhs_block, dtype),
                            memory_space=plgpu.SMEM),
        ],
        wg_axis="wg",
        num_compute_wgs=2,
        max_concurrent_steps=cfg.stages,
        compute_context=compute_context,
        pipeline_state=state,
    )

  ignore = lambda *_, **__: None
  first_state = plgpu.PipelinePipeline.START if chained else None

  @functools.partial(
      pl.run_scoped,
      allocs=pipeline(ignore, ignore, 0, first_state).get_allocations(
          lhs_gmem.at[pl.ds(0, tm)], rhs_gmem.at[0]),
      out_smem=plgpu.SMEM((2, tm, tn), out_gmem.dtype,
                          transforms=_swizzled((tm, tn), out_gmem.dtype, tile_rows=1)),
      collective_axes="wg",
  )
  def _scope(allocs, out_smem):
    wg = jax.lax.axis_index("wg")

    @plgpu.nd_loop((count_gmem[0] * n_tiles,), collective_axes="sm")
    def _unit(info):
      unit = info.index[0]
      item, ni = unit // n_tiles, unit % n_tiles
      group = group_gmem[item]
      start, offset, rows = start_gmem[item], offset_gmem[item], rows_gmem[item]
      start = pl.multiple_of(start, _ROW_ALIGN)
      is_tail = group == num_groups
      wg_cols = pl.ds(wg * tn, tn)

      def store(acc):
        # The previous unit's stores must have read out_smem before it is overwritten.
        plgpu.wait_smem_to_gmem(0, wait_read_only=True)
        out_smem[wg] = acc.astype(out_smem.dtype)
        plgpu.commit_smem()
        _store_owned_rows(out_smem.at[wg], out_gmem, start, offset, rows, ni * cta_n + wg * tn, tm)

      def compute_context(run_pipeline):
        @functools.partial(pl.run_scoped, acc_ref=plgpu.ACC((tm, tn), jnp.float32))
        def _(acc_ref):
          run_pipeline(acc_ref)
          if chained:  # tail units ran the pipeline too (see below) and store zeros
            @pl.when(is_tail)
            def _():
              store(jnp.zeros((tm, tn), jnp.float32))

            @pl.when(jnp.logical_not(is_tail))
            def _():
              store(acc_ref[...])
          else:
            store(acc_ref[...])

      def mma_step(_, lhs_smem, rhs_smem, acc_ref):
        rhs = rhs_smem.at[wg_cols].transpose((1, 0)) if transpose_rhs else rhs_smem.at[:, wg_cols]
        plgpu.wgmma(acc_ref, lhs_smem, rhs)
        plgpu.wgmma_wait(0)
        return acc_ref

      operands = (lhs_gmem.at[pl.ds(start, tm)], rhs_gmem.at[jnp.minimum(group, num_groups - 1)])
      if chained:
        # One pipeline runs across all of this SM's units: the memory warpgroup starts loading
        # the next unit while the compute warpgroups finish and store this one. Every unit runs
        # it, tail units too, since a skipped call would break the chain.
        last = info.num_local_steps - 1
        state = jnp.where(
            info.local_index == 0, int(plgpu.PipelinePipeline.START),
            jnp.where(info.local_index == last, int(plgpu.PipelinePipeline.STOP),
                      int(plgpu.PipelinePipeline.STEADY)))
        pipeline(mma_step, compute_context, ni, state)(*operands, allocations=allocs)
      else:
        @pl.when(jnp.logical_not(is_tail))
        def _():
          pipeline(mma_step, compute_context, ni)(*operands, allocations=allocs)

        @pl.when(is_tail & (wg < 2))
        def _():
          store(jnp.zeros((tm, tn), jnp.float32))

  plgpu.wait_smem_to_gmem(0, wait_read_only=True)


def supports(lhs_MK: jax.Array, rhs_GKN: jax.Array, transpose_rhs: bool, out_dtype,
             cfg: TileConfig | None = None) -> bool:
  """Whether the kernel covers these operands (else the caller falls back to the reference)."""
  k_dim = lhs_MK.shape[1]
  n_dim = rhs_GKN.shape[1] if transpose_rhs else rhs_GKN.shape[2]
  cfg = cfg or tile_config(k_dim, n_dim, transpose_rhs, lhs_MK.dtype)
  out_itemsize = jnp.dtype(out_dtype).itemsize
  fitted = cfg.fit_smem(lhs_MK.dtype.itemsize, out_itemsize)
  fits = fitted.smem_bytes(lhs_MK.dtype.itemsize, out_itemsize) <= _SMEM_BUDGET
  if cfg.body == "ws_chain":  # chained pipelines need whole rounds of the buffer ring
    fits = fits and k_dim % cfg.tile_k == 0 and (k_dim // cfg.tile_k) % fitted.stages == 0
  return (fits and lhs_MK.dtype == rhs_GKN.dtype
          and lhs_MK.dtype in (jnp.bfloat16, jnp.float16)
          and jnp.dtype(out_dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16),
                                       jnp.dtype(jnp.float32))
          and k_dim % cfg.tile_k == 0 and n_dim % cfg.cta_n == 0)


def _num_sms() -> int:
  device = jax.devices()[0]
  return getattr(device, "core_count", None) or 132


def gmm(lhs_MK: jax.Array, rhs_GKN: jax.Array, group_sizes_G: jax.Array, *,
        out_dtype=None, transpose_rhs: bool = False, config: TileConfig | None = None,
        interpret=None, num_sms: int | None = None) -> jax.Array:
  """out[rows of g] = lhs[rows of g] @ rhs[g] (rhs[g].T if transpose_rhs); tail rows are zero.

  group_sizes must be non-negative and sum to at most M (`grouped_matmul` clips them so).
  """
  num_rows, k_dim = lhs_MK.shape
  num_groups = rhs_GKN.shape[0]
  n_dim = rhs_GKN.shape[1] if transpose_rhs else rhs_GKN.shape[2]
  out_dtype = jnp.dtype(out_dtype or lhs_MK.dtype)
  cfg = config or tile_config(k_dim, n_dim, transpose_rhs, lhs_MK.dtype)
  cfg = cfg.fit_smem(lhs_MK.dtype.itemsize, out_dtype.itemsize)
  if not supports(lhs_MK, rhs_GKN, transpose_rhs, out_dtype, cfg):
    raise ValueError(f"gmm: no Mosaic GPU kernel for lhs {lhs_MK.shape} {lhs_MK.dtype}, rhs "
                     f"{rhs_GKN.shape} {rhs_GKN.dtype}, transpose_rhs={transpose_rhs}, {cfg}.")
  # Tiles start on multiples of 8 rows (the SMEM tiling); the schedule's shifted last tile does
  # too when M is a multiple of 8. Otherwise, or with fewer rows than a tile, pad (a copy of lhs).
  padded_rows = max(_cdiv(num_rows, _ROW_ALIGN) * _ROW_ALIGN, cfg.tile_m)
  if padded_rows != num_rows:
    lhs_MK = jnp.pad(lhs_MK, ((0, padded_rows - num_rows), (0, 0)))
  schedule = make_tile_schedule(group_sizes_G, padded_rows, cfg.tile_m)
  body = _pipe_body if cfg.body == "pipe" else _ws_body
  kernel = plgpu.kernel(
      functools.partial(body, cfg, transpose_rhs, num_groups),
      out_type=jax.ShapeDtypeStruct((padded_rows, n_dim), out_dtype),
      grid=(num_sms or _num_sms(),),
      grid_names=("sm",),
      num_threads=None if cfg.body == "pipe" else 3,
      thread_name=None if cfg.body == "pipe" else "wg",
      compiler_params=plgpu.CompilerParams(
          lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
      interpret=interpret,
  )
  out_MN = kernel(schedule.num_items, schedule.group_I, schedule.read_start_I,
                  schedule.own_offset_I, schedule.own_rows_I, lhs_MK, rhs_GKN)
  return out_MN[:num_rows] if padded_rows != num_rows else out_MN


@dataclasses.dataclass(frozen=True)
class WgradConfig:
  """Static tiling of the weight-gradient kernel."""

  tile_k: int = 128  # rows of the [K, N] output tile
  tile_n: int = 128  # columns of the output tile
  chunk: int = 64  # rows of M contracted per pipeline step
  stages: int = 4


WGRAD_CONFIGS: dict[tuple[int, int, str], WgradConfig] = {}
DEFAULT_WGRAD_CONFIG = WgradConfig()


def wgrad_config(k_dim: int, n_dim: int, dtype) -> WgradConfig:
  return WGRAD_CONFIGS.get((k_dim, n_dim, jnp.dtype(dtype).name), DEFAULT_WGRAD_CONFIG)


def supports_tgmm(lhs_MK: jax.Array, rhs_MN: jax.Array, out_dtype,
                  cfg: WgradConfig | None = None) -> bool:
  """Whether the weight-gradient kernel covers these operands."""
  k_dim, n_dim = lhs_MK.shape[1], rhs_MN.shape[1]
  cfg = cfg or wgrad_config(k_dim, n_dim, lhs_MK.dtype)
  return (lhs_MK.dtype == rhs_MN.dtype and lhs_MK.dtype in (jnp.bfloat16, jnp.float16)
          and jnp.dtype(out_dtype).itemsize <= 4
          and k_dim % cfg.tile_k == 0 and n_dim % cfg.tile_n == 0)


def _tgmm_body(cfg: WgradConfig, starts_gmem, ends_gmem, lhs_gmem, rhs_gmem, out_gmem):
  """One warpgroup per SM; each (group, K tile, N tile) unit contracts its group's row chunks."""
  num_groups, k_dim, n_dim = out_gmem.shape
  tk, tn, tr = cfg.tile_k, cfg.tile_n, cfg.chunk
  k_tiles, n_tiles = k_dim // tk, n_dim // tn
  dtype = lhs_gmem.dtype

  @plgpu.nd_loop((num_groups, k_tiles, n_tiles), collective_axes="sm")
  def _unit(info):
    group, ki, ni = info.index
    start, end = starts_gmem[group], ends_gmem[group]
    first_chunk = start // tr
    num_chunks = jnp.where(end > start, (end + tr - 1) // tr - first_chunk, 0)
    base = pl.multiple_of(first_chunk * tr, tr)

    def acc_scope(acc_ref):
      def step(idx, lhs_smem, rhs_smem):
        (c,) = idx
        row0 = base + c * tr

        # Chunks at the group's edges hold rows of other groups: zero those rows of lhs.
        @pl.when((row0 < start) | (row0 + tr > end))
        def _():
          rows = plgpu.broadcasted_iota(jnp.int32, (tr, tk), 0, layout=plgpu.Layout.WGMMA)
          rows = rows + row0
          keep = (rows >= start) & (rows < end)
          lhs_smem[...] = jnp.where(keep, lhs_smem[...], jnp.zeros((), dtype))
          plgpu.commit_smem()

        plgpu.wgmma(acc_ref, lhs_smem.transpose((1, 0)), rhs_smem)
        plgpu.wgmma_wait(1)

      plgpu.emit_pipeline(
          step,
          grid=(num_chunks,),
          in_specs=[
              plgpu.BlockSpec((tr, tk), lambda c: (c, ki), transforms=_swizzled((tr, tk), dtype),
                              delay_release=1),
              plgpu.BlockSpec((tr, tn), lambda c: (c, ni), transforms=_swizzled((tr, tn), dtype),
                              delay_release=1),
          ],
          max_concurrent_steps=cfg.stages,
      # The views run past M for late groups; the pipeline reads only its num_chunks chunks.
      )(lhs_gmem.at[pl.ds(base, lhs_gmem.shape[0])], rhs_gmem.at[pl.ds(base, rhs_gmem.shape[0])])
      return acc_ref[...]

    acc = pl.run_scoped(acc_scope, plgpu.ACC((tk, tn), jnp.float32))

    @functools.partial(pl.run_scoped, out_smem=plgpu.SMEM(
        (tk, tn), out_gmem.dtype, transforms=_swizzled((tk, tn), out_gmem.dtype)))
    def _(out_smem):
      out_smem[...] = acc.astype(out_smem.dtype)
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(
          out_smem, out_gmem.at[group, pl.ds(ki * tk, tk), pl.ds(ni * tn, tn)])
      plgpu.wait_smem_to_gmem(0, wait_read_only=True)


def tgmm(lhs_MK: jax.Array, rhs_MN: jax.Array, group_sizes_G: jax.Array, *, out_dtype=None,
         config: WgradConfig | None = None, interpret=None, num_sms: int | None = None):
  """out[g] = lhs[rows of g].T @ rhs[rows of g]; groups without rows give zeros.

  group_sizes must be non-negative and sum to at most M.
  """
  num_rows, k_dim = lhs_MK.shape
  n_dim = rhs_MN.shape[1]
  num_groups = group_sizes_G.shape[0]
  out_dtype = jnp.dtype(out_dtype or lhs_MK.dtype)
  cfg = config or wgrad_config(k_dim, n_dim, lhs_MK.dtype)
  if not supports_tgmm(lhs_MK, rhs_MN, out_dtype, cfg):
    raise ValueError(f"tgmm: no Mosaic GPU kernel for lhs {lhs_MK.shape} {lhs_MK.dtype}, rhs "
                     f"{rhs_MN.shape} {rhs_MN.dtype}, {cfg}.")
  # Chunks are read whole from chunk-aligned rows: pad M to a multiple of the chunk (a copy, only
  # when M is not one already), so that every chunk read stays inside the operands.
  padded_rows = _cdiv(num_rows, cfg.chunk) * cfg.chunk
  if padded_rows != num_rows:
    lhs_MK = jnp.pad(lhs_MK, ((0, padded_rows - num_rows), (0, 0)))
    rhs_MN = jnp.pad(rhs_MN, ((0, padded_rows - num_rows), (0, 0)))
  ends_G = jnp.cumsum(group_sizes_G.astype(jnp.int32))
  starts_G = ends_G - group_sizes_G.astype(jnp.int32)
  kernel = plgpu.kernel(
      functools.partial(_tgmm_body, cfg),
      out_type=jax.ShapeDtypeStruct((num_groups, k_dim, n_dim), out_dtype),
      grid=(num_sms or _num_sms(),),
      grid_names=("sm",),
      compiler_params=plgpu.CompilerParams(
          lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
      interpret=interpret,
  )
  return kernel(starts_G, ends_G, lhs_MK, rhs_MN)


# Interpret mode (CPU tests of whole models): the smallest tiles the bodies allow, since the
# interpreter's cost grows with the tile count times the tile size.

def interpret_tile_config(k_dim: int, n_dim: int) -> TileConfig | None:
  """Returns a small tiling that covers (K, N) for interpret mode, or None if none does.

  Prefers the warp-specialised body (what runs on Hopper); falls back to "pipe" when N is too
  narrow for two compute warpgroups.
  """
  for tile_k in (64, 32, 16):
    if k_dim % tile_k:
      continue
    for body, tile_n in (("ws", 64), ("ws", 32), ("pipe", 64), ("pipe", 32)):
      cfg = TileConfig(tile_m=64, tile_n=tile_n, tile_k=tile_k, stages=2, body=body)
      if n_dim % cfg.cta_n == 0:
        return cfg
  return None


def interpret_wgrad_config(k_dim: int, n_dim: int) -> WgradConfig | None:
  """Returns a small weight-gradient tiling that covers (K, N) for interpret mode, or None."""
  for tile_k in (64, 32):
    for tile_n in (64, 32):
      if k_dim % tile_k == 0 and n_dim % tile_n == 0:
        return WgradConfig(tile_k=tile_k, tile_n=tile_n, chunk=64, stages=2)
  return None
