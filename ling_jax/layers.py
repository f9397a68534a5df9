"""Small building blocks of the Ling 2.0 decoder: RMSNorm, SwiGLU, RoPE, initialisers.

Key: B batch, L length, D model dim, F feed-forward width, N heads, H head dim.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from ling_jax import config as config_lib


def kernel_init(m: Any) -> nn.initializers.Initializer:
  """Returns Ling's initialiser: normal with std `initializer_range` (0.006) for every weight."""
  return nn.initializers.normal(stddev=m.initializer_range)


class RMSNorm(nn.Module):
  """Root-mean-square norm over the last axis, computed in fp32."""
  eps: float
  dtype: Any = jnp.bfloat16
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), self.param_dtype)
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
    return (y * scale.astype(jnp.float32)[(None,) * (x.ndim - 1)]).astype(self.dtype)


def rms_norm(m: Any, name: str) -> RMSNorm:
  """Returns an RMSNorm with the model's eps and dtypes."""
  return RMSNorm(m.rms_norm_eps, config_lib.dtype_of(m.dtype), config_lib.dtype_of(m.param_dtype),
                 name=name)


def dense(m: Any, features: int, name: str) -> nn.Dense:
  """Returns a bias-free projection with Ling's init and the model's dtypes."""
  return nn.Dense(features, use_bias=False, kernel_init=kernel_init(m),
                  dtype=config_lib.dtype_of(m.dtype),
                  param_dtype=config_lib.dtype_of(m.param_dtype),
                  name=name)


class SwiGLU(nn.Module):
  """Dense SwiGLU feed-forward with the gate and up projections fused into one kernel."""
  m: Any
  width: int

  @nn.compact
  def __call__(self, x_BLD: jax.Array) -> jax.Array:
    gate_up_BLF2 = dense(self.m, 2 * self.width, "gate_up")(x_BLD)
    gate_BLF, up_BLF = jnp.split(gate_up_BLF2, 2, axis=-1)
    return dense(self.m, x_BLD.shape[-1], "down")(nn.silu(gate_BLF) * up_BLF)


def rope_frequencies(m: Any) -> tuple[jax.Array, float]:
  """Returns the inverse frequencies over `rotary_dim` and the attention scaling of RoPE.

  Without `rope_scaling` this is plain RoPE; YaRN scaling arrives with context extension.
  """
  rd = config_lib.rotary_dim(m)
  inv_freq = 1.0 / (m.rope_theta ** (jnp.arange(0, rd, 2, dtype=jnp.float32) / rd))
  if m.get("rope_scaling"):
    raise NotImplementedError(
        "config.model.rope_scaling is set, but YaRN scaling is not implemented yet; "
        "leave rope_scaling unset.")
  return inv_freq, 1.0


def apply_rope(x_BLNH: jax.Array, positions_BL: jax.Array, inv_freq: jax.Array,
               scaling: float = 1.0) -> jax.Array:
  """Returns x with NeoX-style ("rotate half") RoPE on its first `2*len(inv_freq)` head dims."""
  rd = 2 * inv_freq.shape[0]
  freqs_BLR = positions_BL.astype(jnp.float32)[..., None] * inv_freq[None, None, :]
  cos_BL1R = (jnp.cos(freqs_BLR) * scaling)[:, :, None, :]
  sin_BL1R = (jnp.sin(freqs_BLR) * scaling)[:, :, None, :]
  x32 = x_BLNH.astype(jnp.float32)
  x1, x2 = x32[..., :rd // 2], x32[..., rd // 2:rd]
  rotated = jnp.concatenate([x1 * cos_BL1R - x2 * sin_BL1R, x2 * cos_BL1R + x1 * sin_BL1R], -1)
  return jnp.concatenate([rotated, x32[..., rd:]], axis=-1).astype(x_BLNH.dtype)
