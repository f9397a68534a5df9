"""FP8 training parity: the same run in FP8 (`model.quant=fp8_blockwise`) and in a baseline dtype.

  python -m experiments.fp8_parity --out_dir=/tmp/fp8_parity --steps=1000

Trains `--config` twice with the same seed and data order through `experiments.train`: once with
the baseline activations (`--baseline_dtype`, bf16 by default; the tiny config otherwise runs
fp32) and once in FP8 with the same dtype around it. Every step's loss is logged. The final
training loss of each is the mean over the last `--window` steps (one step's loss on a small
batch is too noisy to compare at 1%); `parity.md` holds that comparison, the validation losses
and both curves in `--window`-step means, and `parity.json` the numbers.

XLA:GPU may fold an f32 -> e4m3 -> f32 round trip of the pure-JAX FP8 reference into nothing
unless excess precision is off, so both runs get `--xla_allow_excess_precision=false`.
"""

import json
import os
import subprocess
import sys

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
_EXTRA = flags.DEFINE_multi_string("override", [], "More --config.* flags for both runs.")


def _train(quant: str, workdir: str) -> None:
  env = dict(os.environ, PYTHONUNBUFFERED="1")
  env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_allow_excess_precision=false").strip()
  cmd = [sys.executable, "-m", "experiments.train", f"--config={_CONFIG.value}",
         f"--workdir={workdir}", f"--config.model.quant={quant}",
         f"--config.model.dtype={_BASELINE_DTYPE.value}",
         f"--config.train.num_steps={_STEPS.value}", "--config.train.log_every=1",
         *_EXTRA.value]
  metrics_lib.log("Training %s: %s", quant, " ".join(cmd))
  with open(os.path.join(_OUT_DIR.value, f"{quant}.log"), "w") as log:
    subprocess.run(cmd, check=True, env=env, stdout=log, stderr=subprocess.STDOUT)


def main(argv: list[str]) -> None:
  del argv
  os.makedirs(_OUT_DIR.value, exist_ok=True)
  runs = {}
  for quant in ("none", "fp8_blockwise"):
    workdir = os.path.join(_OUT_DIR.value, quant)
    _train(quant, workdir)  # Resumes (or skips) a run already there.
    runs[quant] = metrics_lib.read_jsonl(os.path.join(workdir, "metrics.jsonl"))
  result = fp8.parity_report(runs["none"], runs["fp8_blockwise"], _WINDOW.value)
  result["passed"] = abs(result["relative_difference"]) <= _TOLERANCE.value
  with open(os.path.join(_OUT_DIR.value, "parity.json"), "w") as f:
    json.dump(result, f, indent=1)
  report = fp8.parity_markdown(result, _BASELINE_DTYPE.value)
  with open(os.path.join(_OUT_DIR.value, "parity.md"), "w") as f:
    f.write(report)
  print(report)
  print(f"PARITY {'PASS' if result['passed'] else 'FAIL'} (tolerance {_TOLERANCE.value:.1%})")


if __name__ == "__main__":
  app.run(main)
