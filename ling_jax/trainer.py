"""The pre-training loop: data, resumable checkpoints, evaluation, metrics and NaN guard."""

import contextlib
import functools
import json
import os
import time
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
import numpy as np
from flax import traverse_util

from ling_jax import checkpoint as checkpoint_lib
from ling_jax import config as config_lib
from ling_jax import data as data_lib
from ling_jax import layers
from ling_jax import metrics as metrics_lib
from ling_jax import phases
from ling_jax import scaling
from ling_jax import sharding
from ling_jax import tokenizer as tokenizer_lib
from ling_jax import train as train_lib


class NonFiniteLossError(RuntimeError):
  """Raised when too many consecutive steps had a non-finite loss or gradient."""


def validate_config(config: Any) -> None:
  """Checks the whole experiment config; raises ValueError naming the field and the fix."""
  config_lib.validate_model_config(config.model)
  t = config.train
  for field in ("num_steps", "batch_size", "seq_len", "grad_accum_steps", "log_every",
                "eval_every", "checkpoint_every", "keep_checkpoints"):
    if not isinstance(t[field], int) or t[field] <= 0:
      config_lib.fail(f"train.{field}", f"must be a positive integer, got {t[field]!r}",
                      "set it > 0")
  prefetch = t.get("prefetch_batches", 2)
  if not isinstance(prefetch, int) or prefetch < 0:
    config_lib.fail("train.prefetch_batches", f"must be an integer >= 0, got {prefetch!r}",
                    "use 0 for synchronous input or e.g. 2 to build two steps ahead")
  chunk_len = t.get("loss_chunk_len", 0)
  if not isinstance(chunk_len, int) or chunk_len < 0 or (chunk_len and t.seq_len % chunk_len):
    config_lib.fail("train.loss_chunk_len", f"{chunk_len!r} does not divide seq_len={t.seq_len} "
                    "into whole chunks", "use 0 (logits made whole) or a divisor of seq_len")
  if t.batch_size % t.grad_accum_steps:
    config_lib.fail("train.batch_size", f"{t.batch_size} sequences do not split into "
          f"{t.grad_accum_steps} micro-batches", "make batch_size a multiple of grad_accum_steps")
  sharding.validate_mesh_config(_with_mesh(config), jax.device_count())
  num_shards = data_shards(config)
  if t.batch_size % num_shards or num_shards % jax.process_count():
    config_lib.fail("data.num_shards", f"{num_shards} data shards must divide "
                    f"train.batch_size={t.batch_size} and be a multiple of the "
                    f"{jax.process_count()} processes", "pick a num_shards that does both")
  if t.warmup_steps < 0 or t.learning_rate <= 0:
    config_lib.fail("train.learning_rate", "needs learning_rate > 0 and warmup_steps >= 0",
          "fix the schedule fields")
  if t.schedule not in ("wsm", "cosine", "wsd"):
    config_lib.fail("train.schedule", f"unknown {t.schedule!r}", "use 'wsm', 'cosine' or 'wsd'")
  if t.get("moment_dtype", "float32") not in ("float32", "bfloat16"):
    config_lib.fail("train.moment_dtype", f"unknown {t.moment_dtype!r}",
                    "use 'float32' or 'bfloat16'")
  if t.seq_len > config.model.max_position_embeddings:
    config_lib.fail("train.seq_len", f"{t.seq_len} exceeds max_position_embeddings="
          f"{config.model.max_position_embeddings}", "shorten seq_len or raise the model's limit")
  data_lib.validate_data_config(config.data)
  layers.validate_rope_scaling(config.model)
  phases.validate_phase_config(config)
  base_rows = phases.base_batch_size(t)
  if base_rows != t.batch_size:  # A batch-size ramp: every step size must shard like the full.
    shards = sharding.num_batch_shards(sharding.mesh_shape(_with_mesh(config).mesh,
                                                           jax.device_count()))
    if base_rows % (num_shards * shards) or base_rows % t.grad_accum_steps:
      config_lib.fail("train.batch_size_ramp_start", f"{base_rows} sequences do not split "
                      f"over the {num_shards} data shards, the {shards} batch shards of the "
                      f"mesh and the {t.grad_accum_steps} micro-batches",
                      "make it a multiple of all three")


def _with_mesh(config: Any) -> Any:
  """Returns `config`, given the default `mesh` if it has none (configs saved before meshes)."""
  if "mesh" not in config:
    config = ml_collections.ConfigDict(config.to_dict())
    config.mesh = sharding.default_mesh_config()
  return config


def data_shards(config: Any) -> int:
  """Returns the number of data shards: `config.data.num_shards`, else one per process."""
  return config.data.get("num_shards") or jax.process_count()


def _global_data_state(train_iter: Any) -> dict[str, Any]:
  """Returns the data state of every shard, collected from every process."""
  state = train_iter.get_state()
  if jax.process_count() == 1:
    return state
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

  encoded = np.frombuffer(json.dumps(state).encode(), np.uint8)
  lengths = multihost_utils.process_allgather(np.int32(encoded.size))
  padded = np.zeros(int(np.max(lengths)), np.uint8)
  padded[:encoded.size] = encoded
  gathered = multihost_utils.process_allgather(padded)
  shards = {}
  for row, length in zip(gathered, lengths):
    shards.update(json.loads(bytes(row[:int(length)]).decode())["shards"])
  return {"shards": shards}


def _eval_batches(config: Any, mesh: Any) -> list[dict[str, jax.Array]]:
  """Returns the validation batches as global arrays; every process gets the same count."""
  t = config.train
  local = data_lib.make_sharded_eval_batches(
      config.data, seq_len=t.seq_len, global_batch_size=t.batch_size,
      max_batches=t.eval_batches, num_shards=data_shards(config),
      process_index=jax.process_index(), process_count=jax.process_count())
  count = len(local)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    count = int(np.max(multihost_utils.process_allgather(np.int32(count))))
  if not count:
    config_lib.fail("data.validation_fraction", "the validation split holds no document",
                    "raise validation_fraction or use more files")
  local = data_lib.pad_batches(local, count, rows=t.batch_size // jax.process_count(),
                               seq_len=t.seq_len, features=data_lib.batch_features(config.data))
  return [sharding.global_batch(batch, mesh) for batch in local]


def model_signature(state: train_lib.TrainState) -> dict[str, Any]:
  """Returns what must match between a checkpoint and the model that resumes from it."""
  variables = {"params": state.params, "moe_state": state.moe_state}
  return {"/".join(k): list(v.shape)
          for k, v in traverse_util.flatten_dict(variables).items()}


def _evaluate(eval_fn, params: Any, moe_state: Any, batches: list[dict]) -> dict[str, float]:
  totals: dict[str, float] = {}
  for batch in batches:
    for k, v in jax.device_get(eval_fn(params, moe_state, batch)).items():
      totals[k] = totals.get(k, 0.0) + float(v)
  result = {"val_loss": totals["ce_sum"] / max(totals["tokens"], 1.0)}
  # With the byte tokenizer a token is a byte, so bits per token are bits per byte.
  result["val_bits_per_token"] = train_lib.bits(result["val_loss"])
  result["val_tokens"] = totals["tokens"]  # Tokens scored (assistant tokens only for SFT).
  if "mtp_ce_sum" in totals:
    result["val_mtp_loss"] = totals["mtp_ce_sum"] / max(totals["mtp_tokens"], 1.0)
  return result


def enable_compilation_cache(path: str | None) -> None:
  """Keeps compiled programs in `path` across runs (a resumed job skips recompiling)."""
  if path and jax.config.jax_compilation_cache_dir is None:
    jax.config.update("jax_compilation_cache_dir", os.path.expanduser(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


def train_and_evaluate(config: Any, workdir: str) -> dict[str, float]:
  """Trains (or resumes) the configured model in `workdir`; returns the final metrics."""
  validate_config(config)
  enable_compilation_cache(config.train.get("compilation_cache_dir"))
  m, t = config.model, config.train
  tokenizer = tokenizer_lib.make_tokenizer(config.data)
  if tokenizer.vocab_size > m.vocab_size:
    config_lib.fail("model.vocab_size",
                    f"{m.vocab_size} is smaller than the tokenizer's {tokenizer.vocab_size} ids",
                    f"set --config.model.vocab_size={tokenizer.vocab_size} or larger")
  config = _with_mesh(config)
  mesh = sharding.make_mesh(config.mesh)
  # Data first: a bad source fails here, before the workdir is touched.
  # One draw per step of the ramped batch size (phases.batch_size_at; fixed without a ramp).
  train_iter = phases.make_train_batches(config, data_shards(config))
  eval_batches = _eval_batches(config, mesh)
  os.makedirs(workdir, exist_ok=True)
  target = abstract_state(config, mesh)
  state_shardings = jax.tree.map(lambda x: x.sharding, target)
  ckpt = checkpoint_lib.Checkpointer(workdir, save_every=t.checkpoint_every,
                                     keep=t.keep_checkpoints,
                                     model_signature=model_signature(target))
  restored = ckpt.restore_latest(target)  # Raises for another model's workdir.
  if restored is None and t.get("init_from"):  # A phase starting from the previous one.
    with jax.set_mesh(mesh):
      step, state = 0, phases.init_from_previous(config, target, state_shardings,
                                                 model_signature(target))
  elif restored is None:
    with jax.set_mesh(mesh):
      step, state = 0, jax.jit(train_lib.init_state_fn(m, t), out_shardings=state_shardings)()
    metrics_lib.log("Starting from scratch in %s", workdir)
  else:
    step, state, data_state = restored
    train_iter.set_state(data_state)
    metrics_lib.log("Resumed from step %d in %s", step, workdir)
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config.to_json_best_effort(indent=2))

  batch_sharding, replicated = sharding.batch_sharding(mesh), sharding.replicated(mesh)
  # The next batches are built, and copied to the devices, on a thread while steps run.
  batches = data_lib.Prefetcher(train_iter, first_step=step, depth=t.get("prefetch_batches", 2),
                                transform=lambda b: sharding.global_batch(b, mesh))
  step_fn = jax.jit(functools.partial(train_lib.train_step, m=m, t=t),
                    in_shardings=(state_shardings, batch_sharding),
                    out_shardings=(state_shardings, replicated), donate_argnums=0)
  eval_fn = jax.jit(functools.partial(train_lib.eval_step, m=m, t=t),
                    in_shardings=(state_shardings.params, state_shardings.moe_state,
                                  batch_sharding), out_shardings=replicated)
  writer = metrics_lib.MetricWriter(workdir, enabled=jax.process_index() == 0)
  flops_per_step = scaling.flops_per_token(m, t.seq_len) * t.batch_size * t.seq_len
  peak = scaling.peak_flops_per_device(jax.devices()[0].device_kind, t.peak_tflops)
  metrics_lib.log("Model: %s; %.3g FLOPs/token; peak/device %s; mesh %s over %d processes",
                  config.variant, flops_per_step / (t.batch_size * t.seq_len),
                  f"{peak / 1e12:.0f} TFLOP/s" if peak else "unknown (MFU n/a; set "
                  "--config.train.peak_tflops)",
                  " x ".join(f"{k}={v}" for k, v in mesh.shape.items()), jax.process_count())

  def save(force: bool = False) -> None:
    if force or ckpt.is_due(step):  # Every process takes part in gathering the data state.
      ckpt.save(step, state, data_state=_global_data_state(batches), force=force)

  final: dict[str, float] = {}
  first_step, last_time, last_step, pending = step, time.time(), step, None
  with (checkpoint_lib.install_preemption_handler() as preempted, jax.set_mesh(mesh),
        contextlib.closing(batches)):
    while step < t.num_steps:
      batch = batches.next_batch(step)
      state, step_metrics = step_fn(state, batch)
      step += 1
      # Check the previous step's streak: reading it does not wait on the step just queued.
      if pending is not None and int(pending["nan_streak"]) >= t.max_consecutive_nan_steps:
        raise NonFiniteLossError(
            f"{int(pending['nan_streak'])} consecutive steps up to step {step - 1} had a "
            "non-finite loss or gradient; params were left unchanged by them. Lower "
            "config.train.learning_rate or check the data; the last good checkpoint is in "
            f"{ckpt.directory}.")
      pending = step_metrics
      if step == first_step + 1:  # Keep compilation out of the throughput figures.
        jax.block_until_ready(step_metrics)
        metrics_lib.log("First step (compilation included) took %.1f s", time.time() - last_time)
        last_time, last_step = time.time(), step
      if step % t.log_every == 0 or step == t.num_steps:
        scalars = {k: float(v) for k, v in jax.device_get(step_metrics).items() if v.ndim == 0}
        now = time.time()
        rows = phases.batch_size_at(t, step - 1)  # Below batch_size during a ramp.
        if t.get("batch_size_ramp_start"):
          scalars["batch_size"] = float(rows)
        if step > last_step:  # No throughput for the first step: its time was compilation.
          sec_per_step = (now - last_time) / (step - last_step)
          scalars["tokens_per_sec"] = rows * t.seq_len / sec_per_step
          scalars["mfu"] = (flops_per_step * rows / t.batch_size / sec_per_step
                            / (peak * jax.device_count()) if peak else None)
          scalars["eta_sec"] = sec_per_step * (t.num_steps - step)
        last_time, last_step = now, step
        scalars["nan_skips"] = float(state.nan_skips)
        metrics_lib.log("%s", metrics_lib.progress_line(step, t.num_steps, scalars))
        writer.write(step, scalars)
        final.update(scalars)
      if step % t.eval_every == 0 or step == t.num_steps:
        result = _evaluate(eval_fn, state.params, state.moe_state, eval_batches)
        metrics_lib.log("step %d | val loss %.4f | val bits/token %.4f", step,
                        result["val_loss"], result["val_bits_per_token"])
        writer.write(step, result)
        final.update(result)
        last_time = time.time()  # Keep evaluation out of the throughput figures.
      save()
      if preempted():
        save(force=True)
        ckpt.wait()
        metrics_lib.log("Stopped by a signal at step %d; checkpoint saved. Run the same "
                        "command to resume.", step)
        break
    else:
      save(force=True)
  ckpt.close()
  writer.close()
  if step == first_step and step >= t.num_steps:  # A finished run started again.
    metrics_lib.log("Nothing to train: %s is already at step %d of %d", workdir, step,
                    t.num_steps)
    with jax.set_mesh(mesh):
      final.update(_evaluate(eval_fn, state.params, state.moe_state, eval_batches))
  final["step"] = step
  final["nan_skips"] = float(np.asarray(state.nan_skips))
  return final


def abstract_state(config: Any, mesh: Any = None) -> train_lib.TrainState:
  """Returns the ShapeDtypeStructs of the train state of `config`, for restoring.

  With a mesh, each carries its sharding, so that a checkpoint restores straight into that
  layout, whatever the mesh it was saved from.
  """
  shapes = jax.eval_shape(train_lib.init_state_fn(config.model, config.train))
  if mesh is None:
    return shapes
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      shapes, sharding.tree_shardings(shapes, mesh))


def evaluate_params(config: Any, params: Any, moe_state: Any) -> dict[str, float]:
  """Returns the validation loss (nats and bits per token) of params on the config's data."""
  return make_evaluator(config)(params, moe_state)


def make_evaluator(config: Any) -> Callable[[Any, Any], dict[str, float]]:
  """Returns `evaluate_params` of `config` as a function of (params, moe_state).

  The validation batches are read, and the evaluation step jitted, once: evaluating several
  sets of params (e.g. the checkpoints a merge averages) traces and compiles it once, not once
  per call.
  """
  t = config.train
  batches = data_lib.make_eval_batches(config.data, seq_len=t.seq_len, batch_size=t.batch_size,
                                       max_batches=t.eval_batches)
  eval_fn = jax.jit(functools.partial(train_lib.eval_step, m=config.model, t=t))
  return lambda params, moe_state: _evaluate(eval_fn, params, moe_state, batches)


def load_config(workdir: str) -> Any:
  """Returns the config a run in `workdir` was started with (saved as `config.json`)."""
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    raise config_lib.ConfigError(f"--workdir: {path} does not exist. Fix: point --workdir at a "
                                 "directory made by experiments.train, or pass --config.")
  with open(path) as f:
    return ml_collections.ConfigDict(json.load(f))
