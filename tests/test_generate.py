"""Tests for ling_jax/generate.py and the KV cache: cached decoding against full recomputation,
the sampling distributions against a NumPy reference, stop tokens, and bad input.

Key: B batch, L length, V vocabulary.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ling_jax import config as config_lib
from ling_jax import generate
from ling_jax import hf
from ling_jax import model
from tests.test_model_reference import _config
from tests.test_model_reference import _randomise

NEW_TOKENS = 64
PROMPTS = ([5, 17, 99, 3, 250], [7, 8, 9, 10, 11, 12, 13, 14, 15], [300, 2, 41])


@pytest.fixture(scope="module")
def variables():
  m = _config()
  shapes = jax.eval_shape(functools.partial(model.init_variables, m), jax.random.PRNGKey(0))
  return jax.tree.map(jnp.asarray, _randomise(shapes, np.random.default_rng(0)))


@pytest.fixture(scope="module")
def greedy(variables):
  return generate.generate(_config(), variables, PROMPTS, max_new_tokens=NEW_TOKENS)


def test_cached_greedy_decoding_equals_full_recomputation(variables, greedy):
  """Each of 64 greedy tokens is the argmax of a full (cache-free) pass over everything before
  it; one right-padded pass covers every step of every row, since the model is causal."""
  m = _config()
  rows = [list(p) + t for p, t in zip(PROMPTS, greedy.tokens)]
  assert [len(t) for t in greedy.tokens] == [NEW_TOKENS] * len(PROMPTS)
  assert greedy.finish_reasons == ["length"] * len(PROMPTS)
  length = max(len(r) for r in rows)
  ids_BL = np.zeros((len(rows), length), np.int32)
  for b, row in enumerate(rows):
    ids_BL[b, :len(row)] = row
  logits_BLV = np.asarray(hf.compute_logits(m, variables, ids_BL, [len(r) for r in rows]))
  for b, (prompt, new) in enumerate(zip(PROMPTS, greedy.tokens)):
    steps = slice(len(prompt) - 1, len(prompt) - 1 + NEW_TOKENS)
    np.testing.assert_array_equal(logits_BLV[b, steps].argmax(-1), new, err_msg=f"row {b}")
  assert len({tuple(t) for t in greedy.tokens}) == len(PROMPTS)  # Rows decode independently.


def test_cached_logits_match_full_pass(variables):
  """Prefill of a left-padded batch and 3 decode steps give the full pass's logits."""
  m = _config()
  ids_BP, positions_BP, segment_ids_BP = generate.left_pad(PROMPTS)
  np.testing.assert_array_equal(segment_ids_BP.sum(1), [len(p) for p in PROMPTS])
  extra_B3 = np.array([[1, 2, 3], [4, 5, 6], [7, 8, 9]], np.int32)
  ids_BL = np.concatenate([ids_BP, extra_B3], 1)
  positions_BL = np.concatenate([positions_BP, positions_BP[:, -1:] + 1 + np.arange(3)], 1)
  segment_ids_BL = np.concatenate([segment_ids_BP, np.ones_like(extra_B3)], 1)
  # Jitted: op by op, each pass compiles its many small ops alone.
  apply = jax.jit(lambda *args: model.apply(m, *args))
  apply_cached = jax.jit(lambda *args: model.apply_cached(m, *args))
  full, _ = apply(variables, ids_BL, positions_BL, segment_ids_BL)
  cache = model.init_cache(m, 3, ids_BL.shape[1])
  got, cache = apply_cached(variables, ids_BP, positions_BP, segment_ids_BP, cache)
  want = np.asarray(full.logits_BLV)
  scale = np.abs(want).max()
  np.testing.assert_allclose(got, want[:, ids_BP.shape[1] - 1], atol=1e-5 * scale)
  for t in range(3):
    col = ids_BP.shape[1] + t
    got, cache = apply_cached(variables, ids_BL[:, col:col + 1], positions_BL[:, col:col + 1],
                              segment_ids_BL[:, col:col + 1], cache)
    np.testing.assert_allclose(got, want[:, col], atol=1e-5 * scale)
  assert int(cache["index"]) == ids_BL.shape[1]


def _reference_probs(logits, temperature, top_k, top_p):
  """NumPy float64: temperature, keep the top-k values, then the smallest top-p nucleus."""
  logits = np.asarray(logits, np.float64) / temperature
  out = np.zeros_like(logits)
  for b, row in enumerate(logits):
    order = np.argsort(-row, kind="stable")
    keep = order if not top_k else order[:top_k]
    p = np.exp(row[keep] - row[keep].max())
    p /= p.sum()
    mass, n = 0.0, 0
    while n < len(keep) and mass < top_p:  # Take tokens until the mass reaches top_p.
      mass += p[n]
      n += 1
    out[b, keep[:n]] = p[:n] / p[:n].sum()
  return out


@pytest.mark.parametrize("temperature,top_k,top_p", [
    (1.0, 0, 1.0), (0.7, 5, 1.0), (1.3, 0, 0.8), (1.0, 10, 0.5), (2.0, 1, 1.0), (0.5, 0, 0.05)])
def test_sampling_probs_match_numpy(temperature, top_k, top_p):
  logits = np.random.default_rng(3).normal(0, 2, (4, 40)).astype(np.float32)
  got = np.asarray(generate.sampling_probs(jnp.asarray(logits),
                                           generate.Sampling(temperature, top_k, top_p)))
  np.testing.assert_allclose(got, _reference_probs(logits, temperature, top_k, top_p),
                             atol=1e-6)


def test_sampling_draws_follow_the_distribution():
  """4096 draws of one row: kept tokens only, frequencies within 5 sigma of the probabilities."""
  logits = np.random.default_rng(4).normal(0, 1.5, (1, 12)).astype(np.float32)
  sampling = generate.Sampling(temperature=0.9, top_k=6, top_p=0.9)
  draws = np.asarray(generate.sample_tokens(jnp.asarray(np.repeat(logits, 4096, 0)),
                                            jax.random.key(0), sampling))
  probs = _reference_probs(logits, 0.9, 6, 0.9)[0]
  freq = np.bincount(draws, minlength=12) / len(draws)
  assert set(np.flatnonzero(freq)) <= set(np.flatnonzero(probs))
  assert (np.abs(freq - probs) <= 5 * np.sqrt(probs * (1 - probs) / len(draws)) + 1e-9).all()
  greedy = generate.sample_tokens(jnp.asarray(logits), jax.random.key(0), generate.Sampling())
  assert int(greedy[0]) == int(logits.argmax())


def test_stop_tokens_end_each_row(variables, greedy):
  """Stopping at a token row 0 emits at step 10: row 0 ends there (stop token not returned);
  each other row ends at its own first occurrence of that token, or runs to the length."""
  stop = greedy.tokens[0][10]
  result = generate.generate(_config(), variables, PROMPTS, max_new_tokens=NEW_TOKENS,
                             stop_tokens=(stop,))
  for full, got, reason in zip(greedy.tokens, result.tokens, result.finish_reasons):
    end = full.index(stop) if stop in full else NEW_TOKENS
    assert got == full[:end]
    assert reason == ("stop" if stop in full else "length")
  assert result.tokens[0] == greedy.tokens[0][:greedy.tokens[0].index(stop)]


def test_sampled_generation_is_seeded(variables):
  m = _config()
  kwargs = dict(max_new_tokens=4, sampling=generate.Sampling(1.0, 20, 0.9))
  a = generate.generate(m, variables, PROMPTS[:2], rng=jax.random.key(1), **kwargs)
  b = generate.generate(m, variables, PROMPTS[:2], rng=jax.random.key(1), **kwargs)
  assert a.tokens == b.tokens and all(len(t) == 4 for t in a.tokens)


@pytest.mark.parametrize("kwargs,field", [
    (dict(prompts=[[1, 2], []]), "config.prompts"),
    (dict(prompts=[[1, 600]]), "config.prompts"),
    (dict(max_new_tokens=5000), "config.model.max_position_embeddings"),
    (dict(max_new_tokens=0), "config.max_new_tokens"),
    (dict(sampling=generate.Sampling(top_p=0.0)), "config.sampling.top_p"),
    (dict(sampling=generate.Sampling(temperature=-1.0)), "config.sampling.temperature"),
])
def test_bad_input_names_the_field(variables, kwargs, field):
  args = dict(prompts=[[1, 2]], max_new_tokens=4) | kwargs
  with pytest.raises(config_lib.ConfigError, match=field):
    generate.generate(_config(), variables, args.pop("prompts"), **args)
