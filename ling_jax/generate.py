"""Text generation with a KV cache: prefill the prompts, then one token per step.

Key: B batch, P prompt length (padded), S cache slots, V vocabulary.

Prompts of different lengths are LEFT-padded to the longest (segment id 0 on the padding,
positions counted from each row's first real token), so every row's newest token sits in the
same cache slot and one step serves the whole batch. A row stops at its first stop token (which
is not returned) or after `max_new_tokens`.

    result = generate.generate(m, variables, [ids_a, ids_b], max_new_tokens=64,
                               sampling=generate.Sampling(temperature=0.7, top_p=0.9),
                               stop_tokens=(tok.eos_id,))
"""

import dataclasses
import functools
import time
from collections.abc import Callable
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ling_jax import config as config_lib
from ling_jax import model as model_lib


@dataclasses.dataclass(frozen=True)
class Sampling:
  """How the next token is chosen; temperature 0 is greedy (top_k and top_p then unused)."""
  temperature: float = 0.0
  top_k: int = 0  # Keep the k most likely tokens; 0 keeps all.
  top_p: float = 1.0  # Keep the smallest set of most likely tokens holding this much mass.

  def validate(self) -> None:
    if self.temperature < 0:
      config_lib.fail("sampling.temperature", f"must be >= 0, got {self.temperature}",
                      "use 0 for greedy or a positive temperature")
    if self.top_k < 0:
      config_lib.fail("sampling.top_k", f"must be >= 0, got {self.top_k}", "use 0 to keep all")
    if not 0 < self.top_p <= 1:
      config_lib.fail("sampling.top_p", f"must be in (0, 1], got {self.top_p}",
                      "use 1.0 to keep all")


@dataclasses.dataclass
class Result:
  """What `generate` returns."""
  tokens: list[list[int]]  # Per prompt: the new tokens, without the stop token.
  finish_reasons: list[str]  # Per prompt: "stop" (a stop token came) or "length".
  prompt_tokens_per_s: float  # Prefill throughput (all rows, padding excluded).
  tokens_per_s: float  # Decode throughput (new tokens of all rows per second).


def sampling_probs(logits_BV: jax.Array, sampling: Sampling) -> jax.Array:
  """Returns the distribution [B, V] that `sample_tokens` draws from (fp32).

  Temperature scales the logits; top-k keeps the k largest (ties at the k-th value kept);
  top-p then keeps the most likely tokens until their mass reaches top_p (the token that
  crosses it included). Greedy (temperature 0) puts all mass on the argmax.
  """
  logits_BV = logits_BV.astype(jnp.float32)
  if sampling.temperature == 0:
    return jax.nn.one_hot(jnp.argmax(logits_BV, -1), logits_BV.shape[-1], dtype=jnp.float32)
  logits_BV = logits_BV / sampling.temperature
  if sampling.top_k and sampling.top_k < logits_BV.shape[-1]:
    kth_B1 = jax.lax.top_k(logits_BV, sampling.top_k)[0][:, -1:]
    logits_BV = jnp.where(logits_BV >= kth_B1, logits_BV, -jnp.inf)
  probs_BV = jax.nn.softmax(logits_BV, axis=-1)
  if sampling.top_p < 1.0:
    sorted_BV = jnp.sort(probs_BV, axis=-1)[:, ::-1]
    # Mass strictly before each sorted token: a token is kept while that is below top_p.
    before_BV = jnp.cumsum(sorted_BV, axis=-1) - sorted_BV
    kept = before_BV < sampling.top_p
    threshold_B1 = jnp.min(jnp.where(kept, sorted_BV, jnp.inf), axis=-1, keepdims=True)
    probs_BV = jnp.where(probs_BV >= threshold_B1, probs_BV, 0.0)
    probs_BV = probs_BV / probs_BV.sum(-1, keepdims=True)
  return probs_BV


def sample_tokens(logits_BV: jax.Array, rng: jax.Array, sampling: Sampling) -> jax.Array:
  """Returns the next token [B] (int32) of each row."""
  if sampling.temperature == 0:
    return jnp.argmax(logits_BV, -1).astype(jnp.int32)
  probs_BV = sampling_probs(logits_BV, sampling)
  return jax.random.categorical(rng, jnp.log(probs_BV), axis=-1).astype(jnp.int32)


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int = 0
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Returns token ids, positions and segment ids [B, P] of left-padded prompts."""
  if not prompts or any(len(p) == 0 for p in prompts):
    config_lib.fail("prompts", "need at least one prompt, each with at least one token",
                    "drop empty prompts (or start each with BOS)")
  length = max(len(p) for p in prompts)
  ids_BP = np.full((len(prompts), length), pad_id, np.int32)
  segment_ids_BP = np.zeros((len(prompts), length), np.int32)
  for b, prompt in enumerate(prompts):
    ids_BP[b, length - len(prompt):] = prompt
    segment_ids_BP[b, length - len(prompt):] = 1
  positions_BP = np.maximum(np.cumsum(segment_ids_BP, axis=1) - 1, 0).astype(np.int32)
  return ids_BP, positions_BP, segment_ids_BP


@functools.partial(jax.jit, static_argnames=("m_json",), donate_argnames=("cache",))
def _prefill(m_json: str, variables, ids_BP, positions_BP, segment_ids_BP, cache):
  return model_lib.apply_cached(_config(m_json), variables, ids_BP, positions_BP,
                                segment_ids_BP, cache)


@functools.partial(jax.jit, static_argnames=("m_json", "sampling"), donate_argnames=("cache",))
def _step(m_json: str, sampling: Sampling, variables, tokens_B, positions_B, cache, rng):
  """Feeds each row's last token; returns the next token of each row and the cache."""
  ones_B1 = jnp.ones_like(tokens_B)[:, None]
  logits_BV, cache = model_lib.apply_cached(_config(m_json), variables, tokens_B[:, None],
                                            positions_B[:, None], ones_B1, cache)
  return sample_tokens(logits_BV, rng, sampling), cache


@functools.cache
def _config(m_json: str):
  import json

  import ml_collections
  return ml_collections.ConfigDict(json.loads(m_json))


def generate(m: Any, variables: dict, prompts: Sequence[Sequence[int]], *,
             max_new_tokens: int, sampling: Sampling = Sampling(),
             stop_tokens: Sequence[int] = (), rng: jax.Array | None = None, pad_id: int = 0,
             progress: Callable[[str], None] | None = None, progress_every: int = 32
             ) -> Result:
  """Generates up to `max_new_tokens` after each prompt (lists of token ids)."""
  sampling.validate()
  if max_new_tokens < 1:
    config_lib.fail("max_new_tokens", f"must be >= 1, got {max_new_tokens}", "ask for 1 or more")
  ids_BP, positions_BP, segment_ids_BP = left_pad(prompts, pad_id)
  batch, prompt_len = ids_BP.shape
  longest = int(segment_ids_BP.sum(1).max()) + max_new_tokens
  if longest > m.max_position_embeddings:
    config_lib.fail("model.max_position_embeddings",
                    f"prompt plus max_new_tokens reach {longest} positions, more than "
                    f"{m.max_position_embeddings}", "shorten the prompt or max_new_tokens")
  bad = [t for p in prompts for t in p if not 0 <= t < m.vocab_size]
  if bad:
    config_lib.fail("prompts", f"token id {bad[0]} is outside the vocabulary "
                    f"(vocab_size={m.vocab_size})", "encode with the model's tokenizer")
  rng = jax.random.key(0) if rng is None else rng
  m_json = m.to_json_best_effort()
  # The last sampled token never needs its keys and values written.
  cache = model_lib.init_cache(m, batch, prompt_len + max_new_tokens - 1)
  start = time.perf_counter()
  logits_BV, cache = _prefill(m_json, variables, ids_BP, positions_BP, segment_ids_BP, cache)
  rng, key = jax.random.split(rng)
  tokens_B = sample_tokens(logits_BV, key, sampling)
  jax.block_until_ready(tokens_B)
  prefill_s = time.perf_counter() - start
  stop = np.asarray(list(stop_tokens), np.int32)
  out = np.zeros((batch, max_new_tokens), np.int32)
  done_B = np.zeros(batch, bool)
  lengths_B = np.full(batch, max_new_tokens)
  positions_B = jnp.asarray(positions_BP[:, -1] + 1)
  start = time.perf_counter()
  steps = 0
  for t in range(max_new_tokens):
    host_B = np.asarray(tokens_B)
    out[:, t] = host_B
    stopped_B = ~done_B & np.isin(host_B, stop)
    lengths_B[stopped_B] = t
    done_B |= stopped_B
    if done_B.all() or t == max_new_tokens - 1:
      break
    rng, key = jax.random.split(rng)
    tokens_B, cache = _step(m_json, sampling, variables, tokens_B, positions_B, cache, key)
    positions_B = positions_B + 1
    steps += 1
    if progress and (t + 1) % progress_every == 0:
      progress(f"generated {t + 1}/{max_new_tokens} tokens, {int(done_B.sum())}/{batch} rows "
               "stopped")
  decode_s = time.perf_counter() - start
  return Result(
      tokens=[out[b, :lengths_B[b]].tolist() for b in range(batch)],
      finish_reasons=["stop" if d else "length" for d in done_B],
      prompt_tokens_per_s=float(segment_ids_BP.sum()) / max(prefill_s, 1e-9),
      tokens_per_s=batch * steps / max(decode_s, 1e-9))
