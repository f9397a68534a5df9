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


def test_ablation_rows_compare_over_the_steps_every_run_reached():
  base = _run([4.0, 4.0, 2.0, 2.0, 1.0, 3.0])
  full = _run([4.4, 4.4, 2.2, 2.2, 1.1, 3.3])
  half = _run([4.2, 4.2, 2.1, 2.1])  # cut after step 4: every run is compared on steps 1-4
  rows = {r["run"]: r for r in fp8.ablation_rows({"none": base, "full": full, "half": half},
                                                 "none", "full", window=2)}
  assert rows["half"]["final"] == pytest.approx(2.1)
  assert rows["half"]["vs_baseline"] == pytest.approx(0.05)
  assert rows["half"]["vs_reference"] == pytest.approx(2.1 / 2.2 - 1)
  assert rows["half"]["gaps"] == [pytest.approx(0.05), pytest.approx(0.05)]
  assert rows["full"]["spans"] == ["1-2", "3-4"] and rows["none"]["vs_baseline"] == 0.0
  table = fp8.ablation_markdown(list(rows.values()), "bfloat16")
  assert "| half | 2.1000 | +5.00% | -4.55% | +5.00% | +5.00% |" in table
  with pytest.raises(ValueError, match="--window"):
    fp8.ablation_rows({"none": base, "half": half}, "none", "half", window=5)


def test_seed_summary_is_the_mean_and_spread_of_the_per_seed_gaps():
  results = {
      s: fp8.parity_report(_run([2.0, 2.0]), _run([2.0, 2.0 * (1 + 2 * g)]), window=2)
      for s, g in ((0, 0.01), (1, -0.02), (7, 0.04))}
  # Each pair's final-loss gap is the window mean: (2 + 2(1 + 2g)) / 2 / 2 - 1 = g.
  summary = fp8.seed_summary(results)
  gaps = [0.01, -0.02, 0.04]
  assert summary["seeds"] == [0, 1, 7]
  assert [r["relative_difference"] for r in summary["per_seed"]] == [pytest.approx(g) for g in gaps]
  assert summary["mean_relative_difference"] == pytest.approx(0.01)
  sd = (sum((g - 0.01) ** 2 for g in gaps) / 2) ** 0.5
  assert summary["std_relative_difference"] == pytest.approx(sd)
  assert summary["stderr_relative_difference"] == pytest.approx(sd / 3 ** 0.5)
  assert summary["mean_final_baseline"] == pytest.approx(2.0)
  table = fp8.seed_markdown(summary, "bfloat16")
  assert "| 1 | 2.0000 | 1.9600 | -2.00% |" in table
  assert "| mean of 3 | 2.0000 | 2.0200 | +1.00% (sd 3.00%, s.e. 1.73%) |" in table
  with pytest.raises(ValueError, match="--seeds"):
    fp8.seed_summary({})


def test_verdict_says_which_way_the_gap_goes():
  assert fp8.parity_verdict(-0.0162, 0.01, " on the mean over seeds [0, 1]") == (
      "PARITY FAIL: FP8's final loss is 1.62% below the baseline's on the mean over seeds "
      "[0, 1] (tolerance 1.0%)")
  assert fp8.parity_verdict(0.0023, 0.01) == (
      "PARITY PASS: FP8's final loss is 0.23% above the baseline's (tolerance 1.0%)")
  assert fp8.parity_verdict(0.0, 0.01).startswith("PARITY PASS: FP8's final loss is equal to")
  assert fp8.parity_verdict(0.01, 0.01).startswith("PARITY PASS")  # The bound is inclusive.


_DRIVER = """
import os, sys
from absl import flags
from experiments import fp8_parity
flags.FLAGS(["fp8_parity", "--out_dir=" + sys.argv[1], "--drop_checkpoints", "--steps=3"])
# A stand-in for experiments.train: writes a checkpoint and counts its runs; "full" fails.
fake = ("import os, sys; w = sys.argv[1]; os.makedirs(os.path.join(w, 'checkpoints', '3')); "
        "open(os.path.join(w, 'runs'), 'a').write('x'); sys.exit(sys.argv[2] == 'full')")
fp8_parity.train_command = lambda recipe, workdir, seed=None: [
    sys.executable, "-c", fake, workdir, str(recipe)]
runs = [(None, None), (None, "full")]
print("failed", [os.path.basename(w) for w in fp8_parity._train_all(runs)])
print("failed", [os.path.basename(w) for w in fp8_parity._train_all(runs[:1])])
"""


def test_drop_checkpoints_deletes_a_finished_runs_checkpoints_and_skips_it_next_time(tmp_path):
  """--drop_checkpoints: a run that exits 0 loses its checkpoints and is marked FINISHED, and a
  second invocation does not train it again; a failed run keeps its checkpoints. (A subprocess:
  fp8_parity's absl flags would collide with other experiments' in this process.)"""
  import os
  import subprocess
  import sys
  out = subprocess.run([sys.executable, "-c", _DRIVER, str(tmp_path)], capture_output=True,
                       text=True, cwd=os.path.dirname(os.path.dirname(__file__)), check=True)
  assert out.stdout.splitlines() == ["failed ['fp8_blockwise']", "failed []"], out.stderr
  none, full = tmp_path / "none", tmp_path / "fp8_blockwise"
  assert not (none / "checkpoints").exists() and (none / "FINISHED").read_text() == "3\n"
  assert (none / "runs").read_text() == "x"  # trained once, skipped the second time
  assert (full / "checkpoints" / "3").is_dir() and not (full / "FINISHED").exists()
