"""The console progress line (ling_jax/metrics.py)."""

from ling_jax import metrics


def _scalars(**extra):
  return {"loss": 2.5, "mtp_ce": 2.75, "lr": 1e-3, "grad_norm": 0.5, "max_violation": 0.25,
          **extra}


def test_progress_line_of_a_timed_step_has_throughput_mfu_and_eta():
  line = metrics.progress_line(10, 100, _scalars(tokens_per_sec=12345.6, mfu=0.4321,
                                                 eta_sec=3725.0, nan_skips=2.0))
  assert line == ("step 10/100 | loss 2.5000 | mtp 2.7500 | lr 1.00e-03 | gnorm 0.500 | "
                  "tok/s 12,346 | mfu 43.2% | maxvio 0.25 | nan-skips 2 | eta 1:02:05")


def test_progress_line_of_the_first_step_has_no_throughput():
  # The trainer leaves throughput out of the first step: its time was compilation.
  line = metrics.progress_line(1, 100, _scalars(nan_skips=0.0))
  assert line == "step 1/100 | loss 2.5000 | mtp 2.7500 | lr 1.00e-03 | gnorm 0.500 | maxvio 0.25"
  assert "mfu n/a" in metrics.progress_line(2, 100, _scalars(tokens_per_sec=1.0, mfu=None))
