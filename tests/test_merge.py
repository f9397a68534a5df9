"""Tests for ling_jax/merge.py: WSM decay weights, their inverse map, and the parameter average."""

import gc
import weakref

import jax.numpy as jnp
import numpy as np
import pytest

from ling_jax import merge

KS = (0, 1, 2, 3, 7, 31)


@pytest.mark.parametrize("kind", merge.MERGE_KINDS)
@pytest.mark.parametrize("k", KS)
def test_coefficients_recover_decay_weights(kind, k):
  c = merge.merge_coefficients(kind, k + 1)
  assert c.shape == (k + 1,)
  # The spec's forward map, written out independently of the library's cumsum.
  w = np.array([sum(c[j] for j in range(i, k + 1)) for i in range(1, k + 1)])
  np.testing.assert_allclose(w, merge.decay_weights(kind, k), rtol=0, atol=1e-12)
  np.testing.assert_allclose(merge.decay_weights_from_coefficients(c), w, atol=1e-12)


@pytest.mark.parametrize("kind", merge.MERGE_KINDS)
@pytest.mark.parametrize("k", KS)
def test_coefficients_are_a_convex_combination(kind, k):
  c = merge.merge_coefficients(kind, k + 1)
  assert np.all(c >= 0)
  assert c[-1] > 0  # The newest checkpoint always counts (module docstring convention).
  np.testing.assert_allclose(c.sum(), 1.0, atol=1e-12)


@pytest.mark.parametrize("kind", merge.MERGE_KINDS)
def test_decay_weights_are_monotone_in_0_1(kind):
  w = merge.decay_weights(kind, 15)
  assert np.all(np.diff(w) < 0)
  assert np.all((w > 0) & (w < 1))


@pytest.mark.parametrize(
    "kind, k, want_w, want_c",
    [
        # t = 1/3, 2/3: w = 1 - t.
        ("linear", 2, [2 / 3, 1 / 3], [1 / 3, 1 / 3, 1 / 3]),
        # t = 1/3, 2/3: cos(pi/3) = 1/2, cos(2pi/3) = -1/2.
        ("cosine", 2, [3 / 4, 1 / 4], [1 / 4, 1 / 2, 1 / 4]),
        # t = 1/4, 2/4, 3/4: c_0 = 1 - w_1 = sqrt(1/4).
        (
            "1-sqrt",
            3,
            [1 / 2, 1 - np.sqrt(1 / 2), 1 - np.sqrt(3 / 4)],
            [1 / 2, np.sqrt(1 / 2) - 1 / 2, np.sqrt(3 / 4) - np.sqrt(1 / 2), 1 - np.sqrt(3 / 4)],
        ),
        ("mean", 3, [3 / 4, 2 / 4, 1 / 4], [1 / 4] * 4),
        ("1-sqrt", 0, [], [1.0]),
    ],
)
def test_hand_worked_cases(kind, k, want_w, want_c):
  np.testing.assert_allclose(merge.decay_weights(kind, k), want_w, atol=1e-15)
  np.testing.assert_allclose(merge.merge_coefficients(kind, k + 1), want_c, atol=1e-15)


@pytest.mark.parametrize("n", [1, 2, 5, 32])
def test_mean_is_equal_weights_and_equals_linear(n):
  np.testing.assert_allclose(merge.merge_coefficients("mean", n), np.full(n, 1 / n), atol=1e-15)
  np.testing.assert_allclose(
      merge.merge_coefficients("linear", n), merge.merge_coefficients("mean", n), atol=1e-15
  )


@pytest.mark.parametrize("kind", merge.MERGE_KINDS)
def test_merge_replays_updates_scaled_by_decay_weights(kind):
  # The WSM identity: the merge equals theta_n plus the interval updates scaled by w_i.
  k = 6
  rng = np.random.default_rng(0)
  updates_KD = rng.normal(size=(k, 5))
  theta_0 = rng.normal(size=5)
  thetas = np.concatenate([theta_0[None], theta_0 + np.cumsum(updates_KD, axis=0)])
  merged = merge.merge_coefficients(kind, k + 1) @ thetas
  want = theta_0 + merge.decay_weights(kind, k) @ updates_KD
  np.testing.assert_allclose(merged, want, atol=1e-12)


@pytest.mark.parametrize("fn", [merge.decay_weights, merge.merge_coefficients])
def test_unknown_kind_names_flag_and_options(fn):
  with pytest.raises(ValueError, match="--weights") as e:
    fn("exp", 3)
  for kind in merge.MERGE_KINDS:
    assert kind in str(e.value)


def test_bad_counts_raise():
  with pytest.raises(ValueError):
    merge.merge_coefficients("mean", 0)
  with pytest.raises(ValueError):
    merge.decay_weights("mean", -1)


def _iter_trees(n, seed=0):
  rng = np.random.default_rng(seed)
  for j in range(n):
    yield {
        "w": rng.normal(size=(3, 4)).astype(np.float32),
        "inner": {"b": rng.normal(size=(4,)).astype(jnp.bfloat16), "s": np.float32(j)},
    }


def _trees(n, seed=0):
  return list(_iter_trees(n, seed))


def test_merge_params_matches_numpy_weighted_sum():
  trees = _trees(4)
  c = merge.merge_coefficients("1-sqrt", 4)
  got = merge.merge_params(trees, c)
  for key, get in [("w", lambda t: t["w"]), ("b", lambda t: t["inner"]["b"])]:
    want = sum(cj * get(t).astype(np.float64) for cj, t in zip(c, trees))
    assert get(got).dtype == get(trees[0]).dtype, key
    tol = 1e-6 if key == "w" else 1e-2  # bf16 output has an 8-bit mantissa.
    np.testing.assert_allclose(np.asarray(get(got), np.float64), want, rtol=tol, atol=tol)
  np.testing.assert_allclose(got["inner"]["s"], c @ np.arange(4), rtol=1e-6)


def test_merge_params_accumulates_bf16_in_fp32():
  # The mean is 257.5, which rounds to 258 in bf16; a bf16 running sum drifts down to 256
  # (64 + 64.5 + 64.5 + 64.5, rounding ties to even after each add).
  trees = [{"x": jnp.full((2,), v, jnp.bfloat16)} for v in (256.0, 258.0, 258.0, 258.0)]
  got = merge.merge_params(trees, [0.25] * 4)
  assert got["x"].dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(got["x"], np.float32), [258.0, 258.0])
  got = merge.merge_params([{"x": jnp.float32(1.0)}] * 3, [0.25, 0.25, 0.5])
  assert float(got["x"]) == 1.0


def test_merge_params_holds_at_most_one_tree_from_a_generator():
  refs = []

  def alive():
    return [j for j, r in enumerate(refs) if r() is not None]

  def gen():
    for tree in _iter_trees(5):
      # A full collection only where reference counting has left an older tree: late in a test
      # session the heap is large, and each collection took ~1.7 s (8 s for this test).
      if len(alive()) > 1:
        gc.collect()
      assert len(alive()) <= 1, f"merge_params kept trees {alive()} alive"
      refs.append(weakref.ref(tree["w"]))
      yield tree

  got = merge.merge_params(gen(), merge.merge_coefficients("mean", 5))
  np.testing.assert_allclose(got["w"], np.mean([t["w"] for t in _trees(5)], axis=0), atol=1e-6)


def test_merge_params_rejects_mismatches():
  trees = _trees(3)
  with pytest.raises(ValueError, match="sum to 1"):
    merge.merge_params(trees, [0.5, 0.5, 0.5])
  with pytest.raises(ValueError, match="3 param trees for 2 coefficients|more than 2"):
    merge.merge_params(trees, [0.5, 0.5])
  with pytest.raises(ValueError, match="2 param trees for 3"):
    merge.merge_params(trees[:2], [0.2, 0.3, 0.5])
  with pytest.raises(ValueError, match="structure"):
    merge.merge_params([trees[0], {"w": trees[1]["w"]}], [0.5, 0.5])
  with pytest.raises(TypeError, match="float leaves"):
    merge.merge_params([{"i": np.int32(1)}], [1.0])
