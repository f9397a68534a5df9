"""Pre-trains a Ling 2.0 model; resumes automatically from the newest checkpoint in --workdir.

  python -m experiments.train --config=configs/ling2.py:tiny --workdir=/tmp/ling_tiny
  python -m experiments.train --config=configs/ling2.py:tiny --workdir=/tmp/ling_tiny \
      --config.train.num_steps=200 --config.model.num_hidden_layers=2

Several processes (hosts) join through JAX's distributed runtime when --num_processes > 1 (or
LING_NUM_PROCESSES, with LING_COORDINATOR_ADDRESS and LING_PROCESS_ID), or when launched by
SLURM or on a TPU pod slice, where JAX finds its peers itself. On one machine:

  python -m experiments.launch_local --num_processes=2 --devices_per_process=4 -- \
      --config=configs/ling2.py:tiny --workdir=/tmp/ling_tiny --config.mesh.expert=4
"""

import os
import sys

import jax
from absl import app
from absl import flags
from ml_collections import config_flags

from ling_jax import config as config_lib
from ling_jax import metrics
from ling_jax import trainer

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file:variant.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints and metrics.")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", os.environ.get("LING_COORDINATOR_ADDRESS"),
    "host:port of process 0, for multi-process runs.")
_NUM_PROCESSES = flags.DEFINE_integer(
    "num_processes", int(os.environ.get("LING_NUM_PROCESSES", "1")),
    "Number of processes of a multi-process run.")
_PROCESS_ID = flags.DEFINE_integer(
    "process_id", int(os.environ.get("LING_PROCESS_ID", "0")), "This process's index.")
flags.mark_flags_as_required(["config", "workdir"])


def initialize_distributed() -> None:
  """Joins the other processes of the run, if there are any."""
  if _NUM_PROCESSES.value > 1:
    if not _COORDINATOR.value:
      raise config_lib.ConfigError(
          "--coordinator_address: needed with --num_processes > 1. Fix: pass host:port of "
          "process 0 (or set LING_COORDINATOR_ADDRESS).")
    jax.distributed.initialize(coordinator_address=_COORDINATOR.value,
                               num_processes=_NUM_PROCESSES.value,
                               process_id=_PROCESS_ID.value)
  elif (int(os.environ.get("SLURM_NTASKS", "1")) > 1
        or "," in os.environ.get("TPU_WORKER_HOSTNAMES", "")):
    jax.distributed.initialize()  # SLURM and TPU pod slices: JAX reads its own environment.


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  metrics.setup_console()
  try:
    initialize_distributed()
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
