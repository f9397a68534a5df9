"""Small building blocks of the Ling 2.0 decoder: RMSNorm, SwiGLU, RoPE, initialisers.

Key: B batch, L length, D model dim, F feed-forward width, N heads, H head dim.
"""

import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ling_jax import config as config_lib
from ling_jax import fp8


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


def projection(m: Any, features: int, name: str, role: str = "dense") -> nn.Module:
  """Returns a linear layer of the blocks: `dense`, or its FP8 twin when `m.quant` asks for it
  and `m.fp8_recipe` quantises this `role` of projection (`fp8.ROLES`: "dense" or "attn_out").

  The embedding, LM head and MTP projection use `dense` directly and stay unquantised.
  """
  recipe = fp8.recipe_for(m, role)
  if recipe is not None:
    return fp8.Dense(features, kernel_init(m), config_lib.dtype_of(m.dtype),
                     config_lib.dtype_of(m.param_dtype), recipe, m.get("fp8_backend", "auto"),
                     name=name)
  return dense(m, features, name)


def segment_sum_sorted(values_TD: jax.Array, ids_T: jax.Array, num_rows: int) -> jax.Array:
  """Returns out[v] = sum of values_TD[t] over t with ids_T[t] == v, as [num_rows, D] fp32.

  No two writes hit one row: the rows are sorted by id, each run of equal ids is summed by a
  segmented scan (log2 T passes over the rows), and only each run's last row is scattered.
  A plain scatter-add instead serialises on rows that many tokens share (byte tokens, common
  words), which on a GPU costs tens of milliseconds per step at Ling-mini width.
  """
  ids_T, values_TD = jnp.asarray(ids_T), jnp.asarray(values_TD)
  order_T = jnp.argsort(ids_T, stable=True)
  ids_T = ids_T[order_T]
  values_TD = values_TD[order_T].astype(jnp.float32)
  starts_T = jnp.concatenate([jnp.ones((1,), bool), ids_T[1:] != ids_T[:-1]])

  def combine(left, right):
    (sum_l, start_l), (sum_r, start_r) = left, right
    return jnp.where(start_r[:, None], sum_r, sum_l + sum_r), start_l | start_r

  sums_TD, _ = jax.lax.associative_scan(combine, (values_TD, starts_T))
  ends_T = jnp.concatenate([starts_T[1:], jnp.ones((1,), bool)])
  rows_T = jnp.where(ends_T, ids_T, num_rows)  # Rows past the table are dropped.
  out_VD = jnp.zeros((num_rows, values_TD.shape[-1]), jnp.float32)
  return out_VD.at[rows_T].add(sums_TD, mode="drop")


@functools.cache
def _embed_sorted(dtype: Any) -> Any:
  """Returns lookup(table_VD, ids) -> table rows in `dtype`, with the sorted backward."""

  @jax.custom_vjp
  def lookup(table_VD, ids):
    return jnp.take(table_VD, ids, axis=0).astype(dtype)

  def lookup_fwd(table_VD, ids):
    return lookup(table_VD, ids), (ids, table_VD.shape[0], jnp.zeros((), table_VD.dtype))

  def lookup_bwd(residuals, grad):
    ids, num_rows, table_zero = residuals
    grad_VD = segment_sum_sorted(grad.reshape(-1, grad.shape[-1]), ids.reshape(-1), num_rows)
    return grad_VD.astype(table_zero.dtype), np.zeros(ids.shape, jax.dtypes.float0)

  lookup.defvjp(lookup_fwd, lookup_bwd)
  return lookup


class Embed(nn.Embed):
  """`nn.Embed` (same parameter) with the backward `segment_sum_sorted`, or XLA's scatter-add.

  The sorted backward also sums in fp32, where the scatter-add sums the bf16 rows in bf16.
  """
  backward: str = "sorted"

  def __call__(self, inputs: jax.Array) -> jax.Array:
    if self.backward == "scatter":
      return super().__call__(inputs)
    return _embed_sorted(jnp.dtype(self.dtype or self.param_dtype))(self.embedding, inputs)


def embed(m: Any, name: str = "embed") -> Embed:
  """Returns the token embedding with Ling's init, the model's dtypes and backward."""
  return Embed(m.vocab_size, m.hidden_size, embedding_init=kernel_init(m),
               dtype=config_lib.dtype_of(m.dtype), param_dtype=config_lib.dtype_of(m.param_dtype),
               backward=m.get("embedding_backward", "sorted"), name=name)


class SwiGLU(nn.Module):
  """Dense SwiGLU feed-forward with the gate and up projections fused into one kernel."""
  m: Any
  width: int

  @nn.compact
  def __call__(self, x_BLD: jax.Array) -> jax.Array:
    gate_up_BLF2 = projection(self.m, 2 * self.width, "gate_up")(x_BLD)
    gate_BLF, up_BLF = jnp.split(gate_up_BLF2, 2, axis=-1)
    return projection(self.m, x_BLD.shape[-1], "down")(nn.silu(gate_BLF) * up_BLF)


# The keys of a `rope_scaling` dict this code reads (the released HF `rope_scaling` names).
_YARN_KEYS = ("type", "rope_type", "factor", "original_max_position_embeddings", "beta_fast",
              "beta_slow", "attention_factor", "mscale", "mscale_all_dim", "truncate")


def _rope_fail(key: str, problem: str, fix: str) -> None:
  config_lib.fail(f"model.rope_scaling.{key}" if key else "model.rope_scaling", problem, fix)


def validate_rope_scaling(m: Any) -> None:
  """Raises ConfigError naming the key and the fix when `model.rope_scaling` cannot be used.

  The released modeling code takes YaRN from `transformers`' `_compute_yarn_parameters`, which,
  when `original_max_position_embeddings` is given, REPLACES `factor` by
  `max_position_embeddings / original_max_position_embeddings`. A config whose two disagree
  means one thing to transformers and another to vLLM/SGLang (which read `factor`), so it is
  refused: set max_position_embeddings = factor * original_max_position_embeddings.
  """
  scaling = m.get("rope_scaling")
  if not scaling:
    return
  scaling = dict(scaling)
  kind = scaling.get("rope_type", scaling.get("type"))
  if kind in (None, "default") and set(scaling) <= {"rope_type", "type"}:
    return
  if kind != "yarn":
    _rope_fail("type", f"only 'yarn' scaling is implemented, got {kind!r}",
               "use {'type': 'yarn', 'factor': F, 'original_max_position_embeddings': N} "
               "or unset rope_scaling")
  unknown = sorted(set(scaling) - set(_YARN_KEYS))
  if unknown:
    _rope_fail(unknown[0], f"unknown YaRN key (known: {', '.join(_YARN_KEYS)})",
               "remove it or spell it as the released config does")
  factor = scaling.get("factor")
  if not isinstance(factor, int | float) or factor < 1:
    _rope_fail("factor", f"must be a number >= 1, got {factor!r}",
               "set the context-extension factor, e.g. 4.0")
  original = scaling.get("original_max_position_embeddings")
  if original is not None:
    if not isinstance(original, int) or original <= 0:
      _rope_fail("original_max_position_embeddings",
                 f"must be a positive integer, got {original!r}",
                 "set it to the context length the model was trained at before YaRN")
    ratio = m.max_position_embeddings / original
    if abs(ratio - factor) > 1e-6 * factor:
      _rope_fail("factor", f"is {factor}, but max_position_embeddings / "
                 f"original_max_position_embeddings = {m.max_position_embeddings} / {original} "
                 f"= {ratio:g}, which transformers uses instead",
                 f"set model.max_position_embeddings={int(round(factor * original))} "
                 "(factor x original), or change factor to match")
  for key in ("beta_fast", "beta_slow", "attention_factor", "mscale", "mscale_all_dim"):
    value = scaling.get(key)
    if value is not None and (not isinstance(value, int | float) or value <= 0):
      _rope_fail(key, f"must be a positive number, got {value!r}", "fix or remove it")


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
  return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def yarn_parameters(theta: float, rotary_dim: int, max_position_embeddings: int,
                    scaling: dict) -> tuple[np.ndarray, float]:
  """Returns YaRN's fp32 inverse frequencies over `rotary_dim` and its cos/sin scaling factor.

  The released semantics (transformers' `_compute_yarn_parameters`, read by
  `modeling_bailing_moe_v2.py`): dims rotating more than `beta_fast` times over the original
  context keep their frequency, dims rotating fewer than `beta_slow` times are divided by
  `factor`, with a linear ramp between (bounds floored/ceiled unless `truncate` is False); cos
  and sin are multiplied by `attention_factor`, by default 0.1 ln(factor) + 1 (or the ratio of
  the mscale / mscale_all_dim versions of it when both are given).
  """
  factor = float(scaling["factor"])
  original = scaling.get("original_max_position_embeddings")
  if original is not None:  # transformers: the ratio wins over `factor` (see validation).
    factor = max_position_embeddings / original
  else:
    original = max_position_embeddings
  attention_factor = scaling.get("attention_factor")
  if attention_factor is None:
    mscale, mscale_all_dim = scaling.get("mscale"), scaling.get("mscale_all_dim")
    if mscale and mscale_all_dim:
      attention_factor = _yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all_dim)
    else:
      attention_factor = _yarn_mscale(factor)
  beta_fast = scaling.get("beta_fast") or 32
  beta_slow = scaling.get("beta_slow") or 1

  def correction_dim(rotations: float) -> float:
    # The dim index whose wavelength fits `rotations` times into the original context.
    return rotary_dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(theta))

  low, high = correction_dim(beta_fast), correction_dim(beta_slow)
  if scaling.get("truncate", True):
    low, high = math.floor(low), math.ceil(high)
  low, high = max(low, 0), min(high, rotary_dim - 1)
  if low == high:
    high += 0.001  # As released: avoids a zero-width ramp.
  # fp32 throughout, as the released code computes it.
  exponents_R = np.arange(0, rotary_dim, 2).astype(np.float32) / np.float32(rotary_dim)
  pos_freqs_R = np.float32(theta) ** exponents_R
  extrapolation_R = np.float32(1.0) / pos_freqs_R
  interpolation_R = np.float32(1.0) / (np.float32(factor) * pos_freqs_R)
  ramp_R = np.clip((np.arange(rotary_dim // 2, dtype=np.float32) - np.float32(low))
                   / np.float32(high - low), 0, 1).astype(np.float32)
  keep_R = np.float32(1.0) - ramp_R  # 1: keep the original frequency (fast dims).
  inv_freq_R = interpolation_R * (np.float32(1.0) - keep_R) + extrapolation_R * keep_R
  return inv_freq_R.astype(np.float32), float(attention_factor)


def rope_frequencies(m: Any) -> tuple[jax.Array, float]:
  """Returns the inverse frequencies over `rotary_dim` and the cos/sin scaling of RoPE.

  Plain RoPE without `model.rope_scaling`; with {"type": "yarn", "factor", ...} the YaRN
  frequencies and attention factor of `yarn_parameters`, as the released models compute them.
  """
  rd = config_lib.rotary_dim(m)
  scaling = m.get("rope_scaling")
  kind = dict(scaling).get("rope_type", dict(scaling).get("type")) if scaling else None
  if kind not in (None, "default"):
    validate_rope_scaling(m)
    inv_freq, attention_factor = yarn_parameters(m.rope_theta, rd, m.max_position_embeddings,
                                                 dict(scaling))
    return jnp.asarray(inv_freq), attention_factor
  inv_freq = 1.0 / (m.rope_theta ** (jnp.arange(0, rd, 2, dtype=jnp.float32) / rd))
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
