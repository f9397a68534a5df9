"""Tests for kernels/fp8_tgmm_mgpu.py (the FP8 grouped weight gradient) and its route through
kernels/fp8_gemm.py, on CPU.

The kernel runs in Pallas's GPU interpret mode against a float64 NumPy loop over groups built
from the raw E4M3 codes and scales; it is also lowered for CUDA at a Ling-mini shape, which runs
Mosaic GPU's layout inference of the masked FP8 boxes without a GPU. Interpret mode has no
swizzle: the GPU check is `python -m kernels.fp8_tgmm_mgpu`.

Key: M rows, K and N the output's dims, G groups, C 128-row tiles that restart per group.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import mosaic_gpu as plgpu

from kernels import fp8_gemm
from kernels import fp8_quant as fq
from kernels import fp8_tgmm_mgpu as tgmm
from tests.test_fp8_mgpu import _codes


def _np_tile_ids(num_rows, sizes_G):
  """Each row's tile: 128-row tiles from every group's first row, numbered in row order."""
  ids_M, tile, start = np.zeros(num_rows, np.int64), 0, 0
  for size in list(sizes_G) + [num_rows - sum(sizes_G)]:  # the rows past the groups last
    ids_M[start:start + size] = tile + np.arange(size) // 128
    tile, start = tile + -(-size // 128), start + size
  return ids_M


def _np_wgrad(a_q_KM, sa_KC, b_q_NM, sb_NC, sizes_G):
  """out[g] = sum over rows m of g of (codes x scale of m's tile) of A and B, in float64."""
  ids_M = _np_tile_ids(a_q_KM.shape[1], sizes_G)
  a_KM = np.asarray(a_q_KM).astype(np.float64) * np.asarray(sa_KC, np.float64)[:, ids_M]
  b_NM = np.asarray(b_q_NM).astype(np.float64) * np.asarray(sb_NC, np.float64)[:, ids_M]
  out, start = np.zeros((len(sizes_G), a_KM.shape[0], b_NM.shape[0])), 0
  for g, size in enumerate(sizes_G):
    for m in range(start, start + size):
      out[g] += np.outer(a_KM[:, m], b_NM[:, m])
    start += size
  return out


def _assert_close(out_GKN, ref_GKN, rtol):
  out = np.asarray(out_GKN, np.float64)
  for g in range(ref_GKN.shape[0]):
    if not ref_GKN[g].any():  # an empty group: exact zeros
      np.testing.assert_array_equal(out[g], 0.0)
      continue
    scale = np.abs(ref_GKN[g]).max(axis=1, keepdims=True) + 1e-300  # per row: scales vary
    np.testing.assert_array_less(np.abs(out[g] - ref_GKN[g]) / scale, rtol)


@pytest.mark.parametrize("case", ["ragged_fp32", "one_group_bf16", "ragged_fp32_overlap",
                                  "ragged_fp32_x2", "ragged_fp32_ws", "one_group_bf16_ws",
                                  "ragged_fp32_unsorted"])
def test_tgmm_fp8_matches_fp64(case):
  """Groups of 0, 32, 96 and 160 rows (partial last tiles, whose other rows are the next
  group's or the rows past the groups); one group of all rows (2.5 tiles, the last read past M:
  zeros from TMA) in bf16 with 64-row alignment. Two accumulators per unit (acc_cols), the
  second's wgmma issued before the first is promoted in the overlap case; two CTAs per SM in
  the x2 case (6 CTAs for 10 units: some run two, storing while the next unit runs);
  warp-specialised in the ws cases (two compute warpgroups of 64 rows each, each masking its own
  rows of A; an empty group's units store zeros without a pipeline). Units take the groups
  largest first (2, 0, 4, 3, 1 for the ragged sizes) except in the unsorted case (index order)."""
  m_dim, sizes, row_align, out_dtype, rtol = {
      "ragged_fp32": (416, [96, 0, 160, 32, 96], 32, jnp.float32, 1e-5),
      "one_group_bf16": (320, [320], 64, jnp.bfloat16, 2**-8),
      "ragged_fp32_overlap": (416, [96, 0, 160, 32, 96], 32, jnp.float32, 1e-5),
      "ragged_fp32_x2": (416, [96, 0, 160, 32, 96], 32, jnp.float32, 1e-5),
      "ragged_fp32_ws": (416, [96, 0, 160, 32, 96], 32, jnp.float32, 1e-5),
      "one_group_bf16_ws": (320, [320], 64, jnp.bfloat16, 2**-8),
      "ragged_fp32_unsorted": (416, [96, 0, 160, 32, 96], 32, jnp.float32, 1e-5),
  }[case]
  rng = np.random.default_rng(len(case))
  k_dim, n_dim = 128, 64
  num_tiles = fq.row_tile_ids(m_dim, jnp.asarray(sizes))[1]
  a_q, b_q = _codes(rng, (k_dim, m_dim)), _codes(rng, (n_dim, m_dim))
  # Scales over 2^-12..2^4: a tile read with a neighbour's scale is far off.
  sa = jnp.asarray(np.exp2(rng.integers(-12, 4, (k_dim, num_tiles))), jnp.float32)
  sb = jnp.asarray(np.exp2(rng.integers(-12, 4, (n_dim, num_tiles))), jnp.float32)
  cfg = dataclasses.replace(tgmm.INTERPRET_CONFIG, overlap=case.endswith("overlap"),
                            ctas_per_sm=2 if case.endswith("x2") else 1,
                            by_size=not case.endswith("unsorted"))
  if case.endswith("ws"):  # 64 rows per compute warpgroup, the least a wgmma takes
    cfg = tgmm.Fp8WgradConfig(tile_k=128, tile_n=64, stages=2, acc_cols=32, ws=True)
  assert cfg.mma.acc_n * 2 == cfg.tile_n and cfg.mma.overlap == cfg.overlap
  out = tgmm.tgmm_fp8(a_q, sa, b_q, sb, jnp.asarray(sizes, jnp.int32), row_align=row_align,
                      out_dtype=out_dtype, config=cfg, interpret=plgpu.InterpretGPUParams(),
                      num_sms=3)
  assert out.shape == (len(sizes), k_dim, n_dim) and out.dtype == out_dtype
  _assert_close(out, _np_wgrad(a_q, sa, b_q, sb, sizes), rtol)


def test_public_op_runs_the_fp8_kernel_in_interpret_mode():
  """fp8_transposed_grouped_matmul on the interpret backend with row_align 32 against the
  reference backend, on the quantiser's own operands. To 1e-5 (measured 2.6e-7): the
  dequantising bf16 path (row_align 1) rounds its operands to bf16 and is 2.4e-3 off on these,
  so passing means the FP8 kernel ran."""
  rng = np.random.default_rng(2)
  sizes = jnp.asarray([64, 0, 224, 32], jnp.int32)
  x = jnp.asarray(rng.standard_normal((352, 128)), jnp.float32)
  dy = jnp.asarray(rng.standard_normal((352, 128)) * 1e-3, jnp.float32)
  tile_ids, num_tiles = fq.row_tile_ids(352, sizes)
  operands = (*fq.quantize_rows_transposed(x, tile_ids, num_tiles, row_align=32),
              *fq.quantize_rows_transposed(dy, tile_ids, num_tiles, row_align=32), tile_ids, sizes)
  ref = fp8_gemm.fp8_transposed_grouped_matmul(*operands, backend="reference")
  got = fp8_gemm.fp8_transposed_grouped_matmul(*operands, backend="pallas_mosaic_gpu_interpret",
                                               row_align=32)
  assert got.shape == ref.shape and got.dtype == jnp.float32
  assert float(jnp.abs(got - ref).max()) < 1e-5 * float(jnp.abs(ref).max())
  np.testing.assert_array_equal(got[1], 0.0)


def test_bad_input_raises_before_compiling():
  codes, scales = jnp.zeros((128, 64), fq.E4M3), jnp.ones((128, 2), jnp.float32)
  sizes = jnp.asarray([64], jnp.int32)
  with pytest.raises(ValueError, match="row_align must be a power of two >= 32"):
    tgmm.tgmm_fp8(codes, scales, codes, scales, sizes, row_align=16)
  with pytest.raises(ValueError, match="E4M3 codes"):
    tgmm.tgmm_fp8(codes.astype(jnp.bfloat16), scales, codes, scales, sizes, row_align=32)
  with pytest.raises(ValueError, match="K=96.*row_align=1"):
    fp8_gemm.fp8_transposed_grouped_matmul(
        codes[:96], scales[:96], codes, scales, jnp.zeros((64,), jnp.int32), sizes,
        backend="pallas_mosaic_gpu_interpret", row_align=32)


def test_gpu_backend_takes_the_kernel_from_row_align_32(monkeypatch):
  """On the GPU the kernel runs for groups padded to 32 rows or more: below 128 with fp32 out
  (the one-CTA tiling's bf16 store was slower), rounded to the asked dtype after; from 128 in the
  asked dtype. The switch turns it off."""
  assert fp8_gemm._WGRAD_KERNEL_ON_GPU
  assert fp8_gemm._kernel_tgmm("pallas_mosaic_gpu", "f", 2048, 1024, jnp.bfloat16, 16) is None
  calls = []
  monkeypatch.setattr(tgmm, "tgmm_fp8", lambda *a, **kw: calls.append(kw) or jnp.ones(
      (1, 2, 2), kw["out_dtype"]))
  for align in (32, 128):
    kernel = fp8_gemm._kernel_tgmm("pallas_mosaic_gpu", "f", 2048, 1024, jnp.bfloat16, align)
    assert kernel().dtype == jnp.bfloat16
  assert calls == [{"row_align": 32, "out_dtype": jnp.float32},
                   {"row_align": 128, "out_dtype": jnp.bfloat16}]
  monkeypatch.setattr(fp8_gemm, "_WGRAD_KERNEL_ON_GPU", False)
  assert fp8_gemm._kernel_tgmm("pallas_mosaic_gpu", "f", 2048, 1024, jnp.bfloat16, 32) is None


@pytest.mark.parametrize("row_align, out_dtype, spec", [
    (32, jnp.bfloat16, None), (128, jnp.float32, None), (32, jnp.float32, "128:128:4:64:ws"),
    (128, jnp.bfloat16, None), (128, jnp.float32, "128:64:3:64:x2:unsorted")])
def test_kernel_lowers_for_cuda_at_ling_mini_size(row_align, out_dtype, spec):
  """Layout inference of the masked E4M3 boxes and the M-offset TMA boxes (32- and 128-byte
  swizzles) at the default tilings and warp-specialised ones, without a GPU."""
  cfg = tgmm.Fp8WgradConfig.parse(spec) if spec else None
  m_dim, groups, k_dim, n_dim = 131072, 256, 2048, 1024
  num_tiles = m_dim // 128 + groups
  spec = jax.ShapeDtypeStruct
  f = jax.jit(lambda *a: tgmm.tgmm_fp8(*a, row_align=row_align, out_dtype=out_dtype,
                                       num_sms=132, config=cfg))
  lowered = f.trace(spec((k_dim, m_dim), jnp.float8_e4m3fn), spec((k_dim, num_tiles), jnp.float32),
                    spec((n_dim, m_dim), jnp.float8_e4m3fn), spec((n_dim, num_tiles), jnp.float32),
                    spec((groups,), jnp.int32)).lower(lowering_platforms=("cuda",))
  assert "mosaic_gpu" in lowered.as_text()


def test_wgrad_tiling_specs_parse_and_fit_per_cta():
  cfg = tgmm.Fp8WgradConfig.parse("64:128:3:64:overlap:x2")
  assert cfg == tgmm.Fp8WgradConfig(tile_k=64, tile_n=128, stages=3, acc_cols=64, overlap=True,
                                    ctas_per_sm=2)
  assert tgmm._spec(cfg) == "64:128:3:64:overlap:x2"
  # Two CTAs share an SM's shared memory: 128 x 128 with fp32 out fits only narrowed.
  fitted = tgmm.Fp8WgradConfig.parse("128:128:4:64:x2").fit_smem(4)
  assert fitted.smem_bytes(4) <= fitted.smem_budget < tgmm.DEFAULT_CONFIG.smem_budget
  assert (fitted.stages, fitted.tile_n) == (3, 64)  # narrowed, then stages restored to fit
  assert tgmm.Fp8WgradConfig.parse("128:128:4:64:ws").wg_rows == 64
  assert not tgmm.Fp8WgradConfig.parse("128:128:4:64:ws:unsorted").by_size
  assert tgmm.Fp8WgradConfig.parse("128:128:4:64:ws").by_size
  assert not tgmm.supports(2048, 1024, jnp.float32, tgmm.Fp8WgradConfig(ws=True, ctas_per_sm=2))
  assert not tgmm.supports(2048, 1024, jnp.float32, tgmm.Fp8WgradConfig(tile_k=64, ws=True))
  for bad in ("128:128:4", "128:128:4:64:x", "128:128:4:64:fast", "a:128:4:64"):
    with pytest.raises(ValueError, match="tile_k:tile_n:stages:acc_cols"):
      tgmm.Fp8WgradConfig.parse(bad)


def test_groups_padded_to_128_rows_take_the_warp_specialised_tilings():
  assert tgmm.default_config(32) == tgmm.default_config(64) == tgmm.DEFAULT_CONFIG
  for out_dtype in (jnp.float32, jnp.bfloat16):
    assert tgmm.default_config(128, out_dtype).ws
    assert tgmm.supports(2048, 1024, out_dtype, tgmm.default_config(128, out_dtype))
    assert tgmm.supports(512, 2048, out_dtype, tgmm.default_config(128, out_dtype))
  assert not tgmm.supports(2048, 1024, jnp.float16, tgmm.default_config(128, jnp.float16))
