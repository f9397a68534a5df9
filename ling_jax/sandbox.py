"""Runs untrusted Python (model-written code and its tests) in a limited child process.

What a run gets, in layers (the first two only where the host allows them):

- Namespaces (`unshare`): a new network namespace (no interfaces but a down loopback, so no
  network at all) and a new PID namespace whose init is our runner; when the runner ends or is
  killed, the kernel kills every process left in the namespace, even ones that left our process
  group. Used when `unshare --net --pid` works (root, or unprivileged user namespaces).
- A dropped user: when started as root the code runs as `nobody` (65534), so it cannot write the
  repository or read root-only files, and RLIMIT_NPROC counts only `nobody`'s processes. Common
  stdlib modules (math, re, collections, itertools, ...) are imported before the drop, since the
  interpreter's own files may not be readable by `nobody`.
- Resource limits on the process running the code: RLIMIT_AS (memory), RLIMIT_CPU (CPU seconds),
  RLIMIT_NPROC (processes), RLIMIT_FSIZE (bytes per written file, also caps its output).
- An audit hook (Python's `sys.addaudithook`) that refuses sockets and the import of ctypes; it
  stops casual misuse only, since code inside the interpreter can get around Python-level hooks.
- A wall-clock timeout after which the whole process group (and with it the namespace) is killed;
  a fresh temporary working directory, deleted afterwards; an empty environment (no proxies).

`SandboxResult.isolation` says which layers a run had. Without namespaces a child that calls
setsid() and forks can outlive the run; everything else still holds.
"""

import dataclasses
import functools
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

from ling_jax import config as config_lib

_NOBODY = 65534
_OUTPUT_CHARS = 4000  # Characters of stdout/stderr kept in the result.

# Runs as the child's main program: forks once so the code never runs as the namespace's init
# (which ignores default-action signals), limits and drops the worker, mirrors its exit status.
_RUNNER = r'''
import json, os, resource, sys
limits = json.loads(sys.argv[1])
with open("solution.py") as f:
  code = f.read()
pid = os.fork()
if pid:
  _, status = os.waitpid(pid, 0)
  os._exit(os.waitstatus_to_exitcode(status) if os.WIFEXITED(status)
           else 128 + os.WTERMSIG(status))
for name, value in (("RLIMIT_AS", limits["memory_bytes"]), ("RLIMIT_CPU", limits["cpu_s"]),
                    ("RLIMIT_NPROC", limits["max_processes"]),
                    ("RLIMIT_FSIZE", limits["max_file_bytes"]), ("RLIMIT_CORE", 0)):
  resource.setrlimit(getattr(resource, name), (value, value))
if os.getuid() == 0:
  # `nobody` may not be able to read the interpreter's stdlib: import what task code uses first.
  import bisect, collections, functools, heapq, itertools, math, re, string, traceback, typing
  os.setgroups([])
  os.setgid(limits["nobody"])
  os.setuid(limits["nobody"])
def _hook(event, args):
  if event.startswith("socket.") or (event == "import" and args[0] in ("ctypes", "_ctypes")):
    raise PermissionError(f"sandbox: {event} is not allowed")
sys.addaudithook(_hook)
try:
  exec(compile(code, "solution.py", "exec"), {"__name__": "__main__"})
except SystemExit as e:
  os._exit(e.code if isinstance(e.code, int) else (0 if e.code is None else 1))
except MemoryError:
  os._exit(3)
except BaseException:
  import traceback
  traceback.print_exc()
  os._exit(1)
sys.stdout.flush()
os._exit(0)
'''


@dataclasses.dataclass(frozen=True)
class Limits:
  """What one sandboxed run may use."""
  timeout_s: float = 5.0  # Wall clock, then the process group is killed.
  cpu_s: int = 2  # CPU seconds of the code (RLIMIT_CPU).
  memory_mb: int = 256  # Address space of the code (RLIMIT_AS).
  max_processes: int = 16  # RLIMIT_NPROC (counted for the sandbox user).
  max_file_mb: int = 1  # Largest file the code may write, its output included (RLIMIT_FSIZE).

  def validate(self) -> None:
    for field in ("timeout_s", "cpu_s", "memory_mb", "max_processes", "max_file_mb"):
      if getattr(self, field) <= 0:
        config_lib.fail(f"rl.sandbox.{field}", f"must be > 0, got {getattr(self, field)}",
                        "give every sandbox limit a positive value")


DEFAULT_LIMITS = Limits()


@dataclasses.dataclass
class SandboxResult:
  """What a sandboxed run did."""
  passed: bool  # Exited with status 0 before the timeout.
  returncode: int  # Exit status (128 + signal when killed by one; -9 after the wall timeout).
  timed_out: bool  # Killed by the wall-clock timeout.
  stdout: str  # The first characters of its output.
  stderr: str
  wall_s: float
  isolation: str  # The layers it ran under, e.g. "netns+pidns+nobody+rlimits+audit".


@functools.cache
def _namespaces_work() -> bool:
  """Returns whether `unshare --net --pid` can start a process here."""
  if shutil.which("unshare") is None:
    return False
  try:
    return subprocess.run(_unshare_prefix() + ["true"], capture_output=True,
                          timeout=10).returncode == 0
  except (OSError, subprocess.SubprocessError):
    return False


def _unshare_prefix() -> list[str]:
  user = [] if os.getuid() == 0 else ["--user", "--map-root-user"]
  return ["unshare", *user, "--net", "--pid", "--fork", "--kill-child"]


def isolation() -> str:
  """Returns the isolation layers a run gets on this host."""
  layers = ["netns+pidns"] if _namespaces_work() else []
  if os.getuid() == 0:
    layers.append("nobody")
  return "+".join(layers + ["rlimits", "audit", "timeout"])


def _read(path: str) -> str:
  with open(path, "rb") as f:
    return f.read(_OUTPUT_CHARS).decode("utf-8", errors="replace")


def run_python(code: str, limits: Limits = DEFAULT_LIMITS) -> SandboxResult:
  """Runs `code` as a Python program under `limits`; never raises for what the code does."""
  limits.validate()
  workdir = tempfile.mkdtemp(prefix="ling_sandbox_")
  os.chmod(workdir, 0o777)  # The code runs as `nobody` when we are root.
  try:
    with open(os.path.join(workdir, "solution.py"), "w") as f:
      f.write(code)
    runner_args = json.dumps({
        "memory_bytes": limits.memory_mb << 20, "cpu_s": limits.cpu_s,
        "max_processes": limits.max_processes, "max_file_bytes": limits.max_file_mb << 20,
        "nobody": _NOBODY})
    command = [sys.executable, "-I", "-c", _RUNNER, runner_args]
    if _namespaces_work():
      command = _unshare_prefix() + command
    out_path, err_path = os.path.join(workdir, "stdout"), os.path.join(workdir, "stderr")
    start = time.perf_counter()
    with open(out_path, "wb") as out, open(err_path, "wb") as err:
      proc = subprocess.Popen(command, cwd=workdir, stdin=subprocess.DEVNULL, stdout=out,
                              stderr=err, env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"},
                              start_new_session=True)
      timed_out = False
      try:
        returncode = proc.wait(timeout=limits.timeout_s)
      except subprocess.TimeoutExpired:
        timed_out = True
      # Whatever is left in the group (a fork bomb's children, a timed-out run) dies now.
      try:
        os.killpg(proc.pid, signal.SIGKILL)
      except ProcessLookupError:
        pass
      if timed_out:
        proc.wait()
        returncode = -signal.SIGKILL
    wall_s = time.perf_counter() - start
    return SandboxResult(passed=returncode == 0 and not timed_out, returncode=returncode,
                         timed_out=timed_out, stdout=_read(out_path), stderr=_read(err_path),
                         wall_s=wall_s, isolation=isolation())
  finally:
    shutil.rmtree(workdir, ignore_errors=True)


def run_tests(solution: str, tests: str, limits: Limits = DEFAULT_LIMITS) -> SandboxResult:
  """Runs a solution followed by its test code (asserts); passed means every test held."""
  return run_python(f"{solution}\n\n{tests}\n", limits)
