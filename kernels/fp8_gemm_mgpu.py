"""Blockwise-scaled FP8 GEMMs on Hopper GPUs through Pallas Mosaic GPU (e4m3 wgmma, TMA).

`gmm_fp8` computes out[rows of g] = (A . sa)[rows of g] @ (B[g] . sb[g])^T with A [M, K] and every
B[g] [N, K] in E4M3, both K-major (FP8 wgmma reads no other layout). `matmul_fp8`, the dense GEMM,
is the same kernel with one group. The scales live in per-step vectors, as DeepGEMM keeps them:
  - sa [Kt, M]: A's scale per 1x128 tile along K, transposed so that a step's scales of one row
    tile are one contiguous TMA box;
  - sb: B's scales, transposed: [G, Kt, Nt] for a 128x128-blocked weight, read as one scalar per
    step and warpgroup (a warpgroup's columns lie in one block); [G, Kt, N], one per row of B
    (an output column), for a 1x128-tiled operand (the wgrad's second one), loaded as a column
    vector through the TMA ring.
For every 128 of K, each compute warpgroup runs one wgmma into a zeroed fp32 accumulator, reads
it into registers and adds partial * (sa[rows] x sb) to its running fp32 sum. That is the
promotion of DeepGEMM: the tensor cores' reduced-precision accumulation never spans more than
one scale block, and the result equals the fp32 reference up to summation order.

Structure, shared with kernels/grouped_matmul_mgpu.py: a persistent grid over the SMs walks
(item, column tile) units of the row-tile schedule `make_tile_schedule` (imported from there); a
memory warpgroup issues TMA loads of A, B and both scale vectors into a ring of `stages` buffers;
two compute warpgroups each own tile_n of the CTA's columns; the epilogue stores only the rows a
unit owns, so groups that share a row tile, empty groups and groups smaller than a tile all work,
and rows past the last group come out zero.

Both compute warpgroups work on the same unit in lockstep: they wait on the same step, then
both promote. (A ping-pong body, each warpgroup owning whole units so that one's promotion could
overlap the other's wgmma, was tried in sessions 5 and 6 and removed: 0.80-1.02x this body
before the split accumulators below, and wrong on the GPU with them.)

Registers decide the speed. A compute warpgroup holds its running fp32 sum and the fp32
accumulator of the step's wgmma: 128 x 128 of each is 256 registers a thread, more than the 232
it gets, so one 128 x 128 accumulator per warpgroup spills (session 5's tiling: ~500 TFLOP/s
at 8192^3). `Fp8TileConfig.acc_cols` splits a step's wgmma into several accumulators, each
waited and promoted in turn (one live at a time: 1108 TFLOP/s with two 128 x 64; each has
its own output tile in shared memory, see `store_sums`), and
`wg_split="m"` gives each warpgroup half the rows and all columns of a unit (DeepGEMM's
layout: wgmmas 64 rows high). B's block scales are read from global memory one step ahead
(carried), off the critical path, and A's before the wgmma is issued.

Two flags take the rest of the idle time (session 10; the dense default sets both, the Ling-mini
up projection's tiling only `chain` since session 17):
  - `chain`: one pipeline runs across all of an SM's units (the pipeline's START, STEADY and
    STOP states), so the memory warpgroup loads the next unit's first steps while the compute
    warpgroups promote and store this one. K = 512 is only 4 steps a unit: the Ling-mini down
    projection went from 569 to 633-661 TFLOP/s with it.
  - `overlap`: a warpgroup issues accumulator c + 1's wgmma before it waits for c's, so that
    c's promotion runs beside the next wgmma. Two accumulators of partial sums are live then;
    with `wg_split="m"` and 64-column accumulators that is 2 x 32 registers a thread beside
    the 128 of the running sum.

`flat` replaces Pallas's pipeline by this module's own ring (`_flat_ring`, session 19): one
ring of TMA slots across all of an SM's (unit, K step) pairs, with "loaded" and "consumed"
barriers per slot, as the bf16 ping-pong body of kernels/grouped_matmul_mgpu.py runs. It takes
any stage count (more than 4 lost, BENCHMARKS.md), and at 4 stages it is 1-6% ahead of `chain`
on the down projection and level to 3% on the input gradients, which the table's
`_EXPERTS_WIDE` runs. Since session 21 it also reads where each unit lies from a per-SM table
in shared memory (`unit_table`) and frees each slot before the promotion (`release_early`):
the down projection 735-761 -> 784-819 TFLOP/s. Its K steps must stay a loop: unrolled, they
ran 3-7x slower on the GPU.

Variants that lost and were removed in session 24 (their timings stay in BENCHMARKS.md, their
code in the history): two output tiles per accumulator (`double_staging`, session 17), B's block
scales through the TMA ring (`b_scale_ring`, 18), swizzled output tiles for the row split
(`swizzle_rows_out`, 18), ping-pong warpgroups on the flat ring (`wg_split="p"`, 19-20) and a
unit's epilogue in the next unit's first wgmma (`shadow_epilogue`, 21).

Split-K (`gmm_fp8`'s k_splits, session 12): unit (split, item, column tile) contracts one
k_splits-th of K into its own fp32 partial output, added after the kernel. It is for outputs with
fewer tiles than SMs over a long K (the shared expert's weight gradients: 32 and 64 tiles of a
49,152-token contraction on 132 SMs); `auto_k_splits` picks the count (on since session 13).

Supported: K a multiple of 128, N a multiple of 2 * tile_n (tile_n 128 or 64 after the
shared-memory fit), bf16 or fp32 out, accumulators of whole 128-byte rows of the
output tile lying in one 128-column block of B. `supports` says so; kernels/fp8_gemm.py falls
back to its reference for anything else (the tiny CPU model's K=64 experts, for one).

Shape key: M rows, K contraction, N output columns, G groups, Kt K-steps of 128, R tile rows.
"""

import dataclasses
import functools
import types

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from kernels.grouped_matmul_mgpu import device_num_sms
from kernels.grouped_matmul_mgpu import drain_ring
from kernels.grouped_matmul_mgpu import make_tile_schedule
from kernels.grouped_matmul_mgpu import shrink_to_fit

_PROBES = ("", "const_sb", "no_promote", "no_store", "no_smem_out", "no_mma")
TILE_K = 128  # one wgmma K step = one scale block; 128 e4m3 bytes = one 128B swizzle row
_ROW_ALIGN = 8  # row offsets of A tiles are multiples of this (8-row SMEM tiling)
_SMEM_BUDGET = 232448 - 4096  # 227 KiB per CTA on Hopper, less room for barriers


@dataclasses.dataclass(frozen=True)
class Fp8TileConfig:
  """Static tiling of one launch."""

  tile_m: int = 128  # rows per tile (R)
  tile_n: int = 128  # output columns per compute warpgroup (the CTA has 2)
  stages: int = 3  # pipeline depth
  grid_minor: str = "n"  # unit order: "n" sweeps column tiles of one row tile first; "m" sweeps
  grid_width: int = 1  # bands of grid_width row tiles down all columns (L2 reuse of B)
  # 128x128-blocked B: read each step's block scale as one scalar from global memory (its latency
  # hides behind the wgmma) instead of a per-column vector through the TMA ring.
  scalar_b_scale: bool = True
  # How a unit (tile_m x 2 tile_n) is split between the two compute warpgroups: "n",
  # each takes tile_n columns of all rows; "m", each takes tile_m / 2 rows of all 2 tile_n
  # columns (DeepGEMM's layout: wgmmas 64 rows high and up to 256 wide).
  wg_split: str = "n"
  # Columns per wgmma accumulator (0: all of the warpgroup's). Each step a compute warpgroup runs
  # one wgmma per accumulator, each waited and promoted before the next, so that only one
  # accumulator of partial sums is live next to the running sum: 128 x 128 fp32 of each is 256
  # registers a thread, past the 232 a compute warpgroup gets (spills).
  acc_cols: int = 0
  # Timing probes of bench_fp8's ceiling experiments, numerically WRONG: "const_sb" takes B's
  # block scale as 1 instead of reading it from global memory; "no_promote" accumulates all of K
  # in one wgmma accumulator (no per-step wait, no scales), as a bf16 GEMM does. The epilogue's
  # share: "no_store" skips it (the sums written to shared memory only under a condition that
  # is never true, so that they stay computed), "no_smem_out" skips the sums' write to shared
  # memory but issues the TMA stores; "no_mma" runs no wgmma and no promotion (the loads and
  # the stores alone). "" = the kernel.
  probe: str = ""
  # One pipeline chained across all of an SM's units (the pipeline's START / STEADY / STOP
  # states): the memory warpgroup loads the next unit's first K steps while the compute
  # warpgroups finish and store this one, rather than each unit starting with an empty ring.
  # It needs the stages to divide K's steps; `gmm_fp8` lowers them to a divisor (`chained`).
  chain: bool = False
  # Each K step issues the next accumulator's wgmma before it waits for and promotes the
  # current one (two accumulators of partial sums in flight), so a warpgroup's promotion
  # arithmetic overlaps its own next wgmma. Without it, each wgmma is waited before the next.
  overlap: bool = False
  # This module's own ring instead of Pallas's warp-specialised pipeline (spec token "f",
  # `_flat_ring`): one ring across all of an SM's (unit, K step) pairs with any stage count,
  # where `chain` needs the stages to divide K's steps. 128x128 block-scaled B with its scales
  # read from global memory (scalar_b_scale), and neither the "no_promote"
  # nor the "const_sb" probe (`supports` says so).
  flat: bool = False
  # `flat` only: each SM reads where its units lie from its rows of `unit_table`, loaded into
  # shared memory once (where they fit beside the tiling), rather than deriving each unit from
  # the schedule in global memory (spec token "nt" turns it off).
  unit_table: bool = True
  # `flat` only: a compute warpgroup frees a step's ring slot as soon as the step's wgmmas are
  # done, before it promotes their partial sums (spec token "late" frees it after).
  release_early: bool = True
  # `flat` with the unit table only (spec token "c"): the SMs work in pairs, 2-CTA clusters
  # that take the two column tiles of one row tile together. Each K step's A box then leaves
  # L2 once for both (TMA multicast, each SM loading half of it), and a slot is refilled only
  # once both SMs' compute warpgroups have consumed it (a cluster barrier). Needs an even
  # number of column tiles and no split K (`supports`, `gmm_fp8`).
  cluster_a: bool = False

  @property
  def wg_shape(self) -> tuple[int, int]:
    """Rows and columns of one compute warpgroup's part of a unit."""
    if self.wg_split == "m":
      return self.tile_m // 2, 2 * self.tile_n
    return self.tile_m, self.tile_n

  @property
  def acc_n(self) -> int:
    """Columns of one wgmma accumulator."""
    return min(self.acc_cols or self.wg_shape[1], self.wg_shape[1])

  @property
  def cta_n(self) -> int:
    """Output columns of one unit (both warpgroups')."""
    return 2 * self.tile_n

  def smem_bytes(self, out_itemsize: int) -> int:
    operands = (self.tile_m + self.cta_n) * TILE_K  # e4m3: 1 byte each
    scales = (self.tile_m + self.cta_n) * 4  # the column vector, in case it is used
    out = 2 * self.wg_shape[0] * self.wg_shape[1] * out_itemsize
    return self.stages * (operands + scales) + out

  def fit_smem(self, out_itemsize: int) -> "Fp8TileConfig":
    """Drops stages (not below 2), then halves tile_n, until shared memory fits."""
    return shrink_to_fit(self, lambda cfg: cfg.smem_bytes(out_itemsize), _SMEM_BUDGET)


# Key: (K, N, out dtype name). From experiments/bench_fp8.py on H200s (BENCHMARKS.md, session 6,
# 2026-11-30): the old single 128 x 128 accumulator per warpgroup spilled (489 TFLOP/s at 8192^3,
# 445 / 365 on the Ling-mini experts up / down). Two 128 x 64 accumulators per warpgroup: 1147
# and 1175 at 8192^3 (two machines), 966 / 551 on the experts, where 128 x 128 units with each
# warpgroup on 64 rows (wg_split "m") gave 862 / 523 in the same call. Those bf16-output timings
# were of the kernel before session 8's store fix (its outputs were wrong); after it, 1108 at
# 8192^3 (the experts not yet re-timed). Session 10 (one call, bf16 out, balanced, bf16 grouped
# GEMM 757 / 608): 128 x 128 units split by rows with 64-column accumulators, the pipeline
# chained across units and each promotion overlapping the next wgmma, 941 (up) / 697 (down)
# against 931 / 569 for the session 6 tiling; chaining alone gave the down projection 633-661.
# Session 17 (four machines, bf16 out, balanced): one 64 x 128 accumulator per warpgroup (no
# overlap) beat two 64 x 64 with overlap on both: up 942 / 949 / 981 / 950 against 921 / 919 /
# 948 / 911; down, with bands 16 row tiles wide, 692 / 738 / 721 against 664 / 698 / 693 (three
# machines). Two output slots (`double_staging`) were level or worse (down 674-739, up 878-972).
# Session 18 (five calls on four machines, session 17's two included): the input gradients run
# the down projection's tiling too, up dgrad 882-903 against 843-864 for their old table
# tilings, down dgrad 897-920 against 873-902.
# Session 19 (five calls on four machines): that tiling on the module's own ring (`flat`)
# rather than Pallas's chained pipeline: down 755-770 against 725-745, up dgrad 896-901 against
# 874-885, down dgrad 905-915 against 877-921 (level); the up projection 938-978 against 961-975
# on its own tiling, so it stays chained. Five stages, ping-pong warpgroups ("p") and each
# promotion beside the next step's wgmma all lost (BENCHMARKS.md). Session 20 (one machine): 3 / 4
# / 5 stages ran the down projection at 655 / 752-762 / 718 TFLOP/s, its loads and stores alone
# (probe "no_mma") at 811 / 926 / 960; ptxas reports no spills and no serialised wgmmas.
# Session 21 (calls 5-9, three machines): the flat ring's unit table (`unit_table`) took the
# down projection from 735-761 to 784-819 and the up projection's input gradient from 869-905
# to 891-930, and cost the down projection's input gradient 2-3% (867-890 against 891-900),
# whose units are 16 K steps long: there it is off. Freeing each ring slot before the
# promotion (`release_early`): down 795 / 819 against 782 / 810, the input gradients level.
# The up projection on the flat ring with the table: 943-967 against 953-965 chained. The
# epilogue in the next unit's first wgmma (`shadow_epilogue`, call 9): down level (779 / 787
# against 791), up dgrad 933 / 929 against 921 / 917; one call, so no entry takes it yet.
# Session 23 (calls 1-3, one machine): SMs in pairs sharing A's boxes (`cluster_a`) take the up
# projection from 958-980 chained (960-968 flat) to 993-1003, and 817-821 to 827-833 sustained
# under the power cap; the down projection level (795-805 against 795-817, 677 against 681
# sustained, at grid widths 8-32 too), its input gradients level (912 / 913 against 901 / 930).
# Absent shapes take the default, narrowed by `fit_smem` and by N.
_EXPERTS_FWD = Fp8TileConfig(tile_n=64, stages=4, grid_minor="m", grid_width=4, wg_split="m",
                             acc_cols=128, chain=True)
# Bands of 16 row tiles, on the flat ring.
_EXPERTS_WIDE = dataclasses.replace(_EXPERTS_FWD, grid_width=16, chain=False, flat=True)
TILE_CONFIGS: dict[tuple[int, int, str], Fp8TileConfig] = {
    # Ling-mini expert gate+up: bands of 4 row tiles, the flat ring in pairs of SMs
    (2048, 1024, "bfloat16"): dataclasses.replace(_EXPERTS_FWD, chain=False, flat=True,
                                                  cluster_a=True),
    (512, 2048, "bfloat16"): _EXPERTS_WIDE,  # Ling-mini expert down
    # Their input gradients (session 10's were 836 / 841 for the default and two 64 x 64
    # accumulators with overlap; bf16 624 / 614)
    (1024, 2048, "bfloat16"): _EXPERTS_WIDE,
    (2048, 512, "bfloat16"): dataclasses.replace(_EXPERTS_WIDE, unit_table=False),
    # Ling-flash expert gate+up: not timed with the new tilings yet (session 4's choice)
    (4096, 2048, "bfloat16"): Fp8TileConfig(grid_minor="m", grid_width=4),
}
# Session 10, dense (same call): 128 x 128 units split by rows, chained, overlapped, 1144 at
# 8192^3 against 1062 for session 6's default (n split, unchained); Ling-mini's QKV 1053 / 996,
# attention out 1027 / 954, dense FFN up 1107 / 1048, down 1041 / 1069. The chain lowers the
# stages to 2 where 3 do not divide K's steps (`chained`).
DEFAULT_TILE_CONFIG = Fp8TileConfig(grid_minor="m", grid_width=16, wg_split="m", acc_cols=64,
                                    chain=True, overlap=True)
# B in 1x128 tiles (the linears' weight gradients, K = tokens; `bench_fp8
# --sections=dense_wgrad`, session 11): n split and chained, 615 / 814 / 860 / 717 TFLOP/s at
# Ling-mini's QKV / attention out / dense FFN up / down, against 594 / 769 / 824 / 673 for
# session 6's (unchained), 617 / 768 / 859 / 714 for DEFAULT_TILE_CONFIG's, and 486-676 with n
# split, chained and overlapped.
TILE_SCALED_DEFAULT = Fp8TileConfig(grid_minor="m", grid_width=16, acc_cols=64, chain=True)


# Split-K (`gmm_fp8`'s k_splits) chosen by `auto_k_splits` for dense GEMMs on the GPU while this
# is True: for the weight gradients of small weights, whose output tiles leave SMs idle. On an
# H200 (session 13, `bench_fp8 --sections=dense_wgrad --wgrad_tokens=49152`, TFLOP/s at 1 / 2 /
# 4 splits): the shared expert's down [512, 2048] 200 / 692 / 697 and gate+up [2048, 1024]
# 404 / 739 / 722; the dense FFN's down [5120, 2048] 684 / 780 / 751 and up 745 / 764 / 737;
# attention out 805 / 759 / 754 (XLA's bf16 wgrads: 756, 796, 801, 779, 863).
_AUTO_SPLIT_K_ON_GPU = True


def auto_k_splits(units: int, k_steps: int, num_sms: int, min_steps: int = 8,
                  min_gain: float = 0.15, split_units: int | None = None) -> int:
  """Splits of K (1, 2, 4 or 8) for `units` output tiles of k_steps 128-steps on num_sms SMs.

  A persistent grid runs ceil(units / num_sms) rounds of whole units. Split, the partials are
  fp32 and may take a narrower tiling: split_units tiles (default units), each units /
  split_units of an unsplit tile's work; s splits make them s times as many and s times
  shorter: ceil(s * split_units / num_sms) / s * units / split_units rounds of the unsplit
  length. The least time wins (the fewest splits among equals), if it saves min_gain of the
  unsplit time and leaves each split min_steps steps; else 1. A split count beats a smaller one
  only by 5% or more (more splits, more fp32 partials to add up).
  """
  split_units = split_units or units

  def rounds(splits):
    if splits == 1:
      return pl.cdiv(units, num_sms)
    return pl.cdiv(splits * split_units, num_sms) / splits * units / split_units
  best = 1
  for splits in (2, 4, 8):
    if (k_steps % splits == 0 and k_steps // splits >= min_steps
        and rounds(splits) < 0.95 * rounds(best)):
      best = splits
  return best if rounds(best) <= (1 - min_gain) * rounds(1) else 1


def chained(cfg: Fp8TileConfig, k_steps: int) -> Fp8TileConfig:
  """cfg with `chain` kept only where it can run: the stages lowered to the largest divisor of
  K's steps (at least 2) that is no more than cfg.stages; unchained where there is none and
  for the "no_promote" probe (its slots are released a step late)."""
  if not cfg.chain:
    return cfg
  if cfg.probe != "no_promote":
    for stages in range(min(cfg.stages, k_steps), 1, -1):
      if k_steps % stages == 0:
        return dataclasses.replace(cfg, stages=stages)
  return dataclasses.replace(cfg, chain=False)


def tile_config(k_dim: int, n_dim: int, out_dtype, b_scaling: str = "block") -> Fp8TileConfig:
  """The tuned tiling for a shape, else the default (for B's scaling) with tile_n narrowed until
  2 * tile_n | N."""
  out_dtype = jnp.dtype(out_dtype)
  default = TILE_SCALED_DEFAULT if b_scaling == "tile" else DEFAULT_TILE_CONFIG
  cfg = TILE_CONFIGS.get((k_dim, n_dim, out_dtype.name), default)
  if cfg.flat and b_scaling != "block":  # the flat ring takes block-scaled B only
    cfg = dataclasses.replace(cfg, flat=False, chain=True, cluster_a=False)
  cfg = cfg.fit_smem(out_dtype.itemsize)
  while n_dim % cfg.cta_n and cfg.tile_n > 64:
    cfg = dataclasses.replace(cfg, tile_n=cfg.tile_n // 2)
  return cfg


def supports(k_dim: int, n_dim: int, out_dtype, cfg: Fp8TileConfig | None = None) -> bool:
  """Whether the kernel covers a GEMM with contraction K and N output columns."""
  out_dtype = jnp.dtype(out_dtype)
  if out_dtype not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float32)):
    return False
  cfg = (cfg or tile_config(k_dim, n_dim, out_dtype)).fit_smem(out_dtype.itemsize)
  wg_rows, wg_cols = cfg.wg_shape
  flat_ok = not cfg.flat or (cfg.scalar_b_scale and not cfg.chain
                             and cfg.probe not in ("no_promote", "const_sb"))
  cluster_ok = not cfg.cluster_a or (cfg.flat and cfg.unit_table
                                     and n_dim % (2 * cfg.cta_n) == 0)
  return (cfg.probe in _PROBES and cfg.wg_split in ("n", "m") and flat_ok and cluster_ok
          and cfg.smem_bytes(out_dtype.itemsize) <= _SMEM_BUDGET
          # chunks of whole 128-byte swizzle rows of the output tile (its stores slice them)
          and wg_cols % cfg.acc_n == 0 and cfg.acc_n * out_dtype.itemsize % 128 == 0
          # an accumulator's columns lie in one 128x128 block of B (one block scale)
          and (TILE_K % cfg.acc_n == 0 or cfg.probe == "no_promote") and wg_rows % 64 == 0
          and k_dim >= TILE_K
          and k_dim % TILE_K == 0 and n_dim % cfg.cta_n == 0 and cfg.tile_m % 64 == 0)


def swizzled(block_shape, dtype, tile_rows: int = 8):
  """The tiling and swizzle transforms of a shared-memory tile whose rows are block_shape[-1]
  elements of dtype (the widest swizzle that divides a row)."""
  swizzle = plgpu.find_swizzle(block_shape[-1] * jnp.dtype(dtype).itemsize * 8)
  return (plgpu.TilingTransform((tile_rows, swizzle // jnp.dtype(dtype).itemsize)),
          plgpu.SwizzleTransform(swizzle))


def _store_owned_rows(out_smem, out_gmem, read_start, own_offset, own_rows, col_start, tile_m):
  """TMA-stores rows [own_offset, own_offset + own_rows) of the tile in power-of-two pieces.

  Same scheme as grouped_matmul_mgpu's `_store_rows` (kept here: that module's private helpers
  may change under it).
  """
  offset, piece = own_offset, tile_m
  while piece >= 1:
    @pl.when((own_rows & piece) != 0)
    def _(offset=offset, piece=piece):
      plgpu.copy_smem_to_gmem(
          out_smem.at[pl.ds(offset, piece)],
          out_gmem.at[pl.ds(read_start + offset, piece), pl.ds(col_start, out_smem.shape[1])],
          commit_group=False)
    offset = offset + (own_rows & piece)
    piece //= 2
  plgpu.commit_smem_to_gmem_group()


def zero_sums(cfg: Fp8TileConfig) -> tuple:
  """The running fp32 sums of one warpgroup's part of a unit, one array per accumulator."""
  wg_rows, wg_cols = cfg.wg_shape
  zeros = jnp.zeros((wg_rows, cfg.acc_n), jnp.float32)
  return tuple(plgpu.layout_cast(zeros, plgpu.Layout.WGMMA)
               for _ in range(wg_cols // cfg.acc_n))


def mma_promote(cfg: Fp8TileConfig, a_smem, b_smem_NK, sums: tuple, scale_of,
                release=None) -> tuple:
  """One K step of a warpgroup: sums[c] += (A @ B[cols of c]^T) * scale_of(c).

  a_smem holds the warpgroup's rows of A, b_smem_NK its rows of B (output columns). Per
  accumulator c (cfg.acc_n columns), one wgmma into a fresh fp32 accumulator, then its wait and
  the promotion; with cfg.overlap the wgmma of c + 1 runs while c is promoted. scale_of(c) gives
  a rows x acc_n scale. release(), if given, runs as soon as the step's last wgmma is waited
  for, before its promotion: the step's operands in shared memory are free from then on (so
  scale_of must not read them).
  """
  def issue(acc_ref, c):
    b_cols = b_smem_NK.at[pl.ds(c * cfg.acc_n, cfg.acc_n)]
    plgpu.wgmma(acc_ref, a_smem, b_cols.transpose((1, 0)))

  if cfg.overlap and len(sums) > 1:
    shape = sums[0].shape

    def promote_from(c, acc_ref, out):
      """acc_ref holds accumulator c's wgmma in flight: issue c + 1's into a fresh accumulator
      (a nested scope, so that its zeros are made only now), then wait for c alone (wait_n=1
      leaves c + 1 running) and promote it."""
      if c + 1 == len(sums):
        part_RN = plgpu.wgmma_accumulator_load(acc_ref, wait_n=0)
        if release is not None:
          release()
        return (*out, sums[c] + part_RN * scale_of(c))

      def next_scope(next_ref):
        issue(next_ref, c + 1)
        part_RN = plgpu.wgmma_accumulator_load(acc_ref, wait_n=1)
        return promote_from(c + 1, next_ref, (*out, sums[c] + part_RN * scale_of(c)))
      return pl.run_scoped(next_scope, plgpu.ACC(shape, jnp.float32))

    def first_scope(acc_ref):
      issue(acc_ref, 0)
      return promote_from(0, acc_ref, ())
    return pl.run_scoped(first_scope, plgpu.ACC(shape, jnp.float32))

  out = []
  for c, sum_RN in enumerate(sums):
    def partial(acc_ref, c=c):
      issue(acc_ref, c)
      return acc_ref[...]  # waits for the wgmma

    part_RN = pl.run_scoped(partial, plgpu.ACC(sum_RN.shape, jnp.float32))
    if release is not None and c + 1 == len(sums):
      release()
    out.append(sum_RN + part_RN * scale_of(c))
  return tuple(out)


def store_sums(out_smem_wg, sums: tuple) -> None:
  """Writes a warpgroup's sums into its output tiles in shared memory, one per accumulator.

  Each accumulator has a whole swizzled tile of its own ([c] of `out_smem_wg`), rather than a
  column slice of one tile: on the GPU a store into a column slice of a swizzled tile wrote the
  bf16 outputs of split accumulators to the wrong places (relative error 1.0 against the
  reference; interpret mode, which has no swizzle, was right). fp32 outputs never split there:
  their tile_n is 64 after `fit_smem`.
  """
  for c, sum_RN in enumerate(sums):
    out_smem_wg.at[c][...] = sum_RN.astype(out_smem_wg.dtype)


def _kernel_body(cfg: Fp8TileConfig, num_groups: int, scalar_sb: bool, k_splits: int,
                 has_table: bool, *refs):
  """Memory warpgroup: TMA ring of A, B, sa (and sb columns). Compute warpgroups: wgmma + fp32
  promotion. With scalar_sb, sb_gmem is [G, Kt, Nt] block scales read as scalars from global
  memory, one step ahead; else [G, Kt, N], a column vector a step through the ring. With
  k_splits > 1, out_gmem is [k_splits, M, N]: unit (s, item, column tile) contracts the s-th
  k_splits-th of K into out[s]. The ring is Pallas's warp-specialised pipeline, or with cfg.flat
  this module's own (`_flat_ring`), which also takes `unit_table`'s rows where they fit in
  shared memory (with has_table: table_gmem, after the schedule's refs)."""
  count_gmem, group_gmem, start_gmem, offset_gmem, rows_gmem = refs[:5]
  table_gmem = refs[5] if has_table else None
  a_gmem, sa_gmem, b_gmem, sb_gmem, out_gmem = refs[-5:]
  k_steps = a_gmem.shape[1] // TILE_K // k_splits  # a unit's K steps
  k_len = k_steps * TILE_K
  tm, tn, cta_n, acc_n = cfg.tile_m, cfg.tile_n, cfg.cta_n, cfg.acc_n
  n_tiles = out_gmem.shape[-1] // cta_n
  f32 = jnp.float32

  def pipeline(mma_step, compute_context, col_tile, state=None):
    # "no_promote" keeps a wgmma in flight past its step: release each slot one step late.
    late = dict(delay_release=1) if cfg.probe == "no_promote" else {}
    in_specs = [
        plgpu.BlockSpec((tm, TILE_K), lambda k: (0, k),
                        transforms=swizzled((tm, TILE_K), a_gmem.dtype), memory_space=plgpu.SMEM,
                        **late),
        plgpu.BlockSpec((cta_n, TILE_K), lambda k: (col_tile, k),
                        transforms=swizzled((cta_n, TILE_K), b_gmem.dtype),
                        memory_space=plgpu.SMEM, **late),
        plgpu.BlockSpec((1, tm), lambda k: (k, 0), memory_space=plgpu.SMEM, **late),
    ]
    if not scalar_sb:
      in_specs.append(plgpu.BlockSpec((1, cta_n), lambda k: (k, col_tile),
                                      memory_space=plgpu.SMEM, **late))
    return plgpu.emit_pipeline_warp_specialized(
        mma_step,
        grid=(k_steps,),
        memory_registers=40,
        in_specs=in_specs,
        wg_axis="wg",
        num_compute_wgs=2,
        max_concurrent_steps=cfg.stages,
        compute_context=compute_context,
        pipeline_state=state,
    )

  def operands(start, group, split=0):
    g = jnp.minimum(group, num_groups - 1)
    if k_splits == 1:
      ops = (a_gmem.at[pl.ds(start, tm)], b_gmem.at[g], sa_gmem.at[:, pl.ds(start, tm)])
      return ops + (sb_gmem.at[g],) if not scalar_sb else ops
    # The split's K range: byte offsets along K are multiples of 128 (TMA wants 16).
    k0 = split * k_len if isinstance(split, int) else pl.multiple_of(split * k_len, TILE_K)
    kt0 = split * k_steps
    ops = (a_gmem.at[pl.ds(start, tm), pl.ds(k0, k_len)], b_gmem.at[g, :, pl.ds(k0, k_len)],
           sa_gmem.at[pl.ds(kt0, k_steps), pl.ds(start, tm)])
    return ops + (sb_gmem.at[g, pl.ds(kt0, k_steps)],) if not scalar_sb else ops

  # This compute warpgroup's part of a unit: rows [row0, row0 + wg_rows), columns
  # [col0, col0 + wg_cols) of the CTA's tile (Fp8TileConfig.wg_split).
  wg_rows, wg_cols = cfg.wg_shape
  split_m = wg_rows != tm

  def unit_work(index, wg, out_smem, row=None):
    """The unit of grid index `index`: where it lies, and the compute warpgroup wg's K step and
    epilogue for it. `row`, a ref to the unit's row of `unit_table` in shared memory, gives
    where it lies without the schedule's chain of global reads."""
    row0, col0 = (wg * wg_rows, 0) if split_m else (0, wg * tn)
    if row is not None:
      group, start, offset, rows, ni, split = (row[f] for f in range(_UNIT_FIELDS))
    else:
      # Splits outermost: concurrent units share the split's K range of A and B in L2.
      split, unit = jax.lax.div(index, count_gmem[0] * n_tiles), jax.lax.rem(
          index, count_gmem[0] * n_tiles)
      if cfg.grid_minor == "m":
        item, ni = plgpu.planar_snake(unit, (count_gmem[0], n_tiles), 0, cfg.grid_width)
      else:
        item, ni = unit // n_tiles, unit % n_tiles
      group, start = group_gmem[item], start_gmem[item]
      offset, rows = offset_gmem[item], rows_gmem[item]
    start = pl.multiple_of(start, _ROW_ALIGN)
    out_split = out_gmem if k_splits == 1 else out_gmem.at[split]

    def store(sums):
      # The last unit's stores must have read the output tiles before they are written again.
      num_acc = wg_cols // acc_n
      plgpu.wait_smem_to_gmem(0, wait_read_only=True)
      if cfg.probe in ("no_store", "no_smem_out"):  # rows < 0 never holds (probe doc)
        pl.when(rows < 0)(lambda: store_sums(out_smem.at[wg], sums))
      else:
        store_sums(out_smem.at[wg], sums)
      plgpu.commit_smem()
      if cfg.probe == "no_store":
        return
      # The unit owns rows [offset, offset + rows) of the tile; this warpgroup stores its share.
      lo = jnp.clip(offset - row0, 0, wg_rows)
      hi = jnp.clip(offset + rows - row0, 0, wg_rows)
      for c in range(num_acc):
        _store_owned_rows(out_smem.at[wg, c], out_split, start + row0, lo, hi - lo,
                          ni * cta_n + col0 + c * acc_n, wg_rows)

    def block_scales(k):
      """B's 128x128 block scales of K step k, one per accumulator, from global memory."""
      if not scalar_sb:  # the column vector comes through the ring
        return None
      if cfg.probe == "const_sb":
        return (jnp.float32(1.0),) * (wg_cols // acc_n)
      g = jnp.minimum(group, num_groups - 1)
      return tuple(sb_gmem[g, split * k_steps + k, (ni * cta_n + col0 + c * acc_n) // TILE_K]
                   for c in range(wg_cols // acc_n))

    def mma_step(idx, a_smem, b_smem, sa_smem, *rest, release=None):
      """One K step; release() (the flat ring's) frees the step's ring slot once its wgmmas
      are done, before the promotion: its scales are in registers by then."""
      *sb_smem, carry = rest
      a_wg = a_smem.at[pl.ds(row0, wg_rows)] if split_m else a_smem
      b_wg = b_smem.at[pl.ds(col0, wg_cols)]
      if release is not None and not scalar_sb:
        raise ValueError("mma_step: release() needs B's block scales in registers "
                         "(scalar_b_scale), as the flat ring runs.")
      if cfg.probe == "no_promote":  # carry is the accumulator; keep one wgmma in flight
        plgpu.wgmma(carry, a_wg, b_wg.transpose((1, 0)))
        plgpu.wgmma_wait(1)
        return carry
      if cfg.probe == "no_mma":
        if release is not None:
          release()
        return carry
      sums, sb = carry
      # The next step's block scales: their global-memory latency hides behind this step.
      sb_next = block_scales(jnp.minimum(idx[0] + 1, k_steps - 1))
      sa_R = plgpu.load(sa_smem.at[0, pl.ds(row0, wg_rows)],
                        layout=plgpu.Layout.WGMMA.reduce(1))

      def scale_of(c):
        if scalar_sb:
          return jax.lax.broadcast_in_dim(sa_R * sb[c], (wg_rows, acc_n), [0])
        sb_N = plgpu.load(sb_smem[0].at[0, pl.ds(col0 + c * acc_n, acc_n)],
                          layout=plgpu.Layout.WGMMA.reduce(0))
        return (jax.lax.broadcast_in_dim(sa_R, (wg_rows, acc_n), [0])
                * jax.lax.broadcast_in_dim(sb_N, (wg_rows, acc_n), [1]))

      return mma_promote(cfg, a_wg, b_wg, sums, scale_of, release), sb_next

    def finish(sums):
      """The epilogue after the pipeline: tail units (which ran it too) store zeros."""
      is_tail = group == num_groups
      pl.when(is_tail)(lambda: store(zero_sums(cfg)))
      pl.when(jnp.logical_not(is_tail))(lambda: store(sums))

    return types.SimpleNamespace(split=split, ni=ni, group=group, start=start, store=store,
                                 finish=finish, block_scales=block_scales, mma_step=mma_step)

  # [warpgroup, accumulator]: one output tile per accumulator (`store_sums`). Row-major with
  # wg_split "m" (a swizzled tile was level there, session 18).
  out_smem_type = plgpu.SMEM((2, wg_cols // acc_n, wg_rows, acc_n), out_gmem.dtype,
                             transforms=() if split_m else
                             swizzled((wg_rows, acc_n), out_gmem.dtype, tile_rows=1))
  if cfg.flat:
    _flat_ring(cfg, k_steps, n_tiles * k_splits, count_gmem, table_gmem, unit_work,
               out_smem_type, a_gmem, sa_gmem, b_gmem, operands)
    return

  ignore = lambda *_, **__: None

  @functools.partial(
      pl.run_scoped,
      allocs=pipeline(ignore, ignore, 0, plgpu.PipelinePipeline.START if cfg.chain else None
                      ).get_allocations(*operands(0, 0)),
      out_smem=out_smem_type,
      collective_axes="wg",
  )
  def _scope(allocs, out_smem):
    wg = jax.lax.axis_index("wg")

    @plgpu.nd_loop((count_gmem[0] * n_tiles * k_splits,), collective_axes="sm")
    def _unit(info):
      u = unit_work(info.index[0], wg, out_smem)

      def compute_context(run_pipeline):
        if cfg.probe == "no_promote":
          def run(acc_ref):
            run_pipeline(acc_ref)
            u.store((acc_ref[...],))
          pl.run_scoped(run, plgpu.ACC((wg_rows, wg_cols), f32))
        elif cfg.chain:  # tail units ran the pipeline too (below): store zeros for them
          sums, _ = run_pipeline((zero_sums(cfg), u.block_scales(0)))
          u.finish(sums)
        else:
          sums, _ = run_pipeline((zero_sums(cfg), u.block_scales(0)))
          u.store(sums)

      ops = operands(u.start, u.group, u.split)
      if cfg.chain:
        # One pipeline across all of this SM's units. Every unit runs it, tail units too (on
        # the last group's weights), since a skipped call would break the chain. A lone unit
        # starts it and never stops it: the kernel ends there, with nothing left in flight.
        last = info.num_local_steps - 1
        state = jnp.where(
            info.local_index == 0, int(plgpu.PipelinePipeline.START),
            jnp.where(info.local_index == last, int(plgpu.PipelinePipeline.STOP),
                      int(plgpu.PipelinePipeline.STEADY)))
        pipeline(u.mma_step, compute_context, u.ni, state)(*ops, allocations=allocs)
      else:
        @pl.when((u.group == num_groups) & (wg < 2))
        def _():
          u.store(zero_sums(cfg))

        @pl.when(u.group != num_groups)
        def _():
          pipeline(u.mma_step, compute_context, u.ni)(*ops, allocations=allocs)

  plgpu.wait_smem_to_gmem(0, wait_read_only=True)


def _flat_ring(cfg: Fp8TileConfig, k_steps: int, units_per_item: int, count_gmem, table_gmem,
               unit_work, out_smem_type, a_gmem, sa_gmem, b_gmem, operands):
  """cfg.flat: one ring of cfg.stages slots across all of an SM's (unit, K step) pairs, any
  stage count. The SM's local unit j's step k is step t = j * k_steps + k of the ring, in slot
  t % stages. The memory warpgroup waits until step t - stages is consumed (both compute
  warpgroups arrived), then TMA-loads A's, B's and sa's boxes of step t, all three on the slot's
  "loaded" barrier; both compute warpgroups wait on it, run the step (`unit_work`'s mma_step)
  and arrive on "consumed". Every unit runs its steps, tail units too (they store zeros), so
  both sides count steps alike. Pallas's chained pipeline needs the stages to divide K's steps
  (4 at K = 512); this ring takes any count. At the same 4 stages it ran the Ling-mini down
  projection 1-6% faster than the chained pipeline (session 19), why is not established.

  Where each unit lies comes from this SM's rows of `unit_table` (table_gmem), which the memory
  warpgroup TMA-loads into shared memory first: a unit then starts with shared-memory reads, not
  with the schedule's chain of dependent global reads (count, then item, then its group, then
  B's block scale). On the down projection (session 21's profiles) that chain, "unit_head", took
  14% of a compute warpgroup's time and takes 3% with the table: 4,925 -> 4,337 cycles a unit.
  Without the table (too large for shared memory, or `unit_table` off) the kernel reads the
  schedule as before.

  Each side's phases are named scopes: "wait_consumed" and "issue_loads" (memory warpgroup),
  "unit_head", "wait_loaded", "mma_promote" and "epilogue" (compute warpgroups).
  `gmm_fp8(profile_dir=...)` records them per warpgroup with Mosaic GPU's on-device profiler;
  without it they cost nothing."""
  tm, cta_n, stages = cfg.tile_m, cfg.cta_n, cfg.stages
  # TMA boxes are at most 256 rows: the SM's rows of the table in pieces of 256.
  max_local = 0 if table_gmem is None else table_gmem.shape[1]
  table_chunks = [(lo, min(256, max_local - lo)) for lo in range(0, max_local, 256)]
  table_allocs = {} if table_gmem is None else dict(
      table_smem=plgpu.SMEM(table_gmem.shape[1:], table_gmem.dtype),
      table_loaded=plgpu.Barrier(num_arrivals=len(table_chunks)))
  # The persistent grid's places: SMs, or with cfg.cluster_a pairs of them, whose SMs are rows
  # 2 * pair + rank of the unit table and take the same number of units (`unit_table`).
  place, num_places = jax.lax.axis_index("sm"), jax.lax.axis_size("sm")
  if cfg.cluster_a:
    units_per_item //= 2
    sm, num_sms = 2 * place + jax.lax.axis_index("cluster"), 2 * num_places
  else:
    sm, num_sms = place, num_places
  num_local = (jnp.maximum(count_gmem[0] * units_per_item - place + num_places - 1, 0)
               // num_places)
  # With cfg.cluster_a a slot is refilled once all four compute warpgroups of the pair are done
  # with it: the peer's multicast writes into this SM's shared memory too.
  consumed_type = (functools.partial(plgpu.ClusterBarrier, collective_axes=("cluster",))
                   if cfg.cluster_a else plgpu.Barrier)
  multicast = dict(collective_axes="cluster") if cfg.cluster_a else {}

  @functools.partial(
      pl.run_scoped,
      a_smem=plgpu.SMEM((stages, tm, TILE_K), a_gmem.dtype,
                        transforms=swizzled((tm, TILE_K), a_gmem.dtype)),
      b_smem=plgpu.SMEM((stages, cta_n, TILE_K), b_gmem.dtype,
                        transforms=swizzled((cta_n, TILE_K), b_gmem.dtype)),
      sa_smem=plgpu.SMEM((stages, 1, tm), jnp.float32),
      out_smem=out_smem_type,
      loaded=plgpu.Barrier(num_arrivals=3, num_barriers=stages),  # A, B, sa
      consumed=consumed_type(num_arrivals=2, num_barriers=stages),  # both compute warpgroups
      collective_axes="wg",
      **table_allocs,
  )
  def _scope(a_smem, b_smem, sa_smem, out_smem, loaded, consumed, table_smem=None,
             table_loaded=None):
    wg = jax.lax.axis_index("wg")
    row_of = lambda j: None if table_smem is None else table_smem.at[j]

    if table_smem is not None:
      @pl.when(wg == 2)
      def _load_table():
        for lo, size in table_chunks:
          plgpu.copy_gmem_to_smem(table_gmem.at[sm, pl.ds(lo, size)],
                                  table_smem.at[pl.ds(lo, size)], table_loaded)

      plgpu.barrier_wait(table_loaded)

    @pl.when(wg == 2)
    def _memory():
      plgpu.set_max_registers(40, action="decrease")

      @pl.loop(0, num_local)
      def _unit(j):
        u = unit_work(j * num_sms + sm, wg, out_smem, row_of(j))
        a_src, b_src, sa_src = operands(u.start, u.group, u.split)[:3]
        b_src = b_src.at[pl.ds(u.ni * cta_n, cta_n)]

        @pl.loop(0, k_steps)
        def _step(k):
          t = j * k_steps + k
          slot = t % stages
          with jax.named_scope("wait_consumed"):
            pl.when(t >= stages)(lambda: plgpu.barrier_wait(consumed.at[slot]))
          with jax.named_scope("issue_loads"):
            k0 = pl.multiple_of(k * TILE_K, TILE_K)
            barrier = loaded.at[slot]
            plgpu.copy_gmem_to_smem(a_src.at[:, pl.ds(k0, TILE_K)], a_smem.at[slot], barrier,
                                    **multicast)
            plgpu.copy_gmem_to_smem(b_src.at[:, pl.ds(k0, TILE_K)], b_smem.at[slot], barrier)
            plgpu.copy_gmem_to_smem(sa_src.at[pl.ds(k, 1)], sa_smem.at[slot], barrier)

      drain_ring(consumed, num_local * k_steps, stages)

    @pl.when(wg < 2)
    def _compute():
      plgpu.set_max_registers(232, action="increase")

      @pl.loop(0, num_local)
      def _unit(j):
        with jax.named_scope("unit_head"):
          u = unit_work(j * num_sms + sm, wg, out_smem, row_of(j))
          init = (zero_sums(cfg), u.block_scales(0))

        def step(k, carry):
          slot = (j * k_steps + k) % stages
          with jax.named_scope("wait_loaded"):
            plgpu.barrier_wait(loaded.at[slot])
          release = lambda: plgpu.barrier_arrive(consumed.at[slot])
          with jax.named_scope("mma_promote"):
            # cfg.release_early: the slot is freed as soon as the step's wgmmas are done,
            # before the promotion, so that the memory warpgroup refills it that much sooner.
            carry = u.mma_step((k,), a_smem.at[slot], b_smem.at[slot], sa_smem.at[slot], carry,
                               release=release if cfg.release_early else None)
          if not cfg.release_early:
            release()  # mma_step waited for its wgmmas
          return carry

        # A loop, not unrolled: unrolled, the steps ran 3-7x slower on the GPU (session 19).
        sums, _ = jax.lax.fori_loop(0, k_steps, step, init)
        with jax.named_scope("epilogue"):
          u.finish(sums)

      plgpu.wait_smem_to_gmem(0, wait_read_only=True)


_UNIT_FIELDS = 6  # group, read start, owned offset, owned rows, column tile, K split
_UNIT_WORDS = 8  # a row of `unit_table`: the fields, padded to 32 bytes (TMA wants 16s)


def unit_table(schedule, cfg: Fp8TileConfig, n_tiles: int, k_splits: int,
               num_sms: int) -> jax.Array:
  """Where each SM's units lie, for the flat ring: [num_sms, max_local, _UNIT_WORDS] int32.

  Row [sm, j] is the SM's j-th unit, grid index j * num_sms + sm (the persistent grid's
  order), as `_kernel_body`'s unit_work derives it from the schedule: its group, first read
  row, owned rows' offset and count (the schedule's item), column tile and K split. Rows past
  an SM's units are never read. Computed by XLA before the kernel, so that the kernel reads
  each unit's fields from shared memory. With cfg.cluster_a, SMs 2p and 2p + 1 take the two
  column tiles of pair unit j * num_sms / 2 + p, in the same order over pairs of tiles.
  """
  max_items = schedule.group_I.shape[0]
  sm = jnp.arange(num_sms, dtype=jnp.int32)
  # With cfg.cluster_a the grid's places are pairs of SMs (2 * pair + rank), and a place's unit
  # is a pair of column tiles, ni = 2 * pair tile + rank: both SMs read the same rows of A.
  places, place, tiles = ((num_sms // 2, sm // 2, n_tiles // 2) if cfg.cluster_a
                          else (num_sms, sm, n_tiles))
  max_local = pl.cdiv(max_items * tiles * k_splits, places)
  index = jnp.arange(max_local, dtype=jnp.int32)[None, :] * places + place[:, None]
  count = schedule.num_items[0]
  split, unit = index // (count * tiles), index % (count * tiles)
  if cfg.grid_minor == "m":
    snake = lambda u: plgpu.planar_snake(u, (count, tiles), 0, cfg.grid_width)
    item, ni = jax.vmap(jax.vmap(snake))(unit)
  else:
    item, ni = unit // tiles, unit % tiles
  if cfg.cluster_a:
    ni = 2 * ni + (sm % 2)[:, None]
  item = jnp.clip(item, 0, max_items - 1)  # rows past the SM's units: any valid item
  fields = (schedule.group_I[item], schedule.read_start_I[item], schedule.own_offset_I[item],
            schedule.own_rows_I[item], ni, split)
  pad = (jnp.zeros_like(index),) * (_UNIT_WORDS - _UNIT_FIELDS)
  return jnp.stack([f.astype(jnp.int32) for f in fields] + list(pad), axis=-1)


def flat_unit_table(schedule, cfg: Fp8TileConfig, n_dim: int, k_splits: int, num_sms: int,
                    out_itemsize: int, reserved_bytes: int = 0) -> jax.Array | None:
  """`unit_table` for a flat tiling that asks for it, if one SM's rows fit in shared memory
  beside the tiling's buffers and reserved_bytes (the profiler's); else None (the kernel then
  derives each unit from the schedule in global memory)."""
  if not (cfg.flat and cfg.unit_table):
    return None
  table = unit_table(schedule, cfg, n_dim // cfg.cta_n, k_splits, num_sms)
  sm_bytes = table[0].size * table.dtype.itemsize
  if cfg.smem_bytes(out_itemsize) + sm_bytes + reserved_bytes > _SMEM_BUDGET:
    return None
  return table


def expand_block_scales(sb_GKtNt: jax.Array, n_dim: int) -> jax.Array:
  """Block scales [G, Kt, Nt] -> one per column of the output, [G, Kt, N]."""
  return jnp.repeat(sb_GKtNt, TILE_K, axis=2)[:, :, :n_dim]


# Jitted: a model calls it many times with the same shapes, and JAX then traces the kernel body
# (its Python-unrolled accumulators and pipeline) once per shape rather than once per call.
@functools.partial(jax.jit, static_argnames=("b_scaling", "out_dtype", "config", "interpret",
                                             "num_sms", "k_splits", "profile_dir",
                                             "profile_ranges"))
def gmm_fp8(a_q_MK: jax.Array, sa_KtM: jax.Array, b_q_GNK: jax.Array, sb_GKtX: jax.Array,
            group_sizes_G: jax.Array, *, b_scaling: str = "block", out_dtype=jnp.bfloat16,
            config: Fp8TileConfig | None = None, interpret=None,
            num_sms: int | None = None, k_splits: int | None = None,
            profile_dir: str | None = None, profile_ranges: int = 256) -> jax.Array:
  """out[rows of g] = dequant(A)[rows of g] @ dequant(B[g])^T, fp32-promoted; tail rows zero.

  Args:
    a_q_MK, sa_KtM: A in E4M3 and its 1x128 tile scales, transposed (module doc).
    b_q_GNK, sb_GKtX: B in E4M3 and its scales: [G, Kt, Nt] for b_scaling="block" (128x128
      blocks, transposed), [G, Kt, N] for "tile" (1x128 tiles of B's rows, transposed).
    group_sizes_G: rows per group; non-negative, summing to at most M.
    k_splits: K in this many equal parts (each a multiple of 128), one unit per part and output
      tile, their fp32 partial sums added after the kernel (split-K: more units when the output
      has fewer tiles than the GPU has SMs). None: `auto_k_splits` for a dense GEMM on the GPU
      while `_AUTO_SPLIT_K_ON_GPU` is set, else 1.
    profile_dir: on the GPU, record each warpgroup's named phases (the flat ring's: `_flat_ring`)
      with Mosaic GPU's on-device profiler and write a Chrome trace (`*-trace.json`, one per
      compiled kernel) there; `experiments/bench_fp8.py --profile_dir` sums them. The first
      profile_ranges ranges of each warpgroup are kept (16 bytes each, in shared memory beside
      the ring's: 3 x 256 take 12 KB), later ones dropped.
  """
  num_rows, k_dim = a_q_MK.shape
  num_groups, n_dim, _ = b_q_GNK.shape
  out_dtype = jnp.dtype(out_dtype)
  tiling = config or tile_config(k_dim, n_dim, out_dtype, b_scaling)
  k_steps = k_dim // TILE_K
  if k_splits is None:
    k_splits = 1
    if _AUTO_SPLIT_K_ON_GPU and interpret is None and num_groups == 1:
      def units(cfg):  # output tiles of a tiling
        return pl.cdiv(max(num_rows, cfg.tile_m), cfg.tile_m) * pl.cdiv(n_dim, cfg.cta_n)
      # Unsplit, the output dtype's tiling; split, the one the fp32 partials fit.
      k_splits = auto_k_splits(units(tiling.fit_smem(out_dtype.itemsize)), k_steps,
                               num_sms or device_num_sms(),
                               split_units=units(tiling.fit_smem(4)))
  if k_splits < 1 or k_steps % k_splits:
    raise ValueError(f"gmm_fp8: k_splits={k_splits} must be a positive divisor of K's "
                     f"{k_steps} steps of 128 (K={k_dim}); pass one, or None.")
  # Split-K partial sums are stored in fp32 and added after the kernel.
  store_dtype = out_dtype if k_splits == 1 else jnp.dtype(jnp.float32)
  cfg = chained(tiling.fit_smem(store_dtype.itemsize), k_steps // k_splits)
  profile = {}
  # 3 warpgroups, 2 events of 2 words per range.
  profile_bytes = 3 * profile_ranges * 16 if profile_dir else 0
  if profile_dir:
    tiling_bytes = cfg.smem_bytes(store_dtype.itemsize)
    if tiling_bytes + profile_bytes > _SMEM_BUDGET:
      raise ValueError(f"gmm_fp8: profile_ranges={profile_ranges} takes {profile_bytes} bytes "
                       f"of shared memory beside the tiling's {tiling_bytes}, past the "
                       f"{_SMEM_BUDGET} there are; pass fewer ranges or fewer stages.")
    profile = dict(profile_space=profile_ranges, profile_dir=profile_dir,
                   profile_bounds_check=True)
  kt, nt = k_dim // TILE_K, pl.cdiv(n_dim, TILE_K)
  want_sb = {"block": (num_groups, kt, nt), "tile": (num_groups, kt, n_dim)}.get(b_scaling)
  if (not supports(k_dim, n_dim, store_dtype, cfg) or b_q_GNK.shape[2] != k_dim
      or sa_KtM.shape != (kt, num_rows) or sb_GKtX.shape != want_sb
      or a_q_MK.dtype != jnp.float8_e4m3fn or b_q_GNK.dtype != jnp.float8_e4m3fn):
    raise ValueError(
        f"gmm_fp8: no Mosaic GPU kernel for A {a_q_MK.shape} {a_q_MK.dtype}, sa {sa_KtM.shape}, "
        f"B {b_q_GNK.shape} {b_q_GNK.dtype}, sb {sb_GKtX.shape} ({b_scaling}), out "
        f"{out_dtype}, {cfg}; check fp8_gemm_mgpu.supports and the scale layouts.")
  if cfg.probe == "no_promote" and cfg.acc_n != cfg.wg_shape[1]:
    raise ValueError(f"gmm_fp8: the 'no_promote' probe runs one accumulator per warpgroup; got "
                     f"acc_cols={cfg.acc_cols} of {cfg.wg_shape[1]} columns. Use acc_cols=0.")
  if cfg.flat and b_scaling != "block":
    raise ValueError(f"gmm_fp8: the flat ring (Fp8TileConfig.flat) runs 128x128 block-scaled B "
                     f"only, got b_scaling={b_scaling!r}; use a tiling without flat.")
  scalar_sb = b_scaling == "block" and cfg.scalar_b_scale
  if b_scaling == "block" and not scalar_sb:
    sb_GKtX = expand_block_scales(sb_GKtX, n_dim)
  # Row tiles start on multiples of 8 (the SMEM tiling): pad M to that, and to one tile at least.
  padded_rows = max(pl.cdiv(num_rows, _ROW_ALIGN) * _ROW_ALIGN, cfg.tile_m)
  if padded_rows != num_rows:
    a_q_MK = jnp.pad(a_q_MK, ((0, padded_rows - num_rows), (0, 0)))
    sa_KtM = jnp.pad(sa_KtM, ((0, 0), (0, padded_rows - num_rows)))
  schedule = make_tile_schedule(group_sizes_G, padded_rows, cfg.tile_m)
  out_type = jax.ShapeDtypeStruct(
      (padded_rows, n_dim) if k_splits == 1 else (k_splits, padded_rows, n_dim), store_dtype)
  num_sms = num_sms or device_num_sms()
  table = flat_unit_table(schedule, cfg, n_dim, k_splits, num_sms, store_dtype.itemsize,
                          profile_bytes)
  # Pairs of SMs take their units from the table only, over whole K.
  if cfg.cluster_a and (k_splits != 1 or num_sms % 2 or table is None):
    if config is not None:
      raise ValueError(f"gmm_fp8: Fp8TileConfig.cluster_a pairs SMs over whole K, with the unit "
                       f"table in shared memory; got k_splits={k_splits}, num_sms={num_sms}, "
                       f"table {'too large' if table is None else 'fits'}. Pass k_splits=1 and "
                       f"an even num_sms, or a tiling without cluster_a.")
    cfg = dataclasses.replace(cfg, cluster_a=False)  # the shape's tuned tiling, unpaired
    table = flat_unit_table(schedule, cfg, n_dim, k_splits, num_sms, store_dtype.itemsize,
                            profile_bytes)
  tables = () if table is None else (table,)
  pairs = dict(cluster=(2,), cluster_names=("cluster",)) if cfg.cluster_a else {}
  kernel = plgpu.kernel(
      functools.partial(_kernel_body, cfg, num_groups, scalar_sb, k_splits, bool(tables)),
      out_type=out_type,
      grid=(num_sms // 2 if cfg.cluster_a else num_sms,),
      grid_names=("sm",),
      **pairs,
      num_threads=3,
      thread_name="wg",
      compiler_params=plgpu.CompilerParams(
          lowering_semantics=plgpu.LoweringSemantics.Warpgroup, **profile),
      interpret=interpret,
  )
  out_MN = kernel(schedule.num_items, schedule.group_I, schedule.read_start_I,
                  schedule.own_offset_I, schedule.own_rows_I, *tables, a_q_MK,
                  sa_KtM.astype(jnp.float32), b_q_GNK, sb_GKtX.astype(jnp.float32))
  if k_splits > 1:
    out_MN = jnp.sum(out_MN, axis=0).astype(out_dtype)
  return out_MN[:num_rows] if padded_rows != num_rows else out_MN


def matmul_fp8(a_q_MK: jax.Array, sa_KtM: jax.Array, b_q_NK: jax.Array, sb_KtX: jax.Array, *,
               b_scaling: str = "block", out_dtype=jnp.bfloat16,
               config: Fp8TileConfig | None = None, interpret=None,
               num_sms: int | None = None, k_splits: int | None = None) -> jax.Array:
  """Dense dequant(A) @ dequant(B)^T: `gmm_fp8` with one group of all M rows."""
  return gmm_fp8(a_q_MK, sa_KtM, b_q_NK[None], sb_KtX[None],
                 jnp.full((1,), a_q_MK.shape[0], jnp.int32), b_scaling=b_scaling,
                 out_dtype=out_dtype, config=config, interpret=interpret, num_sms=num_sms,
                 k_splits=k_splits)


# Interpret mode (CPU tests): small tiles, since the interpreter's cost grows with tile sizes.
INTERPRET_CONFIG = Fp8TileConfig(tile_m=64, tile_n=64, stages=2)
