"""Grouped-query attention with fused QKV, per-head QK-Norm and partial RoPE, and a KV cache.

Key: B batch, L query length, S key length (cache slots when decoding), D model dim, N query
heads, K kv heads, G query heads per kv head, H head dim.

Decoding keeps one cache slot per position of a left-padded batch: every row writes its new
keys at the same slot `index`, and `segment_ids_BS` (0 = padding or not yet written) masks the
slots a row may read.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from ling_jax import config as config_lib
from ling_jax import layers


def attention_mask(segment_ids_BL: jax.Array) -> jax.Array:
  """Returns the causal, same-document mask [B, 1, 1, L, S] for packed sequences."""
  length = segment_ids_BL.shape[1]
  causal_LS = jnp.tril(jnp.ones((length, length), bool))
  same_doc_BLS = segment_ids_BL[:, :, None] == segment_ids_BL[:, None, :]
  return (causal_LS[None] & same_doc_BLS)[:, None, None]


def cache_mask(segment_ids_BL: jax.Array, segment_ids_BS: jax.Array,
               index: jax.Array) -> jax.Array:
  """Returns the mask [B, 1, 1, L, S] of queries at cache slots index.. over the cache slots.

  A query reads the slots at or before its own that hold a token of its segment; slots with
  segment 0 (left padding, or not written yet) are never read.
  """
  length, slots = segment_ids_BL.shape[1], segment_ids_BS.shape[1]
  causal_LS = jnp.arange(slots)[None, :] <= (index + jnp.arange(length))[:, None]
  same_doc_BLS = segment_ids_BL[:, :, None] == segment_ids_BS[:, None, :]
  written_B1S = (segment_ids_BS != 0)[:, None, :]
  return (causal_LS[None] & same_doc_BLS & written_B1S)[:, None, None]


def dot_product_attention(q_BLNH: jax.Array, k_BSKH: jax.Array, v_BSKH: jax.Array,
                          segment_ids_BL: jax.Array, impl: str = "xla") -> jax.Array:
  """Returns causal, segment-masked GQA outputs [B, L, N, H]; softmax in fp32."""
  if impl.startswith("cudnn") and jax.default_backend() != "gpu":  # before XLA fails to lower
    config_lib.fail("model.attention_impl", f"{impl!r} is cuDNN's fused kernel, which needs a "
                    f"GPU, and this run's backend is {jax.default_backend()}",
                    "use attention_impl='xla' off GPUs")
  if impl == "cudnn":  # Fused GPU kernel; documents kept apart by an explicit mask.
    return jax.nn.dot_product_attention(q_BLNH, k_BSKH, v_BSKH, implementation="cudnn",
                                        mask=attention_mask(segment_ids_BL)[:, 0])
  if impl == "cudnn_causal":  # Causal only: packed documents see earlier ones in their row.
    return jax.nn.dot_product_attention(q_BLNH, k_BSKH, v_BSKH, implementation="cudnn",
                                        is_causal=True)
  return masked_attention(q_BLNH, k_BSKH, v_BSKH, attention_mask(segment_ids_BL))


def masked_attention(q_BLNH: jax.Array, k_BSKH: jax.Array, v_BSKH: jax.Array,
                     mask_B11LS: jax.Array) -> jax.Array:
  """Returns GQA outputs [B, L, N, H] under an explicit mask; softmax in fp32."""
  batch, length, num_heads, head_dim = q_BLNH.shape
  num_kv = k_BSKH.shape[2]
  q_BLKGH = q_BLNH.reshape(batch, length, num_kv, num_heads // num_kv, head_dim)
  logits_BKGLS = jnp.einsum("blkgh,bskh->bkgls", q_BLKGH, k_BSKH,
                            preferred_element_type=jnp.float32) * (head_dim ** -0.5)
  # A large finite negative keeps fully masked rows (padding) finite instead of NaN.
  logits_BKGLS = jnp.where(mask_B11LS, logits_BKGLS, -1e30)
  probs_BKGLS = jax.nn.softmax(logits_BKGLS, axis=-1).astype(v_BSKH.dtype)
  out_BLKGH = jnp.einsum("bkgls,bskh->blkgh", probs_BKGLS, v_BSKH)
  return out_BLKGH.reshape(batch, length, num_heads, head_dim)


class Attention(nn.Module):
  """Ling 2.0 self-attention block (without the residual)."""
  m: Any

  @nn.compact
  def __call__(self, x_BLD: jax.Array, positions_BL: jax.Array, segment_ids_BL: jax.Array,
               decode: Any = None, cache: Any = None) -> tuple[jax.Array, Any]:
    """Returns the attention output and, when decoding, this layer's updated cache.

    `decode` is None for a full-sequence pass; when decoding it holds the cache slot `index`
    of the first query and the cache's `segment_ids_BS` (already holding the new tokens), and
    `cache` this layer's `{"k": [B, S, K, H], "v": [B, S, K, H]}`.
    """
    m = self.m
    batch, length, _ = x_BLD.shape
    n, k, h = m.num_attention_heads, m.num_key_value_heads, m.head_dim
    # Released layout: all q heads, then all k heads, then all v heads.
    qkv = layers.projection(m, (n + 2 * k) * h, "qkv")(x_BLD)
    q_BLNH = qkv[..., :n * h].reshape(batch, length, n, h)
    k_BLKH = qkv[..., n * h:(n + k) * h].reshape(batch, length, k, h)
    v_BLKH = qkv[..., (n + k) * h:].reshape(batch, length, k, h)
    if m.use_qk_norm:  # Before RoPE, as released.
      q_BLNH = layers.rms_norm(m, "q_norm")(q_BLNH)
      k_BLKH = layers.rms_norm(m, "k_norm")(k_BLKH)
    inv_freq, scaling = layers.rope_frequencies(m)
    q_BLNH = layers.apply_rope(q_BLNH, positions_BL, inv_freq, scaling)
    k_BLKH = layers.apply_rope(k_BLKH, positions_BL, inv_freq, scaling)
    if decode is None:
      with jax.named_scope("attention_core"):  # Named for profiles (ling_jax/profiling.py).
        out_BLNH = dot_product_attention(q_BLNH, k_BLKH, v_BLKH, segment_ids_BL,
                                         m.attention_impl)
    else:
      start = (0, decode["index"], 0, 0)
      k_BSKH = jax.lax.dynamic_update_slice(cache["k"], k_BLKH.astype(cache["k"].dtype), start)
      v_BSKH = jax.lax.dynamic_update_slice(cache["v"], v_BLKH.astype(cache["v"].dtype), start)
      cache = {"k": k_BSKH, "v": v_BSKH}
      mask_B11LS = cache_mask(segment_ids_BL, decode["segment_ids_BS"], decode["index"])
      out_BLNH = masked_attention(q_BLNH, k_BSKH.astype(q_BLNH.dtype),
                                  v_BSKH.astype(q_BLNH.dtype), mask_B11LS)
    out_BLD = layers.projection(m, x_BLD.shape[-1], "out", role="attn_out")(
        out_BLNH.reshape(batch, length, n * h))
    return out_BLD, cache
