"""The Ling 2.0 decoder (`BailingMoeV2ForCausalLM`) with multi-token prediction.

Key: B batch, L length, D model dim, V vocabulary.

Layers are stacked with `nn.scan`, so every layer parameter has a leading layer axis:
`dense_layers/...` holds the `first_k_dense_replace` leading dense layers and `moe_layers/...` the
rest. MTP blocks are `mtp_0`, `mtp_1`, ...
"""

from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from ling_jax import attention
from ling_jax import config as config_lib
from ling_jax import layers
from ling_jax import moe

_REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


@flax.struct.dataclass
class Output:
  """What a forward pass returns."""
  logits_BLV: jax.Array  # Next-token logits, fp32.
  mtp_logits: tuple[jax.Array, ...]  # Depth-d MTP logits [B, L, V] predict token t + d + 1.
  hidden_BLD: jax.Array  # Trunk output after the final norm.


class DecoderLayer(nn.Module):
  """Pre-norm block: attention, then a dense SwiGLU or an MoE."""
  m: Any
  use_moe: bool

  @nn.compact
  def __call__(self, x_BLD: jax.Array, positions_BL: jax.Array,
               segment_ids_BL: jax.Array) -> tuple[jax.Array, None]:
    m = self.m
    h_BLD = x_BLD + attention.Attention(m, name="attention")(
        layers.rms_norm(m, "input_norm")(x_BLD), positions_BL, segment_ids_BL)
    ffn_in_BLD = layers.rms_norm(m, "post_attention_norm")(h_BLD)
    if self.use_moe:
      ffn_BLD = moe.MoE(m, name="mlp")(ffn_in_BLD, segment_ids_BL != 0)
    else:
      ffn_BLD = layers.SwiGLU(m, m.intermediate_size, name="mlp")(ffn_in_BLD)
    return h_BLD + ffn_BLD, None


def _layer_class(m: Any) -> type[nn.Module]:
  if m.remat_policy == "none":
    return DecoderLayer
  return nn.remat(DecoderLayer, policy=_REMAT_POLICIES[m.remat_policy], prevent_cse=False)


def _stack(m: Any, use_moe: bool, length: int, name: str) -> nn.Module:
  """Returns `length` decoder layers scanned over a leading layer axis."""
  return nn.scan(
      _layer_class(m),
      variable_axes={"params": 0, moe.STATE: 0, moe.STATS: 0},
      split_rngs={"params": True},
      in_axes=(nn.broadcast, nn.broadcast),
      length=length,
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
               targets_BL: jax.Array | None = None) -> Output:
    m = self.m
    dtype, param_dtype = config_lib.dtype_of(m.dtype), config_lib.dtype_of(m.param_dtype)
    embed = nn.Embed(m.vocab_size, m.hidden_size, embedding_init=layers.kernel_init(m),
                     dtype=dtype, param_dtype=param_dtype, name="embed")
    x_BLD = embed(inputs_BL)
    if m.first_k_dense_replace:
      x_BLD, _ = _stack(m, False, m.first_k_dense_replace, "dense_layers")(
          x_BLD, positions_BL, segment_ids_BL)
    if config_lib.num_moe_layers(m):
      x_BLD, _ = _stack(m, True, config_lib.num_moe_layers(m), "moe_layers")(
          x_BLD, positions_BL, segment_ids_BL)
    hidden_BLD = layers.rms_norm(m, "final_norm")(x_BLD)
    lm_head = layers.dense(m, m.vocab_size, "lm_head")
    logits_BLV = lm_head(hidden_BLD).astype(jnp.float32)

    mtp_logits = []
    if m.num_nextn_predict_layers and targets_BL is not None:
      h_BLD = hidden_BLD
      for depth in range(m.num_nextn_predict_layers):
        # Depth d + 1 sees the embedding of token t + d + 1, i.e. targets shifted by d.
        next_embed_BLD = embed(shift_left(targets_BL, depth))
        h_BLD = MTPLayer(m, name=f"mtp_{depth}")(h_BLD, next_embed_BLD, positions_BL,
                                                 segment_ids_BL)
        mtp_logits.append(lm_head(h_BLD).astype(jnp.float32))
    return Output(logits_BLV, tuple(mtp_logits), hidden_BLD)


def init_variables(m: Any, rng: jax.Array, batch: int = 1, length: int = 8) -> dict:
  """Returns freshly initialised variables: `params` and `moe_state`."""
  config_lib.validate_model_config(m)
  ids = jnp.zeros((batch, length), jnp.int32)
  variables = Ling2(m).init(rng, ids, ids, ids + 1, ids)
  return {k: v for k, v in variables.items() if k != moe.STATS}


def apply(m: Any, variables: dict, inputs_BL: jax.Array, positions_BL: jax.Array,
          segment_ids_BL: jax.Array, targets_BL: jax.Array | None = None) -> tuple[Output, dict]:
  """Runs the model; returns its outputs and the `moe_stats` (token counts, z-losses)."""
  out, mutated = Ling2(m).apply(
      {k: v for k, v in variables.items() if k != moe.STATS},
      inputs_BL, positions_BL, segment_ids_BL, targets_BL, mutable=[moe.STATS])
  return out, mutated.get(moe.STATS, {})
