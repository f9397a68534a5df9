"""Policy objectives of RL post-training: LPO, GRPO and GSPO, the KL penalty, group advantages.

Key: B responses (G per prompt, groups contiguous), G group size, L response positions.

All three objectives are one clipped surrogate, min(r * A, clip(r, 1 - eps, 1 + eps) * A), that
differ in the unit sharing one importance ratio r (ling2_spec.md section 8):
- LPO: a sentence. r_ik = exp(mean over the sentence's tokens of log pi - log pi_old); sentence k
  of response i counts |s_ik| times, and the sum is divided by all response tokens of the batch:
  J = sum_i sum_k |s_ik| min(r_ik A_i, clip(r_ik) A_i) / sum_i |y_i|. Default eps 0.03.
- GRPO: a token (r_it = pi / pi_old per token), weighted and normalised like LPO (every token
  counts once, divided by all response tokens). Default eps 0.2.
- GSPO: the whole response (r_i = exp(mean log-ratio over the response)), averaged over the
  responses as in its paper: J = (1 / B) sum_i min(r_i A_i, clip(r_i) A_i). Default eps 4e-4.
Since each token's surrogate equals its unit's, all are computed per token with the unit's
ratio, then weighted: 1 / total tokens (LPO, GRPO) or 1 / (B |y_i|) (GSPO).

The functions are pure (arrays in, scalar and metrics out). Pass `num_tokens`/`num_responses` of
the whole batch when calling on a micro-batch so that summed micro-batch gradients equal the
full batch's.
"""

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

OBJECTIVES = ("lpo", "grpo", "gspo")
DEFAULT_CLIP = {"lpo": 0.03, "grpo": 0.2, "gspo": 4e-4}
PAUSE_PUNCTUATION = frozenset(".,;:!?\n。，；：！？")


def group_advantages(rewards_B: np.ndarray, group_size: int, eps: float = 1e-6) -> np.ndarray:
  """Returns (R - mean_G R) / (std_G R + eps) within each contiguous group of `group_size`.

  std is the population std of the group; a group whose rewards are all equal gets 0.
  """
  rewards_B = np.asarray(rewards_B, np.float64)
  if rewards_B.ndim != 1 or rewards_B.size % group_size:
    raise ValueError(f"rewards of shape {rewards_B.shape} do not split into groups of "
                     f"{group_size}; pass one reward per rollout, groups contiguous")
  r_NG = rewards_B.reshape(-1, group_size)
  adv_NG = (r_NG - r_NG.mean(1, keepdims=True)) / (r_NG.std(1, keepdims=True) + eps)
  return adv_NG.reshape(-1)


def sentence_ids(tokens: Sequence[int], decode: Any,
                 pause: frozenset[str] = PAUSE_PUNCTUATION) -> np.ndarray:
  """Returns the sentence index of each token of one response (0, 0, 1, 1, 1, 2, ...).

  The response is detokenised piece by piece (the text each token adds); a sentence ends after
  the token whose text holds a pause mark, so every token belongs to exactly one sentence. A mark
  inside a multi-character token ends the sentence at that token.
  """
  ids_T = np.zeros(len(tokens), np.int32)
  sentence, previous = 0, ""
  for t in range(len(tokens)):
    text = decode(tokens[:t + 1])
    piece, previous = text[len(previous):] if text.startswith(previous) else text, text
    ids_T[t] = sentence
    if any(c in pause for c in piece):
      sentence += 1
  return ids_T


def unit_ids(objective: str, sentence_ids_BL: jax.Array) -> jax.Array:
  """Returns the ratio unit of each position: its sentence (LPO), itself (GRPO), 0 (GSPO)."""
  if objective == "lpo":
    return sentence_ids_BL
  if objective == "grpo":
    return jnp.broadcast_to(jnp.arange(sentence_ids_BL.shape[1]), sentence_ids_BL.shape)
  if objective == "gspo":
    return jnp.zeros_like(sentence_ids_BL)
  raise ValueError(f"config.rl.objective: unknown {objective!r}. Fix: use one of {OBJECTIVES}.")


def unit_log_ratios(log_ratio_BL: jax.Array, units_BL: jax.Array, mask_BL: jax.Array) -> jax.Array:
  """Returns, at each position, the mean log-ratio over the tokens of its unit (masked)."""
  num_units = units_BL.shape[1]  # A unit holds at least one token, so there are at most L.
  onehot_BLU = (units_BL[..., None] == jnp.arange(num_units)[None, None]) & (mask_BL[..., None] > 0)
  onehot_BLU = onehot_BLU.astype(log_ratio_BL.dtype)
  sums_BU = jnp.einsum("bl,blu->bu", log_ratio_BL * mask_BL, onehot_BLU)
  counts_BU = jnp.maximum(onehot_BLU.sum(1), 1.0)
  return jnp.einsum("bu,blu->bl", sums_BU / counts_BU, onehot_BLU)


def policy_objective(objective: str, logp_BL: jax.Array, old_logp_BL: jax.Array,
                     advantages_B: jax.Array, mask_BL: jax.Array, sentence_ids_BL: jax.Array,
                     clip_eps: float, *, num_tokens: jax.Array | None = None,
                     num_responses: jax.Array | None = None) -> tuple[jax.Array, dict]:
  """Returns the objective J to maximise and its metrics (clip fraction, mean ratio).

  Args:
    objective: "lpo", "grpo" or "gspo".
    logp_BL, old_logp_BL: log-probabilities of the response tokens under the policy being
      trained and under the policy that sampled them.
    advantages_B: one advantage per response.
    mask_BL: 1 on response tokens, 0 on padding.
    sentence_ids_BL: each token's sentence (`sentence_ids`), used by LPO.
    clip_eps: the clip range of the ratio.
    num_tokens, num_responses: normalisers of the whole batch (default: this one's).
  """
  mask_BL = mask_BL.astype(jnp.float32)
  log_ratio_BL = (logp_BL - old_logp_BL) * mask_BL
  units_BL = unit_ids(objective, sentence_ids_BL)
  ratio_BL = jnp.exp(unit_log_ratios(log_ratio_BL, units_BL, mask_BL))
  adv_B1 = advantages_B[:, None]
  clipped_BL = jnp.clip(ratio_BL, 1.0 - clip_eps, 1.0 + clip_eps)
  surrogate_BL = jnp.minimum(ratio_BL * adv_B1, clipped_BL * adv_B1)
  lengths_B = mask_BL.sum(1)
  num_tokens = lengths_B.sum() if num_tokens is None else num_tokens
  num_responses = mask_BL.shape[0] if num_responses is None else num_responses
  if objective == "gspo":
    weight_BL = mask_BL / (jnp.maximum(lengths_B, 1.0)[:, None] * num_responses)
  else:
    weight_BL = mask_BL / jnp.maximum(num_tokens, 1.0)
  value = jnp.sum(surrogate_BL * weight_BL)
  # Clipped: the clipped term is the smaller one and differs, so no gradient flows.
  is_clipped_BL = ((adv_B1 > 0) & (ratio_BL > 1 + clip_eps)) | (
      (adv_B1 < 0) & (ratio_BL < 1 - clip_eps))
  metrics = {"clip_fraction": jnp.sum(is_clipped_BL * weight_BL),
             "ratio_mean": jnp.sum(ratio_BL * weight_BL)}
  return value, metrics


def kl_k3(logp_BL: jax.Array, ref_logp_BL: jax.Array) -> jax.Array:
  """Returns the k3 estimate of KL(pi || pi_ref) per token: exp(d) - d - 1, d = ref - logp.

  Unbiased for samples of pi, never negative, and low-variance (Schulman's k3).
  """
  d_BL = ref_logp_BL - logp_BL
  return jnp.exp(d_BL) - d_BL - 1.0


def token_log_probs(logits_BLV: jax.Array, targets_BL: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Returns log pi(target) and the entropy of pi at each position (fp32)."""
  logp_BLV = jax.nn.log_softmax(logits_BLV.astype(jnp.float32), axis=-1)
  target_BL = jnp.take_along_axis(logp_BLV, targets_BL[..., None], axis=-1)[..., 0]
  entropy_BL = -jnp.sum(jnp.exp(logp_BLV) * logp_BLV, axis=-1)
  return target_BL, entropy_BL
