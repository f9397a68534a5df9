"""Runs a multi-process job on this machine: N processes of experiments.train on localhost.

Each process gets --devices_per_process CPU devices (or the GPUs listed by --gpus_per_process)
and joins the others through jax.distributed, with process 0 as coordinator. Arguments after
`--` go to every process:

  python -m experiments.launch_local --num_processes=2 --devices_per_process=4 -- \
      --config=configs/ling2.py:tiny --workdir=/tmp/ling_2proc --config.mesh.expert=4

Output lines are prefixed with the process index. The exit status is the first non-zero one.
"""

import os
import socket
import subprocess
import sys
import threading
import time

from absl import app
from absl import flags

_NUM_PROCESSES = flags.DEFINE_integer("num_processes", 2, "Processes to start.")
_DEVICES = flags.DEFINE_integer("devices_per_process", 4, "CPU devices per process.")
_MODULE = flags.DEFINE_string("module", "experiments.train", "Entry point every process runs.")
_PLATFORM = flags.DEFINE_enum("platform", "cpu", ["cpu", "gpu"],
                              "cpu: fake CPU devices; gpu: the local GPUs split between them.")


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _pump(prefix: str, stream, out) -> None:
  for line in iter(stream.readline, ""):
    out.write(f"[{prefix}] {line}")
    out.flush()


def launch(args: list[str], *, num_processes: int, devices_per_process: int,
           module: str = "experiments.train", platform: str = "cpu") -> int:
  """Starts the processes, relays their output, and returns the first non-zero exit status."""
  address = f"localhost:{_free_port()}"
  procs, pumps = [], []
  for pid in range(num_processes):
    env = dict(os.environ, LING_COORDINATOR_ADDRESS=address,
               LING_NUM_PROCESSES=str(num_processes), LING_PROCESS_ID=str(pid))
    if platform == "cpu":
      env["JAX_PLATFORMS"] = "cpu"
      env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") +
                          f" --xla_force_host_platform_device_count={devices_per_process}")
    else:
      first = pid * devices_per_process
      env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, range(first, first + devices_per_process)))
    proc = subprocess.Popen([sys.executable, "-m", module, *args], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    pump = threading.Thread(target=_pump, args=(str(pid), proc.stdout, sys.stdout), daemon=True)
    pump.start()
    procs.append(proc)
    pumps.append(pump)
  # One failed process would leave the others waiting on collectives: stop them all.
  while any(proc.poll() is None for proc in procs):
    if any(proc.poll() for proc in procs):
      for proc in procs:
        if proc.poll() is None:
          proc.terminate()
    time.sleep(0.2)
  for pump in pumps:
    pump.join()
  return next((proc.returncode for proc in procs if proc.returncode), 0)


def main(argv):
  sys.exit(launch(argv[1:], num_processes=_NUM_PROCESSES.value,
                  devices_per_process=_DEVICES.value, module=_MODULE.value,
                  platform=_PLATFORM.value))


if __name__ == "__main__":
  app.run(main)
