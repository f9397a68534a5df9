"""FP8 training parity: the same run in FP8 (`model.quant=fp8_blockwise`) and in a baseline dtype.

  python -m experiments.fp8_parity --out_dir=/tmp/fp8_parity --steps=1000

Trains `--config` twice with the same seed and data order through `experiments.train`: once with
the baseline activations (`--baseline_dtype`, bf16 by default; the tiny config otherwise runs
fp32) and once in FP8 with the same dtype around it. Every step's loss is logged. The final
training loss of each is the mean over the last `--window` steps (one step's loss on a small
batch is too noisy to compare at 1%%); `parity.md` holds that comparison, the validation losses
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

One pair's gap moves by about +-2%% with the seed at the tiny config (trajectories drift apart), so
the parity is best judged over several seeds:

  python -m experiments.fp8_parity --out_dir=/tmp/parity --steps=1000 --seeds=0,1,2

At a large config (Ling-mini width on a GPU), `--drop_checkpoints` deletes each run's
checkpoints when it finishes, so that the seeds' runs fit the disk.

Each seed's pair trains in `--out_dir/seed_S` (`config.train.seed=S`, which also sets the data
order) and gets its own `parity.md`; `seeds.md` and `seeds.json` hold the per-seed gaps, their
mean and spread, and the verdict is on the mean gap. The pairs run seed by seed, so a time limit
leaves whole pairs behind.

XLA:GPU may fold an f32 -> e4m3 -> f32 round trip of the pure-JAX FP8 reference into nothing
unless excess precision is off; kernels/fp8_quant.py now blocks that itself, and the runs keep
`--xla_allow_excess_precision=false` as the session-2/3 runs had it.
"""

import json
import os
import shutil
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
_SEEDS = flags.DEFINE_list(
    "seeds", [], "config.train.seed of each pair, e.g. 0,1,2 (empty: the config's seed, runs "
    "directly in --out_dir).")
_DROP_CHECKPOINTS = flags.DEFINE_bool(
    "drop_checkpoints", False, "Delete each run's checkpoints once it has finished (its metrics "
    "and logs stay), so that many runs of a large config fit the disk: each ends with a forced "
    "checkpoint, ~19 GB at 2 layers of Ling-mini width. A finished run is marked (FINISHED in "
    "its workdir) and skipped when the command runs again; an unfinished one resumes as usual.")
_TIME_LIMIT = flags.DEFINE_integer(
    "time_limit_s", 0, "Stop the trainings after this long in all and compare the steps they "
    "all reached (0: no limit).")


def run_name(recipe: str | None) -> str:
  """The workdir of a run: "none" for the baseline, "fp8_blockwise" for the full recipe."""
  if recipe is None:
    return "none"
  return "fp8_blockwise" if recipe == "full" else f"fp8_{recipe}"


def run_dir(seed: int | None, recipe: str | None) -> str:
  """The workdir of a run: `--out_dir/[seed_S/]name`."""
  seed_dir = "" if seed is None else f"seed_{seed}"
  return os.path.join(_OUT_DIR.value, seed_dir, run_name(recipe))


def train_command(recipe: str | None, workdir: str, seed: int | None = None) -> list[str]:
  """The `experiments.train` command of one run (recipe None: the baseline)."""
  quant = ["--config.model.quant=none"] if recipe is None else [
      "--config.model.quant=fp8_blockwise", f"--config.model.fp8_recipe={recipe}"]
  return [sys.executable, "-m", "experiments.train", f"--config={_CONFIG.value}",
          f"--workdir={workdir}", *quant, f"--config.model.dtype={_BASELINE_DTYPE.value}",
          f"--config.train.num_steps={_STEPS.value}", "--config.train.log_every=1",
          *([] if seed is None else [f"--config.train.seed={seed}"]), *_EXTRA.value]


def _start(seed: int | None, recipe: str | None) -> subprocess.Popen:
  env = dict(os.environ, PYTHONUNBUFFERED="1")
  env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_allow_excess_precision=false").strip()
  workdir = run_dir(seed, recipe)
  cmd = train_command(recipe, workdir, seed)
  metrics_lib.log("Training %s: %s", workdir, " ".join(cmd))
  os.makedirs(os.path.dirname(workdir), exist_ok=True)
  with open(f"{workdir}.log", "w") as log:
    return subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)


FINISHED = "FINISHED"  # --drop_checkpoints' mark of a run that trained all its steps


def _finish(workdir: str) -> None:
  """With --drop_checkpoints: marks a finished run and deletes its checkpoints."""
  if not _DROP_CHECKPOINTS.value:
    return
  with open(os.path.join(workdir, FINISHED), "w") as f:
    f.write(f"{_STEPS.value}\n")
  shutil.rmtree(os.path.join(workdir, "checkpoints"), ignore_errors=True)
  metrics_lib.log("Finished %s; its checkpoints are deleted (--drop_checkpoints).", workdir)


def _train_all(runs: list[tuple[int | None, str | None]]) -> list[str]:
  """Runs the (seed, recipe) trainings in order, `--jobs` at a time (each resumes, or skips, a
  run already in its workdir); returns the workdirs of those that failed."""
  deadline = time.monotonic() + _TIME_LIMIT.value if _TIME_LIMIT.value else float("inf")
  done = [r for r in runs if os.path.exists(os.path.join(run_dir(*r), FINISHED))]
  for r in done:
    metrics_lib.log("Skipping %s: finished, checkpoints dropped.", run_dir(*r))
  waiting, running, failed = [r for r in runs if r not in done], [], []
  while waiting or running:
    while waiting and len(running) < max(_JOBS.value, 1) and time.monotonic() < deadline:
      r = waiting.pop(0)
      running.append((_start(*r), r))
    if time.monotonic() >= deadline:
      for proc, r in running:
        proc.terminate()
        proc.wait()
        metrics_lib.log("Stopped %s at the time limit.", run_dir(*r))
      failed += [f"{run_dir(*r)} (not started: time limit)" for r in waiting]
      break
    for proc, r in list(running):
      if proc.poll() is not None:
        running.remove((proc, r))
        if proc.returncode != 0:
          failed.append(run_dir(*r))
        else:
          _finish(run_dir(*r))
    time.sleep(1)
  return failed


def _parse_seeds() -> list[int | None]:
  try:
    seeds = [int(v) for v in _SEEDS.value]
  except ValueError as e:
    raise app.UsageError(
        f"--seeds: {_SEEDS.value} are not all integers; use e.g. --seeds=0,1,2.") from e
  if len(set(seeds)) != len(seeds):
    raise app.UsageError(f"--seeds: {_SEEDS.value} repeats a seed; list each once.")
  return seeds or [None]


def _write(name: str, text: str, seed_dir: str = "") -> None:
  with open(os.path.join(_OUT_DIR.value, seed_dir, name), "w") as f:
    f.write(text)


def _report_seed(seed: int | None, recipes: list[str]) -> dict | None:
  """Writes one pair's parity (and ablation) reports; returns its parity result, or None when
  the pair did not both log enough steps."""
  seed_dir = "" if seed is None else f"seed_{seed}"
  runs = {}
  for r in [None, *recipes]:
    path = os.path.join(run_dir(seed, r), "metrics.jsonl")
    if os.path.exists(path):
      runs[r or "none"] = metrics_lib.read_jsonl(path)
  if "none" not in runs or "full" not in runs:
    metrics_lib.log("Seed %s: the pair did not both run; no report.", seed)
    return None
  try:
    result = fp8.parity_report(runs["none"], runs["full"], _WINDOW.value)
  except ValueError as e:
    metrics_lib.log("Seed %s: no report (%s).", seed, e)
    return None
  result["passed"] = fp8.parity_passed(result["relative_difference"], _TOLERANCE.value)
  _write("parity.json", json.dumps(result, indent=1), seed_dir)
  report = fp8.parity_markdown(result, _BASELINE_DTYPE.value)
  _write("parity.md", report, seed_dir)
  print(report if seed is None else f"Seed {seed}:\n{report}")
  if len(runs) > 2:
    rows = fp8.ablation_rows(runs, "none", "full", _WINDOW.value)
    table = fp8.ablation_markdown(rows, _BASELINE_DTYPE.value)
    _write("ablation.md", table, seed_dir)
    _write("ablation.json", json.dumps(rows, indent=1), seed_dir)
    print(table)
  return result


def main(argv: list[str]) -> None:
  del argv
  os.makedirs(_OUT_DIR.value, exist_ok=True)
  unknown = [r for r in _RECIPES.value if r not in fp8.RECIPES]
  if unknown:
    raise app.UsageError(f"--recipes: unknown {unknown}; use names of {tuple(fp8.RECIPES)}.")
  seeds = _parse_seeds()
  recipes = list(dict.fromkeys(["full", *_RECIPES.value]))
  jobs = [(seed, r) for seed in seeds for r in [None, *recipes]]
  failed = [] if _REPORT_ONLY.value else _train_all(jobs)
  results = {seed: _report_seed(seed, recipes) for seed in seeds}
  results = {seed: r for seed, r in results.items() if r is not None}
  if seeds == [None]:
    if results:
      print(fp8.parity_verdict(results[None]["relative_difference"], _TOLERANCE.value))
  elif results:
    summary = fp8.seed_summary(results)
    summary["passed"] = fp8.parity_passed(summary["mean_relative_difference"], _TOLERANCE.value)
    _write("seeds.json", json.dumps(summary, indent=1))
    table = fp8.seed_markdown(summary, _BASELINE_DTYPE.value)
    _write("seeds.md", table)
    print(table)
    print(fp8.parity_verdict(summary["mean_relative_difference"], _TOLERANCE.value,
                             f" on the mean over seeds {summary['seeds']}"))
  if failed:
    raise RuntimeError(f"Training failed: {failed}; see their logs beside the workdirs.")
  if not results:
    raise RuntimeError(f"No pair of runs to compare in {_OUT_DIR.value}.")


if __name__ == "__main__":
  app.run(main)
