"""Checks and times the Mosaic GPU grouped matmul against the baselines, in one run on an H200.

Run on the GPU machine (see ../shared/device.md; gpu_baselines.py copied into .bench/, and
tokamax with the requirements the image lacks among the wheels installed, `TOKAMAX_WHEELS`;
without them it stops before timing, unless --baselines=false):
  PYTHONPATH=$PWD:/tmp/site python3 experiments/bench_kernels.py --shapes=mini

A tiling spec is body:tile_m:tile_n:tile_k:stages[:m][:e<epi_n>][:a][:o][:c]
(`TileConfig.spec`), or "table" (the checked-in TILE_CONFIGS); prefixed with "up@", "down@",
"updg@" or "downdg@" it is timed for that problem only. The expert FFN is timed with the
checked-in tables, with the best tilings of this run, and with those plus the fused SwiGLU (the
best --swiglu_configs entry of this run). --sustained_s also times the table tiling and tokamax
over a long stream of calls, to tell clocks just after idle from steady state.

Prints a correctness section (relative error against fp32 references, every output element
checked, tail rows included), then one line per timing, then a table of TFLOP/s and ratios to
tokamax's Mosaic GPU kernel and to cuBLAS's batched einsum at perfect balance, all measured in
this run, and a table of permute / un-permute bandwidth (Pallas and XLA) as a fraction of an
elementwise copy timed in the same run. Writes $OUT/bench_kernels.json.

Shape key: M rows (tokens x top_k), K contraction dim, N output dim, G experts.
"""

import json
import os
import sys
import time
import types

import jax
import jax.numpy as jnp
import numpy as np
from absl import app
from absl import flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from kernels import dispatch  # noqa: E402
from kernels import grouped_matmul as gmm_lib  # noqa: E402
from kernels import grouped_matmul_mgpu as mgpu  # noqa: E402
from kernels import permute_mgpu  # noqa: E402
from ling_jax import profiling  # noqa: E402

_SHAPES = flags.DEFINE_list("shapes", ["mini"], "Expert shapes: mini, flash, 1t.")
_CONFIGS = flags.DEFINE_list(
    "configs", ["table", "ws_chain:128:128:64:4:m:e64"],
    "Kernel tilings to time: 'table' (the checked-in TILE_CONFIGS) or a TileConfig.spec string, "
    "optionally prefixed with '<problem>@' (problems: up, down, updg, downdg).")
_PROBLEMS = flags.DEFINE_list(
    "problems", ["down", "up", "updg", "downdg"], "Forward/dgrad problems to time, in order.")
_SWIGLU_CONFIGS = flags.DEFINE_list(
    "swiglu_configs", ["ws_chain:128:128:64:4:m:e64"],
    "Fused SwiGLU tilings to check and time ('none' for none).")
_DENSE = flags.DEFINE_bool("dense", True, "Time gpu_baselines' dense bf16 8192^3 too.")
_ZIPF = flags.DEFINE_bool("zipf", True, "Time Zipf-skewed group sizes too.")
_EINSUM = flags.DEFINE_bool("einsum", True, "Time cuBLAS's batched einsum at perfect balance.")
_TINY_CHECKS = flags.DEFINE_bool(
    "tiny_checks", True, "Also check fewer rows than a tile (one more compile per tiling).")
_WGRAD_CONFIGS = flags.DEFINE_list(
    "wgrad_configs", ["table"],
    "Weight-gradient tilings: 'table' or tile_k:tile_n:chunk:stages; 'none' times none.")
_BASELINES = flags.DEFINE_bool(
    "baselines", True, "Time tokamax, batched einsum and dense bf16 too.")
_FFN = flags.DEFINE_bool(
    "ffn", True, "Time the expert FFN forward+backward through grouped_matmul.")
_PERMUTE = flags.DEFINE_bool(
    "permute", True, "Time permute / un-permute (Pallas and XLA) against a copy.")
_CHECK = flags.DEFINE_bool("check", True, "Check correctness before timing.")
_GRAD_CHECK = flags.DEFINE_bool(
    "grad_check", True, "Also check jax.grad through the backend (the checked-in tilings).")
_FFN_ZIPF = flags.DEFINE_bool("ffn_zipf", True, "Time the expert FFN with Zipf groups too.")
_REPEATS = flags.DEFINE_integer("repeats", 20, "Calls per timed batch (median of 3 batches).")
_SUSTAINED_S = flags.DEFINE_float(
    "sustained_s", 0.0, "Forward problems, balanced groups: after 2 s idle, run the table tiling "
    "and then tokamax back to back for this many seconds each and print TFLOP/s over time (clocks "
    "just after idle against steady state); 0 skips it.")
_ROUNDS = flags.DEFINE_integer(
    "rounds", 1, "Grouped GEMMs: time the balanced and Zipf groups alternately this many times "
    "per tiling and report the median, so that clock drift does not land on one balance.")

# tokens x top_k, experts, hidden, expert width
_MODEL_SHAPES = {"mini": (16384 * 8, 256, 2048, 512), "flash": (16384 * 8, 256, 4096, 1024),
                 "1t": (16384 * 8, 256, 8192, 2048)}
RESULTS: dict[str, dict] = {}


def _bench(f, *args, n=None, warm=3) -> float:
  """Seconds per call: n calls queued back to back, synchronised once; median of 3 such batches.

  gpu_baselines.py synchronises after every call instead, which adds the host round trip
  (tens to hundreds of microseconds) to each ~1 ms kernel; queued calls time the GPU alone,
  as a training step sees it. Every figure in this script's table uses this method.
  """
  return profiling.time_queued(f, *args, calls=n or _REPEATS.value, warmup=warm)


def _record(name: str, value: float, unit: str, **extra) -> None:
  RESULTS[name] = {"value": value, "unit": unit, **extra}
  print(f"{name:64s} {value:10.2f} {unit}", flush=True)


_PROBLEM_KEYS = {"up": "up", "down": "down", "updg": "up dgrad", "downdg": "down dgrad"}


def _parse_config(spec: str, k_dim: int, n_dim: int, transpose: bool) -> mgpu.TileConfig:
  spec = spec.split("@")[-1]
  if spec == "table":
    return mgpu.tile_config(k_dim, n_dim, transpose, jnp.bfloat16)
  return mgpu.parse_tile_config(spec)


def _check_specs(configs) -> list[str]:
  """The tilings the correctness check runs: "table" stands for every tiling in TILE_CONFIGS
  (the check's small shapes have no entry of their own) and the default."""
  out = []
  for spec in (c.split("@")[-1] for c in configs):
    if spec == "table":
      out += [cfg.spec() for cfg in (*mgpu.TILE_CONFIGS.values(), mgpu.DEFAULT_TILE_CONFIG)]
    else:
      out.append(spec)
  return list(dict.fromkeys(out))


def _specs_for(problem: str) -> list[str]:
  """The --configs entries that apply to a problem ("up", "down dgrad", ...)."""
  out = []
  for spec in _CONFIGS.value:
    prefix, _, rest = spec.rpartition("@")
    if not prefix or _PROBLEM_KEYS[prefix] == problem:
      out.append(rest)
  return out


def _parse_wgrad_config(spec: str, k_dim: int, n_dim: int) -> mgpu.WgradConfig:
  if spec == "table":
    return mgpu.wgrad_config(k_dim, n_dim, jnp.bfloat16)
  return mgpu.WgradConfig(*map(int, spec.split(":")))


def _balanced_sizes(rows: int, groups: int) -> np.ndarray:
  sizes = np.full(groups, rows // groups, np.int32)
  sizes[: rows % groups] += 1
  return sizes


def _zipf_sizes(rows: int, groups: int, exponent: float = 1.0, seed: int = 0) -> np.ndarray:
  """Zipf-like loads: expert of rank r gets rows in proportion to 1 / r**exponent."""
  weights = 1.0 / np.arange(1, groups + 1) ** exponent
  sizes = np.floor(rows * weights / weights.sum()).astype(np.int32)
  sizes[0] += rows - sizes.sum()
  return np.random.default_rng(seed).permutation(sizes).astype(np.int32)


def _np_gmm(lhs_MK, rhs_GKN, sizes_G, transpose):
  """fp32 reference on upcast bf16 operands; rows past the last group are zero."""
  lhs_MK, rhs_GKN = np.float32(lhs_MK), np.float32(rhs_GKN)
  out_dim = rhs_GKN.shape[1] if transpose else rhs_GKN.shape[2]
  out_MN = np.zeros((lhs_MK.shape[0], out_dim), np.float32)
  start = 0
  for g, size in enumerate(sizes_G):
    w = rhs_GKN[g].T if transpose else rhs_GKN[g]
    out_MN[start:start + size] = lhs_MK[start:start + size] @ w
    start += size
  return out_MN


def _row_check(label: str, out, ref, tol: float) -> bool:
  """Whole-array and per-row relative error, so that one unwritten or misrouted row cannot hide."""
  out, ref = np.float32(out), np.float32(ref)
  err = profiling.rel_error(out, ref)
  ref_norm = np.linalg.norm(ref, axis=1)
  row_err = np.linalg.norm(out - ref, axis=1) / (ref_norm + 1e-6)
  row_err = np.where(ref_norm > 0, row_err, np.abs(out).max(axis=1))
  good = bool(np.isfinite(out).all() and err < tol and row_err.max() < 10 * tol)
  print(f"check {label} rel_err={err:.2e} worst_row={row_err.max():.2e} "
        f"{'ok' if good else 'FAIL'}", flush=True)
  return good


def _np_silu_times(h_MN):
  gate, up = np.split(np.float64(h_MN), 2, axis=-1)
  return gate / (1 + np.exp(-gate)) * up


def check_correctness(configs, wgrad_configs, swiglu_configs) -> bool:
  """Ragged cases against NumPy for every tiling, both rhs layouts and the fused SwiGLU; then
  gradients through the registered backend against the reference backend.

  All cases share M and G, so each (tiling, layout, dtype) compiles once.
  """
  ok = True
  rng = np.random.default_rng(int(time.time()))  # fresh inputs every run
  rows, groups, k_dim, n_dim = 1003, 16, 256, 512
  pad = lambda sizes: np.concatenate([sizes, np.zeros(groups - len(sizes), np.int32)])
  cuts = np.sort(rng.integers(0, rows + 1, groups - 1))
  cases = {
      "zeros+tail": pad(np.array([0, 300, 1, 0, 7, 128, 0, 500], np.int32)),
      "one group": pad(np.array([0, 0, rows], np.int32)),
      "all empty": np.zeros(groups, np.int32),
      "random": np.diff(np.concatenate([[0], cuts, [rows]])).astype(np.int32),
      "zipf+tail": _zipf_sizes(rows - 37, groups, seed=int(rng.integers(1 << 30))),
  }
  lhs = jnp.asarray(rng.standard_normal((rows, k_dim)), jnp.bfloat16)
  rhs = {t: jnp.asarray(rng.standard_normal((groups, n_dim, k_dim) if t else
                                            (groups, k_dim, n_dim)), jnp.bfloat16)
         for t in (False, True)}
  refs = {(t, c): _np_gmm(lhs, rhs[t], s, t) for t in (False, True) for c, s in cases.items()}
  tiny_lhs, tiny_sizes = lhs[:40], pad(np.array([10, 0, 25], np.int32))
  for spec in _check_specs(configs):
    ok_before, ok = ok, True  # this tiling's checks alone, for the per-tiling verdict
    for transpose in (False, True):
      cfg = _parse_config(spec, k_dim, n_dim, transpose)
      # fp32 outputs check tightly; bf16 ones too for the forward layout, or where an fp32
      # output's doubled staging buffer leaves too few stages for the tiling.
      f32_ok = mgpu.supports(lhs, rhs[transpose], transpose, jnp.float32, cfg)
      dtypes = (((jnp.float32, 1e-5),) if f32_ok else ()) + (
          ((jnp.bfloat16, 8e-3),) if not transpose or not f32_ok else ())
      for out_dtype, tol in dtypes:
        if not mgpu.supports(lhs, rhs[transpose], transpose, out_dtype, cfg):
          print(f"check {spec} T={transpose} {jnp.dtype(out_dtype).name}: not supported, FAIL")
          ok = False
          continue
        f = jax.jit(lambda a, b, s, cfg=cfg, t=transpose, o=out_dtype: mgpu.gmm(
            a, b, s, transpose_rhs=t, out_dtype=o, config=cfg))
        for case, sizes in cases.items():
          ok &= _row_check(f"{case:10s} T={transpose!s:5s} {spec:28s} {jnp.dtype(out_dtype).name}",
                           f(lhs, rhs[transpose], jnp.asarray(sizes)), refs[(transpose, case)], tol)
        if _TINY_CHECKS.value and out_dtype == dtypes[0][0] and not transpose:
          out = f(tiny_lhs, rhs[False], jnp.asarray(tiny_sizes))
          ok &= _row_check(f"{'tiny M':10s} T=False {spec:28s} {jnp.dtype(out_dtype).name}", out,
                           _np_gmm(tiny_lhs, rhs[False], tiny_sizes, False), tol)
    print(f"checked {spec} {'ok' if ok else 'FAIL'}", flush=True)
    ok &= ok_before

  # Fused SwiGLU: the activation (fp32 and bf16) and the saved pre-activation.
  for spec in swiglu_configs:
    if spec == "none":
      continue
    cfg = mgpu.parse_tile_config(spec)
    pre_dtype, pre_tol = jnp.float32, 1e-5
    if not mgpu.supports(lhs, rhs[False], False, jnp.float32, cfg, swiglu=True):
      pre_dtype, pre_tol = jnp.bfloat16, 8e-3
    if not mgpu.supports(lhs, rhs[False], False, pre_dtype, cfg, swiglu=True):
      print(f"check swiglu {spec}: not supported, FAIL")
      ok = False
      continue
    f = jax.jit(lambda a, b, s, cfg=cfg, o=pre_dtype: mgpu.gmm(
        a, b, s, out_dtype=o, config=cfg, swiglu=True, save_preact=True))
    f16 = jax.jit(lambda a, b, s, cfg=cfg: mgpu.gmm(a, b, s, config=cfg, swiglu=True))
    name = jnp.dtype(pre_dtype).name
    for case, sizes in cases.items():
      act, pre = f(lhs, rhs[False], jnp.asarray(sizes))
      ref = refs[(False, case)]
      ok &= _row_check(f"{case:10s} swiglu act {spec:28s} {name}", act, _np_silu_times(ref),
                       pre_tol)
      ok &= _row_check(f"{case:10s} swiglu pre {spec:28s} {name}", pre, ref, pre_tol)
      ok &= _row_check(f"{case:10s} swiglu act {spec:28s} bfloat16",
                       f16(lhs, rhs[False], jnp.asarray(sizes)), _np_silu_times(ref), 8e-3)

  # Weight gradient: per group lhs.T @ dout, into [G, K, N].
  dout = jnp.asarray(rng.standard_normal((rows, n_dim)), jnp.bfloat16)
  for spec in wgrad_configs:
    if spec == "none":
      continue
    cfg = _parse_wgrad_config(spec, k_dim, n_dim)
    f = jax.jit(lambda a, b, s, cfg=cfg: mgpu.tgmm(a, b, s, out_dtype=jnp.float32, config=cfg))
    for case, sizes in cases.items():
      ref_w = np.zeros((groups, k_dim, n_dim), np.float32)
      start = 0
      for g, size in enumerate(sizes):
        ref_w[g] = np.float32(lhs[start:start + size]).T @ np.float32(dout[start:start + size])
        start += size
      out = np.float32(f(lhs, dout, jnp.asarray(sizes)))
      err = profiling.rel_error(out, ref_w)
      per_group = [profiling.rel_error(o, r) if np.abs(r).max() > 0 else float(np.abs(o).max())
                   for o, r in zip(out, ref_w)]
      good = bool(np.isfinite(out).all() and err < 1e-5 and max(per_group) < 1e-4)
      ok &= good
      print(f"check {case:10s} wgrad {spec:18s} float32  rel_err={err:.2e} "
            f"worst_group={max(per_group):.2e} {'ok' if good else 'FAIL'}", flush=True)

  # Gradients through the registered backend against the reference backend (fwd, dgrad, wgrad),
  # for grouped_matmul and for grouped_matmul_swiglu (whose VJP runs on the saved pre-activation).
  if not _GRAD_CHECK.value:
    print("CORRECTNESS", "PASS" if ok else "FAIL", "(no gradient check)", flush=True)
    RESULTS["correctness"] = {"value": float(ok), "unit": "pass"}
    return ok
  rows, groups = 4096, 16
  sizes = jnp.asarray(_zipf_sizes(rows - 100, groups, seed=int(rng.integers(1 << 30))))
  x = jnp.asarray(rng.standard_normal((rows, 512)), jnp.bfloat16)
  w = jnp.asarray(rng.standard_normal((groups, 512, 1024)) * 0.05, jnp.bfloat16)
  for op, out_cols in ((gmm_lib.grouped_matmul, 1024), (gmm_lib.grouped_matmul_swiglu, 512)):
    dy = jnp.asarray(rng.standard_normal((rows, out_cols)), jnp.float32)

    def loss(backend, x, w, op=op, dy=dy):
      # bf16 output, so that the cotangent reaching dgrad is bf16 and runs the kernel too.
      y = op(x, w, sizes, backend=backend)
      return jnp.sum(y.astype(jnp.float32) * dy)

    grads = {b: jax.jit(jax.value_and_grad(lambda x, w, b=b: loss(b, x, w), argnums=(0, 1)))(x, w)
             for b in ("pallas_mosaic_gpu", "reference")}
    (v0, (dx0, dw0)), (v1, (dx1, dw1)) = grads["pallas_mosaic_gpu"], grads["reference"]
    # The loss sums terms of both signs (dy is random) and may nearly cancel: scale its error by
    # the sum of the terms' magnitudes rather than by the loss itself.
    y_ref = op(x, w, sizes, backend="reference").astype(jnp.float32)
    loss_scale = float(jnp.sum(jnp.abs(y_ref * dy)))
    for name, a, b in (("loss", v0, v1), ("dgrad", dx0, dx1), ("wgrad", dw0, dw1)):
      err = (abs(float(a) - float(b)) / loss_scale if name == "loss"
             else profiling.rel_error(np.float32(a), np.float32(b)))
      good = err < 1e-2  # bf16 gradients (dgrad output is bf16)
      ok &= bool(good)
      print(f"check grad {op.__name__} {name:6s} vs reference backend rel_err={err:.2e} "
            f"{'ok' if good else 'FAIL'}", flush=True)
  print("CORRECTNESS", "PASS" if ok else "FAIL", flush=True)
  RESULTS["correctness"] = {"value": float(ok), "unit": "pass"}
  return ok


# tokamax 0.0.17's requirements that the GPU image lacks (session 14), less jax and what the image
# has: `../shared/tools/device_wheels.sh` downloads them beside the project's own wheels.
TOKAMAX_WHEELS = ("tokamax immutabledict pydantic pydantic-core annotated-types typing-inspection "
                  "typing-extensions einshape jaxtyping wadler-lindig qwix tensorboardx tqdm")


def _import_baselines():
  """gpu_baselines (from .bench/) and tokamax; else exits (2) naming what is missing and the fix,
  before anything is timed: a table without its baselines cannot answer the issue's ratios."""
  sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                  ".bench"))
  missing = []
  try:
    import gpu_baselines
  except ImportError as e:
    gpu_baselines = None
    missing.append(f"gpu_baselines ({e}): copy ../shared/tools/gpu_baselines.py into .bench/")
  for m in ("xprof", "xprof.cli", "xprof.cli.tools"):  # tokamax imports xprof only to profile
    sys.modules.setdefault(m, types.ModuleType(m))
  sys.modules["xprof.cli.tools"].get_kernel_stats_tool = None
  try:
    import tokamax
  except ImportError as e:
    tokamax = None
    missing.append(f"tokamax ({e}): run ../shared/tools/device_wheels.sh {TOKAMAX_WHEELS} and "
                   "install .whl on the device")
  if missing:
    print(f"error: --baselines: {'; '.join(missing)}. Or pass --baselines=false.",
          file=sys.stderr)
    sys.exit(2)
  return gpu_baselines, tokamax


def _problems(shape) -> dict:
  _, _, hidden, width = _MODEL_SHAPES[shape]
  return {"up": (hidden, 2 * width, False), "down": (width, hidden, False),
          "up dgrad": (2 * width, hidden, True), "down dgrad": (hidden, width, True)}


def _alternate(f, lhs, rhs, balances, label: str) -> dict[str, float]:
  """Seconds per call of `f(lhs, rhs, sizes)` for each (balance, sizes): `--rounds` timings per
  balance, taken in turns, and their median. A balance that fails is left out (and printed):
  one failing tiling should not hide the others."""
  times = {balance: [] for balance, _ in balances}
  for _ in range(max(_ROUNDS.value, 1)):
    for balance, sizes_np in balances:
      if times[balance] is None:
        continue
      try:
        times[balance].append(_bench(f, lhs, rhs, jnp.asarray(sizes_np)))
      except Exception as e:  # pylint: disable=broad-except
        print(f"{label.format(balance)} failed: {type(e).__name__}: {str(e)[:300]}")
        times[balance] = None
  return {b: float(np.median(t)) for b, t in times.items() if t}


def _balances(rows, groups):
  out = [("balanced", _balanced_sizes(rows, groups))]
  if _ZIPF.value:
    out.append(("zipf", _zipf_sizes(rows, groups)))
  return out


def time_shapes(tokamax) -> list:
  """Each problem: every tiling, balanced and Zipf, then tokamax and the batched einsum."""
  rows_table = []
  key = jax.random.PRNGKey(1)
  for shape in _SHAPES.value:
    rows, groups, _, _ = _MODEL_SHAPES[shape]
    problems = _problems(shape)
    for pkey in _PROBLEMS.value:
      pname = _PROBLEM_KEYS[pkey]
      k_dim, n_dim, transpose = problems[pname]
      flops = 2 * rows * k_dim * n_dim
      lhs = jax.random.normal(key, (rows, k_dim), jnp.bfloat16)
      rshape = (groups, n_dim, k_dim) if transpose else (groups, k_dim, n_dim)
      rhs = jax.random.normal(jax.random.PRNGKey(2), rshape, jnp.bfloat16) * 0.02
      by_balance = {b: {"shape": shape, "balance": b, "problem": pname, "K": k_dim, "N": n_dim,
                        "ours best": 0.0} for b, _ in _balances(rows, groups)}
      for spec in _specs_for(pname):
        cfg = _parse_config(spec, k_dim, n_dim, transpose)
        f = jax.jit(lambda a, b, s, cfg=cfg, t=transpose: mgpu.gmm(
            a, b, s, transpose_rhs=t, config=cfg))  # one compile for both balances
        label = f"{shape} {{}} {pname} {spec}"
        times = _alternate(f, lhs, rhs, _balances(rows, groups), label)
        for balance, seconds in times.items():
          row = by_balance[balance]
          tf = flops / seconds / 1e12
          fitted = cfg.fit_smem(2, 2, k_dim=k_dim).spec()
          _record(f"{shape} {balance} {pname} ours {spec}", tf, "TFLOP/s", cfg=fitted)
          row[f"ours {spec}"] = tf
          if tf > row["ours best"]:
            row["ours best"], row["best spec"] = tf, fitted
      if tokamax is not None and not transpose:
        rd = jax.jit(lambda a, b, s: tokamax.ragged_dot(a, b, s, implementation="mosaic"))
        times = _alternate(rd, lhs, rhs, _balances(rows, groups), f"tokamax {{}} {pname}")
        for balance, seconds in times.items():
          by_balance[balance]["tokamax"] = flops / seconds / 1e12
          _record(f"{shape} {balance} {pname} tokamax mosaic", flops / seconds / 1e12, "TFLOP/s")
      for balance, _ in _balances(rows, groups):
        row = by_balance[balance]
        if balance == "balanced" and _EINSUM.value:
          einsum = jax.jit(lambda x, w, t=transpose: jnp.einsum(
              "ecd,efd->ecf" if t else "ecd,edf->ecf", x, w))
          row["einsum"] = flops / _bench(einsum, lhs.reshape(groups, -1, k_dim), rhs) / 1e12
          _record(f"{shape} {balance} {pname} batched einsum", row["einsum"], "TFLOP/s")
        rows_table.append(row)
      del lhs, rhs
      _write_json(rows_table)  # after each problem, so a run cut short keeps what it measured
    if _SWIGLU_CONFIGS.value != ["none"]:
      rows_table += _time_swiglu(shape, rows_table)
    if "none" not in _WGRAD_CONFIGS.value:
      for balance, sizes_np in _balances(rows, groups):
        rows_table.extend(_time_wgrad(shape, balance, jnp.asarray(sizes_np), _MODEL_SHAPES[shape]))
    if _FFN.value:
      rows_table += _time_ffn(shape, tokamax, rows_table)
    _write_json(rows_table)
  return rows_table


def time_sustained(tokamax) -> None:
  """TFLOP/s of batches of 10 queued calls, back to back for --sustained_s after 2 s idle.

  The other timings each take a fraction of a second after an idle gap (a compile), which is
  when the GPU's power management moves the clocks most; this shows what a long stream of
  calls (a training step) settles at, for our table tiling and tokamax alike.
  """
  for shape in _SHAPES.value:
    rows, groups, _, _ = _MODEL_SHAPES[shape]
    sizes = jnp.asarray(_balanced_sizes(rows, groups))
    for pkey in _PROBLEMS.value:
      pname = _PROBLEM_KEYS[pkey]
      k_dim, n_dim, transpose = _problems(shape)[pname]
      if transpose:
        continue
      lhs = jax.random.normal(jax.random.PRNGKey(1), (rows, k_dim), jnp.bfloat16)
      rhs = jax.random.normal(jax.random.PRNGKey(2), (groups, k_dim, n_dim), jnp.bfloat16) * 0.02
      flops = 2 * rows * k_dim * n_dim
      fns = {"ours table": jax.jit(lambda a, b, s: mgpu.gmm(a, b, s))}
      if tokamax is not None:
        fns["tokamax"] = jax.jit(
            lambda a, b, s: tokamax.ragged_dot(a, b, s, implementation="mosaic"))
      steady = {}
      for name, f in fns.items():
        _, _, rates = profiling.sustained_rates(f, lhs, rhs, sizes, seconds=_SUSTAINED_S.value)
        tf = [r * flops / 1e12 for r in rates]
        tenths = [float(np.median(p)) for p in np.array_split(np.array(tf), min(10, len(tf)))]
        steady[name] = float(np.median(tf[len(tf) // 2:]))
        _record(f"{shape} sustained {pname} {name}, first 10 batches", float(np.median(tf[:10])),
                "TFLOP/s")
        _record(f"{shape} sustained {pname} {name}, last half", steady[name], "TFLOP/s",
                batches=len(tf), tenths=tenths)
        print(f"  by tenths of {_SUSTAINED_S.value:.1f} s ({len(tf)} batches): "
              + " ".join(f"{t:.0f}" for t in tenths), flush=True)
      if len(steady) == 2:
        print(f"{shape} sustained {pname}: ours / tokamax = "
              f"{steady['ours table'] / steady['tokamax']:.2f}x", flush=True)
      del lhs, rhs


def _best_spec(rows_table, shape, problem) -> str | None:
  """The fastest tiling of this run for a problem, balanced groups."""
  for r in rows_table:
    if (r["shape"], r["balance"], r["problem"]) == (shape, "balanced", problem):
      return r.get("best spec")
  return None


def _time_swiglu(shape, rows_table) -> list:
  """Up-projection with its SwiGLU: the GEMM (best tiling of this run) then XLA's SwiGLU, against
  the fused kernel with and without the saved pre-activation. FLOPs are the GEMM's."""
  rows, groups, hidden, width = _MODEL_SHAPES[shape]
  flops = 2 * rows * hidden * 2 * width
  x = jax.random.normal(jax.random.PRNGKey(11), (rows, hidden), jnp.bfloat16)
  w = jax.random.normal(jax.random.PRNGKey(12), (groups, hidden, 2 * width), jnp.bfloat16) * 0.02
  up_spec = _best_spec(rows_table, shape, "up")
  up_cfg = mgpu.parse_tile_config(up_spec) if up_spec else None
  variants = {"unfused (gmm + XLA SwiGLU)": jax.jit(lambda a, b, s: gmm_lib._swiglu_of(
      mgpu.gmm(a, b, s, config=up_cfg), a.dtype))}
  for spec in _SWIGLU_CONFIGS.value:
    cfg = mgpu.parse_tile_config(spec)
    variants[f"fused {spec}"] = jax.jit(lambda a, b, s, cfg=cfg: mgpu.gmm(
        a, b, s, config=cfg, swiglu=True))
    variants[f"fused+preact {spec}"] = jax.jit(lambda a, b, s, cfg=cfg: mgpu.gmm(
        a, b, s, config=cfg, swiglu=True, save_preact=True))
  out = []
  for balance, sizes_np in _balances(rows, groups):
    row = {"shape": shape, "balance": balance, "problem": "up + SwiGLU fwd", "K": hidden,
           "N": 2 * width, "ours best": 0.0}
    for name, f in variants.items():
      try:
        tf = flops / _bench(f, x, w, jnp.asarray(sizes_np)) / 1e12
      except Exception as e:
        print(f"{shape} {balance} swiglu {name} failed: {type(e).__name__}: {str(e)[:300]}")
        continue
      _record(f"{shape} {balance} up+SwiGLU {name}", tf, "TFLOP/s")
      row[name] = tf
      if name.startswith("fused ") and tf > row["ours best"]:
        row["ours best"], row["best spec"] = tf, name.split(" ", 1)[1]
    out.append(row)
  return out


def _write_json(rows_table) -> None:
  out = os.environ.get("OUT", "/tmp")
  with open(os.path.join(out, "bench_kernels.json"), "w") as f:
    json.dump({"results": RESULTS, "table": rows_table, "jax": jax.__version__,
               "device": str(jax.devices()[0].device_kind)}, f, indent=1)


def _time_wgrad(shape, balance, sizes, model_shape) -> list:
  """Weight gradients: up (x.T @ d_gateup) and down (h.T @ d_out), per group."""
  rows, groups, hidden, width = model_shape
  out = []
  for pname, (k_dim, n_dim) in {"up wgrad": (hidden, 2 * width),
                                "down wgrad": (width, hidden)}.items():
    flops = 2 * rows * k_dim * n_dim
    lhs = jax.random.normal(jax.random.PRNGKey(4), (rows, k_dim), jnp.bfloat16)
    dout = jax.random.normal(jax.random.PRNGKey(5), (rows, n_dim), jnp.bfloat16)
    row = {"shape": shape, "balance": balance, "problem": pname, "K": k_dim, "N": n_dim}
    best = 0.0
    for spec in _WGRAD_CONFIGS.value:
      cfg = _parse_wgrad_config(spec, k_dim, n_dim)
      f = jax.jit(lambda a, b, s, cfg=cfg: mgpu.tgmm(a, b, s, config=cfg))
      try:
        tf = flops / _bench(f, lhs, dout, sizes) / 1e12
      except Exception as e:
        print(f"{shape} {balance} {pname} {spec} failed: {type(e).__name__}: {str(e)[:300]}")
        continue
      _record(f"{shape} {balance} {pname} ours {spec}", tf, "TFLOP/s", cfg=str(cfg))
      best = max(best, tf)
    row["ours best"] = best
    if balance == "balanced" and _BASELINES.value:
      einsum = jax.jit(lambda x, d: jnp.einsum("ecd,ecf->edf", x, d))
      row["einsum"] = flops / _bench(
          einsum, lhs.reshape(groups, -1, k_dim), dout.reshape(groups, -1, n_dim)) / 1e12
      _record(f"{shape} {balance} {pname} batched einsum", row["einsum"], "TFLOP/s")
    out.append(row)
  return out


def _time_ffn(shape, tokamax, rows_table) -> list:
  """Expert FFN forward+backward (gate/up GEMM, SwiGLU, down GEMM), balanced and Zipf groups.

  Ours three ways: the checked-in tables; the best tilings of this run (patched into
  TILE_CONFIGS for the four forward/dgrad problems, balanced groups); and those with the SwiGLU
  fused into the first GEMM (`grouped_matmul_swiglu`, the best fused tiling of this run).
  """
  out = []
  for balance, sizes_np in _balances(_MODEL_SHAPES[shape][0], _MODEL_SHAPES[shape][1]):
    if balance != "balanced" and not _FFN_ZIPF.value:
      continue
    out += _time_ffn_sizes(shape, tokamax, rows_table, balance, jnp.asarray(sizes_np))
  return out


def _time_ffn_sizes(shape, tokamax, rows_table, balance, sizes) -> list:
  rows, groups, hidden, width = _MODEL_SHAPES[shape]
  key = jax.random.PRNGKey(3)
  x = jax.random.normal(key, (rows, hidden), jnp.bfloat16)
  w_up = jax.random.normal(key, (groups, hidden, 2 * width), jnp.bfloat16) * 0.02
  w_down = jax.random.normal(key, (groups, width, hidden), jnp.bfloat16) * 0.02
  flops = 3 * (2 * rows * hidden * 2 * width + 2 * rows * width * hidden)

  def make_step(mm, fused=None):
    def loss(x, w_up, w_down):
      if fused is None:
        gate, up = jnp.split(mm(x, w_up), 2, axis=-1)
        act = jax.nn.silu(gate) * up
      else:
        act = fused(x, w_up)
      return jnp.sum(mm(act, w_down).astype(jnp.float32))
    return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))

  ours = lambda a, b: gmm_lib.grouped_matmul(a, b, sizes, backend="pallas_mosaic_gpu")
  fused = lambda a, b: gmm_lib.grouped_matmul_swiglu(a, b, sizes, backend="pallas_mosaic_gpu")
  best = {}
  for pname, (k_dim, n_dim, transpose) in _problems(shape).items():
    spec = _best_spec(rows_table, shape, pname)
    if spec:
      best[(k_dim, n_dim, transpose, "bfloat16")] = mgpu.parse_tile_config(spec)
  swiglu_best, swiglu_tf = None, 0.0
  for r in rows_table:
    if (r["shape"], r["balance"], r["problem"]) == (shape, "balanced", "up + SwiGLU fwd"):
      for name, tf in r.items():
        if name.startswith("fused+preact ") and tf > swiglu_tf:
          swiglu_best, swiglu_tf = mgpu.parse_tile_config(name.split(" ", 1)[1]), tf
  variants = [("table", {}, {}, None)]
  table = {key: mgpu.tile_config(*key).fit_smem(2, 2, k_dim=key[0]) for key in best}
  if best and best != table:  # else it would re-time the table
    variants.append(("best of run", best, {}, None))
  if swiglu_best is not None:
    variants.append(("best of run + fused SwiGLU", best,
                     {(hidden, 2 * width, "bfloat16"): swiglu_best}, fused))
  tk_tf = None
  if tokamax is not None:
    tk = make_step(lambda a, b: tokamax.ragged_dot(a, b, sizes, implementation="mosaic"))
    tk_tf = flops / _bench(tk, x, w_up, w_down, n=10) / 1e12
    _record(f"{shape} {balance} FFN fwd+bwd tokamax mosaic", tk_tf, "TFLOP/s")
  out = []
  for name, tiles, swiglu_tiles, fused_fn in variants:
    saved = dict(mgpu.TILE_CONFIGS), dict(mgpu.SWIGLU_CONFIGS)
    mgpu.TILE_CONFIGS.update(tiles)
    mgpu.SWIGLU_CONFIGS.update(swiglu_tiles)
    try:
      tf = flops / _bench(make_step(ours, fused_fn), x, w_up, w_down, n=10) / 1e12
    except Exception as e:
      print(f"{shape} {balance} FFN {name} failed: {type(e).__name__}: {str(e)[:300]}")
      continue
    finally:
      for table, old in zip((mgpu.TILE_CONFIGS, mgpu.SWIGLU_CONFIGS), saved):
        table.clear()
        table.update(old)
    _record(f"{shape} {balance} FFN fwd+bwd ours, {name}", tf, "TFLOP/s",
            tiles={str(k): v.spec() for k, v in {**tiles, **swiglu_tiles}.items()})
    out.append({"shape": shape, "balance": balance, "problem": f"FFN fwd+bwd, {name}",
                "K": hidden, "N": width, "ours best": tf, "tokamax": tk_tf})
  return out


def time_permute(shape) -> list:
  """Permute and un-permute at 16384 tokens x top-8, against an elementwise copy of the same run.

  Bandwidth counts the bytes each op must move at least: permute reads the T token rows once and
  writes the M copies; un-permute reads the M rows and writes T. The copy baseline (y + 1 over the
  [M, D] array) reads and writes M rows.
  """
  rows, groups, hidden, _ = _MODEL_SHAPES[shape]
  top_k, d = 8, hidden
  tokens = rows // top_k
  key = jax.random.PRNGKey(7)
  ids_TK = jnp.argsort(jax.random.uniform(key, (tokens, groups)), axis=1)[:, :top_k]
  ids_TK = ids_TK.astype(jnp.int32)
  weights_TK = jax.random.uniform(key, (tokens, top_k), jnp.float32)
  x_TD = jax.random.normal(key, (tokens, d), jnp.bfloat16)
  y_MD = jax.random.normal(jax.random.PRNGKey(8), (rows, d), jnp.bfloat16)
  sort_idx_M = dispatch.permute(x_TD, ids_TK, groups, backend="reference")[2]
  src_M = sort_idx_M // top_k
  inv_M = dispatch._inverse_permutation(sort_idx_M)
  itemsize = 2
  perm_bytes = (tokens + rows) * d * itemsize
  out = []

  copy = jax.jit(lambda a: a + jnp.asarray(1, a.dtype))
  copy_bw = 2 * rows * d * itemsize / _bench(copy, y_MD) / 1e9
  _record(f"{shape} copy (y + 1) [M, D]", copy_bw, "GB/s")

  variants = {
      "permute rows, XLA gather": (jax.jit(lambda x, r: x[r]), (x_TD, src_M)),
      "un-permute + weights, XLA": (
          jax.jit(dispatch._combine_rows), (y_MD, inv_M, weights_TK)),
  }
  if permute_mgpu.gather_config(rows, d, jnp.bfloat16) is not None:
    variants["permute rows, Pallas"] = (jax.jit(permute_mgpu.gather_rows), (x_TD, src_M))
  if permute_mgpu.combine_config(tokens, top_k, d, jnp.bfloat16) is not None:
    variants["un-permute + weights, Pallas"] = (jax.jit(permute_mgpu.combine_rows),
                                                (y_MD, inv_M, weights_TK))
  results = {}
  for name, (f, args) in variants.items():
    try:
      results[name] = f(*args)
      bw = perm_bytes / _bench(f, *args) / 1e9
    except Exception as e:
      print(f"{shape} {name} failed: {type(e).__name__}: {str(e)[:300]}")
      continue
    _record(f"{shape} {name}", bw, "GB/s", of_copy=bw / copy_bw)
    out.append({"shape": shape, "op": name, "GB/s": bw, "of copy": bw / copy_bw})
  # Correctness in the same run: the kernels against the XLA gathers, every element.
  for a, b in (("permute rows, Pallas", "permute rows, XLA gather"),
               ("un-permute + weights, Pallas", "un-permute + weights, XLA")):
    if a in results:
      err = profiling.rel_error(np.float32(results[a]), np.float32(results[b]))
      # Gathers are exact; the weighted sums may round in another order (1 bf16 ulp here and
      # there, ~1e-5 in norm).
      good = err < 1e-4
      print(f"check {shape} {a} vs XLA rel_err={err:.2e} {'ok' if good else 'FAIL'}")
      RESULTS[f"check {shape} {a}"] = {"value": float(good), "unit": "pass"}

  # Whole ops as the MoE layer calls them (sort, counts, index maps included), forward only;
  # backend=pallas_mosaic_gpu is the Pallas gather for the permute and XLA for the un-permute.
  for backend in ("pallas_mosaic_gpu", "reference"):
    def both(x, ids, w, y, backend=backend):
      x_MD, sizes_E, sort_idx = dispatch.permute(x, ids, groups, backend=backend)
      return x_MD, dispatch.unpermute(y, sort_idx, w, backend=backend)
    f = jax.jit(both)
    seconds = _bench(f, x_TD, ids_TK, weights_TK, y_MD)
    bw = 2 * perm_bytes / seconds / 1e9
    name = f"permute+un-permute with sort, backend={backend}"
    _record(f"{shape} {name}", bw, "GB/s", of_copy=bw / copy_bw, ms=seconds * 1e3)
    out.append({"shape": shape, "op": name, "GB/s": bw, "of copy": bw / copy_bw})
  out.insert(0, {"shape": shape, "op": "copy (y + 1)", "GB/s": copy_bw, "of copy": 1.0})
  return out


def _print_permute_table(rows) -> None:
  print("\n| shape | op | GB/s | of copy |")
  print("|---|---|---|---|")
  for r in rows:
    print(f"| {r['shape']} | {r['op']} | {r['GB/s']:.0f} | {r['of copy']:.2f} |")


def _print_table(rows_table) -> None:
  print("\n| shape | groups | problem | K | N | ours best | tokamax | ours/tokamax "
        "| einsum (balanced) | ours/einsum | best tiling |")
  print("|---|---|---|---|---|---|---|---|---|---|---|")
  for r in rows_table:
    tk, es = r.get("tokamax"), r.get("einsum")
    fmt = lambda v: f"{v:.0f}" if v else "-"
    ratio = lambda a, b: f"{a / b:.2f}x" if a and b else "-"
    print(f"| {r['shape']} | {r['balance']} | {r['problem']} | {r['K']} | {r['N']} | "
          f"{fmt(r['ours best'])} | {fmt(tk)} | {ratio(r['ours best'], tk)} | {fmt(es)} | "
          f"{ratio(r['ours best'], es)} | {r.get('best spec', '-')} |")


def main(argv):
  del argv
  print(jax.__version__, jax.devices(), flush=True)
  configs = _CONFIGS.value
  print("auto backend on this machine:", gmm_lib._resolve_backend("auto"), flush=True)
  gpu_baselines, tokamax = _import_baselines() if _BASELINES.value else (None, None)
  ok = None
  if _CHECK.value:
    ok = check_correctness(configs, _WGRAD_CONFIGS.value, _SWIGLU_CONFIGS.value)
  if gpu_baselines is not None:
    try:
      if _DENSE.value:
        gpu_baselines.dense_bf16()
      RESULTS.update({f"baseline {k}": v for k, v in gpu_baselines.RESULTS.items()})
    except Exception as e:
      print("gpu_baselines failed:", type(e).__name__, str(e)[:300])
  permute_rows = []
  if _PERMUTE.value:
    for shape in _SHAPES.value:
      permute_rows += time_permute(shape)
    _print_permute_table(permute_rows)
  rows_table = time_shapes(tokamax)
  if _SUSTAINED_S.value > 0:
    time_sustained(tokamax)
  _print_table(rows_table)
  _print_permute_table(permute_rows)
  print("CORRECTNESS", "not checked" if ok is None else "PASS" if ok else "FAIL")
  _write_json(rows_table)


if __name__ == "__main__":
  app.run(main)
