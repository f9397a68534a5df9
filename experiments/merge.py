"""Merges the last N checkpoints of a run (WSM), writes the result and compares val losses.

  python -m experiments.merge --workdir=/tmp/ling_tiny --last=4 --weights=1-sqrt
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
flags.mark_flags_as_required(["workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  metrics.setup_console()
  try:
    config = trainer.load_config(_WORKDIR.value)
    result = merge.merge_checkpoints(config, _WORKDIR.value, last=_LAST.value,
                                     weights=_WEIGHTS.value, output=_OUTPUT.value)
  except config_lib.ConfigError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  metrics.log("Merged steps %s with %s coefficients %s", result["steps"], _WEIGHTS.value,
               [round(c, 4) for c in result["coefficients"]])
  metrics.log("val loss: merged %.4f | last checkpoint %.4f", result["merged_val_loss"],
               result["last_val_loss"])


if __name__ == "__main__":
  app.run(main)
