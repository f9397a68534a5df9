"""Grouped-query attention with fused QKV, per-head QK-Norm and partial RoPE.

Key: B batch, L query length, S key length, D model dim, N query heads, K kv heads,
G query heads per kv head, H head dim.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from ling_jax import layers


def attention_mask(segment_ids_BL: jax.Array) -> jax.Array:
  """Returns the causal, same-document mask [B, 1, 1, L, S] for packed sequences."""
  length = segment_ids_BL.shape[1]
  causal_LS = jnp.tril(jnp.ones((length, length), bool))
  same_doc_BLS = segment_ids_BL[:, :, None] == segment_ids_BL[:, None, :]
  return (causal_LS[None] & same_doc_BLS)[:, None, None]


def dot_product_attention(q_BLNH: jax.Array, k_BSKH: jax.Array, v_BSKH: jax.Array,
                          segment_ids_BL: jax.Array, impl: str = "xla") -> jax.Array:
  """Returns causal, segment-masked GQA outputs [B, L, N, H]; softmax in fp32."""
  if impl == "cudnn":  # Fused GPU kernel; segments through an explicit mask for now.
    return jax.nn.dot_product_attention(q_BLNH, k_BSKH, v_BSKH, implementation="cudnn",
                                        mask=attention_mask(segment_ids_BL)[:, 0])
  batch, length, num_heads, head_dim = q_BLNH.shape
  num_kv = k_BSKH.shape[2]
  q_BLKGH = q_BLNH.reshape(batch, length, num_kv, num_heads // num_kv, head_dim)
  logits_BKGLS = jnp.einsum("blkgh,bskh->bkgls", q_BLKGH, k_BSKH,
                            preferred_element_type=jnp.float32) * (head_dim ** -0.5)
  # A large finite negative keeps fully masked rows (padding) finite instead of NaN.
  logits_BKGLS = jnp.where(attention_mask(segment_ids_BL), logits_BKGLS, -1e30)
  probs_BKGLS = jax.nn.softmax(logits_BKGLS, axis=-1).astype(v_BSKH.dtype)
  out_BLKGH = jnp.einsum("bkgls,bskh->blkgh", probs_BKGLS, v_BSKH)
  return out_BLKGH.reshape(batch, length, num_heads, head_dim)


class Attention(nn.Module):
  """Ling 2.0 self-attention block (without the residual)."""
  m: Any

  @nn.compact
  def __call__(self, x_BLD: jax.Array, positions_BL: jax.Array,
               segment_ids_BL: jax.Array) -> jax.Array:
    m = self.m
    batch, length, _ = x_BLD.shape
    n, k, h = m.num_attention_heads, m.num_key_value_heads, m.head_dim
    # Released layout: all q heads, then all k heads, then all v heads.
    qkv = layers.dense(m, (n + 2 * k) * h, "qkv")(x_BLD)
    q_BLNH = qkv[..., :n * h].reshape(batch, length, n, h)
    k_BLKH = qkv[..., n * h:(n + k) * h].reshape(batch, length, k, h)
    v_BLKH = qkv[..., (n + k) * h:].reshape(batch, length, k, h)
    if m.use_qk_norm:  # Before RoPE, as released.
      q_BLNH = layers.rms_norm(m, "q_norm")(q_BLNH)
      k_BLKH = layers.rms_norm(m, "k_norm")(k_BLKH)
    inv_freq, scaling = layers.rope_frequencies(m)
    q_BLNH = layers.apply_rope(q_BLNH, positions_BL, inv_freq, scaling)
    k_BLKH = layers.apply_rope(k_BLKH, positions_BL, inv_freq, scaling)
    out_BLNH = dot_product_attention(q_BLNH, k_BLKH, v_BLKH, segment_ids_BL, m.attention_impl)
    return layers.dense(m, x_BLD.shape[-1], "out")(out_BLNH.reshape(batch, length, n * h))
