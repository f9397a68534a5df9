"""Tests for kernels/grouped_matmul_mgpu.py on CPU.

The kernels themselves run under Pallas's GPU interpret mode (`plgpu.InterpretGPUParams`), which
simulates shared memory, TMA copies, barriers and wgmma on the CPU; they are also lowered for CUDA
(no GPU needed) so that layout and shared-memory errors show up here. Timings and the check on
real hardware are in experiments/bench_kernels.py.

Key: M rows, K contraction dim, N output dim, G groups, I work items.
"""

import dataclasses
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import mosaic_gpu as plgpu

from kernels import grouped_matmul as gmm_lib
from kernels import grouped_matmul_mgpu as mgpu
from tests import test_grouped_matmul
from tests.test_grouped_matmul import _np_tgmm

# Small tiles keep the interpreter fast; the bodies are the same as at full size.
_SMALL = {
    "ws": mgpu.TileConfig(tile_m=64, tile_n=64, tile_k=64, stages=2, body="ws"),
    "ws_chain": mgpu.TileConfig(tile_m=64, tile_n=64, tile_k=64, stages=2, body="ws_chain"),
    "pipe": mgpu.TileConfig(tile_m=64, tile_n=64, tile_k=64, stages=2, body="pipe"),
}
# Split rows: each compute warpgroup owns 64 of the 128 rows (the wgmma minimum), epilogue slabs
# of 32 columns through two SMEM slots.
_SPLIT_M = mgpu.TileConfig(tile_m=128, tile_n=64, tile_k=64, stages=2, body="ws_chain", split="m",
                           epi_n=32)
# Ping-pong: each compute warpgroup owns whole units; 3 stages over 2 K steps per unit make the
# ring's slots wrap at a different step of each unit. With the lhs resident, 2 stages over 3 K
# steps (stages may not exceed them) and 3 column tiles per item, so that an item's first unit
# alternates between the warpgroups. "ordered_multicast": main loops in strict turns, and 2-CTA
# clusters whose CTAs share every lhs step (each loads half, TMA multicast to both).
# "double_staging": two epilogue slabs of 32 columns through two staging slots per warpgroup;
# "row_slabs": four slabs of 64 rows x 32 columns through two slots, so that owned rows split
# across slabs at ragged places.
_PING_PONG = {
    "streamed": mgpu.TileConfig(tile_m=64, tile_n=64, tile_k=64, stages=3, body="pp"),
    "resident": mgpu.TileConfig(tile_m=64, tile_n=64, tile_k=64, stages=2, body="pp",
                                resident_lhs=True),
    "ordered_multicast": mgpu.parse_tile_config("pp:64:64:64:3:o:c"),
    "double_staging": mgpu.parse_tile_config("pp:64:64:64:3:e32:d"),
    "row_slabs": mgpu.parse_tile_config("pp:128:64:64:3:e32:r64:d"),
}
_SMALL_WGRAD = mgpu.WgradConfig(tile_k=64, tile_n=64, chunk=64, stages=2)
_INTERPRET = plgpu.InterpretGPUParams()

# Group sizes with empty groups, groups smaller than a tile, sizes off the tile, one group with
# every row, and rows past the last group (which must come out zero).
_SIZE_CASES = {
    "ragged_with_tail": (200, [0, 70, 3, 0, 100]),
    "one_group_all_rows": (192, [0, 192, 0]),
    "all_empty": (128, [0, 0]),
    "fewer_rows_than_tile": (20, [5, 0, 15]),
}
# With 64-row tiles a large group (4 tiles) and small ones (1-2 tiles, the tail's included), so
# that the schedule spreads the small groups' items among the large one's.
_SPREAD_CASE = (330, [0, 200, 3, 0, 100])
# Starts off the 8-row grid, groups inside one 64-row half of a tile (the other warpgroup skips),
# an empty group, and 24 tail rows.
_SPLIT_CASE = (264, [7, 60, 1, 0, 66, 64, 2, 40])


def _bf16_np(x):
  return np.asarray(jnp.asarray(x, jnp.bfloat16).astype(jnp.float32), np.float64)


def _np_gmm(lhs_MK, rhs_GXY, sizes_G, transpose):
  return test_grouped_matmul._np_gmm(
      lhs_MK, np.swapaxes(rhs_GXY, 1, 2) if transpose else rhs_GXY, sizes_G)


def _owned_rows(schedule, num_rows):
  """Expands the schedule into (row -> group) with a count of how often each row is owned."""
  count_M = np.zeros(num_rows, np.int64)
  group_M = np.full(num_rows, -1, np.int64)
  for i in range(int(schedule.num_items[0])):
    lo = int(schedule.read_start_I[i] + schedule.own_offset_I[i])
    hi = lo + int(schedule.own_rows_I[i])
    count_M[lo:hi] += 1
    group_M[lo:hi] = int(schedule.group_I[i])
  return count_M, group_M


@pytest.mark.parametrize("tile_m", [8, 64, 128])
@pytest.mark.parametrize("seed", range(4))
def test_schedule_covers_every_row_once_with_its_group(tile_m, seed):
  rng = np.random.default_rng(seed)
  num_groups = int(rng.integers(1, 20))
  num_rows = int(rng.integers(tile_m, 1000))
  used = int(rng.integers(0, num_rows + 1))
  cuts = np.sort(rng.integers(0, used + 1, num_groups - 1))
  sizes = np.diff(np.concatenate([[0], cuts, [used]])).astype(np.int32)
  sizes[rng.random(num_groups) < 0.3] = 0  # extra empty groups; rows move to the tail
  schedule = make = mgpu.make_tile_schedule(jnp.asarray(sizes), num_rows, tile_m)
  assert make.group_I.shape[0] == mgpu.max_schedule_items(num_rows, num_groups, tile_m)
  count_M, group_M = _owned_rows(schedule, num_rows)
  np.testing.assert_array_equal(count_M, 1)
  # Row r belongs to the group whose cumulative range holds it; the tail is group G.
  expected = np.searchsorted(np.cumsum(sizes), np.arange(num_rows), side="right")
  np.testing.assert_array_equal(group_M, np.minimum(expected, num_groups))
  # Every item reads a whole in-bounds tile from an 8-row-aligned start, and owns rows inside it.
  n = int(schedule.num_items[0])
  start_I = np.asarray(schedule.read_start_I[:n])
  assert (start_I >= 0).all() and (start_I + tile_m <= num_rows).all()
  if num_rows % 8 == 0:
    assert (start_I % 8 == 0).all()
  off_I, rows_I = np.asarray(schedule.own_offset_I[:n]), np.asarray(schedule.own_rows_I[:n])
  assert (off_I >= 0).all() and (off_I + rows_I <= tile_m).all() and (rows_I > 0).all()
  assert (np.asarray(schedule.own_rows_I[n:]) == 0).all()


def test_schedule_tiles_each_group_from_its_own_start():
  """A group takes cdiv(size + start % 8, R) items: none extra for sharing a tile."""
  sizes = np.array([100, 100, 100, 212, 0, 3], np.int32)  # 5 tail rows: 515 of 520 used
  schedule = mgpu.make_tile_schedule(jnp.asarray(sizes), 520, 128)
  n = int(schedule.num_items[0])
  assert n == 7  # a grid of 128-row tiles would need 9
  np.testing.assert_array_equal(schedule.group_I[:n], [0, 1, 2, 3, 3, 5, 6])
  # Group 3 starts at row 300: tiles from 296; its second tile and everything after it are
  # shifted back to end at row 520.
  np.testing.assert_array_equal(schedule.read_start_I[:n], [0, 96, 200, 296, 392, 392, 392])
  np.testing.assert_array_equal(schedule.own_offset_I[:n], [0, 4, 0, 4, 32, 120, 123])
  np.testing.assert_array_equal(schedule.own_rows_I[:n], [100, 100, 100, 124, 88, 3, 5])


def test_schedule_spreads_small_groups_among_large_ones():
  """Small groups' items (at most 2 tiles) sit evenly among the large groups' items, each
  sequence in its own order; without `spread`, items go by group."""
  sizes = np.array([384, 64, 0, 100, 512, 60, 256], np.int32)  # 8 tail rows: 1384 of 1392 used
  spread = mgpu.make_tile_schedule(jnp.asarray(sizes), 1392, 128)
  by_group = mgpu.make_tile_schedule(jnp.asarray(sizes), 1392, 128, spread=False)
  n = int(spread.num_items[0])
  assert n == int(by_group.num_items[0]) == 14
  np.testing.assert_array_equal(by_group.group_I[:n], [0, 0, 0, 1, 3, 4, 4, 4, 4, 4, 5, 6, 6, 7])
  # Large: groups 0 (3 tiles) and 4 (5: rows 548-1059, tiled from 544); small: 1, 3, 5, 6 (2
  # tiles) and the tail, group 7: 6 items, at the r where floor((r + 1) * 6 / 14) steps up.
  np.testing.assert_array_equal(spread.group_I[:n], [0, 0, 1, 0, 3, 4, 5, 4, 4, 6, 4, 6, 4, 7])
  # The same items, each with the same rows.
  items = lambda s: sorted(zip(*(np.asarray(a[:n]).tolist() for a in s[:4])))
  assert items(spread) == items(by_group)


def test_spread_case_leaves_group_order():
  """_SPREAD_CASE, which the kernel tests run, has items out of group order."""
  num_rows, sizes = _SPREAD_CASE
  schedule = mgpu.make_tile_schedule(jnp.asarray(sizes, jnp.int32), num_rows, 64)
  groups = np.asarray(schedule.group_I[:int(schedule.num_items[0])])
  assert (np.diff(groups) < 0).any()


def test_schedule_balanced_is_one_item_per_tile():
  schedule = mgpu.make_tile_schedule(jnp.full((4,), 256, jnp.int32), 1024, 128)
  assert int(schedule.num_items[0]) == 8
  np.testing.assert_array_equal(schedule.group_I[:8], [0, 0, 1, 1, 2, 2, 3, 3])
  np.testing.assert_array_equal(schedule.own_rows_I[:8], 128)


def test_config_table_lookup_and_smem_fit():
  cfg = mgpu.tile_config(2048, 1024, False, jnp.bfloat16)
  assert cfg is mgpu.TILE_CONFIGS[(2048, 1024, False, "bfloat16")]
  assert mgpu.tile_config(96, 96, False, jnp.bfloat16) == mgpu.DEFAULT_TILE_CONFIG
  entries = [(key[0], cfg) for key, cfg in mgpu.TILE_CONFIGS.items()]
  for k_dim, cfg in entries + [(2048, mgpu.DEFAULT_TILE_CONFIG)]:
    for out_itemsize in (2, 4):
      fitted = cfg.fit_smem(2, out_itemsize, k_dim=k_dim)
      assert fitted.smem_bytes(2, out_itemsize, k_dim=k_dim) <= mgpu._SMEM_BUDGET
      assert fitted.stages >= 2 and fitted.tile_m == cfg.tile_m


def test_resident_lhs_counts_all_of_k_and_needs_stages_within_k_steps():
  """A resident lhs holds tile_m x K; its chunks are reloaded safely only with stages <= K steps."""
  cfg = mgpu.parse_tile_config("pp:128:128:64:4:e64:a")
  assert cfg.smem_bytes(2, 2, k_dim=512) - cfg.smem_bytes(2, 2, k_dim=0) == 128 * 512 * 2
  rhs = lambda k: jax.ShapeDtypeStruct((8, k, 2048), jnp.bfloat16)
  lhs = lambda k: jax.ShapeDtypeStruct((1024, k), jnp.bfloat16)
  assert mgpu.supports(lhs(512), rhs(512), False, jnp.bfloat16, cfg)  # 224 KiB
  assert not mgpu.supports(lhs(2048), rhs(2048), False, jnp.bfloat16, cfg)  # 512 KiB of lhs
  assert not mgpu.supports(lhs(192), rhs(192), False, jnp.bfloat16, cfg)  # 4 stages, 3 steps
  assert mgpu.supports(lhs(192), rhs(192), False, jnp.bfloat16,
                       dataclasses.replace(cfg, stages=3))


# The "pipe" body (a fallback no tiling table picks) runs the forward layout only, which keeps
# this file's interpreter time flat with the split-rows and SwiGLU tests below.
@pytest.mark.parametrize(("body", "transpose"),
                         [(b, t) for b in sorted(_SMALL) for t in (False, True)
                          if not (b == "pipe" and t)])
@pytest.mark.parametrize("case", sorted(_SIZE_CASES))
def test_gmm_interpret_matches_fp64(body, transpose, case):
  num_rows, sizes = _SIZE_CASES[case]
  cfg = _SMALL[body]
  k_dim, n_dim = 128, 2 * cfg.cta_n
  rng = np.random.default_rng(hash((body, transpose, case)) % 2**32)
  lhs = jnp.asarray(rng.standard_normal((num_rows, k_dim)), jnp.bfloat16)
  shape = (len(sizes), n_dim, k_dim) if transpose else (len(sizes), k_dim, n_dim)
  rhs = jnp.asarray(rng.standard_normal(shape), jnp.bfloat16)
  out = mgpu.gmm(lhs, rhs, jnp.asarray(sizes, jnp.int32), transpose_rhs=transpose,
                 out_dtype=jnp.float32, config=cfg, interpret=_INTERPRET, num_sms=3)
  assert out.shape == (num_rows, n_dim) and out.dtype == jnp.float32
  ref = _np_gmm(_bf16_np(lhs), _bf16_np(rhs), sizes, transpose)
  np.testing.assert_allclose(np.asarray(out, np.float64), ref, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("transpose", [False, True])
def test_gmm_split_rows_and_slab_epilogue_interpret_matches_fp64(transpose):
  num_rows, sizes = _SPLIT_CASE
  k_dim, n_dim = 128, 2 * _SPLIT_M.cta_n
  rng = np.random.default_rng(7 + transpose)
  lhs = jnp.asarray(rng.standard_normal((num_rows, k_dim)), jnp.bfloat16)
  shape = (len(sizes), n_dim, k_dim) if transpose else (len(sizes), k_dim, n_dim)
  rhs = jnp.asarray(rng.standard_normal(shape), jnp.bfloat16)
  out = mgpu.gmm(lhs, rhs, jnp.asarray(sizes, jnp.int32), transpose_rhs=transpose,
                 out_dtype=jnp.float32, config=_SPLIT_M, interpret=_INTERPRET, num_sms=3)
  ref = _np_gmm(_bf16_np(lhs), _bf16_np(rhs), sizes, transpose)
  np.testing.assert_allclose(np.asarray(out, np.float64), ref, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize(("variant", "transpose", "num_rows", "sizes"), [
    # Empty groups, a 3-row group, 27 tail rows.
    ("resident", False, *_SIZE_CASES["ragged_with_tail"]),
    ("streamed", True, *_SIZE_CASES["ragged_with_tail"]),
    ("resident", True, *_SIZE_CASES["one_group_all_rows"]),
    ("streamed", False, *_SIZE_CASES["fewer_rows_than_tile"]),
    ("ordered_multicast", False, *_SIZE_CASES["ragged_with_tail"]),
    ("double_staging", False, *_SIZE_CASES["ragged_with_tail"]),
    ("row_slabs", True, *_SIZE_CASES["ragged_with_tail"]),
    ("row_slabs", False, *_SPLIT_CASE),
    ("streamed", False, *_SPREAD_CASE),
])
def test_gmm_ping_pong_interpret_matches_fp64(variant, transpose, num_rows, sizes):
  cfg = _PING_PONG[variant]
  k_dim, n_dim = (192, 3 * cfg.cta_n) if variant == "resident" else (128, 2 * cfg.cta_n)
  rng = np.random.default_rng(num_rows + transpose)
  lhs = jnp.asarray(rng.standard_normal((num_rows, k_dim)), jnp.bfloat16)
  shape = (len(sizes), n_dim, k_dim) if transpose else (len(sizes), k_dim, n_dim)
  rhs = jnp.asarray(rng.standard_normal(shape), jnp.bfloat16)
  assert mgpu.supports(lhs, rhs, transpose, jnp.float32, cfg)
  out = mgpu.gmm(lhs, rhs, jnp.asarray(sizes, jnp.int32), transpose_rhs=transpose,
                 out_dtype=jnp.float32, config=cfg, interpret=_INTERPRET, num_sms=2)
  ref = _np_gmm(_bf16_np(lhs), _bf16_np(rhs), sizes, transpose)
  np.testing.assert_allclose(np.asarray(out, np.float64), ref, rtol=1e-5, atol=1e-4)


def _np_swiglu(h_MN):
  gate, up = np.split(h_MN, 2, axis=-1)
  return gate / (1 + np.exp(-gate)) * up


@pytest.mark.parametrize("case", ["ragged_with_tail", "fewer_rows_than_tile"])
def test_gmm_fused_swiglu_interpret_matches_fp64(case):
  """silu(gate) * up from the fp32 accumulators; the pre-activation too when asked for."""
  num_rows, sizes = _SIZE_CASES[case]
  save_preact = case == "ragged_with_tail"
  rng = np.random.default_rng(len(case))
  lhs = jnp.asarray(rng.standard_normal((num_rows, 128)), jnp.bfloat16)
  rhs = jnp.asarray(rng.standard_normal((len(sizes), 128, 2 * 2 * _SPLIT_M.cta_n)), jnp.bfloat16)
  out = mgpu.gmm(lhs, rhs, jnp.asarray(sizes, jnp.int32), out_dtype=jnp.float32, config=_SPLIT_M,
                 swiglu=True, save_preact=save_preact, interpret=_INTERPRET, num_sms=3)
  ref = _np_gmm(_bf16_np(lhs), _bf16_np(rhs), sizes, False)
  act = out[0] if save_preact else out
  assert act.shape == (num_rows, rhs.shape[2] // 2)
  np.testing.assert_allclose(np.asarray(act, np.float64), _np_swiglu(ref), rtol=1e-5, atol=1e-4)
  if save_preact:
    np.testing.assert_allclose(np.asarray(out[1], np.float64), ref, rtol=1e-5, atol=1e-4)


def test_epilogue_slabs_need_128_byte_rows():
  """TMA stores from any row of a slab need 128-byte rows (64-byte ones faulted on an H200)."""
  lhs = jax.ShapeDtypeStruct((1024, 512), jnp.bfloat16)
  rhs = jax.ShapeDtypeStruct((8, 512, 2048), jnp.bfloat16)
  slab32 = mgpu.parse_tile_config("ws_chain:128:256:64:4:m:e32")
  assert not mgpu.supports(lhs, rhs, False, jnp.bfloat16, slab32)  # 32 x 2 bytes
  assert mgpu.supports(lhs, rhs, False, jnp.float32,
                       dataclasses.replace(slab32, stages=2))  # 32 x 4 bytes
  assert mgpu.supports(lhs, rhs, False, jnp.bfloat16, dataclasses.replace(slab32, epi_n=64))


def test_tile_config_spec_round_trips_and_bad_tokens_fail():
  for cfg in [_SPLIT_M, mgpu.DEFAULT_TILE_CONFIG, mgpu.DEFAULT_SWIGLU_CONFIG,
              *_PING_PONG.values(), *mgpu.TILE_CONFIGS.values()]:
    assert mgpu.parse_tile_config(cfg.spec()) == cfg
  assert mgpu.parse_tile_config("pp:128:128:64:4:e64:a").resident_lhs
  cfg = mgpu.parse_tile_config("pp:128:128:64:6:e64:o:c")
  assert cfg.ordered and cfg.multicast_lhs and cfg.spec() == "pp:128:128:64:6:e64:o:c"
  cfg = mgpu.parse_tile_config("pp:128:128:64:5:e64:d")
  assert cfg.double_staging and cfg.out_slots() == 2 and cfg.spec() == "pp:128:128:64:5:e64:d"
  assert mgpu.parse_tile_config("pp:128:128:64:6:e64").out_slots() == 1
  cfg = mgpu.parse_tile_config("pp:128:128:64:6:e64:r64:d")
  assert (cfg.epi_rows, cfg.spec()) == (64, "pp:128:128:64:6:e64:r64:d")
  assert cfg.smem_bytes(2, 2) == 6 * 32768 + 2 * 2 * 64 * 64 * 2  # the ring and four 8 KiB slots
  with pytest.raises(ValueError, match="only the 'pp' body has"):
    mgpu.parse_tile_config("ws:128:128:64:4:r64")
  with pytest.raises(ValueError, match="unknown token 'x'"):
    mgpu.parse_tile_config("ws:128:128:64:4:x")
  with pytest.raises(ValueError, match="unknown body 'wss'"):
    mgpu.parse_tile_config("wss:128:128:64:4")
  with pytest.raises(ValueError, match="only the 'pp' body"):
    mgpu.parse_tile_config("ws_chain:128:128:64:4:a")
  with pytest.raises(ValueError, match="drop the 'm'"):
    mgpu.parse_tile_config("pp:128:128:64:4:m")
  with pytest.raises(ValueError, match="only the 'pp' body has"):
    mgpu.parse_tile_config("ws:128:128:64:4:o")
  with pytest.raises(ValueError, match="keep one of them"):
    mgpu.parse_tile_config("pp:128:128:64:4:a:c")


def test_multicast_lhs_needs_column_tile_pairs():
  """The two CTAs of a cluster take column tiles 2c and 2c + 1 of one item."""
  cfg = mgpu.parse_tile_config("pp:128:128:64:6:e64:c")
  lhs = jax.ShapeDtypeStruct((1024, 512), jnp.bfloat16)
  rhs = lambda n: jax.ShapeDtypeStruct((8, 512, n), jnp.bfloat16)
  assert mgpu.supports(lhs, rhs(2048), False, jnp.bfloat16, cfg)  # 16 column tiles
  assert not mgpu.supports(lhs, rhs(384), False, jnp.bfloat16, cfg)  # 3
  assert mgpu.supports(lhs, rhs(384), False, jnp.bfloat16,
                       dataclasses.replace(cfg, multicast_lhs=False))


@pytest.mark.parametrize("case", sorted(_SIZE_CASES))
def test_tgmm_interpret_matches_fp64(case):
  num_rows, sizes = _SIZE_CASES[case]
  rng = np.random.default_rng(len(case))
  lhs = jnp.asarray(rng.standard_normal((num_rows, 128)), jnp.bfloat16)
  rhs = jnp.asarray(rng.standard_normal((num_rows, 64)), jnp.bfloat16)
  out = mgpu.tgmm(lhs, rhs, jnp.asarray(sizes, jnp.int32), out_dtype=jnp.float32,
                  config=_SMALL_WGRAD, interpret=_INTERPRET, num_sms=3)
  assert out.shape == (len(sizes), 128, 64)
  ref = _np_tgmm(_bf16_np(lhs), _bf16_np(rhs), sizes)
  np.testing.assert_allclose(np.asarray(out, np.float64), ref, rtol=1e-5, atol=1e-4)


def test_chained_pipeline_needs_whole_rounds_of_the_ring():
  lhs = jax.ShapeDtypeStruct((512, 192), jnp.bfloat16)  # 3 steps of 64: not a multiple of 2
  rhs = jax.ShapeDtypeStruct((4, 192, 256), jnp.bfloat16)
  assert not mgpu.supports(lhs, rhs, False, jnp.bfloat16, _SMALL["ws_chain"])
  assert mgpu.supports(lhs, rhs, False, jnp.bfloat16, _SMALL["ws"])


@pytest.mark.parametrize("transpose", [False, True])
@pytest.mark.parametrize("shape", ["mini_up", "mini_down"])
def test_gmm_lowers_for_cuda_at_ling_mini_shapes(transpose, shape):
  """Layout inference and the shared-memory budget are checked at lowering, without a GPU."""
  k_dim, n_dim = (2048, 1024) if shape == "mini_up" else (512, 2048)
  if transpose:
    k_dim, n_dim = n_dim, k_dim
  rhs_shape = (256, n_dim, k_dim) if transpose else (256, k_dim, n_dim)
  f = jax.jit(lambda a, b, s: mgpu.gmm(a, b, s, transpose_rhs=transpose, num_sms=132))
  lowered = f.trace(jax.ShapeDtypeStruct((8192, k_dim), jnp.bfloat16),
                    jax.ShapeDtypeStruct(rhs_shape, jnp.bfloat16),
                    jax.ShapeDtypeStruct((256,), jnp.int32)).lower(lowering_platforms=("cuda",))
  assert "mosaic_gpu" in lowered.as_text()


def test_resident_lhs_lowers_for_cuda_at_ling_mini_down_shape():
  """The streamed ping-pong body is the table's, lowered by the test above."""
  cfg = mgpu.parse_tile_config("pp:128:128:64:4:e64:a")
  f = jax.jit(lambda a, b, s: mgpu.gmm(a, b, s, config=cfg, num_sms=132))
  lowered = f.trace(jax.ShapeDtypeStruct((8192, 512), jnp.bfloat16),
                    jax.ShapeDtypeStruct((256, 512, 2048), jnp.bfloat16),
                    jax.ShapeDtypeStruct((256,), jnp.int32)).lower(lowering_platforms=("cuda",))
  assert "mosaic_gpu" in lowered.as_text()


def test_fused_swiglu_lowers_for_cuda_at_ling_mini_shapes():
  f = jax.jit(lambda a, b, s: mgpu.gmm(a, b, s, swiglu=True, save_preact=True, num_sms=132))
  lowered = f.trace(jax.ShapeDtypeStruct((8192, 2048), jnp.bfloat16),
                    jax.ShapeDtypeStruct((256, 2048, 1024), jnp.bfloat16),
                    jax.ShapeDtypeStruct((256,), jnp.int32)).lower(lowering_platforms=("cuda",))
  assert "mosaic_gpu" in lowered.as_text()


def test_tgmm_lowers_for_cuda_at_ling_mini_shapes():
  f = jax.jit(lambda a, b, s: mgpu.tgmm(a, b, s, num_sms=132))
  lowered = f.trace(jax.ShapeDtypeStruct((8192, 2048), jnp.bfloat16),
                    jax.ShapeDtypeStruct((8192, 1024), jnp.bfloat16),
                    jax.ShapeDtypeStruct((256,), jnp.int32)).lower(lowering_platforms=("cuda",))
  assert "mosaic_gpu" in lowered.as_text()


def test_backend_registered_and_auto_stays_reference_on_cpu():
  assert "pallas_mosaic_gpu" in gmm_lib._BACKENDS
  assert gmm_lib._resolve_backend("auto") == "reference"


def test_backend_falls_back_to_reference_for_uncovered_operands():
  """fp32 operands have no wgmma path here: the backend must give the reference's answer."""
  rng = np.random.default_rng(0)
  lhs = jnp.asarray(rng.standard_normal((50, 24)), jnp.float32)
  rhs = jnp.asarray(rng.standard_normal((3, 24, 40)), jnp.float32)
  sizes = jnp.asarray([20, 0, 25], jnp.int32)

  def loss(backend, lhs, rhs):
    return jnp.sum(gmm_lib.grouped_matmul(lhs, rhs, sizes, backend=backend) ** 2)

  ours = jax.value_and_grad(lambda a, b: loss("pallas_mosaic_gpu", a, b), argnums=(0, 1))(lhs, rhs)
  ref = jax.value_and_grad(lambda a, b: loss("reference", a, b), argnums=(0, 1))(lhs, rhs)
  for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(ref)):
    np.testing.assert_allclose(a, b, rtol=1e-6)


def test_bench_kernels_stops_before_timing_without_its_baselines():
  """experiments/bench_kernels.py with --baselines (the default) and neither gpu_baselines nor
  tokamax importable: one error naming both fixes, exit 2, before any check or timing."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  blocked = ("import runpy, sys; sys.modules['gpu_baselines'] = sys.modules['tokamax'] = None; "
             "sys.argv = ['bench_kernels.py']; "
             "runpy.run_path('experiments/bench_kernels.py', run_name='__main__')")
  proc = subprocess.run([sys.executable, "-c", blocked], cwd=root, capture_output=True, text=True,
                        timeout=300, env=dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=root))
  assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
  assert "error: --baselines: gpu_baselines" in proc.stderr
  assert "device_wheels.sh tokamax immutabledict pydantic" in proc.stderr
  assert "--baselines=false" in proc.stderr
  assert "CORRECTNESS" not in proc.stdout
