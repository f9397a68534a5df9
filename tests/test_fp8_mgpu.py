"""Tests for kernels/fp8_gemm_mgpu.py and its backends in kernels/fp8_gemm.py, on CPU.

The kernels run in Pallas's GPU interpret mode, which simulates TMA, barriers, the warp-specialised
pipeline and the e4m3 wgmma on the CPU, against float64 NumPy references built from the raw E4M3
codes and scales. They are also lowered for CUDA at full tile sizes, so layout inference and the
shared-memory budget are checked without a GPU. What only a GPU checks (the compiled PTX, real
wgmma rounding, timings) is in experiments/bench_fp8.py.

Key: M rows, K contraction, N output columns, G groups, Kt K-steps of 128.
"""

import dataclasses
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from jax.experimental.pallas import mosaic_gpu as plgpu

from kernels import fp8_gemm
from kernels import fp8_gemm_mgpu as mgpu
from kernels import fp8_quant as fq
from kernels import grouped_matmul_mgpu as gmm_mgpu

_INTERPRET = plgpu.InterpretGPUParams()
_SMALL = mgpu.INTERPRET_CONFIG


def _codes(rng, shape):
  """Random E4M3 codes spread over the format's range (zeros, subnormals and 448 included)."""
  x = rng.standard_normal(shape) * np.exp2(rng.integers(-8, 8, shape))
  x = np.clip(x, -448, 448)
  x.flat[:3] = (0.0, 448.0, 2.0**-9)
  return jnp.asarray(x.astype(ml_dtypes.float8_e4m3fn))


def _scales(rng, shape):
  return jnp.asarray(np.exp2(rng.integers(-12, 4, shape)) * rng.uniform(1, 2, shape), jnp.float32)


def _np(x):
  return np.asarray(x).astype(np.float64)


def _np_grouped(a_MK, b_GNK, sizes_G):
  out = np.zeros((a_MK.shape[0], b_GNK.shape[1]))
  start = 0
  for g, size in enumerate(sizes_G):
    out[start:start + size] = a_MK[start:start + size] @ b_GNK[g].T
    start += size
  return out


def _operands(rng, m_dim, k_dim, n_dim, groups):
  a_q, sa_MKt = _codes(rng, (m_dim, k_dim)), _scales(rng, (m_dim, k_dim // 128))
  b_q, sb_GNtKt = _codes(rng, (groups, n_dim, k_dim)), _scales(rng, (groups, n_dim // 128,
                                                                      k_dim // 128))
  a_MK = _np(a_q) * np.repeat(_np(sa_MKt), 128, axis=1)
  b_GNK = _np(b_q) * np.repeat(np.repeat(_np(sb_GNtKt), 128, axis=1), 128, axis=2)
  return (a_q, sa_MKt, b_q, sb_GNtKt), (a_MK, b_GNK)


def _assert_close(out, ref, rtol):
  out = np.asarray(out, np.float64)
  scale = np.abs(ref).max(axis=1, keepdims=True) + 1e-30  # per row: scales differ by 2^15
  np.testing.assert_array_less(np.abs(out - ref) / scale, rtol)


@pytest.mark.parametrize("case", ["ragged_with_tail", "ragged_with_tail_bf16", "all_empty",
                                  "spread"])
def test_grouped_kernel_matches_fp64(case):
  """Empty groups, groups under a tile, a shared tile, unaligned M and zero tail rows; two wgmma
  accumulators per warpgroup (acc_cols) in the ragged cases, each written through its own output
  tile, in fp32 and in bf16 (the model's dtype: on the GPU a column slice of one swizzled bf16
  tile was written wrongly, which interpret mode, without swizzle, cannot show; session 8).
  "spread": a 4-tile group beside 1- and 2-tile ones, whose items the schedule spreads among
  the large group's (out of group order)."""
  out_dtype, rtol = (jnp.bfloat16, 2**-8) if case.endswith("bf16") else (jnp.float32, 1e-5)
  case = case.removesuffix("_bf16")
  m_dim, sizes = {"ragged_with_tail": (203, [0, 70, 3, 0, 100]), "all_empty": (64, [0, 0]),
                  "spread": (330, [0, 200, 3, 0, 100])}[case]
  rng = np.random.default_rng(len(case))
  # N = 256 where there are rows: two column tiles, each in its own block of B (its own scale).
  n_dim = 128 if case == "all_empty" else 256
  (a_q, sa, b_q, sb), (a_MK, b_GNK) = _operands(rng, m_dim, 256, n_dim, len(sizes))
  # "m" order walks row tiles in bands (the dense kernel's L2 order); it must cover every unit.
  # Two wgmma accumulators per warpgroup (acc_cols) where there are rows.
  # In bf16, 128 columns per warpgroup in two 64-column accumulators, as the tuned tilings.
  bf16 = out_dtype == jnp.bfloat16
  cfg = mgpu.Fp8TileConfig(tile_m=64, tile_n=128 if bf16 else 64, stages=2, grid_minor="m",
                           grid_width=2, acc_cols=(64 if bf16 else 32) if case != "all_empty"
                           else 0)
  assert cfg.wg_shape[1] // cfg.acc_n == (1 if case == "all_empty" else 2)
  out = mgpu.gmm_fp8(a_q, sa.T, b_q, jnp.swapaxes(sb, 1, 2), jnp.asarray(sizes, jnp.int32),
                     out_dtype=out_dtype, config=cfg, interpret=_INTERPRET, num_sms=3)
  assert out.shape == (m_dim, n_dim) and out.dtype == out_dtype
  ref = _np_grouped(a_MK, b_GNK, sizes)
  _assert_close(out, ref, rtol)
  np.testing.assert_array_equal(np.asarray(out)[sum(sizes):], 0.0)


@pytest.mark.parametrize("case", ["ragged", "tile_scaled"])
def test_row_split_body_matches_fp64(case):
  """wg_split "m" (each compute warpgroup takes half the rows of a unit, all its columns) with
  several wgmma accumulators per warpgroup: units whose row ranges cut across the two halves,
  empty and tiny groups, zero tail rows; one group of all rows with B scaled per row (the
  wgrad's B)."""
  m_dim, sizes, cfg = {
      "ragged": (203, [0, 70, 3, 0, 100], mgpu.Fp8TileConfig(
          tile_m=128, tile_n=128, stages=2, grid_minor="m", grid_width=2, wg_split="m",
          acc_cols=64)),
      "tile_scaled": (130, [130], mgpu.Fp8TileConfig(
          tile_m=128, tile_n=64, stages=2, wg_split="m", acc_cols=64)),
  }[case]
  rng = np.random.default_rng(len(case))
  # N = 256 in the ragged case: each warpgroup's columns span two of B's blocks (two scales).
  n_dim = 2 * cfg.tile_n
  (a_q, sa, b_q, sb), (a_MK, b_GNK) = _operands(rng, m_dim, 256, n_dim, len(sizes))
  sb_GKtX, b_scaling = jnp.swapaxes(sb, 1, 2), "block"
  if case == "tile_scaled":  # one scale per row of B and 128 of K (wgrad operand)
    sb_GNKt = _scales(rng, (len(sizes), 128, 2))
    b_GNK = _np(b_q) * np.repeat(_np(sb_GNKt), 128, axis=2)
    sb_GKtX, b_scaling = jnp.swapaxes(sb_GNKt, 1, 2), "tile"
  # bf16 out where fp32's output tile would not fit next to two stages (fit_smem would narrow
  # the tile to one block of B).
  out_dtype, rtol = (jnp.bfloat16, 2**-8) if case == "ragged" else (jnp.float32, 1e-5)
  assert cfg.fit_smem(jnp.dtype(out_dtype).itemsize) == cfg
  out = mgpu.gmm_fp8(a_q, sa.T, b_q, sb_GKtX, jnp.asarray(sizes, jnp.int32),
                     b_scaling=b_scaling, out_dtype=out_dtype, config=cfg,
                     interpret=_INTERPRET, num_sms=3)
  _assert_close(out, _np_grouped(a_MK, b_GNK, sizes), rtol)
  np.testing.assert_array_equal(np.asarray(out)[sum(sizes):], 0.0)


@pytest.mark.parametrize("variant", ["chain", "overlap", "chain_overlap_rows", "chain_tile"])
def test_chained_and_overlapped_bodies_match_fp64(variant):
  """`chain` (one pipeline across an SM's units, tail units running it too) and `overlap` (the
  next accumulator's wgmma in flight while one is promoted; three accumulators per warpgroup,
  each waited for while the next runs). Three SMs for 5+ units each: START, STEADY and STOP all run.
  K = 512 is 4 steps; the 3 stages asked for drop to 2, the largest divisor (`chained`).
  "chain_tile": B scaled per row and 128 of K, as the linears' wgrads run (TILE_SCALED_DEFAULT
  is chained)."""
  rows = "rows" in variant
  cfg = mgpu.Fp8TileConfig(
      tile_m=128 if rows else 64, tile_n=96, stages=3, grid_minor="m", grid_width=2,
      wg_split="m" if rows else "n", acc_cols=64 if rows else 32,
      chain="chain" in variant, overlap="overlap" in variant)
  assert cfg.wg_shape[1] // cfg.acc_n == 3
  m_dim, sizes = 203, [0, 70, 3, 0, 100]  # 30 tail rows
  assert mgpu.chained(cfg, 4).stages == (2 if cfg.chain else 3)
  rng = np.random.default_rng(7)
  (a_q, sa, b_q, sb), (a_MK, b_GNK) = _operands(rng, m_dim, 512, 384, len(sizes))
  sb_GKtX, b_scaling = jnp.swapaxes(sb, 1, 2), "block"
  if variant == "chain_tile":
    sb_GNKt = _scales(rng, (len(sizes), 384, 4))
    b_GNK = _np(b_q) * np.repeat(_np(sb_GNKt), 128, axis=2)
    sb_GKtX, b_scaling = jnp.swapaxes(sb_GNKt, 1, 2), "tile"
  assert cfg.fit_smem(4) == cfg
  out = mgpu.gmm_fp8(a_q, sa.T, b_q, sb_GKtX, jnp.asarray(sizes, jnp.int32), b_scaling=b_scaling,
                     out_dtype=jnp.float32, config=cfg, interpret=_INTERPRET, num_sms=3)
  _assert_close(out, _np_grouped(a_MK, b_GNK, sizes), 1e-5)
  np.testing.assert_array_equal(np.asarray(out)[sum(sizes):], 0.0)


@pytest.mark.parametrize("variant", ["rows", "rows_no_table", "cols_5_stages", "rows_split_k",
                                     "rows_paired"])
def test_flat_ring_matches_fp64(variant):
  """`flat`, the module's own ring across an SM's (unit, K step) pairs: stage counts that do not
  divide K's 4 steps (3, 5) and split-K (K's range per split offset in the ring's loads). Three
  SMs for 5+ units each, empty and tiny groups and tail rows. Each SM reads its units from
  `unit_table` in shared memory (snake order in "rows", K splits in "rows_split_k"), or without
  it from the schedule in global memory ("rows_no_table"). With `cluster_a` ("rows_paired") 4
  SMs run as 2 clusters of 2, each pair taking both column tiles of a row tile, A multicast to
  both, a slot refilled once both SMs consumed it."""
  cfg = {"rows": mgpu.Fp8TileConfig(tile_m=128, tile_n=64, stages=3, grid_minor="m",
                                    grid_width=2, wg_split="m", acc_cols=64, flat=True),
         "rows_no_table": mgpu.Fp8TileConfig(tile_m=128, tile_n=64, stages=3, grid_minor="m",
                                             grid_width=2, wg_split="m", acc_cols=64,
                                             flat=True, unit_table=False),
         "cols_5_stages": mgpu.Fp8TileConfig(tile_m=64, tile_n=64, stages=5, flat=True),
         "rows_split_k": mgpu.Fp8TileConfig(tile_m=128, tile_n=64, stages=3, wg_split="m",
                                            flat=True),
         "rows_paired": mgpu.Fp8TileConfig(tile_m=128, tile_n=64, stages=3, grid_minor="m",
                                           grid_width=2, wg_split="m", acc_cols=64, flat=True,
                                           cluster_a=True)}[variant]
  k_splits = 2 if variant == "rows_split_k" else None
  m_dim, sizes = (203, [0, 70, 3, 0, 100]) if k_splits is None else (150, [150])
  rng = np.random.default_rng(11)
  (a_q, sa, b_q, sb), (a_MK, b_GNK) = _operands(rng, m_dim, 512, 256, len(sizes))
  assert mgpu.supports(512, 256, jnp.float32, cfg)
  assert cfg.fit_smem(4) == cfg
  out = mgpu.gmm_fp8(a_q, sa.T, b_q, jnp.swapaxes(sb, 1, 2), jnp.asarray(sizes, jnp.int32),
                     out_dtype=jnp.float32, config=cfg, interpret=_INTERPRET,
                     num_sms=4 if cfg.cluster_a else 3, k_splits=k_splits)
  _assert_close(out, _np_grouped(a_MK, b_GNK, sizes), 1e-5)
  np.testing.assert_array_equal(np.asarray(out)[sum(sizes):], 0.0)


def test_flat_unit_table_lists_each_sms_units_and_fits_the_down_projection():
  """`unit_table`'s row [sm, j] is the unit of grid index j * num_sms + sm, as the schedule and
  the snake order give it (a NumPy walk of the same order), and one SM's rows fit beside the
  Ling-mini down projection's flat tiling (131,072 rows, 256 experts) but not beside a
  profile buffer that leaves no room."""
  sizes = np.array([300, 0, 5, 129, 40], np.int32)
  cfg = mgpu.Fp8TileConfig(tile_m=128, tile_n=64, grid_minor="m", grid_width=2, flat=True)
  n_tiles, num_sms, rows = 3, 4, 640
  schedule = gmm_mgpu.make_tile_schedule(jnp.asarray(sizes), rows, cfg.tile_m)
  table = np.asarray(mgpu.unit_table(schedule, cfg, n_tiles, 2, num_sms))
  count = int(schedule.num_items[0])
  group, start, offset, own = (np.asarray(x) for x in (
      schedule.group_I, schedule.read_start_I, schedule.own_offset_I, schedule.own_rows_I))
  for index in range(2 * count * n_tiles):
    split, unit = divmod(index, count * n_tiles)
    band, within = divmod(unit, 2 * n_tiles)  # bands of 2 items, snaking down the columns
    width = min(2, count - 2 * band)
    col, item = divmod(within, width)
    col = col if band % 2 == 0 else n_tiles - 1 - col
    item += 2 * band
    want = [group[item], start[item], offset[item], own[item], col, split, 0, 0]
    np.testing.assert_array_equal(table[index % num_sms, index // num_sms], want, str(index))

  down = mgpu.TILE_CONFIGS[512, 2048, "bfloat16"]
  big = gmm_mgpu.make_tile_schedule(jnp.full((256,), 512, jnp.int32), 131072, down.tile_m)
  table = mgpu.flat_unit_table(big, down, 2048, 1, 132, 2)
  assert table is not None and table.shape[0] == 132, None if table is None else table.shape
  assert mgpu.flat_unit_table(big, down, 2048, 1, 132, 2, reserved_bytes=60_000) is None
  assert mgpu.flat_unit_table(big, dataclasses.replace(down, unit_table=False), 2048, 1, 132,
                              2) is None


def test_paired_unit_table_gives_both_sms_of_a_pair_the_same_rows():
  """With cluster_a, SMs 2p and 2p + 1 take column tiles 2q and 2q + 1 of the same item at the
  same local index (their A is one multicast box), and every (item, column tile) is some SM's
  unit exactly once, in the snake order over pairs of column tiles."""
  sizes = np.array([300, 0, 5, 129, 40], np.int32)
  cfg = mgpu.Fp8TileConfig(tile_m=128, tile_n=64, grid_minor="m", grid_width=2, flat=True,
                           cluster_a=True)
  n_tiles, num_sms, rows = 4, 6, 640
  schedule = gmm_mgpu.make_tile_schedule(jnp.asarray(sizes), rows, cfg.tile_m)
  table = np.asarray(mgpu.unit_table(schedule, cfg, n_tiles, 1, num_sms))
  count = int(schedule.num_items[0])
  start = np.asarray(schedule.read_start_I)
  seen = set()
  for index in range(count * n_tiles // 2):  # pair units
    j, pair = divmod(index, num_sms // 2)
    band, within = divmod(index, 2 * (n_tiles // 2))
    width = min(2, count - 2 * band)
    col, item = divmod(within, width)
    col = col if band % 2 == 0 else n_tiles // 2 - 1 - col
    item += 2 * band
    for rank in (0, 1):
      row = table[2 * pair + rank, j]
      assert row[1] == start[item] and row[4] == 2 * col + rank, (index, rank, row)
      seen.add((item, int(row[4])))
  assert seen == {(i, c) for i in range(count) for c in range(n_tiles)}
  with pytest.raises(ValueError, match="cluster_a.*an even num_sms"):
    mgpu.gmm_fp8(_codes(np.random.default_rng(0), (64, 256)), jnp.ones((2, 64)),
                 _codes(np.random.default_rng(1), (1, 256, 256)), jnp.ones((1, 2, 2)),
                 jnp.asarray([64], jnp.int32), config=cfg, interpret=_INTERPRET, num_sms=3)
  # an odd number of column tiles leaves a tile without its pair
  assert not mgpu.supports(512, 384, jnp.bfloat16, cfg)
  assert not mgpu.supports(512, 256, jnp.bfloat16, dataclasses.replace(cfg, unit_table=False))


def test_the_up_projections_paired_tiling_falls_back_where_pairs_cannot_run():
  """The Ling-mini up projection's table tiling runs in pairs of SMs; with 1x128-tiled B it
  takes the chained pipeline unpaired, and on an odd SM count it runs unpaired (lowered for
  CUDA), where the same tiling asked for explicitly is refused."""
  up = mgpu.tile_config(2048, 1024, jnp.bfloat16)
  assert up.flat and up.cluster_a and mgpu.supports(2048, 1024, jnp.bfloat16, up)
  tiled = mgpu.tile_config(2048, 1024, jnp.bfloat16, "tile")
  assert tiled.chain and not (tiled.flat or tiled.cluster_a)
  assert mgpu.supports(2048, 1024, jnp.bfloat16, tiled)
  spec = jax.ShapeDtypeStruct
  args = (spec((4096, 2048), jnp.float8_e4m3fn), spec((16, 4096), jnp.float32),
          spec((8, 1024, 2048), jnp.float8_e4m3fn), spec((8, 16, 8), jnp.float32),
          spec((8,), jnp.int32))
  lowered = jax.jit(lambda *a: mgpu.gmm_fp8(*a, num_sms=131)).trace(*args).lower(
      lowering_platforms=("cuda",))
  assert "mosaic_gpu" in lowered.as_text()
  with pytest.raises(ValueError, match="cluster_a.*an even num_sms"):
    jax.jit(lambda *a: mgpu.gmm_fp8(*a, config=up, num_sms=131)).trace(*args)


def test_flat_ring_takes_block_scaled_b_only():
  """The table's flat tilings fall back to the chained pipeline for 1x128-tiled B; asked for
  directly, the flat ring refuses it, and refuses the probes and flags it does not run."""
  flat = mgpu.TILE_CONFIGS[512, 2048, "bfloat16"]
  assert flat.flat and mgpu.tile_config(512, 2048, jnp.bfloat16).flat
  tiled = mgpu.tile_config(512, 2048, jnp.bfloat16, "tile")
  assert not tiled.flat and tiled.chain
  for bad in (dict(chain=True), dict(probe="const_sb"), dict(scalar_b_scale=False)):
    assert not mgpu.supports(512, 2048, jnp.bfloat16, dataclasses.replace(flat, **bad)), bad
  assert not mgpu.supports(512, 2048, jnp.bfloat16, mgpu.Fp8TileConfig(wg_split="p"))
  rng = np.random.default_rng(0)
  a_q, sa = _codes(rng, (64, 256)), _scales(rng, (64, 2))
  b_q, sb = _codes(rng, (1, 128, 256)), _scales(rng, (1, 2, 128))
  with pytest.raises(ValueError, match="flat ring.*b_scaling='tile'"):
    mgpu.gmm_fp8(a_q, sa.T, b_q, sb, jnp.asarray([64], jnp.int32), b_scaling="tile",
                 config=mgpu.Fp8TileConfig(tile_m=64, tile_n=64, stages=2, flat=True),
                 interpret=_INTERPRET, num_sms=1)


def test_chained_keeps_chain_only_where_it_can_run():
  cfg = mgpu.Fp8TileConfig(stages=4, chain=True)
  assert mgpu.chained(cfg, 16).stages == 4 and mgpu.chained(cfg, 6).stages == 3
  assert mgpu.chained(cfg, 5) == dataclasses.replace(cfg, chain=False)  # no divisor 2..4
  assert not mgpu.chained(cfg, 1).chain
  assert not mgpu.chained(dataclasses.replace(cfg, probe="no_promote"), 16).chain
  assert mgpu.chained(mgpu.Fp8TileConfig(stages=3), 4).stages == 3  # unchained: unchanged


@pytest.mark.parametrize("b_scaling", ["block", "tile"])
def test_dense_backend_interpret_matches_fp64(b_scaling):
  """fp8_matmul through the interpret backend: both B scalings, bf16 out, M off the tile."""
  rng = np.random.default_rng(7)
  (a_q, sa, b_q, sb), (a_MK, b_GNK) = _operands(rng, 136, 256, 128, 1)
  b_q, b_NK = b_q[0], b_GNK[0]
  if b_scaling == "block":
    b_scale = sb[0]
  else:
    b_scale = _scales(rng, (128, 2))
    b_NK = _np(b_q) * np.repeat(_np(b_scale), 128, axis=1)
  out = fp8_gemm.fp8_matmul(a_q, sa, b_q, b_scale, b_scaling=b_scaling,
                            backend="pallas_mosaic_gpu_interpret")
  assert out.dtype == jnp.bfloat16
  _assert_close(out, a_MK @ b_NK.T, 2**-8)  # bf16 rounding of the output


def test_fp8_linear_grads_through_interpret_backend_match_reference():
  """fprop, dgrad and wgrad (B 1x128-tiled) all run the kernel; the reference is the oracle."""
  rng = np.random.default_rng(3)
  x = jnp.asarray(rng.standard_normal((128, 128)), jnp.float32)
  w = jnp.asarray(rng.standard_normal((128, 128)) * 0.1, jnp.float32)
  dy = jnp.asarray(rng.standard_normal((128, 128)), jnp.float32)

  def loss(backend, x, w):
    return jnp.sum(fp8_gemm.fp8_linear(x, w, jnp.zeros((2,)), backend) * dy)

  grads = {b: jax.value_and_grad(lambda x, w, b=b: loss(b, x, w), argnums=(0, 1))(x, w)
           for b in ("pallas_mosaic_gpu_interpret", "reference")}
  for a, b in zip(jax.tree.leaves(grads["pallas_mosaic_gpu_interpret"]),
                  jax.tree.leaves(grads["reference"])):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * float(jnp.abs(b).max()))


def test_auto_is_reference_on_cpu_and_unsupported_shapes_fall_back(monkeypatch):
  assert fp8_gemm._resolve_backend("auto") == "reference"
  # On Hopper "auto" takes the kernels while they are switched on (kernels/fp8_gemm.py).
  monkeypatch.setattr(fp8_gemm, "_is_hopper_gpu", lambda: True)
  monkeypatch.setattr(fp8_gemm, "_AUTO_USES_KERNEL", False)
  assert fp8_gemm._resolve_backend("auto") == "reference"
  monkeypatch.setattr(fp8_gemm, "_AUTO_USES_KERNEL", True)
  assert fp8_gemm._resolve_backend("auto") == "pallas_mosaic_gpu"
  # The tiny model's K=64 experts: the GPU backend must take the reference, never a kernel.
  rng = np.random.default_rng(0)
  a_q, sa = _codes(rng, (32, 64)), _scales(rng, (32, 1))
  b_q, sb = _codes(rng, (3, 96, 64)), _scales(rng, (3, 1, 1))
  sizes = jnp.asarray([10, 0, 22], jnp.int32)
  assert not mgpu.supports(64, 96, jnp.bfloat16)
  ours = fp8_gemm.fp8_grouped_matmul(a_q, sa, b_q, sb, sizes, backend="pallas_mosaic_gpu")
  ref = fp8_gemm.fp8_grouped_matmul(a_q, sa, b_q, sb, sizes, backend="reference")
  np.testing.assert_array_equal(ours, ref)
  with pytest.raises(ValueError, match="K=64.*backend='reference'"):
    fp8_gemm.fp8_grouped_matmul(a_q, sa, b_q, sb, sizes, backend="pallas_mosaic_gpu_interpret")


def test_supports_and_smem_fit():
  assert mgpu.supports(8192, 8192, jnp.bfloat16)
  assert mgpu.supports(512, 2048, jnp.float32)  # fp32 out: fewer stages or narrower tiles
  assert not mgpu.supports(2048, 2048, jnp.float16)
  assert not mgpu.supports(192, 256, jnp.bfloat16)  # K off the 128 step
  assert not mgpu.supports(256, 96, jnp.bfloat16)  # N off 2 x 64
  assert not mgpu.supports(256, 256, jnp.bfloat16, mgpu.Fp8TileConfig(wg_split="k"))
  # The linears' wgrads (B tiled 1x128) keep their own default; the table is keyed by shape.
  assert mgpu.tile_config(16384, 3072, jnp.bfloat16, "tile") == mgpu.TILE_SCALED_DEFAULT
  assert mgpu.tile_config(16384, 3072, jnp.bfloat16).chain
  for k_dim, n_dim in ((2048, 1024), (512, 2048), (8192, 8192), (2048, 384)):
    for out_dtype in (jnp.bfloat16, jnp.float32):
      cfg = mgpu.tile_config(k_dim, n_dim, out_dtype)
      assert cfg.smem_bytes(jnp.dtype(out_dtype).itemsize) <= mgpu._SMEM_BUDGET
      assert n_dim % cfg.cta_n == 0 and cfg.stages >= 2


@pytest.mark.parametrize("shape", ["dense_8192", "mini_up", "wgrad_tile", "dense_8192_rows",
                                   "mini_down_chain_overlap", "mini_down_chained", "split_k",
                                   "probe_no_store", "probe_no_mma", "mini_down_table",
                                   "dense_8192_flat", "up_dgrad_table", "mini_down_paired"])
def test_kernel_lowers_for_cuda_at_full_size(shape):
  """Layout inference (WGMMA row/column scale vectors, fp8 swizzles) without a GPU."""
  dense, down = (8192, 8192, 8192, 1), (16384, 512, 2048, 256)  # (M, K, N, G)
  m_dim, k_dim, n_dim, groups = {"dense_8192": dense, "dense_8192_rows": dense,
                                 "dense_8192_flat": dense,
                                 "mini_up": (16384, 2048, 1024, 256),
                                 "up_dgrad_table": (16384, 1024, 2048, 256),
                                 "wgrad_tile": (2048, 16384, 2048, 1),
                                 "split_k": (512, 16384, 512, 1)}.get(shape, down)
  b_scaling = "tile" if shape == "wgrad_tile" else "block"
  # The down projection's table tiling is flat; these variants run Pallas's chained pipeline.
  down_table = mgpu.TILE_CONFIGS[512, 2048, "bfloat16"]
  chained = dataclasses.replace(down_table, flat=False, chain=True)
  cfg = {"dense_8192_rows": mgpu.Fp8TileConfig(grid_minor="m", grid_width=16, wg_split="m",
                                               acc_cols=128),
         "mini_down_chain_overlap": mgpu.Fp8TileConfig(stages=4, grid_minor="m", grid_width=4,
                                                       wg_split="m", acc_cols=64, chain=True,
                                                       overlap=True),
         "mini_down_chained": chained,
         "probe_no_store": dataclasses.replace(down_table, probe="no_store"),
         "probe_no_mma": dataclasses.replace(down_table, probe="no_mma"),
         "mini_down_paired": dataclasses.replace(down_table, cluster_a=True),
         # K's 64 steps in the ring's loop, two accumulators overlapped within each step
         "dense_8192_flat": dataclasses.replace(mgpu.DEFAULT_TILE_CONFIG, chain=False,
                                                flat=True)}.get(shape)
  sb_cols = n_dim if b_scaling == "tile" else n_dim // 128
  spec = jax.ShapeDtypeStruct
  f = jax.jit(lambda *a: mgpu.gmm_fp8(*a, b_scaling=b_scaling, config=cfg, num_sms=132))
  lowered = f.trace(spec((m_dim, k_dim), jnp.float8_e4m3fn),
                    spec((k_dim // 128, m_dim), jnp.float32),
                    spec((groups, n_dim, k_dim), jnp.float8_e4m3fn),
                    spec((groups, k_dim // 128, sb_cols), jnp.float32),
                    spec((groups,), jnp.int32)).lower(lowering_platforms=("cuda",))
  assert "mosaic_gpu" in lowered.as_text()


def test_profile_ranges_past_shared_memory_are_refused_before_lowering():
  """The profiled kernel itself only lowers on a GPU machine: its trace leaves through a host
  callback, which JAX lowers for CUDA only with a CUDA backend. Its guard runs anywhere."""
  spec = jax.ShapeDtypeStruct
  f = jax.jit(lambda *a: mgpu.gmm_fp8(*a, num_sms=132, profile_dir="/tmp/unused",
                                      profile_ranges=4096))
  with pytest.raises(ValueError, match="profile_ranges=4096"):
    f.trace(spec((16384, 512), jnp.float8_e4m3fn), spec((4, 16384), jnp.float32),
            spec((256, 2048, 512), jnp.float8_e4m3fn), spec((256, 4, 16), jnp.float32),
            spec((256,), jnp.int32))


def test_bench_fp8_sums_a_ring_trace_per_warpgroup_role():
  """`summarize_ring_trace` on a crafted trace of one SM: two compute tracks and the memory one
  (tids 1-3), shares of summed phase time over summed spans."""
  def ranges(tid, *phases):  # (name, begin, end) -> B/E events, shuffled order is fine
    return [dict(name=n, ph=ph, ts=float(t), pid=2, tid=tid)
            for n, b, e in phases for ph, t in (("E", e), ("B", b))]
  trace = {"traceEvents": (
      ranges(1, ("wait_loaded", 0, 10), ("mma_promote", 10, 40), ("wait_loaded", 40, 45),
             ("mma_promote", 45, 75), ("epilogue", 80, 100))
      + ranges(2, ("wait_loaded", 0, 20), ("mma_promote", 20, 50), ("epilogue", 50, 100))
      + ranges(3, ("wait_consumed", 0, 30), ("issue_loads", 30, 40),
               ("wait_consumed", 40, 90), ("issue_loads", 90, 100)))}
  got = _bench_fp8_stdout(f"print(sorted(b.summarize_ring_trace({trace!r}).items()))")[-1]
  want = {"compute": {"epilogue": 0.35, "mma_promote": 0.45, "wait_loaded": 0.175,
                      "other": 0.025},
          "memory": {"issue_loads": 0.2, "wait_consumed": 0.8, "other": 0.0}}
  got = dict(eval(got))  # noqa: S307 (our own subprocess's repr of floats and strs)
  assert got.keys() == want.keys()
  for role in want:
    assert got[role].keys() == want[role].keys()
    for name, share in want[role].items():
      assert abs(got[role][name] - share) < 1e-12, (role, name, got[role])


def test_bench_fp8_names_the_gaps_between_a_tracks_ranges():
  """`ring_trace_gaps` splits "other" by the ranges either side of each gap: the crafted trace's
  two compute gaps (on tid 1, 40 -> 45 and 75 -> 80, each 5 of the 200 summed), none on the
  memory track, and ranges that abut leave none."""
  trace = {"traceEvents": [
      dict(name=n, ph=ph, ts=float(t), pid=2, tid=tid)
      for tid, n, b, e in ((1, "wait_loaded", 0, 10), (1, "mma_promote", 10, 40),
                           (1, "mma_promote", 45, 75), (1, "epilogue", 80, 100),
                           (2, "wait_loaded", 0, 20), (2, "epilogue", 20, 100),
                           (3, "wait_consumed", 0, 30), (3, "issue_loads", 30, 100))
      for ph, t in (("B", b), ("E", e))]}
  got = _bench_fp8_stdout(f"print(sorted(b.ring_trace_gaps({trace!r}).items()))")[-1]
  got = dict(eval(got))  # noqa: S307 (our own subprocess's repr of floats and strs)
  assert got == {"compute": {"mma_promote>epilogue": 0.025, "mma_promote>mma_promote": 0.025},
                 "memory": {}}, got


def test_bench_fp8_unit_cycles_show_the_tail_beside_the_median():
  """`unit_cycles`: epilogue end to epilogue end on each compute track (tids 1-2; tid 3 is the
  memory track and its "epilogue" is ignored), in cycles (ts x 1e3): one slow unit moves the
  mean and the max but not the median."""
  ends = {1: [1.0, 5.0, 9.0, 13.0, 29.0], 2: [2.0, 6.0, 10.0], 3: [0.0, 100.0]}
  trace = {"traceEvents": [dict(name="epilogue", ph=ph, ts=t - (ph == "B"), pid=2, tid=tid)
                           for tid, ts in ends.items() for t in ts for ph in ("B", "E")]
                          + [dict(name="mma_promote", ph="E", ts=50.0, pid=2, tid=1)]}
  got = _bench_fp8_stdout(f"print(b.unit_cycles({trace!r}))\n"
                          "print(b.unit_cycles({'traceEvents': []}))")[-2:]
  got_cycles = eval(got[0])  # noqa: S307 (our own subprocess's repr of a dict of floats)
  assert got_cycles == {"median": 4000.0, "mean": 6000.0, "p90": 10000.0, "max": 16000.0,
                        "units": 6}, got_cycles
  assert got[1] == "None"


def test_fp8_wgrad_runs_the_bf16_kernel_on_dequantised_operands():
  """The FP8 experts' weight gradient on a kernel backend: both transposed operands (per-group
  1x128 tiles along M: an empty group, a group over 128 rows, rows past the groups) dequantised
  to bf16 through the interpreted bf16 wgrad kernel, which raises rather than fall back; the
  oracle is the float64 product of the dequantised operands."""
  rng = np.random.default_rng(5)
  sizes = np.array([40, 0, 200, 8], np.int32)
  x = jnp.asarray(rng.standard_normal((288, 128)), jnp.float32)
  dy = jnp.asarray(rng.standard_normal((288, 128)), jnp.float32)
  tile_ids, num_tiles = fq.row_tile_ids(288, jnp.asarray(sizes))
  xt_q, xt_s = fq.quantize_rows_transposed(x, tile_ids, num_tiles)
  dyt_q, dyt_s = fq.quantize_rows_transposed(dy, tile_ids, num_tiles)
  got = fp8_gemm.fp8_transposed_grouped_matmul(
      xt_q, xt_s, dyt_q, dyt_s, tile_ids, jnp.asarray(sizes),
      backend="pallas_mosaic_gpu_interpret")
  tiles = np.asarray(tile_ids)
  xd, dyd = _np(xt_q) * _np(xt_s)[:, tiles], _np(dyt_q) * _np(dyt_s)[:, tiles]
  starts = np.r_[0, np.cumsum(sizes)]
  for g in range(4):
    r = slice(starts[g], starts[g + 1])
    want = xd[:, r] @ dyd[:, r].T
    if sizes[g] == 0:
      np.testing.assert_array_equal(got[g], 0)
    else:  # both operands rounded to bf16 once (2^-9 each); a wrong scale would be O(1) off
      _assert_close(got[g], want, 2**-7)


@pytest.mark.parametrize("case", ["dense_tile_chain_2", "grouped_block_tail_4",
                                  "grouped_block_tail_chain_2"])
def test_split_k_matches_fp64(case):
  """Split-K: each unit contracts a k_splits-th of K into its own fp32 partial, summed after.
  Dense with B scaled per row (a wgrad's layout), chained across 3 SMs, M off the tile; grouped
  with block scales read as scalars (each split's K offset into them), empty groups and tail
  rows, whose partials must add to zero, unchained and chained (tail units run the pipeline
  there, then store zeros)."""
  dense = case.startswith("dense")
  k_splits = int(case[-1])
  m_dim, sizes = (136, [136]) if dense else (203, [0, 70, 3, 0, 100])
  rng = np.random.default_rng(11)
  (a_q, sa, b_q, sb), (a_MK, b_GNK) = _operands(rng, m_dim, 512, 128, len(sizes))
  sb_GKtX, b_scaling = jnp.swapaxes(sb, 1, 2), "block"
  if dense:
    sb_GNKt = _scales(rng, (1, 128, 4))
    b_GNK = _np(b_q) * np.repeat(_np(sb_GNKt), 128, axis=2)
    sb_GKtX, b_scaling = jnp.swapaxes(sb_GNKt, 1, 2), "tile"
  cfg = dataclasses.replace(_SMALL, chain="chain" in case, grid_minor="m", grid_width=2)
  out = mgpu.gmm_fp8(a_q, sa.T, b_q, sb_GKtX, jnp.asarray(sizes, jnp.int32), b_scaling=b_scaling,
                     out_dtype=jnp.float32, config=cfg, interpret=_INTERPRET, num_sms=3,
                     k_splits=k_splits)
  assert out.shape == (m_dim, 128) and out.dtype == jnp.float32
  _assert_close(out, _np_grouped(a_MK, b_GNK, sizes), 1e-5)
  np.testing.assert_array_equal(np.asarray(out)[sum(sizes):], 0.0)
  with pytest.raises(ValueError, match="k_splits=3 must be a positive divisor of K's 4 steps"):
    mgpu.gmm_fp8(a_q, sa.T, b_q, sb_GKtX, jnp.asarray(sizes, jnp.int32), b_scaling=b_scaling,
                 out_dtype=jnp.float32, config=cfg, interpret=_INTERPRET, num_sms=3, k_splits=3)


def test_auto_k_splits_fills_idle_sms_only():
  """Ling-mini's linear wgrads at 12 x 4096 tokens (384 steps of 128), 128 x 256 units, 132 SMs:
  the shared expert's down [512, 2048] (32 units) and gate+up [2048, 1024] (64), attention's
  QKV [2048, 3072] (192: 2 rounds, 1.5 split in two), the dense FFN's down (320: 3 rounds
  against 2.5, the 15% asked); not attention out (128: one round) or the FFN's up (640: 5
  rounds either way)."""
  assert [mgpu.auto_k_splits(u, 384, 132) for u in (32, 64, 192, 128, 320, 640)] == [
      4, 2, 2, 1, 2, 1]
  # Split, the fp32 partials take 128 x 128 tiles (twice the units, each half the work): the
  # shared expert's gate+up (64 bf16 units: one round at half the SMs) splits in two (0.5 of
  # the time; 404 -> 739 TFLOP/s on an H200), attention out (128: one full round) does not.
  assert [mgpu.auto_k_splits(u, 384, 132, split_units=2 * u) for u in (32, 64, 128, 192, 320,
                                                                         640)] == [
      2, 2, 1, 2, 2, 1]
  assert mgpu.auto_k_splits(32, 16, 132) == 2  # each split keeps 8 steps at least
  assert mgpu.auto_k_splits(32, 12, 132) == 1  # 12 steps: halves of 6 are too short
  assert mgpu.auto_k_splits(132, 384, 132) == 1


def test_split_k_lowers_for_cuda_at_the_shared_expert_wgrad():
  """The shared expert's down-projection wgrad (x^T [512, 49152] against dy^T [2048, 49152],
  both scaled per 1x128 tile along the tokens) in 4 splits: TMA boxes at K offsets, stores into
  a split's slice of the fp32 partials."""
  spec = jax.ShapeDtypeStruct
  m_dim, k_dim, n_dim = 512, 49152, 2048
  f = jax.jit(lambda *a: mgpu.matmul_fp8(*a, b_scaling="tile", num_sms=132, k_splits=4))
  lowered = f.trace(spec((m_dim, k_dim), jnp.float8_e4m3fn),
                    spec((k_dim // 128, m_dim), jnp.float32),
                    spec((n_dim, k_dim), jnp.float8_e4m3fn),
                    spec((k_dim // 128, n_dim), jnp.float32)).lower(lowering_platforms=("cuda",))
  assert "mosaic_gpu" in lowered.as_text()


def _bench_fp8_stdout(script: str) -> list[str]:
  """Lines printed by `script`, run in a subprocess with experiments.bench_fp8 importable as
  `b` (the module defines absl flags at import, so not in this process)."""
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             PYTHONPATH=os.path.dirname(os.path.dirname(__file__)))
  script = "from experiments import bench_fp8 as b\n" + script
  proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                        timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  return proc.stdout.strip().splitlines()


def test_bench_fp8_spec_tokens_map_to_config_flags():
  """experiments/bench_fp8's tiling specs: the six fields, the optional ones, and the flag tokens
  `chain`, `overlap`, `f` and `c`, and `nt` and `late` (which turn flat-ring defaults off),
  anywhere after them; the tokens of removed variants are refused by name."""
  got = _bench_fp8_stdout(
      "print(repr(b._config('128:64:4:m:16:1:m:128:chain')))\n"
      "print(repr(b._config('128:128:3:m:4:1:n:64:overlap:no_mma')))\n"
      "print(repr(b._config('128:64:4:m:4:1:m:128:f:c')))\n"
      "print(repr(b._config('128:64:4:m:16:1:m:128:f:nt:late')))\n"
      "for spec in ('128:64:4:m:16:1:m:128:chain:d', '64:64:6:m:32:1:p:128:f'):\n"
      "  try:\n"
      "    b._config(spec)\n"
      "  except ValueError as e:\n"
      "    print(e)\n")[-6:]
  assert got[:4] == [repr(mgpu.Fp8TileConfig(tile_m=128, tile_n=64, stages=4, grid_minor="m",
                                             grid_width=16, wg_split="m", acc_cols=128,
                                             chain=True)),
                     repr(mgpu.Fp8TileConfig(tile_m=128, tile_n=128, stages=3, grid_minor="m",
                                             grid_width=4, wg_split="n", acc_cols=64,
                                             probe="no_mma", overlap=True)),
                     repr(mgpu.Fp8TileConfig(tile_m=128, tile_n=64, stages=4, grid_minor="m",
                                             grid_width=4, wg_split="m", acc_cols=128,
                                             flat=True, cluster_a=True)),
                     repr(mgpu.Fp8TileConfig(tile_m=128, tile_n=64, stages=4, grid_minor="m",
                                             grid_width=16, wg_split="m", acc_cols=128,
                                             flat=True, unit_table=False,
                                             release_early=False))]
  assert "'d' (double_staging) lost and left the kernel in session 24" in got[4]
  assert "'p' (wg_split ping-pong) lost" in got[5]


def test_bench_fp8_gemm_stream_reads_and_writes_a_gemms_bytes():
  """bench_fp8's byte streams: `gemm_stream` against NumPy (A tiled or summed onto N columns,
  B summed over its extra factor), None where the sizes do not divide; `tma_write` and
  `tma_stream` lower for CUDA (`tma_write` in both tile orders), and `_stream_blocks` splits a
  byte mix into TMA boxes."""
  script = (
      "import numpy as np, jax, jax.numpy as jnp\n"
      "rng = np.random.default_rng(0)\n"
      "for m, k, n, g in [(64, 32, 128, 4), (64, 128, 32, 4), (64, 64, 64, 2)]:\n"
      "  a = rng.normal(size=(m, k)).astype(np.float32)\n"
      "  w = rng.normal(size=(g, k, n)).astype(np.float32)\n"
      "  got = np.float32(b.gemm_stream(jnp.asarray(a), jnp.asarray(w), n))\n"
      "  a_n = np.tile(a, (1, n // k)) if n >= k else a.reshape(m, n, k // n).sum(2)\n"
      "  want = a_n + w.reshape(m, w.size // (m * n), n).sum(1)\n"
      "  print(float(np.abs(got - want).max() / np.abs(want).max()))\n"
      "print(b.gemm_stream(jnp.ones((64, 48)), jnp.ones((2, 48, 64)), 64))\n"
      "lows = [jax.jit(lambda o=o: b.tma_write(1024, 512, num_sms=132, order=o)()).trace()\n"
      "        for o in ('n', 'm4')]\n"
      "print(all('mosaic_gpu' in low.lower(lowering_platforms=('cuda',)).as_text()\n"
      "          for low in lows))\n"
      "print(b._stream_blocks(335544320, 536870912, 1), b._stream_blocks(3 * 2**20, 2**20, 1))\n"
      "x = jax.ShapeDtypeStruct((32 * 160, 128), jnp.float8_e4m3fn)\n"
      "low = jax.jit(b.tma_stream(32, 160, 128, x.dtype)).trace(x)\n"
      "print('mosaic_gpu' in low.lower(lowering_platforms=('cuda',)).as_text())\n")
  *errs, none, lowered, blocks, stream_lowered = _bench_fp8_stdout(script)[-8:]
  assert all(float(e) < 1e-2 for e in errs), errs  # bf16 output rounding: ~4e-3
  assert none == "None" and lowered == "True" and stream_lowered == "True"
  # The FP8 down projection's 335 MB in, 537 MB out: 16,384 tiles, 160 rows of 128 bytes each;
  # 3 MiB in over 32 tiles needs 768 rows of 128 or 384 of 256, past TMA's 256: none.
  assert blocks == "(16384, 160, 128) None"
