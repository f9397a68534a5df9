"""Checks and times the blockwise FP8 kernels against their baselines, in one run on an H200.

Run on the GPU machine (see ../shared/device.md; gpu_baselines.py copied into .bench/):
  PYTHONPATH=$PWD:/tmp/site python3 experiments/bench_fp8.py

First a correctness section against fp32 references (ragged and empty groups, both B scalings,
full-size dense) ending in CORRECTNESS PASS/FAIL; then timings, each the median of 3 batches of
20 calls queued back to back (one sync per batch):
  - dense: blockwise FP8 (our Mosaic GPU kernel, alone and through kernels/fp8_gemm.py with its
    scale transposes), XLA per-tensor FP8 (cuBLASLt), dense bf16, and torch's blockwise
    `scaled_mm` (cuBLAS) when the image's torch has it;
  - grouped: FP8 against our bf16 grouped GEMM (kernels/grouped_matmul_mgpu.py), balanced; the
    bf16 kernel on the FP8 codes' values and on full-mantissa bf16 operands (`time_grouped`);
    with --sustained_s, each also streamed for seconds under the board's power limit, with the
    SM clock and power that nvidia-smi reports meanwhile;
  - quantise: kernels/fp8_quant.py, XLA against the Triton kernels (fp8_quant_triton.py, checked
    bit for bit against XLA first), in GB/s against an elementwise copy; per-expert tiles also
    over groups padded to --group_aligns rows (dispatch.permute's group_align);
  - expert_align: the Ling-mini up-projection's FP8 grouped GEMM over those padded rows against
    the unpadded ones (the padding's cost to the GEMMs);
  - linear_time: the jitted fp8_linear forward + backward (`time_linear`).
Writes $OUT/bench_fp8.json after every section.

Shape key: M rows, K contraction, N output columns, G groups.
"""

import functools
import json
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from absl import app
from absl import flags
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from kernels import fp8_gemm  # noqa: E402
from kernels import fp8_gemm_mgpu as mgpu  # noqa: E402
from kernels import fp8_quant as fq  # noqa: E402
from kernels import fp8_quant_triton as fqt  # noqa: E402
from kernels import grouped_matmul_mgpu as bf16_mgpu  # noqa: E402
from ling_jax import profiling  # noqa: E402

_SECTIONS = flags.DEFINE_list(
    "sections", ["dense", "grouped", "quant"],  # also: dense_wgrad, expert_align
    "What to time; 'linear' alone runs only the in-jit FP8 linear diagnosis (`diagnose_linear`), "
    "'linear_time' alone only `time_linear`.")
_DENSE_CONFIGS = flags.DEFINE_list(
    "dense_configs", ["128:128:3:m:16:1:m:64:chain:overlap", "128:128:3:m:16:1:n:64",
                      "128:128:3:m:16:1:m:64:overlap"],
    "Tilings tm:tn:stages:grid_minor:grid_width:scalar_b_scale[:wg_split[:acc_cols[:probe]]] "
    "for the dense GEMMs (Fp8TileConfig's fields; e.g. 128:128:3:m:16:1:m:128, warpgroups "
    "split by rows (n: by columns), 128-column accumulators; a 9th field times a probe: "
    "const_sb, no_promote, no_store, no_smem_out or no_mma, numerically wrong); tokens "
    "'chain', 'overlap', 'f' (flat) and 'c' (cluster_a) anywhere after the 6th switch on those "
    "Fp8TileConfig flags, 'nt' and 'late' switch off unit_table and release_early. Session "
    "6's specs had a body field (ws) after the 6th; sessions 17-23's tokens 'd', 'r', 's', 'e' "
    "and the split 'p' name variants removed in session 24.")
_GROUPED_CONFIGS = flags.DEFINE_list(
    "grouped_configs", ["128:64:4:m:4:1:m:128:f:c", "128:64:4:m:16:1:m:128:f",
                        "128:64:4:m:4:1:m:128:chain", "128:64:4:m:4:1:m:64:chain:overlap"],
    "Tilings for the grouped GEMMs (same format); the first two are the Ling-mini experts' "
    "up and down tunings (fp8_gemm_mgpu.TILE_CONFIGS: the up one on the flat ring in pairs of "
    "SMs since session 23; the down one, on the flat ring since session 19, is the input "
    "gradients' too), the third the up one before session 23, the fourth session 10's. "
    "128x128 warpgroup tiles without split accumulators (acc_cols 0) spill registers.")
_GROUPED_SHAPES = flags.DEFINE_list("grouped_shapes", ["mini", "flash", "1t"], "Expert shapes.")
_GROUPED_PROBLEMS = flags.DEFINE_list(
    "grouped_problems", ["up", "down"],
    "Expert GEMMs to time: up, down (forward), up_dgrad, down_dgrad (their input gradients: "
    "K and N swapped).")
_DENSE_SHAPE_COUNT = flags.DEFINE_integer("dense_shapes", 5, "Time the first n dense shapes.")
_TORCH = flags.DEFINE_bool("torch", True, "Time torch's blockwise scaled_mm too.")
_QUICK_CHECK = flags.DEFINE_bool(
    "quick_check", False, "Check only the first grouped and dense tiling (saves compiles).")
_LINEAR_BARRIERS = flags.DEFINE_list(
    "linear_barriers", ["on", "off"], "--sections=linear: fp8_quant's dequant barrier states.")
_LINEAR_DTYPES = flags.DEFINE_list("linear_dtypes", ["float32", "bfloat16"],
                                   "--sections=linear: input dtypes.")
_WGRAD_TOKENS = flags.DEFINE_integer(
    "wgrad_tokens", 16384, "--sections=dense_wgrad: tokens (the contraction); 49152 is "
    "mini_h200's 12 x 4096.")
_WGRAD_SPLITS = flags.DEFINE_list(
    "wgrad_splits", ["1"], "--sections=dense_wgrad: k_splits values to time (gmm_fp8's split-K; "
    "1 is none). At 49152 tokens fp8_gemm_mgpu.auto_k_splits picks 2 for the shared expert's "
    "down and gate+up, QKV and the dense FFN's down, 1 for the rest.")
_STREAM = flags.DEFINE_bool(
    "stream", True, "grouped: also time each GEMM's HBM bytes (A and B read, the bf16 output "
    "written) through one XLA fusion (`gemm_stream`) and through TMA (`tma_stream`), and its "
    "output alone (an XLA broadcast and `tma_write`).")
_WRITE_ORDERS = flags.DEFINE_list(
    "write_orders", ["n"], "--stream: the tile orders `tma_write` times the output in: 'n' "
    "(each row of tiles in turn) and 'm<w>' (bands of w row tiles, as grid_minor 'm' with "
    "grid_width w walks a GEMM's units).")
_REPEATS = flags.DEFINE_integer("repeats", 20, "Calls per timed batch (median of 3 batches).")
_GEMM_CHECK = flags.DEFINE_bool(
    "gemm_check", True, "Run the GEMM correctness section first (compiles every tiling).")
_BASELINES = flags.DEFINE_bool(
    "baselines", True, "Run .bench/gpu_baselines.py's dense bf16 and fp8 first (the dense "
    "section times XLA's fp8 and bf16 itself).")
_CHECK_CONFIGS = flags.DEFINE_list(
    "check_configs", [],
    "Tilings to check quickly first (`check_configs`: the grouped cases of the full check and "
    "dense 8192^3, fp32 and bf16 out, against the reference backend); independent of "
    "--gemm_check.")
_QUANT_LAUNCHES = flags.DEFINE_list(
    "quant_launches", ["{rows_per_prog}:{tiles_per_prog}:{num_warps}".format(**fqt.ROWS_LAUNCH)],
    "Triton quantise kernel launches R:T:num_warps[:num_stages] for the 1x128 tiles alone (R "
    "rows, T tiles per program; num_stages above 1 loops over the T tiles, pipelined); default: "
    "the kernel's own (fp8_quant_triton.ROWS_LAUNCH).")
_QUANT_COLS_LAUNCHES = flags.DEFINE_list(
    "quant_cols_launches",
    list(dict.fromkeys("{tiles_per_prog}:{num_warps}:{transpose_codes:d}".format(**launch)
                       for launch in (fqt.COLS_LAUNCH, fqt.COLS_ALIGNED_LAUNCH))),
    "Launches T:num_warps:transpose_codes[:num_stages] of the Triton kernel with column tiles "
    "(R = 128); the first is checked in every dtype and scale rule; default: the kernel's own "
    "(COLS_LAUNCH, per group, and COLS_ALIGNED_LAUNCH, tiles from row 0).")

_GROUP_ALIGNS = flags.DEFINE_list(
    "group_aligns", ["16", "32", "128"],
    "Row alignments of the expert groups (dispatch.permute's group_align) that the quant and "
    "expert_align sections time against unpadded groups.")
_PROFILE_DIR = flags.DEFINE_string(
    "profile_dir", "",
    "Grouped section: after timing, run each flat-ring tiling (`f`) once more under Mosaic GPU's "
    "on-device profiler (`gmm_fp8(profile_dir=...)`), write its trace under this directory and "
    "print each warpgroup role's time per phase (`summarize_ring_trace`).")

_SUSTAINED_S = flags.DEFINE_float(
    "sustained_s", 0.0,
    "Grouped section: after the timings, run each FP8 tiling of --grouped_configs and the bf16 "
    "kernel (full mantissas) for this many seconds each, after 2 s idle, in batches of 10 "
    "queued calls, and record the median of the last half, with the SM clock and board power "
    "that nvidia-smi samples meanwhile (where it is on the PATH): what a long stream of calls "
    "settles at under the board's power limit. 0: off.")

# --grouped_problems: (K, N) of each expert GEMM from (hidden, expert width)
_GROUPED_PROBLEM_DIMS = {"up": lambda h, w: (h, 2 * w), "down": lambda h, w: (w, h),
                         "up_dgrad": lambda h, w: (2 * w, h), "down_dgrad": lambda h, w: (h, w)}
# rows (tokens x top-8), experts, hidden, expert width
_EXPERT_SHAPES = {"mini": (131072, 256, 2048, 512), "flash": (131072, 256, 4096, 1024),
                  "1t": (131072, 256, 8192, 2048)}
# Ling-mini linears at 16384 tokens: (name, M, K, N)
_DENSE_SHAPES = [("8192^3", 8192, 8192, 8192), ("mini QKV 2048->3072", 16384, 2048, 3072),
                 ("mini attn out 2048->2048", 16384, 2048, 2048),
                 ("mini dense FFN up 2048->2x5120", 16384, 2048, 10240),
                 ("mini dense FFN down 5120->2048", 16384, 5120, 2048)]
# --sections=dense_wgrad: (name, d_in, d_out) of Ling-mini's linears, the shared expert's too.
_WGRAD_SHAPES = [(name, k_dim, n_dim) for name, _, k_dim, n_dim in _DENSE_SHAPES[1:]] + [
    ("mini shared expert up 2048->2x512", 2048, 1024),
    ("mini shared expert down 512->2048", 512, 2048)]
_CHECK_DENSE = (8192, 8192, 8192)  # full-size dense check (M, K, N)
_LINEAR_CHECK = (4096, 2048, 1024)  # the FP8 linear's gradient check (M, K, N)
_QUANT_ROWS = (16384, 131072)  # rows of a linear's and of the experts' activations
_QUANT_COLS = 2048  # their columns (Ling-mini hidden)
_QUANT_WEIGHTS = (256, 2048, 1024)  # the experts' gate+up weights (G, K, N)
_QUANT_CHECK = (1000, 2048)  # the quantise kernels' bit-exactness check (M, K)
# `gemm_stream` rows (XLA), and the output alone written
STREAM_FP8, STREAM_BF16, STREAM_WRITE = "fp8 bytes streamed", "bf16 bytes streamed", "out written"
STREAM_TMA_WRITE = "out written by TMA stores"  # `tma_write`
RESULTS: dict[str, dict] = {}
TABLES: dict[str, list] = {"dense": [], "grouped": [], "quant": [], "expert_align": []}


def _bench(f, *args, n=None, warm=2) -> float:
  """Seconds per call, timed as in bench_kernels.py (`profiling.time_queued`)."""
  return profiling.time_queued(f, *args, calls=n or _REPEATS.value, warmup=warm)


def _record(name: str, value: float, unit: str, **extra) -> None:
  RESULTS[name] = {"value": value, "unit": unit, **extra}
  print(f"{name:72s} {value:10.1f} {unit}", flush=True)


def _write_json() -> None:
  with open(os.path.join(os.environ.get("OUT", "/tmp"), "bench_fp8.json"), "w") as f:
    json.dump({"results": RESULTS, "tables": TABLES, "jax": jax.__version__,
               "device": str(jax.devices()[0].device_kind)}, f, indent=1)


# Spec tokens of kernel variants that lost and were removed (kernels/fp8_gemm_mgpu.py's doc).
_REMOVED_TOKENS = {"d": "double_staging", "r": "b_scale_ring", "s": "swizzle_rows_out",
                   "e": "shadow_epilogue"}


def _config(spec: str) -> mgpu.Fp8TileConfig:
  """tm:tn:stages:grid_minor:grid_width:scalar_b_scale[:wg_split[:acc_cols[:probe]]], then
  optional tokens `chain`, `overlap`, `f` and `c` (Fp8TileConfig's flags chain, overlap, flat
  and cluster_a), `nt` (unit_table off) and `late` (release_early off)."""
  tokens = spec.split(":")
  removed = [t for t in tokens[6:] if t in _REMOVED_TOKENS] + (
      ["p"] if tokens[6:7] == ["p"] else [])
  if removed:
    names = ", ".join(f"{t!r} ({_REMOVED_TOKENS.get(t, 'wg_split ping-pong')})" for t in removed)
    raise ValueError(f"tiling spec {spec!r}: {names} lost and left the kernel in session 24 "
                     "(BENCHMARKS.md has their timings); drop them from the spec")
  flag_names = {"chain": "chain", "overlap": "overlap", "f": "flat", "c": "cluster_a"}
  flags_on = {t for t in tokens if t in flag_names}
  tm, tn, stages, minor, width, scalar, *rest = [
      t for t in tokens if t not in flags_on and t not in ("nt", "late")]
  extra = dict(zip(("wg_split", "acc_cols", "probe"), rest))
  if "acc_cols" in extra:
    extra["acc_cols"] = int(extra["acc_cols"])
  return mgpu.Fp8TileConfig(int(tm), int(tn), int(stages), minor, int(width), scalar == "1",
                            **extra, **{flag_names[t]: True for t in flags_on},
                            unit_table="nt" not in tokens, release_early="late" not in tokens)


def _operands(key, m_dim, k_dim, n_dim, groups=None):
  """Random E4M3 codes and positive scales with a spread, in the public layouts."""
  ka, kb, ksa, ksb = jax.random.split(key, 4)
  b_shape = (n_dim, k_dim) if groups is None else (groups, n_dim, k_dim)
  # x48: the largest of 1e10 normals stays under E4M3's 448 (a cast past it gives NaN).
  a_q = (jax.random.normal(ka, (m_dim, k_dim), jnp.bfloat16) * 48).astype(fq.E4M3)
  b_q = (jax.random.normal(kb, b_shape, jnp.bfloat16) * 48).astype(fq.E4M3)
  sa = jnp.exp2(jax.random.randint(ksa, (m_dim, k_dim // 128), -10, -4)).astype(jnp.float32)
  sb = jnp.exp2(jax.random.randint(ksb, b_shape[:-2] + (n_dim // 128, k_dim // 128), -10, -4))
  return a_q, sa, b_q, sb.astype(jnp.float32)


def _np_dequant(q, s, rows_tile, cols_tile=128):
  s = np.repeat(np.repeat(np.float32(s), rows_tile, axis=-2), cols_tile, axis=-1)
  return np.float32(q) * s[..., :q.shape[-2], :q.shape[-1]]


def check_correctness() -> bool:
  ok = True
  rng = np.random.default_rng(int(time.time()))
  key = jax.random.PRNGKey(int(rng.integers(1 << 30)))

  def report(name, err_fn, tol):
    nonlocal ok
    try:
      err = float(err_fn())
    except Exception as e:  # a config that fails to compile fails the check, not the run
      print(f"check {name} raised {type(e).__name__}: {str(e)[:600]}", flush=True)
      err = float("nan")
    good = bool(np.isfinite(err) and err < tol)
    ok &= good
    print(f"check {name:58s} rel_err={err:.2e} tol={tol:.0e} {'ok' if good else 'FAIL'}",
          flush=True)

  # Grouped: empty groups, groups under a tile, unaligned M, zero tail rows; every config.
  cases = {"zeros+tail": (1003, [0, 300, 1, 0, 7, 128, 0, 500]), "one group": (640, [0, 640, 0]),
           "all empty": (256, [0, 0, 0]), "tiny M": (40, [10, 0, 25])}
  k_dim, n_dim = 512, 512
  for case, (rows, sizes) in cases.items():
    a_q, sa, b_q, sb = _operands(key, rows, k_dim, n_dim, len(sizes))
    a_np, b_np = _np_dequant(a_q, sa, 1), _np_dequant(b_q, sb, 128)
    ref = np.zeros((rows, n_dim), np.float32)
    start = 0
    for g, size in enumerate(sizes):
      ref[start:start + size] = a_np[start:start + size] @ b_np[g].T
      start += size
    for spec in _GROUPED_CONFIGS.value[:1 if _QUICK_CHECK.value else None]:
      # fp32 out: 2e-4, since the tensor cores accumulate a 128-K wgmma in less than fp32
      # (~14 bits, as DeepSeek-V3 reports; why the kernel promotes every 128). Wrong scales
      # or rows give errors of order 1.
      for out_dtype, tol in ((jnp.float32, 2e-4), (jnp.bfloat16, 5e-3)):
        def err(spec=spec, out_dtype=out_dtype, a_q=a_q, sa=sa, b_q=b_q, sb=sb, sizes=sizes,
                ref=ref):
          out = np.float32(mgpu.gmm_fp8(a_q, sa.T, b_q, jnp.swapaxes(sb, 1, 2),
                                        jnp.asarray(sizes, jnp.int32), out_dtype=out_dtype,
                                        config=_config(spec)))
          # Per row too (a tenth of it counts), so that one misrouted row cannot hide.
          row_ref = np.linalg.norm(ref, axis=1)
          row_err = np.where(row_ref > 0, np.linalg.norm(out - ref, axis=1) / (row_ref + 1e-30),
                             np.abs(out).max(axis=1))
          return max(profiling.rel_error(out, ref), float(row_err.max()) / 10)
        report(f"grouped {case} {spec} {jnp.dtype(out_dtype).name}", err, tol)
  # Dense through the public op: both B scalings (tile = the wgrad's operands), bf16 out.
  a_q, sa, b_q, sb = _operands(key, 1024, 2048, 768)
  sb_tile = jnp.exp2(jax.random.randint(key, (768, 16), -10, -4)).astype(jnp.float32)
  a_np = _np_dequant(a_q, sa, 1)
  for b_scaling, scale, rows_tile in (("block", sb, 128), ("tile", sb_tile, 1)):
    report(f"fp8_matmul {b_scaling} bf16", lambda b_scaling=b_scaling, scale=scale,
           rows_tile=rows_tile: profiling.rel_error(
               fp8_gemm.fp8_matmul(a_q, sa, b_q, scale, b_scaling=b_scaling,
                                   backend="pallas_mosaic_gpu"),
               a_np @ _np_dequant(b_q, scale, rows_tile).T), 5e-3)
  # Full size, every dense config, against the reference backend on the GPU (fp32, HIGHEST).
  a_q, sa, b_q, sb = _operands(key, *_CHECK_DENSE)
  ref_full = fp8_gemm.fp8_matmul(a_q, sa, b_q, sb, out_dtype=jnp.float32, backend="reference")
  for spec in _DENSE_CONFIGS.value[:1 if _QUICK_CHECK.value else None]:
    report(f"dense {_CHECK_DENSE} {spec} fp32", lambda spec=spec, ref=ref_full: profiling.rel_error(
        mgpu.matmul_fp8(a_q, sa.T, b_q, sb.T, out_dtype=jnp.float32, config=_config(spec)),
        ref), 2e-4)
  del ref_full
  # The FP8 linear, jitted, operands quantised in the program: fprop, dgrad and wgrad of both
  # backends against NumPy's product of NumPy-quantised operands (`linear_in_jit`).
  for row in linear_in_jit(("pallas_mosaic_gpu", "reference"), (True,)):
    for out in ("y", "dgrad", "wgrad"):
      tol = 2e-4 if row["dtype"] == "float32" else 5e-3
      report(f"fp8_linear {row['dtype']} {row['backend']} {out} vs NumPy FP8",
             lambda row=row, out=out: row[out][0], tol)
  print("CORRECTNESS", "PASS" if ok else "FAIL", flush=True)
  RESULTS["correctness"] = {"value": float(ok), "unit": "pass"}
  return ok


def check_configs(specs) -> bool:
  """Grouped (empty groups, tiny groups, tails, one group holding every row) at K=N=512, dense
  with 1x128-tiled B and dense 8192^3, fp32 and bf16 out, every spec against the reference
  backend (fp32 HIGHEST on the GPU).
  A kernel that drops a scale or a row is off by order 1; the tolerance is 2e-4 (fp32 out) and
  5e-3 (bf16 out)."""
  ok = True
  key = jax.random.PRNGKey(5)
  cases = {"zeros+tail": (1003, [0, 300, 1, 0, 7, 128, 0, 500]), "one group": (640, [0, 640, 0]),
           "all empty": (256, [0, 0, 0]), "tiny M": (40, [10, 0, 25])}
  grouped = []
  for case, (rows, sizes) in cases.items():
    a_q, sa, b_q, sb = _operands(key, rows, 512, 512, len(sizes))
    sizes = jnp.asarray(sizes, jnp.int32)
    ref = np.array(fp8_gemm.fp8_grouped_matmul(a_q, sa, b_q, sb, sizes, out_dtype=jnp.float32,
                                               backend="reference"))
    ref[int(sizes.sum()):] = 0.0
    grouped.append((case, (a_q, sa.T, b_q, jnp.swapaxes(sb, 1, 2), sizes), ref))
  # B in 1x128 tiles (the wgrad's operand), at 1024 x 2048 -> 768
  t_a, t_sa, t_b, _ = _operands(key, 1024, 2048, 768)
  t_sb = jnp.exp2(jax.random.randint(key, (768, 16), -10, -4)).astype(jnp.float32)
  ref_tile = np.float32(fp8_gemm.fp8_matmul(t_a, t_sa, t_b, t_sb, b_scaling="tile",
                                            out_dtype=jnp.float32, backend="reference"))
  a_q, sa, b_q, sb = _operands(key, *_CHECK_DENSE)
  ref_dense = np.float32(fp8_gemm.fp8_matmul(a_q, sa, b_q, sb, out_dtype=jnp.float32,
                                             backend="reference"))
  for spec in specs:
    cfg = _config(spec)
    errs, tols = {}, {}
    try:
      # fp32 out (2e-4), and bf16 out (5e-3: bf16 rounding is ~2e-3). With bf16 out a tile's
      # fit differs (tile_n 128 rather than 64), and so does the store: session 6 checked fp32
      # only, and split accumulators wrote bf16 outputs wrongly (BENCHMARKS.md, session 8).
      for out_dtype, tol, suffix in ((jnp.float32, 2e-4, ""), (jnp.bfloat16, 5e-3, " bf16")):
        for case, args, ref in grouped:
          out = np.float32(mgpu.gmm_fp8(*args, out_dtype=out_dtype, config=cfg))
          errs[case + suffix] = (profiling.rel_error(out, ref) if np.any(ref)
                                 else float(np.abs(out).max()))
          tols[case + suffix] = tol
        if not cfg.flat:  # the flat ring takes block-scaled B only
          errs["tile-scaled B" + suffix] = profiling.rel_error(np.float32(mgpu.matmul_fp8(
              t_a, t_sa.T, t_b, t_sb.T, b_scaling="tile", out_dtype=out_dtype, config=cfg)),
              ref_tile)
          tols["tile-scaled B" + suffix] = tol
        errs["dense 8192^3" + suffix] = profiling.rel_error(np.float32(mgpu.matmul_fp8(
            a_q, sa.T, b_q, sb.T, out_dtype=out_dtype, config=cfg)), ref_dense)
        tols["dense 8192^3" + suffix] = tol
    except Exception as e:
      print(f"check {spec} raised {type(e).__name__}: {str(e)[:600]}", flush=True)
      errs["raised"], tols["raised"] = float("nan"), 0.0
    good = all(np.isfinite(v) and v < tols[k] for k, v in errs.items())
    ok &= good
    print(f"check {spec}: " + ", ".join(f"{k} {v:.1e}" for k, v in errs.items())
          + (" ok" if good else " FAIL"), flush=True)
  print("CONFIG CHECK", "PASS" if ok else "FAIL", flush=True)
  RESULTS["config check"] = {"value": float(ok), "unit": "pass"}
  return ok


def _np_quant(x, axis, tile=128):
  """NumPy 1x128 tiles of x along `axis` (fp8_quant's scale rule), dequantised, in fp64."""
  x = np.moveaxis(np.float32(x), axis, -1)
  tiles = x.reshape(*x.shape[:-1], -1, tile)
  amax = np.abs(tiles).max(-1, keepdims=True)
  scale = np.where(amax > 0, amax * fq.E4M3_INV_MAX, np.float32(1)).astype(np.float32)
  q = np.clip(tiles / scale, -fq.E4M3_MAX, fq.E4M3_MAX).astype(fq.E4M3)
  return np.moveaxis((q.astype(np.float64) * scale).reshape(x.shape), -1, axis)


def _np_quant_blocks(w, block=128):
  k_dim, n_dim = w.shape
  b = np.float32(w).reshape(k_dim // block, block, n_dim // block, block)
  amax = np.abs(b).max(axis=(1, 3), keepdims=True)
  scale = np.where(amax > 0, amax * fq.E4M3_INV_MAX, np.float32(1)).astype(np.float32)
  q = np.clip(b / scale, -fq.E4M3_MAX, fq.E4M3_MAX).astype(fq.E4M3)
  return (q.astype(np.float64) * scale).reshape(k_dim, n_dim)


def linear_in_jit(backends, barriers, dtypes=(jnp.float32, jnp.bfloat16)) -> list[dict]:
  """Jitted `fp8_linear` forward + backward (x, w and the cotangent quantised in the program)
  against NumPy, for each backend and with the dequantisation barrier of fp8_quant on or off.

  Each row holds, per output (y, dgrad, wgrad), (error against NumPy's product of the
  NumPy-quantised operands, error against the exact product of the unquantised ones), and the
  probe's cosine (the output gradient's quantisation; 1.0 means nothing was quantised). A
  GEMM whose E4M3 round trip XLA folded away is near the exact product and ~2.6% off the FP8
  one.
  """
  m_dim, k_dim, n_dim = _LINEAR_CHECK
  key = jax.random.PRNGKey(3)
  rows = []
  codes_f32 = fq._codes_f32
  for dtype in dtypes:
    x = jax.random.normal(key, (m_dim, k_dim), dtype)
    w = (jax.random.normal(jax.random.PRNGKey(4), (k_dim, n_dim), jnp.float32) * 0.03
         ).astype(dtype)
    dy = jax.random.normal(jax.random.PRNGKey(5), (m_dim, n_dim), dtype)
    x64, w64, dy64 = (np.float64(np.float32(a)) for a in (x, w, dy))
    xq, wq, dyq = _np_quant(x64, 1), _np_quant_blocks(w64), _np_quant(dy64, 1)
    want = {"y": (xq @ wq, x64 @ w64), "dgrad": (dyq @ wq.T, dy64 @ w64.T),
            "wgrad": (_np_quant(x64, 0).T @ _np_quant(dy64, 0), x64.T @ dy64)}
    for backend in backends:
      for barrier in barriers:
        fq._codes_f32 = codes_f32 if barrier else (lambda q: q.astype(jnp.float32))
        try:
          def fwd_bwd(x, w, dy, p, backend=backend):
            y, vjp = jax.vjp(lambda x, w, p: fp8_gemm.fp8_linear(x, w, p, backend), x, w, p)
            return (y, *vjp(dy))
          y, dx, dw, dprobe = jax.jit(fwd_bwd)(x, w, dy, jnp.zeros((2,)))
        finally:
          fq._codes_f32 = codes_f32
        row = {"dtype": jnp.dtype(dtype).name, "backend": backend, "barrier": barrier,
               "probe_cos": float(dprobe[1])}
        for name, got in (("y", y), ("dgrad", dx), ("wgrad", dw)):
          row[name] = tuple(profiling.rel_error(got, ref) for ref in want[name])
        rows.append(row)
  return rows


def diagnose_linear() -> None:
  """Prints `linear_in_jit` for both backends, barrier on and off, under this XLA_FLAGS."""
  print("XLA_FLAGS:", os.environ.get("XLA_FLAGS", ""), flush=True)
  backends = ("pallas_mosaic_gpu", "reference")
  rows = linear_in_jit(backends, [b == "on" for b in _LINEAR_BARRIERS.value],
                       [jnp.dtype(d) for d in _LINEAR_DTYPES.value])
  # The kernel on operands quantised in another program (the session-3 "direct call").
  m_dim, k_dim, n_dim = _LINEAR_CHECK
  x = jax.random.normal(jax.random.PRNGKey(3), (m_dim, k_dim), jnp.float32)
  w = jax.random.normal(jax.random.PRNGKey(4), (k_dim, n_dim), jnp.float32) * 0.03
  (xq, xs), (wq, ws) = jax.jit(fq.quantize_tiles)(x), jax.jit(fq.quantize_blocks)(w)
  direct = fp8_gemm.fp8_matmul(xq, xs, wq.T, ws.T, out_dtype=jnp.float32,
                               backend="pallas_mosaic_gpu")
  want = _np_quant(np.float64(x), 1) @ _np_quant_blocks(np.float64(w))
  print(f"kernel, operands from another program: y rel_err vs NumPy FP8 "
        f"{profiling.rel_error(direct, want):.2e}")
  print("\n| dtype | backend | dequant barrier | y vs FP8 / exact | dgrad vs FP8 / exact | "
        "wgrad vs FP8 / exact | grad probe cos |")
  print("|---|---|---|---|---|---|---|")
  for r in rows:
    cells = " | ".join(f"{r[o][0]:.1e} / {r[o][1]:.1e}" for o in ("y", "dgrad", "wgrad"))
    print(f"| {r['dtype']} | {r['backend']} | {'on' if r['barrier'] else 'off'} | {cells} | "
          f"{r['probe_cos']:.6f} |", flush=True)
  RESULTS["linear_in_jit"] = {"value": 0.0, "unit": "", "rows": rows,
                              "xla_flags": os.environ.get("XLA_FLAGS", "")}
  _write_json()


def time_linear() -> None:
  """Jitted fp8_linear forward + backward, kernels against the reference, with bf16 x @ w (XLA)
  as the baseline: the measurement behind `fp8_gemm._AUTO_USES_KERNEL`."""
  for name, m_dim, k_dim, n_dim in _DENSE_SHAPES[1:2]:
    x = jax.random.normal(jax.random.PRNGKey(1), (m_dim, k_dim), jnp.bfloat16)
    w = (jax.random.normal(jax.random.PRNGKey(2), (k_dim, n_dim)) * 0.03).astype(jnp.bfloat16)
    dy = jax.random.normal(jax.random.PRNGKey(3), (m_dim, n_dim), jnp.bfloat16)
    flops = 3 * 2 * m_dim * k_dim * n_dim
    ops = {"bf16 (XLA)": lambda x, w: x @ w}
    for backend in ("pallas_mosaic_gpu", "reference"):
      ops[f"fp8 {backend}"] = lambda x, w, b=backend: fp8_gemm.fp8_linear(
          x, w, jnp.zeros((2,)), b)
    # The GEMM kernels with XLA's quantisation instead of the Triton kernels (session 4's path).
    ops["fp8 pallas_mosaic_gpu, XLA quant"] = ops["fp8 pallas_mosaic_gpu"]
    quant_backends = dict(fp8_gemm._QUANT_BACKEND)
    for op_name, op in ops.items():
      def fwd_bwd(x, w, dy, op=op):
        y, vjp = jax.vjp(op, x, w)
        return (y, *vjp(dy))
      if op_name.endswith("XLA quant"):  # read when the first call traces
        fp8_gemm._QUANT_BACKEND["pallas_mosaic_gpu"] = "xla"
      try:
        tf = flops / _bench(jax.jit(fwd_bwd), x, w, dy, n=10) / 1e12
      except Exception as e:
        print(f"linear {name} {op_name} failed: {type(e).__name__}: {str(e)[:300]}")
        continue
      finally:
        fp8_gemm._QUANT_BACKEND.update(quant_backends)
      _record(f"fp8_linear fwd+bwd {name} {op_name}", tf, "TFLOP/s")
  _write_json()


def _torch_blockwise():
  """torch's blockwise-scaled FP8 GEMM (cuBLAS), or None with the reason printed."""
  try:
    import torch
    import torch.nn.functional as F  # noqa: N812
    if not hasattr(F, "scaled_mm") or not hasattr(F, "ScalingType"):
      print(f"torch {torch.__version__}: no torch.nn.functional.scaled_mm with ScalingType")
      return None
    print("torch", torch.__version__, torch.cuda.get_device_name())
  except Exception as e:
    print("torch unavailable:", type(e).__name__, str(e)[:200])
    return None

  def to_torch(x):
    x = np.asarray(x)
    if x.dtype == fq.E4M3:
      return torch.from_numpy(x.view(np.uint8)).cuda().view(torch.float8_e4m3fn)
    return torch.from_numpy(np.ascontiguousarray(x)).cuda()

  def prepare(a_q, sa, b_q, sb):
    # cuBLAS: A row-major, B column-major (b_NK.t()), A's scales outer-dim-major.
    return (to_torch(a_q), to_torch(b_q).t(), to_torch(sa).t().contiguous().t(),
            to_torch(sb).t())

  def run(a, b, sa, sb):
    return F.scaled_mm(a, b, sa, F.ScalingType.BlockWise1x128, sb,
                       F.ScalingType.BlockWise128x128, output_dtype=torch.bfloat16)

  def bench(args, n=None):
    n = n or _REPEATS.value
    for _ in range(2):
      run(*args)
    torch.cuda.synchronize()
    batches = []
    for _ in range(3):
      t0 = time.perf_counter()
      for _ in range(n):
        run(*args)
      torch.cuda.synchronize()
      batches.append((time.perf_counter() - t0) / n)
    return statistics.median(batches)

  return prepare, run, bench, (lambda t: t.float().cpu().numpy())


def _time_tilings(label: str, specs, k_dim: int, n_dim: int, flops: float, call,
                  *args) -> tuple[float, str | None]:
  """Times `call(cfg)(*args)` for each tiling spec that covers (K, N), records each as
  "<label> <spec>", and returns the best TFLOP/s with its spec (0, None if none ran). Probes
  (`Fp8TileConfig.probe`: their outputs are wrong on purpose) are timed but never the best."""
  best, best_spec = 0.0, None
  for spec in specs:
    cfg = _config(spec)
    if not mgpu.supports(k_dim, n_dim, jnp.bfloat16, cfg):
      continue
    try:
      tf = flops / _bench(jax.jit(call(cfg)), *args) / 1e12
    except Exception as e:
      print(f"{label} {spec} failed: {type(e).__name__}: {str(e)[:400]}")
      continue
    _record(f"{label} {spec}", tf, "TFLOP/s")
    if tf > best and not cfg.probe:
      best, best_spec = tf, spec
  return best, best_spec


def time_dense() -> None:
  torch_ops = _torch_blockwise() if _TORCH.value else None
  key = jax.random.PRNGKey(11)
  for name, m_dim, k_dim, n_dim in _DENSE_SHAPES[:_DENSE_SHAPE_COUNT.value]:
    flops = 2 * m_dim * k_dim * n_dim
    a_q, sa, b_q, sb = _operands(key, m_dim, k_dim, n_dim)
    row = {"shape": name, "M": m_dim, "K": k_dim, "N": n_dim}
    row["ours kernel"], row["ours cfg"] = _time_tilings(
        f"dense {name} fp8 blockwise ours", _DENSE_CONFIGS.value, k_dim, n_dim, flops,
        lambda cfg: functools.partial(mgpu.matmul_fp8, config=cfg), a_q, sa.T, b_q, sb.T)
    f = jax.jit(lambda a, s, b, t: fp8_gemm.fp8_matmul(a, s, b, t, backend="pallas_mosaic_gpu"))
    row["ours op"] = flops / _bench(f, a_q, sa, b_q, sb) / 1e12
    _record(f"dense {name} fp8 blockwise ours, fp8_matmul (+scale transposes)", row["ours op"],
            "TFLOP/s")
    xla_fp8 = jax.jit(lambda a, b: jax.lax.dot_general(
        a, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.bfloat16))
    row["xla fp8"] = flops / _bench(xla_fp8, a_q, b_q) / 1e12
    _record(f"dense {name} XLA per-tensor fp8 (cuBLASLt)", row["xla fp8"], "TFLOP/s")
    a16 = a_q.astype(jnp.bfloat16)
    b16 = b_q.astype(jnp.bfloat16).T
    row["bf16"] = flops / _bench(jax.jit(jnp.matmul), a16, b16) / 1e12
    _record(f"dense {name} bf16 (XLA)", row["bf16"], "TFLOP/s")
    del a16, b16
    if torch_ops is not None:
      prepare, run, bench, to_np = torch_ops
      try:
        args = prepare(a_q, sa, b_q, sb)
        if name == "8192^3":  # its numbers against ours, on the same codes and scales
          ours = mgpu.matmul_fp8(a_q, sa.T, b_q, sb.T, out_dtype=jnp.float32)
          err = profiling.rel_error(to_np(run(*args)), np.float32(ours))
          print(f"check torch scaled_mm vs ours rel_err={err:.2e} {'ok' if err < 5e-3 else 'FAIL'}")
          row["torch err"] = err
        row["torch"] = flops / bench(args) / 1e12
        _record(f"dense {name} torch scaled_mm blockwise (cuBLAS)", row["torch"], "TFLOP/s")
        del args
      except Exception as e:
        print(f"torch scaled_mm {name} failed: {type(e).__name__}: {str(e)[:400]}")
    TABLES["dense"].append(row)
    _write_json()


def time_dense_wgrad() -> None:
  """The linears' weight gradients, x^T dy over --wgrad_tokens tokens (K): B is dy^T,
  1x128-tiled along the tokens (b_scaling "tile", B's scale read per column), with every
  --dense_configs tiling and --wgrad_splits split of K; XLA's bf16 x^T dy in the same run."""
  key = jax.random.PRNGKey(13)
  tokens = _WGRAD_TOKENS.value
  for name, d_in, d_out in _WGRAD_SHAPES:
    flops = 2 * tokens * d_in * d_out
    a_q, sa, b_q, _ = _operands(key, d_in, tokens, d_out)
    sb = jnp.exp2(jax.random.randint(key, (d_out, tokens // 128), -10, -4)).astype(jnp.float32)
    for splits in map(int, _WGRAD_SPLITS.value):
      _time_tilings(
          f"dense wgrad {name} x {tokens} tokens fp8 ours, k_splits {splits}",
          _DENSE_CONFIGS.value, tokens, d_out, flops,
          lambda cfg, splits=splits: functools.partial(
              mgpu.matmul_fp8, b_scaling="tile", config=cfg, k_splits=splits),
          a_q, sa.T, b_q, sb.T)
    x16, dy16 = a_q.T.astype(jnp.bfloat16), b_q.T.astype(jnp.bfloat16)  # [tokens, d_in / d_out]
    bf16 = jax.jit(lambda x, dy: jax.lax.dot_general(x, dy, (((0,), (0,)), ((), ()))))
    _record(f"dense wgrad {name} x {tokens} tokens bf16 XLA (cuBLAS)",
            flops / _bench(bf16, x16, dy16) / 1e12, "TFLOP/s")
    del x16, dy16
    _write_json()


def _stream_fits(a_shape, b_size: int, n_dim: int) -> bool:
  m_dim, k_dim = a_shape
  return b_size % (m_dim * n_dim) == 0 and (k_dim % n_dim == 0 or n_dim % k_dim == 0)


def gemm_stream(a, b, n_dim: int):
  """A GEMM's HBM traffic with none of its arithmetic: one XLA fusion that reads every byte of
  A [M, K] and of B (any shape, Q x M x N elements) once and writes an [M, N] bf16 output, as
  the GEMM ideally does. out[m, j] = (sum or tiling of A's row m onto N columns) + sum over q of
  B viewed as [M, Q, N]: the GEMM's byte mix (62% writes for Ling-mini's FP8 down projection,
  against a copy's 50%). No roof for our kernels: XLA's fusions write at ~1.6 TB/s on an H200,
  TMA stores at ~4.1 (session 18); `tma_stream` is the TMA one. None where the sizes do not
  divide."""
  m_dim, k_dim = a.shape
  if not _stream_fits(a.shape, b.size, n_dim):
    return None
  b_view = b.reshape(m_dim, b.size // (m_dim * n_dim), n_dim).astype(jnp.float32).sum(axis=1)
  a32 = a.astype(jnp.float32)
  if k_dim >= n_dim:
    a_view = a32.reshape(m_dim, n_dim, k_dim // n_dim).sum(axis=2)
  else:
    a_view = jnp.tile(a32, (1, n_dim // k_dim))
  return (a_view + b_view).astype(jnp.bfloat16)


def tma_write(rows: int, cols: int, dtype=jnp.bfloat16, tile=(128, 128), num_sms=None,
              order: str = "n"):
  """A Mosaic GPU kernel that only writes: every SM TMA-stores one shared-memory tile (left
  unwritten: its contents do not matter here) over its share of a [rows, cols] output, as a
  GEMM's epilogue stores its output tiles. The write roof for the GEMMs' own store path.
  `order` walks the tiles as `Fp8TileConfig.grid_minor` / `grid_width` walk units: "n" along
  rows of tiles (each row's column tiles in turn), "m<w>" in bands of w row tiles down all
  columns (`plgpu.planar_snake`, as the GEMMs do)."""
  tiles_r, tiles_c = rows // tile[0], cols // tile[1]
  if order != "n" and not (order[:1] == "m" and order[1:].isdigit()):
    raise ValueError(f"tma_write: order={order!r}; use 'n' or 'm<band width>', e.g. 'm16'.")

  def tile_of(i):
    if order == "n":
      return i // tiles_c, i % tiles_c
    return plgpu.planar_snake(i, (tiles_r, tiles_c), 0, int(order[1:]))

  def body(out_gmem):
    @functools.partial(pl.run_scoped, smem=plgpu.SMEM(tile, dtype))
    def _(smem):
      @plgpu.nd_loop((tiles_r * tiles_c,), collective_axes="sm")
      def _(info):
        r, c = tile_of(info.index[0])
        plgpu.copy_smem_to_gmem(smem, out_gmem.at[pl.ds(r * tile[0], tile[0]),
                                                  pl.ds(c * tile[1], tile[1])])
        plgpu.wait_smem_to_gmem(8, wait_read_only=True)  # at most 8 stores in flight
      plgpu.wait_smem_to_gmem(0)

  return plgpu.kernel(body, out_type=jax.ShapeDtypeStruct((rows, cols), dtype),
                      grid=(num_sms or bf16_mgpu.device_num_sms(),), grid_names=("sm",))


def tma_stream(units: int, in_rows: int, in_cols: int, in_dtype, out_tile=(128, 128)):
  """A Mosaic GPU kernel that only moves bytes the way a GEMM's TMA pipeline does: each of
  `units` CTAs TMA-loads an [in_rows, in_cols] block of the input and TMA-stores one bf16
  output tile (its shared memory left unwritten); several CTAs share an SM. Its time is the TMA
  roof for a byte mix with no operand read twice: units x in_rows x in_cols elements in, units
  tiles out."""

  def body(x_gmem, y_gmem):
    @functools.partial(pl.run_scoped, x_smem=plgpu.SMEM((in_rows, in_cols), in_dtype),
                       y_smem=plgpu.SMEM(out_tile, jnp.bfloat16),
                       loaded=plgpu.Barrier(num_arrivals=1))
    def _(x_smem, y_smem, loaded):
      i = jax.lax.axis_index("unit")
      plgpu.copy_gmem_to_smem(x_gmem.at[pl.ds(i * in_rows, in_rows)], x_smem, loaded)
      plgpu.barrier_wait(loaded)
      plgpu.copy_smem_to_gmem(y_smem, y_gmem.at[pl.ds(i * out_tile[0], out_tile[0])])
      plgpu.wait_smem_to_gmem(0)

  return plgpu.kernel(
      body, out_type=jax.ShapeDtypeStruct((units * out_tile[0], out_tile[1]), jnp.bfloat16),
      grid=(units,), grid_names=("unit",))


def _stream_blocks(in_bytes: int, out_bytes: int, itemsize: int, tile_bytes: int = 128 * 256):
  """(units, in_rows, in_cols) for `tma_stream`: one 128 x 128 bf16 output tile a unit and the
  input split evenly over the units in rows of 128 or 256 elements (at most 256 rows a box);
  None where that does not divide."""
  if out_bytes % tile_bytes:
    return None
  units = out_bytes // tile_bytes
  for in_cols in (128, 256):
    row_bytes = in_cols * itemsize
    if in_bytes % (units * row_bytes) == 0 and in_bytes // (units * row_bytes) <= 256:
      return units, in_bytes // (units * row_bytes), in_cols
  return None


def _record_stream(label: str, seconds: float, nbytes: int, flops: float) -> float:
  """Records GB/s and the TFLOP/s of a GEMM moving its bytes in `seconds`; returns the latter."""
  _record(f"{label}: {nbytes / 1e6:.0f} MB, GB/s", nbytes / seconds / 1e9, "GB/s")
  tflops = flops / seconds / 1e12
  _record(f"{label}: a GEMM moving those bytes at that rate", tflops, "TFLOP/s")
  return tflops


def _time_stream(name: str, key: str, a, b, n_dim: int, flops: float, row: dict) -> None:
  """Times a GEMM's bytes (`gemm_stream`, then `tma_stream`) as row[key] and row[key + " by
  TMA"], and, once a row, its output alone (an XLA broadcast, then `tma_write`), each as the
  TFLOP/s of a GEMM that moved those bytes in that time."""
  if not _stream_fits(a.shape, b.size, n_dim):
    print(f"{name} {key}: no stream fusion for A {a.shape}, B of {b.size} elements, N {n_dim}")
    return
  out_bytes = a.shape[0] * n_dim * 2
  nbytes = a.nbytes + b.nbytes + out_bytes
  seconds = _bench(jax.jit(functools.partial(gemm_stream, n_dim=n_dim)), a, b)
  row[key] = _record_stream(f"{name} {key}", seconds, nbytes, flops)
  blocks = _stream_blocks(a.nbytes + b.nbytes, out_bytes, a.dtype.itemsize)
  if blocks is None:
    print(f"{name} {key}: no tma_stream blocks for these sizes")
  else:  # the same bytes through TMA loads and stores, no operand read twice
    units, in_rows, in_cols = blocks
    x = jnp.zeros((units * in_rows, in_cols), a.dtype)
    try:
      seconds = _bench(jax.jit(tma_stream(units, in_rows, in_cols, a.dtype)), x)
      row[f"{key} by TMA"] = _record_stream(f"{name} {key} by TMA", seconds, nbytes, flops)
    except Exception as e:
      print(f"{name} tma_stream failed: {type(e).__name__}: {str(e)[:300]}")
    del x
  if STREAM_WRITE not in row:  # the output alone: a broadcast of one traced value, written
    out_shape = (a.shape[0], n_dim)
    write = jax.jit(lambda v: jnp.broadcast_to(v, out_shape))
    seconds = _bench(write, jnp.ones((), jnp.bfloat16))
    row[STREAM_WRITE] = _record_stream(f"{name} {STREAM_WRITE}", seconds, out_bytes, flops)
    for order in _WRITE_ORDERS.value:  # the same bytes through TMA stores, as the GEMMs write
      label = STREAM_TMA_WRITE + ("" if order == "n" else f", order {order}")
      try:
        seconds = _bench(jax.jit(lambda order=order: tma_write(*out_shape, order=order)()))
        row[label] = _record_stream(f"{name} {label}", seconds, out_bytes, flops)
      except Exception as e:
        print(f"{name} tma_write {order} failed: {type(e).__name__}: {str(e)[:300]}")


def _ring_role(tid: int) -> str:
  """A profile track's warpgroup role: three tracks per SM, the two compute warpgroups first."""
  return "memory" if (tid - 1) % 3 == 2 else "compute"


def _role_tracks(trace: dict) -> tuple[list[tuple[str, list[dict]]], dict[str, float]]:
  """A profile's tracks as (role, events in time order), and each role's summed span (a track's
  first event to its last). At equal times an end sorts before a begin: a range that ends as
  the next begins leaves no gap, and one name's abutting ranges pair up in order."""
  tracks: dict[int, list[dict]] = {}
  for event in trace["traceEvents"]:
    tracks.setdefault(event["tid"], []).append(event)
  spans = {"compute": 0.0, "memory": 0.0}
  out = []
  for tid, events in tracks.items():
    events = sorted(events, key=lambda e: (e["ts"], e["ph"] == "B"))
    spans[_ring_role(tid)] += events[-1]["ts"] - events[0]["ts"]
    out.append((_ring_role(tid), events))
  return out, spans


def summarize_ring_trace(trace: dict) -> dict[str, dict[str, float]]:
  """Shares of time per named phase of a `gmm_fp8(profile_dir=...)` trace, per warpgroup role.

  The trace holds one track per (SM, warpgroup) (`tid` - 1 counts them, three per SM: the two
  compute warpgroups, then the memory one) of "B"/"E" events. Each track's span runs from its
  first event to its last; a phase's share is its summed time over the summed spans of the
  role's tracks, and "other" is what no phase covers (loop control, the barrier arrivals).
  Returns {"compute": {phase: share, ...}, "memory": {...}}.
  """
  tracks, spans = _role_tracks(trace)
  totals = {"compute": {}, "memory": {}}
  for role, events in tracks:
    open_at: dict[str, list[float]] = {}
    for event in events:
      if event["ph"] == "B":
        open_at.setdefault(event["name"], []).append(event["ts"])
      elif open_at.get(event["name"]):
        begin = open_at[event["name"]].pop()
        totals[role][event["name"]] = totals[role].get(event["name"], 0.0) + event["ts"] - begin
  shares = {}
  for role, phases in totals.items():
    if spans[role] <= 0:
      continue
    shares[role] = {name: t / spans[role] for name, t in sorted(phases.items())}
    shares[role]["other"] = max(0.0, 1.0 - sum(shares[role].values()))
  return shares


def ring_trace_gaps(trace: dict) -> dict[str, dict[str, float]]:
  """Where `summarize_ring_trace`'s "other" lies: each gap between a range's end and the next
  range's begin on one track, keyed "previous>next" by the two ranges' names and summed as a
  share of the role's summed spans (as there). The gaps of a role add up to its "other"."""
  tracks, spans = _role_tracks(trace)
  gaps = {"compute": {}, "memory": {}}
  for role, events in tracks:
    depth, last_end = 0, None
    for event in events:
      if event["ph"] == "B":
        if depth == 0 and last_end is not None and event["ts"] > last_end[1]:
          key = f"{last_end[0]}>{event['name']}"
          gaps[role][key] = gaps[role].get(key, 0.0) + event["ts"] - last_end[1]
        depth += 1
      else:
        depth = max(depth - 1, 0)
        if depth == 0:
          last_end = (event["name"], event["ts"])
  return {role: {key: t / spans[role] for key, t in sorted(found.items())}
          for role, found in gaps.items() if spans[role] > 0}


def _profile_flat(label: str, specs, k_dim: int, n_dim: int, *args) -> None:
  """`--profile_dir`: each flat tiling once under the profiler; prints its phases' shares."""
  for spec in specs:
    cfg = _config(spec)
    if not cfg.flat or not mgpu.supports(k_dim, n_dim, jnp.bfloat16, cfg):
      continue
    out_dir = os.path.join(_PROFILE_DIR.value, f"{label} {spec}".replace(" ", "_"))
    os.makedirs(out_dir, exist_ok=True)
    try:
      jax.block_until_ready(mgpu.gmm_fp8(*args, config=cfg, profile_dir=out_dir))
      time.sleep(1)  # the trace is written by a host callback
      newest = max((os.path.join(out_dir, f) for f in os.listdir(out_dir)),
                   key=os.path.getmtime)
      with open(newest) as f:
        trace = json.load(f)
      shares = summarize_ring_trace(trace)
    except Exception as e:
      print(f"{label} {spec} profile failed: {type(e).__name__}: {str(e)[:400]}")
      continue
    for role, phases in shares.items():
      print(f"{label} {spec} profile {role}: "
            + ", ".join(f"{name} {share:.1%}" for name, share in phases.items()), flush=True)
    for role, found in ring_trace_gaps(trace).items():
      largest = sorted(found.items(), key=lambda item: -item[1])[:6]
      print(f"{label} {spec} profile {role} gaps: "
            + ", ".join(f"{key} {share:.1%}" for key, share in largest), flush=True)
    cycles = unit_cycles(trace)
    if cycles:
      shares["cycles_per_unit"] = cycles["median"]
      shares["unit_cycles"] = cycles
      print(f"{label} {spec} profile: {cycles['median']:.0f} cycles per unit (median between a "
            f"compute warpgroup's epilogues; mean {cycles['mean']:.0f}, 90th percentile "
            f"{cycles['p90']:.0f}, max {cycles['max']:.0f}, {cycles['units']} intervals)",
            flush=True)
    RESULTS[f"{label} {spec} profile"] = shares


def unit_cycles(trace: dict) -> dict[str, float] | None:
  """Clock cycles from one epilogue's end to the next on each compute track (the trace's ts is
  cycles / 1e3 within a track): their median, mean, 90th percentile and max, and how many. The
  median alone hides a tail of slow units; None if no track has two epilogues."""
  ends: dict[int, list[float]] = {}
  for e in trace["traceEvents"]:
    if e["name"] == "epilogue" and e["ph"] == "E" and _ring_role(e["tid"]) == "compute":
      ends.setdefault(e["tid"], []).append(e["ts"])
  gaps = [(b - a) * 1e3 for ts in ends.values() for a, b in zip(sorted(ts), sorted(ts)[1:])]
  if not gaps:
    return None
  return {"median": statistics.median(gaps), "mean": statistics.fmean(gaps),
          "p90": float(np.percentile(gaps, 90)), "max": max(gaps), "units": len(gaps)}


def _sustained(label: str, flops: float, fn, *args) -> None:
  """--sustained_s: `fn(*args)` streamed for that long (`profiling.sustained_rates`), its steady
  TFLOP/s recorded as "<label>, sustained", with nvidia-smi's clock and power over the stream."""
  with profiling.GpuSampler() as smi:
    start, end, rates = profiling.sustained_rates(fn, *args, seconds=_SUSTAINED_S.value)
    gpu = smi.window(start, end) or {}
  tflops = [r * flops / 1e12 for r in rates]
  _record(f"{label}, sustained", float(np.median(tflops[len(tflops) // 2:])), "TFLOP/s",
          batches=len(tflops), seconds=end - start, **gpu)
  if gpu:
    print(f"  SM clock {gpu['clock_mhz']:.0f} MHz, board {gpu['power_w']:.0f} W, throttle "
          f"reasons {' '.join(gpu['throttle'])} ({gpu['samples']} samples)", flush=True)


def time_grouped() -> None:
  key = jax.random.PRNGKey(12)
  for shape in _GROUPED_SHAPES.value:
    rows, groups, hidden, width = _EXPERT_SHAPES[shape]
    sizes = jnp.full((groups,), rows // groups, jnp.int32)
    for pname in _GROUPED_PROBLEMS.value:
      k_dim, n_dim = _GROUPED_PROBLEM_DIMS[pname](hidden, width)
      flops = 2 * rows * k_dim * n_dim
      a_q, sa, b_q, sb = _operands(key, rows, k_dim, n_dim, groups)
      row = {"shape": shape, "problem": pname, "K": k_dim, "N": n_dim}
      row["ours kernel"], row["ours cfg"] = _time_tilings(
          f"grouped {shape} {pname} fp8 ours", _GROUPED_CONFIGS.value, k_dim, n_dim, flops,
          lambda cfg: functools.partial(mgpu.gmm_fp8, config=cfg),
          a_q, sa.T, b_q, jnp.swapaxes(sb, 1, 2), sizes)
      if _PROFILE_DIR.value:
        _profile_flat(f"grouped {shape} {pname} fp8 ours", _GROUPED_CONFIGS.value, k_dim, n_dim,
                      a_q, sa.T, b_q, jnp.swapaxes(sb, 1, 2), sizes)
      f = jax.jit(lambda a, s, b, t, g: fp8_gemm.fp8_grouped_matmul(
          a, s, b, t, g, backend="pallas_mosaic_gpu"))
      row["ours op"] = flops / _bench(f, a_q, sa, b_q, sb, sizes) / 1e12
      _record(f"grouped {shape} {pname} fp8 ours, fp8_grouped_matmul", row["ours op"], "TFLOP/s")
      for spec in _GROUPED_CONFIGS.value if _SUSTAINED_S.value else ():
        cfg = _config(spec)
        if mgpu.supports(k_dim, n_dim, jnp.bfloat16, cfg):
          _sustained(f"grouped {shape} {pname} fp8 ours {spec}", flops,
                     jax.jit(functools.partial(mgpu.gmm_fp8, config=cfg)),
                     a_q, sa.T, b_q, jnp.swapaxes(sb, 1, 2), sizes)
      if _STREAM.value:
        _time_stream(f"grouped {shape} {pname}", STREAM_FP8, a_q, b_q, n_dim, flops, row)
      bf16 = jax.jit(lambda a, b, g: bf16_mgpu.gmm(a, b, g))
      # Two sets of bf16 operands: the FP8 codes' values (3 mantissa bits: `_operands`' normals
      # x 48 cast to E4M3), and normals x 48 in bf16 (full mantissas, as a bf16 training step
      # feeds the kernel). The kernel ran 4-18% faster on the first (session 17), likely through
      # the board's power: under its 700 W cap the power sets the clocks (session 6).
      ka, kb = jax.random.split(jax.random.fold_in(key, 1))
      operand_sets = {
          "bf16 ours": (a_q.astype(jnp.bfloat16),
                        jnp.swapaxes(b_q, 1, 2).astype(jnp.bfloat16)),  # [G, K, N]
          "bf16 ours, full mantissas": (
              jax.random.normal(ka, (rows, k_dim), jnp.bfloat16) * 48,
              jax.random.normal(kb, (groups, k_dim, n_dim), jnp.bfloat16) * 48)}
      del b_q, a_q
      for label, (a16, w16) in operand_sets.items():
        try:
          row[label] = flops / _bench(bf16, a16, w16, sizes) / 1e12
          _record(f"grouped {shape} {pname} {label} (grouped_matmul_mgpu)", row[label],
                  "TFLOP/s")
          if _SUSTAINED_S.value and label == "bf16 ours, full mantissas":
            _sustained(f"grouped {shape} {pname} {label} (grouped_matmul_mgpu)", flops, bf16,
                       a16, w16, sizes)
        except Exception as e:
          print(f"bf16 gmm {shape} {pname} {label} failed: {type(e).__name__}: {str(e)[:300]}")
      if _STREAM.value:
        _time_stream(f"grouped {shape} {pname}", STREAM_BF16, a16, w16, n_dim, flops, row)
      del operand_sets, a16, w16
      TABLES["grouped"].append(row)
      _write_json()


def _launch_fields(spec: str, names: tuple[str, ...], flag: str) -> list[int]:
  """The integers of a launch spec, the last (num_stages) optional: 1 when left out."""
  fields = spec.split(":")
  if len(fields) not in (len(names) - 1, len(names)) or not all(f.isdigit() for f in fields):
    raise app.UsageError(f"--{flag}={spec}: expected {':'.join(names[:-1])}[:{names[-1]}], "
                         "integers")
  return [int(f) for f in fields] + [1] * (len(names) - len(fields))


def _quant_launch(spec: str) -> dict:
  r, t, w, s = _launch_fields(spec, ("R", "T", "num_warps", "num_stages"), "quant_launches")
  return {"rows_per_prog": r, "tiles_per_prog": t, "num_warps": w, "num_stages": s}


def _cols_launch(spec: str) -> dict:
  t, w, tc, s = _launch_fields(spec, ("T", "num_warps", "transpose_codes", "num_stages"),
                               "quant_cols_launches")
  return {"tiles_per_prog": t, "num_warps": w, "transpose_codes": bool(tc), "num_stages": s}


def check_quant() -> bool:
  """The Triton kernels' codes and scales against the XLA functions, bit for bit, on this GPU."""
  ok = True
  rng = np.random.default_rng(5)
  m_dim, k_dim = _QUANT_CHECK
  m_pad = -(-m_dim // 128) * 128  # rows of the padded-group cases
  x_pad = rng.standard_normal((m_pad, k_dim)) * np.exp2(rng.integers(-60, 30, (m_pad, 1)))
  x_pad[7, 128:256] = 0
  x = x_pad[:m_dim]
  # Rows past the groups: 170 of 1000.
  sizes = jnp.asarray([0, 300, 1, 0, 129, 400], jnp.int32) * m_dim // 1000
  for dtype in (jnp.bfloat16, jnp.float32):
    xd = jnp.asarray(x, dtype)
    # Groups padded to `align` rows, as dispatch.permute pads them for the FP8 experts: empty
    # groups, one unit, one over 128 rows, rows past the groups; with the kernel told so.
    # (The bf16 exact-scale case has XLA's known 20 misrounded transposed codes: see session 5.)
    for align in map(int, _GROUP_ALIGNS.value):
      for pow2 in (False, True):
        if dtype == jnp.bfloat16 and not pow2:
          continue
        units = [0, 1, 0, 9, 2] if align < 128 else [0, 1, 0, 3, 2]
        ids, n = fq.row_tile_ids(m_pad, jnp.asarray(units, jnp.int32) * align)
        xp = jnp.asarray(x_pad, dtype)
        want = jax.jit(lambda x, i, n=n, pow2=pow2: fq.quantize_tiles_with_transpose(
            x, i, n, pow2, backend="xla"))(xp, ids)
        got = jax.jit(lambda x, i, n=n, pow2=pow2, a=align: fq.quantize_tiles_with_transpose(
            x, i, n, pow2, backend="pallas_triton", row_align=a))(xp, ids)
        ok &= _same(f"quant fused groups row_align={align} {jnp.dtype(dtype).name} "
                    f"pow2={pow2} (public op)", got, want)
    for pow2 in (False, True):
      for launch in _QUANT_LAUNCHES.value:
        if launch != _QUANT_LAUNCHES.value[0] and (dtype != jnp.bfloat16 or pow2):
          continue  # every launch once; the first in every dtype and scale rule
        kw = _quant_launch(launch)
        got = jax.jit(lambda x, kw=kw, pow2=pow2: fqt.quantize(x, pow2=pow2, **kw))(xd)
        want = jax.jit(lambda x, pow2=pow2: fq.quantize_tiles(x, pow2_scales=pow2,
                                                              backend="xla"))(xd)
        ok &= _same(f"quant tiles {launch} {jnp.dtype(dtype).name} pow2={pow2}",
                    (got[0], got[1].T), want)
      for groups in (None, sizes):
        ids, n = fq.row_tile_ids(m_dim, groups)
        want = jax.jit(lambda x, i, n=n, pow2=pow2: fq.quantize_tiles_with_transpose(
            x, i, n, pow2, backend="xla"))(xd, ids)
        for spec in _QUANT_COLS_LAUNCHES.value:
          if spec != _QUANT_COLS_LAUNCHES.value[0] and (dtype != jnp.bfloat16 or pow2):
            continue
          kw = _cols_launch(spec)
          bounds = (None, None) if groups is None else fq._tile_bounds(ids, n)
          for rows in (True, False):
            got = jax.jit(lambda x, b, rows=rows, n=n, pow2=pow2, kw=kw: fqt.quantize(
                x, *b, want_rows=rows, want_cols=True, num_tiles=n, pow2=pow2, **kw))(xd, bounds)
            got = (got[0], got[1].T, got[2], got[3].T) if rows else (got[0], got[1].T)
            name = (f"quant {'fused' if rows else 'transposed'} {spec} "
                    f"{'groups' if groups is not None else 'aligned'} "
                    f"{jnp.dtype(dtype).name} pow2={pow2}")
            good = _same(name, got, want if rows else want[2:])
            ok &= good
            if not good and rows:  # which side keeps the rule (NumPy, on the host)?
              ids_np = np.asarray(ids)
              s_full = np.asarray(want[3])[:, ids_np]  # [K, M], each column's tile scale
              x_t = np.asarray(xd, np.float32).T
              r = (np.float32(1) / s_full).astype(np.float32)
              rule = np.clip(x_t * r, -448, 448).astype(ml_dtypes.float8_e4m3fn).view(np.uint8)
              g8, w8 = np.asarray(got[2]).view(np.uint8), np.asarray(want[2]).view(np.uint8)
              print(f"  transposed codes: kernel vs NumPy rule {int(np.sum(g8 != rule))} "
                    f"mismatches, XLA vs NumPy rule {int(np.sum(w8 != rule))}; scales equal: "
                    f"{np.array_equal(np.asarray(got[3]), np.asarray(want[3]))}", flush=True)
              for k, m in np.argwhere(g8 != w8)[:4]:
                print(f"    [{k},{m}] x={x_t[k, m]!r} s={s_full[k, m]!r} "
                      f"x*r={x_t[k, m] * r[k, m]!r} kernel={g8[k, m]} xla={w8[k, m]} "
                      f"rule={rule[k, m]}", flush=True)
  print("QUANT CORRECTNESS", "PASS" if ok else "FAIL", flush=True)
  RESULTS["quant correctness"] = {"value": float(ok), "unit": "pass"}
  return ok


def _same(name, got, want) -> bool:
  bad = 0
  for g, w in zip(got, want, strict=True):
    g, w = np.asarray(g), np.asarray(w)
    if g.shape != w.shape or g.dtype != w.dtype:
      bad = -1
      break
    bits = (lambda a: a.view(np.uint8) if a.dtype.itemsize == 1 else a.view(np.uint32))
    bad += int(np.sum(bits(g) != bits(w)))
  print(f"check {name:70s} mismatches={bad} {'ok' if bad == 0 else 'FAIL'}", flush=True)
  return bad == 0


def time_quant() -> None:
  try:
    check_quant()
  except Exception as e:
    print(f"quant check raised {type(e).__name__}: {str(e)[:800]}", flush=True)
  key = jax.random.PRNGKey(13)
  rows_act, rows_exp = _QUANT_ROWS
  x_act = jax.random.normal(key, (rows_act, _QUANT_COLS), jnp.bfloat16)
  x_exp = jax.random.normal(key, (rows_exp, _QUANT_COLS), jnp.bfloat16)
  w_exp = jax.random.normal(key, _QUANT_WEIGHTS, jnp.bfloat16)
  sizes = jnp.asarray(np.random.default_rng(0).multinomial(rows_exp, np.ones(256) / 256),
                      jnp.int32)
  copy = jax.jit(lambda x: x * jnp.asarray(1.5, x.dtype) + jnp.asarray(1, x.dtype))
  copy_bw = {}
  for x in (x_act, x_exp, w_exp):
    copy_bw[x.shape] = 2 * x.nbytes / _bench(copy, x) / 1e9
    _record(f"quant copy x*1.5+1 bf16 {list(x.shape)}", copy_bw[x.shape], "GB/s")
  ids_d, n_d = fq.row_tile_ids(rows_act)
  ids_g, n_g = fq.row_tile_ids(rows_exp, sizes)
  bounds_g = fq._tile_bounds(ids_g, n_g)
  # The same rows in groups whose sizes are multiples of `align` (multinomial over units).
  aligned_groups = {}
  for align in map(int, _GROUP_ALIGNS.value):
    units = np.random.default_rng(0).multinomial(rows_exp // align, np.ones(256) / 256)
    aligned_groups[align] = fq.row_tile_ids(rows_exp, jnp.asarray(units * align, jnp.int32))

  def nbytes(x, transposed):  # bf16 in, e4m3 out (twice with the transpose), fp32 scales
    return x.size * (2 + (2 if transposed else 1)) + 4 * x.size // 128 * (2 if transposed else 1)

  xla, tri = "XLA", "Triton"

  def run(variants):
    measured = {}
    for op, impl, f, args, moved in variants:
      shape, base = list(args[0].shape), copy_bw[args[0].shape]
      try:
        bw = moved / _bench(f, *args) / 1e9
      except Exception as e:
        print(f"quant {op} {impl} failed: {type(e).__name__}: {str(e)[:600]}")
        continue
      measured[op, str(shape)] = bw
      _record(f"quant {op} {shape} ({impl})", bw, "GB/s", of_copy=bw / base)
      TABLES["quant"].append({"op": op, "impl": impl, "shape": str(shape), "GB/s": bw,
                              "copy GB/s": base, "of copy": bw / base})
      _write_json()
    return measured

  # 1. The kernel's launches, called directly (scales in the kernel's tile-first layout).
  variants = []
  for spec in _QUANT_LAUNCHES.value:
    for x in (x_act, x_exp):
      variants.append((f"1x128 tiles [{spec}]", tri, jax.jit(functools.partial(
          fqt.quantize, **_quant_launch(spec))), (x,), nbytes(x, False)))
  for spec in _QUANT_COLS_LAUNCHES.value:
    kw = _cols_launch(spec)
    for x in (x_act, x_exp):  # 128-row tiles from row 0: what groups of 128-row units give
      variants.append((f"1x128 tiles + transposed, fused [{spec}]", tri, jax.jit(
          lambda x, kw=kw: fqt.quantize(x, want_cols=True, **kw)), (x,), nbytes(x, True)))
    variants.append((f"1x128 tiles + transposed per expert, fused [{spec}]", tri, jax.jit(
        lambda x, b, kw=kw: fqt.quantize(x, *b, want_cols=True, num_tiles=n_g, **kw)),
        (x_exp, bounds_g), nbytes(x_exp, True)))
    for align, (ids_a, n_a) in aligned_groups.items():
      variants.append((
          f"1x128 tiles + transposed per expert, groups of {align}-row units, fused [{spec}]",
          tri, jax.jit(lambda x, b, kw=kw, n=n_a, a=align: fqt.quantize(
              x, *b, want_cols=True, num_tiles=n, row_align=a, **kw)),
          (x_exp, fq._tile_bounds(ids_a, n_a)), nbytes(x_exp, True)))
  measured = run(variants)

  # 2. The best launches (summed GB/s over the shapes) become the kernels' defaults for the
  # public ops below and for --sections=linear_time.
  def best(specs, label):
    totals = {spec: sum(v for (op, _), v in measured.items() if f"[{spec}]" in op
                        and op.startswith(label)) for spec in specs}
    return max(totals, key=totals.get) if any(totals.values()) else specs[0]
  rows_spec = best(_QUANT_LAUNCHES.value, "1x128 tiles [")
  # Column tiles from row 0 and per group have launches of their own (COLS_ALIGNED_LAUNCH).
  aligned_spec = best(_QUANT_COLS_LAUNCHES.value, "1x128 tiles + transposed, fused")
  cols_spec = best(_QUANT_COLS_LAUNCHES.value, "1x128 tiles + transposed per expert")
  fqt.ROWS_LAUNCH.update(_quant_launch(rows_spec))
  fqt.COLS_ALIGNED_LAUNCH.update(_cols_launch(aligned_spec))
  fqt.COLS_LAUNCH.update(_cols_launch(cols_spec))
  print(f"quant defaults for this run: rows {fqt.ROWS_LAUNCH}, columns from row 0 "
        f"{fqt.COLS_ALIGNED_LAUNCH}, per group {fqt.COLS_LAUNCH}", flush=True)
  RESULTS["quant launches chosen"] = {"value": 0.0, "unit": "", "rows": rows_spec,
                                      "cols_aligned": aligned_spec, "cols": cols_spec}

  # 3. The public ops (kernel backend) against the XLA reference, and the weight blocks.
  variants = []
  for x in (x_act, x_exp):
    variants.append(("1x128 tiles", xla, jax.jit(functools.partial(fq.quantize_tiles,
                                                                   backend="xla")),
                     (x,), nbytes(x, False)))
    variants.append(("1x128 tiles, public op (scales transposed back)", tri,
                     jax.jit(functools.partial(fq.quantize_tiles, backend="pallas_triton")),
                     (x,), nbytes(x, False)))
  variants += [
      ("1x128 tiles + transposed (gather amax)", xla,
       jax.jit(lambda x: fq.quantize_tiles_with_transpose(x, ids_d, n_d, backend="xla")),
       (x_act,), nbytes(x_act, True)),
      ("1x128 tiles + transposed (quantize_columns)", xla,
       jax.jit(lambda x: (fq.quantize_tiles(x, backend="xla"), fq.quantize_columns(x))),
       (x_act,), nbytes(x_act, True)),
      ("1x128 tiles + transposed, public op", tri,
       jax.jit(lambda x: fq.quantize_tiles_with_transpose(x, None, n_d,
                                                          backend="pallas_triton")),
       (x_act,), nbytes(x_act, True)),
      ("transposed alone, public op", tri,
       jax.jit(lambda x: fq.quantize_rows_transposed(x, None, n_d, backend="pallas_triton")),
       (x_act,), nbytes(x_act, False)),
      ("1x128 tiles + transposed per expert (gather amax)", xla,
       jax.jit(lambda x, i: fq.quantize_tiles_with_transpose(x, i, n_g, backend="xla")),
       (x_exp, ids_g), nbytes(x_exp, True)),
      ("1x128 tiles + transposed per expert, public op", tri,
       jax.jit(lambda x, i: fq.quantize_tiles_with_transpose(x, i, n_g,
                                                             backend="pallas_triton")),
       (x_exp, ids_g), nbytes(x_exp, True)),
      ("128x128 blocks", xla, jax.jit(fq.quantize_blocks), (w_exp,),
       w_exp.size * 3 + 4 * w_exp.size // 128 ** 2),
  ]
  for align, (ids_a, n_a) in aligned_groups.items():
    variants.append((
        f"1x128 tiles + transposed per expert, groups of {align}-row units, public op", tri,
        jax.jit(lambda x, i, n=n_a, a=align: fq.quantize_tiles_with_transpose(
            x, i, n, backend="pallas_triton", row_align=a)), (x_exp, ids_a), nbytes(x_exp, True)))
  run(variants)


def time_expert_align() -> None:
  """The padding's cost to the GEMMs: the FP8 grouped GEMM (public op) of the Ling-mini
  up-projection over the rows dispatch.permute makes with each group_align (every expert's
  multinomial count rounded up, M = T * K + E * (align - 1) rounded up), against the unpadded
  rows. TFLOP/s of the real rows' FLOPs, so a slower padded GEMM shows as fewer."""
  rows, groups, hidden, width = _EXPERT_SHAPES["mini"]
  k_dim, n_dim = hidden, 2 * width
  sizes = np.random.default_rng(0).multinomial(rows, np.ones(groups) / groups)
  flops = 2 * rows * k_dim * n_dim
  f = jax.jit(lambda a, s, b, t, g: fp8_gemm.fp8_grouped_matmul(
      a, s, b, t, g, backend="pallas_mosaic_gpu"))
  for align in [1] + list(map(int, _GROUP_ALIGNS.value)):
    padded = -(-sizes // align) * align
    m_dim = -(-(rows + groups * (align - 1)) // align) * align
    a_q, sa, b_q, sb = _operands(jax.random.PRNGKey(12), m_dim, k_dim, n_dim, groups)
    try:
      tf = flops / _bench(f, a_q, sa, b_q, sb, jnp.asarray(padded, jnp.int32)) / 1e12
    except Exception as e:
      print(f"expert_align {align} failed: {type(e).__name__}: {str(e)[:400]}")
      continue
    _record(f"expert_align mini up fp8_grouped_matmul align {align} ({m_dim} rows, "
            f"{int(padded.sum()) - rows} padding in groups)", tf, "TFLOP/s (real rows)")
    TABLES["expert_align"].append({"align": align, "rows": m_dim,
                                   "padding": int(padded.sum()) - rows, "TFLOP/s": tf})
    del a_q, b_q
    _write_json()


def _print_tables() -> None:
  fmt = lambda v: f"{v:.0f}" if v else "-"
  ratio = lambda a, b: f"{a / b:.2f}x" if a and b else "-"
  print("\n| dense GEMM | M | K | N | ours kernel | ours op | config | XLA fp8 per-tensor | "
        "ours/XLA fp8 | bf16 | torch blockwise | ours/torch |")
  print("|---|---|---|---|---|---|---|---|---|---|---|---|")
  for r in TABLES["dense"]:
    print(f"| {r['shape']} | {r['M']} | {r['K']} | {r['N']} | {fmt(r['ours kernel'])} | "
          f"{fmt(r['ours op'])} | {r['ours cfg']} | {fmt(r['xla fp8'])} | "
          f"{ratio(r['ours kernel'], r['xla fp8'])} | {fmt(r['bf16'])} | "
          f"{fmt(r.get('torch'))} | {ratio(r['ours kernel'], r.get('torch'))} |")
  print("\n| grouped GEMM (balanced) | K | N | FP8 ours kernel | FP8 ours op | config | "
        "bf16 ours, FP8 codes' values | FP8/bf16 | bf16 ours, full mantissas | FP8/bf16 |")
  print("|---|---|---|---|---|---|---|---|---|---|")
  for r in TABLES["grouped"]:
    full = r.get("bf16 ours, full mantissas")
    print(f"| {r['shape']} {r['problem']} | {r['K']} | {r['N']} | {fmt(r['ours kernel'])} | "
          f"{fmt(r['ours op'])} | {r['ours cfg']} | {fmt(r.get('bf16 ours'))} | "
          f"{ratio(r['ours kernel'], r.get('bf16 ours'))} | {fmt(full)} | "
          f"{ratio(r['ours kernel'], full)} |")
  streamed = [r for r in TABLES["grouped"] if STREAM_FP8 in r]
  if streamed:
    print("\n| grouped GEMM (TFLOP/s of a GEMM moving the bytes in the time) | FP8 bytes streamed "
          "| FP8 kernel of it | bf16 bytes streamed | bf16 full mantissas of it | 1.5x bf16 full "
          "of FP8's | output written alone (XLA / TMA stores) | FP8 bytes by TMA (`tma_stream`) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in streamed:
      fp8_roof, bf16_roof = r[STREAM_FP8], r.get(STREAM_BF16)
      full = r.get("bf16 ours, full mantissas")
      frac = lambda a, b: f"{a / b:.0%}" if a and b else "-"
      print(f"| {r['shape']} {r['problem']} | {fmt(fp8_roof)} | "
            f"{frac(r['ours kernel'], fp8_roof)} | {fmt(bf16_roof)} | {frac(full, bf16_roof)} | "
            f"{frac(1.5 * full if full else 0, fp8_roof)} | {fmt(r.get(STREAM_WRITE))} / "
            f"{fmt(r.get(STREAM_TMA_WRITE))} | {fmt(r.get(STREAM_FP8 + ' by TMA'))} |")
  print("\n| quantise | impl | shape | GB/s | copy GB/s | of copy |")
  print("|---|---|---|---|---|---|")
  for r in TABLES["quant"]:
    print(f"| {r['op']} | {r.get('impl', 'XLA')} | {r['shape']} | {r['GB/s']:.0f} | "
          f"{r['copy GB/s']:.0f} | {r['of copy']:.2f} |")
  if TABLES["expert_align"]:
    base = TABLES["expert_align"][0]["TFLOP/s"] if TABLES["expert_align"][0]["align"] == 1 else 0
    print("\n| group_align | rows M | padding rows in groups | mini up FP8 GEMM TFLOP/s (real "
          "rows) | vs unpadded |")
    print("|---|---|---|---|---|")
    for r in TABLES["expert_align"]:
      print(f"| {r['align']} | {r['rows']} | {r['padding']} | {r['TFLOP/s']:.0f} | "
            f"{ratio(r['TFLOP/s'], base)} |")


def main(argv):
  del argv
  unknown = set(_GROUPED_PROBLEMS.value) - set(_GROUPED_PROBLEM_DIMS)
  if unknown:
    raise app.UsageError(f"--grouped_problems: unknown {sorted(unknown)}; use "
                         f"{', '.join(_GROUPED_PROBLEM_DIMS)}.")
  print(jax.__version__, jax.devices(), "auto backend:", fp8_gemm._resolve_backend("auto"),
        flush=True)
  if _SECTIONS.value == ["linear"]:  # the in-jit diagnosis alone (BENCHMARKS.md, session 4)
    diagnose_linear()
    return
  if _SECTIONS.value == ["linear_time"]:
    time_linear()
    return
  ok = check_correctness() if _GEMM_CHECK.value else True
  if _CHECK_CONFIGS.value:
    ok &= check_configs(_CHECK_CONFIGS.value)
  _write_json()
  sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                  ".bench"))
  if {"dense", "grouped"} & set(_SECTIONS.value) and _BASELINES.value:
    try:
      import gpu_baselines
      gpu_baselines.dense_bf16()
      gpu_baselines.dense_fp8()
      RESULTS.update({f"baseline {k}": v for k, v in gpu_baselines.RESULTS.items()})
    except Exception as e:
      print("gpu_baselines failed:", type(e).__name__, str(e)[:300])
  for section, fn in (("dense", time_dense), ("dense_wgrad", time_dense_wgrad),
                      ("grouped", time_grouped), ("quant", time_quant),
                      ("expert_align", time_expert_align), ("linear_time", time_linear)):
    if section in _SECTIONS.value:
      try:
        fn()
      except Exception as e:  # keep the other sections' numbers
        print(f"section {section} failed: {type(e).__name__}: {str(e)[:600]}")
  _print_tables()
  print("CORRECTNESS", "PASS" if ok else "FAIL")
  _write_json()


if __name__ == "__main__":
  app.run(main)
