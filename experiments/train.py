"""Pre-trains a Ling 2.0 model; resumes automatically from the newest checkpoint in --workdir.

  python -m experiments.train --config=configs/ling2.py:tiny --workdir=/tmp/ling_tiny
  python -m experiments.train --config=configs/ling2.py:tiny --workdir=/tmp/ling_tiny \
      --config.train.num_steps=200 --config.model.num_hidden_layers=2
"""

import sys

from absl import app
from absl import flags
from ml_collections import config_flags

from ling_jax import config as config_lib
from ling_jax import metrics
from ling_jax import trainer

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file:variant.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints and metrics.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  metrics.setup_console()
  try:
    result = trainer.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  except config_lib.ConfigError as e:  # Bad input: one clear line, no traceback.
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  val = (f"val loss {result['val_loss']:.4f} nats/token ({result['val_bits_per_token']:.3f} "
         "bits/token)" if "val_loss" in result else "no evaluation yet")
  metrics.log("Done at step %d: %s, %d non-finite steps skipped. Checkpoints and metrics are in "
              "%s", result["step"], val, result["nan_skips"], _WORKDIR.value)


if __name__ == "__main__":
  app.run(main)
