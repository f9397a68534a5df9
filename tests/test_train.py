"""Train step: gradient accumulation, NaN guard, expert-bias update, schedules, loss masks."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from configs import ling2
from ling_jax import train
from ling_jax import trainer


def _micro_config():
  c = ling2.get_config("tiny")
  c.model.num_hidden_layers, c.model.hidden_size = 2, 32
  c.model.num_attention_heads, c.model.num_key_value_heads, c.model.head_dim = 2, 1, 16
  c.model.intermediate_size, c.model.moe_intermediate_size = 64, 16
  c.model.num_experts, c.model.num_experts_per_tok, c.model.n_group, c.model.topk_group = 8, 2, 2, 1
  c.model.dtype = "float32"
  c.train.batch_size, c.train.seq_len, c.train.warmup_steps = 4, 16, 0
  c.train.learning_rate = 1e-2
  return c


def _batch(c, seed=0):
  rng = np.random.default_rng(seed)
  b, length = c.train.batch_size, c.train.seq_len
  seg = np.ones((b, length), np.int32)
  seg[0, length // 2:] = 2  # Two documents in row 0 ...
  seg[1, length - 3:] = 0  # ... and padding at the end of row 1.
  pos = np.zeros((b, length), np.int32)
  for r in range(b):
    for i in range(1, length):
      pos[r, i] = pos[r, i - 1] + 1 if seg[r, i] == seg[r, i - 1] else 0
  tokens = rng.integers(0, 258, (b, length + 1)).astype(np.int32)
  return {"inputs": tokens[:, :-1] * (seg != 0), "targets": tokens[:, 1:] * (seg != 0),
          "positions": pos * (seg != 0), "segment_ids": seg}


@pytest.fixture(scope="module")
def setup():
  c = _micro_config()
  # Jitted: op by op, the init compiles each of its hundreds of small ops on its own.
  init = jax.jit(functools.partial(train.init_state, c.model, c.train))
  return c, init(jax.random.key(0)), _batch(c)


_JITTED = {}


def _jitted(fn, c):
  """Returns fn jitted for config c, compiled once per distinct config in this module."""
  key = (fn.__name__, c.to_json())
  if key not in _JITTED:
    _JITTED[key] = jax.jit(functools.partial(fn, m=c.model, t=c.train))
  return _JITTED[key]


def _step(c, state, batch):
  return _jitted(train.train_step, c)(state, batch)


def test_grad_accumulation_matches_full_batch(setup):
  c, state, batch = setup
  c2 = c.copy_and_resolve_references()
  c2.train.grad_accum_steps = 2
  # As mini_h200 runs it: a scan over micro-batches, the layers unrolled inside it.
  c2.model.unroll_layers, c2.train.materialize_grads = True, True
  grads = {}
  for cfg in (c, c2):
    grads[cfg.train.grad_accum_steps] = _jitted(train.accumulate_gradients, cfg)(state, batch)
  (loss1, aux1, g1), (loss2, aux2, g2) = grads[1], grads[2]
  np.testing.assert_allclose(loss1, loss2, rtol=1e-5)
  np.testing.assert_allclose(aux1["mtp_ce"], aux2["mtp_ce"], rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-8), g1, g2)
  jax.tree.map(np.testing.assert_array_equal, aux1["counts"], aux2["counts"])
  # The micro-batches really differ: each alone gives another gradient. The first micro-batch
  # twice over is that micro-batch alone (the loss is a mean over tokens), through the program
  # compiled above.
  first_twice = jax.tree.map(lambda x: np.concatenate([x[:2], x[:2]]), batch)
  _, _, g_half = _jitted(train.accumulate_gradients, c)(state, first_twice)
  assert not np.allclose(g_half["lm_head"]["kernel"], g1["lm_head"]["kernel"], rtol=1e-3)


def test_step_updates_params_and_expert_bias(setup):
  c, state, batch = setup
  new, metrics = _step(c, state, batch)
  assert int(new.step) == 1 and int(metrics["skipped"]) == 0
  bias = new.moe_state["moe_layers"]["mlp"]["expert_bias"]
  assert bias.shape == (1, 8) and np.any(bias != 0)
  np.testing.assert_allclose(np.mean(bias, -1), 0.0, atol=1e-7)
  # The bias steps are exactly +-rate (or a zero-mean combination of them), never a gradient.
  assert np.max(np.abs(bias)) <= 2 * c.train.expert_bias_update_rate
  changed = jax.tree.map(lambda a, b: bool(np.any(a != b)), new.params, state.params)
  assert all(jax.tree.leaves(changed))
  # Each MoE layer's load balance, from its tokens per expert: max / mean - 1 (numpy).
  load = np.asarray(metrics["expert_load"], np.float64)
  expected = load.max(-1) / load.mean(-1) - 1
  assert load.shape[0] >= 2  # the trunk's MoE layer and the MTP block's
  np.testing.assert_allclose(metrics["layer_violations"], expected, rtol=1e-6)
  np.testing.assert_allclose(metrics["max_violation"], expected.max(), rtol=1e-6)


def test_non_finite_step_is_skipped(setup):
  c, state, batch = setup
  bad_params = jax.tree.map(lambda x: x, state.params)
  bad_params["lm_head"]["kernel"] = bad_params["lm_head"]["kernel"].at[0, 0].set(jnp.nan)
  bad = state.replace(params=bad_params)
  new, metrics = _step(c, bad, batch)
  assert int(metrics["skipped"]) == 1 and int(new.nan_skips) == 1 and int(new.nan_streak) == 1
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), new.params, bad.params)
  jax.tree.map(np.testing.assert_array_equal, new.opt_state, bad.opt_state)
  jax.tree.map(np.testing.assert_array_equal, new.moe_state, bad.moe_state)
  again, _ = _step(c, new, batch)
  assert int(again.nan_streak) == 2
  # A good step resets the streak but keeps the total.
  good, _ = _step(c, again.replace(params=state.params), batch)
  assert int(good.nan_streak) == 0 and int(good.nan_skips) == 2


def test_loss_masks():
  batch = {"segment_ids": jnp.array([[1, 1, 1, 2, 2, 0]])}
  np.testing.assert_array_equal(train.loss_masks(batch, 0), [[1, 1, 1, 1, 1, 0]])
  # MTP depth 1: the target two ahead must be in the same document.
  np.testing.assert_array_equal(train.loss_masks(batch, 1), [[1, 1, 0, 1, 0, 0]])
  batch["loss_mask"] = jnp.array([[0, 1, 1, 1, 1, 1]])
  np.testing.assert_array_equal(train.loss_masks(batch, 0), [[0, 1, 1, 1, 1, 0]])


def test_cross_entropy_sum_against_numpy():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(2, 3, 5)).astype(np.float32)
  targets = rng.integers(0, 5, (2, 3))
  mask = np.array([[1, 1, 0], [1, 0, 1]], np.float32)
  logp = logits - np.log(np.sum(np.exp(logits), -1, keepdims=True))
  want = -np.sum(np.take_along_axis(logp, targets[..., None], -1)[..., 0] * mask)
  got = train.cross_entropy_sum(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(mask))
  np.testing.assert_allclose(got, want, rtol=1e-5)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_cross_entropy_gradient_against_numpy(dtype):
  rng = np.random.default_rng(1)
  logits = np.asarray(jnp.asarray(rng.normal(size=(2, 3, 7)) * 3, dtype), np.float64)
  targets = rng.integers(0, 7, (2, 3))
  mask = np.array([[1, 1, 0], [1, 0, 1]], np.float64)
  # d/dlogits of sum(mask * (logsumexp - target logit)) = mask * (softmax - one_hot).
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  want = (probs - np.eye(7)[targets]) * mask[..., None]
  got = jax.grad(train.cross_entropy_sum)(jnp.asarray(logits, dtype), jnp.asarray(targets),
                                          jnp.asarray(mask, jnp.float32))
  assert got.dtype == dtype
  np.testing.assert_allclose(np.asarray(got, np.float64), want,
                             atol=1e-6 if dtype == jnp.float32 else 4e-3)


@pytest.mark.parametrize("schedule", ["wsm", "cosine", "wsd"])
def test_schedules(schedule):
  t = ling2.get_config("tiny").train
  t.schedule, t.num_steps, t.warmup_steps, t.learning_rate = schedule, 100, 10, 1.0
  lr = train.make_schedule(t)
  np.testing.assert_allclose([lr(0), lr(5), lr(10)], [0.0, 0.5, 1.0], atol=1e-6)
  if schedule == "wsm":
    np.testing.assert_allclose([lr(50), lr(99)], [1.0, 1.0])
  elif schedule == "cosine":
    assert 0.1 - 1e-6 <= float(lr(99)) < 0.2 and float(lr(50)) < 1.0
  else:
    np.testing.assert_allclose(lr(60), 1.0)
    assert float(lr(99)) < 0.2


def test_no_weight_decay_on_norm_scales():
  mask = train._decay_mask({"a": {"scale": 1, "kernel": 2}, "embed": {"embedding": 3}})
  assert mask == {"a": {"scale": False, "kernel": True}, "embed": {"embedding": True}}


def _adam_numpy(grads, b1, b2, eps):
  """Adam's scaled updates for a sequence of gradients, in float64."""
  mu = nu = 0.0
  out = []
  for step, g in enumerate(grads, start=1):
    mu = b1 * mu + (1 - b1) * g
    nu = b2 * nu + (1 - b2) * g * g
    out.append((mu / (1 - b1 ** step)) / (np.sqrt(nu / (1 - b2 ** step)) + eps))
  return out


@pytest.mark.parametrize("dtype,rtol", [(jnp.float32, 1e-5), (jnp.bfloat16, 3e-2)])
def test_adam_with_stored_moments_against_numpy(dtype, rtol):
  rng = np.random.default_rng(0)
  grads = [rng.normal(size=(3, 5)).astype(np.float32) * 10 ** rng.uniform(-3, 1) for _ in range(6)]
  opt = train.scale_by_adam_stored_in(dtype, 0.9, 0.95, 1e-8)
  state = opt.init({"w": jnp.zeros((3, 5))})
  assert state.mu["w"].dtype == dtype and state.nu["w"].dtype == dtype
  want = _adam_numpy([g.astype(np.float64) for g in grads], 0.9, 0.95, 1e-8)
  for g, w in zip(grads, want):
    updates, state = opt.update({"w": jnp.asarray(g)}, state)
    assert updates["w"].dtype == jnp.float32
    np.testing.assert_allclose(updates["w"], w, rtol=rtol, atol=rtol * 1e-3)
  assert int(state.count) == len(grads)


def test_bfloat16_moments_keep_the_optimizer_state_structure():
  t = ling2.get_config("tiny").train
  params = {"dense": {"kernel": jnp.ones((4, 2))}, "norm": {"scale": jnp.ones((4,))}}
  grads = jax.tree.map(lambda p: 0.5 * p, params)
  states = {}
  for moment_dtype in ("float32", "bfloat16"):
    t.moment_dtype = moment_dtype
    opt = train.make_optimizer(t)
    state = opt.init(params)
    updates, state = opt.update(grads, state, params)
    states[moment_dtype] = (jax.tree.structure(state), updates)
  assert states["float32"][0] == states["bfloat16"][0]  # checkpoints restore either way
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-2),
               states["float32"][1], states["bfloat16"][1])


def test_unknown_moment_dtype_names_the_field():
  config = ling2.get_config("tiny")
  config.train.moment_dtype = "float16"
  with pytest.raises(ValueError, match="config.train.moment_dtype.*Fix"):
    trainer.validate_config(config)


def test_throughput_settings_leave_the_step_unchanged(setup):
  """Unrolled layers, gradients written out whole before the optimizer, the router's bf16x6 and
  bf16x3 emulations (on CPU XLA's fp32 dot itself) change how the step compiles, not what it
  computes (micro-batches under the same settings: test_grad_accumulation_matches_full_batch)."""
  c, state, batch = setup
  fast = c.copy_and_resolve_references()
  fast.model.unroll_layers, fast.train.materialize_grads = True, True
  fast.model.router_precision, fast.model.router_grad_precision = "bf16x6", "bf16x3"
  (want, want_metrics), (got, got_metrics) = _step(c, state, batch), _step(fast, state, batch)
  np.testing.assert_allclose(got_metrics["grad_norm"], want_metrics["grad_norm"], rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
               (got.params, got.opt_state), (want.params, want.opt_state))


def test_compute_dtype_grads_give_the_same_step():
  """bf16 gradients for the matmul kernels (`train.compute_dtype_grads`) are the values the
  fp32 path casts up: the step is unchanged. The gradients really come back in bf16 for the
  kernels, and in fp32 for the LM head, embedding, router and norms."""
  c = _micro_config()
  c.model.dtype = "bfloat16"
  c.model.num_nextn_predict_layers = 0  # halves the compile; the rule is by name (train.py)
  state = jax.jit(functools.partial(train.init_state, c.model, c.train))(jax.random.key(0))
  batch = _batch(c)
  fast = c.copy_and_resolve_references()
  fast.train.compute_dtype_grads = True
  _, _, grads = jax.eval_shape(functools.partial(train.accumulate_gradients, m=fast.model,
                                                 t=fast.train), state, batch)
  flat = traverse_util.flatten_dict(grads)
  bf16 = {"/".join(k) for k, g in flat.items() if g.dtype == jnp.bfloat16}
  assert {"moe_layers/mlp/wi_gate_up", "moe_layers/mlp/wo",
          "dense_layers/attention/qkv/kernel"} <= bf16
  assert not bf16 & {"lm_head/kernel", "embed/embedding", "moe_layers/mlp/router",
                     "final_norm/scale"}
  (want, want_metrics), (got, got_metrics) = _step(c, state, batch), _step(fast, state, batch)
  np.testing.assert_allclose(got_metrics["grad_norm"], want_metrics["grad_norm"], rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-8),
               (got.params, got.opt_state), (want.params, want.opt_state))


def test_unknown_router_precision_names_the_field():
  config = ling2.get_config("tiny")
  config.model.router_precision = "tf32"
  with pytest.raises(ValueError, match="config.model.router_precision.*Fix"):
    trainer.validate_config(config)


def test_init_state_fn_is_one_object_per_config():
  """Jobs trace init_state once (eval_shape, then jit) only if both get the same function."""
  c = ling2.get_config("tiny")
  fn = train.init_state_fn(c.model, c.train)
  assert train.init_state_fn(c.model.copy_and_resolve_references(),
                             c.train.copy_and_resolve_references()) is fn
  c.train.seed = 1
  assert train.init_state_fn(c.model, c.train) is not fn


def test_chunked_cross_entropy_holds_one_chunk_of_logits():
  """train.chunked_cross_entropy_sum against the LM head then cross_entropy_sum: the same sum
  (differentiated or not) and gradients (hidden and head, made in the forward pass), in bf16
  compute with a bf16 head too, and the compiled gradient's temporaries a fraction of the whole
  logits' (one 32-position chunk of 512)."""
  c = _micro_config()
  c.model.dtype = "bfloat16"
  b, length, d_model, vocab = 2, 512, 32, 8192
  kh, kw, kt = jax.random.split(jax.random.key(0), 3)
  hidden = jax.random.normal(kh, (b, length, d_model), jnp.float32)
  targets = jax.random.randint(kt, (b, length), 0, vocab)
  mask = (jnp.arange(length) < length - 5).astype(jnp.float32)[None].repeat(b, 0)

  def whole(h, w):
    logits = jax.lax.dot_general(h.astype(jnp.bfloat16), w.astype(jnp.bfloat16),
                                 (((2,), (0,)), ((), ()))).astype(jnp.float32)
    return train.cross_entropy_sum(logits, targets, mask)

  def chunked(h, w):
    return train.chunked_cross_entropy_sum(h, targets, mask, kernel_DV=w, chunk_len=32, m=c.model)

  for w_dtype in (jnp.float32, jnp.bfloat16):
    w = (jax.random.normal(kw, (d_model, vocab), jnp.float32) / 8).astype(w_dtype)
    (want, want_g), (got, got_g) = (jax.jit(jax.value_and_grad(f, (0, 1)))(hidden, w)
                                    for f in (whole, chunked))
    np.testing.assert_allclose(got, want, rtol=1e-5)
    np.testing.assert_allclose(jax.jit(chunked)(hidden, w), want, rtol=1e-5)  # no gradients
    for g, r in zip(got_g, want_g):
      assert g.dtype == r.dtype
      np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(r, np.float32),
                                 rtol=2e-2, atol=2e-2 * float(jnp.max(jnp.abs(r))))
  temp = {f.__name__: jax.jit(jax.grad(f, (0, 1))).lower(hidden, w).compile()
          .memory_analysis().temp_size_in_bytes for f in (whole, chunked)}
  logits_bytes = b * length * vocab * 4
  # 50.3 MB against 5.5 MB (a chunk's logits and gradient, the head and its sum in fp32).
  assert temp["whole"] >= logits_bytes > 4 * temp["chunked"], temp


def test_eval_step_in_chunks_matches_whole_logits(setup):
  """The validation loss of a run with train.loss_chunk_len: the same sums, both heads."""
  c, state, batch = setup
  chunks = c.copy_and_resolve_references()
  chunks.train.loss_chunk_len = 4
  whole, chunked = (jax.jit(functools.partial(train.eval_step, m=cfg.model, t=cfg.train))(
      state.params, state.moe_state, batch) for cfg in (c, chunks))
  assert set(chunked) == set(whole) == {"ce_sum", "tokens", "mtp_ce_sum", "mtp_tokens"}
  for key in whole:
    np.testing.assert_allclose(chunked[key], whole[key], rtol=1e-6)


def test_loss_chunk_len_must_divide_seq_len():
  c = _micro_config()
  c.train.loss_chunk_len = 5
  with pytest.raises(ValueError, match=r"train.loss_chunk_len: 5 does not divide seq_len=16"):
    trainer.validate_config(c)
