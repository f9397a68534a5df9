"""Training phases: start from the previous phase, batch-size ramps, per-phase evaluation.

Ling 2.0 trains in phases (ling2_spec.md section 5): pre-training at 4K, context extension to
32K, reasoning mid-training, then DFT fine-tuning; `configs/phases.py` holds the presets. Each
phase is its own run directory. A phase whose workdir has no checkpoint yet starts from
`config.train.init_from`, the previous phase's directory, in one of two modes
(`config.train.init_mode`):

- "params" (default): the weights and the expert biases only; the optimiser state and the step
  start fresh. A phase brings its own schedule (warmup from 0), learning rate and data, and the
  AdamW moments of another sequence length and mixture describe gradients this phase does not
  see; SFT in particular conventionally starts with a fresh optimiser. It also loads HF and
  converted (orbax) directories, e.g. a released base model.
- "full": the whole train state of a run directory (weights, expert biases, AdamW moments and
  step, so the schedule continues where it was): the phase continues the previous one exactly,
  only with new data, sequence length and settings. The phase still counts its own steps (its
  checkpoints and `num_steps` start at 0).

Once the phase has checkpoints of its own, resuming wins and `init_from` is not read again.
"""

import functools
import os
from typing import Any

import jax
import ml_collections

from ling_jax import checkpoint as checkpoint_lib
from ling_jax import config as config_lib
from ling_jax import data as data_lib
from ling_jax import metrics as metrics_lib
from ling_jax import moe
from ling_jax import train as train_lib

INIT_MODES = ("params", "full")


def validate_phase_config(config: Any) -> None:
  """Checks the phase fields of `config.train` (all optional); raises ConfigError."""
  t = config.train
  init_from = t.get("init_from")
  if init_from is not None:
    if not os.path.isdir(init_from):
      config_lib.fail("train.init_from", f"{init_from!r} is not a directory",
                      "point it at the previous phase's --workdir (or an HF / converted dir)")
    mode = t.get("init_mode", "params")
    if mode not in INIT_MODES:
      config_lib.fail("train.init_mode", f"unknown {mode!r}", f"use one of {INIT_MODES}")
    if mode == "full" and not _is_run_dir(init_from):
      config_lib.fail("train.init_mode", f"'full' restores a train state, but {init_from!r} "
                      "has no checkpoints/", "use init_mode='params', or point init_from at "
                      "a run directory of experiments.train")
  start = t.get("batch_size_ramp_start")
  if start is not None:
    if not isinstance(start, int) or start <= 0 or t.batch_size % start:
      config_lib.fail("train.batch_size_ramp_start", f"{start!r} must be a positive divisor "
                      f"of batch_size={t.batch_size}", "pick e.g. batch_size // 4")
    if start % t.grad_accum_steps:
      config_lib.fail("train.batch_size_ramp_start", f"{start} sequences do not split into "
                      f"{t.grad_accum_steps} micro-batches",
                      "make it a multiple of grad_accum_steps")
    steps = t.get("batch_size_ramp_steps")
    if not isinstance(steps, int) or steps < 0:
      config_lib.fail("train.batch_size_ramp_steps", f"must be an integer >= 0, got {steps!r}",
                      "set the number of steps over which the batch grows")


def _is_run_dir(path: str) -> bool:
  return os.path.isdir(os.path.join(path, "checkpoints"))


def base_batch_size(t: Any) -> int:
  """Returns the rows the data iterator yields per draw: the ramp's first size, or the batch."""
  return t.get("batch_size_ramp_start") or t.batch_size


def batch_size_at(t: Any, step: int) -> int:
  """Returns the global batch size (sequences) of optimiser step `step` (from 0).

  Without `batch_size_ramp_start`, `batch_size`. With it, the batch grows in multiples of the
  start size, linearly in steps, from the start to `batch_size` at `batch_size_ramp_steps`:
  start * (1 + floor((K - 1) * step / ramp_steps)), K = batch_size / start.
  """
  start = t.get("batch_size_ramp_start")
  if not start:
    return t.batch_size
  multiples = t.batch_size // start
  ramp_steps = t.get("batch_size_ramp_steps") or 0
  if ramp_steps <= 0 or step >= ramp_steps:
    return t.batch_size
  return start * min(multiples, 1 + (multiples - 1) * step // ramp_steps)


def make_train_batches(config: Any, num_shards: int) -> data_lib.RampedBatches:
  """Returns this process's train batches, drawn per step (see `batch_size_at`)."""
  t = config.train
  base = data_lib.make_sharded_train_iterator(
      config.data, seq_len=t.seq_len, global_batch_size=base_batch_size(t), seed=t.seed,
      num_shards=num_shards, process_index=jax.process_index(),
      process_count=jax.process_count())
  return data_lib.RampedBatches(base, base_rows=base_batch_size(t) // jax.process_count(),
                                rows_at=lambda s: batch_size_at(t, s) // jax.process_count())


def init_from_previous(config: Any, target: train_lib.TrainState, state_shardings: Any,
                       signature: dict[str, Any]) -> train_lib.TrainState:
  """Returns the first train state of a phase, built from `config.train.init_from`.

  `target` is the abstract (sharded) train state of this phase's model; the source must hold
  the same shapes (a phase changes data, lengths and RoPE scaling, not the architecture).
  """
  t = config.train
  source, mode = t.init_from, t.get("init_mode", "params")
  if _is_run_dir(source):
    try:
      with checkpoint_lib.Checkpointer(source, save_every=1, keep=1_000_000,
                                       model_signature=signature) as ckpt:
        restored = ckpt.restore_latest(target)
    except config_lib.ConfigError as e:
      config_lib.fail("train.init_from", f"{source} holds another model ({e})",
                      "start this phase from a run of the same architecture")
    if restored is None:
      config_lib.fail("train.init_from", f"{source} has no checkpoint yet",
                      "finish the previous phase first")
    step, state, _ = restored
    metrics_lib.log("Initialised from %s step %d (%s)", source, step,
                    "full train state" if mode == "full" else "params and expert biases")
    if mode == "full":
      return state
    params, moe_state = state.params, state.moe_state
  else:
    from ling_jax import hf  # pylint: disable=g-import-not-at-top  (hf imports the trainer)

    shardings = {"params": state_shardings.params, moe.STATE: state_shardings.moe_state}
    _, variables = hf.load_pretrained(source, param_dtype=config.model.param_dtype,
                                      shardings=shardings)
    params, moe_state = variables["params"], variables.get(moe.STATE, {})
    got = jax.tree.map(lambda x: tuple(x.shape), (params, moe_state))
    want = jax.tree.map(lambda x: tuple(x.shape), (target.params, target.moe_state))
    if got != want:
      config_lib.fail("train.init_from", f"{source} holds parameters of other shapes",
                      "start this phase from a checkpoint of the same architecture")
    metrics_lib.log("Initialised from %s (params and expert biases)", source)
  fresh = jax.jit(train_lib.init_state_fn(config.model, t), out_shardings=state_shardings)()
  return fresh.replace(params=params, moe_state=moe_state)


def evaluate_run(workdir: str, *, step: int | None = None, eval_batches: int | None = None,
                 quant: str | None = None) -> dict[str, Any]:
  """Returns the validation loss of a phase's checkpoint (newest, or `step`) on its own data.

  For chat data the loss covers assistant tokens only (the batches carry `loss_mask`); for a
  mixture, each source's loss is reported too (`val_loss/<name>`). Keys: step, val_loss,
  val_bits_per_token, val_tokens, assistant_only, quant, and val_mtp_loss for models with MTP.
  `quant` evaluates the weights in another precision than the run trained in ("none": an
  FP8-trained checkpoint in the model dtype; "fp8_blockwise": a bf16 one through FP8 linears,
  Ling's full recipe), so that the cost of FP8's forward pass and that of its training can be
  told apart; the checkpoint is the same either way.
  """
  from ling_jax import sharding  # pylint: disable=g-import-not-at-top
  from ling_jax import trainer  # pylint: disable=g-import-not-at-top

  config = trainer._with_mesh(trainer.load_config(workdir))  # pylint: disable=protected-access
  if eval_batches is not None:
    config.train.eval_batches = eval_batches
  if quant is not None and quant != config.model.quant:
    config.model.quant = quant
    config.model.fp8_recipe = "full"  # The run's ablation, if any, was of its training.
  trainer.validate_config(config)
  mesh = sharding.make_mesh(config.mesh)
  target = trainer.abstract_state(config, mesh)
  with checkpoint_lib.Checkpointer(workdir, save_every=1, keep=1_000_000,
                                   model_signature=trainer.model_signature(target)) as ckpt:
    if step is None:
      restored = ckpt.restore_latest(target)
      if restored is None:
        raise config_lib.ConfigError(f"--workdir: {workdir} holds no checkpoint. Fix: train "
                                     "the phase first.")
      step, state, _ = restored
    else:
      if step not in ckpt.all_steps():
        raise config_lib.ConfigError(f"--step: {workdir} has no checkpoint {step} (it has "
                                     f"{ckpt.all_steps()}). Fix: pick one of those.")
      state, _ = ckpt.restore(step, target)
  shardings = jax.tree.map(lambda x: x.sharding, target)
  batch_sharding, replicated = sharding.batch_sharding(mesh), sharding.replicated(mesh)
  eval_fn = jax.jit(functools.partial(train_lib.eval_step, m=config.model, t=config.train),
                    in_shardings=(shardings.params, shardings.moe_state, batch_sharding),
                    out_shardings=replicated)
  result: dict[str, Any] = {"step": step, "quant": config.model.quant,
                            "assistant_only": data_lib.has_loss_mask(config.data)}
  with jax.set_mesh(mesh):
    result.update(trainer._evaluate(  # pylint: disable=protected-access
        eval_fn, state.params, state.moe_state, trainer._eval_batches(config, mesh)))
    if config.data.get("mixture"):
      for name, (source_cfg, _) in data_lib.mixture_sources(config.data).items():
        one = ml_collections.ConfigDict(config.to_dict())
        one.data = source_cfg
        part = trainer._evaluate(  # pylint: disable=protected-access
            eval_fn, state.params, state.moe_state, trainer._eval_batches(one, mesh))
        result[f"val_loss/{name}"] = part["val_loss"]
  return result
