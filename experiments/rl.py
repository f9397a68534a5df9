"""RL post-training (Evo-CoT: LPO / GRPO / GSPO; GAR); resumes from the newest checkpoint.

  python -m experiments.rl --config=configs/rl.py --workdir=w/rl --config.train.init_from=w/sft
  python -m experiments.rl --config=configs/rl.py:grpo --workdir=w/rl_grpo \
      --config.train.init_from=w/sft --config.rl.group_size=16

Metrics per step (console, TensorBoard, metrics.jsonl): reward mean and std, accuracy,
response length, clip fraction, KL to the reference, entropy, and the held-out accuracy every
`rl.eval_every` steps (step 0 is the starting policy).
"""

import sys

from absl import app
from absl import flags
from ml_collections import config_flags

from ling_jax import config as config_lib
from ling_jax import metrics
from ling_jax import rl

_CONFIG = config_flags.DEFINE_config_file("config", None, "configs/rl.py:OBJECTIVE[,...]",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints and metrics.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  metrics.setup_console()
  try:
    result = rl.train(_CONFIG.value, _WORKDIR.value)
  except config_lib.ConfigError as e:  # Bad input: one clear line, no traceback.
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  held = result.get("heldout_accuracy")
  metrics.log("Done at step %d: held-out accuracy %s. Checkpoints and metrics are in %s",
              result["step"], "n/a" if held is None else f"{held:.3f}", _WORKDIR.value)


if __name__ == "__main__":
  app.run(main)
