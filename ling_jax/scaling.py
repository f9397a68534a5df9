"""FLOPs per token from a config, and the Ling scaling laws that size models and pick their
hyper-parameters from a compute budget (ling2_spec.md section 6).

C is training compute in FLOPs, C = M * D: M the non-embedding training FLOPs per token
(attention included, `non_embedding_flops_per_token`), D the training tokens. Every law here takes
and returns plain floats, so it works on NumPy arrays too.
"""

import dataclasses
import math
from typing import Any

import numpy as np

from ling_jax import config as config_lib


def _attention_flops(m: Any, seq_len: int) -> float:
  """Forward FLOPs per token of one attention layer: projections plus the causal core."""
  d, hd = m.hidden_size, m.head_dim
  nq, nkv = m.num_attention_heads, m.num_key_value_heads
  projections = 2 * d * (nq + 2 * nkv) * hd + 2 * nq * hd * d
  return projections + attention_core_flops(m, seq_len)


def attention_core_flops(m: Any, seq_len: int) -> float:
  """Forward FLOPs per token of QK^T and PV in one layer (the part no weight accounts for)."""
  # Each is 2 * nq * hd per key; a causal query sees (seq_len + 1) / 2 keys on average.
  return 2 * 2 * m.num_attention_heads * m.head_dim * (seq_len + 1) / 2


def _moe_flops(m: Any) -> float:
  d, f = m.hidden_size, m.moe_intermediate_size
  router = 2 * d * m.num_experts
  experts = 2 * 3 * d * f * (m.num_experts_per_tok + m.num_shared_experts)
  return router + experts


def _dense_ffn_flops(m: Any) -> float:
  return 2 * 3 * m.hidden_size * m.intermediate_size


def flops_per_token(m: Any, seq_len: int, *, training: bool = True,
                    include_lm_head: bool = True, include_mtp: bool = True) -> float:
  """Returns the model FLOPs per token (training counts forward + backward as 3x forward).

  Counts every matmul the model runs, attention scores included, causal attention at half; the
  embedding lookup is free. The MTP blocks count when the config has them and `include_mtp`.
  """
  d = m.hidden_size
  dense_layer = _attention_flops(m, seq_len) + _dense_ffn_flops(m)
  moe_layer = _attention_flops(m, seq_len) + _moe_flops(m)
  forward = (m.first_k_dense_replace * dense_layer
             + config_lib.num_moe_layers(m) * moe_layer)
  lm_head = 2 * d * m.vocab_size
  if include_lm_head:
    forward += lm_head
  if include_mtp:
    mtp_depth = m.num_nextn_predict_layers
    forward += mtp_depth * (2 * 2 * d * d + moe_layer + (lm_head if include_lm_head else 0))
  return (3.0 if training else 1.0) * forward


def non_embedding_flops_per_token(m: Any, seq_len: int) -> float:
  """Returns M of the scaling laws: training FLOPs per token without the LM head (MTP counted)."""
  return flops_per_token(m, seq_len, include_lm_head=False)


def attention_fraction(m: Any, seq_len: int) -> float:
  """Returns the share of M spent in attention (projections and core), MTP blocks included."""
  layers = m.num_hidden_layers + m.num_nextn_predict_layers
  return 3.0 * layers * _attention_flops(m, seq_len) / non_embedding_flops_per_token(m, seq_len)


def activation_ratio(m: Any) -> float:
  """Returns A = (active + shared experts) / (experts + shared), as the Ling papers define it."""
  shared = m.num_shared_experts
  return (m.num_experts_per_tok + shared) / (m.num_experts + shared)


def granularity(m: Any) -> float:
  """Returns G = 2 * d_model / d_expert (Ling 2.0: 8)."""
  return 2 * m.hidden_size / m.moe_intermediate_size


# The fitted laws (arXiv 2507.17702, quoted in ling2_spec.md section 6). C in FLOPs.
LR_COEF, LR_EXP = 1.1576, -0.1529
BATCH_COEF, BATCH_EXP = 0.0694, 0.3644  # Batch in tokens.


@dataclasses.dataclass(frozen=True)
class ComputeAllocation:
  """M_opt = m_coef * C^m_exp (FLOPs per token) and D_opt = d_coef * C^d_exp (tokens)."""
  m_coef: float
  m_exp: float
  d_coef: float
  d_exp: float


ALLOCATION = {
    "moe": ComputeAllocation(0.1915, 0.5095, 5.2232, 0.4905),
    "dense": ComputeAllocation(0.0655, 0.5422, 15.2582, 0.4578),
}


def lr_opt(compute: float) -> float:
  """Returns the optimal peak learning rate for a training budget of `compute` FLOPs."""
  return LR_COEF * np.power(compute, LR_EXP)


def batch_opt(compute: float) -> float:
  """Returns the optimal batch size, in tokens, for a training budget of `compute` FLOPs."""
  return BATCH_COEF * np.power(compute, BATCH_EXP)


def _allocation(arch: str) -> ComputeAllocation:
  if arch not in ALLOCATION:
    raise ValueError(f"arch must be one of {sorted(ALLOCATION)}, got {arch!r}")
  return ALLOCATION[arch]


def m_opt(compute: float, arch: str = "moe") -> float:
  """Returns the compute-optimal M (non-embedding training FLOPs per token) for `arch`."""
  a = _allocation(arch)
  return a.m_coef * np.power(compute, a.m_exp)


def d_opt(compute: float, arch: str = "moe") -> float:
  """Returns the compute-optimal number of training tokens for `arch` ("moe" or "dense")."""
  a = _allocation(arch)
  return a.d_coef * np.power(compute, a.d_exp)


# Efficiency leverage EL(A, G, C) (ling2_spec.md section 6).
EL_A, EL_D = 1.23, -7.61e-2
EL_GAMMA, EL_BETA = 1.67e-2, -1.17e-1
EL_A_START, EL_A_MAX = 1.63e-2, 5.28e16


def saturated_activation_ratio(activation: float) -> float:
  """Returns Ahat: A shifted by A_start, so EL saturates instead of diverging as A -> 0."""
  inv = 1.0 / (activation + 1.0 / (1.0 / EL_A_START - 1.0 / EL_A_MAX)) + 1.0 / EL_A_MAX
  return 1.0 / inv


def efficiency_leverage(activation: float, gran: float, compute: float) -> float:
  """Returns EL, the dense compute that matches the loss of an MoE trained with `compute`, per
  unit of that compute, for activation ratio A, granularity G (2 d_model / d_expert).

  EL = Ahat^(alpha + gamma * (log2 G)^2 + beta * log2 G), alpha = a + d * log10 C. The papers do
  not state the bases; these are the ones their own findings single out. log2 for G: the G term
  is best at log G = -beta / (2 gamma) = 3.50, i.e. G = 11.3, inside the paper's optimum of 8-12
  (ln would put it at G = 33, log10 at G = 3,200). log10 for C: it gives 7.2x at A = 3.1%, G = 12,
  C = 1e22, the paper's "over 7x" (ln gives thousands, log2 about a million).
  """
  alpha = EL_A + EL_D * np.log10(compute)
  log_g = np.log2(gran)
  return np.power(saturated_activation_ratio(activation),
                  alpha + EL_GAMMA * log_g**2 + EL_BETA * log_g)


@dataclasses.dataclass(frozen=True)
class PowerLaw:
  """y = coef * x^exponent, fitted by least squares in log-log space."""
  coef: float
  exponent: float
  r2: float  # Of the log-log fit; 1.0 for two points.

  def __call__(self, x: Any) -> Any:
    return self.coef * np.power(x, self.exponent)

  def inverse(self, y: Any) -> Any:
    """Returns the x at which the law reaches y."""
    return np.power(np.asarray(y) / self.coef, 1.0 / self.exponent)


def fit_power_law(x: Any, y: Any) -> PowerLaw:
  """Returns the power law through the (x, y) points (at least two distinct x, all positive)."""
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  if x.shape != y.shape or len(np.unique(x)) < 2 or np.any(x <= 0) or np.any(y <= 0):
    raise ValueError(f"a power-law fit needs >= 2 distinct positive x and positive y, got x={x}, "
                     f"y={y}")
  log_x, log_y = np.log(x), np.log(y)
  exponent, intercept = np.polyfit(log_x, log_y, 1)
  residual = log_y - (intercept + exponent * log_x)
  total = np.sum((log_y - log_y.mean())**2)
  r2 = 1.0 - float(np.sum(residual**2) / total) if total > 0 else 1.0
  return PowerLaw(float(math.exp(intercept)), float(exponent), r2)


def fitted_efficiency_leverage(variant: PowerLaw, dense: PowerLaw, compute: Any) -> Any:
  """Returns the EL of a variant over a dense baseline from their loss-vs-compute fits: the
  dense compute that reaches the variant's loss at `compute`, divided by `compute`."""
  return dense.inverse(variant(compute)) / np.asarray(compute)


# Dense bf16 peak FLOP/s per device, by `jax.Device.device_kind` prefix.
_PEAK_FLOPS = {
    "NVIDIA H200": 989.4e12,
    "NVIDIA H100": 989.4e12,
    "NVIDIA A100": 312e12,
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v5": 459e12,
    "TPU v6": 918e12,
}


def peak_flops_per_device(device_kind: str, override_tflops: float | None = None) -> float | None:
  """Returns the dense bf16 peak FLOP/s of one device, or None when it is unknown (e.g. CPU)."""
  if override_tflops:
    return override_tflops * 1e12
  for prefix, peak in _PEAK_FLOPS.items():
    if device_kind.startswith(prefix):
      return peak
  return None
