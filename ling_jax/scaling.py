"""Model FLOPs per token, counted from a config (the basis of MFU and of the scaling laws)."""

from typing import Any

from ling_jax import config as config_lib


def _attention_flops(m: Any, seq_len: int) -> float:
  """Forward FLOPs per token of one attention layer: projections plus the causal core."""
  d, hd = m.hidden_size, m.head_dim
  nq, nkv = m.num_attention_heads, m.num_key_value_heads
  projections = 2 * d * (nq + 2 * nkv) * hd + 2 * nq * hd * d
  # QK^T and PV, each 2 * nq * hd per key; a causal query sees (seq_len + 1) / 2 keys on average.
  core = 2 * 2 * nq * hd * (seq_len + 1) / 2
  return projections + core


def _moe_flops(m: Any) -> float:
  d, f = m.hidden_size, m.moe_intermediate_size
  router = 2 * d * m.num_experts
  experts = 2 * 3 * d * f * (m.num_experts_per_tok + m.num_shared_experts)
  return router + experts


def flops_per_token(m: Any, seq_len: int, *, training: bool = True,
                    include_lm_head: bool = True, include_mtp: bool = True) -> float:
  """Returns the model FLOPs per token (training counts forward + backward as 3x forward).

  Counts every matmul the model runs, attention scores included, causal attention at half; the
  embedding lookup is free. The MTP blocks count when the config has them and `include_mtp`.
  """
  d = m.hidden_size
  dense_layer = _attention_flops(m, seq_len) + 2 * 3 * d * m.intermediate_size
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
