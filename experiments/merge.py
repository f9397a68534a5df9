"""Merges the last N checkpoints of a run (WSM), writes the result and compares val losses.

  python -m experiments.merge --workdir=/tmp/ling_tiny --last=4 --weights=1-sqrt

`--eval_inputs` also evaluates each merged checkpoint, to show the merge against all of them
rather than the newest alone (one more evaluation per checkpoint).
"""

import sys

from absl import app
from absl import flags

from ling_jax import config as config_lib
from ling_jax import merge
from ling_jax import metrics
from ling_jax import trainer

_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory made by experiments.train.")
_LAST = flags.DEFINE_integer("last", 4, "How many of the newest checkpoints to merge.")
_WEIGHTS = flags.DEFINE_enum("weights", "1-sqrt", list(merge.MERGE_KINDS),
                             "Decay shape the merge emulates.")
_OUTPUT = flags.DEFINE_string("output", None, "Where to write the merged checkpoint "
                              "(default: WORKDIR/merged).")
_EVAL_INPUTS = flags.DEFINE_bool(
    "eval_inputs", False, "Also evaluate every merged checkpoint and print their val losses.")
flags.mark_flags_as_required(["workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  metrics.setup_console()
  try:
    config = trainer.load_config(_WORKDIR.value)
    result = merge.merge_checkpoints(config, _WORKDIR.value, last=_LAST.value,
                                     weights=_WEIGHTS.value, output=_OUTPUT.value,
                                     eval_inputs=_EVAL_INPUTS.value)
  except config_lib.ConfigError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  metrics.log("Merged steps %s with %s coefficients %s", result["steps"], _WEIGHTS.value,
               [round(c, 4) for c in result["coefficients"]])
  metrics.log("val loss: merged %.4f | last checkpoint %.4f", result["merged_val_loss"],
               result["last_val_loss"])
  if "input_val_losses" in result:
    losses = result["input_val_losses"]
    metrics.log("val loss of each merged checkpoint: %s | their mean %.4f",
                 " ".join(f"{step}: {loss:.4f}" for step, loss in zip(result["steps"], losses)),
                 sum(losses) / len(losses))


if __name__ == "__main__":
  app.run(main)
