"""Peak host memory of `experiments.convert` on a random ~1B-parameter Ling 2.0 checkpoint.

  python -m experiments.bench_convert --workdir=/tmp/bench_convert

Writes a random bf16 checkpoint in the released HF layout (streamed, tensor by tensor), then
times HF -> orbax and orbax -> HF conversions, each in its own process, and prints a table of
their peak RSS against the checkpoint's size and against a process that only imports the
libraries and loads nothing (the baseline of the same run).
"""

import json
import os
import re
import shutil
import subprocess
import sys
import time

import numpy as np
from absl import app
from absl import flags

from configs import ling2
from ling_jax import hf
from ling_jax import metrics
from ling_jax import params as params_lib
from ling_jax import safetensors_io

_WORKDIR = flags.DEFINE_string("workdir", "/tmp/bench_convert", "Scratch directory.")
_KEEP = flags.DEFINE_bool("keep", False, "Keep the written checkpoints.")


def bench_config():
  """Returns a ~1.1B-parameter config with mini's shape ratios (16 layers, 64 experts)."""
  m = ling2.model_config("mini")
  m.num_hidden_layers, m.hidden_size, m.intermediate_size = 16, 1024, 2816
  m.moe_intermediate_size, m.num_experts = 256, 64
  m.num_attention_heads, m.num_key_value_heads = 8, 2
  m.num_nextn_predict_layers = 0
  m.param_dtype = "bfloat16"
  return m


def write_random_hf(m, path: str) -> int:
  """Writes random bf16 weights in the HF layout without holding them; returns data bytes."""
  os.makedirs(path, exist_ok=True)
  abstract = {"/".join(k): v for k, v in
              __import__("flax").traverse_util.flatten_dict(hf.abstract_variables(m)).items()}
  rng = np.random.default_rng(0)
  specs = []
  for piece in hf.tensor_table(m):
    leaf = abstract["/".join(piece.path)]
    shape = hf._piece_shape(piece, leaf.shape)  # noqa: SLF001 (the table's own shape rule)
    dtype = np.dtype(np.float32) if piece.path[0] == "moe_state" else np.dtype(leaf.dtype)
    specs.append((piece.hf_name, shape, dtype,
                  lambda s=shape, d=dtype: (0.006 * rng.standard_normal(s, np.float32)).astype(d)))
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(hf.config_to_hf(m), f, indent=2)
  safetensors_io.write_dir(path, specs, max_shard_bytes=2**30)
  return sum(os.path.getsize(os.path.join(path, n)) for n in os.listdir(path)
             if n.endswith(".safetensors"))


def peak_rss_mib(args: list[str]) -> tuple[float, float]:
  """Runs a Python module in a child process; returns its peak RSS (MiB, the VmHWM the child
  logs, which unlike ru_maxrss leaves out this process's memory at the fork) and seconds."""
  start = time.perf_counter()
  proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, check=False)
  found = re.search(r"peak host memory: (\d+) MiB", proc.stdout + proc.stderr)
  if proc.returncode or not found:
    raise RuntimeError(f"{args} failed: {(proc.stdout + proc.stderr)[-2000:]}")
  return float(found.group(1)), time.perf_counter() - start


def main(argv):
  del argv
  metrics.setup_console()
  m = bench_config()
  counts = params_lib.count_params(m)
  work = _WORKDIR.value
  shutil.rmtree(work, ignore_errors=True)
  src, orbax_dir, back = (os.path.join(work, n) for n in ("hf", "orbax", "hf_back"))
  metrics.log("writing a random checkpoint: %.3fB params (bf16) to %s", counts["total"] / 1e9,
              src)
  size_mib = write_random_hf(m, src) / 2**20
  baseline, seconds = peak_rss_mib(
      ["-c", "import jax, orbax.checkpoint; from ling_jax import hf; "
       "from experiments import convert; jax.numpy.zeros(1).block_until_ready(); "
       "print('peak host memory:', convert.peak_memory())"])
  rows = [("imports only (baseline)", baseline, seconds)]
  for name, args in (
      ("HF -> orbax", ["-m", "experiments.convert", f"--src={src}", f"--dst={orbax_dir}",
                       "--to=orbax"]),
      ("orbax -> HF", ["-m", "experiments.convert", f"--src={orbax_dir}", f"--dst={back}",
                       "--to=hf"])):
    metrics.log("running %s", name)
    rss, seconds = peak_rss_mib(args)
    rows.append((name, rss, seconds))
  before, after = safetensors_io.SafetensorsDir(src), safetensors_io.SafetensorsDir(back)
  same = set(before.weight_map) == set(after.weight_map) and all(
      np.array_equal(before.read(n).view(np.uint8), after.read(n).view(np.uint8))
      for n in before.weight_map)
  print(f"\ncheckpoint: {counts['total'] / 1e9:.3f}B params, {size_mib:.0f} MiB of bf16 "
        f"safetensors; round trip byte-identical: {same}")
  print("| run | peak RSS (MiB) | / checkpoint size | seconds |")
  print("|---|---|---|---|")
  for name, rss, seconds in rows:
    print(f"| {name} | {rss:.0f} | {rss / size_mib:.2f} | {seconds:.1f} |")
  if not _KEEP.value:
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
  app.run(main)
