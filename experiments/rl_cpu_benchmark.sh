#!/bin/bash
# Reproduces the RL CPU benchmark (BENCHMARKS.md, "RL post-training on CPU").
# Run from the repository root; W is scratch space.
set -e
W=${W:-/tmp/rl_bench}; mkdir -p $W
PY=.venv/bin/python
# 1. DFT (instant-mode) chat records of "a+b=" sums: operands 0..49, then 0..14 (train split only).
PYTHONPATH=. $PY -c "
from ling_jax import rl_tasks as r
r.write_sft_records('$W/sft49.jsonl', r.make_tasks('arithmetic', 'train', 20000, 0, max_operand=49))
r.write_sft_records('$W/sft14.jsonl', r.make_tasks('arithmetic', 'train', 20000, 0, max_operand=14))"
MODEL="--config.model.num_hidden_layers=2 --config.model.first_k_dense_replace=2 \
 --config.model.hidden_size=64 --config.model.intermediate_size=256 \
 --config.model.num_attention_heads=4 --config.model.num_key_value_heads=2 \
 --config.model.head_dim=16 --config.model.num_nextn_predict_layers=0 \
 --config.train.batch_size=16 --config.train.learning_rate=3e-3 --config.train.keep_checkpoints=10 \
 --config.train.log_every=50 --config.train.compilation_cache_dir="
# 2. SFT: 580 steps on 0..49, then 227 steps on 0..14 (a params-only phase start).
nice -n 5 $PY -m experiments.train --config=configs/phases.py:sft,variant=tiny,seq_len=256 \
  --workdir=$W/sft --config.data.data_dir=$W/sft49.jsonl $MODEL --config.train.num_steps=580 \
  --config.train.warmup_steps=50 --config.train.checkpoint_every=100 --config.train.eval_every=400
nice -n 5 $PY -m experiments.train --config=configs/phases.py:sft,variant=tiny,seq_len=256 \
  --workdir=$W/sft14 --config.train.init_from=$W/sft --config.data.data_dir=$W/sft14.jsonl $MODEL \
  --config.train.num_steps=227 --config.train.warmup_steps=20 --config.train.checkpoint_every=50 \
  --config.train.eval_every=300
# 3. RL from the same start, same budget: 30 steps x 16 prompts x G=8, 2 optimiser steps each.
for obj in lpo grpo; do
  nice -n 5 $PY -m experiments.rl --config=configs/rl.py:$obj --workdir=$W/rl_$obj \
    --config.train.init_from=$W/sft14 --config.train.num_steps=30 \
    --config.train.learning_rate=${LR:-2e-4} --config.rl.prompts_per_step=16 \
    --config.rl.group_size=8 --config.rl.max_operand=14 --config.rl.eval_every=5 \
    --config.rl.eval_prompts=128 --config.rl.eval_samples=8 --config.train.checkpoint_every=10 \
    --config.train.compilation_cache_dir= &
done
wait
