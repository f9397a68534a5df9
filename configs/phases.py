"""Ling 2.0 training phases: pretrain (4K) -> long_context (32K) -> midtrain -> sft (DFT).

Each phase is a run of its own that starts from the previous phase's workdir:

  python -m experiments.train --config=configs/phases.py:pretrain --workdir=w/pretrain
  python -m experiments.train --config=configs/phases.py:long_context --workdir=w/long \
      --config.train.init_from=w/pretrain
  python -m experiments.train --config=configs/phases.py:midtrain --workdir=w/mid \
      --config.train.init_from=w/long --config.data.sources.reasoning.data_dir=/data/cot
  python -m experiments.train --config=configs/phases.py:sft --workdir=w/sft \
      --config.train.init_from=w/mid --config.data.data_dir=/data/sft.jsonl
  python -m experiments.evaluate --workdir=w/sft     # validation loss, assistant tokens only

The argument is `PHASE[,key=value...]`; keys:
  variant=mini      model and optimiser of configs/ling2.py (tiny, small, mini, flash, 1t)
  seq_len=N         the phase's sequence length (pretrain 4096, later phases 32768)
  pretrain_len=N    pre-training length, the YaRN original context (default 4096)
  yarn=F            YaRN RoPE scaling by F from the phases after pre-training on: rope_scaling
                    {"type": "yarn", "factor": F, "original_max_position_embeddings":
                    seq_len / F} (the released HF semantics, ling_jax/layers.py); 0 = off (default;
                    Ling 2.0 keeps theta 600K at 32K and applies YaRN x4 at inference)

What each phase sets (ling2_spec.md sections 3 and 5):
- pretrain: 4K sequences, expert-bias update rate 1e-3, a batch-size ramp from a quarter of the
  batch over the first ~500B tokens (the start size is ours; the report says only "ramps up").
- long_context: 32K sequences and max positions, rope_theta from the model config, optional YaRN,
  update rate 1e-4, the batch in sequences shrunk to keep tokens per batch, 150B tokens. From here
  on the loss applies the LM head 4,096 positions at a time (`train.loss_chunk_len`).
- midtrain: reasoning pre-activation, 600B tokens of a weighted mixture (`general` and
  `reasoning`, chain-of-thought data; the shares are ours) at 32K, update rate 1e-4.
- sft: DFT over JSONL chat records (ling_jax/sft.py), loss on assistant tokens only, each record's
  `mode` choosing the instant or deep-reasoning system prompt; update rate 1e-4.
Later phases default to `init_mode="params"` (ling_jax/phases.py says why). Model shapes never
change between phases, so every phase restores the previous one's checkpoint.

Scale a phase down by overriding fields, e.g. the CPU chain of tests/test_phases.py:
  --config=configs/phases.py:long_context,variant=tiny,seq_len=64,pretrain_len=32,yarn=2
"""

import ml_collections
from ml_collections import config_dict

from configs import ling2

PHASES = ("pretrain", "long_context", "midtrain", "sft")
_TOKENS = {"long_context": 150e9, "midtrain": 600e9}  # Tokens per phase (ling2_spec.md s5).
_RAMP_TOKENS = 500e9  # The batch-size ramp covers the first ~500B pre-training tokens.
_LOSS_CHUNK_LEN = 4096  # Positions per LM-head chunk in the phases after pre-training.


def _parse(arg: str) -> tuple[str, dict[str, str]]:
  phase, *items = [x.strip() for x in arg.split(",") if x.strip()]
  if phase not in PHASES:
    raise ValueError(f"Unknown phase {phase!r}: use one of {', '.join(PHASES)} "
                     "(e.g. --config=configs/phases.py:long_context,variant=mini).")
  options = {}
  for item in items:
    key, sep, value = item.partition("=")
    if not sep or key not in ("variant", "seq_len", "pretrain_len", "yarn"):
      raise ValueError(f"configs/phases.py: bad argument {item!r}; use key=value with key in "
                       "variant, seq_len, pretrain_len, yarn.")
    options[key] = value
  return phase, options


def get_config(arg: str = "pretrain") -> ml_collections.ConfigDict:
  """Returns the experiment config of one training phase (see the module docstring)."""
  phase, options = _parse(arg)
  variant = options.get("variant", "mini")
  config = ling2.get_config(variant)
  config.variant = variant
  config.phase = phase
  m, t, d = config.model, config.train, config.data
  pretrain_len = int(options.get("pretrain_len", 4096))
  seq_len = int(options.get("seq_len", pretrain_len if phase == "pretrain" else 32_768))
  # Phase fields of config.train (ling_jax/phases.py).
  t.init_from = config_dict.placeholder(str)  # previous phase's workdir (or HF/orbax dir)
  t.init_mode = "params"  # "params" (weights + expert biases) or "full" (whole train state)
  t.batch_size_ramp_start = config_dict.placeholder(int)  # None: no ramp
  t.batch_size_ramp_steps = 0
  t.seq_len = seq_len
  m.max_position_embeddings = seq_len
  # Keep the variant's tokens per batch: more, shorter sequences at 4K; fewer at 32K.
  t.batch_size = max(1, t.batch_size * ling2.train_config(variant).seq_len // seq_len)
  if phase == "pretrain":
    t.expert_bias_update_rate = 1e-3
    start = t.batch_size // 4
    # Only the released sizes ramp by default: a short run has no 500B tokens to ramp over.
    if variant in ("mini", "flash", "1t") and t.batch_size % start == 0:
      t.batch_size_ramp_start = start
      t.batch_size_ramp_steps = int(_RAMP_TOKENS / (t.batch_size * seq_len))
    return config
  # Every later phase runs after context extension.
  t.expert_bias_update_rate = 1e-4
  # Whole logits at 32K positions are [B, 32768, V] a head: 10 GB a sequence in bf16 at Ling's
  # vocabulary, twice with their gradient. The loss makes them a chunk at a time instead, as
  # fast (train.loss_chunk_len; BENCHMARKS.md, session 15).
  if seq_len > _LOSS_CHUNK_LEN and seq_len % _LOSS_CHUNK_LEN == 0:
    t.loss_chunk_len = _LOSS_CHUNK_LEN
  t.warmup_steps = min(t.warmup_steps, 200)
  factor = float(options.get("yarn", 0))
  if factor:
    if seq_len % factor or factor < 1:
      raise ValueError(f"configs/phases.py: yarn={factor} must be >= 1 and divide "
                       f"seq_len={seq_len}.")
    m.rope_scaling = {"type": "yarn", "factor": factor,
                      "original_max_position_embeddings": int(seq_len // factor)}
  if phase in _TOKENS:
    t.num_steps = max(1, int(_TOKENS[phase] / (t.batch_size * seq_len)))
  if phase == "midtrain":
    d.mixture = "general=0.5,reasoning=0.5"
    d.sources = ml_collections.ConfigDict({
        "general": {"source": d.source, "data_dir": config_dict.placeholder(str)},
        # Chain-of-thought text (.py/.txt files); set its data_dir on the command line.
        "reasoning": {"source": "stdlib", "data_dir": config_dict.placeholder(str)},
    })
  elif phase == "sft":
    d.source = "jsonl"  # set --config.data.data_dir to a .jsonl file or folder
    t.learning_rate = t.learning_rate / 10
    t.num_steps = 2000
  return config
