"""Ling 2.0 router: sigmoid scores, group-limited top-k, aux-loss-free expert bias.

Key: T tokens, E experts, K experts per token, G expert groups, S experts per group.
"""

import flax.struct
import jax
import jax.numpy as jnp


@flax.struct.dataclass
class Routing:
  """What the router decided for a batch of tokens."""
  expert_ids_TK: jax.Array  # Chosen experts, int32, best first.
  weights_TK: jax.Array  # Combine weights (unbiased scores, normalised, scaled), fp32.
  counts_E: jax.Array  # Tokens routed to each expert (padding excluded), fp32.
  z_loss: jax.Array  # Mean squared logsumexp of the router logits, fp32 scalar.


def route_tokens(
    logits_TE: jax.Array,
    expert_bias_E: jax.Array,
    *,
    top_k: int,
    n_group: int,
    topk_group: int,
    routed_scaling_factor: float,
    token_mask_T: jax.Array | None = None,
) -> Routing:
  """Returns the experts and combine weights of each token (ling2_spec.md section 3).

  The bias only steers which experts are selected; the weights use the unbiased scores.
  """
  logits_TE = logits_TE.astype(jnp.float32)
  num_tokens, num_experts = logits_TE.shape
  scores_TE = jax.nn.sigmoid(logits_TE)
  select_TE = scores_TE + expert_bias_E.astype(jnp.float32)[None, :]
  if n_group > 1:
    select_TGS = select_TE.reshape(num_tokens, n_group, num_experts // n_group)
    group_scores_TG = jnp.sum(jax.lax.top_k(select_TGS, 2)[0], axis=-1)
    _, kept_groups = jax.lax.top_k(group_scores_TG, topk_group)
    kept_TG = jnp.zeros((num_tokens, n_group), bool).at[
        jnp.arange(num_tokens)[:, None], kept_groups].set(True)
    # -inf, not 0: experts of dropped groups must never win, whatever the bias sign.
    select_TGS = jnp.where(kept_TG[:, :, None], select_TGS, -jnp.inf)
    select_TE = select_TGS.reshape(num_tokens, num_experts)
  _, expert_ids_TK = jax.lax.top_k(select_TE, top_k)
  weights_TK = jnp.take_along_axis(scores_TE, expert_ids_TK, axis=-1)
  weights_TK = weights_TK / (jnp.sum(weights_TK, axis=-1, keepdims=True) + 1e-20)
  weights_TK = weights_TK * routed_scaling_factor

  if token_mask_T is None:
    token_mask_T = jnp.ones((num_tokens,), jnp.float32)
  mask_TK = jnp.broadcast_to(token_mask_T.astype(jnp.float32)[:, None], expert_ids_TK.shape)
  counts_E = jnp.zeros((num_experts,), jnp.float32).at[expert_ids_TK.reshape(-1)].add(
      mask_TK.reshape(-1))
  lse_T = jax.nn.logsumexp(logits_TE, axis=-1)
  denom = jnp.maximum(jnp.sum(token_mask_T), 1.0)
  z_loss = jnp.sum(jnp.square(lse_T) * token_mask_T) / denom
  return Routing(expert_ids_TK.astype(jnp.int32), weights_TK, counts_E, z_loss)


def random_logits(logits_TE: jax.Array) -> jax.Array:
  """Benchmarks only (`model.router_random_logits`): standard normal logits in the values'
  place, the learned logits' gradient path kept (straight through).

  Routing on them is near-balanced, as trained Ling routing is: a freshly initialised model
  sends nearly every token to the same experts (BENCHMARKS.md, "Training throughput", session
  12), which times the expert kernels on a few huge groups. Megatron-Core's
  `moe_router_force_load_balancing` does the same for its benchmarks. The draw depends on the
  shape only (a fixed key): every layer and step routes a token position alike. The router
  matmul and its backward still run, with the gradients of these logits.
  """
  noise_TE = jax.random.normal(jax.random.key(0), logits_TE.shape, jnp.float32)
  return noise_TE + (logits_TE - jax.lax.stop_gradient(logits_TE))  # exactly the noise


def update_expert_bias(bias_E: jax.Array, counts_E: jax.Array, rate: float) -> jax.Array:
  """Returns the expert bias after one aux-loss-free balancing step.

  Under-loaded experts rise and over-loaded ones fall by `rate`; subtracting the mean sign keeps
  the bias zero-mean. Leading axes (stacked layers) are updated independently. `counts` must
  already be summed over the whole global batch (every data and expert shard).
  """
  counts_E = counts_E.astype(jnp.float32)
  err_E = jnp.mean(counts_E, axis=-1, keepdims=True) - counts_E
  sign_E = jnp.sign(err_E)
  return bias_E + rate * (sign_E - jnp.mean(sign_E, axis=-1, keepdims=True))


def max_violation(counts_E: jax.Array) -> jax.Array:
  """Returns the load-balance max violation, max_i(count_i) / mean(count) - 1, per leading axis."""
  counts_E = counts_E.astype(jnp.float32)
  mean = jnp.maximum(jnp.mean(counts_E, axis=-1), 1e-9)
  return jnp.max(counts_E, axis=-1) / mean - 1.0
