"""Reports the validation loss of a training phase's checkpoint on that phase's own data.

  python -m experiments.evaluate --workdir=workdirs/sft            # newest checkpoint
  python -m experiments.evaluate --workdir=workdirs/long --step=400 --eval_batches=32
  python -m experiments.evaluate --workdir=workdirs/fp8 --quant=none   # FP8-trained, bf16 linears

For an SFT phase (chat records) the loss covers the assistant's tokens only; for a mixture each
source's loss is printed too. The run's saved config decides data, sequence length and RoPE.
"""

import json
import sys

from absl import app
from absl import flags

from ling_jax import config as config_lib
from ling_jax import metrics
from ling_jax import phases

_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory of the phase (experiments.train).")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step to evaluate (default: the newest).")
_EVAL_BATCHES = flags.DEFINE_integer("eval_batches", None,
                                     "Validation batches (default: the run's eval_batches).")
_QUANT = flags.DEFINE_enum("quant", None, ["none", "fp8_blockwise"],
                           "Evaluate in this precision instead of the run's (model.quant): "
                           "none puts an FP8-trained checkpoint through the model dtype's "
                           "linears, fp8_blockwise a bf16 one through FP8's.")
_JSON = flags.DEFINE_bool("json", False, "Print the result as one JSON line instead.")
flags.mark_flags_as_required(["workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  metrics.setup_console()
  try:
    result = phases.evaluate_run(_WORKDIR.value, step=_STEP.value,
                                 eval_batches=_EVAL_BATCHES.value, quant=_QUANT.value)
  except config_lib.ConfigError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  if _JSON.value:
    print(json.dumps(result, sort_keys=True))
    return
  scope = "assistant tokens only" if result["assistant_only"] else "all tokens"
  metrics.log("%s step %d: val loss %.4f nats/token (%.4f bits/token) over %d tokens (%s; "
              "quant=%s)", _WORKDIR.value, result["step"], result["val_loss"],
              result["val_bits_per_token"], result["val_tokens"], scope, result["quant"])
  for key in sorted(k for k in result if k.startswith("val_loss/")):
    metrics.log("  %s: %.4f", key, result[key])


if __name__ == "__main__":
  app.run(main)
