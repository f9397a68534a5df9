"""FP8 training parity: the same run in FP8 (`model.quant=fp8_blockwise`) and in a baseline dtype.

  python -m experiments.fp8_parity --out_dir=/tmp/fp8_parity --steps=1000

Trains `--config` twice with the same seed and data order through `experiments.train`: once with
the baseline activations (`--baseline_dtype`, bf16 by default; the tiny config otherwise runs
fp32) and once in FP8 with the same dtype around it. Every step's loss is logged. The final
training loss of each is the mean over the last `--window` steps (one step's loss on a small
batch is too noisy to compare at 1%); `parity.md` holds that comparison, the validation losses
and both curves in `--window`-step means, and `parity.json` the numbers.

Ablations of the recipe (`model.fp8_recipe`, ling_jax/fp8.py RECIPES) run beside it:

  python -m experiments.fp8_parity --out_dir=/tmp/ablate --steps=300 \
      --recipes=full,fprop_only,dgrad_only,wgrad_only,bf16_attn_out,experts_only,pow2_scales

`ablation.md` then compares each recipe's final loss with the baseline's and with the full
recipe's (a "full" run is added if missing). `--jobs` trainings run at a time. Keep it at 1 on
one GPU: nine tiny runs side by side on an H200 took 170-220 s each to compile (CPU-bound) and
then ran ~10x slower each, the GPU time-slicing between processes (BENCHMARKS.md).
`--report_only` rebuilds the reports from the workdirs, e.g. after `--time_limit_s` cut the
runs (they are compared over the steps all of them reached).

XLA:GPU may fold an f32 -> e4m3 -> f32 round trip of the pure-JAX FP8 reference into nothing
unless excess precision is off; kernels/fp8_quant.py now blocks that itself, and the runs keep
`--xla_allow_excess_precision=false` as the session-2/3 runs had it.
"""

import json
import os
import subprocess
import sys
import time

from absl import app
from absl import flags

from ling_jax import fp8
from ling_jax import metrics as metrics_lib

_CONFIG = flags.DEFINE_string("config", "configs/ling2.py:tiny", "Config of both runs.")
_OUT_DIR = flags.DEFINE_string("out_dir", "/tmp/fp8_parity", "Workdirs and report go here.")
_STEPS = flags.DEFINE_integer("steps", 1000, "Training steps of each run.")
_WINDOW = flags.DEFINE_integer("window", 100, "Steps averaged into the final loss.")
_BASELINE_DTYPE = flags.DEFINE_string("baseline_dtype", "bfloat16", "model.dtype of both runs.")
_TOLERANCE = flags.DEFINE_float("tolerance", 0.01, "Allowed relative final-loss difference.")
_EXTRA = flags.DEFINE_multi_string("override", [], "More --config.* flags for every run.")
_RECIPES = flags.DEFINE_list("recipes", ["full"], "model.fp8_recipe values to train in FP8.")
_JOBS = flags.DEFINE_integer("jobs", 1, "Trainings run at a time.")
_REPORT_ONLY = flags.DEFINE_bool("report_only", False, "Only rebuild the reports.")
_TIME_LIMIT = flags.DEFINE_integer(
    "time_limit_s", 0, "Stop the trainings after this long in all and compare the steps they "
    "all reached (0: no limit).")


def run_name(recipe: str | None) -> str:
  """The workdir of a run: "none" for the baseline, "fp8_blockwise" for the full recipe."""
  if recipe is None:
    return "none"
  return "fp8_blockwise" if recipe == "full" else f"fp8_{recipe}"


def train_command(recipe: str | None, workdir: str) -> list[str]:
  """The `experiments.train` command of one run (recipe None: the baseline)."""
  quant = ["--config.model.quant=none"] if recipe is None else [
      "--config.model.quant=fp8_blockwise", f"--config.model.fp8_recipe={recipe}"]
  return [sys.executable, "-m", "experiments.train", f"--config={_CONFIG.value}",
          f"--workdir={workdir}", *quant, f"--config.model.dtype={_BASELINE_DTYPE.value}",
          f"--config.train.num_steps={_STEPS.value}", "--config.train.log_every=1",
          *_EXTRA.value]


def _start(recipe: str | None) -> subprocess.Popen:
  env = dict(os.environ, PYTHONUNBUFFERED="1")
  env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_allow_excess_precision=false").strip()
  name = run_name(recipe)
  cmd = train_command(recipe, os.path.join(_OUT_DIR.value, name))
  metrics_lib.log("Training %s: %s", name, " ".join(cmd))
  with open(os.path.join(_OUT_DIR.value, f"{name}.log"), "w") as log:
    return subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)


def _train_all(recipes: list[str | None]) -> list[str]:
  """Runs the trainings, `--jobs` at a time (each resumes, or skips, a run already in its
  workdir); returns the names of those that failed."""
  deadline = time.monotonic() + _TIME_LIMIT.value if _TIME_LIMIT.value else float("inf")
  waiting, running, failed = list(recipes), [], []
  while waiting or running:
    while waiting and len(running) < max(_JOBS.value, 1) and time.monotonic() < deadline:
      r = waiting.pop(0)
      running.append((_start(r), r))
    if time.monotonic() >= deadline:
      for proc, r in running:
        proc.terminate()
        proc.wait()
        metrics_lib.log("Stopped %s at the time limit.", run_name(r))
      failed += [f"{run_name(r)} (not started: time limit)" for r in waiting]
      break
    for proc, r in list(running):
      if proc.poll() is not None:
        running.remove((proc, r))
        if proc.returncode != 0:
          failed.append(run_name(r))
    time.sleep(1)
  return failed


def main(argv: list[str]) -> None:
  del argv
  os.makedirs(_OUT_DIR.value, exist_ok=True)
  unknown = [r for r in _RECIPES.value if r not in fp8.RECIPES]
  if unknown:
    raise app.UsageError(f"--recipes: unknown {unknown}; use names of {tuple(fp8.RECIPES)}.")
  recipes = list(dict.fromkeys(["full", *_RECIPES.value]))
  failed = [] if _REPORT_ONLY.value else _train_all([None, *recipes])
  runs = {}
  for r in [None, *recipes]:
    path = os.path.join(_OUT_DIR.value, run_name(r), "metrics.jsonl")
    if os.path.exists(path):
      runs[r or "none"] = metrics_lib.read_jsonl(path)
  result = fp8.parity_report(runs["none"], runs["full"], _WINDOW.value)
  result["passed"] = abs(result["relative_difference"]) <= _TOLERANCE.value
  with open(os.path.join(_OUT_DIR.value, "parity.json"), "w") as f:
    json.dump(result, f, indent=1)
  report = fp8.parity_markdown(result, _BASELINE_DTYPE.value)
  with open(os.path.join(_OUT_DIR.value, "parity.md"), "w") as f:
    f.write(report)
  print(report)
  print(f"PARITY {'PASS' if result['passed'] else 'FAIL'} (tolerance {_TOLERANCE.value:.1%})")
  if len(runs) > 2:
    rows = fp8.ablation_rows(runs, "none", "full", _WINDOW.value)
    table = fp8.ablation_markdown(rows, _BASELINE_DTYPE.value)
    with open(os.path.join(_OUT_DIR.value, "ablation.md"), "w") as f:
      f.write(table)
    with open(os.path.join(_OUT_DIR.value, "ablation.json"), "w") as f:
      json.dump(rows, f, indent=1)
    print(table)
  if failed:
    raise RuntimeError(f"Training failed: {failed}; see their logs in {_OUT_DIR.value}.")


if __name__ == "__main__":
  app.run(main)
