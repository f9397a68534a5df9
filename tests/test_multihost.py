"""Two processes joined by jax.distributed on localhost against one process with 8 devices."""

import os
import subprocess
import sys

import numpy as np

from ling_jax import metrics as metrics_lib
from tests.test_trainer import MICRO
from tests.test_trainer import ROOT
from tests.test_trainer import compile_cache_env

# Enough steps for a wrong gradient, expert bias or data position to show in the losses; the
# match itself does not depend on how many.
STEPS, MORE = 6, 8
# Two data shards in every run, so that the global batches do not depend on the process count.
# The whole micro model, MTP head included: this is the one test of it across processes.
COMMON = [*MICRO, "--config.train.batch_size=8", "--config.data.num_shards=2",
          "--config.train.checkpoint_every=3", f"--config.train.eval_every={MORE}"]


def _run(args, *, processes: int, cache: str) -> str:
  env = dict(os.environ, PYTHONUNBUFFERED="1", JAX_PLATFORMS="cpu")
  # Compiling dominates these short runs; XLA's cheapest CPU code generation halves it.
  env["XLA_FLAGS"] = "--xla_backend_optimization_level=0"
  # The three runs share one persistent cache of every program they compile: the resumed run
  # compiles nothing the 1-process run has not.
  env.update(compile_cache_env(cache))
  if processes == 1:
    env["XLA_FLAGS"] += " --xla_force_host_platform_device_count=8"
    cmd = [sys.executable, "-m", "experiments.train"]
  else:
    cmd = [sys.executable, "-m", "experiments.launch_local", f"--num_processes={processes}",
           "--devices_per_process=4", "--"]
  cmd += ["--config=configs/ling2.py:tiny", *COMMON, *args]
  proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  return proc.stdout + proc.stderr


def _losses(workdir) -> dict[int, float]:
  records = metrics_lib.read_jsonl(os.path.join(workdir, "metrics.jsonl"))
  return {step: r["loss"] for step, r in records.items() if "loss" in r}


def test_two_processes_match_one_and_restore_on_another_mesh(tmp_path, corpus):
  cache = str(tmp_path / "xla")
  data = f"--config.data.data_dir={corpus}"
  two, one = tmp_path / "two_processes", tmp_path / "one_process"
  # 2 processes x 4 devices, all data-parallel.
  out = _run([f"--workdir={two}", data, f"--config.train.num_steps={STEPS}"],
             processes=2, cache=cache)
  assert "over 2 processes" in out
  # 1 process x 8 devices, expert-parallel.
  mesh = ["--config.mesh.data=2", "--config.mesh.expert=4"]
  _run([f"--workdir={one}", data, f"--config.train.num_steps={MORE}", *mesh],
       processes=1, cache=cache)
  two_losses, one_losses = _losses(two), _losses(one)
  assert sorted(two_losses) == list(range(1, STEPS + 1))
  np.testing.assert_allclose([two_losses[s] for s in range(1, STEPS + 1)],
                             [one_losses[s] for s in range(1, STEPS + 1)], rtol=1e-4)
  # The 2-process checkpoint (step STEPS) resumes in 1 process on the expert-parallel mesh: same
  # params, expert bias, optimiser state and data position as the 1-process run had.
  out = _run([f"--workdir={two}", data, f"--config.train.num_steps={MORE}", *mesh],
             processes=1, cache=cache)
  assert f"Resumed from step {STEPS}" in out
  resumed = _losses(two)
  np.testing.assert_allclose([resumed[s] for s in range(STEPS + 1, MORE + 1)],
                             [one_losses[s] for s in range(STEPS + 1, MORE + 1)], rtol=1e-4)
