"""Step-time breakdowns from `jax.profiler` traces.

A trace records how long each compiled op (an HLO instruction: a fusion, a cuBLAS/cuDNN call,
a Pallas kernel) ran on the device. The compiled HLO's metadata gives each instruction the JAX
name stack it came from (`op_name`, e.g. `jit(train_step)/transpose(jvp(Ling2))/moe_layers/mlp/
experts/...`): Flax module names and `jax.named_scope`s. `CATEGORIES` maps those names to the
parts of a training step, so a profile of a few steps reads as "MoE experts 41%, attention 22%..."

  hlo_text = jitted.lower(*args).compile().as_text()
  with trace(directory):
    ...run steps...
  summary = breakdown(find_trace(directory), hlo_text, steps=3)
"""

import collections
import contextlib
import glob
import gzip
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from typing import Any

import jax
import numpy as np

from ling_jax import config as config_lib

# (category, scope names of which one must be in the name stack, a second name that must be
# there too or None), first match wins; a name ending in "*" is a prefix. The scopes are Flax
# module names (attention, mlp, shared_experts, lm_head, embed, mtp_*, dense_layers) and
# `jax.named_scope`s in the code: `router` (ling_jax/moe.py), `experts` and `all_to_all`
# (ling_jax/expert_parallel.py), `dispatch` (kernels/dispatch.py), `attention_core`
# (ling_jax/attention.py), `optimizer` and `cross_entropy` (ling_jax/train.py).
CATEGORIES = (
    ("optimizer", ("optimizer",), None),
    ("router", ("router",), None),
    ("moe_dispatch", ("dispatch", "all_to_all"), None),
    ("moe_experts", ("experts",), None),
    ("shared_expert", ("shared_experts",), None),
    ("attention_core", ("attention_core",), None),
    ("attention_proj", ("attention",), None),
    ("dense_ffn", ("mlp",), "dense_layers"),
    ("moe_other", ("mlp",), None),
    ("lm_head_loss", ("lm_head", "embed", "cross_entropy", "final_norm"), None),
    ("mtp_other", ("mtp_*",), None),
)
OTHER = "other"

_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=")
_OP_NAME = re.compile(r'op_name="([^"]*)"')


def _has(scopes: set[str], name: str) -> bool:
  if name.endswith("*"):
    return any(s.startswith(name[:-1]) for s in scopes)
  return name in scopes


def categorize(op_name: str) -> str:
  """Returns the step-part category of a JAX name stack (see `CATEGORIES`).

  Transformations wrap scope names (`transpose(jvp(dispatch))`), so the stack is split at
  slashes and parentheses into plain names first.
  """
  scopes = set(re.split(r"[/()]", op_name))
  for category, any_of, also in CATEGORIES:
    if any(_has(scopes, name) for name in any_of) and (also is None or also in scopes):
      return category
  return OTHER


def op_kind(op: str, op_name: str) -> str:
  """What kind of work an HLO instruction is: the innermost jitted function in its name stack
  other than the step itself (`jit(gmm_fp8)`, `jit(quantize)`: our kernels and their wrappers),
  else the instruction's own kind (`input_transpose_fusion`, `custom-call`) without its number.
  """
  inner = re.findall(r"jit\((\w+)\)", op_name)[1:]
  if inner:
    return f"jit({inner[-1]})"
  return re.sub(r"\.\d+$", "", op)


def instruction_names(hlo_text: str) -> dict[str, str]:
  """Returns {HLO instruction name: its op_name metadata} for every instruction of the module."""
  names = {}
  for line in hlo_text.splitlines():
    match = _INSTRUCTION.match(line)
    if match:
      op_name = _OP_NAME.search(line)
      names[match.group(1)] = op_name.group(1) if op_name else ""
  return names


def module_name(hlo_text: str) -> str:
  """Returns the HLO module's name, as the profiler reports it (`hlo_module`)."""
  match = re.search(r"^HloModule\s+([\w.\-]+)", hlo_text, re.M)
  if not match:
    raise ValueError("hlo_text: no `HloModule` line. Fix: pass `compiled.as_text()`.")
  return match.group(1)


@contextlib.contextmanager
def trace(directory: str) -> Iterator[None]:
  """Records a profile (with a Perfetto JSON copy, which `breakdown` reads) into `directory`."""
  jax.profiler.start_trace(directory, create_perfetto_trace=True)
  try:
    yield
  finally:
    jax.profiler.stop_trace()


def find_trace(directory: str) -> str:
  """Returns the newest Perfetto trace written under `directory` by `trace`."""
  paths = glob.glob(os.path.join(directory, "**", "perfetto_trace.json.gz"), recursive=True)
  if not paths:
    raise FileNotFoundError(f"No perfetto_trace.json.gz under {directory}. Fix: record with "
                            "ling_jax.profiling.trace (create_perfetto_trace=True).")
  return max(paths, key=os.path.getmtime)


def _load_events(trace_path: str) -> list[dict[str, Any]]:
  with gzip.open(trace_path, "rt") as f:
    data = json.load(f)
  return data["traceEvents"] if isinstance(data, dict) else data


# Control flow whose events span the ops inside them: counting both would count twice.
_CONTAINER = re.compile(r"^(while|conditional|call)(\.\d+)?$")


def op_times(trace_path: str, module: str) -> dict[str, float]:
  """Returns {HLO instruction: summed device time in microseconds} for ops of `module`.

  On GPUs only the device streams count (the host-side launch events carry the same names); on
  CPU, where ops run on host threads, every thread counts. Loops and calls are left out, since
  their events contain those of the ops they run.
  """
  events = _load_events(trace_path)
  process_names = {e["pid"]: e.get("args", {}).get("name", "") for e in events
                   if e.get("ph") == "M" and e.get("name") == "process_name"}
  devices = {pid for pid, name in process_names.items() if name.startswith("/device:")}
  times: dict[str, float] = collections.defaultdict(float)
  for event in events:
    args = event.get("args") or {}
    if event.get("ph") != "X" or "hlo_op" not in args or _CONTAINER.match(args["hlo_op"]):
      continue
    if devices and event.get("pid") not in devices:
      continue
    if not str(args.get("hlo_module", "")).startswith(module):
      continue
    times[args["hlo_op"]] += float(event.get("dur", 0.0))
  return dict(times)


def breakdown(trace_path: str, hlo_text: str, steps: int, top: int = 25) -> dict[str, Any]:
  """Returns the per-step device time of each category of a profiled program.

  `steps` is how many calls of the program the trace holds. The result holds `ms_per_step` and
  `share` per category, each category's `kinds` (ms per step by `op_kind`), the summed
  `device_ms_per_step`, and the `top` costliest `top_ops`.
  """
  if steps <= 0:
    raise ValueError(f"steps: must be positive, got {steps}. Fix: pass the profiled step count.")
  names = instruction_names(hlo_text)
  times = op_times(trace_path, module_name(hlo_text))
  if not times:
    raise ValueError(f"{trace_path} holds no op of module {module_name(hlo_text)!r}. Fix: "
                     "profile calls of the same compiled program whose HLO you passed.")
  per_category: dict[str, float] = collections.defaultdict(float)
  per_kind: dict[str, dict[str, float]] = collections.defaultdict(
      lambda: collections.defaultdict(float))
  for op, micros in times.items():
    category = categorize(names.get(op, ""))
    per_category[category] += micros
    per_kind[category][op_kind(op, names.get(op, ""))] += micros
  total = sum(per_category.values())
  ordered = sorted(per_category.items(), key=lambda kv: -kv[1])
  return {
      "device_ms_per_step": total / steps / 1e3,
      "ms_per_step": {k: v / steps / 1e3 for k, v in ordered},
      "share": {k: v / total for k, v in ordered},
      # Per part, its time by op kind (`op_kind`), largest first.
      "kinds": {k: {kind: v / steps / 1e3
                    for kind, v in sorted(per_kind[k].items(), key=lambda kv: -kv[1])}
                for k, _ in ordered},
      "top_ops": [{"op": op, "ms_per_step": micros / steps / 1e3,
                   "category": categorize(names.get(op, "")), "op_name": names.get(op, "")}
                  for op, micros in sorted(times.items(), key=lambda kv: -kv[1])[:top]],
  }


def format_breakdown(summary: dict[str, Any], step_ms: float | None = None) -> str:
  """Returns the breakdown as a small text table (ms per step and share of device time)."""
  lines = [f"{'part':<16} {'ms/step':>9} {'share':>7}"]
  for category, ms in summary["ms_per_step"].items():
    lines.append(f"{category:<16} {ms:9.2f} {summary['share'][category]:7.1%}")
  lines.append(f"{'device total':<16} {summary['device_ms_per_step']:9.2f}")
  if step_ms:
    lines.append(f"{'wall step':<16} {step_ms:9.2f}  (device busy "
                 f"{summary['device_ms_per_step'] / step_ms:.0%} of the wall time)")
  return "\n".join(lines)


def failure_rows(failures: list[tuple[str, BaseException]]) -> list[str]:
  """Markdown lines naming each benchmark variant that raised, with its error's first line (the
  log has the traceback), so that a summary table never reads as if they had not been asked for."""
  if not failures:
    return []
  lines = ["", "Variants that failed (tracebacks in the log):", "", "| variant | error |",
           "|---|---|"]
  for name, error in failures:
    first = (str(error).strip().splitlines() or [""])[0][:200].replace("|", "\\|")
    lines.append(f"| {name} | {type(error).__name__}: {first} |")
  return lines


def parse_variant(spec: str, model: Any) -> tuple[str, dict[str, Any]]:
  """Splits a `--quants` entry, `quant[+field=value...]`, into the quant and model overrides.

  Each value is converted to the type of `model`'s field (`true`/`false` for booleans); an
  unknown field or a value of the wrong type is a `config_lib.ConfigError` naming the entry.
  For `experiments/bench_train.py`'s control runs, e.g. none+embedding_backward=scatter: the
  same maths as none, other rounding.
  """
  quant, *pairs = spec.split("+")
  overrides = {}
  for pair in pairs:
    field, sep, text = pair.partition("=")
    if not sep or field not in model:
      raise config_lib.ConfigError(
          f"--quants={spec}: {pair!r} is not field=value for a field of config.model. Fix: "
          "write e.g. none+embedding_backward=scatter")
    current = model[field]
    try:
      if isinstance(current, bool):
        if text.lower() not in ("true", "false"):
          raise ValueError(text)
        value = text.lower() == "true"
      else:
        value = type(current)(text) if current is not None else text
    except ValueError:
      raise config_lib.ConfigError(
          f"--quants={spec}: {field}={text!r} is not a {type(current).__name__}. Fix: give "
          f"{field} a value like {current!r}") from None
    overrides[field] = value
  return quant, overrides


def _variant(row: dict[str, Any]) -> str:
  """A bench_train row's variant (its --quants entry); rows from before variants: the quant."""
  return row.get("variant", row["quant"])


def project_to_depth(results: list[dict[str, Any]], full_depth: int,
                     peak_tflops: float) -> list[dict[str, Any]]:
  """Fits step time = a + b * layers per variant; returns the projections to `full_depth` layers.

  `results` are `experiments/bench_train.py`'s rows (variant or else quant, layers, step_ms,
  batch, seq_len, flops_per_token, and `_full_flops_ratio`: FLOPs per token at full depth over
  this row's). A variant timed at fewer than two depths gets no projection. MFU is over
  `peak_tflops` per device.
  """
  projections = []
  for variant in dict.fromkeys(map(_variant, results)):
    rows = [r for r in results if _variant(r) == variant]
    if len({r["layers"] for r in rows}) < 2:
      continue
    slope, intercept = np.polyfit([r["layers"] for r in rows], [r["step_ms"] for r in rows], 1)
    ref = rows[0]
    flops_full = ref["flops_per_token"] * ref["_full_flops_ratio"]
    step_ms = intercept + slope * full_depth
    tokens_per_s = ref["batch"] * ref["seq_len"] / (step_ms / 1e3)
    projections.append({"quant": variant, "layers": full_depth, "ms_per_layer": slope,
                        "fixed_ms": intercept, "step_ms": step_ms,
                        "tokens_per_s": tokens_per_s,
                        "mfu": flops_full * tokens_per_s / (peak_tflops * 1e12)})
  return projections


def _window_means(losses: list[float], steps: int, window: int) -> np.ndarray:
  """The mean of each `window` steps of the first `steps` losses (a multiple of window)."""
  return np.asarray(losses[:steps], np.float64).reshape(-1, window).mean(axis=1)


def compare_losses(results: list[dict[str, Any]], window: int,
                   tolerance: float) -> list[dict[str, Any]]:
  """Compares each variant's loss curve with the first variant's at the same depth.

  `results` are `experiments/bench_train.py`'s rows (name, variant or else quant, layers,
  losses: every step's loss from the first, all variants on the same batches). The curves are
  cut to the steps both ran and averaged over `window` steps (one step's loss on one batch is
  noisy); they overlap when no window mean differs from the baseline's by more than
  `tolerance`, relative.
  """
  if window < 1:
    raise ValueError(f"window={window}: average over at least one step (e.g. 20)")
  comparisons = []
  for layers in dict.fromkeys(r["layers"] for r in results):
    rows = [r for r in results if r["layers"] == layers]
    for row in rows[1:]:
      base = rows[0]
      steps = min(len(base["losses"]), len(row["losses"])) // window * window
      if _variant(row) == _variant(base) or steps == 0:
        continue
      ref = _window_means(base["losses"], steps, window)
      ours = _window_means(row["losses"], steps, window)
      gaps = (ours - ref) / ref
      windows = [{"first": i * window, "last": (i + 1) * window - 1, "baseline": float(b),
                  "loss": float(o), "rel_gap": float(g)}
                 for i, (b, o, g) in enumerate(zip(ref, ours, gaps))]
      worst = float(gaps[np.argmax(np.abs(gaps))])
      comparisons.append({"name": row["name"], "baseline": base["name"], "window": window,
                          "steps": steps, "windows": windows, "max_rel_gap": worst,
                          "tolerance": tolerance, "overlap": abs(worst) <= tolerance})
  return comparisons


def safeguard_rows(results: list[dict[str, Any]]) -> list[str]:
  """Markdown rows of the FP8 variants' safeguard metrics (bench_train's `fp8_metrics`: every
  measured step's `fp8_{kind}_{underflow,cos}[_max|_min]`): per variant and kind, the mean over
  steps of the mean over ops, and the worst op's worst step. [] without FP8 variants."""
  lines = []
  for r in results:
    steps = r.get("fp8_metrics") or []
    for kind in ("act", "weight", "grad"):
      if not steps or f"fp8_{kind}_underflow" not in steps[0]:
        continue
      under = np.mean([x[f"fp8_{kind}_underflow"] for x in steps])
      cos = np.mean([x[f"fp8_{kind}_cos"] for x in steps])
      worst_under = max(x[f"fp8_{kind}_underflow_max"] for x in steps)
      worst_cos = min(x[f"fp8_{kind}_cos_min"] for x in steps)
      lines.append(f"| {r['name']} | {len(steps)} | {kind} | {under:.3%} [{worst_under:.3%}] "
                   f"| {cos:.5f} [{worst_cos:.5f}] |")
  if not lines:
    return []
  return ["", "FP8 safeguards over the steps that measure them (every log_every-th): the mean "
          "over ops, in brackets the worst op's worst step:", "",
          "| variant | steps | kind | underflow | cosine |", "|---|---:|---|---:|---:|", *lines]


def loss_bands(results: list[dict[str, Any]], baseline: str | None, window: int,
               tolerance: float, span: tuple[int, int | None] = (0, None)) -> list[dict[str, Any]]:
  """Compares each variant's loss curves with the band the baseline's own runs span.

  Two runs of one GPU step in two processes are not bitwise equal, and at Ling-mini width the
  difference grows into curves 2-4% apart within 100 steps (BENCHMARKS.md, sessions 9 and 24),
  so one pair's gap says little. `results` are `experiments/bench_train.py` rows from several
  processes (name, variant or else quant, layers, losses, input_digest), each variant run once or
  more. Per depth and `window`-step window: the baseline variant's runs give a band (their
  lowest and highest window mean) and a mean; another variant's window mean (over its runs)
  overlaps when it lies inside the band widened by `tolerance`, relative. With one baseline run
  the band is that run and the test is `compare_losses`'s. `baseline` names the variant (None:
  the first row's). Runs are cut to the steps all of a depth's runs reached.

  A window's band is as wide as its most wayward baseline run, and one loss spike widens it for
  20 steps. So each comparison also gives every run's mean loss over the steps `span` [first,
  last) (`last` None: all compared steps; `first` past the early fall, where the runs have not
  yet drifted apart): `baseline_span_means`, `span_means`, each run's `span_gaps` to the
  baseline runs' mean, and `runs_above`, how many of the variant's runs lie above every
  baseline run; `span_gap`, the variant runs' mean against the baseline runs' mean, with
  `span_gap_se`, its standard error (Welch's, both sides' sample variances; None unless each
  side has two runs or more).
  """
  if window < 1:
    raise ValueError(f"window={window}: average over at least one step (e.g. 20)")
  first, last = span
  shown = f"span={first}:{'' if last is None else last}"  # as --span spells it
  if first < 0 or (last is not None and last <= first):
    raise ValueError(f"{shown}: give steps FIRST:LAST with 0 <= FIRST < LAST (e.g. 40:120), "
                     "or FIRST: for every compared step")
  if not results:
    raise ValueError("no runs to compare: give bench_train results.jsonl files with rows")
  baseline = baseline or _variant(results[0])
  if not any(_variant(r) == baseline for r in results):
    found = sorted({_variant(r) for r in results})
    raise ValueError(f"baseline={baseline!r}: no run of that variant; the runs are {found}")
  bands = []
  for layers in dict.fromkeys(r["layers"] for r in results):
    rows = [r for r in results if r["layers"] == layers]
    digests = {r.get("input_digest") for r in rows}
    if len(digests) > 1:
      raise ValueError(f"{layers} layers: the runs saw different batches (input digests "
                       f"{sorted(map(str, digests))}); compare runs of one config, seed and data")
    steps = min(len(r["losses"]) for r in rows) // window * window
    base = [r for r in rows if _variant(r) == baseline]
    if not base or steps == 0:
      continue
    stop = steps if last is None else last
    if stop > steps or first >= stop:
      raise ValueError(f"{shown}: these runs compare steps 0-{steps - 1} ({layers} layers); "
                       "give a span inside them")
    base_span = [float(np.mean(r["losses"][first:stop])) for r in base]
    ref = np.stack([_window_means(r["losses"], steps, window) for r in base])
    lo, hi, mid = ref.min(axis=0), ref.max(axis=0), ref.mean(axis=0)
    for variant in dict.fromkeys(_variant(r) for r in rows):
      if variant == baseline:
        continue
      runs = [r for r in rows if _variant(r) == variant]
      ours = np.stack([_window_means(r["losses"], steps, window) for r in runs])
      mean = ours.mean(axis=0)
      span_means = [float(np.mean(r["losses"][first:stop])) for r in runs]
      inside = (mean >= lo * (1 - tolerance)) & (mean <= hi * (1 + tolerance))
      windows = [{"first": i * window, "last": (i + 1) * window - 1,
                  "band": (float(lo[i]), float(hi[i])), "baseline": float(mid[i]),
                  "runs": ours[:, i].tolist(), "loss": float(mean[i]),
                  "rel_gap": float((mean[i] - mid[i]) / mid[i]), "inside": bool(inside[i])}
                 for i in range(len(mid))]
      bands.append({"variant": variant, "baseline": baseline, "layers": layers,
                    "baseline_runs": len(base), "runs": len(runs), "window": window,
                    "steps": steps, "windows": windows, "tolerance": tolerance,
                    "baseline_spread": float(((hi - lo) / mid).max()),
                    "mean_rel_gap": float(np.mean([w["rel_gap"] for w in windows])),
                    "overlap": bool(inside.all()), "span": (first, stop),
                    "baseline_span_means": base_span, "span_means": span_means,
                    "span_gaps": [x / np.mean(base_span) - 1 for x in span_means],
                    "runs_above": sum(x > max(base_span) for x in span_means),
                    "span_gap": float(np.mean(span_means) / np.mean(base_span) - 1),
                    "span_gap_se": _gap_se(base_span, span_means)})
  return bands


def _gap_se(base: list[float], ours: list[float]) -> float | None:
  """The standard error of mean(ours) - mean(base), relative to mean(base) (Welch's)."""
  if min(len(base), len(ours)) < 2:
    return None
  var = np.var(base, ddof=1) / len(base) + np.var(ours, ddof=1) / len(ours)
  return float(np.sqrt(var) / np.mean(base))


def format_bands(bands: list[dict[str, Any]]) -> str:
  """Returns `loss_bands`' comparisons as Markdown: per comparison a verdict line, a table of
  window means, and each run's mean over the span."""
  lines = []
  for b in bands:
    verdict = "overlap" if b["overlap"] else "do NOT overlap"
    lines += [f"{b['variant']} ({b['runs']} run(s)) against {b['baseline']} ({b['baseline_runs']} "
              f"run(s)), {b['layers']} layers, {b['window']}-step means over {b['steps']} steps: "
              f"the curves {verdict} (band widened by {b['tolerance']:.0%}); mean gap to the "
              f"baseline's mean {b['mean_rel_gap']:+.2%}; the baseline's own spread up to "
              f"{b['baseline_spread']:.2%}.", "",
              f"| steps | {b['baseline']}: mean [band] | {b['variant']}: runs | mean | gap | "
              "inside |", "|---|---|---|---:|---:|---|"]
    for w in b["windows"]:
      runs = ", ".join(f"{x:.4f}" for x in w["runs"])
      lines.append(f"| {w['first']}-{w['last']} | {w['baseline']:.4f} [{w['band'][0]:.4f}, "
                   f"{w['band'][1]:.4f}] | {runs} | {w['loss']:.4f} | {w['rel_gap']:+.2%} | "
                   f"{'yes' if w['inside'] else 'NO'} |")
    first, stop = b["span"]
    base = ", ".join(f"{x:.4f}" for x in b["baseline_span_means"])
    ours = ", ".join(f"{x:.4f} ({g:+.2%})" for x, g in zip(b["span_means"], b["span_gaps"]))
    lines += ["", f"Each run's mean loss over steps {first}-{stop - 1}: {b['baseline']} {base}; "
              f"{b['variant']} {ours} against the {b['baseline']} runs' mean; "
              f"{b['runs_above']} of {b['runs']} above every {b['baseline']} run. Their mean "
              f"{b['span_gap']:+.2%}" + ("" if b["span_gap_se"] is None else
                                         f" (standard error {b['span_gap_se']:.2%})") + ".", ""]
  return "\n".join(lines)


def rel_error(out: Any, ref: Any) -> float:
  """The relative Frobenius error |out - ref| / |ref| in float64, as the GPU checks print it."""
  out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
  return float(np.linalg.norm(out - ref) / max(np.linalg.norm(ref), 1e-30))


def worst_row_error(out: Any, ref: Any) -> float:
  """The largest relative error of one row (the last axis) of `out` against `ref`, in float64.

  A kernel that gets a few rows wrong (a misplaced store, one tile's bad scale) moves the
  Frobenius error of a large output by little, and this by ~1. A row that `ref` has all zero
  (a padding row) is measured against the mean row's norm, so that garbage there counts too.
  """
  out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
  out, ref = out.reshape(-1, out.shape[-1]), ref.reshape(-1, ref.shape[-1])
  ref_norm = np.linalg.norm(ref, axis=1)
  mean_norm = max(float(np.sqrt(np.mean(ref_norm ** 2))), 1e-30)
  err = np.linalg.norm(out - ref, axis=1) / np.where(ref_norm > 0, ref_norm, mean_norm)
  return float(err.max(initial=0.0))


def time_queued(fn: Any, *args: Any, calls: int = 20, warmup: int = 3) -> float:
  """Returns seconds per call of `fn(*args)`: `calls` calls queued back to back and synchronised
  once, the median of 3 such batches, after `warmup` synchronised calls.

  Queued calls time the device alone, as a training step sees its kernels; synchronising after
  every call would add the host round trip to each (tens to hundreds of microseconds).
  """
  for _ in range(warmup):
    jax.block_until_ready(fn(*args))
  batches = []
  for _ in range(3):
    start = time.perf_counter()
    for _ in range(calls):
      out = fn(*args)
    jax.block_until_ready(out)  # One stream: the last call done means all are.
    batches.append((time.perf_counter() - start) / calls)
  return float(np.median(batches))


def sustained_rates(fn: Any, *args: Any, seconds: float, idle_s: float = 2.0,
                    calls: int = 10) -> tuple[float, float, list[float]]:
  """Calls per second of `fn(*args)` in batches of `calls` queued calls, back to back for
  `seconds` after `idle_s` idle (compiled first). Returns the wall-clock window (time.time()
  at its start and end) and each batch's rate.

  `time_queued`'s batches take milliseconds after an idle gap, when the GPU's clocks are still
  high; a long stream (a training step) runs at what the board's power limit allows. The
  window lets `GpuSampler.window` pick out the clock and power samples of the stream.
  """
  jax.block_until_ready(fn(*args))
  time.sleep(idle_s)
  rates, start = [], time.time()
  while time.time() - start < seconds:
    begin = time.perf_counter()
    for _ in range(calls):
      out = fn(*args)
    jax.block_until_ready(out)
    rates.append(calls / (time.perf_counter() - begin))
  return start, time.time(), rates


_SMI_QUERY = "timestamp,clocks.sm,power.draw,clocks_throttle_reasons.active"


def parse_smi_samples(lines: list[str]) -> list[tuple[float, float, float, str]]:
  """(time.time() seconds, SM clock MHz, board power W, throttle reasons) per line of
  `nvidia-smi --query-gpu=<_SMI_QUERY> --format=csv,noheader,nounits`; the timestamp is local
  time. Lines that do not parse (a "[N/A]" field, a cut last line) are skipped."""
  samples = []
  for line in lines:
    fields = [f.strip() for f in line.split(",")]
    if len(fields) != 4:
      continue
    try:
      stamp = time.mktime(time.strptime(fields[0].split(".")[0], "%Y/%m/%d %H:%M:%S"))
      fraction = float("0." + fields[0].split(".")[1]) if "." in fields[0] else 0.0
      samples.append((stamp + fraction, float(fields[1]), float(fields[2]), fields[3]))
    except ValueError:
      continue
  return samples


def smi_window(samples: list[tuple[float, float, float, str]], start: float, end: float,
               settle_s: float = 1.0) -> dict[str, Any] | None:
  """Median SM clock and board power of the samples in [start + settle_s, end] (the board's
  power reading is an average over about a second), with the throttle reasons seen; None if no
  sample falls there."""
  inside = [s for s in samples if start + settle_s <= s[0] <= end]
  if not inside:
    return None
  return {"clock_mhz": float(np.median([s[1] for s in inside])),
          "power_w": float(np.median([s[2] for s in inside])),
          "throttle": sorted({s[3] for s in inside}), "samples": len(inside)}


class GpuSampler:
  """`nvidia-smi` sampling the SM clock, board power and throttle reasons every `period_ms`
  while in use (a no-op where nvidia-smi is missing: `available` says which).

    with GpuSampler() as smi:
      start, end, rates = sustained_rates(f, x, seconds=4)
    print(smi.window(start, end))  # inside the block or after it
  """

  def __init__(self, period_ms: int = 100):
    self.period_ms = period_ms
    self.available = shutil.which("nvidia-smi") is not None
    self._proc = self._path = None
    self._lines: list[str] = []  # the samples, once the sampling has stopped

  def __enter__(self) -> "GpuSampler":
    if self.available:
      fd, self._path = tempfile.mkstemp(suffix=".csv")
      with os.fdopen(fd, "w") as out:  # the child keeps its own copy of the descriptor
        self._proc = subprocess.Popen(
            ["nvidia-smi", f"--query-gpu={_SMI_QUERY}", "--format=csv,noheader,nounits",
             f"--loop-ms={self.period_ms}"], stdout=out, stderr=subprocess.DEVNULL)
    return self

  def _read(self) -> list[str]:
    if self._path is None:
      return self._lines
    with open(self._path) as f:  # through a descriptor of our own, not the child's
      return f.read().splitlines()

  def window(self, start: float, end: float) -> dict[str, Any] | None:
    """`smi_window` of the samples so far (None without nvidia-smi)."""
    return smi_window(parse_smi_samples(self._read()), start, end) if self.available else None

  def __exit__(self, *exc) -> None:
    if self._proc is not None:
      self._proc.terminate()
      self._proc.wait()
    if self._path is not None:
      self._lines = self._read()
      os.remove(self._path)
      self._path = None
