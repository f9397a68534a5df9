"""Config checks and derived quantities, run before anything is traced."""

from typing import Any

import jax
import jax.numpy as jnp

_DTYPES = ("float32", "bfloat16", "float16")
QUANT_MODES = ("none", "fp8_blockwise")  # config.model.quant; see ling_jax/fp8.py


class ConfigError(ValueError):
  """Bad user input (a config field, a flag, a workdir): the message names it and the fix."""


def fail(field: str, problem: str, fix: str) -> None:
  """Raises ConfigError for `config.<field>` with the problem and the fix."""
  raise ConfigError(f"config.{field}: {problem}. Fix: {fix}.")


def _fail(field: str, problem: str, fix: str) -> None:
  fail(f"model.{field}", problem, fix)


def rotary_dim(m: Any) -> int:
  """Returns how many of the head dims RoPE rotates (`rotary_dim` wins over the factor)."""
  if m.get("rotary_dim") is not None:
    return int(m.rotary_dim)
  return int(m.head_dim * m.partial_rotary_factor)


def num_moe_layers(m: Any) -> int:
  """Returns the number of MoE layers in the trunk (after the leading dense ones)."""
  return m.num_hidden_layers - m.first_k_dense_replace


def validate_model_config(m: Any) -> None:
  """Raises ValueError naming the field and the fix when a model config is inconsistent."""
  positive = ("vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size",
              "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
              "num_experts", "num_experts_per_tok", "n_group", "topk_group")
  for field in positive:
    value = m.get(field)
    if not isinstance(value, int) or value <= 0:
      _fail(field, f"must be a positive integer, got {value!r}", f"set {field} > 0")
  for field in ("num_shared_experts", "first_k_dense_replace", "num_nextn_predict_layers"):
    if not isinstance(m.get(field), int) or m.get(field) < 0:
      _fail(field, f"must be a non-negative integer, got {m.get(field)!r}", f"set {field} >= 0")
  if m.num_attention_heads % m.num_key_value_heads:
    _fail("num_attention_heads",
          f"{m.num_attention_heads} query heads are not divisible by "
          f"num_key_value_heads={m.num_key_value_heads}",
          "use a number of query heads that is a multiple of the KV heads")
  if m.num_experts % m.n_group:
    _fail("num_experts", f"{m.num_experts} experts do not split into n_group={m.n_group} groups",
          "make num_experts a multiple of n_group")
  if m.topk_group > m.n_group:
    _fail("topk_group", f"keeps {m.topk_group} groups but there are only n_group={m.n_group}",
          "set topk_group <= n_group")
  if m.num_experts_per_tok % m.topk_group:
    _fail("num_experts_per_tok",
          f"top_k={m.num_experts_per_tok} is not divisible by topk_group={m.topk_group}",
          "make num_experts_per_tok a multiple of topk_group")
  per_group = m.num_experts // m.n_group
  if m.num_experts_per_tok > m.topk_group * per_group:
    _fail("num_experts_per_tok",
          f"top_k={m.num_experts_per_tok} exceeds the {m.topk_group * per_group} experts in the "
          "kept groups", "raise topk_group or lower num_experts_per_tok")
  if per_group < 2 and m.n_group > 1:
    _fail("n_group", "group scores sum the top-2 experts of a group, so groups need >= 2 experts",
          "lower n_group")
  rd = rotary_dim(m)
  if rd > m.head_dim:
    _fail("rotary_dim", f"rotates {rd} dims but head_dim={m.head_dim}",
          "set rotary_dim (or partial_rotary_factor * head_dim) <= head_dim")
  if rd % 2:
    _fail("rotary_dim", f"must be even, got {rd}", "use an even rotary_dim")
  if m.first_k_dense_replace > m.num_hidden_layers:
    _fail("first_k_dense_replace",
          f"{m.first_k_dense_replace} dense layers outnumber the {m.num_hidden_layers} layers",
          "set first_k_dense_replace <= num_hidden_layers")
  if m.score_function != "sigmoid":
    _fail("score_function", f"only 'sigmoid' is implemented, got {m.score_function!r}",
          "use score_function='sigmoid'")
  if m.tie_word_embeddings:
    _fail("tie_word_embeddings", "Ling 2.0 unties the LM head; tying is not implemented",
          "set tie_word_embeddings=False")
  for field in ("dtype", "param_dtype"):
    if m.get(field) not in _DTYPES:
      _fail(field, f"unknown dtype {m.get(field)!r}", f"use one of {_DTYPES}")
  if m.attention_impl not in ("xla", "cudnn", "cudnn_causal"):
    _fail("attention_impl", f"unknown {m.attention_impl!r}",
          "use 'xla', 'cudnn' or 'cudnn_causal' (no document mask)")
  if m.remat_policy not in ("none", "full", "dots"):
    _fail("remat_policy", f"unknown {m.remat_policy!r}", "use 'none', 'full' or 'dots'")
  if not isinstance(m.get("unroll_layers", False), bool):
    _fail("unroll_layers", f"must be True or False, got {m.unroll_layers!r}",
          "set --config.model.unroll_layers=true or false")
  if m.get("moe_all_to_all", "auto") not in ("auto", "ragged", "padded"):
    _fail("moe_all_to_all", f"unknown {m.moe_all_to_all!r}", "use 'auto', 'ragged' or 'padded'")
  if m.get("embedding_backward", "sorted") not in ("sorted", "scatter"):
    _fail("embedding_backward", f"unknown {m.embedding_backward!r}", "use 'sorted' or 'scatter'")
  if m.get("router_precision", "float32") not in ROUTER_PRECISIONS:
    _fail("router_precision", f"unknown {m.router_precision!r}",
          f"use one of {tuple(ROUTER_PRECISIONS)}")
  if m.get("router_grad_precision") not in (None, *ROUTER_PRECISIONS):
    _fail("router_grad_precision", f"unknown {m.router_grad_precision!r}",
          f"use one of {tuple(ROUTER_PRECISIONS)}, or leave it unset (router_precision's)")
  if m.get("logits_dtype", "float32") not in ("float32", "bfloat16"):
    _fail("logits_dtype", f"unknown {m.logits_dtype!r}", "use 'float32' or 'bfloat16'")
  if m.get("quant", "none") not in QUANT_MODES:
    _fail("quant", f"unknown {m.quant!r}", f"use one of {QUANT_MODES}")
  from ling_jax import fp8  # the recipes live there; imported here only for their names
  recipe = m.get("fp8_recipe", "full")
  if recipe not in fp8.RECIPES:
    _fail("fp8_recipe", f"unknown {recipe!r}", f"use one of {tuple(fp8.RECIPES)}")
  if recipe != "full" and m.get("quant", "none") != "fp8_blockwise":
    _fail("fp8_recipe", f"{recipe!r} has no effect with quant={m.get('quant', 'none')!r}",
          "set quant='fp8_blockwise', or leave fp8_recipe='full'")
  from kernels import fp8_gemm  # the same lazy import, for the backends' names
  backends = ("auto", *fp8_gemm.BACKENDS)
  if m.get("fp8_backend", "auto") not in backends:
    _fail("fp8_backend", f"unknown {m.fp8_backend!r}", f"use one of {backends}")
  if m.get("fp8_backend", "auto") != "auto" and m.get("quant", "none") != "fp8_blockwise":
    _fail("fp8_backend", f"{m.fp8_backend!r} has no effect with quant={m.get('quant', 'none')!r}",
          "set quant='fp8_blockwise', or leave fp8_backend='auto'")
  align = m.get("fp8_group_align")  # unset: dispatch.FP8_GROUP_ALIGN
  if align is not None and (not isinstance(align, int) or not 1 <= align <= 128
                            or align & (align - 1)):
    _fail("fp8_group_align", f"must be a power of two from 1 to 128, got {align!r}",
          "use 16 (the default) or 32 and up for the FP8 wgrad kernel")


# The router's fp32 matmul (model.router_precision). "float32": XLA's fp32 dot (on GPUs the
# SIMT cores). "bf16x6": each fp32 operand split into three bf16 terms, six bf16 tensor-core
# products summed in fp32; "bf16x3": two terms, three products. On an H200 at Ling-mini's router
# shape (32768 x 2048 bf16-valued tokens, 256 experts) the forward dot's largest error against
# float64 was 1.7e-6 (float32), 3.2e-7 (bf16x6) and 2.2e-6 (bf16x3) of the largest logit, in
# 0.87, 0.78 and 0.49 ms (BENCHMARKS.md). CPUs run all three as "float32".
ROUTER_PRECISIONS = {
    "float32": jax.lax.Precision.HIGHEST,
    "bf16x6": jax.lax.DotAlgorithmPreset.BF16_BF16_F32_X6,
    "bf16x3": jax.lax.DotAlgorithmPreset.BF16_BF16_F32_X3,
}


def router_precision(m: Any) -> Any:
  """Returns the `precision` argument of the router's matmul for `model.router_precision`."""
  return ROUTER_PRECISIONS[m.get("router_precision", "float32")]


def router_grad_precision(m: Any) -> Any:
  """Returns the `precision` of the router matmul's two backward products.

  `model.router_grad_precision` when set, else the forward's (`router_precision`).
  """
  name = m.get("router_grad_precision") or m.get("router_precision", "float32")
  return ROUTER_PRECISIONS[name]


def dtype_of(name: str) -> jnp.dtype:
  """Returns the jnp dtype for a config dtype name."""
  return jnp.dtype(name)


def logits_dtype(m: Any) -> jnp.dtype:
  """The LM head's logits' dtype (`model.logits_dtype`, fp32 unless set): the model's and the
  chunked loss's (ling_jax/train.py)."""
  return dtype_of(m.get("logits_dtype", "float32"))
