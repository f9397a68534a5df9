"""Converts checkpoints between the Hugging Face layout and ours (orbax).

  # HF dir (e.g. a download of inclusionAI/Ling-mini-2.0) to an orbax dir (config.json, params/):
  python -m experiments.convert --src=/ckpt/Ling-mini-2.0 --dst=/ckpt/ling-mini-orbax --to=orbax
  # An orbax dir or a training run dir (its newest checkpoint) to an HF dir:
  python -m experiments.convert --src=workdirs/tiny --dst=/tmp/tiny-hf --to=hf --dtype=bfloat16

Weights stream tensor by tensor (see ling_jax/hf.py); the run prints one line per variable and
its peak host memory at the end. An HF dir needs the released `modeling_bailing_moe_v2.py` and
`configuration_bailing_moe_v2.py` next to it for `transformers` (vLLM and SGLang know the
architecture by name).
"""

import functools
import sys

from absl import app
from absl import flags

from ling_jax import config as config_lib
from ling_jax import hf
from ling_jax import metrics

_SRC = flags.DEFINE_string("src", None, "HF dir, orbax dir (from this tool) or training run dir.")
_DST = flags.DEFINE_string("dst", None, "Directory to write.")
_TO = flags.DEFINE_enum("to", None, ["hf", "orbax"], "Layout to write.")
_DTYPE = flags.DEFINE_enum("dtype", None, ["float32", "bfloat16", "float16"],
                           "Weight dtype to write (default: as stored).")
_SHARD_GB = flags.DEFINE_float("max_shard_gb", 5.0, "HF output: largest safetensors shard.")
flags.mark_flags_as_required(["src", "dst", "to"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  metrics.setup_console()
  try:
    log = functools.partial(metrics.log, "%s")
    if _TO.value == "hf":
      m, variables = hf.load_pretrained(_SRC.value, param_dtype=_DTYPE.value, progress=log,
                                        lazy=True)
      files = hf.save_hf(m, variables, _DST.value, dtype=_DTYPE.value,
                         max_shard_bytes=int(_SHARD_GB.value * 2**30), progress=log)
      metrics.log("wrote config.json and %d safetensors files to %s", len(files), _DST.value)
    else:
      if hf.is_hf_dir(_SRC.value):  # Leaf by leaf: the model is never whole in memory.
        m, variables = hf.iter_hf(_SRC.value, param_dtype=_DTYPE.value, progress=log)
      else:
        m, variables = hf.load_pretrained(_SRC.value, param_dtype=_DTYPE.value, progress=log)
      hf.save_orbax(m, variables, _DST.value, progress=log)
      metrics.log("wrote config.json and params/ to %s", _DST.value)
  except config_lib.ConfigError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  metrics.log("peak host memory: %s", peak_memory())


def peak_memory() -> str:
  """Returns this process's peak resident memory (Linux VmHWM), e.g. '2750 MiB (VmHWM)'.

  VmHWM counts this program only; ru_maxrss would also count the parent's memory at the fork.
  """
  try:
    with open("/proc/self/status") as f:
      kib = next(int(line.split()[1]) for line in f if line.startswith("VmHWM"))
    return f"{kib / 1024:.0f} MiB (VmHWM)"
  except (OSError, StopIteration):
    import resource
    return f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB (max RSS)"


if __name__ == "__main__":
  app.run(main)
