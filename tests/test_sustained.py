"""Sustained-stream timing and nvidia-smi's clock and power samples (ling_jax.profiling), as
`experiments/bench_fp8.py --sustained_s` uses them; nvidia-smi is a stand-in script here."""

import os
import stat
import time

import jax
import jax.numpy as jnp

from ling_jax import profiling


def test_smi_lines_parse_and_window_medians_skip_the_settling_second():
  base = time.mktime(time.strptime("2026/12/02 18:39:30", "%Y/%m/%d %H:%M:%S"))
  lines = ["2026/12/02 18:39:30.100, 1980, 124.5, 0x0000000000000000",
           "2026/12/02 18:39:31.500, 1455, 690.0, 0x0000000000000004",
           "2026/12/02 18:39:31.700, 1410, 694.0, 0x0000000000000004",
           "2026/12/02 18:39:31.900, 1515, 698.0, 0x0000000000000004",
           "2026/12/02 18:39:32.000, [N/A], 700.0, 0x0000000000000004",  # skipped
           "2026/12/02 18:39:3"]  # a line cut short: skipped
  samples = profiling.parse_smi_samples(lines)
  assert [s[1] for s in samples] == [1980.0, 1455.0, 1410.0, 1515.0]
  assert abs(samples[1][0] - (base + 1.5)) < 1e-6
  got = profiling.smi_window(samples, base, base + 2.0)  # the first second settles
  assert got == {"clock_mhz": 1455.0, "power_w": 694.0, "throttle": ["0x0000000000000004"],
                 "samples": 3}
  assert profiling.smi_window(samples, base + 5.0, base + 9.0) is None


def test_gpu_sampler_reads_a_running_nvidia_smi(tmp_path, monkeypatch):
  """A stand-in nvidia-smi prints a sample every 50 ms in the queried format; the sampler's
  window over a stretch of it gives that clock and power, inside the block and after it, and
  it stops the process on exit."""
  fake = tmp_path / "nvidia-smi"
  fake.write_text("#!/bin/bash\necho \"$@\" > " + str(tmp_path / "args") + "\n"
                  "while true; do\n"
                  "  date '+%Y/%m/%d %H:%M:%S.%N, 1455, 694.2, 0x0000000000000004' | "
                  "sed 's/\\.\\([0-9]\\{3\\}\\)[0-9]*,/.\\1,/'\n"
                  "  sleep 0.05\ndone\n")
  fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
  monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
  with profiling.GpuSampler(period_ms=50) as smi:
    assert smi.available
    start = time.time()
    time.sleep(1.6)
    got = smi.window(start, time.time())
    proc = smi._proc
  assert proc.poll() is not None  # stopped
  assert got is not None and got["samples"] >= 3, got
  after = smi.window(start, time.time())  # after the block: the samples it kept
  assert after["clock_mhz"] == 1455.0 and after["samples"] >= got["samples"], after
  assert (got["clock_mhz"], got["power_w"], got["throttle"]) == (
      1455.0, 694.2, ["0x0000000000000004"])
  args = (tmp_path / "args").read_text()
  assert "--query-gpu=timestamp,clocks.sm,power.draw" in args and "--loop-ms=50" in args


def test_gpu_sampler_without_nvidia_smi_gives_no_window(monkeypatch, tmp_path):
  monkeypatch.setenv("PATH", str(tmp_path))
  with profiling.GpuSampler() as smi:
    assert not smi.available and smi.window(0.0, time.time()) is None


def test_sustained_rates_stream_batches_for_the_time_asked():
  f = jax.jit(lambda x: x * 2.0 + 1.0)
  x = jnp.ones((256, 256))
  start, end, rates = profiling.sustained_rates(f, x, seconds=0.3, idle_s=0.0, calls=5)
  assert end - start >= 0.3 and rates and all(r > 0 for r in rates)
