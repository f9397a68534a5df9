"""Training throughput on one device: tokens/s, MFU, memory and a profiled step-time breakdown.

  python -m experiments.bench_train --config=configs/ling2.py:mini_h200 \\
      --quants=none,fp8_blockwise --depths=2,8 --out_dir=/tmp/bench_train

Each (quant, depth) variant is compiled, warmed up and timed over `--steps` steps fed by the real
input pipeline (`--data=corpus`, built ahead on a thread as in training) or by random tokens
(`--data=synthetic`). A few more steps of the deepest variant run under `jax.profiler` (on GPUs
compiled without CUDA graphs, so that every kernel shows), and the trace is read back into
shares of device time per part of the step (`ling_jax/profiling.py`: MoE experts, dispatch,
router, attention core and projections, LM head and loss, optimizer, ...).

Every variant starts from the same initial state and batches, and every step's loss is kept;
the curves of each variant are compared with the first's in `--loss_window`-step means. A
`--quants` entry may carry model overrides joined by '+', for a control run: e.g.
`none+embedding_backward=scatter` does the same maths as `none` with other rounding, and shows
how far two curves drift apart from rounding alone (at Ling-mini width, as far as bf16 and FP8:
BENCHMARKS.md, session 9). The same command in several processes gives each variant several
runs; `experiments/compare_curves.py` judges them against the band of the baseline's runs.
`--repeats=N` runs every variant N times in one process instead, in turn, reusing each one's
compiled step, and the summary makes that comparison itself (on CPU the runs are identical; on
a GPU, runs of one process part after a few steps as runs of two processes do, or not: the band
shows which). `--eval_quants=none,fp8_blockwise` then scores each variant's final weights on
validation batches with the linears in bf16 and in FP8: where an FP8 run's training loss lies
above bf16's, its loss in bf16 says whether the weights learned less or FP8's forward pass costs
the difference.

MFU convention: model FLOPs per token as `ling_jax.scaling.flops_per_token` counts them (every
matmul, causal attention at half, LM head and MTP included, forward + backward = 3x forward),
times tokens per second, divided by `--peak_tflops` (989 TFLOP/s: dense bf16 on an H100/H200),
also for FP8 runs.

With two depths or more of one quant, step time is fitted as a + b * layers and projected to
`--full_depth` layers (Ling-mini has 20), giving the MFU the full model would reach at this
per-layer speed, should it fit in memory.

Writes `results.jsonl` (one line per variant) and `summary.md` to --out_dir, and per variant its
profile (`<name>.trace.json.gz`, Perfetto JSON) and compiled HLO (`<name>.hlo.txt.gz`), from which
`ling_jax.profiling.breakdown` re-reads the breakdown offline. A variant that raises (out of
memory, say) is logged with its traceback and the others run on; the summary lists it with its
error, and the run exits with status 1 once everything else is written.
"""

import copy
import functools
import gc
import gzip
import hashlib
import json
import os
import shutil
import time
import traceback
from typing import Any

# JAX's GPU client takes 75% of device memory unless told otherwise; at Ling-mini width the step
# then hits that cap and XLA rematerialises (recomputes) to fit, e.g. the fp32 -> bf16 weight
# casts twice per step. One process owns the device here, so it takes 95%. An explicit
# setting wins.
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")
# Sessions 11-12 set TF_GPU_ALLOCATOR=cuda_malloc_async here after `mini_h200`'s 77 GiB block of
# step temporaries failed to allocate in 5 of ~12 processes without it and in none of 6 with it.
# XLA does not read that variable (session 13: the device's memory stats still show the BFC
# pool with it set; with XLA_PYTHON_CLIENT_ALLOCATOR=cuda_async they do not), so those passes
# were chance, and it is gone. The allocator stays XLA's default; set
# XLA_PYTHON_CLIENT_ALLOCATOR=cuda_async to try CUDA's stream-ordered one. Since session 15
# `mini_h200` makes its loss 1,024 positions at a time (`train.loss_chunk_len`), and that block
# (the two LM heads' whole logits and their gradients) no longer exists.

import jax
import ml_collections
import numpy as np
from absl import app
from absl import flags
from ml_collections import config_flags

from ling_jax import config as config_lib
from ling_jax import data as data_lib
from ling_jax import metrics as metrics_lib
from ling_jax import phases
from ling_jax import profiling
from ling_jax import scaling
from ling_jax import sharding
from ling_jax import train as train_lib
from ling_jax import trainer

_CONFIG = config_flags.DEFINE_config_file("config", "configs/ling2.py:mini_h200",
                                          "Experiment config.", lock_config=False)
_OUT_DIR = flags.DEFINE_string("out_dir", "/tmp/bench_train", "Where results and traces go.")
_STEPS = flags.DEFINE_integer("steps", 10, "Timed steps per variant.")
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed steps after compilation.")
_PROFILE_STEPS = flags.DEFINE_integer("profile_steps", 2,
                                      "Profiled steps of the deepest variant (0: no profile).")
_QUANTS = flags.DEFINE_list(
    "quants", ["none"],
    "Variants to time: a model.quant value, optionally with model overrides joined by '+', e.g. "
    "none+embedding_backward=scatter (a control run: the same maths, other rounding).")
_DEPTHS = flags.DEFINE_list("depths", [], "num_hidden_layers values (default: the config's).")
_FULL_DEPTH = flags.DEFINE_integer("full_depth", 20, "Depth to project step time to.")
_PROFILE_QUANTS = flags.DEFINE_list("profile_quants", [],
                                    "Variants (--quants entries) profiled at --profile_depth "
                                    "(default: all).")
_LOSS_WINDOW = flags.DEFINE_integer("loss_window", 20,
                                    "Steps per window mean when two variants' curves are compared.")
_LOSS_TOLERANCE = flags.DEFINE_float("loss_tolerance", 0.01,
                                     "Largest relative gap of window means called an overlap.")
_PROFILE_DEPTH = flags.DEFINE_integer("profile_depth", None,
                                      "Which of --depths to profile (default: the deepest).")
_REPEATS = flags.DEFINE_integer(
    "repeats", 1, "Runs of every variant in this process, taken in turn, each from the same "
    "initial state and batches; the summary then judges each variant's curves against the band "
    "of the first --quants entry's runs (experiments/compare_curves.py).")
_EVAL_QUANTS = flags.DEFINE_list(
    "eval_quants", [], "After each variant's steps, the validation loss of its final weights "
    "(train.eval_batches batches; with --data=synthetic, random ones) with the linears in each "
    "of these precisions, e.g. none,fp8_blockwise: an FP8 run's loss in bf16 tells the cost of "
    "FP8's forward pass from that of its training (Ling's full recipe, kernels as 'auto').")
_DATA = flags.DEFINE_enum("data", "corpus", ["corpus", "synthetic"], "Input batches.")
_PEAK = flags.DEFINE_float("peak_tflops", 989.0, "Per-device peak for MFU (dense bf16).")
_TOP_OPS = flags.DEFINE_integer("top_ops", 25, "Costliest ops listed per profiled variant.")


def variant_config(base: Any, quant: str, depth: int | None,
                   overrides: dict[str, Any] | None = None) -> Any:
  """Returns `base` with `model.quant`, the model `overrides` and (when given)
  `model.num_hidden_layers` set."""
  config = ml_collections.ConfigDict(base.to_dict())
  config.model.quant = quant
  for field, value in (overrides or {}).items():
    config.model[field] = value
  if depth:
    if depth <= config.model.first_k_dense_replace:
      dense = config.model.first_k_dense_replace
      raise config_lib.ConfigError(
          f"--depths: {depth} layers leave no MoE layer after the {dense} dense ones. Fix: use "
          f"depths above {dense}.")
    config.model.num_hidden_layers = depth
  return config


def eval_config(config: Any, quant: str) -> Any:
  """`config` with its linears in `quant` for --eval_quants: the full FP8 recipe and "auto"
  kernels (a variant's recipe or backend was of its training), the same weights."""
  config = ml_collections.ConfigDict(config.to_dict())
  config.model.quant, config.model.fp8_recipe, config.model.fp8_backend = quant, "full", "auto"
  return config


def _eval_losses(config: Any, mesh: Any, state: Any, shardings: Any) -> dict[str, float]:
  """--eval_quants: {quant: validation loss} of `state`'s weights."""
  t = config.train
  if _DATA.value == "corpus":
    batches = trainer._eval_batches(config, mesh)  # pylint: disable=protected-access
  else:  # Other random tokens than the training batches'.
    synthetic = data_lib.SyntheticBatches(t.batch_size, t.seq_len, config.model.vocab_size,
                                          t.seed + 1)
    batches = [sharding.global_batch(synthetic.next_batch(i), mesh)
               for i in range(t.eval_batches)]
  losses = {}
  for quant in _EVAL_QUANTS.value:
    m = eval_config(config, quant).model
    eval_fn = jax.jit(functools.partial(train_lib.eval_step, m=m, t=t),
                      in_shardings=(shardings.params, shardings.moe_state,
                                    sharding.batch_sharding(mesh)),
                      out_shardings=sharding.replicated(mesh))
    losses[quant] = trainer._evaluate(  # pylint: disable=protected-access
        eval_fn, state.params, state.moe_state, batches)["val_loss"]
  return losses


def _peak_memory_gib() -> float | None:
  stats = jax.devices()[0].memory_stats() or {}
  peak = stats.get("peak_bytes_in_use")
  return peak / 2**30 if peak else None


def run_variant(config: Any, source: Any, name: str, out_dir: str,
                profile: bool = True, source_state: Any = None,
                executables: dict[str, Any] | None = None, key: str = "") -> dict[str, Any]:
  """Compiles, times and (with `profile`) profiles one variant; returns its results.

  `source_state` (from `source.get_state()`) rewinds the input first, so that every variant of
  one process trains on the same batches. `executables` keeps the compiled step under `key`
  for a repeat of the variant (--repeats), which then runs it again without compiling.
  """
  trainer.validate_config(config)
  if source_state is not None:
    source.set_state(copy.deepcopy(source_state))
  m, t = config.model, config.train
  mesh = sharding.make_mesh(config.mesh)
  target = trainer.abstract_state(config, mesh)
  shardings = jax.tree.map(lambda x: x.sharding, target)
  with jax.set_mesh(mesh):
    state = jax.jit(train_lib.init_state_fn(m, t), out_shardings=shardings)()
  params = sum(x.size for x in jax.tree.leaves(state.params))
  batches = data_lib.Prefetcher(source, first_step=0, depth=t.get("prefetch_batches", 2),
                                transform=lambda b: sharding.global_batch(b, mesh))
  step_fn = jax.jit(functools.partial(train_lib.train_step, m=m, t=t),
                    in_shardings=(shardings, sharding.batch_sharding(mesh)),
                    out_shardings=(shardings, sharding.replicated(mesh)), donate_argnums=0)
  step = 0
  with jax.set_mesh(mesh):
    batch = batches.next_batch(step)
    first_inputs = batch["inputs"]  # Its digest shows which variants saw the same data.
    input_digest = (hashlib.sha1(np.asarray(jax.device_get(first_inputs))).hexdigest()[:12]
                    if first_inputs.is_fully_addressable else None)
    start = time.time()
    compiled = (executables or {}).get(key)
    if compiled is not None:
      metrics_lib.log("[%s] %.2fB params; runs %s's compiled step again", name, params / 1e9,
                      key)
    else:
      compiled = step_fn.lower(state, batch).compile()
      if executables is not None:
        executables[key] = compiled
      metrics_lib.log("[%s] %.2fB params; compiled in %.1f s", name, params / 1e9,
                      time.time() - start)
    compile_s = time.time() - start

    def run(num_steps: int) -> list[jax.Array]:
      """Steps as the trainer queues them: each dispatched before the one before it is waited
      for (the trainer reads its NaN streak), so that at most two are in flight."""
      nonlocal state, batch, step
      losses = []
      for _ in range(num_steps):
        state, step_metrics = compiled(state, batch)
        if losses:
          jax.block_until_ready(losses[-1])
        losses.append(step_metrics["loss"])
        if step_metrics["layer_violations"].size:  # routing skew: what the experts are fed
          violations.append(step_metrics["layer_violations"])  # per MoE layer, MTP blocks last
        fp8_metrics = {k: v for k, v in step_metrics.items() if k.startswith("fp8_")}
        if fp8_metrics and train_lib.fp8_metrics_due(step, t):  # FP8 safeguards, if measured
          safeguards.append((step, fp8_metrics))
        step += 1
        batch = batches.next_batch(step)
      jax.block_until_ready(state)
      return losses

    violations = []  # every step's, profiled ones included
    safeguards = []  # (step, FP8 safeguard metrics) of the steps that measure them
    losses = run(_WARMUP.value)  # Every step's loss from the first: the curves compare whole.
    start = time.time()
    losses += run(_STEPS.value)
    step_s = (time.time() - start) / _STEPS.value
    summary, profiled_step_s = None, None
    if profile:
      if jax.default_backend() == "gpu":
        # XLA:GPU replays runs of kernels as CUDA graphs, which a profile shows as one op
        # each: the profiled program is compiled again without them (and timed too).
        compiled = step_fn.lower(state, batch).compile(
            compiler_options={"xla_gpu_enable_command_buffer": ""})
        run(1)
        start = time.time()
        run(_PROFILE_STEPS.value)
        profiled_step_s = (time.time() - start) / _PROFILE_STEPS.value
      trace_dir = os.path.join(out_dir, f"trace_{name}")
      shutil.rmtree(trace_dir, ignore_errors=True)
      with profiling.trace(trace_dir):
        run(_PROFILE_STEPS.value)
      hlo_text, trace_path = compiled.as_text(), profiling.find_trace(trace_dir)
      summary = profiling.breakdown(trace_path, hlo_text, _PROFILE_STEPS.value,
                                   top=_TOP_OPS.value)
      # Keep the trace and the HLO that names its ops side by side, flat in out_dir.
      shutil.move(trace_path, os.path.join(out_dir, f"{name}.trace.json.gz"))
      shutil.rmtree(trace_dir)
      with gzip.open(os.path.join(out_dir, f"{name}.hlo.txt.gz"), "wt") as f:
        f.write(hlo_text)
    eval_losses, eval_error = {}, None
    if _EVAL_QUANTS.value:
      try:
        eval_losses = _eval_losses(config, mesh, state, shardings)
      except Exception as e:  # pylint: disable=broad-except  (the timed steps' results stand)
        eval_error = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
        metrics_lib.log("[%s] --eval_quants failed, the step's results are kept: %s", name,
                        eval_error)
  batches.close()
  losses = [float(x) for x in jax.device_get(losses)]
  if not all(np.isfinite(losses)):
    raise FloatingPointError(f"[{name}] non-finite training loss: {losses}")
  # [steps, MoE layers]: max_i(count_i) / mean(count) - 1 of each layer's experts.
  layer_violations = np.stack(jax.device_get(violations)) if violations else np.zeros((0, 0))
  tokens = t.batch_size * t.seq_len
  flops = scaling.flops_per_token(m, t.seq_len)
  result = {
      "name": name, "quant": m.quant, "layers": m.num_hidden_layers,
      "moe_layers": config_lib.num_moe_layers(m), "params": params,
      "device": jax.devices()[0].device_kind, "jax": jax.__version__,
      "batch": t.batch_size, "seq_len": t.seq_len, "attention_impl": m.attention_impl,
      "remat_policy": m.remat_policy, "data": _DATA.value, "compile_s": compile_s,
      "step_ms": step_s * 1e3, "tokens_per_s": tokens / step_s,
      "flops_per_token": flops, "mfu": flops * tokens / step_s / (_PEAK.value * 1e12),
      "peak_memory_gib": _peak_memory_gib(), "losses": losses, "timed_from_step": _WARMUP.value,
      # Routing max violation per step: the largest over MoE layers, and each layer's.
      "max_violations": [float(v.max()) for v in layer_violations],
      "layer_violations": [[round(float(x), 3) for x in v] for v in layer_violations],
      # FP8 runs: underflow and cosine per kind (mean and worst op) every log_every-th step.
      "fp8_metrics": [{"step": i, **{k: float(v) for k, v in jax.device_get(f).items()}}
                      for i, f in safeguards],
      "breakdown": summary,
      "profiled_step_ms": profiled_step_s and profiled_step_s * 1e3,
      "input_digest": input_digest,
      "eval_losses": eval_losses,  # --eval_quants: {quant: validation loss of the final weights}
      "eval_error": eval_error,  # why they are missing, if they are
  }
  metrics_lib.log("[%s] %.1f ms/step, %.0f tokens/s, MFU %.1f%%, peak memory %s GiB", name,
                  result["step_ms"], result["tokens_per_s"], 100 * result["mfu"],
                  f"{result['peak_memory_gib']:.1f}" if result["peak_memory_gib"] else "n/a")
  if eval_losses:
    metrics_lib.log("[%s] validation loss of the final weights: %s", name,
                    ", ".join(f"{q} {v:.4f}" for q, v in eval_losses.items()))
  if result["max_violations"]:
    metrics_lib.log("[%s] routing max violation (largest expert / mean - 1) per step: %s", name,
                    " ".join(f"{v:.1f}" for v in result["max_violations"]))
  if summary:
    print(profiling.format_breakdown(summary, result["step_ms"]), flush=True)
  return result


def markdown(results: list[dict[str, Any]], projections: list[dict[str, Any]],
             curves: list[dict[str, Any]] = (),
             failures: list[tuple[str, BaseException]] = ()) -> str:
  """Returns the results as Markdown tables, the failed variants' errors after the first."""
  lines = ["| variant | layers | params | step (ms) | tokens/s | MFU | peak mem (GiB) "
           "| compile (s) | routing max violation |",
           "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
  for r in results:
    mem = f"{r['peak_memory_gib']:.1f}" if r["peak_memory_gib"] else "n/a"
    # Largest expert's tokens / mean - 1 over the timed steps (0: balanced; top-k of E experts
    # collapsed onto k experts reads E / k - 1).
    timed = r.get("max_violations", [])[r["timed_from_step"]:len(r["losses"])]
    vio = f"{min(timed):.2f}-{max(timed):.2f}" if timed else "n/a"
    lines.append(f"| {r['name']} | {r['layers']} | {r['params'] / 1e9:.2f}B | {r['step_ms']:.1f} "
                 f"| {r['tokens_per_s']:,.0f} | {r['mfu']:.1%} | {mem} | {r['compile_s']:.0f} "
                 f"| {vio} |")
  lines += profiling.failure_rows(list(failures))
  per_layer = [(r["name"], np.mean(r["layer_violations"][r["timed_from_step"]:], axis=0))
               for r in results if r.get("layer_violations", [])[r["timed_from_step"]:]]
  if per_layer:
    lines += ["", "Routing max violation of each MoE layer (MTP blocks last), the mean over the "
              "timed steps:", "", "| variant | per layer |", "|---|---|"]
    lines += [f"| {name} | {' '.join(f'{v:.1f}' for v in means)} |" for name, means in per_layer]
  lines += profiling.safeguard_rows(results)
  evaluated = [r for r in results if r.get("eval_losses")]
  if evaluated:
    quants = list(evaluated[0]["eval_losses"])
    lines += ["", "Validation loss of each variant's final weights, with the linears in:", "",
              "| variant | " + " | ".join(quants) + " |", "|---|" + "---:|" * len(quants)]
    lines += [f"| {r['name']} | " + " | ".join(f"{r['eval_losses'][q]:.4f}" for q in quants)
              + " |" for r in evaluated]
  lines += [f"\n--eval_quants failed for {r['name']}: {r['eval_error']}" for r in results
            if r.get("eval_error")]
  if projections:
    lines += ["", "| projected to | ms per layer | fixed ms | step (ms) | tokens/s | MFU |",
              "|---|---:|---:|---:|---:|---:|"]
    for p in projections:
      lines.append(f"| {p['quant']}, {p['layers']} layers | {p['ms_per_layer']:.1f} | "
                   f"{p['fixed_ms']:.1f} | {p['step_ms']:.1f} | {p['tokens_per_s']:,.0f} | "
                   f"{p['mfu']:.1%} |")
  for c in curves:
    verdict = "overlap" if c["overlap"] else "do NOT overlap"
    lines += ["", f"Loss curves, {c['name']} against {c['baseline']} (same init and batches; "
              f"{c['window']}-step means; the curves {verdict}: largest gap "
              f"{c['max_rel_gap']:+.2%}, tolerance {c['tolerance']:.0%}):", "",
              "| steps | " + c["baseline"] + " | " + c["name"] + " | gap |", "|---|---:|---:|---:|"]
    lines += [f"| {w['first']}-{w['last']} | {w['baseline']:.4f} | {w['loss']:.4f} "
              f"| {w['rel_gap']:+.2%} |" for w in c["windows"]]
  for r in results:
    if r["breakdown"]:
      b = r["breakdown"]
      lines += ["", f"Breakdown of {r['name']} (device time per step, "
                f"{b['device_ms_per_step']:.1f} ms of {r['step_ms']:.1f} ms wall):", "",
                "| part | ms/step | share |", "|---|---:|---:|"]
      lines += [f"| {k} | {v:.1f} | {b['share'][k]:.1%} |" for k, v in b["ms_per_step"].items()]
      lines += ["", f"The five largest parts of {r['name']} by op kind (a kernel's jitted wrapper, "
                "else the XLA instruction kind; ms per step, the six largest each):", "",
                "| part | kind | ms/step |", "|---|---|---:|"]
      for part in list(b["ms_per_step"])[:5]:
        lines += [f"| {part} | {kind} | {ms:.2f} |"
                  for kind, ms in list(b.get("kinds", {}).get(part, {}).items())[:6]]
      lines += ["", f"Costliest ops of {r['name']}:", "",
                "| op | ms/step | part | name stack (tail) |", "|---|---:|---|---|"]
      lines += [f"| {o['op']} | {o['ms_per_step']:.2f} | {o['category']} | "
                f"{'/'.join(o['op_name'].split('/')[-4:])} |" for o in b["top_ops"]]
  return "\n".join(lines) + "\n"


def main(argv: list[str]) -> None:
  del argv
  base = _CONFIG.value
  try:
    depths = [int(d) for d in _DEPTHS.value] or [None]
  except ValueError:
    raise app.UsageError(f"--depths={','.join(_DEPTHS.value)}: give whole numbers of layers, "
                         "e.g. --depths=2,4") from None
  if _PROFILE_DEPTH.value is not None and _PROFILE_DEPTH.value not in depths:
    raise app.UsageError(f"--profile_depth={_PROFILE_DEPTH.value} is not one of --depths="
                         f"{','.join(_DEPTHS.value)}: pick one of them, or leave it unset to "
                         "profile the deepest")
  profile_depth = _PROFILE_DEPTH.value or max(depths, key=lambda d: d or 0)  # One is profiled.
  if unknown := set(_PROFILE_QUANTS.value) - set(_QUANTS.value):
    raise app.UsageError(f"--profile_quants={','.join(sorted(unknown))} is not one of --quants="
                         f"{','.join(_QUANTS.value)}: pick from those, or leave it unset")
  try:  # Every variant's config is checked before anything is written or built.
    variants = [(spec, *profiling.parse_variant(spec, base.model)) for spec in _QUANTS.value]
    for _, quant, overrides in variants:
      for depth in depths:
        trainer.validate_config(variant_config(base, quant, depth, overrides))
    for quant in _EVAL_QUANTS.value:
      if quant not in config_lib.QUANT_MODES:
        raise config_lib.ConfigError(f"--eval_quants={quant}: not a model.quant value. Fix: use "
                                     f"some of {', '.join(config_lib.QUANT_MODES)}.")
      trainer.validate_config(eval_config(base, quant))
    if _EVAL_QUANTS.value and base.train.eval_batches < 1:
      raise config_lib.ConfigError(
          f"--eval_quants needs validation batches, but config.train.eval_batches is "
          f"{base.train.eval_batches}. Fix: set it to 1 or more.")
  except config_lib.ConfigError as e:
    raise app.UsageError(str(e)) from None
  if _REPEATS.value < 1:
    raise app.UsageError(f"--repeats={_REPEATS.value}: run each variant at least once (1, or "
                         "2-3 to see how far one process's runs drift apart)")
  os.makedirs(_OUT_DIR.value, exist_ok=True)
  stats = jax.devices()[0].memory_stats() or {}
  if "bytes_limit" in stats:  # A smaller pool than usual: another process holds device memory.
    metrics_lib.log("Device memory for this process: %.1f GiB (%.1f GiB in use)",
                    stats["bytes_limit"] / 2**30, stats.get("bytes_in_use", 0) / 2**30)
  trainer.enable_compilation_cache(base.train.get("compilation_cache_dir"))
  t = base.train
  if _DATA.value == "corpus":
    source = phases.make_train_batches(base, trainer.data_shards(base))
  else:
    source = data_lib.SyntheticBatches(t.batch_size, t.seq_len, base.model.vocab_size, t.seed)
  full = variant_config(base, "none", _FULL_DEPTH.value).model
  start_state = copy.deepcopy(source.get_state())  # Every variant starts from the same batch.
  results, failures, executables = [], [], {}
  runs = [(repeat, spec, quant, overrides, depth) for repeat in range(_REPEATS.value)
          for spec, quant, overrides in variants for depth in depths]
  for repeat, spec, quant, overrides, depth in runs:
    gc.collect()  # The last variant's state goes before this one allocates.
    config = variant_config(base, quant, depth, overrides)
    key = f"{spec}-L{config.model.num_hidden_layers}"
    name = key + (f"-run{repeat + 1}" if _REPEATS.value > 1 else "")
    live = jax.live_arrays()  # What earlier variants left behind, if anything.
    metrics_lib.log("[%s] before: %d live arrays, %.2f GiB", name, len(live),
                    sum(x.nbytes for x in live) / 2**30)
    del live
    try:
      result = run_variant(config, source, name, _OUT_DIR.value,
                           profile=(_PROFILE_STEPS.value > 0 and depth == profile_depth
                                    and spec in (_PROFILE_QUANTS.value or [spec])
                                    and repeat == 0),
                           source_state=start_state, executables=executables, key=key)
    except config_lib.ConfigError:
      raise  # A bad flag: nothing else would run either.
    except Exception as e:  # pylint: disable=broad-except  (e.g. out of memory: go on)
      # The message, and where it was raised (a bare assert has no message).
      where = "".join(traceback.format_exception(e)[-12:])
      metrics_lib.log("[%s] failed: %s: %s\n%s", name, type(e).__name__, str(e)[:2000],
                      where[-4000:])
      failures.append((name, e))
      continue
    result["variant"] = spec  # The --quants entry, by which results are grouped.
    result["repeat"] = repeat
    result["_full_flops_ratio"] = (scaling.flops_per_token(full, t.seq_len)
                                   / result["flops_per_token"])
    results.append(result)
    with open(os.path.join(_OUT_DIR.value, "results.jsonl"), "a") as f:
      f.write(json.dumps({k: v for k, v in result.items() if not k.startswith("_")}) + "\n")
  projections = profiling.project_to_depth(results, _FULL_DEPTH.value, _PEAK.value)
  curves = profiling.compare_losses([r for r in results if r["repeat"] == 0],
                                    _LOSS_WINDOW.value, _LOSS_TOLERANCE.value)
  table = markdown(results, projections, curves, failures)
  if _REPEATS.value > 1:  # Each variant's runs against the band of the first entry's runs.
    try:
      bands = profiling.loss_bands(results, _QUANTS.value[0], _LOSS_WINDOW.value,
                                   _LOSS_TOLERANCE.value)
      table += "\n" + profiling.format_bands(bands) + "\n"
    except ValueError as e:  # e.g. every run of the first entry failed
      metrics_lib.log("No band comparison: %s", e)
  with open(os.path.join(_OUT_DIR.value, "summary.md"), "w") as f:
    f.write(table)
  print(table, flush=True)
  if failures:  # The others' figures are written; the exit status says the run was not whole.
    raise SystemExit(f"{len(failures)} of {len(failures) + len(results)} variants failed: "
                     f"{', '.join(name for name, _ in failures)} (their tracebacks are above).")


if __name__ == "__main__":
  app.run(main)
