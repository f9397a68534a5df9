"""Shared test setup: 8 fake CPU devices, strict rank promotion, inline CPU dispatch, repo root on
the path, and the files longest first for `make test`'s workers.

XLA's CPU code generation runs at its cheapest level: the tests compile far more than they
execute, and it roughly halves their compile time (measured: 152 s -> 100 s of CPU time for
test_expert_parallel.py + test_model.py).
"""

import os
import shutil
import sys
import tempfile

import numpy as np
import pytest

os.environ.setdefault(
    "XLA_FLAGS", "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")
# One-device computations run inline, not queued. Queued, the eager ops dispatched behind an
# interpreted Pallas GPU kernel (whose simulated threads each execute a program from inside the
# kernel's callback) could fill the CPU client's in-flight slots, and the kernel's last thread
# then waited at xla::Semaphore::Acquire forever: test_fp8_mgpu.py's eager value_and_grad of
# the interpreted fp8_linear hung a whole test run once in four, and in a loop of that test
# under load 2 runs in 2 (after 10 and 38 iterations), against none in 100 inline.
jax.config.update("jax_cpu_enable_async_dispatch", False)


# The persistent XLA cache that the test session's training subprocesses share (programs one run
# compiled, the next loads): a fresh directory per `pytest` invocation, made by the controller
# before xdist starts its workers (they inherit the variable) and removed at its end, so that
# no run depends on what an earlier session left behind.
XLA_CACHE_VAR = "LING_TEST_XLA_CACHE"


def pytest_configure(config):
  if "PYTEST_XDIST_WORKER" not in os.environ:
    config.xla_cache_dir = os.environ[XLA_CACHE_VAR] = tempfile.mkdtemp(prefix="ling-jax-xla-")


def pytest_unconfigure(config):
  if getattr(config, "xla_cache_dir", None):
    shutil.rmtree(config.xla_cache_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
  """A small local text corpus (the stdlib is big; the end-to-end runs only need a few files)."""
  root = tmp_path_factory.mktemp("corpus")
  rng = np.random.default_rng(0)
  words = ["def", "return", "self", "import", "class", "for", "in", "if", "else", "x", "y", "("]
  for i in range(40):
    text = "\n".join(" ".join(rng.choice(words, size=12)) for _ in range(30))
    (root / f"file_{i:02d}.py").write_text(text)
  return str(root)


# Seconds each file takes under `make test` on this 2-core machine, unloaded (measured, rounded;
# only their order matters). Files run whole on 2 workers (`--dist loadfile
# --no-loadscope-reorder`) in collection order, so the longest go first and the short ones fill
# in at the end: no worker is left with a long file while the other idles. Files not listed count
# as DEFAULT_COST_S. This orders the files; it skips nothing.
FILE_COST_S = {
    "test_trainer.py": 90, "test_grouped_matmul_mgpu.py": 80, "test_fp8_mgpu.py": 75,
    "test_fp8.py": 75, "test_sharding.py": 60, "test_multihost.py": 55, "test_train.py": 55,
    "test_profiling.py": 55, "test_check_fp8_model.py": 35, "test_phases.py": 35,
    "test_fp8_dequantize_backend.py": 30,
    "test_notebooks.py": 30, "test_moe_backends.py": 30, "test_fp8_quant_kernel.py": 30,
    "test_rl.py": 25, "test_scaling.py": 25, "test_model.py": 25, "test_expert_parallel.py": 20,
    "test_hf.py": 20, "test_dispatch.py": 15, "test_generate.py": 15, "test_grouped_matmul.py": 15,
    "test_fp8_tgmm_mgpu.py": 10, "test_grouped_matmul_tpu.py": 10, "test_router.py": 10,
    "test_checkpoint.py": 10,
}
DEFAULT_COST_S = 5


def pytest_collection_modifyitems(items):
  def cost(item):
    return FILE_COST_S.get(os.path.basename(str(item.path)), DEFAULT_COST_S)
  items.sort(key=lambda item: -cost(item))  # Stable: a file's tests keep their order.
