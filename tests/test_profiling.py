"""Step-time breakdowns (ling_jax/profiling.py) and the throughput benchmark's bookkeeping."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from ling_jax import config as config_lib
from ling_jax import profiling
from tests import test_trainer

_HLO = """HloModule jit_step, entry_computation_layout={()->f32[]}

%body.1 (p: f32[8]) -> f32[8] {
  %p = f32[8]{0} parameter(0)
  ROOT %fusion.3 = f32[8]{0} fusion(%p), kind=kLoop, metadata={op_name="jit(step)/moe_layers/mlp/experts/mul"}
}

ENTRY %main (a: f32[8]) -> f32[] {
  %a = f32[8]{0} parameter(0)
  %while.2 = f32[8]{0} while(%a), condition=%c, body=%body.1, metadata={op_name="jit(step)/while"}
  %custom-call.7 = f32[8]{0} custom-call(%a), custom_call_target="x", metadata={op_name="jit(step)/transpose(jvp(Ling2))/moe_layers/attention/attention_core/dot"}
  ROOT %reduce.9 = f32[] reduce(%while.2), metadata={op_name="jit(step)/optimizer/reduce_sum"}
}
"""  # noqa: E501 (HLO lines are long)


@pytest.mark.parametrize("op_name, category", [
    ("jit(s)/optimizer/mul", "optimizer"),
    ("jit(s)/jvp(Ling2)/moe_layers/mlp/router/dot_general", "router"),
    ("jit(s)/transpose(jvp(Ling2))/moe_layers/mlp/experts/dispatch/gather", "moe_dispatch"),
    ("jit(s)/moe_layers/mlp/experts/shard_map/all_to_all/all_to_all", "moe_dispatch"),
    ("jit(f)/transpose(jvp(dispatch))/gather", "moe_dispatch"),
    ("jit(s)/jvp(Ling2)/moe_layers/mlp/experts/anonymous/mpmd_map", "moe_experts"),
    ("jit(s)/moe_layers/mlp/experts/custom_vjp_call/dot", "moe_experts"),
    ("jit(s)/moe_layers/mlp/shared_experts/gate/dot_general", "shared_expert"),
    ("jit(s)/dense_layers/attention/attention_core/softmax", "attention_core"),
    ("jit(s)/dense_layers/attention/qkv/dot_general", "attention_proj"),
    ("jit(s)/dense_layers/mlp/down/dot_general", "dense_ffn"),
    ("jit(s)/moe_layers/mlp/add", "moe_other"),
    ("jit(s)/transpose(jvp(Ling2))/lm_head/dot_general", "lm_head_loss"),
    ("jit(s)/transpose(jvp(cross_entropy))/reduce_max", "lm_head_loss"),
    ("jit(s)/mtp_0/eh_proj/dot_general", "mtp_other"),
    ("jit(s)/jvp(Ling2)/while/body/dynamic_update_slice", "other"),
    ("", "other"),
])
def test_categories_follow_the_name_stack(op_name, category):
  assert profiling.categorize(op_name) == category


@pytest.mark.parametrize("op, op_name, kind", [
    ("mpmd_map.139", "jit(train_step)/transpose(jvp(Ling2))/gate_up/jit(gmm_fp8)/anonymous/"
     "mpmd_map", "jit(gmm_fp8)"),
    ("pallas_call.3", "jit(train_step)/mlp/experts/jit(quantize)/jit(inner)/pallas_call",
     "jit(inner)"),
    ("input_transpose_fusion.12", "jit(train_step)/mlp/experts/convert_element_type",
     "input_transpose_fusion"),
    ("custom-call", "", "custom-call"),
])
def test_op_kind_is_the_innermost_kernel_wrapper_or_the_instruction_kind(op, op_name, kind):
  assert profiling.op_kind(op, op_name) == kind


def test_instruction_names_read_every_computation():
  names = profiling.instruction_names(_HLO)
  assert names["fusion.3"] == "jit(step)/moe_layers/mlp/experts/mul"
  assert names["custom-call.7"].endswith("attention_core/dot")
  assert names["reduce.9"] == "jit(step)/optimizer/reduce_sum"
  assert names["a"] == ""
  assert profiling.module_name(_HLO) == "jit_step"
  with pytest.raises(ValueError, match="HloModule"):
    profiling.module_name("nothing")


def _fake_trace(path, events):
  """Writes a Perfetto JSON trace of (pid, hlo_op, microseconds) events, GPU pid 1, host pid 2."""
  import gzip  # pylint: disable=g-import-not-at-top
  meta = [{"ph": "M", "name": "process_name", "pid": 1, "args": {"name": "/device:GPU:0"}},
          {"ph": "M", "name": "process_name", "pid": 2, "args": {"name": "/host:CPU"}}]
  trace = meta + [{"ph": "X", "pid": pid, "name": op, "dur": dur,
                   "args": {"hlo_op": op, "hlo_module": module}}
                  for pid, op, dur, module in events]
  with gzip.open(path, "wt") as f:
    json.dump({"traceEvents": trace}, f)


def test_breakdown_counts_device_ops_once(tmp_path):
  path = str(tmp_path / "perfetto_trace.json.gz")
  _fake_trace(path, [
      (1, "fusion.3", 600.0, "jit_step"), (1, "fusion.3", 600.0, "jit_step"),
      (1, "custom-call.7", 300.0, "jit_step"), (1, "reduce.9", 100.0, "jit_step"),
      (1, "while.2", 5000.0, "jit_step"),  # Spans the loop body: not counted again.
      (2, "fusion.3", 9000.0, "jit_step"),  # Host-side launch of the same op: not device time.
      (1, "fusion.3", 7000.0, "jit_other"),  # Another program.
  ])
  summary = profiling.breakdown(path, _HLO, steps=2)
  assert summary["ms_per_step"] == pytest.approx(
      {"moe_experts": 0.6, "attention_core": 0.15, "optimizer": 0.05})
  assert summary["device_ms_per_step"] == pytest.approx(0.8)
  assert summary["share"]["moe_experts"] == pytest.approx(0.75)
  assert summary["top_ops"][0]["op"] == "fusion.3"
  assert summary["kinds"]["moe_experts"] == pytest.approx({"fusion": 0.6})
  assert summary["kinds"]["attention_core"] == pytest.approx({"custom-call": 0.15})
  assert "moe_experts" in profiling.format_breakdown(summary, step_ms=1.0)
  with pytest.raises(ValueError, match="holds no op"):
    profiling.breakdown(path, _HLO.replace("jit_step", "jit_nothing"), steps=2)


def test_breakdown_of_a_real_cpu_profile(tmp_path):
  """A profiled CPU program: the scope doing 64x the matmul work gets most of the time."""
  def step(x, w):
    with jax.named_scope("experts"):
      y = jax.lax.fori_loop(0, 8, lambda i, y: jnp.tanh(y @ w), x)
    with jax.named_scope("router"):
      z = jnp.tanh(x[:64] @ w[:, :64])
    return y.sum() + z.sum()

  fn = jax.jit(step)
  x, w = jnp.ones((512, 512)) * 0.01, jnp.eye(512)
  compiled = fn.lower(x, w).compile()
  compiled(x, w).block_until_ready()
  with profiling.trace(str(tmp_path)):
    for _ in range(3):
      compiled(x, w).block_until_ready()
  summary = profiling.breakdown(profiling.find_trace(str(tmp_path)), compiled.as_text(), 3)
  assert summary["share"]["moe_experts"] > 0.5, summary
  assert summary["ms_per_step"].get("router", 0.0) < summary["ms_per_step"]["moe_experts"]
  assert sum(summary["share"].values()) == pytest.approx(1.0)
  assert not any(o["op"].startswith("while") for o in summary["top_ops"])


def test_projection_to_full_depth_is_linear_in_layers():
  rows = [{"quant": "none", "layers": layers, "step_ms": 10.0 + 5.0 * layers, "batch": 2,
           "seq_len": 1000, "flops_per_token": 1e9, "_full_flops_ratio": 3.0}
          for layers in (2, 4)]
  (p,) = profiling.project_to_depth(rows, full_depth=20, peak_tflops=1.0)
  assert p["ms_per_layer"] == pytest.approx(5.0) and p["fixed_ms"] == pytest.approx(10.0)
  assert p["step_ms"] == pytest.approx(110.0)
  assert p["tokens_per_s"] == pytest.approx(2000 / 0.11)
  assert p["mfu"] == pytest.approx(3e9 * 2000 / 0.11 / 1e12)
  assert profiling.project_to_depth(rows[:1], full_depth=20, peak_tflops=1.0) == []


def test_loss_curves_compare_in_window_means():
  base = [4.0, 2.0, 3.0, 1.0, 9.0]  # Window means 3.0 and 2.0; the fifth step is cut.
  fp8 = [4.03, 2.03, 2.0, 2.0]  # +1% and 0%.
  rows = [{"name": "none-L2", "quant": "none", "layers": 2, "losses": base},
          {"name": "fp8-L2", "quant": "fp8_blockwise", "layers": 2, "losses": fp8},
          {"name": "none-L4", "quant": "none", "layers": 4, "losses": base}]  # No partner.
  (c,) = profiling.compare_losses(rows, window=2, tolerance=0.0105)
  assert (c["name"], c["baseline"], c["steps"]) == ("fp8-L2", "none-L2", 4)
  assert [w["rel_gap"] for w in c["windows"]] == pytest.approx([0.01, 0.0])
  assert c["max_rel_gap"] == pytest.approx(0.01) and c["overlap"]
  assert not profiling.compare_losses(rows, window=2, tolerance=0.0095)[0]["overlap"]
  fp8[2:] = [1.0, 1.0]  # Second window 1.0 against 2.0: -50%, the largest gap by size.
  assert profiling.compare_losses(rows, 2, 0.01)[0]["max_rel_gap"] == pytest.approx(-0.5)
  with pytest.raises(ValueError, match="window"):
    profiling.compare_losses(rows, window=0, tolerance=0.01)


def test_bench_train_end_to_end(tmp_path):
  """The CLI on a micro model: timed steps, a breakdown from its own trace, and the files."""
  cmd = [sys.executable, "-m", "experiments.bench_train", "--config=configs/ling2.py:tiny",
         *test_trainer.MICRO_MODEL, "--config.train.batch_size=2", "--config.train.seq_len=32",
         f"--config.train.compilation_cache_dir={test_trainer._CACHE}",
         f"--out_dir={tmp_path}", "--steps=2", "--warmup=1", "--profile_steps=1",
         "--data=synthetic", "--peak_tflops=1", "--depths=2,3"]
  proc = subprocess.run(cmd, capture_output=True, text=True, env=test_trainer._env(),
                        timeout=600, cwd=os.path.dirname(os.path.dirname(__file__)))
  assert proc.returncode == 0, proc.stderr[-3000:]
  shallow, result = [json.loads(line) for line in open(tmp_path / "results.jsonl")]
  # Every variant starts from the same batch (the input is rewound between them).
  assert shallow["name"] == "none-L2" and shallow["breakdown"] is None
  assert shallow["input_digest"] == result["input_digest"] is not None
  assert result["name"] == "none-L3" and result["tokens_per_s"] > 0
  assert result["mfu"] == pytest.approx(
      result["flops_per_token"] * result["tokens_per_s"] / 1e12)
  assert len(result["losses"]) == 3 and result["timed_from_step"] == 1  # Warm-up + timed.
  assert all(np.isfinite(result["losses"]))
  # The routing's max violation of every step run: warm-up 1, timed 2, traced 1 (on a GPU also
  # the two of the recompiled program's timing).
  assert len(result["max_violations"]) == 4 and min(result["max_violations"]) >= 0
  # And each MoE layer's (the trunk's, then the MTP block's): 8 experts, top-2, so at most
  # 8 / 2 - 1 = 3, with the step's max the largest of them.
  assert len(result["layer_violations"]) == 4
  for row, worst in zip(result["layer_violations"], result["max_violations"]):
    assert len(row) == result["moe_layers"] + 1 and all(0 <= v <= 3 for v in row)
    assert max(row) == pytest.approx(worst, abs=1e-3)
  shares = result["breakdown"]["share"]
  assert sum(shares.values()) == pytest.approx(1.0)
  assert {"moe_experts", "optimizer", "attention_core"} <= set(shares)
  assert (tmp_path / "none-L3.trace.json.gz").exists()
  assert (tmp_path / "none-L3.hlo.txt.gz").exists()
  summary_md = (tmp_path / "summary.md").read_text()
  assert "| none-L2 |" in summary_md and "by op kind" in summary_md
  assert "routing max violation" in summary_md
  assert "Routing max violation of each MoE layer" in summary_md


def test_bench_train_repeats_rerun_each_variant_from_the_same_start(tmp_path):
  """--repeats: every variant again in turn, with its compiled step reused, from the same initial
  state and batches (on CPU the step is deterministic, so the runs agree exactly), and the
  summary's band comparison over the runs."""
  cmd = [sys.executable, "-m", "experiments.bench_train", "--config=configs/ling2.py:tiny",
         *test_trainer.MICRO_MODEL, "--config.train.batch_size=2", "--config.train.seq_len=32",
         f"--config.train.compilation_cache_dir={test_trainer._CACHE}",
         f"--out_dir={tmp_path}", "--steps=2", "--warmup=1", "--profile_steps=0",
         "--data=synthetic", "--peak_tflops=1", "--loss_window=1", "--repeats=2",
         "--quants=none,none+router_precision=float32"]
  proc = subprocess.run(cmd, capture_output=True, text=True, env=test_trainer._env(),
                        timeout=600, cwd=os.path.dirname(os.path.dirname(__file__)))
  assert proc.returncode == 0, proc.stderr[-3000:]
  rows = [json.loads(line) for line in open(tmp_path / "results.jsonl")]
  assert [(r["name"], r["variant"], r["repeat"]) for r in rows] == [
      ("none-L2-run1", "none", 0), ("none+router_precision=float32-L2-run1",
                                    "none+router_precision=float32", 0),
      ("none-L2-run2", "none", 1), ("none+router_precision=float32-L2-run2",
                                    "none+router_precision=float32", 1)]
  assert rows[0]["losses"] == rows[2]["losses"] and rows[1]["losses"] == rows[3]["losses"]
  assert len(rows[0]["losses"]) == 3 and rows[0]["input_digest"] == rows[3]["input_digest"]
  summary_md = (tmp_path / "summary.md").read_text()
  assert ("none+router_precision=float32 (2 run(s)) against none (2 run(s)), 2 layers, 1-step "
          "means over 3 steps") in summary_md
  # The second runs reuse the first runs' executables.
  assert proc.stderr.count("compiled in") == 2
  assert "[none-L2-run2] 0.00B params; runs none-L2's compiled step again" in proc.stderr


def test_bench_train_scores_final_weights_in_each_eval_quant(tmp_path):
  """--eval_quants: each variant's final weights on held-out batches with the linears in bf16
  and in FP8 (the same weights: FP8's forward moves the loss by its rounding, a few percent at
  most, never zero), in results.jsonl and the summary."""
  cmd = [sys.executable, "-m", "experiments.bench_train", "--config=configs/ling2.py:tiny",
         *test_trainer.MICRO_MODEL, "--config.train.batch_size=2", "--config.train.seq_len=32",
         "--config.model.hidden_size=128", "--config.train.eval_batches=2",
         f"--config.train.compilation_cache_dir={test_trainer._CACHE}",
         f"--out_dir={tmp_path}", "--steps=1", "--warmup=1", "--profile_steps=0",
         "--data=synthetic", "--peak_tflops=1", "--quants=none,fp8_blockwise+fp8_recipe=dense_only",
         "--eval_quants=none,fp8_blockwise"]
  proc = subprocess.run(cmd, capture_output=True, text=True, env=test_trainer._env(),
                        timeout=600, cwd=os.path.dirname(os.path.dirname(__file__)))
  assert proc.returncode == 0, proc.stderr[-3000:]
  rows = [json.loads(line) for line in open(tmp_path / "results.jsonl")]
  assert [list(r["eval_losses"]) for r in rows] == [["none", "fp8_blockwise"]] * 2
  for r in rows:
    bf16, fp8 = r["eval_losses"]["none"], r["eval_losses"]["fp8_blockwise"]
    # Random tokens over a 512 vocabulary, two steps in: near ln(512) = 6.24.
    assert 5.5 < bf16 < 7.0 and 0 < abs(fp8 - bf16) < 0.05 * bf16
  # The two variants trained differently, so their weights score differently.
  assert rows[0]["eval_losses"]["none"] != rows[1]["eval_losses"]["none"]
  summary_md = (tmp_path / "summary.md").read_text()
  assert "| variant | none | fp8_blockwise |" in summary_md
  assert f"| none-L2 | {rows[0]['eval_losses']['none']:.4f} |" in summary_md


@pytest.mark.parametrize("flags, message", [
    (["--depths=2,4", "--profile_depth=3"], "--profile_depth=3 is not one of --depths=2,4"),
    (["--depths=1,3"], "--depths: 1 layers leave no MoE layer after the 1 dense ones. Fix: use "
                       "depths above 1."),
    (["--depths=2,four"], "--depths=2,four: give whole numbers of layers"),
    (["--repeats=0"], "--repeats=0: run each variant at least once"),
    (["--quants=none,none+moe_backnd=reference"],
     "--quants=none+moe_backnd=reference: 'moe_backnd=reference' is not field=value"),
    (["--eval_quants=none,fp16"], "--eval_quants=fp16: not a model.quant value. Fix: use some "
                                  "of none, fp8_blockwise."),
    (["--eval_quants=none", "--config.train.eval_batches=0"],
     "config.train.eval_batches is 0. Fix: set it to 1 or more."),
])
def test_bench_train_refuses_bad_flags_before_it_starts(tmp_path, flags, message):
  out = tmp_path / "out"
  cmd = [sys.executable, "-m", "experiments.bench_train", "--config=configs/ling2.py:tiny",
         *flags, f"--out_dir={out}"]
  proc = subprocess.run(cmd, capture_output=True, text=True, env=test_trainer._env(),
                        timeout=300, cwd=os.path.dirname(os.path.dirname(__file__)))
  assert proc.returncode != 0
  assert message in proc.stderr + proc.stdout
  assert not out.exists()  # refused before anything is written or compiled


def test_failed_variants_are_listed_with_their_errors():
  assert profiling.failure_rows([]) == []
  lines = profiling.failure_rows([
      ("none-L8", RuntimeError("RESOURCE_EXHAUSTED: Out of memory allocating 77 GiB\nmore")),
      ("fp8_blockwise-L8", AssertionError())])
  assert "| none-L8 | RuntimeError: RESOURCE_EXHAUSTED: Out of memory allocating 77 GiB |" in lines
  assert "| fp8_blockwise-L8 | AssertionError:  |" in lines
  assert lines[-3].startswith("|---|")


def test_variant_specs_carry_typed_model_overrides():
  model = ml_collections.ConfigDict({"quant": "none", "embedding_backward": "sorted",
                                     "num_hidden_layers": 2, "unroll_layers": False})
  assert profiling.parse_variant("fp8_blockwise", model) == ("fp8_blockwise", {})
  quant, overrides = profiling.parse_variant(
      "none+embedding_backward=scatter+num_hidden_layers=4+unroll_layers=true", model)
  assert quant == "none"
  assert overrides == {"embedding_backward": "scatter", "num_hidden_layers": 4,
                       "unroll_layers": True}
  with pytest.raises(config_lib.ConfigError, match="'no_such=1' is not field=value"):
    profiling.parse_variant("none+no_such=1", model)
  with pytest.raises(config_lib.ConfigError, match="num_hidden_layers='four' is not a int"):
    profiling.parse_variant("none+num_hidden_layers=four", model)
  with pytest.raises(config_lib.ConfigError, match="unroll_layers='yes'"):
    profiling.parse_variant("none+unroll_layers=yes", model)


def test_loss_curves_of_one_quant_compare_by_variant():
  """A control run (same quant, other overrides) is compared like another quant; a repeat of
  the baseline's own variant at the same depth is not."""
  rows = [{"name": "none-L2", "variant": "none", "quant": "none", "layers": 2,
           "losses": [2.0, 2.0]},
          {"name": "none+x=1-L2", "variant": "none+x=1", "quant": "none", "layers": 2,
           "losses": [2.2, 2.2]}]
  (c,) = profiling.compare_losses(rows, window=2, tolerance=0.01)
  assert c["baseline"] == "none-L2" and c["max_rel_gap"] == pytest.approx(0.1)
  assert not c["overlap"]
  assert profiling.compare_losses(rows[:1] * 2, window=2, tolerance=0.01) == []


def _run(variant, losses, layers=2, digest="d0"):
  return {"name": f"{variant}-L{layers}", "variant": variant, "quant": variant.split("+")[0],
          "layers": layers, "losses": losses, "input_digest": digest}


def test_loss_bands_judge_a_variant_against_the_baselines_own_spread():
  """Window means of three baseline runs give a band; the variant's mean over its runs must lie
  in it, widened by the tolerance."""
  rows = [_run("none", [2.0, 2.0, 1.0, 1.0, 5.0]),  # Windows of 2: 2.0, 1.0 (the 5th is cut).
          _run("none", [2.2, 2.2, 1.1, 1.1]),
          _run("none", [2.1, 2.1, 0.9, 0.9]),
          _run("fp8", [2.3, 2.3, 1.0, 1.0]),  # Mean over the two FP8 runs: 2.25, 1.05.
          _run("fp8", [2.2, 2.2, 1.1, 1.1])]
  (b,) = profiling.loss_bands(rows, "none", window=2, tolerance=0.0)
  assert (b["variant"], b["baseline_runs"], b["runs"], b["steps"]) == ("fp8", 3, 2, 4)
  first, second = b["windows"]
  assert first["band"] == pytest.approx((2.0, 2.2)) and first["baseline"] == pytest.approx(2.1)
  assert first["runs"] == pytest.approx([2.3, 2.2]) and first["loss"] == pytest.approx(2.25)
  assert first["rel_gap"] == pytest.approx(0.15 / 2.1)
  assert not first["inside"] and second["inside"]  # 2.25 > 2.2; 1.05 in [0.9, 1.1].
  assert not b["overlap"] and b["baseline_spread"] == pytest.approx(0.2 / 1.0)
  # 2.25 is 2.3% past the band's top: inside once widened by 2.5%, not by 2%.
  assert profiling.loss_bands(rows, "none", 2, tolerance=0.025)[0]["overlap"]
  assert not profiling.loss_bands(rows, "none", 2, tolerance=0.02)[0]["overlap"]
  # The baseline defaults to the first row's variant.
  assert profiling.loss_bands(rows, None, 2, 0.0)[0]["baseline"] == "none"


def test_loss_bands_give_each_runs_mean_over_a_span():
  """Per-run means over steps [first, last): the gap of each variant run to the baseline runs'
  mean, and how many variant runs lie above every baseline run."""
  rows = [_run("none", [9.0, 9.0, 2.0, 2.0, 1.0, 1.0]),
          _run("none", [5.0, 5.0, 2.2, 2.2, 1.2, 1.2]),
          _run("fp8", [9.0, 9.0, 2.4, 2.4, 1.2, 1.2]),  # Steps 2-5: 1.8 (above 1.5 and 1.7).
          _run("fp8", [9.0, 9.0, 2.0, 2.0, 1.4, 1.4])]  # 1.7: level with the top, not above.
  (b,) = profiling.loss_bands(rows, "none", window=2, tolerance=0.0, span=(2, None))
  assert b["span"] == (2, 6)
  assert b["baseline_span_means"] == pytest.approx([1.5, 1.7])
  assert b["span_means"] == pytest.approx([1.8, 1.7])
  assert b["span_gaps"] == pytest.approx([1.8 / 1.6 - 1, 1.7 / 1.6 - 1])
  assert b["runs_above"] == 1
  # The variants' mean gap, 1.75 / 1.6 - 1, and its standard error (Welch): the sample
  # variances are 0.02 and 0.005, so sqrt(0.02 / 2 + 0.005 / 2) / 1.6.
  assert b["span_gap"] == pytest.approx(1.75 / 1.6 - 1)
  assert b["span_gap_se"] == pytest.approx((0.02 / 2 + 0.005 / 2) ** 0.5 / 1.6)
  assert "Their mean +9.38% (standard error 6.99%)." in profiling.format_bands([b])
  (b,) = profiling.loss_bands(rows, "none", 2, 0.0, span=(4, 6))
  assert b["span_means"] == pytest.approx([1.2, 1.4]) and b["runs_above"] == 1
  # One run a side has no spread to take a standard error from.
  (b,) = profiling.loss_bands(rows[1:3], "none", 2, 0.0, span=(2, None))
  assert b["span_gap"] == pytest.approx(1.8 / 1.7 - 1) and b["span_gap_se"] is None
  assert "Their mean +5.88%.\n" in profiling.format_bands([b])
  # The default span is every compared step.
  (b,) = profiling.loss_bands(rows, "none", 2, 0.0)
  assert b["span"] == (0, 6) and b["baseline_span_means"] == pytest.approx([4.0, 8.4 / 3])
  for span, match in [((4, 4), "span=4:4: give steps FIRST:LAST"),
                      ((-1, None), "span=-1:: give steps"),
                      ((2, 8), "span=2:8: these runs compare steps 0-5"),
                      ((6, None), "span=6:: these runs compare steps 0-5")]:
    with pytest.raises(ValueError, match=match):
      profiling.loss_bands(rows, "none", 2, 0.0, span=span)


def test_loss_bands_with_one_baseline_run_agree_with_compare_losses():
  rows = [_run("none", [3.0, 3.0, 2.0, 2.0]), _run("fp8", [3.03, 3.03, 2.0, 2.0])]
  for tolerance in (0.0095, 0.0105):
    (band,) = profiling.loss_bands(rows, "none", 2, tolerance)
    (pair,) = profiling.compare_losses(rows, 2, tolerance)
    assert band["overlap"] == pair["overlap"]
    assert [w["rel_gap"] for w in band["windows"]] == pytest.approx(
        [w["rel_gap"] for w in pair["windows"]])


def test_loss_bands_refuse_runs_they_cannot_compare():
  rows = [_run("none", [1.0, 1.0]), _run("fp8", [1.0, 1.0], digest="other")]
  with pytest.raises(ValueError, match="different batches"):
    profiling.loss_bands(rows, "none", 2, 0.01)
  with pytest.raises(ValueError, match="baseline='bf16'.*'fp8', 'none'"):
    profiling.loss_bands(rows, "bf16", 2, 0.01)
  with pytest.raises(ValueError, match="window=0"):
    profiling.loss_bands(rows, "none", 0, 0.01)
  # Each depth is its own comparison; runs shorter than a window compare nothing.
  assert profiling.loss_bands([_run("none", [1.0]), _run("fp8", [1.0])], "none", 2, 0.01) == []


def test_compare_curves_cli(tmp_path):
  """The command line over two processes' files: the table, exit 1 outside the band, and a clear
  error for a file that is not bench_train's."""
  a, b, bad = tmp_path / "a.jsonl", tmp_path / "b.jsonl", tmp_path / "bad.jsonl"
  a.write_text("\n".join(json.dumps(r) for r in [_run("none", [2.0, 2.0]),
                                                 _run("fp8", [2.5, 2.5])]) + "\n")
  b.write_text(json.dumps(_run("none", [2.2, 2.2])) + "\n")
  bad.write_text(json.dumps({"name": "x"}) + "\n")
  cmd = [sys.executable, "-m", "experiments.compare_curves", "--window=2", "--baseline=none"]
  out = subprocess.run([*cmd, f"--results={a},{b}", f"--out={tmp_path / 'c.md'}"],
                       capture_output=True, text=True, check=False)
  assert out.returncode == 1, out.stderr
  assert "fp8 (1 run(s)) against none (2 run(s))" in out.stdout
  assert "| 0-1 | 2.1000 [2.0000, 2.2000] | 2.5000 | 2.5000 | +19.05% | NO |" in out.stdout
  assert (tmp_path / "c.md").read_text() + "\n" == out.stdout  # print() adds the newline.
  assert ("over steps 0-1: none 2.0000, 2.2000; fp8 2.5000 (+19.05%) against the none runs' "
          "mean; 1 of 1 above every none run.") in out.stdout
  for span in ("1", "a:2"):
    out = subprocess.run([*cmd, f"--results={a},{b}", f"--span={span}"], capture_output=True,
                         text=True, check=False)
    assert out.returncode != 0 and f"--span='{span}': give FIRST:LAST steps" in out.stderr
  out = subprocess.run([*cmd, f"--results={a},{bad}"], capture_output=True, text=True,
                       check=False)
  assert out.returncode != 0 and "bad.jsonl line 1 has no per-step losses" in out.stderr


def test_safeguard_rows_average_steps_and_keep_the_worst_op():
  def step(i, under, under_max, cos, cos_min):
    return {"step": i, "fp8_act_underflow": under, "fp8_act_underflow_max": under_max,
            "fp8_act_cos": cos, "fp8_act_cos_min": cos_min}

  rows = [{"name": "none-L2", "fp8_metrics": []},
          {"name": "fp8-L2", "fp8_metrics": [step(9, 0.001, 0.004, 0.9990, 0.9900),
                                             step(19, 0.003, 0.002, 0.9980, 0.9950)]}]
  lines = profiling.safeguard_rows(rows)
  assert lines[-1] == "| fp8-L2 | 2 | act | 0.200% [0.400%] | 0.99850 [0.99000] |"
  assert len(lines) == 6  # The title, the header and one kind of one variant.
  assert profiling.safeguard_rows(rows[:1]) == []
