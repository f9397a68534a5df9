"""Tests for ling_jax/rl_objectives.py and ling_jax/rl.py: LPO, GRPO and GSPO against hand-worked
cases and a per-sentence NumPy loop, gradient signs, the k3 KL, group advantages, sentence
splits, config validation, and an end-to-end run of experiments/rl.py with resume.

Key: B responses, L positions, G group size.
"""

import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import rl as rl_config
from ling_jax import config as config_lib
from ling_jax import rl
from ling_jax import rl_objectives as obj
from ling_jax import rl_tasks
from ling_jax import tokenizer as tokenizer_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_group_advantages_hand_computed():
  rewards_B = np.array([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0, 3.0, 0.0, 0.0, 0.0])
  adv_B = obj.group_advantages(rewards_B, 4, eps=0.0 + 1e-12)
  # Group 1: mean 0.5, std 0.5. Group 2: all equal -> 0. Group 3: mean 0.75, std sqrt(27/16).
  s = math.sqrt(27 / 16)
  np.testing.assert_allclose(adv_B, [1, -1, -1, 1, 0, 0, 0, 0, 2.25 / s, -0.75 / s,
                                     -0.75 / s, -0.75 / s], rtol=1e-9)
  with pytest.raises(ValueError, match="groups of 4"):
    obj.group_advantages(np.zeros(6), 4)


def test_sentence_ids_split_after_pause_punctuation():
  tok = tokenizer_lib.ByteTokenizer()
  text = "ab, cd. e\nf"
  ids_T = obj.sentence_ids(tok.encode(text).tolist(), tok.decode)
  #                       a  b  ,  _  c  d  .  _  e  \n f
  np.testing.assert_array_equal(ids_T, [0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 3])
  # Multi-character tokens: a mark inside a token ends the sentence at that token.
  vocab = {0: "Hi", 1: " there", 2: ", and", 3: " so", 4: ".\n", 5: "ok"}
  decode = lambda ids: "".join(vocab[i] for i in ids)  # noqa: E731
  np.testing.assert_array_equal(obj.sentence_ids([0, 1, 2, 3, 4, 5], decode), [0, 0, 0, 1, 1, 2])
  assert obj.sentence_ids([], decode).shape == (0,)


def _case():
  """Two responses of 4 positions: sentences, log-ratios, advantages (hand-worked below)."""
  log_ratio_BL = np.array([[0.02, 0.04, 0.10, -0.10], [-0.05, 0.01, 0.01, 0.0]], np.float32)
  mask_BL = np.array([[1, 1, 1, 1], [1, 1, 1, 0]], np.float32)
  sentences_BL = np.array([[0, 0, 1, 1], [0, 1, 1, 0]], np.int32)
  adv_B = np.array([1.0, -1.0], np.float32)
  old_BL = np.full((2, 4), -1.5, np.float32)
  return old_BL + log_ratio_BL, old_BL, adv_B, mask_BL, sentences_BL


def test_lpo_hand_computed():
  """Sentence 0 of response 0: ratio e^0.03 > 1.03 with A > 0, clipped to 1.03; sentence 1:
  ratio 1. Response 1 (A < 0): sentence 0 ratio e^-0.05 < 0.97, clipped term -0.97 is the min;
  sentence 1 ratio e^0.01 unclipped. Weights |s| = 2, 2, 1, 2 over 7 tokens."""
  logp, old, adv, mask, sent = _case()
  value, metrics = obj.policy_objective("lpo", logp, old, adv, mask, sent, 0.03)
  expected = (2 * 1.03 + 2 * 1.0 + 1 * -0.97 + 2 * -math.exp(0.01)) / 7
  np.testing.assert_allclose(value, expected, rtol=1e-5)
  # Clipped: sentence 0 of response 0 (2 tokens) and sentence 0 of response 1 (1 token).
  np.testing.assert_allclose(metrics["clip_fraction"], 3 / 7, rtol=1e-6)


def test_lpo_gradient_sign_and_size():
  """d J / d logp_t = A r_s / N on an unclipped sentence (its mean spreads 1/|s| over |s|
  weights), 0 on a clipped one, and 0 on padding."""
  logp, old, adv, mask, sent = _case()
  grad_BL = jax.grad(lambda lp: obj.policy_objective("lpo", lp, old, adv, mask, sent, 0.03)[0])(
      jnp.asarray(logp))
  expected_BL = np.array([[0, 0, 1 / 7, 1 / 7], [0, -math.exp(0.01) / 7, -math.exp(0.01) / 7, 0]])
  np.testing.assert_allclose(grad_BL, expected_BL, rtol=1e-5, atol=1e-7)


def _loop_reference(objective, logp, old, adv, mask, sent, eps):
  """The spec's formulas, one response and one unit at a time, in float64."""
  total, num_tokens, num_responses = 0.0, mask.sum(), mask.shape[0]
  for i in range(mask.shape[0]):
    positions = np.flatnonzero(mask[i])
    if objective == "lpo":
      units = [positions[sent[i, positions] == k] for k in np.unique(sent[i, positions])]
    elif objective == "grpo":
      units = [np.array([t]) for t in positions]
    else:
      units = [positions]
    for unit in units:
      r = math.exp(np.mean(logp[i, unit].astype(np.float64) - old[i, unit]))
      surrogate = min(r * adv[i], min(max(r, 1 - eps), 1 + eps) * adv[i])
      if objective == "gspo":
        total += surrogate / num_responses
      else:
        total += len(unit) * surrogate / num_tokens
  return total


@pytest.mark.parametrize("objective,eps", [("lpo", 0.03), ("grpo", 0.2), ("gspo", 4e-3)])
def test_objectives_match_loop_reference(objective, eps):
  rng = np.random.default_rng(0)
  b, length = 6, 12
  old = rng.normal(-2.0, 0.5, (b, length)).astype(np.float32)
  logp = (old + rng.normal(0, 0.05, (b, length))).astype(np.float32)
  mask = (np.arange(length) < rng.integers(3, length + 1, b)[:, None]).astype(np.float32)
  sent = np.cumsum(rng.random((b, length)) < 0.3, axis=1).astype(np.int32)
  adv = rng.normal(size=b).astype(np.float32)
  value, _ = obj.policy_objective(objective, logp, old, adv, mask, sent, eps)
  np.testing.assert_allclose(value, _loop_reference(objective, logp, old, adv, mask, sent, eps),
                             rtol=1e-5)


def test_grpo_and_gspo_hand_computed():
  logp, old, adv, mask, sent = _case()
  # GRPO, eps 0.03: per-token ratios. Response 0 (A=1): e^.02 (in), e^.04 -> 1.03, e^.1 -> 1.03,
  # e^-.1 (below the range; unclipped for A > 0). Response 1 (A=-1): e^-.05 -> the min picks
  # -0.97, e^.01 twice (in).
  grpo, _ = obj.policy_objective("grpo", logp, old, adv, mask, sent, 0.03)
  expected = (math.exp(0.02) + 1.03 + 1.03 + math.exp(-0.1) - 0.97 - 2 * math.exp(0.01)) / 7
  np.testing.assert_allclose(grpo, expected, rtol=1e-5)
  # GSPO: one ratio per response: e^(0.06/4) = e^0.015 (A=1, eps 0.01 -> 1.01), and
  # e^(-0.03/3) = e^-0.01 (A=-1, in range); averaged over the 2 responses.
  gspo, _ = obj.policy_objective("gspo", logp, old, adv, mask, sent, 0.01)
  np.testing.assert_allclose(gspo, (1.01 - math.exp(-0.01)) / 2, rtol=1e-5)


def test_micro_batch_normalisers_sum_to_full_batch():
  logp, old, adv, mask, sent = _case()
  for objective in obj.OBJECTIVES:
    full, _ = obj.policy_objective(objective, logp, old, adv, mask, sent, 0.03)
    parts = sum(obj.policy_objective(objective, logp[i:i + 1], old[i:i + 1], adv[i:i + 1],
                                     mask[i:i + 1], sent[i:i + 1], 0.03, num_tokens=mask.sum(),
                                     num_responses=2)[0] for i in range(2))
    np.testing.assert_allclose(parts, full, rtol=1e-6, err_msg=objective)


def test_kl_k3_values_and_unbiasedness():
  np.testing.assert_allclose(obj.kl_k3(jnp.array([-1.0, -2.0]), jnp.array([-1.0, -1.5])),
                             [0.0, math.exp(0.5) - 0.5 - 1], rtol=1e-6)
  p, q = np.array([0.7, 0.2, 0.1]), np.array([0.4, 0.4, 0.2])
  samples = np.random.default_rng(0).choice(3, size=200_000, p=p)
  estimate = np.mean(obj.kl_k3(jnp.log(p[samples]), jnp.log(q[samples])))
  np.testing.assert_allclose(estimate, np.sum(p * np.log(p / q)), rtol=0.02)


def _micro_config(workdir_steps: int = 2) -> ml_collections.ConfigDict:
  config = rl_config.get_config("lpo")
  m = config.model
  m.num_hidden_layers, m.first_k_dense_replace, m.hidden_size = 1, 1, 32
  m.intermediate_size, m.num_attention_heads, m.num_key_value_heads, m.head_dim = 64, 2, 1, 16
  m.num_nextn_predict_layers, m.max_position_embeddings = 0, 128
  config.train.num_steps = workdir_steps
  config.train.checkpoint_every = 1
  config.train.compilation_cache_dir = ""
  r = config.rl
  r.group_size, r.prompts_per_step, r.max_new_tokens = 2, 2, 6
  r.eval_prompts, r.eval_every, r.max_operand = 2, 2, 9
  return config


@pytest.mark.parametrize("field,value,message", [
    ("objective", "ppo", "config.rl.objective: unknown 'ppo'"),
    ("group_size", 1, "config.rl.group_size: must be an integer >= 2"),
    ("reward", "votes", "config.rl.reward"),
    ("num_minibatches", 3, "config.rl.num_minibatches"),
    ("temperature", 0.0, "config.rl.temperature"),
    ("task_family", "chess", "config.rl.task_family"),
    ("mode", "fast", "config.rl.mode"),
])
def test_validation_names_the_field(field, value, message):
  config = _micro_config()
  config.rl[field] = value
  with pytest.raises(config_lib.ConfigError, match=message.replace("(", r"\(")):
    rl.validate_config(config)


def test_bad_config_argument_fails_early():
  with pytest.raises(ValueError, match="unknown objective 'ppo'"):
    rl_config.get_config("ppo")


def test_rollout_batch_layout():
  tok = tokenizer_lib.ByteTokenizer()
  batch = {k: v[:, 29:] for k, v in  # Prompts are left-padded to 32 positions; cut 29 of them.
           rl.rollout_batch([[1, 2, 3], [4, 5]], [list(b"a, b"), list(b"c")], 5, tok).items()}
  # Row 1: prompt left-padded by one more; both responses right-padded to 5.
  np.testing.assert_array_equal(batch["segment_ids"][1], [0, 1, 1, 1, 0, 0, 0])
  np.testing.assert_array_equal(batch["positions"][1, 1:4], [0, 1, 2])
  np.testing.assert_array_equal(batch["targets"][0, 2:6], list(b"a, b"))
  np.testing.assert_array_equal(batch["mask"], [[0, 0, 1, 1, 1, 1, 0], [0, 0, 1, 0, 0, 0, 0]])
  np.testing.assert_array_equal(batch["sentence_ids"][0, 2:6], [0, 0, 1, 1])
  tokens, text, ended = rl.cut_response(list(b"12<|role_end|>xx"), tok)
  assert (text, ended, len(tokens)) == ("12", True, 14)


def test_update_with_gradient_accumulation_matches_one_batch():
  """One optimiser step over 2 rollouts equals the step over 2 micro-batches of 1; on-policy
  (pi = pi_old = reference) the ratios are 1: nothing clipped, KL 0. (Shapes as in the run
  test below, so the compilations are shared.)"""
  config = _micro_config()
  m, t = config.model, config.train
  tok = tokenizer_lib.ByteTokenizer()
  variables = rl.starting_policy(config)[1]
  prompts = [[tok.bos_id, *tok.encode(f"{i}+1=").tolist()] for i in range(2)]
  batch = rl.rollout_batch(prompts, [list(b"1, 2."), list(b"45; 6")], 7, tok)
  results = []
  for accum in (1, 2):
    t.grad_accum_steps = accum
    logp_fn, step_fn = rl.make_step_fns(m, config.rl, t)
    logp_BL = logp_fn(variables["params"], {}, batch)
    batch.update(old_logp=logp_BL, ref_logp=logp_BL,
                 advantages=jnp.array([1.0, -0.5], jnp.float32))
    state = rl._init_state(variables["params"], {}, t_json=rl._optimizer_json(t))
    results.append(step_fn(state, batch))
  (one, metrics), (two, metrics_two) = results
  assert float(metrics["clip_fraction"]) == 0 and abs(float(metrics["kl"])) < 1e-6
  np.testing.assert_allclose(float(metrics["ratio_mean"]), 1.0, rtol=1e-6)
  np.testing.assert_allclose(metrics["loss"], metrics_two["loss"], rtol=1e-5)
  for a, b in zip(jax.tree.leaves(one.params), jax.tree.leaves(two.params)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
  assert any(not np.allclose(a, b) for a, b in zip(jax.tree.leaves(one.params),
                                                    jax.tree.leaves(variables["params"])))


def test_run_resumes_like_an_uninterrupted_run(tmp_path):
  """A micro model: 2 RL steps, then the same run resumed to 3; its step-3 metrics equal those of
  an uninterrupted 3-step run (one process, so the runs share their compilations)."""
  workdir = str(tmp_path / "rl")
  rl.train(_micro_config(2), workdir)
  result = rl.train(_micro_config(3), workdir)
  assert result["step"] == 3
  curve = rl.read_curve(workdir)
  assert sorted(curve) == [0, 1, 2, 3]
  for key in ("reward_mean", "reward_std", "accuracy", "response_length", "clip_fraction", "kl",
              "entropy", "heldout_accuracy"):
    assert key in curve[2], key
  straight = str(tmp_path / "straight")
  rl.train(_micro_config(3), straight)
  again = rl.read_curve(straight)
  for key in ("reward_mean", "objective", "kl", "entropy", "loss", "grad_norm"):
    np.testing.assert_allclose(curve[3][key], again[3][key], rtol=1e-5, err_msg=key)
  # The run directory serves as a GAR judge checkpoint; a GAR run with the rule judge.
  judge = rl_tasks.load_model_judge(workdir)
  first, second = judge.compare("1+1=", "2", "3"), judge.compare("1+1=", "3", "2")
  assert 0 <= first <= 1 and abs(first + second - 1) < 1e-6  # Both orders asked.
  gar = _micro_config(1)
  gar.rl.reward, gar.rl.judge_keywords = "gar", ("1",)
  assert rl.train(gar, str(tmp_path / "gar"))["reward_mean"] == 0.5  # G=2: one point per pair.


def test_entry_point_rejects_a_bad_config_before_compiling(tmp_path):
  """experiments/rl.py: a bad field ends with exit code 2 and one line naming it."""
  bad = subprocess.run([sys.executable, "-m", "experiments.rl", f"--config={REPO}/configs/rl.py",
                        f"--workdir={tmp_path}", "--config.rl.group_size=1"], cwd=REPO,
                       env={**os.environ, "PYTHONPATH": REPO}, capture_output=True, text=True,
                       timeout=120)
  assert bad.returncode == 2, bad.stderr[-2000:]
  assert "config.rl.group_size: must be an integer >= 2" in bad.stderr
  assert not os.listdir(tmp_path)  # Nothing written.
