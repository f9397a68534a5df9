"""Grouped matmul on Hopper GPUs through Pallas Mosaic GPU (wgmma, TMA, warp specialisation).

The forward op `gmm` computes out[rows of g] = lhs[rows of g] @ rhs[g] (or @ rhs[g].T for the
dgrad); `tgmm`, the weight gradient, computes out[g] = lhs[rows of g].T @ rhs[rows of g]. Both are
registered as the "pallas_mosaic_gpu" backend of kernels/grouped_matmul.py, which ties them
together with custom VJPs and falls back to its reference for operands these kernels do not cover.
`gmm(..., swiglu=True)` fuses the SwiGLU of a gate/up projection into the epilogue: rhs holds
gate columns [0, F) and up columns [F, 2F), each CTA loads the matching blocks of both halves, and
the output is silu(lhs @ gate) * (lhs @ up), optionally with the pre-activation as a second output
(what the backward needs).

How ragged groups are handled: JAX computes a tile schedule before the kernel starts. Each
group's rows are cut into tiles of R starting at the group's first row (rounded down to 8, which
the swizzled SMEM tiling needs), so a group of s rows takes cdiv(s, R) tiles (one more only when
its start is off the 8-row grid) instead of also paying for the tiles it shares with its
neighbours. Rows past the last group form an extra "tail" group whose output is zero. For each
item the schedule records the group, the first row the tile reads (tiles near the end are shifted
back so that reads stay inside the M rows, with no padding of the operands), and which rows of the
tile the item owns. The kernel is persistent: each SM walks the (item, column tile) units with
stride equal to the SM count, items in the schedule's order: small groups' items spread evenly
among the large groups' (see `make_tile_schedule`). Each unit multiplies its R rows by the
group's matrix and stores only the rows it owns, with a ladder of power-of-two TMA stores (TMA
boxes are static, the row count is not), so items that read each other's rows never overwrite
them.

Kernel bodies that share the schedule and the store:
  - "ws": warp-specialised: a memory warpgroup issues TMA loads into a ring of `stages` buffers,
    two compute warpgroups run wgmma. With split "n" each owns half of the CTA's columns; with
    split "m" each owns half of its rows, and a warpgroup whose half holds no rows of the item
    (a small group's last tile, the zero tail) skips its wgmmas.
  - "ws_chain": the same, with one pipeline chained across all of an SM's units (START, STEADY,
    STOP), so that loads for the next unit overlap this unit's epilogue. Needs K / tile_k to be
    a multiple of `stages`.
  - "pp" (ping-pong): each compute warpgroup owns whole units, alternating, with a tile_m x
    tile_n accumulator of its own, so that one warpgroup's epilogue runs while the other's
    wgmmas keep the tensor cores busy. The memory warpgroup loads every unit's K steps, in unit
    order, into one ring shared by both; each warpgroup has its own "loaded" barriers (it waits
    on every phase of them, which is what Pallas's phase tracking needs) and arrives on a shared
    "consumed" barrier one step late, after the wgmma that read the slot has finished.
    With `resident_lhs` (spec token "a") each SM takes whole items and keeps their lhs rows,
    all of K, in shared memory, so that only rhs streams (small K only; it lost at K=512).
    With `ordered` (spec token "o") the main loops take strict turns, as in CUTLASS's ping-pong:
    a warpgroup issues its unit's first wgmma only once the other has issued the last of the
    unit before, so that the tensor cores run one main loop at a time and each epilogue has the
    other warpgroup's whole main loop to hide behind.
    With `multicast_lhs` (spec token "c") the SMs pair up in 2-CTA clusters that take column
    tiles 2c and 2c + 1 of the same item at the same time: each CTA loads half of every lhs
    step and TMA multicasts it to both, so that lhs crosses from L2 once per pair. A slot is
    reloaded only when both CTAs have released it (a cluster-wide "consumed" barrier).
  - "pipe": one warpgroup, `plgpu.emit_pipeline` (simpler; kept as a fallback and a baseline).
The epilogue of the "ws" bodies stores in slabs of `epi_n` columns through two SMEM slots: a
slab's TMA store runs while the next slab is written, and the last ones while the next unit's
main loop runs. "pp" uses one slot per warpgroup unless `double_staging` (spec token "d") asks
for two; its slabs may also be cut along rows (`epi_m`, token "r<rows>"), so that two slots of
64 x 64 fit beside a 6-stage ring. Slabs narrower than the tile leave shared memory for a deeper
ring.

The weight gradient `tgmm` loops, per (group, K tile, N tile) unit, over the group's rows in
chunks; chunks at the group's edges zero the rows of other groups in SMEM before the wgmma.

Shape key:
  M: rows, sorted by group
  K: contraction dim
  N: output dim
  F: SwiGLU width (N = 2F columns of rhs, F of output)
  G: groups (experts); the schedule adds one tail group, index G
  H: G + 1 groups, the tail included
  I: work items of the schedule (static upper bound, see `max_schedule_items`)
  R: rows of one tile (tile_m)
"""

import dataclasses
import functools
from collections.abc import Callable
from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from kernels.grouped_matmul import prefix_sum


def shrink_to_fit(cfg: Any, smem_bytes: Callable[[Any], int], budget: int) -> Any:
  """Returns `cfg` (a tiling dataclass with `stages` and `tile_n`) with pipeline stages dropped
  (not below 2), then tile_n halved (not below 64, stages restored), until `smem_bytes` of it
  fits `budget`; the smallest such tiling if none fits (`supports` then says no)."""
  fitted = cfg
  while smem_bytes(fitted) > budget:
    if fitted.stages > 2:
      fitted = dataclasses.replace(fitted, stages=fitted.stages - 1)
    elif fitted.tile_n > 64:
      fitted = dataclasses.replace(fitted, tile_n=fitted.tile_n // 2, stages=cfg.stages)
    else:
      break
  return fitted


@dataclasses.dataclass(frozen=True)
class TileConfig:
  """Static tiling of one kernel launch."""

  tile_m: int = 128  # rows per CTA tile (R)
  tile_n: int = 128  # output columns per compute warpgroup
  tile_k: int = 64  # contraction step per pipeline stage
  stages: int = 4  # pipeline depth (buffers in flight)
  body: str = "ws"  # "ws" (warp-specialised, 2 compute warpgroups), "ws_chain", "pp" or "pipe"
  split: str = "n"  # ws bodies: the compute warpgroups split the CTA tile's columns or rows ("m")
  epi_n: int | None = None  # columns per epilogue store slab; None: all tile_n at once
  resident_lhs: bool = False  # "pp" only: keep each item's lhs rows (all of K) in shared memory
  ordered: bool = False  # "pp" only: the compute warpgroups' main loops take strict turns
  multicast_lhs: bool = False  # "pp" only: 2-CTA clusters on neighbouring column tiles share lhs
  double_staging: bool = False  # "pp" only: two epilogue staging slots per compute warpgroup
  epi_m: int | None = None  # "pp" only: rows per epilogue store slab; None: all tile_m at once

  @property
  def splits_tile(self) -> bool:
    """Whether the two compute warpgroups share each unit (the "ws" bodies)."""
    return self.body in ("ws", "ws_chain")

  @property
  def cta_n(self) -> int:
    """Output columns of one unit."""
    return self.tile_n * (2 if self.splits_tile and self.split == "n" else 1)

  @property
  def wg_m(self) -> int:
    """Rows of one compute warpgroup's accumulator."""
    return self.tile_m // 2 if self.splits_tile and self.split == "m" else self.tile_m

  @property
  def epi_cols(self) -> int:
    return min(self.epi_n or self.tile_n, self.tile_n)

  @property
  def epi_rows(self) -> int:
    return min(self.epi_m or self.wg_m, self.wg_m)

  def out_slots(self) -> int:
    """Staging slots per compute warpgroup: two let a slab's store overlap the next slab's
    writes; "pp" takes one (its epilogue already overlaps the other warpgroup's wgmmas) unless
    `double_staging` asks for two."""
    if self.epi_cols == self.tile_n and self.epi_rows == self.wg_m:
      return 1
    return 2 if self.body != "pp" or self.double_staging else 1

  def smem_bytes(self, in_itemsize: int, out_itemsize: int, swiglu: bool = False,
                 k_dim: int = 0) -> int:
    """Shared memory of the operand ring and the output staging; k_dim sizes a resident lhs."""
    lhs_rows = 0 if self.resident_lhs else self.tile_m
    ring = self.stages * (lhs_rows + self.cta_n * (2 if swiglu else 1)) * self.tile_k
    ring += self.tile_m * k_dim if self.resident_lhs else 0
    compute_wgs = 1 if self.body == "pipe" else 2
    out = compute_wgs * self.out_slots() * self.epi_rows * self.epi_cols * out_itemsize
    return ring * in_itemsize + out

  def fit_smem(self, in_itemsize: int, out_itemsize: int, swiglu: bool = False,
               k_dim: int = 0) -> "TileConfig":
    """Drops pipeline stages (not below 2), then halves tile_n, until shared memory fits."""
    return shrink_to_fit(
        self, lambda cfg: cfg.smem_bytes(in_itemsize, out_itemsize, swiglu, k_dim), _SMEM_BUDGET)

  def spec(self) -> str:
    """The bench flag string: body:tile_m:tile_n:tile_k:stages[:m][:e<epi_n>][:r<epi_m>][:a][:o]
    [:c][:d]."""
    extra = (":m" if self.split == "m" else "") + (f":e{self.epi_n}" if self.epi_n else "")
    extra += f":r{self.epi_m}" if self.epi_m else ""
    extra += (":a" if self.resident_lhs else "") + (":o" if self.ordered else "")
    extra += (":c" if self.multicast_lhs else "") + (":d" if self.double_staging else "")
    return f"{self.body}:{self.tile_m}:{self.tile_n}:{self.tile_k}:{self.stages}{extra}"


_BODIES = ("ws", "ws_chain", "pp", "pipe")


def parse_tile_config(spec: str) -> TileConfig:
  """Inverse of `TileConfig.spec`."""
  body, tm, tn, tk, stages, *extra = spec.split(":")
  if body not in _BODIES:
    raise ValueError(f"parse_tile_config: unknown body {body!r} in {spec!r}; expected one of "
                     f"{_BODIES}.")
  split, epi_n, resident, ordered, multicast, double = "n", None, False, False, False, False
  epi_m = None
  for token in extra:
    if token == "m":
      split = "m"
    elif token.startswith("e"):
      epi_n = int(token[1:])
    elif token.startswith("r"):
      epi_m = int(token[1:])
    elif token == "a":
      resident = True
    elif token == "o":
      ordered = True
    elif token == "c":
      multicast = True
    elif token == "d":
      double = True
    else:
      raise ValueError(f"parse_tile_config: unknown token {token!r} in {spec!r}; expected 'm' "
                       "(split rows), 'e<int>' (epilogue slab columns), 'r<int>' (epilogue "
                       "slab rows), 'a' (resident lhs), 'o' (ordered main loops), 'c' (2-CTA "
                       "clusters sharing lhs) or 'd' (two epilogue staging slots).")
  if split == "m" and body not in ("ws", "ws_chain"):
    raise ValueError(f"parse_tile_config: {spec!r} splits rows ('m'), which only the 'ws' and "
                     "'ws_chain' bodies do; drop the 'm'.")
  if resident and body != "pp":
    raise ValueError(f"parse_tile_config: {spec!r} keeps lhs resident ('a'), which only the "
                     "'pp' body does; drop the 'a' or use body 'pp'.")
  if (ordered or multicast or double or epi_m) and body != "pp":
    raise ValueError(f"parse_tile_config: {spec!r} asks for 'o' (ordered main loops), 'c' "
                     "(clusters sharing lhs), 'd' (two staging slots) or 'r' (slab rows), which "
                     "only the 'pp' body has; drop them or use body 'pp'.")
  if multicast and resident:
    raise ValueError(f"parse_tile_config: {spec!r} combines 'a' (resident lhs) with 'c' "
                     "(clusters sharing lhs); keep one of them.")
  return TileConfig(int(tm), int(tn), int(tk), int(stages), body, split, epi_n, resident, ordered,
                    multicast, double, epi_m)


# Chosen from measurements on an H200 on 2026-11-29 (experiments/bench_kernels.py; the figures are
# in BENCHMARKS.md). Session 4: the ping-pong body with 128x128 units won all four Ling-mini
# problems against session 3's entries (balanced: down 519 vs 471, up 648 vs 626, up dgrad 622
# vs 590, down dgrad 574 vs 563 TFLOP/s; Zipf likewise), as did the expert FFN under jax.grad.
# The resident-lhs variant lost at K=512 (463 and, with tile_k 128, 357). Session 5 (2026-11-30,
# after the schedule's one-fusion searchsorted, which alone took the down projection from 504 to
# 453 us a call): the ordered ("o") and lhs-multicast ("c") variants did not win both balances
# in two calls (balanced / Zipf, first and second call: down fwd table 570 / 517 and 580 / 507,
# "c" 577 / 500 and 587 / 489; up fwd table 640 / 581 and 677 / 556, "o" 660 / 571 and
# 687 / 581), nor the expert FFN (550 with both against the table's 555), so the table stays.
# Session 6: L2 prefetches of the operands of later units lost in both calls (down fwd 486
# against 513, up fwd 452 against 615; not kept). The table's kernels run at the board's 700 W
# power cap (~1400-1470 MHz, tokamax's ~1860), so they are bound by energy per FLOP.
# Session 16 (2026-12-01): the down projection's epilogue writes 4x the bytes per FLOP of the up
# projection's, and its one staging slot made the second slab wait for the first one's store.
# Two 128 x 64 slots (5 stages, "d") won it on a fast machine (562 / 555 / 580 against 526 / 530
# / 536) but not on a slow one (514 against 520); two 64 x 64 slots beside the 6-stage ring, with
# ordered main loops ("r64:o:d"), won on the slow one (5 rounds, balanced / Zipf: 553 / 483
# against 520 / 470), then measured 566, 555 and 571 on three machines (1.81-1.86x tokamax). The
# other problems keep one slot: "d" lost on all three (up 610 against 614, dgrads 585 / 564
# against 596 / 586); "r64:o:d" was timed on the up projection once (605 against 595).
# Key: (K, N, transpose_rhs, dtype name) of the forward op as the kernel sees it.
_PING_PONG = TileConfig(128, 128, 64, 6, "pp", epi_n=64)  # 6 x 32 KiB ring + 2 x 16 KiB staging
# 6 x 32 KiB ring + 4 x 8 KiB staging
_PING_PONG_2_SLOTS = TileConfig(128, 128, 64, 6, "pp", epi_n=64, ordered=True,
                                double_staging=True, epi_m=64)
TILE_CONFIGS: dict[tuple[int, int, bool, str], TileConfig] = {
    # Ling-mini up-projection (hidden 2048 -> gate+up 1024) and its dgrad.
    (2048, 1024, False, "bfloat16"): _PING_PONG,
    (1024, 2048, True, "bfloat16"): _PING_PONG,
    # Ling-mini down-projection (expert width 512 -> hidden 2048) and its dgrad.
    (512, 2048, False, "bfloat16"): _PING_PONG_2_SLOTS,
    (2048, 512, True, "bfloat16"): _PING_PONG,
}
DEFAULT_TILE_CONFIG = TileConfig()

# The fused SwiGLU forward, keyed by (K, 2F, dtype name) of its rhs. `dispatch.expert_ffn` takes
# the fused path on Hopper only for shapes listed here, i.e. where it measured faster than the
# GEMM followed by XLA's SwiGLU.
SWIGLU_CONFIGS: dict[tuple[int, int, str], TileConfig] = {}
DEFAULT_SWIGLU_CONFIG = TileConfig(128, 128, 64, 4, "ws_chain", "m", 64)


def tile_config(k_dim: int, n_dim: int, transpose_rhs: bool, dtype) -> TileConfig:
  """Returns the tuned tiling for a problem shape, or the default one."""
  return TILE_CONFIGS.get(
      (k_dim, n_dim, bool(transpose_rhs), jnp.dtype(dtype).name), DEFAULT_TILE_CONFIG)


def swiglu_config(k_dim: int, n_dim: int, dtype) -> TileConfig:
  """The fused SwiGLU tiling for rhs [G, K, N = 2F]: the tuned one, or the default."""
  return SWIGLU_CONFIGS.get((k_dim, n_dim, jnp.dtype(dtype).name), DEFAULT_SWIGLU_CONFIG)


class TileSchedule(NamedTuple):
  """Per-item metadata of the kernel's work list; items at and past num_items are unused."""

  group_I: jax.Array  # group of the item; G marks the zero tail
  read_start_I: jax.Array  # first row of the R rows the item reads
  own_offset_I: jax.Array  # first owned row, relative to read_start
  own_rows_I: jax.Array  # owned rows (0 for unused items)
  num_items: jax.Array  # [1] items in use


# Row offsets of lhs tiles are multiples of this, which the swizzled SMEM tiling needs.
_ROW_ALIGN = 8
# Shared memory one CTA may use on Hopper is 227 KiB; keep 1 KiB for barriers and alignment.
_SMEM_BUDGET = 232448 - 1024


def max_schedule_items(num_rows: int, num_groups: int, tile_m: int) -> int:
  """Static bound on the items of `make_tile_schedule`.

  Group h of s_h rows starting a_h < 8 rows past the 8-row grid takes cdiv(s_h + a_h, R) items;
  summed over the G + 1 groups (tail included) that is below (M + 7(G+1)) / R + G + 1.
  """
  return pl.cdiv(num_rows + (_ROW_ALIGN - 1) * (num_groups + 1), tile_m) + num_groups + 1


# Groups of at most this many tiles are "small" for `make_tile_schedule`'s spread order.
_SMALL_GROUP_TILES = 2


def make_tile_schedule(group_sizes_G: jax.Array, num_rows: int, tile_m: int,
                       spread: bool = True) -> TileSchedule:
  """Cuts each group's rows into tiles from its own (8-aligned) first row; the tail is group G.

  Needs num_rows >= tile_m and a multiple of 8 (the caller pads tiny inputs) and group sizes that
  sum to at most num_rows.

  Item order: by group, unless `spread`, where the items of small groups (at most
  `_SMALL_GROUP_TILES` tiles) are spread evenly among the others', each sequence keeping its own
  order. The SMs take units in item order, so with items in group order a run of small groups is
  a stretch where every unit reads weights no other unit shares, and the kernel waits on HBM
  there (a model of 132-unit waves at 3.0 TB/s puts Zipf-skewed Ling-mini groups at -15% against
  balanced ones in group order, -11% spread); spread, those weight reads overlap the large
  groups' compute. With one kind of group only, the order is by group either way.
  """
  if num_rows < tile_m:
    raise ValueError(f"make_tile_schedule: num_rows={num_rows} < tile_m={tile_m}; pad first.")
  num_groups = group_sizes_G.shape[0]
  sizes_G = group_sizes_G.astype(jnp.int32)
  tail = num_rows - jnp.sum(sizes_G)
  sizes_H = jnp.concatenate([sizes_G, tail[None]])  # H = G + 1 groups, tail last
  ends_H = prefix_sum(sizes_H)
  starts_H = ends_H - sizes_H
  base_H = starts_H - starts_H % _ROW_ALIGN
  tiles_H = jnp.where(sizes_H > 0, (ends_H - base_H + tile_m - 1) // tile_m, 0)
  # Small groups' items and large groups' items, each in group order, as one sequence of 2H
  # groups: small ones first (none without `spread`). One prefix sum and one search serve both
  # orders: each launch is GPU time in every call.
  small_H = (tiles_H <= _SMALL_GROUP_TILES) if spread else jnp.zeros_like(tiles_H, bool)
  tiles_2H = jnp.concatenate([jnp.where(small_H, tiles_H, 0), jnp.where(small_H, 0, tiles_H)])
  item_ends_2H = prefix_sum(tiles_2H)
  num_small, num_items = item_ends_2H[num_groups], item_ends_2H[-1]
  # Position r holds a small group's item when floor(r S / N) steps up there (S small items of
  # N, evenly placed): small item floor(r S / N), else large item r - floor(r S / N), which is
  # item S + r - floor(r S / N) of the 2H sequence.
  items_I = jnp.arange(max_schedule_items(num_rows, num_groups, tile_m), dtype=jnp.int32)
  smalls_before_I = items_I * num_small // jnp.maximum(num_items, 1)
  is_small_I = (items_I + 1) * num_small // jnp.maximum(num_items, 1) > smalls_before_I
  seq_I = jnp.where(is_small_I, smalls_before_I, num_small + items_I - smalls_before_I)
  # All pairs compared at once: one small fusion on GPU, where the default binary search is a
  # while loop of several kernels per step, timed as part of every call.
  slot_I = jnp.searchsorted(item_ends_2H, seq_I, side="right", method="compare_all")
  slot_I = jnp.minimum(slot_I.astype(jnp.int32), 2 * num_groups + 1)
  tile_in_group_I = seq_I - (item_ends_2H[slot_I] - tiles_2H[slot_I])
  group_I = jnp.minimum(slot_I % (num_groups + 1), num_groups)
  tile_start_I = base_H[group_I] + tile_in_group_I * tile_m
  read_start_I = jnp.minimum(tile_start_I, num_rows - tile_m)
  lo_I = jnp.maximum(starts_H[group_I], tile_start_I)
  hi_I = jnp.minimum(ends_H[group_I], tile_start_I + tile_m)
  used_I = items_I < num_items
  own_rows_I = jnp.where(used_I, jnp.maximum(hi_I - lo_I, 0), 0)
  own_offset_I = jnp.where(used_I, lo_I - read_start_I, 0)
  read_start_I = jnp.where(used_I, read_start_I, 0)
  return TileSchedule(group_I, read_start_I, own_offset_I, own_rows_I,
                      num_items.astype(jnp.int32)[None])


class _Unit(NamedTuple):
  """One (item, column tile) unit of the persistent loop, read from the schedule."""

  col_tile: jax.Array  # which CTA-wide block of output columns
  weight: jax.Array  # group whose matrix the unit reads (the tail reads the last, unused)
  start: jax.Array  # first row the tile reads
  offset: jax.Array  # first owned row, relative to start
  rows: jax.Array  # owned rows
  is_tail: jax.Array  # the zero tail: stores zeros


def _decode_unit(unit, n_tiles: int, num_groups: int, schedule_gmem) -> _Unit:
  group_gmem, start_gmem, offset_gmem, rows_gmem = schedule_gmem
  item, col_tile = unit // n_tiles, unit % n_tiles
  group = group_gmem[item]
  return _Unit(col_tile, jnp.minimum(group, num_groups - 1),
               pl.multiple_of(start_gmem[item], _ROW_ALIGN), offset_gmem[item], rows_gmem[item],
               group == num_groups)


def _swizzled(block_shape, dtype, tile_rows: int = 8):
  """Tiling + swizzle transforms for an SMEM block whose minor dim is block_shape[-1].

  Operand blocks use 8-row tiles (what wgmma reads). The output block uses 1-row tiles: still
  swizzled (conflict-free writes from the accumulator), yet sliceable at any row for the
  ragged TMA stores.
  """
  swizzle = plgpu.find_swizzle(block_shape[-1] * jnp.dtype(dtype).itemsize * 8)
  return (plgpu.TilingTransform((tile_rows, swizzle // jnp.dtype(dtype).itemsize)),
          plgpu.SwizzleTransform(swizzle))


def _store_rows(out_smem, out_gmem, gmem_row, smem_row, num_rows, col_start, max_rows):
  """Copies out_smem rows [smem_row, smem_row + num_rows) to out_gmem rows from gmem_row.

  In power-of-two pieces (max_rows, a power of two, bounds num_rows); commits one store group.
  """
  piece = max_rows
  while piece >= 1:
    @pl.when((num_rows & piece) != 0)
    def _(smem_row=smem_row, gmem_row=gmem_row, piece=piece):  # traced right here
      plgpu.copy_smem_to_gmem(
          out_smem.at[pl.ds(smem_row, piece)],
          out_gmem.at[pl.ds(gmem_row, piece), pl.ds(col_start, out_smem.shape[1])],
          commit_group=False)
    smem_row = smem_row + (num_rows & piece)
    gmem_row = gmem_row + (num_rows & piece)
    piece //= 2
  plgpu.commit_smem_to_gmem_group()


def _silu_times(gate, up):
  """silu(gate) * up in fp32 (exp and a division: what the kernels' lowering supports)."""
  return gate / (1.0 + jnp.exp(-gate)) * up


def drain_ring(consumed, total_steps, stages: int) -> None:
  """The memory warpgroup's end of a hand-rolled TMA ring (slot t % stages for step t): wait on
  the releases of the last `stages` steps too, so that no barrier phase is left unawaited."""
  @pl.loop(jnp.maximum(total_steps - stages, 0), total_steps)
  def _drain(t):
    plgpu.barrier_wait(consumed.at[t % stages])


def _pipe_body(cfg: TileConfig, transpose_rhs: bool, swiglu: bool, num_groups: int,
               count_gmem, *refs):
  """One warpgroup per SM: emit_pipeline over K for each (item, column tile) unit."""
  if swiglu:
    raise NotImplementedError("The fused SwiGLU needs a warp-specialised body.")
  *schedule_gmem, lhs_gmem, rhs_gmem, out_gmem = refs
  k_dim = lhs_gmem.shape[1]
  n_tiles = out_gmem.shape[1] // cfg.tile_n
  tm, tn, tk = cfg.tile_m, cfg.tile_n, cfg.tile_k
  dtype = lhs_gmem.dtype
  rhs_block = (tn, tk) if transpose_rhs else (tk, tn)

  @plgpu.nd_loop((count_gmem[0] * n_tiles,), collective_axes="sm")
  def _unit(info):
    u = _decode_unit(info.index[0], n_tiles, num_groups, schedule_gmem)
    rhs_index = (lambda k: (u.col_tile, k)) if transpose_rhs else (lambda k: (k, u.col_tile))

    def acc_scope(acc_ref):
      @pl.when(jnp.logical_not(u.is_tail))
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
        )(lhs_gmem.at[pl.ds(u.start, tm)], rhs_gmem.at[u.weight])
      return acc_ref[...]

    # The accumulator starts at zero, so a tail item stores zeros.
    acc = pl.run_scoped(acc_scope, plgpu.ACC((tm, tn), jnp.float32))

    @functools.partial(pl.run_scoped, out_smem=plgpu.SMEM(
        (tm, tn), out_gmem.dtype, transforms=_swizzled((tm, tn), out_gmem.dtype, tile_rows=1)))
    def _(out_smem):
      out_smem[...] = acc.astype(out_smem.dtype)
      plgpu.commit_smem()
      _store_rows(out_smem, out_gmem, u.start + u.offset, u.offset, u.rows, u.col_tile * tn, tm)
      plgpu.wait_smem_to_gmem(0, wait_read_only=True)


def _ws_body(cfg: TileConfig, transpose_rhs: bool, swiglu: bool, num_groups: int,
             count_gmem, *refs):
  """A memory warpgroup feeds two compute warpgroups, which split the CTA tile (see cfg.split).

  With swiglu, refs end with the output and, if it is there, the pre-activation [M, 2F].
  """
  group_gmem, start_gmem, offset_gmem, rows_gmem, lhs_gmem, rhs_gmem, *out_gmems = refs
  schedule_gmem = (group_gmem, start_gmem, offset_gmem, rows_gmem)
  out_gmem = out_gmems[0]
  k_dim = lhs_gmem.shape[1]
  tm, tn, tk = cfg.tile_m, cfg.tile_n, cfg.tile_k
  cta_n, wg_m, epi_n = cfg.cta_n, cfg.wg_m, cfg.epi_cols
  split_m = cfg.split == "m"
  n_tiles = out_gmem.shape[1] // cta_n  # with swiglu also the column tiles of the gate half
  dtype = lhs_gmem.dtype
  rhs_block = (cta_n, tk) if transpose_rhs else (tk, cta_n)
  num_rhs = 2 if swiglu else 1  # gate and up blocks
  num_slabs = tn // epi_n
  slots = cfg.out_slots()
  chained = cfg.body == "ws_chain"

  def pipeline(mma_step, compute_context, col_tile, state=None):
    def rhs_spec(col_block):
      index = (lambda k: (col_block, k)) if transpose_rhs else (lambda k: (k, col_block))
      return plgpu.BlockSpec(rhs_block, index, transforms=_swizzled(rhs_block, dtype),
                             memory_space=plgpu.SMEM)

    return plgpu.emit_pipeline_warp_specialized(
        mma_step,
        grid=(k_dim // tk,),
        memory_registers=40,
        in_specs=[
            plgpu.BlockSpec((tm, tk), lambda k: (0, k), transforms=_swizzled((tm, tk), dtype),
                            memory_space=plgpu.SMEM),
            *(rhs_spec(col_tile + i * n_tiles) for i in range(num_rhs)),
        ],
        wg_axis="wg",
        num_compute_wgs=2,
        max_concurrent_steps=cfg.stages,
        compute_context=compute_context,
        pipeline_state=state,
    )

  ignore = lambda *_, **__: None
  first_state = plgpu.PipelinePipeline.START if chained else None
  operand_views = lambda start, weight: (
      lhs_gmem.at[pl.ds(start, tm)], *(rhs_gmem.at[weight],) * num_rhs)

  @functools.partial(
      pl.run_scoped,
      allocs=pipeline(ignore, ignore, 0, first_state).get_allocations(*operand_views(0, 0)),
      out_smem=plgpu.SMEM((2, slots, wg_m, epi_n), out_gmem.dtype,
                          transforms=_swizzled((wg_m, epi_n), out_gmem.dtype, tile_rows=1)),
      collective_axes="wg",
  )
  def _scope(allocs, out_smem):
    wg = jax.lax.axis_index("wg")

    @plgpu.nd_loop((count_gmem[0] * n_tiles,), collective_axes="sm")
    def _unit(info):
      u = _decode_unit(info.index[0], n_tiles, num_groups, schedule_gmem)
      # The rows [row0, row0 + wg_m) of the tile are this warpgroup's; it owns [lo, lo + count).
      row0 = wg * wg_m if split_m else 0
      lo = jnp.clip(u.offset, row0, row0 + wg_m)
      count = jnp.clip(u.offset + u.rows, row0, row0 + wg_m) - lo
      col0 = u.col_tile * cta_n + (0 if split_m else wg * tn)

      def store_slabs(values):
        """Stores (wg_m, tn) fp32 values, or silu(gate) * up of two, slab by slab."""
        outputs = [(out_gmem, col0, _silu_times(*values) if swiglu else values[0])]
        if len(out_gmems) == 2:  # the pre-activation, gate and up halves
          outputs += [(out_gmems[1], col0, values[0]),
                      (out_gmems[1], col0 + n_tiles * cta_n, values[1])]
        slab = 0
        for gmem, col, value in outputs:
          value = value.astype(out_smem.dtype)
          for c in range(num_slabs):
            slot = slab % slots
            # The store that last read this slot is the second latest (the latest with 1 slot,
            # or when an odd slab count puts the previous unit's last slab in this slot).
            latest_may_run = slots == 2 and (slab > 0 or (len(outputs) * num_slabs) % 2 == 0)
            plgpu.wait_smem_to_gmem(1 if latest_may_run else 0, wait_read_only=True)
            out_smem[wg, slot] = value[:, c * epi_n:(c + 1) * epi_n]
            plgpu.commit_smem()
            _store_rows(out_smem.at[wg, slot], gmem, u.start + lo, lo - row0, count,
                        col + c * epi_n, wg_m)
            slab += 1

      zeros = lambda: [jnp.zeros((wg_m, tn), jnp.float32)] * num_rhs

      def compute_context(run_pipeline):
        @functools.partial(pl.run_scoped,
                           accs=tuple(plgpu.ACC((wg_m, tn), jnp.float32) for _ in range(num_rhs)))
        def _(accs):
          run_pipeline(accs)
          if chained and not split_m:  # tail units ran the pipeline too (see below)
            @pl.when(u.is_tail)
            def _():
              store_slabs(zeros())

            @pl.when(jnp.logical_not(u.is_tail))
            def _():
              store_slabs([a[...] for a in accs])
          else:  # split m skips the wgmmas of tail units: their accumulators stay zero
            store_slabs([a[...] for a in accs])

      # Split m: a warpgroup without owned rows in this unit skips its wgmmas.
      has_rows = (count > 0) & jnp.logical_not(u.is_tail)

      def mma_step(_, lhs_smem, *refs):
        *rhs_smems, accs = refs
        lhs = lhs_smem.at[pl.ds(row0, wg_m)] if split_m else lhs_smem

        def issue():
          for acc_ref, rhs_smem in zip(accs, rhs_smems):
            wg_cols = slice(None) if split_m else pl.ds(wg * tn, tn)
            rhs = (rhs_smem.at[wg_cols].transpose((1, 0)) if transpose_rhs
                   else rhs_smem.at[:, wg_cols])
            plgpu.wgmma(acc_ref, lhs, rhs)

        if split_m:
          pl.when(has_rows)(issue)
        else:
          issue()
        plgpu.wgmma_wait(0)
        return accs

      operands = operand_views(u.start, u.weight)
      if chained:
        # One pipeline runs across all of this SM's units: the memory warpgroup starts loading
        # the next unit while the compute warpgroups finish and store this one. Every unit runs
        # it, tail units too, since a skipped call would break the chain.
        last = info.num_local_steps - 1
        state = jnp.where(
            info.local_index == 0, int(plgpu.PipelinePipeline.START),
            jnp.where(info.local_index == last, int(plgpu.PipelinePipeline.STOP),
                      int(plgpu.PipelinePipeline.STEADY)))
        pipeline(mma_step, compute_context, u.col_tile, state)(*operands, allocations=allocs)
      else:
        @pl.when(jnp.logical_not(u.is_tail))
        def _():
          pipeline(mma_step, compute_context, u.col_tile)(*operands, allocations=allocs)

        @pl.when(u.is_tail & (wg < 2))
        def _():
          store_slabs(zeros())

  plgpu.wait_smem_to_gmem(0, wait_read_only=True)


def _pp_body(cfg: TileConfig, transpose_rhs: bool, swiglu: bool, num_groups: int,
             count_gmem, *refs):
  """Ping-pong: compute warpgroup w takes the SM's local units w, w + 2, ... whole.

  Local unit j's K step k is step t = j * k_steps + k of one chain across the SM's units; it sits
  in ring slot t % stages. The memory warpgroup waits until step t - stages is consumed, then
  loads step t, signalling the "loaded" barrier of the warpgroup that owns unit j.

  With cfg.resident_lhs the SM takes whole items (all their column tiles, one after another) and
  keeps the item's lhs rows, all of K, in shared memory, so that only rhs streams. lhs chunk k
  is loaded with step k of the item's first unit and again with that of its second: each
  warpgroup's "loaded" barrier then covers the copy before its first read, and later units read
  after both copies landed. The previous readers of chunk k were at steps t - k_steps and
  t - 2 k_steps, consumed before step t - stages (stages <= k_steps), which the memory
  warpgroup awaits before it loads step t.
  """
  if swiglu:
    raise NotImplementedError("gmm: the fused SwiGLU has no ping-pong body; use a 'ws' tiling.")
  group_gmem, start_gmem, offset_gmem, rows_gmem, lhs_gmem, rhs_gmem, out_gmem = refs
  schedule_gmem = (group_gmem, start_gmem, offset_gmem, rows_gmem)
  tm, tn, tk, stages = cfg.tile_m, cfg.tile_n, cfg.tile_k, cfg.stages
  epi_m, epi_n = cfg.epi_rows, cfg.epi_cols
  num_slabs = (tm // epi_m) * (tn // epi_n)
  k_steps = lhs_gmem.shape[1] // tk
  n_tiles = out_gmem.shape[1] // tn
  dtype = lhs_gmem.dtype
  rhs_block = (tn, tk) if transpose_rhs else (tk, tn)
  resident, multicast = cfg.resident_lhs, cfg.multicast_lhs
  sm, num_sms = jax.lax.axis_index("sm"), jax.lax.axis_size("sm")  # clusters, with multicast
  if multicast:  # cluster sm takes unit pairs sm, sm + num_sms, ...; CTA r of it unit 2p + r
    rank = jax.lax.axis_index("cluster")
    num_local = jnp.maximum(count_gmem[0] * n_tiles // 2 - sm + num_sms - 1, 0) // num_sms
    unit_of = lambda j: 2 * (j * num_sms + sm) + rank
  elif resident:  # items sm, sm + num_sms, ...; each item's column tiles in a row
    num_local = jnp.maximum(count_gmem[0] - sm + num_sms - 1, 0) // num_sms * n_tiles
    unit_of = lambda j: ((j // n_tiles) * num_sms + sm) * n_tiles + j % n_tiles
  else:  # units sm, sm + num_sms, ...
    num_local = jnp.maximum(count_gmem[0] * n_tiles - sm + num_sms - 1, 0) // num_sms
    unit_of = lambda j: j * num_sms + sm
  lhs_slots = k_steps if resident else stages
  # Two staging slots alternate only over an even slab count (every unit starts on slot 0).
  pp_slots = cfg.out_slots() if num_slabs % 2 == 0 else 1
  # cfg.ordered: turn[w] says that warpgroup w may start its next unit's wgmmas.
  turns = {"turn": plgpu.Barrier(num_arrivals=1, num_barriers=2)} if cfg.ordered else {}

  @functools.partial(
      pl.run_scoped,
      lhs_smem=plgpu.SMEM((lhs_slots, tm, tk), dtype, transforms=_swizzled((tm, tk), dtype)),
      rhs_smem=plgpu.SMEM((stages, *rhs_block), dtype, transforms=_swizzled(rhs_block, dtype)),
      out_smem=plgpu.SMEM((2, pp_slots, epi_m, epi_n), out_gmem.dtype,
                          transforms=_swizzled((epi_m, epi_n), out_gmem.dtype, tile_rows=1)),
      loaded=plgpu.Barrier(num_arrivals=2, num_barriers=2 * stages),  # [wg * stages + slot]
      # With multicast a slot is free once the step's owner in both CTAs released it.
      consumed=(plgpu.ClusterBarrier(collective_axes=("cluster",), num_arrivals=1,
                                     num_barriers=stages)
                if multicast else plgpu.Barrier(num_arrivals=1, num_barriers=stages)),
      collective_axes="wg",
      **turns,
  )
  def _scope(lhs_smem, rhs_smem, out_smem, loaded, consumed, turn=None):
    wg = jax.lax.axis_index("wg")

    @pl.when(wg == 2)
    def _memory():
      plgpu.set_max_registers(40, action="decrease")

      @pl.loop(0, num_local)
      def _unit(j):
        u = _decode_unit(unit_of(j), n_tiles, num_groups, schedule_gmem)
        col = u.col_tile * tn
        # Both warpgroups' first units of an item load its lhs (see below).
        loads_lhs = j % n_tiles < 2

        @pl.loop(0, k_steps)
        def _step(k):
          t = j * k_steps + k
          slot = t % stages

          @pl.when(t >= stages)
          def _():
            plgpu.barrier_wait(consumed.at[slot])

          barrier = loaded.at[(j % 2) * stages + slot]
          lhs_src = lhs_gmem.at[pl.ds(u.start, tm), pl.ds(k * tk, tk)]
          if resident:
            @pl.when(loads_lhs)
            def _():
              plgpu.copy_gmem_to_smem(lhs_src, lhs_smem.at[k], barrier)

            @pl.when(jnp.logical_not(loads_lhs))
            def _():
              plgpu.barrier_arrive(barrier)  # the second of the step's two arrivals
          else:
            plgpu.copy_gmem_to_smem(lhs_src, lhs_smem.at[slot], barrier,
                                    collective_axes="cluster" if multicast else None)
          rhs_src = (rhs_gmem.at[u.weight, pl.ds(col, tn), pl.ds(k * tk, tk)] if transpose_rhs
                     else rhs_gmem.at[u.weight, pl.ds(k * tk, tk), pl.ds(col, tn)])
          plgpu.copy_gmem_to_smem(rhs_src, rhs_smem.at[slot], barrier)

      drain_ring(consumed, num_local * k_steps, stages)

    @pl.when(wg < 2)
    def _compute():
      plgpu.set_max_registers(232, action="increase")

      @pl.loop(0, (num_local - wg + 1) // 2)
      def _unit(i):
        j = 2 * i + wg
        u = _decode_unit(unit_of(j), n_tiles, num_groups, schedule_gmem)
        first = j * k_steps

        def acc_scope(acc_ref):
          if turn is not None:  # unit j - 1 (the other warpgroup's) has issued all its wgmmas
            pl.when(j > 0)(lambda: plgpu.barrier_wait(turn.at[wg]))

          def step(k, _):
            slot = (first + k) % stages
            plgpu.barrier_wait(loaded.at[wg * stages + slot])
            rhs = rhs_smem.at[slot]
            plgpu.wgmma(acc_ref, lhs_smem.at[k if resident else slot],
                        rhs.transpose((1, 0)) if transpose_rhs else rhs)
            plgpu.wgmma_wait(1)  # the previous step's wgmma is done: release its slot

            @pl.when(k > 0)
            def _():
              plgpu.barrier_arrive(consumed.at[(first + k - 1) % stages])

          jax.lax.fori_loop(0, k_steps, step, None)
          if turn is not None:  # hand the tensor cores to unit j + 1, if there is one
            pl.when(j + 1 < num_local)(lambda: plgpu.barrier_arrive(turn.at[1 - wg]))
          plgpu.wgmma_wait(0)
          plgpu.barrier_arrive(consumed.at[(first + k_steps - 1) % stages])
          return acc_ref[...]

        def store_slabs(value):
          value = value.astype(out_smem.dtype)
          slabs = [(r, c) for r in range(tm // epi_m) for c in range(tn // epi_n)]
          for i, (r, c) in enumerate(slabs):
            # One slot: the last slab's store must have read it. Two, with an even slab count:
            # slab i takes slot i % 2, last read by the store before the latest.
            plgpu.wait_smem_to_gmem(1 if pp_slots == 2 else 0, wait_read_only=True)
            slot = i % pp_slots
            out_smem[wg, slot] = value[r * epi_m:(r + 1) * epi_m, c * epi_n:(c + 1) * epi_n]
            plgpu.commit_smem()
            # The owned rows [offset, offset + rows) of the tile that fall in this slab's rows.
            lo = jnp.clip(u.offset, r * epi_m, (r + 1) * epi_m)
            count = jnp.clip(u.offset + u.rows, r * epi_m, (r + 1) * epi_m) - lo
            _store_rows(out_smem.at[wg, slot], out_gmem, u.start + lo, lo - r * epi_m, count,
                        u.col_tile * tn + c * epi_n, epi_m)

        acc = pl.run_scoped(acc_scope, plgpu.ACC((tm, tn), jnp.float32))
        # The zero tail ran the loop too (every unit keeps the ring in step); it stores zeros.
        pl.when(u.is_tail)(lambda: store_slabs(jnp.zeros((tm, tn), jnp.float32)))
        pl.when(jnp.logical_not(u.is_tail))(lambda: store_slabs(acc))

      plgpu.wait_smem_to_gmem(0, wait_read_only=True)


def supports(lhs_MK: jax.Array, rhs_GKN: jax.Array, transpose_rhs: bool, out_dtype,
             cfg: TileConfig | None = None, swiglu: bool = False) -> bool:
  """Whether the kernel covers these operands (else the caller falls back to the reference)."""
  k_dim = lhs_MK.shape[1]
  n_dim = rhs_GKN.shape[1] if transpose_rhs else rhs_GKN.shape[2]
  if swiglu:
    cfg = cfg or swiglu_config(k_dim, n_dim, lhs_MK.dtype)
    if transpose_rhs or not cfg.splits_tile or n_dim % 2:
      return False
    n_dim //= 2  # output columns; each CTA reads cta_n of the gate half and cta_n of the up half
  cfg = cfg or tile_config(k_dim, n_dim, transpose_rhs, lhs_MK.dtype)
  out_itemsize = jnp.dtype(out_dtype).itemsize
  fitted = cfg.fit_smem(lhs_MK.dtype.itemsize, out_itemsize, swiglu, k_dim)
  fits = fitted.smem_bytes(lhs_MK.dtype.itemsize, out_itemsize, swiglu, k_dim) <= _SMEM_BUDGET
  if cfg.body == "ws_chain":  # chained pipelines need whole rounds of the buffer ring
    fits = fits and k_dim % cfg.tile_k == 0 and (k_dim // cfg.tile_k) % fitted.stages == 0
  if cfg.resident_lhs:  # a chunk is reloaded only after its readers' steps are consumed
    fits = fits and cfg.body == "pp" and fitted.stages <= k_dim // cfg.tile_k
  fits = fits and (not cfg.ordered or cfg.body == "pp")
  if cfg.multicast_lhs:  # the two CTAs of a cluster take column tiles 2c and 2c + 1 of one item
    fits = (fits and cfg.body == "pp" and not cfg.resident_lhs
            and (n_dim // max(fitted.cta_n, 1)) % 2 == 0)
  # The ragged stores start at any row of the staging slab, and TMA needs 128-byte aligned
  # shared-memory addresses: slab rows must be whole multiples of 128 bytes (an H200 run faulted
  # with "misaligned address" on 64-byte slab rows). Checked where slabs are asked for; the
  # narrow interpret-mode tiles (tile_n 32) only ever run in the interpreter.
  slab_ok = cfg.epi_n is None or (fitted.epi_cols * out_itemsize) % 128 == 0
  split_ok = cfg.split in ("n", "m") if cfg.splits_tile else cfg.split == "n"
  tiles_ok = (split_ok and fitted.tile_n % fitted.epi_cols == 0 and slab_ok
              and fitted.wg_m & (fitted.wg_m - 1) == 0 and fitted.wg_m % 64 == 0
              and fitted.epi_rows % 64 == 0 and fitted.wg_m % fitted.epi_rows == 0)
  return (fits and tiles_ok and lhs_MK.dtype == rhs_GKN.dtype
          and lhs_MK.dtype in (jnp.bfloat16, jnp.float16)
          and jnp.dtype(out_dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16),
                                       jnp.dtype(jnp.float32))
          and k_dim % cfg.tile_k == 0 and n_dim % fitted.cta_n == 0)


def device_num_sms() -> int:
  """The SMs of the first device, the size of a persistent grid (132 on an H100/H200)."""
  return getattr(jax.devices()[0], "core_count", None) or 132


# gmm and tgmm are jitted: a model calls them many times with the same shapes, and JAX then
# traces each kernel body once per shape rather than once per call.
@functools.partial(jax.jit, static_argnames=("out_dtype", "transpose_rhs", "config", "swiglu",
                                             "save_preact", "interpret", "num_sms"))
def gmm(lhs_MK: jax.Array, rhs_GKN: jax.Array, group_sizes_G: jax.Array, *,
        out_dtype=None, transpose_rhs: bool = False, config: TileConfig | None = None,
        swiglu: bool = False, save_preact: bool = False,
        interpret=None, num_sms: int | None = None):
  """out[rows of g] = lhs[rows of g] @ rhs[g] (rhs[g].T if transpose_rhs); tail rows are zero.

  With swiglu, rhs is [G, K, 2F] (gate columns, then up columns) and out [M, F] is
  silu(lhs @ gate) * (lhs @ up), computed from the fp32 accumulators; save_preact also returns
  the pre-activation lhs @ rhs [M, 2F] in out_dtype, as (out, preact).
  group_sizes must be non-negative and sum to at most M (`grouped_matmul` clips them so).
  """
  num_rows, k_dim = lhs_MK.shape
  num_groups = rhs_GKN.shape[0]
  n_dim = rhs_GKN.shape[1] if transpose_rhs else rhs_GKN.shape[2]
  out_dtype = jnp.dtype(out_dtype or lhs_MK.dtype)
  if swiglu:
    cfg = config or swiglu_config(k_dim, n_dim, lhs_MK.dtype)
  else:
    cfg = config or tile_config(k_dim, n_dim, transpose_rhs, lhs_MK.dtype)
  if save_preact and not swiglu:
    raise ValueError("gmm: save_preact=True needs swiglu=True.")
  cfg = cfg.fit_smem(lhs_MK.dtype.itemsize, out_dtype.itemsize, swiglu, k_dim)
  if not supports(lhs_MK, rhs_GKN, transpose_rhs, out_dtype, cfg, swiglu):
    raise ValueError(f"gmm: no Mosaic GPU kernel for lhs {lhs_MK.shape} {lhs_MK.dtype}, rhs "
                     f"{rhs_GKN.shape} {rhs_GKN.dtype}, transpose_rhs={transpose_rhs}, "
                     f"swiglu={swiglu}, {cfg}.")
  # Tiles start on multiples of 8 rows (the SMEM tiling); the schedule's shifted last tile does
  # too when M is a multiple of 8. Otherwise, or with fewer rows than a tile, pad (a copy of lhs).
  padded_rows = max(pl.cdiv(num_rows, _ROW_ALIGN) * _ROW_ALIGN, cfg.tile_m)
  if padded_rows != num_rows:
    lhs_MK = jnp.pad(lhs_MK, ((0, padded_rows - num_rows), (0, 0)))
  schedule = make_tile_schedule(group_sizes_G, padded_rows, cfg.tile_m)
  out_types = [jax.ShapeDtypeStruct((padded_rows, n_dim // 2 if swiglu else n_dim), out_dtype)]
  if save_preact:
    out_types.append(jax.ShapeDtypeStruct((padded_rows, n_dim), out_dtype))
  body = {"pipe": _pipe_body, "pp": _pp_body}.get(cfg.body, _ws_body)
  num_sms = num_sms or device_num_sms()
  # multicast_lhs: one program per 2-SM cluster (an odd SM is left idle).
  clusters = dict(cluster=(2,), cluster_names=("cluster",)) if cfg.multicast_lhs else {}
  kernel = plgpu.kernel(
      functools.partial(body, cfg, transpose_rhs, swiglu, num_groups),
      out_type=tuple(out_types),
      grid=(max(num_sms // 2, 1) if cfg.multicast_lhs else num_sms,),
      grid_names=("sm",),
      **clusters,
      num_threads=None if cfg.body == "pipe" else 3,
      thread_name=None if cfg.body == "pipe" else "wg",
      compiler_params=plgpu.CompilerParams(
          lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
      interpret=interpret,
  )
  outs = kernel(schedule.num_items, schedule.group_I, schedule.read_start_I,
                schedule.own_offset_I, schedule.own_rows_I, lhs_MK, rhs_GKN)
  outs = [o[:num_rows] if padded_rows != num_rows else o for o in outs]
  return tuple(outs) if save_preact else outs[0]


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


@functools.partial(jax.jit, static_argnames=("out_dtype", "config", "interpret", "num_sms"))
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
  padded_rows = pl.cdiv(num_rows, cfg.chunk) * cfg.chunk
  if padded_rows != num_rows:
    lhs_MK = jnp.pad(lhs_MK, ((0, padded_rows - num_rows), (0, 0)))
    rhs_MN = jnp.pad(rhs_MN, ((0, padded_rows - num_rows), (0, 0)))
  ends_G = prefix_sum(group_sizes_G.astype(jnp.int32))
  starts_G = ends_G - group_sizes_G.astype(jnp.int32)
  kernel = plgpu.kernel(
      functools.partial(_tgmm_body, cfg),
      out_type=jax.ShapeDtypeStruct((num_groups, k_dim, n_dim), out_dtype),
      grid=(num_sms or device_num_sms(),),
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
