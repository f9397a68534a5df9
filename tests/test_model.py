"""Property tests for ling_jax/model.py: causality, packing isolation, shapes and dtypes, jit.

Numerics against a float64 reference live in test_model_reference.py. Here the tiny config runs
with random O(1) weights and a non-zero expert bias, so that routing depends on the tokens.

Key: B batch, L length, D model dim, E experts, V vocabulary.
"""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ling_jax import model
from tests.test_model_reference import _config
from tests.test_model_reference import _randomise

SEED = 0
LENGTH = 24
DOC1 = 10  # Row 0 of the packed batch: a 10-token document, then a 14-token one.


@pytest.fixture(autouse=True)
def _strict_rank_promotion():
  with jax.numpy_rank_promotion("raise"):
    yield


@pytest.fixture(scope="module")
def variables():
  m = _config()
  shapes = jax.eval_shape(functools.partial(model.init_variables, m), jax.random.PRNGKey(SEED))
  return jax.tree.map(jnp.asarray, _randomise(shapes, np.random.default_rng(SEED)))


def _forward(dtype="float32"):
  return _jitted_apply(dtype)


@functools.cache
def _jitted_apply(dtype):
  m = _config(dtype)
  return jax.jit(lambda v, *args: model.apply(m, v, *args))


def _next_tokens(inputs_BL, segments_BL):
  """Targets: the next token inside the same document, 0 after a document's last token."""
  next_BL = np.concatenate([inputs_BL[:, 1:], np.zeros_like(inputs_BL[:, :1])], 1)
  same_BL = np.concatenate([segments_BL[:, 1:], np.zeros_like(segments_BL[:, :1])], 1)
  return np.where(same_BL == segments_BL, next_BL, 0)


def _distinct_tokens(rng, shape):
  """Token ids 1.. with no repeats, so an embedding row belongs to a single position."""
  return rng.permutation(np.arange(1, _config().vocab_size))[:np.prod(shape)].reshape(shape)


def _packed_batch(inputs_BL):
  """Row 0: two documents (positions restart); row 1: the second document alone, then padding."""
  segments_BL = np.array([[1] * DOC1 + [2] * (LENGTH - DOC1),
                          [1] * (LENGTH - DOC1) + [0] * DOC1], np.int32)
  positions_BL = np.array([list(range(DOC1)) + list(range(LENGTH - DOC1)),
                           list(range(LENGTH - DOC1)) + [0] * DOC1], np.int32)
  inputs_BL = inputs_BL.copy()
  inputs_BL[1] = np.concatenate([inputs_BL[0, DOC1:], np.zeros(DOC1, inputs_BL.dtype)])
  return inputs_BL, positions_BL, segments_BL, _next_tokens(inputs_BL, segments_BL)


def _one_document(inputs_BL):
  batch, length = inputs_BL.shape
  positions_BL = np.tile(np.arange(length, dtype=np.int32), (batch, 1))
  segments_BL = np.ones((batch, length), np.int32)
  return inputs_BL, positions_BL, segments_BL, _next_tokens(inputs_BL, segments_BL)


# ---------------------------------------------------------------------------------------------
# Causality.
# ---------------------------------------------------------------------------------------------


@functools.cache
def _embedding_grad_fn():
  """Gradient of <probe, logits[0, t]> (main head or MTP head) w.r.t. the embedding table."""
  m = _config()

  def loss(table_VD, variables, batch, t, use_mtp, probe_V):
    params = {**variables["params"], "embed": {"embedding": table_VD}}
    out, _ = model.apply(m, {**variables, "params": params}, *batch)
    logits_LV = jnp.where(use_mtp, out.mtp_logits[0][0], out.logits_BLV[0])
    return jax.lax.dynamic_index_in_dim(logits_LV, t, keepdims=False) @ probe_V

  return jax.jit(jax.grad(loss))


@pytest.mark.parametrize("t", [0, 9, LENGTH - 2])
def test_gradient_ignores_later_tokens(variables, t):
  rng = np.random.default_rng(t)
  inputs_BL = _distinct_tokens(rng, (1, LENGTH)).astype(np.int32)
  batch = _one_document(inputs_BL)
  probe_V = jnp.asarray(rng.standard_normal(_config().vocab_size), jnp.float32)
  grad_fn = _embedding_grad_fn()
  table_VD = variables["params"]["embed"]["embedding"]
  for use_mtp, sees in ((False, t), (True, t + 1)):  # MTP at t embeds token t + 1.
    grad_VD = np.asarray(grad_fn(table_VD, variables, batch, t, use_mtp, probe_V))
    row_norm_L = np.abs(grad_VD[inputs_BL[0]]).sum(-1)
    assert (row_norm_L[sees + 1:] == 0).all(), (use_mtp, row_norm_L)
    assert (row_norm_L[:sees + 1] > 0).all(), (use_mtp, row_norm_L)


def test_later_tokens_leave_earlier_logits_bitwise_unchanged(variables):
  rng = np.random.default_rng(SEED)
  t = 11
  inputs_BL = rng.integers(1, _config().vocab_size, (2, LENGTH)).astype(np.int32)
  changed_BL = inputs_BL.copy()
  changed_BL[:, t + 1:] = rng.integers(1, _config().vocab_size, (2, LENGTH - t - 1))
  out, _ = _forward()(variables, *_one_document(inputs_BL))
  out_changed, _ = _forward()(variables, *_one_document(changed_BL))
  np.testing.assert_array_equal(out.logits_BLV[:, :t + 1], out_changed.logits_BLV[:, :t + 1])
  # MTP at position t - 1 embeds token t, the last one unchanged.
  np.testing.assert_array_equal(out.mtp_logits[0][:, :t], out_changed.mtp_logits[0][:, :t])
  assert not np.array_equal(out.logits_BLV[:, t + 1:], out_changed.logits_BLV[:, t + 1:])


# ---------------------------------------------------------------------------------------------
# Packing.
# ---------------------------------------------------------------------------------------------


def test_packed_document_matches_document_alone(variables):
  rng = np.random.default_rng(SEED + 1)
  batch = _packed_batch(rng.integers(1, _config().vocab_size, (2, LENGTH)).astype(np.int32))
  out, _ = _forward()(variables, *batch)
  for got_BLV in (out.logits_BLV, out.mtp_logits[0]):
    packed, alone = np.asarray(got_BLV[0, DOC1:]), np.asarray(got_BLV[1, :LENGTH - DOC1])
    # The same sums in a different order at most: fp32 rounding, far below any leak.
    np.testing.assert_allclose(packed, alone, rtol=1e-5, atol=1e-5 * np.abs(alone).max())


def test_first_document_does_not_leak_into_second(variables):
  rng = np.random.default_rng(SEED + 2)
  inputs_BL = rng.integers(1, _config().vocab_size, (2, LENGTH)).astype(np.int32)
  changed_BL = inputs_BL.copy()
  changed_BL[0, :DOC1] = rng.integers(1, _config().vocab_size, DOC1)
  out, _ = _forward()(variables, *_packed_batch(inputs_BL))
  out_changed, _ = _forward()(variables, *_packed_batch(changed_BL))
  np.testing.assert_array_equal(out.logits_BLV[0, DOC1:], out_changed.logits_BLV[0, DOC1:])
  np.testing.assert_array_equal(out.mtp_logits[0][0, DOC1:], out_changed.mtp_logits[0][0, DOC1:])
  assert not np.array_equal(out.logits_BLV[0, :DOC1], out_changed.logits_BLV[0, :DOC1])


# ---------------------------------------------------------------------------------------------
# Shapes, dtypes, routing statistics, jit.
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_output_shapes_dtypes_and_counts(variables, dtype):
  m = _config(dtype)
  rng = np.random.default_rng(SEED + 3)
  batch = _packed_batch(rng.integers(1, m.vocab_size, (2, LENGTH)).astype(np.int32))
  out, stats = _forward(dtype)(variables, *batch)
  b, length, num_moe = 2, LENGTH, m.num_hidden_layers - m.first_k_dense_replace
  chex.assert_shape(out.logits_BLV, (b, length, m.vocab_size))
  chex.assert_type(out.logits_BLV, jnp.float32)
  assert len(out.mtp_logits) == m.num_nextn_predict_layers
  chex.assert_shape(out.mtp_logits, (b, length, m.vocab_size))
  chex.assert_type(out.mtp_logits, jnp.float32)
  chex.assert_shape(out.hidden_BLD, (b, length, m.hidden_size))
  chex.assert_type(out.hidden_BLD, jnp.dtype(dtype))
  chex.assert_tree_all_finite(out)

  chex.assert_shape(stats["moe_layers"]["mlp"]["counts"], (num_moe, m.num_experts))
  chex.assert_shape(stats["moe_layers"]["mlp"]["z_loss"], (num_moe,))
  chex.assert_shape(stats["mtp_0"]["block"]["mlp"]["counts"], (m.num_experts,))
  chex.assert_tree_all_finite(stats)
  # Padding tokens are not routed; every real token picks exactly top-k experts.
  expected = (batch[2] != 0).sum() * m.num_experts_per_tok
  np.testing.assert_array_equal(stats["moe_layers"]["mlp"]["counts"].sum(-1), [expected] * num_moe)
  assert stats["mtp_0"]["block"]["mlp"]["counts"].sum() == expected


def test_jit_and_eager_agree_and_are_deterministic(variables):
  rng = np.random.default_rng(SEED + 4)
  batch = _packed_batch(rng.integers(1, _config().vocab_size, (2, LENGTH)).astype(np.int32))
  chex.assert_trees_all_equal(_forward()(variables, *batch), _forward()(variables, *batch))
  # Without targets (no MTP block, whose op-by-op dispatch alone takes ~10 s to compile).
  jitted = _forward()(variables, *batch[:3])
  eager = model.apply(_config(), variables, *batch[:3])
  assert jitted[0].mtp_logits == () and "mtp_0" not in jitted[1]
  # Op-by-op dispatch may fuse differently: fp32 rounding only.
  chex.assert_trees_all_close(eager, jitted, rtol=1e-5, atol=1e-5)


def test_unrolled_layers_match_the_scan(variables):
  """`unroll_layers` changes how the layer stack compiles, not what it computes."""
  rng = np.random.default_rng(SEED + 5)
  batch = _packed_batch(rng.integers(1, _config().vocab_size, (2, LENGTH)).astype(np.int32))
  results = []
  for unroll in (False, True):
    m = _config()
    m.unroll_layers = unroll

    def loss(params, m=m):  # Without targets: no MTP block, half the compile time.
      out, _ = model.apply(m, {**variables, "params": params}, *batch[:3])
      return jnp.sum(out.logits_BLV ** 2)

    results.append(jax.jit(jax.value_and_grad(loss))(variables["params"]))
  # The same ops, fused differently: fp32 rounding only (the gradients here reach ~1e2).
  chex.assert_trees_all_close(results[0], results[1], rtol=2e-4, atol=1e-3)
