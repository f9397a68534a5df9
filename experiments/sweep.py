"""Runs a scaling-law sweep (the "wind tunnel"): every budget x variant trained by the laws.

  python -m experiments.sweep --sweep_dir=workdirs/sweep --budgets=6e11,1.2e12,2.4e12 \
      --variant=moe:arch=moe --variant=dense:arch=dense --jobs=2

Each run is `python -m experiments.train --config=configs/scaling.py:budget=B,ARG` in its own
workdir, `SWEEP_DIR/runs/NAME_B`, `--jobs` at a time (on a CPU, one per core: the small models
use about one core each), smallest budget first. A variant is `NAME:ARG [FLAGS...]`: ARG is
added to the config argument (`arch=dense`, `mtp=1`, `experts=64,top_k=2`, ...), FLAGS are extra
`--config...` overrides for that variant; `--train_flag` adds overrides to every run.

Resumable: run the same command again. Runs with a line in `results.jsonl` are skipped; a run that
was killed resumes from its workdir's checkpoints. When runs finish the sweep writes, in SWEEP_DIR:
  results.jsonl       one JSON line per run (budget, compute C = M * tokens, shape, val loss, ...)
  fits.json           loss = a * C^b per variant, and each variant's efficiency leverage (EL)
                      over the `--baseline` variant: the baseline compute reaching its loss / its C
  table.md            the runs and fits as Markdown
  loss_vs_compute.png validation loss against compute, log-log, with the fitted laws
"""

import concurrent.futures
import json
import math
import os
import subprocess
import sys
import threading
import time
from typing import Any

from absl import app
from absl import flags

from ling_jax import metrics
from ling_jax import scaling

_SWEEP_DIR = flags.DEFINE_string("sweep_dir", None, "Where runs, results, table and plots go.")
_BUDGETS = flags.DEFINE_list("budgets", ["6e11", "1.2e12", "2.4e12"], "Training FLOPs per run.")
_VARIANTS = flags.DEFINE_multi_string(
    "variant", ["moe:arch=moe", "dense:arch=dense"],
    "NAME:ARG [--config.FIELD=VALUE ...]; ARG is appended to configs/scaling.py's argument.")
_BASELINE = flags.DEFINE_string("baseline", "dense", "Variant the EL of the others is taken over.")
_TRAIN_FLAGS = flags.DEFINE_multi_string("train_flag", [], "Extra flag for every training run.")
_STEPS_FRACTION = flags.DEFINE_float(
    "steps_fraction", 1.0, "Train each run for this fraction of its compute-optimal steps (1.0 "
    "follows the laws; smaller values are for smoke tests, and shrink C accordingly).")
_JOBS = flags.DEFINE_integer(
    "jobs", 1, "Runs trained at once (each a process; on a CPU, about one per spare core).")
_CONFIG_FILE = flags.DEFINE_string("config_file", "configs/scaling.py", "The budget config.")
flags.mark_flags_as_required(["sweep_dir"])

_RESULTS = "results.jsonl"
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse_variant(spec: str) -> tuple[str, str, list[str]]:
  """Returns (name, config argument suffix, extra flags) of a `NAME:ARG [FLAGS...]` spec."""
  head, *extra = spec.split()
  name, sep, arg = head.partition(":")
  if not sep or not name or "," in name or "/" in name:
    raise app.UsageError(f"--variant={spec!r}: expected NAME:ARG, e.g. dense:arch=dense")
  return name, arg, extra


def run_name(name: str, budget: float) -> str:
  return f"{name}_{budget:.3g}"


def read_results(sweep_dir: str) -> list[dict[str, Any]]:
  """Returns the records of `results.jsonl` (the last one of a run winning), in file order."""
  path = os.path.join(sweep_dir, _RESULTS)
  records: dict[str, dict[str, Any]] = {}
  if os.path.exists(path):
    with open(path) as f:
      for line in f:
        if line.strip():
          record = json.loads(line)
          records[record["run"]] = record
  return list(records.values())


def collect_result(workdir: str, name: str, budget: float, wall_s: float) -> dict[str, Any]:
  """Returns the result record of a finished run, from its `config.json` and `metrics.jsonl`."""
  with open(os.path.join(workdir, "config.json")) as f:
    config = json.load(f)
  m, t = _Namespace(config["model"]), config["train"]
  steps = metrics.read_jsonl(os.path.join(workdir, "metrics.jsonl"))
  last = steps[max(steps)]
  evals = [r for _, r in sorted(steps.items()) if "val_loss" in r]
  if not evals or max(steps) < t["num_steps"]:
    raise RuntimeError(f"{workdir} did not finish: its metrics.jsonl stops at step {max(steps)} "
                       f"of {t['num_steps']}; run the sweep again to resume it")
  tokens = t["num_steps"] * t["batch_size"] * t["seq_len"]
  flops_per_token = scaling.non_embedding_flops_per_token(m, t["seq_len"])
  dense = m.first_k_dense_replace == m.num_hidden_layers
  return {
      "run": run_name(name, budget), "variant": name, "budget": budget,
      "compute": flops_per_token * tokens, "flops_per_token": flops_per_token, "tokens": tokens,
      "hidden_size": m.hidden_size, "layers": m.num_hidden_layers, "head_dim": m.head_dim,
      "expert_width": None if dense else m.moe_intermediate_size,
      "activation_ratio": 1.0 if dense else scaling.activation_ratio(m),
      "granularity": None if dense else scaling.granularity(m),
      "attention_fraction": scaling.attention_fraction(m, t["seq_len"]),
      "learning_rate": t["learning_rate"], "batch_size": t["batch_size"],
      "num_steps": t["num_steps"], "train_loss": last.get("loss", evals[-1].get("loss")),
      "val_loss": evals[-1]["val_loss"], "val_bits_per_token": evals[-1]["val_bits_per_token"],
      "wall_s": round(wall_s, 1), "workdir": workdir,
  }


class _Namespace(dict):
  """A dict read by attribute, as the FLOP counters read a model config."""
  __getattr__ = dict.get


def run_training(arg: str, workdir: str, flags_: list[str], label: str) -> None:
  """Runs experiments.train in a subprocess, teeing its output to WORKDIR/train.log."""
  os.makedirs(workdir, exist_ok=True)
  config_file = os.path.join(_ROOT, _CONFIG_FILE.value)  # An absolute path stays as it is.
  command = [sys.executable, "-m", "experiments.train", f"--config={config_file}:{arg}",
             f"--workdir={workdir}", *flags_]
  with open(os.path.join(workdir, "train.log"), "a") as log, subprocess.Popen(
      command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=_ROOT) as child:
    for line in child.stdout:
      log.write(line)
      log.flush()
      print(f"  [{label}] {line.rstrip()}", flush=True)
  if child.returncode:
    raise RuntimeError(f"training {label} failed (exit {child.returncode}); see "
                       f"{os.path.join(workdir, 'train.log')}. Run the sweep again to resume.")


def fit_results(results: list[dict[str, Any]], baseline: str) -> dict[str, Any]:
  """Returns loss-vs-compute fits per variant and each variant's EL over `baseline`."""
  by_variant: dict[str, list[dict[str, Any]]] = {}
  for r in results:
    by_variant.setdefault(r["variant"], []).append(r)
  fits: dict[str, Any] = {}
  for name, runs in by_variant.items():
    runs = sorted(runs, key=lambda r: r["compute"])
    if len({r["compute"] for r in runs}) < 2:
      continue
    law = scaling.fit_power_law([r["compute"] for r in runs], [r["val_loss"] for r in runs])
    fits[name] = {"coef": law.coef, "exponent": law.exponent, "r2": law.r2,
                  "compute": [r["compute"] for r in runs]}
  base = fits.get(baseline)
  for name, fit in fits.items():
    if name == baseline or base is None:
      continue
    # EL needs a baseline whose loss falls with compute; otherwise its inverse is meaningless.
    if base["exponent"] >= 0 or fit["exponent"] >= 0:
      fit["el"] = None
      fit["el_note"] = "loss does not fall with compute in this sweep; EL undefined"
      continue
    base_law = scaling.PowerLaw(base["coef"], base["exponent"], base["r2"])
    law = scaling.PowerLaw(fit["coef"], fit["exponent"], fit["r2"])
    fit["el"] = {f"{c:.3g}": float(scaling.fitted_efficiency_leverage(law, base_law, c))
                 for c in fit["compute"]}
  return {"baseline": baseline, "fits": fits}


def write_table(sweep_dir: str, results: list[dict[str, Any]], fitted: dict[str, Any]) -> str:
  """Writes `table.md` (runs, then fits) and returns its path."""
  lines = ["| variant | budget | C (FLOPs) | hidden x layers | head dim | A | G | attn | "
           "M (FLOPs/tok) | "
           "tokens | lr | batch | steps | val loss | bits/token | wall (s) |",
           "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
  for r in sorted(results, key=lambda r: (r["variant"], r["compute"])):
    g = f"{r['granularity']:.0f}" if r["granularity"] else "-"
    lines.append(
        f"| {r['variant']} | {r['budget']:.3g} | {r['compute']:.3g} | {r['hidden_size']} x "
        f"{r['layers']} | {r.get('head_dim', '?')} | {100 * r['activation_ratio']:.1f}% | {g} | "
        f"{100 * r['attention_fraction']:.0f}% | {r['flops_per_token']:.3g} | {r['tokens']:.3g} | "
        f"{r['learning_rate']:.3g} | {r['batch_size']} | {r['num_steps']} | "
        f"{r['val_loss']:.4f} | {r['val_bits_per_token']:.3f} | {r['wall_s']:.0f} |")
  lines += ["", f"Fits: val loss = a * C^b; EL over `{fitted['baseline']}` = its compute at the "
            "variant's fitted loss / the variant's compute.", "",
            "| variant | a | b | R^2 (log-log) | EL at each C |", "|---|---:|---:|---:|---|"]
  for name, fit in fitted["fits"].items():
    if name == fitted["baseline"]:
      el = "(baseline)"
    elif fit.get("el"):
      el = ", ".join(f"{v:.2f}x at {c}" for c, v in fit["el"].items())
    else:
      el = fit.get("el_note", "no baseline fit")
    lines.append(f"| {name} | {fit['coef']:.4g} | {fit['exponent']:.4f} | {fit['r2']:.3f} | "
                 f"{el} |")
  path = os.path.join(sweep_dir, "table.md")
  with open(path, "w") as f:
    f.write("\n".join(lines) + "\n")
  return path


def write_plot(sweep_dir: str, results: list[dict[str, Any]], fitted: dict[str, Any]) -> str:
  """Plots validation loss against compute (log-log) with the fits; returns the PNG path."""
  import matplotlib  # Only the sweep's last step needs it.
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  import numpy as np

  fig, ax = plt.subplots(figsize=(6, 4.5))
  for name in sorted({r["variant"] for r in results}):
    runs = sorted((r for r in results if r["variant"] == name), key=lambda r: r["compute"])
    points = ax.loglog([r["compute"] for r in runs], [r["val_loss"] for r in runs], "o",
                       label=name)
    fit = fitted["fits"].get(name)
    if fit:
      c = np.geomspace(min(fit["compute"]) / 1.5, max(fit["compute"]) * 1.5, 50)
      ax.loglog(c, fit["coef"] * c**fit["exponent"], "-", color=points[0].get_color(),
                label=f"{name}: {fit['coef']:.3g} C^{fit['exponent']:.3f}")
  ax.set_xlabel("training compute C = M x tokens (FLOPs)")
  ax.set_ylabel("validation loss (nats/token)")
  ax.set_title("Loss against compute")
  ax.grid(True, which="both", alpha=0.3)
  ax.legend(fontsize=8)
  path = os.path.join(sweep_dir, "loss_vs_compute.png")
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path


def summarize(sweep_dir: str, baseline: str) -> dict[str, Any]:
  """Fits the results in `sweep_dir` and writes fits.json, table.md and the plot."""
  results = read_results(sweep_dir)
  fitted = fit_results(results, baseline)
  with open(os.path.join(sweep_dir, "fits.json"), "w") as f:
    json.dump(fitted, f, indent=2)
  table = write_table(sweep_dir, results, fitted)
  plot = write_plot(sweep_dir, results, fitted)
  metrics.log("Wrote %s and %s", table, plot)
  for name, fit in fitted["fits"].items():
    el = ""
    if fit.get("el"):
      el = f", EL over {baseline}: " + ", ".join(f"{v:.2f}x" for v in fit["el"].values())
    metrics.log("%s: val loss = %.4g * C^%.4f (R^2 %.3f)%s", name, fit["coef"],
                fit["exponent"], fit["r2"], el)
  return fitted


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  metrics.setup_console()
  sweep_dir = os.path.abspath(_SWEEP_DIR.value)  # Orbax wants absolute checkpoint paths.
  try:
    budgets = sorted(float(b) for b in _BUDGETS.value)
  except ValueError:
    raise app.UsageError(f"--budgets={','.join(_BUDGETS.value)}: expected numbers, e.g. "
                         "--budgets=6e11,1.2e12") from None
  variants = [parse_variant(v) for v in _VARIANTS.value]
  if len({v[0] for v in variants}) < len(variants):
    raise app.UsageError("--variant: two variants share a name")
  if not 0 < _STEPS_FRACTION.value <= 1:
    raise app.UsageError(f"--steps_fraction={_STEPS_FRACTION.value}: expected a value in (0, 1]")
  if _JOBS.value < 1:
    raise app.UsageError(f"--jobs={_JOBS.value}: expected at least 1")
  os.makedirs(sweep_dir, exist_ok=True)
  done = {r["run"] for r in read_results(sweep_dir)}
  grid = [(name, arg, extra, b) for b in budgets for name, arg, extra in variants]
  start, finished, lock = time.time(), [], threading.Lock()

  def train(i: int, name: str, arg: str, extra: list[str], budget: float) -> None:
    label = run_name(name, budget)
    config_arg = ",".join(filter(None, [f"budget={budget:g}", arg]))
    flags_ = [*_TRAIN_FLAGS.value, *extra]
    if _STEPS_FRACTION.value < 1:
      flags_.append(f"--config.train.num_steps={_scaled_steps(config_arg)}")
    metrics.log("[%d/%d] %s: training configs/scaling.py:%s", i, len(grid), label, config_arg)
    workdir = os.path.join(sweep_dir, "runs", label)
    run_start = time.time()
    run_training(config_arg, workdir, flags_, label)
    result = collect_result(workdir, name, budget, time.time() - run_start)
    with lock:
      with open(os.path.join(sweep_dir, _RESULTS), "a") as f:
        f.write(json.dumps(result) + "\n")
      finished.append(label)
    metrics.log("[%d/%d] %s: val loss %.4f at C = %.3g FLOPs, %.0f s (%d of this session's "
                "runs done, %s in)", i, len(grid), label, result["val_loss"], result["compute"],
                result["wall_s"], len(finished), metrics.format_duration(time.time() - start))

  todo = []
  for i, (name, arg, extra, budget) in enumerate(grid, 1):
    if run_name(name, budget) in done:
      metrics.log("[%d/%d] %s: finished earlier, skipped", i, len(grid), run_name(name, budget))
    else:
      todo.append((i, name, arg, extra, budget))
  # Runs are independent processes; with --jobs > 1 they share the machine's cores.
  with concurrent.futures.ThreadPoolExecutor(_JOBS.value) as pool:
    futures = [pool.submit(train, *item) for item in todo]
    for future in futures:
      future.result()  # Re-raises a failed run's error once the others have finished.
  metrics.log("Sweep of %d runs done (%d trained now, %s)", len(grid), len(finished),
              metrics.format_duration(time.time() - start))
  summarize(sweep_dir, _BASELINE.value)


def _scaled_steps(config_arg: str) -> int:
  """Returns the derived step count of a run times --steps_fraction (at least 1)."""
  from configs import scaling as scaling_config  # The config file itself, for its derivation.
  steps = scaling_config.get_config(config_arg).train.num_steps
  return max(1, math.ceil(steps * _STEPS_FRACTION.value))


if __name__ == "__main__":
  app.run(main)
