"""Scaling laws, FLOP counts, budget-derived configs and the sweep runner."""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
from flax import traverse_util

from configs import ling2
from configs import scaling as scaling_config
from experiments import sweep
from ling_jax import config as config_lib
from ling_jax import params
from ling_jax import scaling
from tests import test_trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("variant, lr, batch", [
    ("mini", 3.36e-4, 4400), ("flash", 2.61e-4, 8352), ("1t", 1.86e-4, 18144)])
def test_laws_give_table1_lr_and_batch_for_released_models(variant, lr, batch):
  """Ling 2.0 Table 1: each released model's compute (20T tokens of 4K) gives its lr and batch."""
  m = ling2.model_config(variant)
  compute = scaling.non_embedding_flops_per_token(m, 4096) * 20e12
  assert scaling.lr_opt(compute) == pytest.approx(lr, rel=0.10)
  assert scaling.batch_opt(compute) / 4096 == pytest.approx(batch, rel=0.10)


def test_tiny_flops_match_a_hand_count():
  m = ling2.model_config("tiny")  # D 128, 1 dense + 3 MoE layers, 4/2 heads of 32, MTP 1.
  qkv_o = 2 * (128 * (4 + 2 * 2) * 32) + 2 * (4 * 32 * 128)  # 98,304
  core = 2 * 2 * 4 * 32 * (128 + 1) / 2  # QK^T and PV, causal: 33,024
  dense_ffn = 2 * 3 * 128 * 384  # 294,912
  moe = 2 * 128 * 16 + 2 * 3 * 128 * 64 * (4 + 1)  # router + 4 routed + 1 shared: 249,856
  lm_head = 2 * 128 * 512
  mtp = 2 * 256 * 128 + (qkv_o + core + moe) + lm_head  # eh_proj, one MoE block, shared head.
  forward = (qkv_o + core + dense_ffn) + 3 * (qkv_o + core + moe) + lm_head + mtp
  assert forward == 2_278_656
  assert scaling.flops_per_token(m, 128) == 3 * forward
  assert scaling.non_embedding_flops_per_token(m, 128) == 3 * (forward - 2 * lm_head)
  assert scaling.flops_per_token(m, 128, training=False, include_mtp=False) == forward - mtp


@pytest.mark.parametrize("variant, seq_len", [("tiny", 128), ("small", 512), ("mini", 4096)])
def test_matmul_flops_are_6x_active_non_embedding_params(variant, seq_len):
  """Apart from the attention core, M is 6 FLOPs per active non-embedding weight."""
  m = ling2.model_config(variant)
  counts = params.count_params(m, include_mtp=True)
  leaves = traverse_util.flatten_dict(params.abstract_variables(m)["params"])
  norms = sum(int(np.prod(x.shape)) for k, x in leaves.items() if k[-1] == "scale")
  matmul_params = counts["active_non_embedding"] - norms
  layers = m.num_hidden_layers + m.num_nextn_predict_layers
  core = 3 * layers * 2 * m.num_attention_heads * m.head_dim * (seq_len + 1)
  assert scaling.non_embedding_flops_per_token(m, seq_len) - core == 6 * matmul_params


def test_activation_ratio_and_granularity_of_ling2():
  for variant in ("mini", "flash", "1t"):
    m = ling2.model_config(variant)
    assert scaling.activation_ratio(m) == 9 / 257
    assert scaling.granularity(m) == 8


def test_efficiency_leverage_over_7x_at_the_papers_point():
  # By hand: Ahat = 1 / (1 / (A + 1 / (1/A_start - 1/A_max)) + 1/A_max), then the exponent
  # a + d*log10(C) + gamma*log2(G)^2 + beta*log2(G).
  a_hat = 1 / (1 / (0.031 + 1 / (1 / 1.63e-2 - 1 / 5.28e16)) + 1 / 5.28e16)
  log2_g = math.log(12) / math.log(2)
  exponent = 1.23 - 7.61e-2 * 22 + 1.67e-2 * log2_g**2 - 1.17e-1 * log2_g
  expected = a_hat**exponent
  assert 7.0 < expected < 7.5
  assert scaling.efficiency_leverage(0.031, 12, 1e22) == pytest.approx(expected, rel=1e-12)


def test_efficiency_leverage_trends_match_the_paper():
  grans = np.arange(2, 65)
  best_g = grans[np.argmax(scaling.efficiency_leverage(0.031, grans, 1e22))]
  assert 8 <= best_g <= 12  # "optimal G is about 8-12".
  ratios = np.array([1 / 128, 1 / 64, 0.031, 0.1, 0.5])
  assert np.all(np.diff(scaling.efficiency_leverage(ratios, 12, 1e22)) < 0)  # Lower A wins.
  budgets = np.array([1e18, 1e20, 1e22, 1e24])
  assert np.all(np.diff(scaling.efficiency_leverage(0.031, 12, budgets)) > 0)  # Grows with C.


@pytest.mark.parametrize("arch", ["moe", "dense"])
def test_optimal_allocation_spends_the_budget(arch):
  for c in (1e12, 1e18, 1e24):
    assert scaling.m_opt(c, arch) * scaling.d_opt(c, arch) == pytest.approx(c, rel=2e-3)
  # At 1e22 the MoE law wants a smaller model trained on more data than the dense one.
  assert scaling.m_opt(1e22, "moe") < scaling.m_opt(1e22, "dense")


def test_power_law_fit_and_fitted_leverage():
  c = np.array([1e12, 3e12, 1e13])
  law = scaling.fit_power_law(c, 12.0 * c**-0.05)
  assert law.coef == pytest.approx(12.0) and law.exponent == pytest.approx(-0.05)
  assert law.r2 == pytest.approx(1.0)
  dense = scaling.PowerLaw(12.0, -0.05, 1.0)
  moe = scaling.PowerLaw(12.0 * 3.0**-0.05, -0.05, 1.0)  # The dense curve at 3x the compute.
  assert scaling.fitted_efficiency_leverage(moe, dense, c) == pytest.approx(3.0)
  with pytest.raises(ValueError, match="distinct positive x"):
    scaling.fit_power_law([1e12, 1e12], [2.0, 1.9])


@pytest.mark.parametrize("arg", ["budget=1e12", "budget=1e16", "budget=1e20,seq_len=4096",
                                 "budget=1e23,seq_len=4096,mtp=1", "budget=1e12,arch=dense",
                                 "budget=1e20,arch=dense,seq_len=4096"])
def test_budget_config_follows_the_laws_and_design_rules(arg):
  config = scaling_config.get_config(arg)
  m, t, s = config.model, config.train, config.scaling
  config_lib.validate_model_config(m)
  budget = s.budget
  flops = scaling.non_embedding_flops_per_token(m, t.seq_len)
  assert flops == pytest.approx(scaling.m_opt(budget, s.arch), rel=0.25)
  assert t.learning_rate == pytest.approx(scaling.lr_opt(budget))
  assert abs(t.batch_size * t.seq_len - scaling.batch_opt(budget)) <= t.seq_len / 2
  tokens = t.num_steps * t.batch_size * t.seq_len
  assert tokens == pytest.approx(scaling.d_opt(budget, s.arch), rel=0.01)
  assert flops * tokens == pytest.approx(budget, rel=0.3)
  assert s.compute == pytest.approx(flops * tokens)
  assert m.num_attention_heads * m.head_dim == m.hidden_size
  assert m.head_dim == (32 if budget < 1e17 else 128)
  if s.arch == "dense":
    assert m.first_k_dense_replace == m.num_hidden_layers
    return
  assert scaling.activation_ratio(m) == pytest.approx(0.035, abs=0.001)
  assert scaling.granularity(m) == 8  # The default, Ling 2.0's.
  assert m.num_shared_experts == 1
  assert 1 <= m.first_k_dense_replace < m.num_hidden_layers
  if budget >= 1e16:  # Tiny CPU shapes are dominated by the attention core at any KV count.
    assert 0.30 <= scaling.attention_fraction(m, t.seq_len) <= 0.40


@pytest.mark.parametrize("arch", ["moe", "dense"])
def test_budget_ladder_changes_shape_smoothly(arch):
  """Along a ladder of budgets, head_dim and G stay fixed and width and depth grow together."""
  ladders = [[f"budget={b:.3g}" for b in 6e11 * 2.0**np.arange(15)],  # Up to 1e16: the CPU band.
             [f"budget={b:.3g},seq_len=4096" for b in np.geomspace(1e20, 1e23, 7)]]
  for ladder in ladders:
    shapes = []
    for arg in ladder:
      config = scaling_config.get_config(f"{arg},arch={arch}")
      m = config.model
      shapes.append((m.hidden_size, m.num_hidden_layers, config.scaling.flops_per_token))
      assert m.head_dim == (32 if ladder is ladders[0] else 128)
      assert m.num_attention_heads * m.head_dim == m.hidden_size
      assert m.moe_intermediate_size * 8 == 2 * m.hidden_size  # G = 8 at every budget.
    hidden, layers, flops = (np.array(x) for x in zip(*shapes))
    assert np.all(np.diff(hidden) >= 0) and np.all(np.diff(flops) >= 0)
    assert hidden[-1] >= 3 * hidden[0] and layers[-1] >= 2 * layers[0]
    # Depth steps back only where the width steps up, by at most 3 layers (the coarsest step,
    # hidden 32 x 5 layers -> 64 x 2), and stays near the ladder's target for the width.
    assert np.all(np.diff(hidden)[np.diff(layers) < 0] > 0) and np.all(np.diff(layers) >= -3)
    aspect = layers / np.array([scaling_config.target_layers(h) for h in hidden])
    assert np.all((aspect > 0.5) & (aspect < 4)), aspect


def test_budget_config_fields_stay_overridable():
  config = scaling_config.get_config("budget=1e12")
  m = scaling_config.get_config("budget=1e18,head_dim=32,granularity=12").model
  assert m.head_dim == 32 and scaling.granularity(m) == 12
  config.train.num_steps = 7
  config.model.num_experts = 64
  assert config.train.num_steps == 7 and config.model.num_experts == 64


@pytest.mark.parametrize("arg, fragment", [
    ("budget=1e9", "config.scaling.budget: 1e\\+09 FLOPs is too small.*Fix: use budget >="),
    ("budget=1e28,seq_len=4096", "config.scaling.budget: 1e\\+28 FLOPs is too large.*Fix: use"),
    ("budget=1e12,arch=sparse", "config.scaling.arch"),
    ("budget=1e12,arch=dense,mtp=1", "config.scaling.mtp"),
    ("budget=lots", "config.scaling.budget: 'lots' is not a number"),
    ("budget=1e12,size=big", "config.scaling.size: unknown argument"),
    ("arch=moe", "config.scaling.budget: is required"),
    ("budget=1e12,top_k=300", "config.scaling.top_k"),
    ("budget=1e12,seq_len=1.5", "config.scaling.seq_len: must be a whole number"),
    ("budget=-1", "config.scaling.budget: must be positive"),
    ("budget=1e12,granularity=1", "config.scaling.granularity: G = 2 \\* hidden"),
    ("budget=1e12,head_dim=30", "config.scaling.head_dim: must be a multiple of 4"),
])
def test_bad_budget_arguments_name_the_field(arg, fragment):
  with pytest.raises(config_lib.ConfigError, match=fragment):
    scaling_config.get_config(arg)


def test_sweep_fits_and_leverage_from_results():
  runs = []
  for name, shift in (("dense", 1.0), ("moe", 4.0)):
    for c in (1e12, 2e12, 4e12):
      runs.append({"variant": name, "compute": c, "val_loss": 20.0 * (shift * c)**-0.08})
  fitted = sweep.fit_results(runs, "dense")
  assert fitted["fits"]["dense"]["exponent"] == pytest.approx(-0.08)
  assert all(v == pytest.approx(4.0) for v in fitted["fits"]["moe"]["el"].values())
  flat = [dict(r, val_loss=2.0) for r in runs]  # Loss not falling with compute: no EL.
  assert sweep.fit_results(flat, "dense")["fits"]["moe"]["el"] is None


def test_small_sweep_end_to_end_and_resume(tmp_path):
  """One budget x two variants, a few steps each; then two budgets, two runs at a time: the
  finished runs are skipped and the other two train side by side.

  Both budgets get the same dense shape, and the variants differ only in the seed; with a fixed
  lr, batch and a constant schedule, all four runs share one compiled step (the cache is fresh,
  and filled by the first command before the two parallel runs start).
  """
  sweep_dir = str(tmp_path / "sweep")
  command = [
      sys.executable, "-m", "experiments.sweep", f"--sweep_dir={sweep_dir}",
      "--steps_fraction=0.005", "--variant=base:arch=dense",
      "--variant=seed1:arch=dense --config.train.seed=1", "--baseline=base",
      "--train_flag=--config.train.schedule=wsm", "--train_flag=--config.train.warmup_steps=1",
      "--train_flag=--config.train.learning_rate=3e-3",
      "--train_flag=--config.train.batch_size=4", "--train_flag=--config.train.eval_batches=1"]
  # One CPU device, as users have; cheapest code generation, as in conftest.py. The runs share
  # one persistent cache of every program they compile.
  env = dict(os.environ, XLA_FLAGS="--xla_backend_optimization_level=0",
             **test_trainer.compile_cache_env(tmp_path / "xla"))
  first = subprocess.run([*command, "--budgets=6e11"], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=600)
  assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
  assert "[2/2] seed1_6e+11: training" in first.stdout  # Progress lines.
  out = subprocess.run([*command, "--budgets=6e11,1e12", "--jobs=2"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
  assert out.stdout.count("finished earlier, skipped") == 2
  assert "[1/4] base_6e+11: finished earlier" in out.stdout
  assert "[3/4] base_1e+12: training" in out.stdout
  assert "[4/4] seed1_1e+12: training" in out.stdout
  assert "6e+11: training" not in out.stdout

  results = sweep.read_results(sweep_dir)
  assert len(open(os.path.join(sweep_dir, "results.jsonl")).readlines()) == 4
  assert sorted(r["run"] for r in results) == ["base_1e+12", "base_6e+11", "seed1_1e+12",
                                               "seed1_6e+11"]
  for r in results:
    with open(os.path.join(r["workdir"], "config.json")) as f:
      t = json.load(f)["train"]
    assert r["tokens"] == t["num_steps"] * t["batch_size"] * t["seq_len"]
    assert r["compute"] == pytest.approx(r["flops_per_token"] * r["tokens"])
    assert 0 < r["val_loss"] < 7.0
  with open(os.path.join(sweep_dir, "fits.json")) as f:
    fits = json.load(f)["fits"]
  assert set(fits) == {"base", "seed1"}
  assert fits["base"]["compute"][0] < fits["base"]["compute"][1]
  table = open(os.path.join(sweep_dir, "table.md")).read()
  assert "| base | 6e+11 |" in table and "| seed1 |" in table and "(baseline)" in table
  with open(os.path.join(sweep_dir, "loss_vs_compute.png"), "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
