"""The FP8 parity report's arithmetic (ling_jax/fp8.py, used by experiments/fp8_parity.py)."""

import pytest

from ling_jax import fp8


def _run(losses, val=None):
  metrics = {s + 1: {"loss": v} for s, v in enumerate(losses)}
  for step, v in (val or {}).items():
    metrics[step]["val_loss"] = v
  return metrics


def test_final_loss_is_the_window_mean_and_the_curve_holds_window_means():
  base = _run([4.0, 4.0, 2.0, 2.0, 1.0, 3.0], val={6: 2.0})
  quant = _run([4.4, 4.4, 2.0, 2.2, 1.1, 3.0], val={6: 2.1})
  result = fp8.parity_report(base, quant, window=2)
  assert result["final_baseline"] == pytest.approx(2.0)
  assert result["final_fp8"] == pytest.approx(2.05)
  assert result["relative_difference"] == pytest.approx(0.025)
  assert [p["step"] for p in result["curve"]] == [2, 4, 6]
  assert result["curve"][0] == {"step": 2, "baseline": 4.0, "fp8": pytest.approx(4.4)}
  assert result["validation"] == [{"step": 6, "baseline": 2.0, "fp8": 2.1}]
  report = fp8.parity_markdown(result, "bfloat16")
  assert "+2.50%" in report and "| 5-6 | 2.0000 | 2.0500 | +2.50% |" in report


def test_too_few_shared_steps_for_the_window_is_a_clear_error():
  with pytest.raises(ValueError, match="--window"):
    fp8.parity_report(_run([1.0, 2.0]), _run([1.0]), window=2)
