"""Hand-worked routing cases and the aux-loss-free bias update."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ling_jax import router

SCORES = np.array([0.9, 0.1, 0.8, 0.7, 0.2, 0.3, 0.6, 0.5], np.float32)


def _route(bias, scores=SCORES, **kw):
  logits = np.log(scores / (1 - scores))[None]  # sigmoid(logits) == scores
  args = dict(top_k=2, n_group=4, topk_group=2, routed_scaling_factor=2.5)
  args.update(kw)
  return router.route_tokens(jnp.asarray(logits), jnp.asarray(bias, jnp.float32), **args)


def test_group_limit_drops_the_best_expert_of_a_weak_group():
  # Groups (top-2 sums): g0=1.0, g1=1.5, g2=0.5, g3=1.1 -> keep g1, g3. Expert 0 (0.9) is the
  # best single score but its group is dropped.
  r = _route(np.zeros(8))
  np.testing.assert_array_equal(r.expert_ids_TK[0], [2, 3])
  np.testing.assert_allclose(r.weights_TK[0], [0.8 / 1.5 * 2.5, 0.7 / 1.5 * 2.5], rtol=1e-6)


def test_bias_changes_selection_but_not_weights():
  # +0.5 on expert 6 lifts g3 to 1.6 and expert 6 to 1.1 (biased); weights stay unbiased.
  bias = np.array([0, 0, 0, 0, 0, 0, 0.5, 0], np.float32)
  r = _route(bias)
  np.testing.assert_array_equal(r.expert_ids_TK[0], [6, 2])
  np.testing.assert_allclose(r.weights_TK[0], [0.6 / 1.4 * 2.5, 0.8 / 1.4 * 2.5], rtol=1e-6)


def test_negative_bias_never_selects_dropped_groups():
  # Kept groups hold experts whose biased scores are negative; dropped groups must still lose.
  bias = np.array([0, 0, -2, -2, 0, 0, -2, -2], np.float32)
  r = _route(bias, n_group=4, topk_group=2)
  # Biased group sums: g0=1.0, g1=-2.5, g2=0.5, g3=-2.9 -> keep g0, g2.
  assert set(np.asarray(r.expert_ids_TK[0]).tolist()) == {0, 5}


def test_no_groups_is_plain_top_k():
  r = _route(np.zeros(8), n_group=1, topk_group=1, top_k=3)
  np.testing.assert_array_equal(r.expert_ids_TK[0], [0, 2, 3])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_weights_sum_to_scaling_factor(seed):
  logits = jax.random.normal(jax.random.key(seed), (64, 32)) * 3
  bias = jax.random.normal(jax.random.key(seed + 10), (32,)) * 0.1
  r = router.route_tokens(logits, bias, top_k=8, n_group=8, topk_group=4,
                          routed_scaling_factor=2.5)
  np.testing.assert_allclose(np.sum(r.weights_TK, -1), 2.5, rtol=1e-5)
  assert r.expert_ids_TK.dtype == jnp.int32
  # Chosen experts are distinct and lie in at most topk_group groups.
  ids = np.asarray(r.expert_ids_TK)
  for row in ids:
    assert len(set(row.tolist())) == 8
    assert len(set((row // 4).tolist())) <= 4


def test_counts_exclude_padding_and_z_loss():
  logits = jnp.array([[1.0, 2.0, 3.0, 4.0]] * 3)
  mask = jnp.array([1.0, 1.0, 0.0])
  r = router.route_tokens(logits, jnp.zeros(4), top_k=2, n_group=1, topk_group=1,
                          routed_scaling_factor=1.0, token_mask_T=mask)
  np.testing.assert_array_equal(r.counts_E, [0, 0, 2, 2])
  lse = np.log(np.sum(np.exp([1.0, 2.0, 3.0, 4.0])))
  np.testing.assert_allclose(r.z_loss, lse**2, rtol=1e-6)


def test_update_expert_bias_hand_worked():
  # mean 2, err [-3, 1, 1, 1], sign [-1, 1, 1, 1], mean sign 0.5.
  new = router.update_expert_bias(jnp.zeros(4), jnp.array([5.0, 1.0, 1.0, 1.0]), 1e-3)
  np.testing.assert_allclose(new, [-1.5e-3, 0.5e-3, 0.5e-3, 0.5e-3], rtol=1e-6)
  # Balanced experts (err 0) do not move; the sign rule ignores magnitude.
  new = router.update_expert_bias(jnp.zeros(4), jnp.array([40.0, 0.0, 20.0, 20.0]), 0.1)
  np.testing.assert_allclose(new, [-0.1, 0.1, 0.0, 0.0], atol=1e-7)


@pytest.mark.parametrize("seed", range(4))
def test_update_expert_bias_properties(seed):
  rng = np.random.default_rng(seed)
  counts = rng.integers(0, 100, size=(3, 16)).astype(np.float32)  # Stacked layers.
  bias = rng.normal(size=(3, 16)).astype(np.float32)
  bias -= bias.mean(-1, keepdims=True)
  new = np.asarray(router.update_expert_bias(jnp.asarray(bias), jnp.asarray(counts), 1e-3))
  np.testing.assert_allclose(new.mean(-1), 0.0, atol=1e-6)  # Stays zero-mean.
  delta = new - bias
  mean = counts.mean(-1, keepdims=True)
  under, over = counts < mean, counts > mean
  # Every under-loaded expert rises above every over-loaded one.
  for layer in range(3):
    if under[layer].any() and over[layer].any():
      assert delta[layer][under[layer]].min() > delta[layer][over[layer]].max()


def test_max_violation():
  np.testing.assert_allclose(router.max_violation(jnp.array([4.0, 2.0, 1.0, 1.0])), 1.0)
  np.testing.assert_allclose(router.max_violation(jnp.ones((2, 8))), [0.0, 0.0])


@pytest.mark.parametrize("precision,grad_precision", [("float32", "float32"),
                                                      ("bf16x6", "bf16x3")])
def test_router_logits_and_their_gradients_match_float64(precision, grad_precision):
  """moe.router_logits (separate forward and backward precisions) against a float64 NumPy VJP;
  x is bf16, as in the model, and its gradient comes back in bf16."""
  from ling_jax import config as config_lib
  from ling_jax import moe
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((64, 32)), jnp.bfloat16)
  w = jnp.asarray(rng.standard_normal((32, 16)) * 0.1, jnp.float32)
  g = rng.standard_normal((64, 16)).astype(np.float32)
  f = lambda x, w: moe.router_logits(x, w, config_lib.ROUTER_PRECISIONS[precision],
                                     config_lib.ROUTER_PRECISIONS[grad_precision])
  logits, vjp = jax.vjp(f, x, w)
  dx, dw = vjp(jnp.asarray(g))
  x64, w64, g64 = np.asarray(x, np.float64), np.asarray(w, np.float64), g.astype(np.float64)
  assert logits.dtype == jnp.float32 and dx.dtype == jnp.bfloat16 and dw.dtype == jnp.float32
  np.testing.assert_allclose(logits, x64 @ w64, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(dx, np.float64), g64 @ w64.T, rtol=1e-2, atol=1e-2)
  np.testing.assert_allclose(dw, x64.T @ g64, rtol=1e-5, atol=1e-4)


def test_unknown_router_grad_precision_names_the_field():
  from configs import ling2
  from ling_jax import trainer
  config = ling2.get_config("tiny")
  config.model.router_grad_precision = "bf16"
  with pytest.raises(ValueError, match="config.model.router_grad_precision.*Fix"):
    trainer.validate_config(config)


def test_random_logits_replace_values_and_pass_gradients_straight_through():
  logits = jnp.asarray(np.random.default_rng(3).standard_normal((512, 16)) * 5 + 10, jnp.float32)
  out = router.random_logits(logits)
  np.testing.assert_array_equal(out, router.random_logits(logits * 2))  # the values: not logits'
  assert abs(float(jnp.mean(out))) < 0.1 and abs(float(jnp.std(out)) - 1) < 0.1
  weights = jnp.asarray(np.random.default_rng(4).standard_normal((512, 16)), jnp.float32)
  grad = jax.grad(lambda x: jnp.sum(router.random_logits(x) * weights))(logits)
  np.testing.assert_array_equal(grad, weights)


def test_random_logits_balance_a_collapsed_router_and_keep_its_gradient():
  """model.router_random_logits (benchmarks): 1,024 copies of one token route to the same 4 of
  16 experts (max violation E / K - 1 = 3); on random logits the load is near-even, and the
  router weight still gets a gradient (through the learned logits)."""
  import ml_collections

  from configs import ling2
  from ling_jax import moe

  m = ling2.model_config("tiny")
  x = jnp.tile(jnp.asarray(np.random.default_rng(5).standard_normal((1, 1, m.hidden_size)),
                           jnp.float32), (4, 256, 1))
  mask = jnp.ones(x.shape[:2], jnp.float32)
  # Jitted: op by op, the layer's init and gradient compile each of their many small ops alone.
  variables = jax.jit(moe.MoE(m).init)(jax.random.key(0), x, mask)
  violation = {}
  for random in (False, True):
    mr = ml_collections.ConfigDict(m.to_dict())
    mr.router_random_logits = random

    def loss(params, mr=mr):
      y, stats = moe.MoE(mr).apply({**variables, "params": params}, x, mask,
                                   mutable=[moe.STATS])
      return jnp.sum(y * y), stats[moe.STATS]["counts"]
    (_, counts), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(variables["params"])
    violation[random] = float(router.max_violation(counts))
    assert float(jnp.abs(grads["router"]).max()) > 0
  assert violation[False] == pytest.approx(16 / 4 - 1)
  assert violation[True] < 0.25
