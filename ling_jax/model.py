"""The Ling 2.0 decoder (`BailingMoeV2ForCausalLM`) with multi-token prediction.

Key: B batch, L length, D model dim, V vocabulary.

Layers are stacked with `nn.scan`, so every layer parameter has a leading layer axis:
`dense_layers/...` holds the `first_k_dense_replace` leading dense layers and `moe_layers/...` the
rest. MTP blocks are `mtp_0`, `mtp_1`, ...

Decoding with a KV cache (`init_cache`, `apply_cached`) runs the same layers on a left-padded
batch: a prefill call writes the prompt's keys and values, then each step writes one token's.
"""

from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from ling_jax import attention
from ling_jax import config as config_lib
from ling_jax import fp8
from ling_jax import layers
from ling_jax import moe

_REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


@flax.struct.dataclass
class Output:
  """What a forward pass returns."""
  logits_BLV: jax.Array  # Next-token logits, in `m.logits_dtype` (fp32 by default).
  mtp_logits: tuple[jax.Array, ...]  # Depth-d MTP logits [B, L, V] predict token t + d + 1.
  hidden_BLD: jax.Array  # Trunk output after the final norm.
  cache: Any = None  # Decoding only: the updated KV cache (see `init_cache`).
  # With logits=False: the MTP blocks' outputs, the LM head's inputs (logits and mtp_logits are
  # then None and ()).
  mtp_hidden: tuple[jax.Array, ...] = ()


class DecoderLayer(nn.Module):
  """Pre-norm block: attention, then a dense SwiGLU or an MoE."""
  m: Any
  use_moe: bool

  @nn.compact
  def __call__(self, x_BLD: jax.Array, positions_BL: jax.Array, segment_ids_BL: jax.Array,
               decode: Any = None, cache: Any = None) -> tuple[jax.Array, Any]:
    m = self.m
    attn_BLD, cache = attention.Attention(m, name="attention")(
        layers.rms_norm(m, "input_norm")(x_BLD), positions_BL, segment_ids_BL, decode, cache)
    h_BLD = x_BLD + attn_BLD
    ffn_in_BLD = layers.rms_norm(m, "post_attention_norm")(h_BLD)
    if self.use_moe:
      ffn_BLD = moe.MoE(m, name="mlp")(ffn_in_BLD, segment_ids_BL != 0)
    else:
      ffn_BLD = layers.SwiGLU(m, m.intermediate_size, name="mlp")(ffn_in_BLD)
    return h_BLD + ffn_BLD, cache


def _layer_class(m: Any) -> type[nn.Module]:
  if m.remat_policy == "none":
    return DecoderLayer
  return nn.remat(DecoderLayer, policy=_REMAT_POLICIES[m.remat_policy], prevent_cse=False)


def _stack(m: Any, use_moe: bool, length: int, name: str) -> nn.Module:
  """Returns `length` decoder layers scanned over a leading layer axis (caches too).

  With `m.unroll_layers` the scan is unrolled when compiled: the parameters keep their stacked
  layout, but no loop writes each layer's saved activations and weight gradients into stacked
  buffers (zero-filled first, then updated in place): the slices and stacks become plain
  concatenations that XLA folds into their users. Longer compiles, faster steps on GPUs.
  """
  return nn.scan(
      _layer_class(m),
      variable_axes={"params": 0, moe.STATE: 0, moe.STATS: 0, fp8.PROBES: 0},
      split_rngs={"params": True},
      in_axes=(nn.broadcast, nn.broadcast, nn.broadcast, 0),
      length=length,
      unroll=length if m.get("unroll_layers", False) else 1,
  )(m, use_moe, name=name)


class MTPLayer(nn.Module):
  """One multi-token-prediction depth: combine the hidden state with the next token's embedding."""
  m: Any

  @nn.compact
  def __call__(self, h_BLD: jax.Array, next_embed_BLD: jax.Array, positions_BL: jax.Array,
               segment_ids_BL: jax.Array) -> jax.Array:
    m = self.m
    x_BL2D = jnp.concatenate([layers.rms_norm(m, "enorm")(next_embed_BLD),
                              layers.rms_norm(m, "hnorm")(h_BLD)], axis=-1)
    x_BLD = layers.dense(m, m.hidden_size, "eh_proj")(x_BL2D)
    x_BLD, _ = DecoderLayer(m, use_moe=True, name="block")(x_BLD, positions_BL, segment_ids_BL)
    return layers.rms_norm(m, "final_norm")(x_BLD)


def shift_left(x_BL: jax.Array, shift: int) -> jax.Array:
  """Returns x shifted left by `shift` along the length, zero-filled at the end."""
  if shift == 0:
    return x_BL
  return jnp.pad(x_BL[:, shift:], ((0, 0), (0, shift)))


class Ling2(nn.Module):
  """Ling 2.0 causal LM. Call with token ids, positions and segment ids (0 = padding)."""
  m: Any

  @nn.compact
  def __call__(self, inputs_BL: jax.Array, positions_BL: jax.Array, segment_ids_BL: jax.Array,
               targets_BL: jax.Array | None = None, cache: Any = None,
               logits: bool = True) -> Output:
    """Full-sequence pass, or with `cache` a decoding pass that returns logits [B, 1, V] of the
    last position only (with left padding, every row's newest token) and the updated cache.
    logits=False stops before the LM head: the trunk's and MTP blocks' outputs only (a loss that
    applies the head itself, chunk by chunk: `train.chunked_cross_entropy_sum`)."""
    m = self.m
    decode = new_cache = None
    if cache is not None:
      segment_ids_BS = jax.lax.dynamic_update_slice(
          cache["segment_ids_BS"], segment_ids_BL.astype(jnp.int32), (0, cache["index"]))
      decode = {"index": cache["index"], "segment_ids_BS": segment_ids_BS}
      new_cache = {"index": cache["index"] + inputs_BL.shape[1],
                   "segment_ids_BS": segment_ids_BS}
    embed = layers.embed(m)
    x_BLD = embed(inputs_BL)
    for use_moe, length, name in ((False, m.first_k_dense_replace, "dense_layers"),
                                  (True, config_lib.num_moe_layers(m), "moe_layers")):
      if length:
        x_BLD, layer_cache = _stack(m, use_moe, length, name)(
            x_BLD, positions_BL, segment_ids_BL, decode, None if cache is None else cache[name])
        if cache is not None:
          new_cache[name] = layer_cache
    if cache is not None:
      x_BLD = x_BLD[:, -1:]
    hidden_BLD = layers.rms_norm(m, "final_norm")(x_BLD)
    lm_head = layers.dense(m, m.vocab_size, "lm_head")
    logits_dtype = config_lib.logits_dtype(m)
    logits_BLV = lm_head(hidden_BLD).astype(logits_dtype) if logits else None

    mtp_logits, mtp_hidden = [], []
    if m.num_nextn_predict_layers and targets_BL is not None:
      h_BLD = hidden_BLD
      for depth in range(m.num_nextn_predict_layers):
        # Depth d + 1 sees the embedding of token t + d + 1, i.e. targets shifted by d.
        next_embed_BLD = embed(shift_left(targets_BL, depth))
        h_BLD = MTPLayer(m, name=f"mtp_{depth}")(h_BLD, next_embed_BLD, positions_BL,
                                                 segment_ids_BL)
        if logits:
          mtp_logits.append(lm_head(h_BLD).astype(logits_dtype))
        else:
          mtp_hidden.append(h_BLD)
    return Output(logits_BLV, tuple(mtp_logits), hidden_BLD, new_cache, tuple(mtp_hidden))


def init_variables(m: Any, rng: jax.Array, batch: int = 1, length: int = 8) -> dict:
  """Returns freshly initialised variables: `params` and `moe_state`."""
  config_lib.validate_model_config(m)
  ids = jnp.zeros((batch, length), jnp.int32)
  variables = Ling2(m).init(rng, ids, ids, ids + 1, ids)
  return {k: v for k, v in variables.items() if k != moe.STATS}


def apply(m: Any, variables: dict, inputs_BL: jax.Array, positions_BL: jax.Array,
          segment_ids_BL: jax.Array, targets_BL: jax.Array | None = None,
          cache: dict | None = None, logits: bool = True) -> tuple[Output, dict]:
  """Runs the model; returns its outputs and the `moe_stats` (token counts, z-losses)."""
  out, mutated = Ling2(m).apply(
      {k: v for k, v in variables.items() if k != moe.STATS},
      inputs_BL, positions_BL, segment_ids_BL, targets_BL, cache, logits, mutable=[moe.STATS])
  return out, mutated.get(moe.STATS, {})


def init_cache(m: Any, batch: int, max_length: int, dtype: Any = None) -> dict:
  """Returns an empty KV cache of `max_length` slots for `batch` rows, in the activation dtype.

  Layout: `index` (the next slot to write, int32), `segment_ids_BS` (0 = padding or unwritten)
  and, per layer stack, `{"k", "v"}` of shape [layers, B, S, K, H].
  """
  dtype = dtype or config_lib.dtype_of(m.dtype)
  cache = {"index": jnp.zeros((), jnp.int32),
           "segment_ids_BS": jnp.zeros((batch, max_length), jnp.int32)}
  kv_shape = (batch, max_length, m.num_key_value_heads, m.head_dim)
  for length, name in ((m.first_k_dense_replace, "dense_layers"),
                       (config_lib.num_moe_layers(m), "moe_layers")):
    if length:
      cache[name] = {"k": jnp.zeros((length, *kv_shape), dtype),
                     "v": jnp.zeros((length, *kv_shape), dtype)}
  return cache


def apply_cached(m: Any, variables: dict, inputs_BL: jax.Array, positions_BL: jax.Array,
                 segment_ids_BL: jax.Array, cache: dict) -> tuple[jax.Array, dict]:
  """Writes the tokens' keys and values at the cache's next slots; returns the logits [B, V]
  of the last position and the updated cache. Rows must be left-padded (segment id 0)."""
  out, _ = apply(m, variables, inputs_BL, positions_BL, segment_ids_BL, cache=cache)
  return out.logits_BLV[:, -1], out.cache
