"""Ling 2.0 model and training configs.

Tiny pre-training on the embedded corpus (2 CPU cores, under 10 minutes):

  python -m experiments.train --config=configs/ling2.py:tiny --workdir=/tmp/ling_tiny

Variants: `tiny`, `small` (~100M total), the released sizes `mini`, `flash`, `1t`, and
`mini_h200` (mini's width at the depth that trains on one H200).
Any field can be overridden on the command line, e.g. `--config.train.num_steps=200`.
Model field names follow the released Hugging Face `config.json` of `BailingMoeV2ForCausalLM`.
"""

import ml_collections
from ml_collections import config_dict

from ling_jax import data
from ling_jax import sharding


def model_config(variant: str) -> ml_collections.ConfigDict:
  """Returns the model config of one Ling 2.0 variant (HF `config.json` names)."""
  m = ml_collections.ConfigDict()
  # Shared by every released size (ling2_spec.md section 1).
  m.vocab_size = 157_184
  m.head_dim = 128
  m.num_experts = 256
  m.num_experts_per_tok = 8
  m.num_shared_experts = 1
  m.n_group = 8
  m.topk_group = 4
  m.routed_scaling_factor = 2.5
  m.score_function = "sigmoid"
  m.moe_router_enable_expert_bias = True
  m.rms_norm_eps = 1e-6
  m.rope_theta = 600_000.0
  m.partial_rotary_factor = 0.5
  # Ling-1T states `rotary_dim` instead of `partial_rotary_factor`; it wins when set.
  m.rotary_dim = config_dict.placeholder(int)
  m.rope_scaling = config_dict.placeholder(dict)
  m.max_position_embeddings = 32_768
  m.use_qk_norm = True
  m.tie_word_embeddings = False
  m.initializer_range = 0.006
  m.num_nextn_predict_layers = 1  # MTP depth.
  # Compute settings (not in the HF config).
  m.dtype = "bfloat16"
  m.param_dtype = "float32"
  # "xla" (einsum, fp32 softmax), "cudnn" (fused, GPU only) or "cudnn_causal" (fused, causal
  # only: packed documents attend to earlier ones in their row, as Megatron does by default).
  m.attention_impl = "xla"
  m.remat_policy = "none"  # "none", "full", "dots" (save matmul outputs).
  # Unroll the layer scan when compiling: same parameters, no stacking of each layer's saved
  # activations and gradients (model._stack); slower to compile, faster steps on GPUs.
  m.unroll_layers = False
  m.moe_backend = "auto"  # grouped-matmul backend, see kernels/grouped_matmul.py.
  # The router's fp32 matmul: "float32" (XLA's fp32 dot), or its emulation on bf16 tensor
  # cores, "bf16x6" (as accurate) or "bf16x3" (faster); ling_jax/config.py has the numbers.
  m.router_precision = "float32"
  # The precision of the router matmul's two backward products (dx, dw); unset: the forward's.
  m.router_grad_precision = config_dict.placeholder(str)
  # Benchmarks only: route on random logits (router.random_logits), near-balanced, as trained
  # routing is; the freshly initialised router sends nearly every token to the same experts.
  m.router_random_logits = False
  # Token exchange under expert parallelism: "auto" (ragged on GPU/TPU, padded on CPU, where XLA
  # has no ragged all-to-all), "ragged" or "padded" (worst-case blocks): expert_parallel.py.
  m.moe_all_to_all = "auto"
  # Embedding gradient: "sorted" (sort + segmented fp32 sum; no collisions on rows that many
  # tokens share, see layers.segment_sum_sorted) or "scatter" (XLA's scatter-add, bf16 sums).
  m.embedding_backward = "sorted"
  # The LM head's output dtype. Its matmul rounds to m.dtype either way; "bfloat16" keeps the
  # logits there (the loss still runs in fp32 per element) and halves their memory and traffic.
  m.logits_dtype = "float32"
  # "none" or "fp8_blockwise": E4M3 linear layers with 1x128 / 128x128 scales, Ling's FP8
  # recipe (ling_jax/fp8.py); router, embedding, LM head, norms and attention core unchanged.
  m.quant = "none"
  # Which GEMMs run in FP8 with quant="fp8_blockwise": "full" (Ling's recipe) or an ablation,
  # e.g. "wgrad_only", "bf16_attn_out", "experts_only", "pow2_scales" (ling_jax/fp8.py RECIPES).
  m.fp8_recipe = "full"
  # Rows each expert's token copies are padded to in the FP8 expert path (kernels/dispatch.py:
  # FP8_GROUP_ALIGN's note); 32 or more lets the FP8 wgrad kernel run (kernels/fp8_tgmm_mgpu.py),
  # 128 its fastest tiling (mini_h200 takes 128).
  m.fp8_group_align = 16
  # With the full FP8 recipe the routed experts run as one custom VJP whose quantise kernels read
  # the token copies (and their gradients, router weights multiplied in) by index and compute
  # the SwiGLU from the first GEMM's output: those exist only as E4M3 codes
  # (kernels/fp8_experts.py). false: permute, FP8 GEMMs and SwiGLU, un-permute, as separate ops.
  m.fp8_fused_dispatch = True
  # The FP8 GEMMs' backend (kernels/fp8_gemm.py): "auto" runs the FP8 kernels on Hopper GPUs (XLA's
  # fp32 reference elsewhere). "dequantize_bf16" quantises as "auto" does, then multiplies the
  # dequantised bf16 operands with the bf16 GEMMs: FP8's rounding without the FP8 kernels, to
  # tell which of the two moves a loss curve; "reference_bf16" the same with XLA's quantisation
  # (the CPU's), which tells the Triton quantisers apart too. Slower than either quant; diagnostics.
  m.fp8_backend = "auto"

  if variant == "mini":
    m.num_hidden_layers, m.hidden_size = 20, 2048
    m.intermediate_size, m.moe_intermediate_size = 5120, 512
    m.num_attention_heads, m.num_key_value_heads = 16, 4
    m.first_k_dense_replace = 1
  elif variant == "flash":
    m.num_hidden_layers, m.hidden_size = 32, 4096
    m.intermediate_size, m.moe_intermediate_size = 9216, 1024
    m.num_attention_heads, m.num_key_value_heads = 32, 4
    m.first_k_dense_replace = 1
  elif variant == "1t":
    m.num_hidden_layers, m.hidden_size = 80, 8192
    m.intermediate_size, m.moe_intermediate_size = 18432, 2048
    m.num_attention_heads, m.num_key_value_heads = 64, 8
    m.first_k_dense_replace = 4
    m.rotary_dim = 64
  elif variant == "small":
    # About 100M total parameters with a byte vocabulary; same ratios as mini.
    m.vocab_size = 512
    m.num_hidden_layers, m.hidden_size = 8, 512
    m.intermediate_size, m.moe_intermediate_size = 1408, 128
    m.num_attention_heads, m.num_key_value_heads, m.head_dim = 8, 2, 64
    m.first_k_dense_replace = 1
    m.num_experts, m.num_experts_per_tok, m.n_group, m.topk_group = 64, 8, 8, 4
    m.max_position_embeddings = 4096
  elif variant == "tiny":
    # Trains on 2 CPU cores in minutes, with every Ling 2.0 feature switched on.
    m.vocab_size = 512  # Byte tokenizer (258 ids) padded up.
    m.num_hidden_layers, m.hidden_size = 4, 128
    m.intermediate_size, m.moe_intermediate_size = 384, 64
    m.num_attention_heads, m.num_key_value_heads, m.head_dim = 4, 2, 32
    m.first_k_dense_replace = 1
    m.num_experts, m.num_experts_per_tok, m.n_group, m.topk_group = 16, 4, 4, 2
    m.max_position_embeddings = 2048
    m.rope_theta = 10_000.0
    m.dtype = "float32"  # CPUs have no fast bf16 matmul; bf16 is twice as slow there.
  else:
    raise ValueError(
        f"Unknown Ling 2.0 variant {variant!r}: use one of tiny, small, mini, flash, 1t "
        "(e.g. --config=configs/ling2.py:tiny).")
  return m


def train_config(variant: str) -> ml_collections.ConfigDict:
  """Returns optimiser, schedule and loop settings for a variant."""
  t = ml_collections.ConfigDict()
  t.seed = 0
  t.num_steps = 2000
  t.batch_size = 16  # Global batch, in sequences.
  t.seq_len = 256
  t.grad_accum_steps = 1
  t.learning_rate = 3e-3
  t.schedule = "wsm"  # "wsm" (warmup, then constant), "cosine", "wsd".
  t.warmup_steps = 100
  t.decay_fraction = 0.2  # WSD only: the share of steps spent decaying.
  t.min_lr_ratio = 0.1  # cosine/WSD floor.
  t.b1, t.b2, t.eps = 0.9, 0.95, 1e-8
  t.weight_decay = 0.1
  t.grad_clip_norm = 1.0
  # AdamW moments: "float32", or "bfloat16" (updated in fp32, stored in bf16: 4 bytes less per
  # parameter in memory and in the update's traffic; train.scale_by_adam_stored_in).
  t.moment_dtype = "float32"
  # Write each weight gradient out whole before the optimizer (train._materialize): with
  # unrolled layers, one update pass per stacked parameter instead of three.
  t.materialize_grads = False
  # Differentiate the matmul kernels as the model reads them, in model.dtype (bf16): the same
  # gradient values in half the bytes for the gradient copy, norm and update (train.py).
  t.compute_dtype_grads = False
  t.mtp_loss_weight = 0.1
  # 0: the LM heads' logits made whole. N: the training loss applies the LM head to N positions
  # at a time, making each chunk's gradients as it goes (train.chunked_cross_entropy_sum), so
  # [B, L, V] logits never exist, for the same matmuls. N divides seq_len.
  t.loss_chunk_len = 0
  t.router_z_loss_coef = 0.0  # The open recipe uses 3.5e-6.
  t.expert_bias_update_rate = 1e-3  # 1e-4 after context extension.
  t.max_consecutive_nan_steps = 5
  t.prefetch_batches = 2  # Steps of input built ahead on a thread (0: synchronous).
  t.log_every = 50
  # FP8 safeguard metrics (underflow, cosine) are measured on logged steps only; True: every step.
  t.fp8_metrics_every_step = False
  t.eval_every = 500
  t.eval_batches = 8
  t.checkpoint_every = 500
  t.keep_checkpoints = 3
  t.peak_tflops = config_dict.placeholder(float)  # Per device; None: from the device kind.
  t.compilation_cache_dir = "~/.cache/ling_jax/xla"  # Persistent XLA cache; "" turns it off.
  if variant in ("mini", "flash", "1t"):
    t.seq_len = 4096
    t.warmup_steps = 2000
    t.learning_rate = {"mini": 3.36e-4, "flash": 2.61e-4, "1t": 1.86e-4}[variant]
    t.batch_size = {"mini": 4400, "flash": 8352, "1t": 18144}[variant]
  elif variant == "small":
    t.learning_rate = 1.5e-3
    t.seq_len = 512
    t.batch_size = 32
  elif variant == "tiny":
    t.num_steps = 600
    t.seq_len = 128
    t.eval_every = 200
    t.checkpoint_every = 100
    # A short run needs a faster balancer than the 1e-3 of a 10T-token one (ling2_spec.md s3).
    t.expert_bias_update_rate = 1e-2
  return t


def mini_h200(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Ling-mini-2.0 width on one H200 (experiments/bench_train.py, BENCHMARKS.md).

  Every mini dimension is kept (hidden 2048, 256 experts x 512, top-8, one shared expert, 16/4
  heads, MTP 1, vocab 157,184) but the depth: fp32 master weights and two bf16 AdamW moments
  take 8 bytes per parameter, the gradients 2-4 more, and mini has 16.3B, so 8 of its 20 layers
  (1 dense + 7 MoE; 7.3B parameters with MTP) run beside the activations of a 12 x 4096-token
  batch: 128 GiB with 95% of the memory given to JAX, as bench_train does. That needs the loss
  made 1,024 positions at a time (`train.loss_chunk_len`): whole logits [12, 4096, 157,184] for
  two heads with their gradients take 77 GiB of temporaries, so that only 4 layers fit.
  Attention is cuDNN's fused causal kernel without document masks (packed documents see earlier
  ones in their row, Megatron's default): with a document mask cuDNN runs 3x slower. The
  logits stay bf16 (the LM head's matmul rounds them there anyway; the loss runs in fp32), the
  layer scan is unrolled when compiled, the weight gradients are taken in bf16 and written out
  whole before the optimizer, and the router's fp32 matmul runs as its bf16x6 emulation on the
  tensor cores (bf16x3 in its backward).
  """
  m, t = config.model, config.train
  m.num_hidden_layers = 8
  m.attention_impl = "cudnn_causal"
  m.logits_dtype = "bfloat16"
  m.unroll_layers = True  # 7% faster steps and 11 GiB less at 4 layers (BENCHMARKS.md)
  m.router_precision = "bf16x6"  # as accurate as XLA's fp32 dot; alone 0.78 against 0.87 ms
  m.router_grad_precision = "bf16x3"  # its backward: ~2^-16 relative, against bf16 elsewhere
  t.moment_dtype = "bfloat16"
  t.materialize_grads = True  # optimizer 31 -> 22 ms, gradient copies +4 ms (4 layers)
  t.compute_dtype_grads = True  # bf16 gradients of the matmul weights: the same values
  m.remat_policy = "none"
  # FP8 only: experts' groups padded to 128 rows (+4% rows at this batch) run their weight
  # gradients in the FP8 wgrad kernel at its two-CTA tiling, with bf16 output and no masking,
  # instead of dequantising to bf16 for the bf16 kernel: 37.2 against 42.7 ms of expert time a
  # step at 2 layers, 439.8 against 442.2 ms a step (BENCHMARKS.md, session 11).
  m.fp8_group_align = 128
  # 49,152 tokens: 393,216 routed rows per MoE layer. The optimizer's cost per step is fixed,
  # so each step's tokens spread it (session 6: 4 -> 8 rows gave 46.0% -> 50.0% MFU at 4 layers).
  t.batch_size, t.seq_len = 12, 4096
  t.loss_chunk_len = 1024  # as fast as whole logits, 47 against 94 GiB at 2 layers (session 15)
  t.num_steps, t.warmup_steps = 200, 20
  t.log_every, t.eval_every, t.eval_batches = 10, 1000, 2
  t.checkpoint_every = 1000
  return config


def get_config(arg: str = "tiny") -> ml_collections.ConfigDict:
  """Returns the full experiment config for `arg` (a variant name, or `mini_h200`)."""
  variant = "mini" if arg == "mini_h200" else arg
  config = ml_collections.ConfigDict()
  config.variant = arg
  config.model = model_config(variant)
  config.train = train_config(variant)
  config.data = data.default_data_config()
  config.mesh = sharding.default_mesh_config()
  if arg == "mini_h200":
    mini_h200(config)
  return config
