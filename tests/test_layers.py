"""RoPE with YaRN scaling against hand-worked values of the released semantics; the embedding."""

import functools
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import ling2
from ling_jax import config as config_lib
from ling_jax import layers


def _rope_model(theta=10_000.0, head_dim=16, max_pos=16_384, scaling=None):
  m = ml_collections.ConfigDict({"head_dim": head_dim, "partial_rotary_factor": 0.5,
                                 "rotary_dim": None, "rope_theta": theta,
                                 "max_position_embeddings": max_pos})
  m.rope_scaling = scaling
  return m


# theta = 1e4, rotary_dim = 8 (head_dim 16 x 0.5), original context 4096, factor 4 (16384).
# Correction dim of r rotations: 8 ln(4096 / (2 pi r)) / (2 ln 1e4):
#   r = 32 (beta_fast): 8 ln(20.3718) / 18.4207 = 1.30904  -> floor 1
#   r = 1  (beta_slow): 8 ln(651.899) / 18.4207 = 2.81418  -> ceil 3
# Ramp over dims i = 0..3: clip((i - 1) / 2) = [0, 0, 0.5, 1]; the share kept at the original
# frequency 10^(-i) is 1 - ramp = [1, 1, 0.5, 0], the rest is divided by 4:
#   [1, 0.1, 0.5 * 0.01 + 0.5 * 0.0025, 0.001 / 4] = [1, 0.1, 0.00625, 0.00025]
# attention factor 0.1 ln 4 + 1 = 1.1386294.
_HAND_INV_FREQ = [1.0, 0.1, 0.00625, 0.00025]
_HAND_ATTENTION = 1.1386294361119891


def test_yarn_frequencies_match_hand_computed_reference():
  m = _rope_model(scaling={"type": "yarn", "factor": 4.0,
                           "original_max_position_embeddings": 4096})
  inv_freq, attention = layers.rope_frequencies(m)
  np.testing.assert_allclose(np.asarray(inv_freq), _HAND_INV_FREQ, rtol=1e-6)
  assert attention == pytest.approx(_HAND_ATTENTION, rel=1e-12)


def test_yarn_without_truncation_ramps_between_fractional_dims():
  # truncate=False keeps low = 1.30904, high = 2.81417: dim 2 ramps (2 - 1.30904) / 1.50513
  # = 0.459069 towards the interpolated 0.0025, keeping 0.540931 of 0.01:
  # 0.00540931 + 0.00114767 = 0.00655698; dims 0, 1 keep theirs, dim 3 is fully divided.
  m = _rope_model(scaling={"rope_type": "yarn", "factor": 4.0, "truncate": False,
                           "original_max_position_embeddings": 4096})
  inv_freq, _ = layers.rope_frequencies(m)
  np.testing.assert_allclose(np.asarray(inv_freq), [1.0, 0.1, 0.00655698, 0.00025], rtol=2e-5)


def test_yarn_without_original_uses_max_positions_and_factor():
  # No original_max_position_embeddings: the ramp is measured on max_position_embeddings
  # (4096 here) and `factor` is used as given, so this matches the hand-worked case.
  m = _rope_model(max_pos=4096, scaling={"type": "yarn", "factor": 4.0})
  inv_freq, attention = layers.rope_frequencies(m)
  np.testing.assert_allclose(np.asarray(inv_freq), _HAND_INV_FREQ, rtol=1e-6)
  assert attention == pytest.approx(_HAND_ATTENTION, rel=1e-12)


@pytest.mark.parametrize("extra, want", [
    ({"attention_factor": 1.5}, 1.5),
    # (0.1 * 1 * ln 4 + 1) / (0.1 * 0.5 * ln 4 + 1) = 1.1386294 / 1.0693147
    ({"mscale": 1.0, "mscale_all_dim": 0.5}, 1.1386294361119891 / 1.0693147180559945),
    ({"mscale": 1.0}, _HAND_ATTENTION),  # One of the two alone: the plain formula.
])
def test_yarn_attention_factor(extra, want):
  m = _rope_model(scaling={"type": "yarn", "factor": 4.0,
                           "original_max_position_embeddings": 4096, **extra})
  assert layers.rope_frequencies(m)[1] == pytest.approx(want, rel=1e-12)


def test_beta_fast_and_slow_move_the_ramp():
  # beta_fast = 128: 8 ln(4096 / (256 pi)) / 18.4207 = 0.70698 -> floor 0; beta_slow = 2:
  # 8 ln(4096 / (4 pi)) / 18.4207 = 2.51315 -> ceil 3. Ramp i / 3 = [0, 1/3, 2/3, 1]:
  # dim 1: (2/3) 0.1 + (1/3) 0.025 = 0.075; dim 2: (1/3) 0.01 + (2/3) 0.0025 = 0.005.
  m = _rope_model(scaling={"type": "yarn", "factor": 4.0, "beta_fast": 128, "beta_slow": 2,
                           "original_max_position_embeddings": 4096})
  np.testing.assert_allclose(np.asarray(layers.rope_frequencies(m)[0]),
                             [1.0, 0.075, 0.005, 0.00025], rtol=1e-6)


def test_yarn_scales_cos_and_sin_in_apply_rope():
  m = _rope_model(scaling={"type": "yarn", "factor": 4.0,
                           "original_max_position_embeddings": 4096})
  inv_freq, attention = layers.rope_frequencies(m)
  x = np.arange(1, 17, dtype=np.float32).reshape(1, 1, 1, 16)
  positions = np.array([[1000]], np.int32)
  got = np.asarray(layers.apply_rope(jnp.asarray(x), jnp.asarray(positions), inv_freq,
                                     attention))[0, 0, 0]
  # NumPy float64 reference: rotate-half over the first 8 dims, the other 8 untouched.
  angles = 1000 * np.asarray(_HAND_INV_FREQ, np.float64)
  x1, x2 = x[0, 0, 0, :4].astype(np.float64), x[0, 0, 0, 4:8].astype(np.float64)
  cos, sin = np.cos(angles) * _HAND_ATTENTION, np.sin(angles) * _HAND_ATTENTION
  want = np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin, x[0, 0, 0, 8:]])
  np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-4)


def test_plain_rope_is_unchanged():
  m = _rope_model()
  inv_freq, attention = layers.rope_frequencies(m)
  np.testing.assert_allclose(np.asarray(inv_freq), [1.0, 0.1, 0.01, 0.001], rtol=1e-6)
  assert attention == 1.0
  m.rope_scaling = {"type": "default"}
  assert layers.rope_frequencies(m)[1] == 1.0


def test_released_mini_yarn_to_128k():
  # Ling-mini-2.0 at 128K: theta 6e5, rotary_dim 64, 32K -> 128K. Correction dims
  # 64 ln(32768 / (64 pi)) / (2 ln 6e5) = 12.2510 -> 12 and 64 ln(32768 / (2 pi)) / 26.6094
  # = 20.5866 -> 21: dims < 12 keep theta^(-2i/64), dims >= 21 are divided by 4.
  m = ling2.get_config("mini").model
  m.max_position_embeddings = 131_072
  m.rope_scaling = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32_768}
  inv_freq, attention = layers.rope_frequencies(m)
  base = 600_000.0 ** (-np.arange(0, 64, 2) / 64)
  inv_freq = np.asarray(inv_freq)
  np.testing.assert_allclose(inv_freq[:13], base[:13], rtol=1e-6)  # ramp is 0 at dim 12
  np.testing.assert_allclose(inv_freq[21:], base[21:] / 4, rtol=1e-6)
  ramp = (np.arange(13, 21) - 12) / 9
  np.testing.assert_allclose(inv_freq[13:21], base[13:21] * ((1 - ramp) + ramp / 4), rtol=1e-6)
  assert attention == pytest.approx(0.1 * math.log(4) + 1)


@pytest.mark.parametrize("scaling, max_pos, fragment", [
    ({"type": "linear", "factor": 2.0}, 4096, "rope_scaling.type"),
    ({"type": "yarn", "factor": 0.5}, 4096, "rope_scaling.factor"),
    ({"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 4096}, 4096,
     "max_position_embeddings=16384"),
    ({"type": "yarn", "factor": 4.0, "alpha": 1}, 4096, "rope_scaling.alpha"),
])
def test_bad_rope_scaling_names_the_key_and_the_fix(scaling, max_pos, fragment):
  m = _rope_model(max_pos=max_pos, scaling=scaling)
  with pytest.raises(config_lib.ConfigError, match="Fix") as e:
    layers.validate_rope_scaling(m)
  assert fragment in str(e.value)


# --- The embedding's sorted backward ------------------------------------------------------------


@pytest.mark.parametrize("ids", [
    [3, 0, 3, 3, 7, 0, 1, 3, 3, 7, 2, 3],  # hot rows, every row of a run apart
    [5] * 12,                               # one row takes every token
    list(range(11, -1, -1)),                # no two tokens share a row
])
def test_segment_sum_sorted_matches_a_loop(ids):
  rng = np.random.default_rng(0)
  values = rng.normal(size=(len(ids), 4)).astype(np.float32)
  want = np.zeros((13, 4), np.float64)
  for row, value in zip(ids, values):
    want[row] += value
  got = layers.segment_sum_sorted(jnp.asarray(values, jnp.bfloat16).astype(jnp.float32),
                                  jnp.asarray(ids, jnp.int32), 13)
  want_bf = np.zeros((13, 4), np.float64)
  for row, value in zip(ids, np.asarray(jnp.asarray(values, jnp.bfloat16), np.float64)):
    want_bf[row] += value
  np.testing.assert_allclose(np.asarray(got), want_bf, rtol=1e-6, atol=1e-6)
  assert np.abs(np.asarray(got) - want).max() < 0.05  # bf16 inputs, fp32 sums


def test_embedding_backwards_agree():
  m = ling2.get_config("tiny").model
  ids_BL = np.random.default_rng(1).integers(0, 6, size=(2, 9))
  cotangent_BLD = jax.random.normal(jax.random.key(2), (2, 9, 8), jnp.bfloat16)
  want_VD = np.zeros((m.vocab_size, 8))
  for row, value in zip(ids_BL.reshape(-1), np.asarray(cotangent_BLD, np.float64).reshape(-1, 8)):
    want_VD[row] += value
  grads = {}
  for backward in ("scatter", "sorted"):
    module = layers.Embed(m.vocab_size, 8, dtype=jnp.bfloat16, backward=backward)
    variables = jax.jit(module.init)(jax.random.key(0), jnp.asarray(ids_BL))

    def forward_and_grad(variables, module=module):  # Jitted: op by op, each op compiles alone.
      out, vjp = jax.vjp(functools.partial(module.apply, inputs=jnp.asarray(ids_BL)), variables)
      return out, vjp(cotangent_BLD)[0]

    out, grad = jax.jit(forward_and_grad)(variables)
    assert out.dtype == jnp.bfloat16
    np.testing.assert_array_equal(
        out, np.asarray(variables["params"]["embedding"])[ids_BL].astype(jnp.bfloat16))
    grads[backward] = np.asarray(grad["params"]["embedding"])
  # The sorted backward sums in fp32; XLA's scatter-add of the bf16 rows sums in bf16.
  np.testing.assert_allclose(grads["sorted"], want_VD, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(grads["scatter"], want_VD, rtol=2e-2, atol=2e-2)
  assert np.abs(grads["sorted"][6:]).max() == 0  # rows no token uses get nothing

