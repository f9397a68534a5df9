"""A Ling-2.0-style model and training run sized for a compute budget by the Ling scaling laws.

  python -m experiments.train --config=configs/scaling.py:budget=3e11 --workdir=/tmp/ling_3e11
  python -m experiments.train --config=configs/scaling.py:budget=1e12,arch=dense \
      --workdir=/tmp/dense_1e12 --config.train.num_steps=100

The argument is comma-separated `key=value` pairs:
  budget   training FLOPs C (required), counted as the laws count them: C = M * D, M the
           non-embedding training FLOPs per token, attention included (ling_jax/scaling.py).
  arch     `moe` (default) or `dense`: which M_opt/D_opt law, and an all-dense model for `dense`.
  seq_len  training sequence length (default 128, the CPU corpus; the released models use 4096).
  mtp      MTP depth (default 0; `mtp=1` is the released setting, counted in M). MoE only.
  experts, top_k
           routed experts and experts per token (default 256 and 8: A = 9/257 = 3.5% with the
           shared expert, as in Ling 2.0). Keep (top_k + 1) / (experts + 1) near 3.5%.
  granularity
           G = 2 * hidden / expert width (default 8, Ling 2.0's; the paper's optimum is 8-12).
  head_dim default 32 below 1e17 FLOPs, 128 (Ling's) from there up; see below.
  dtype    activation dtype (default float32 below 1e17 FLOPs, where runs fit a CPU, whose bf16
           matmuls are slow; bfloat16 above).

What the laws and the paper's design rules fix (ling2_spec.md section 6):
  - M_opt(C) and D_opt(C) for the arch; the shape is the Ling-2.0-style one whose M is nearest
    M_opt. Along a ladder of budgets the shape changes smoothly: head_dim and G stay fixed, so
    the number of heads and the expert width grow with the hidden size; depth is solved from
    M_opt and scored against `target_layers(hidden)` (hidden / 100 from hidden 2048 up, as Ling:
    2048 / 20, 8192 / 80; proportionally deeper below, e.g. 64: 2, 256: 5, 1024: 13 layers), so
    width and depth grow together. The hidden size runs over multiples of head_dim.
  - head_dim 32 below 1e17 FLOPs: there M_opt allows hidden sizes of 32-300, and 128-wide heads
    would leave them one head or none. From 1e17 (hidden ~500 and up) Ling's 128. A sweep that
    straddles 1e17 should pass head_dim=... so that every budget gets the same.
  - One leading dense layer per 20 layers (Ling: 1 of 20, 4 of 80) with a dense FFN of 2.5x
    hidden, one shared expert, and (MoE only) KV heads and shape chosen to put attention at
    30-40% of M where a shape nearly as good allows it. The smallest MoE (hidden 32, 2 layers:
    budgets below ~2e12 at seq_len 128) cannot: it spends 42% of M in attention, half of that in
    the attention core, which grows with seq_len rather than hidden. Dense shapes are not held to
    the window (26-52% from 6e11 to 1e17). Up to ~5e12, hidden stays at its least, 32 (one head),
    and only depth grows.
  - lr = lr_opt(C), batch = batch_opt(C) tokens in whole sequences, steps = D_opt / batch.
`config.scaling` records the budget, the targets and what the derived model achieves. Every field
stays overridable (`--config.train.num_steps=...`); overrides are not re-derived, so change what
the laws depend on (budget, arch, seq_len, ...) in the argument instead.
"""

import math
import types
from typing import Any
from typing import NoReturn

import ml_collections

from configs import ling2
from ling_jax import config as config_lib
from ling_jax import scaling
from ling_jax import tokenizer as tokenizer_lib

_DEFAULTS = {"arch": "moe", "seq_len": "128", "mtp": "0", "experts": "256", "top_k": "8",
             "granularity": "8", "head_dim": "", "dtype": ""}
# Multiples of 16 while layers are few, coarser above, as real shapes are; only multiples of
# head_dim are used.
_HIDDEN_LADDER = (*range(32, 512, 16), *range(512, 4096, 64), *range(4096, 16384 + 1, 256))
# hidden / layers: Ling's 100 (2048 / 20, 8192 / 80) from hidden 2048 up, narrower below as
# (hidden / 2048)^(1/3), so that depth grows with width along a ladder of small models too
# (hidden 64: 2 layers, 256: 5, 1024: 13).
_ASPECT, _ASPECT_FROM = 100.0, 2048
_ATTENTION_SHARE = (0.30, 0.40)
_MAX_MISMATCH = 1.25  # Derived M must be within this factor of M_opt.
_MAX_LAYERS = 256
# Below this budget runs fit a CPU: head_dim 32 (so that small widths still get several heads)
# and float32 (bf16 matmuls are slow on a CPU). From it up, Ling's head_dim 128 and bfloat16.
_CPU_BUDGET = 1e17


def target_layers(hidden: int) -> float:
  """Returns the depth the shape ladder aims for at a width (see `_ASPECT`)."""
  return hidden / (_ASPECT * min(1.0, hidden / _ASPECT_FROM) ** (1 / 3))


def _max_layers(hidden: int) -> int:
  """Deepest model allowed at a width: hidden / layers >= 16, at most 256; but 6 layers always,
  so that budgets between hidden 32 and 64 (about 3e12-5e12) have a shape."""
  return max(6, min(_MAX_LAYERS, hidden // 16))


def _fail(key: str, problem: str, fix: str) -> NoReturn:
  config_lib.fail(f"scaling.{key}", problem, fix)
  raise AssertionError("unreachable")


def parse_arg(arg: str) -> dict[str, str]:
  """Returns the `key=value` pairs of the config argument, with defaults filled in."""
  values = dict(_DEFAULTS)
  for item in filter(None, arg.split(",")):
    key, sep, value = item.partition("=")
    if not sep or key not in {"budget", *_DEFAULTS}:
      _fail(key or item, f"unknown argument {item!r}",
            "pass key=value pairs from budget, " + ", ".join(_DEFAULTS)
            + " (e.g. --config=configs/scaling.py:budget=1e12,arch=dense)")
    values[key] = value
  if "budget" not in values:
    _fail("budget", "is required", "pass e.g. --config=configs/scaling.py:budget=1e12")
  return values


def _number(values: dict[str, str], key: str, kind: type) -> float | int:
  try:
    number = float(values[key])
  except ValueError:
    _fail(key, f"{values[key]!r} is not a number", f"pass {key}=<number>")
  if kind is int:
    if number != int(number):
      _fail(key, f"must be a whole number, got {values[key]}", f"pass {key}=<integer>")
    number = int(number)
  least = 0 if key == "mtp" else 1e-30
  if number < least:
    _fail(key, f"must be {'>= 0' if key == 'mtp' else 'positive'}, got {values[key]}",
          f"pass a {'non-negative' if key == 'mtp' else 'positive'} {key}")
  return number


def _expert_groups(experts: int, top_k: int) -> tuple[int, int]:
  """Returns (n_group, topk_group): Ling's 8 groups keeping half, shrunk to what divides."""
  for n_group in (8, 4, 2, 1):
    if experts % n_group or (n_group > 1 and experts // n_group < 2):
      continue
    for topk_group in range(max(n_group // 2, 1), n_group + 1):
      if top_k % topk_group == 0 and top_k <= topk_group * (experts // n_group):
        return n_group, topk_group
  return 1, 1


def _shape(m: Any, hidden: int, layers: int, kv_heads: int, gran: int, dense: bool) -> Any:
  """Returns `m` (a ConfigDict or namespace) with one candidate shape set, in place."""
  m.hidden_size, m.num_hidden_layers = hidden, layers
  m.num_attention_heads, m.num_key_value_heads = hidden // m.head_dim, kv_heads
  m.intermediate_size = 16 * max(1, round(2.5 * hidden / 16))
  m.moe_intermediate_size = 2 * hidden // gran
  m.first_k_dense_replace = layers if dense else max(1, round(layers / 20))
  return m


def _candidates(m: Any, m_target: float, seq_len: int, gran: int, dense: bool):
  """Yields (attention share outside the window, score, |log M / M_opt|, shape) per shape.

  The ladder: `m.head_dim` and G fixed, hidden a multiple of head_dim (and 2 * hidden of G),
  depth solved from M_opt and scored against `target_layers`, so width and depth grow together.
  """
  lo, hi = _ATTENTION_SHARE
  for hidden in _HIDDEN_LADDER:
    if hidden % m.head_dim or (2 * hidden) % gran:
      continue
    heads = hidden // m.head_dim
    for kv_heads in (k for k in range(1, heads + 1) if heads % k == 0):
      # M is affine in the layer count: solve for it from two probes, then round.
      m2, m3 = (scaling.non_embedding_flops_per_token(
          _shape(m, hidden, probe, kv_heads, gran, dense), seq_len) for probe in (2, 3))
      layers = min(max(2, round(2 + (m_target - m2) / (m3 - m2))), _max_layers(hidden))
      cand = _shape(m, hidden, layers, kv_heads, gran, dense)
      flops = scaling.non_embedding_flops_per_token(cand, seq_len)
      share = scaling.attention_fraction(cand, seq_len)
      outside = 0.0 if dense else max(0.0, lo - share, share - hi)
      score = (4 * abs(math.log(flops / m_target))
               + abs(math.log(layers / target_layers(hidden)))
               # Ties: GQA as in Ling (4-8 query heads per KV head).
               + 0.05 * abs(math.log2(max(heads / kv_heads, 1) / 6)))
      yield outside, score, abs(math.log(flops / m_target)), (hidden, layers, kv_heads)


def derive_model(m: ml_collections.ConfigDict, m_target: float, seq_len: int, gran: int,
                 dense: bool) -> ml_collections.ConfigDict:
  """Returns a copy of `m` with the Ling-2.0-style shape whose M is nearest `m_target`.

  `m.head_dim` and `gran` (G = 2 * hidden / expert width) stay fixed; hidden, depth, heads, KV
  heads, FFN and expert widths and the leading dense layers are derived.
  """
  # The search reads a plain namespace: ConfigDict attribute access is slow.
  probe = types.SimpleNamespace(**m.to_dict())
  candidates = list(_candidates(probe, m_target, seq_len, gran, dense))
  # Only shapes within _MAX_MISMATCH of M_opt compete, when there are any: the depth penalty may
  # not push a budget onto a shape that get_config then refuses.
  candidates = [c for c in candidates if c[2] <= math.log(_MAX_MISMATCH)] or candidates
  # Attention inside 30-40% when a shape nearly as good allows it (small ones, or long
  # sequences at small widths, may not): within 10% of M_opt and 0.5 of the best score (e.g. a
  # depth within 1.6x of the best's). Otherwise the best score, not the least attention: that
  # would pull the ladder towards wide, shallow shapes and back.
  best_score = min(c[1] for c in candidates)
  inside = [c for c in candidates
            if c[0] == 0 and c[2] < math.log(1.1) and c[1] < best_score + 0.5]
  _, _, _, best = min(inside or candidates, key=lambda c: c[1])
  return _shape(m.copy_and_resolve_references(), *best, gran, dense)


def get_config(arg: str = "budget=1e12") -> ml_collections.ConfigDict:
  """Returns the experiment config for a budget (see the module docstring for `arg`)."""
  values = parse_arg(arg)
  budget = _number(values, "budget", float)
  seq_len, mtp = _number(values, "seq_len", int), _number(values, "mtp", int)
  experts, top_k = _number(values, "experts", int), _number(values, "top_k", int)
  arch = values["arch"]
  if arch not in scaling.ALLOCATION:
    _fail("arch", f"unknown {arch!r}", "use arch=moe or arch=dense")
  dense = arch == "dense"
  if dense and mtp:
    _fail("mtp", "the MTP block is an MoE block, so a dense model cannot have one",
          "drop mtp=... or use arch=moe")
  if top_k >= experts:
    _fail("top_k", f"{top_k} of {experts} experts is not sparse", "pass top_k < experts")
  gran = _number(values, "granularity", int)
  if not 2 <= gran <= 64:
    _fail("granularity", f"G = 2 * hidden / expert width must be in 2..64, got {gran}",
          "pass granularity=8 (Ling 2.0) or another value in the paper's optimum of 8-12")
  head_dim = _number(values, "head_dim", int) if values["head_dim"] else (
      32 if budget < _CPU_BUDGET else 128)
  if head_dim % 4:
    _fail("head_dim", f"must be a multiple of 4 (RoPE rotates half of it, in pairs), got "
          f"{head_dim}", "pass head_dim=32 or 128")
  dtype = values["dtype"] or ("float32" if budget < _CPU_BUDGET else "bfloat16")

  config = ling2.get_config("mini")  # The released recipe; the shape and run are derived below.
  config.variant = arg
  m, t = config.model, config.train
  # Byte tokenizer by default (ling_jax/data.py); a tokenizer.json needs model.vocab_size too.
  m.vocab_size = 128 * math.ceil(tokenizer_lib.ByteTokenizer.vocab_size / 128)
  m.num_experts, m.num_experts_per_tok, m.num_shared_experts = experts, top_k, 1
  m.n_group, m.topk_group = _expert_groups(experts, top_k)
  m.num_nextn_predict_layers = mtp
  m.dtype = dtype
  m.max_position_embeddings = max(seq_len, 2048)
  m.head_dim = head_dim

  m_target, d_target = scaling.m_opt(budget, arch), scaling.d_opt(budget, arch)
  derived = derive_model(m, m_target, seq_len, gran, dense)
  achieved = scaling.non_embedding_flops_per_token(derived, seq_len)
  inverse = lambda flops: (flops / scaling.ALLOCATION[arch].m_coef) ** (
      1 / scaling.ALLOCATION[arch].m_exp)  # The budget whose M_opt is `flops`.
  if achieved > _MAX_MISMATCH * m_target:
    _fail("budget", f"{budget:.3g} FLOPs is too small for a sensible {arch} model: M_opt is "
          f"{m_target:.3g} FLOPs/token, but the smallest fitting shape (hidden "
          f"{derived.hidden_size}, {derived.num_hidden_layers} layers) needs {achieved:.3g} at "
          f"seq_len={seq_len}", f"use budget >= {inverse(achieved / _MAX_MISMATCH):.2g}")
  if achieved < m_target / _MAX_MISMATCH and derived.hidden_size == _HIDDEN_LADDER[-1]:
    _fail("budget", f"{budget:.3g} FLOPs is too large for a sensible {arch} model: M_opt is "
          f"{m_target:.3g} FLOPs/token, beyond the largest shape (hidden "
          f"{derived.hidden_size}, {derived.num_hidden_layers} layers: {achieved:.3g})",
          f"use budget <= {inverse(achieved * _MAX_MISMATCH):.2g}")
  if achieved < m_target / _MAX_MISMATCH:
    _fail("budget", f"no {arch} shape comes within {_MAX_MISMATCH}x of M_opt = {m_target:.3g} "
          f"FLOPs/token at {budget:.3g} FLOPs; the nearest (hidden {derived.hidden_size}, "
          f"{derived.num_hidden_layers} layers) gives {achieved:.3g}",
          f"use budget <= {inverse(achieved * _MAX_MISMATCH):.2g} or a larger one")
  config.model = derived
  m = config.model

  batch = max(1, round(scaling.batch_opt(budget) / seq_len))
  steps = max(1, math.ceil(d_target / (batch * seq_len)))
  t.seq_len, t.batch_size, t.num_steps = seq_len, batch, steps
  t.learning_rate = float(scaling.lr_opt(budget))
  # Loss at the end of each run is what the sweep fits, so anneal inside the run (WSD) rather
  # than by merging afterwards (WSM); warm up over 5% of the run, at most Ling's 2,000 steps.
  t.schedule = "wsd"
  t.decay_fraction = 0.2
  t.warmup_steps = min(2000, max(1, steps // 20))
  # Short runs need a faster balancer than the 1e-3 of a 10T-token run (BENCHMARKS.md, tiny).
  t.expert_bias_update_rate = 1e-2 if steps < 20_000 else 1e-3
  t.log_every = max(1, steps // 20)
  # The sweep reads only the final loss: evaluate once, at the end, and checkpoint once midway
  # (a killed run resumes from there) besides the final save. Each save costs ~1 s on a CPU.
  t.eval_every = steps
  t.checkpoint_every = max(1, math.ceil(steps / 2))
  t.keep_checkpoints = 2
  # Evaluate every budget on about the same 32K held-out tokens.
  t.eval_batches = max(1, math.ceil(2**15 / (batch * seq_len)))

  s = ml_collections.ConfigDict()
  s.budget, s.arch = budget, arch
  s.m_opt, s.d_opt = float(m_target), float(d_target)
  s.flops_per_token = achieved  # M of the derived model.
  s.tokens = steps * batch * seq_len
  s.compute = achieved * s.tokens  # What the run spends: within a few % of the budget.
  s.attention_fraction = scaling.attention_fraction(m, seq_len)
  s.activation_ratio = scaling.activation_ratio(m) if not dense else 1.0
  s.granularity = scaling.granularity(m) if not dense else 0.0
  config.scaling = s
  return config
