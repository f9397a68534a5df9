"""On-policy RL post-training (Evo-CoT): rollouts, rewards, LPO/GRPO/GSPO updates, checkpoints.

Key: B rollouts (N prompts x G samples, groups contiguous), P prompt positions, R response
positions, L = P + R - 1 model positions, A accumulation steps.

One RL step:
1. draws `rl.prompts_per_step` train-split tasks (`ling_jax/rl_tasks.py`) and renders each as a
   chat prompt in the `rl.mode` DFT mode (the SFT system prompt of that mode);
2. samples G responses per prompt with the KV-cache decoder (`ling_jax/generate.py`) at
   `rl.temperature`; a response ends at the chat format's <|role_end|> (kept, so the policy
   learns to stop) or after `rl.max_new_tokens`;
3. scores them (Evo-CoT shaping or a GAR round robin) and normalises the rewards per group;
4. records the log-probs of the sampling policy (pi_old) and of the frozen reference (the
   starting policy), then takes `rl.ppo_epochs` x `rl.num_minibatches` optimiser steps on
   -J + beta * KL (`ling_jax/rl_objectives.py`), each over `train.grad_accum_steps` micro-batches.
Checkpoints hold the train state; the task stream and sampling keys are functions of the step,
so a resumed run continues exactly where it stopped.
"""

import functools
import hashlib
import json
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import traverse_util

from ling_jax import checkpoint as checkpoint_lib
from ling_jax import config as config_lib
from ling_jax import generate as generate_lib
from ling_jax import metrics as metrics_lib
from ling_jax import model as model_lib
from ling_jax import moe
from ling_jax import rl_objectives as obj
from ling_jax import rl_tasks
from ling_jax import sandbox
from ling_jax import sft
from ling_jax import tokenizer as tokenizer_lib
from ling_jax import train as train_lib

REWARDS = ("evo_cot", "gar")


def validate_config(config: Any) -> None:
  """Checks config.rl and the loop fields of config.train; raises ConfigError naming the field."""
  r, t = config.rl, config.train
  if r.objective not in obj.OBJECTIVES:
    config_lib.fail("rl.objective", f"unknown {r.objective!r}", f"use one of {obj.OBJECTIVES}")
  if r.reward not in REWARDS:
    config_lib.fail("rl.reward", f"unknown {r.reward!r}", f"use one of {REWARDS}")
  if r.reward == "gar" and r.judge not in rl_tasks.JUDGES:
    config_lib.fail("rl.judge", f"unknown {r.judge!r}", f"use one of {sorted(rl_tasks.JUDGES)}")
  if r.reward == "gar" and r.judge == "model" and not r.get("judge_path"):
    config_lib.fail("rl.judge_path", "the model judge needs a checkpoint",
                    "point it at a run directory or an HF/orbax model directory")
  if not isinstance(r.group_size, int) or r.group_size < 2:
    config_lib.fail("rl.group_size", f"must be an integer >= 2, got {r.group_size!r}",
                    "sample at least 2 responses per prompt (advantages compare within a group)")
  for field in ("prompts_per_step", "max_new_tokens", "ppo_epochs", "num_minibatches",
                "eval_every", "eval_prompts"):
    if not isinstance(r[field], int) or r[field] <= 0:
      config_lib.fail(f"rl.{field}", f"must be a positive integer, got {r[field]!r}", "set it > 0")
  for field in ("num_steps", "grad_accum_steps", "log_every", "checkpoint_every",
                "keep_checkpoints"):
    if not isinstance(t[field], int) or t[field] <= 0:
      config_lib.fail(f"train.{field}", f"must be a positive integer, got {t[field]!r}",
                      "set it > 0")
  if not isinstance(r.get("eval_samples", 0), int) or r.get("eval_samples", 0) < 0:
    config_lib.fail("rl.eval_samples", f"must be an integer >= 0, got {r.eval_samples!r}",
                    "use 0 for greedy held-out accuracy only")
  rollouts = r.prompts_per_step * r.group_size
  if rollouts % (r.num_minibatches * t.grad_accum_steps):
    config_lib.fail("rl.num_minibatches", f"{rollouts} rollouts (prompts_per_step x group_size) "
                    f"do not split into {r.num_minibatches} minibatches of "
                    f"{t.grad_accum_steps} micro-batches",
                    "make prompts_per_step * group_size a multiple of num_minibatches * "
                    "train.grad_accum_steps")
  clip = clip_eps(r)
  if not 0 < clip < 1:
    config_lib.fail("rl.clip_eps", f"must be in (0, 1), got {clip}", "use e.g. 0.03 for LPO")
  if r.beta_kl < 0:
    config_lib.fail("rl.beta_kl", f"must be >= 0, got {r.beta_kl}", "use 0 to turn the KL off")
  if r.temperature <= 0:
    config_lib.fail("rl.temperature", f"must be > 0, got {r.temperature}",
                    "sample with e.g. 1.0 (greedy rollouts of a group would be identical)")
  if r.mode not in sft.MODES:
    config_lib.fail("rl.mode", f"unknown {r.mode!r}", f"use one of {sft.MODES}")
  if t.learning_rate <= 0 or t.warmup_steps < 0:
    config_lib.fail("train.learning_rate", "needs learning_rate > 0 and warmup_steps >= 0",
                    "fix the schedule fields")
  if t.get("init_from") is not None and not os.path.isdir(t.init_from):
    config_lib.fail("train.init_from", f"{t.init_from!r} is not a directory",
                    "point it at the SFT run's --workdir (or an HF / converted directory)")
  rl_tasks.make_tasks(r.task_family, "train", 1, 0, heldout_fraction=r.heldout_fraction,
                      max_operand=r.max_operand, ops=r.ops)
  sandbox.Limits(**r.sandbox.to_dict()).validate()
  config_lib.validate_model_config(config.model)


def clip_eps(r: Any) -> float:
  """Returns `rl.clip_eps`, or the objective's default when it is None."""
  return obj.DEFAULT_CLIP[r.objective] if r.get("clip_eps") is None else float(r.clip_eps)


def prompt_ids(task: rl_tasks.Task, tokenizer: Any, data_cfg: Any, mode: str) -> list[int]:
  """Returns [bos] + the chat prompt of `task` in DFT `mode`, ending with the assistant header."""
  messages = sft.with_mode({"messages": [{"role": "user", "content": task.prompt}],
                            "mode": mode}, data_cfg.sft_system_prompts)
  text = tokenizer_lib.render_chat(messages, add_generation_prompt=True)
  return [tokenizer.bos_id, *tokenizer.encode(text).tolist()]


def cut_response(tokens: list[int], tokenizer: Any) -> tuple[list[int], str, bool]:
  """Returns (tokens up to and with the first <|role_end|>, text before it, whether it ended)."""
  for t in range(len(tokens)):
    text = tokenizer.decode(tokens[:t + 1])
    if tokenizer_lib.ROLE_END in text:
      return tokens[:t + 1], text[:text.index(tokenizer_lib.ROLE_END)], True
  return tokens, tokenizer.decode(tokens), False


def rollout_batch(prompts: list[list[int]], responses: list[list[int]], response_len: int,
                  tokenizer: Any) -> dict[str, np.ndarray]:
  """Returns the model inputs of prompt + response rows and where the responses are.

  Rows are the prompt left-padded (as the sampler saw it, to a multiple of 32 positions) and the
  response right-padded to `response_len`. `mask` marks the targets that are response tokens.
  """
  ids_BP, _, segment_ids_BP = generate_lib.left_pad(prompts)
  # More left padding up to a multiple of 32 positions: prompts of other lengths then share
  # one compiled update (padding is masked, so nothing else changes).
  extra = -ids_BP.shape[1] % 32
  ids_BP, segment_ids_BP = (np.pad(x, ((0, 0), (extra, 0))) for x in (ids_BP, segment_ids_BP))
  batch, prompt_len = ids_BP.shape
  ids_BS = np.zeros((batch, prompt_len + response_len), np.int32)
  segment_ids_BS = np.zeros_like(ids_BS)
  sentences_BS = np.zeros_like(ids_BS)
  ids_BS[:, :prompt_len], segment_ids_BS[:, :prompt_len] = ids_BP, segment_ids_BP
  for b, response in enumerate(responses):
    end = prompt_len + len(response)
    ids_BS[b, prompt_len:end] = response
    segment_ids_BS[b, prompt_len:end] = 1
    sentences_BS[b, prompt_len:end] = obj.sentence_ids(response, tokenizer.decode)
  positions_BS = np.maximum(np.cumsum(segment_ids_BS, axis=1) - 1, 0).astype(np.int32)
  mask_BS = np.zeros_like(ids_BS)
  mask_BS[:, prompt_len:] = segment_ids_BS[:, prompt_len:]
  return {"inputs": ids_BS[:, :-1], "targets": ids_BS[:, 1:],
          "positions": positions_BS[:, :-1], "segment_ids": segment_ids_BS[:, :-1],
          "mask": mask_BS[:, 1:], "sentence_ids": sentences_BS[:, 1:]}


def response_log_probs(params: Any, moe_state: Any, batch: dict, m: Any
                       ) -> tuple[jax.Array, jax.Array]:
  """Returns log pi(target) and the policy entropy at every position [B, L]."""
  out, _ = model_lib.apply(m, {"params": params, moe.STATE: moe_state}, batch["inputs"],
                           batch["positions"], batch["segment_ids"])
  return obj.token_log_probs(out.logits_BLV, batch["targets"])


def rl_loss(params: Any, moe_state: Any, batch: dict, norms: jax.Array, *, m: Any, r: Any,
            clip: float) -> tuple[jax.Array, dict]:
  """Returns -J + beta * KL of a micro-batch (normalised by the whole minibatch) and metrics."""
  logp_BL, entropy_BL = response_log_probs(params, moe_state, batch, m)
  mask_BL = batch["mask"].astype(jnp.float32)
  value, metrics = obj.policy_objective(
      r.objective, logp_BL, batch["old_logp"], batch["advantages"], mask_BL,
      batch["sentence_ids"], clip, num_tokens=norms[0], num_responses=norms[1])
  kl = jnp.sum(obj.kl_k3(logp_BL, batch["ref_logp"]) * mask_BL) / norms[0]
  loss = -value + r.beta_kl * kl
  metrics.update(objective=value, kl=kl, entropy=jnp.sum(entropy_BL * mask_BL) / norms[0])
  return loss, metrics


def update_step(state: train_lib.TrainState, batch: dict, *, m: Any, r: Any, t: Any,
                clip: float) -> tuple[train_lib.TrainState, dict]:
  """Returns the state after one optimiser step on a minibatch of rollouts, and its metrics.

  Gradients of `train.grad_accum_steps` micro-batches are summed; a step with a non-finite loss
  or gradient leaves the state unchanged (counted in nan_skips), like pre-training.
  """
  mask_BL = batch["mask"].astype(jnp.float32)
  norms = jnp.stack([jnp.maximum(mask_BL.sum(), 1.0), jnp.float32(mask_BL.shape[0])])
  num_micro = t.grad_accum_steps
  micro = jax.tree.map(lambda x: x.reshape(num_micro, x.shape[0] // num_micro, *x.shape[1:]),
                       batch)
  grad_fn = jax.value_and_grad(functools.partial(rl_loss, m=m, r=r, clip=clip), has_aux=True)

  def micro_step(carry, micro_batch):
    (loss, aux), grads = grad_fn(state.params, state.moe_state, micro_batch, norms)
    return jax.tree.map(jnp.add, carry, (loss, aux, grads)), None

  shapes = jax.eval_shape(lambda: grad_fn(state.params, state.moe_state,
                                          jax.tree.map(lambda x: x[0], micro), norms))
  (_, aux_shapes), grad_shapes = shapes
  init = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype),
                      (jax.ShapeDtypeStruct((), jnp.float32), aux_shapes, grad_shapes))
  (loss, aux, grads), _ = jax.lax.scan(micro_step, init, micro)
  grad_norm = optax.global_norm(grads)
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  updates, opt_state = train_lib.make_optimizer(t).update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
  new_state = state.replace(
      step=state.step + 1, params=keep(params, state.params),
      opt_state=keep(opt_state, state.opt_state),
      nan_skips=state.nan_skips + (~finite).astype(jnp.int32),
      nan_streak=jnp.where(finite, 0, state.nan_streak + 1))
  return new_state, {"loss": loss, "grad_norm": grad_norm, "lr": train_lib.make_schedule(t)(
      state.step), **aux}


@functools.cache
def _config(config_json: str) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(json.loads(config_json))


# Module-level jits keyed on the configs' JSON: runs in one process share their compilations.
@functools.partial(jax.jit, static_argnames=("m_json",))
def _log_probs(params: Any, moe_state: Any, batch: dict, *, m_json: str) -> jax.Array:
  return response_log_probs(params, moe_state, batch, _config(m_json))[0]


@functools.partial(jax.jit, static_argnames=("m_json", "r_json", "t_json", "clip"),
                   donate_argnums=0)
def _update(state: train_lib.TrainState, batch: dict, *, m_json: str, r_json: str, t_json: str,
            clip: float) -> tuple[train_lib.TrainState, dict]:
  return update_step(state, batch, m=_config(m_json), r=_config(r_json), t=_config(t_json),
                     clip=clip)


def make_step_fns(m: Any, r: Any, t: Any) -> tuple[Any, Any]:
  """Returns the jitted (log_probs(params, moe_state, batch), update(state, batch)) of a run."""
  m_json = m.to_json_best_effort()
  logp_fn = functools.partial(_log_probs, m_json=m_json)
  step_fn = functools.partial(_update, m_json=m_json,
                              r_json=json.dumps({k: r[k] for k in ("objective", "beta_kl")}),
                              t_json=_optimizer_json(t), clip=clip_eps(r))
  return logp_fn, step_fn


def _optimizer_json(t: Any) -> str:
  """Returns the fields of config.train the update reads (so e.g. num_steps does not recompile)."""
  fields = ["learning_rate", "warmup_steps", "schedule", "min_lr_ratio", "b1", "b2", "eps",
            "weight_decay", "grad_clip_norm", "grad_accum_steps"]
  values = {k: t[k] for k in fields + ["decay_fraction"]}
  # Only the decaying schedules depend on the run length (WSM ignores it).
  values["num_steps"] = t.num_steps if t.schedule != "wsm" else 0
  return json.dumps(values)


@functools.partial(jax.jit, static_argnames=("t_json",))
def _init_state(params: Any, moe_state: Any, *, t_json: str) -> train_lib.TrainState:
  return init_state(jax.tree.map(jnp.copy, params), jax.tree.map(jnp.copy, moe_state),
                    _config(t_json))


def init_state(params: Any, moe_state: Any, t: Any) -> train_lib.TrainState:
  """Returns the RL train state of starting weights: a fresh optimiser, step 0."""
  return train_lib.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                              opt_state=train_lib.make_optimizer(t).init(params),
                              moe_state=moe_state, nan_skips=jnp.zeros((), jnp.int32),
                              nan_streak=jnp.zeros((), jnp.int32))


def starting_policy(config: Any) -> tuple[Any, dict]:
  """Returns (model config, variables) of the starting (= reference) policy.

  `train.init_from` (the SFT run, or an HF / converted directory) wins; without it the model of
  `config.model` is initialised from `train.seed` (tests and smoke runs).
  """
  from ling_jax import hf  # pylint: disable=g-import-not-at-top  (hf imports the trainer)

  t = config.train
  if t.get("init_from"):
    m, variables = hf.load_pretrained(t.init_from, dtype=config.model.dtype,
                                      param_dtype="float32")
    return m, variables
  m = config.model
  config_lib.validate_model_config(m)
  return m, _init_variables(t.seed, m_json=m.to_json_best_effort())


@functools.partial(jax.jit, static_argnames=("m_json",))
def _init_variables(seed: int, *, m_json: str) -> dict:
  return model_lib.init_variables(_config(m_json), jax.random.key(seed))


def _task_seed(seed: int, step: int, what: str) -> int:
  return int.from_bytes(hashlib.sha256(f"{seed}:{step}:{what}".encode()).digest()[:4], "big")


class Runner:
  """Samples and scores rollouts of one policy (also used for held-out evaluation)."""

  def __init__(self, config: Any, m: Any, tokenizer: Any):
    self.config, self.m, self.tokenizer = config, m, tokenizer
    r = config.rl
    self.limits = sandbox.Limits(**r.sandbox.to_dict())
    # A tokenizer with <|role_end|> as one special token stops on it (and it is put back into
    # the response, so the policy learns to stop); the byte tokenizer spells it out, and
    # `cut_response` finds it in the text.
    role_end = tokenizer.encode(tokenizer_lib.ROLE_END)
    self.stop_id = int(role_end[0]) if len(role_end) == 1 else None
    self.stop_tokens = (tokenizer.eos_id,) if self.stop_id is None else (self.stop_id,)
    self.judge = None
    if r.reward == "gar":
      if r.judge == "rule":
        self.judge = rl_tasks.RuleJudge(tuple(r.get("judge_keywords") or ()))
      else:
        self.judge = rl_tasks.load_model_judge(r.judge_path)

  def tasks(self, split: str, count: int, seed: int) -> list[rl_tasks.Task]:
    r = self.config.rl
    return rl_tasks.make_tasks(r.task_family, split, count, seed,
                               heldout_fraction=r.heldout_fraction, max_operand=r.max_operand,
                               ops=r.ops)

  def sample(self, variables: dict, tasks: list[rl_tasks.Task], group: int,
             sampling: generate_lib.Sampling, rng: jax.Array) -> dict[str, Any]:
    """Returns prompts, responses (token lists and texts) and whether each ended, G per task."""
    r = self.config.rl
    prompts = [prompt_ids(task, self.tokenizer, self.config.data, r.mode)
               for task in tasks for _ in range(group)]
    result = generate_lib.generate(self.m, variables, prompts, max_new_tokens=r.max_new_tokens,
                                   sampling=sampling, stop_tokens=self.stop_tokens, rng=rng)
    responses, texts, ended = [], [], []
    for tokens, reason in zip(result.tokens, result.finish_reasons):
      if reason == "stop" and self.stop_id is not None:
        tokens = tokens + [self.stop_id]
      cut, text, stopped = cut_response(tokens, self.tokenizer)
      responses.append(cut)
      texts.append(text)
      ended.append(stopped or reason == "stop")
    return {"prompts": prompts, "responses": responses, "texts": texts, "ended": ended}

  def score(self, tasks: list[rl_tasks.Task], texts: list[str], responses: list[list[int]],
            group: int) -> dict[str, np.ndarray]:
    """Returns the reward of each rollout and its parts, group by group."""
    r = self.config.rl
    parts: dict[str, list[np.ndarray]] = {}
    for i, task in enumerate(tasks):
      rows = slice(i * group, (i + 1) * group)
      lengths_G = np.array([len(x) for x in responses[rows]])
      scored = rl_tasks.evo_cot_rewards(task, texts[rows], lengths_G, alpha=r.length_alpha,
                                        mode=r.mode, limits=self.limits)
      if self.judge is not None:
        scored["reward"] = rl_tasks.gar_tallies(self.judge, task.prompt, texts[rows])
      for k, v in scored.items():
        parts.setdefault(k, []).append(v)
    return {k: np.concatenate(v) for k, v in parts.items()}

  def heldout_accuracy(self, variables: dict) -> dict[str, float]:
    """Returns the greedy accuracy on the fixed held-out prompts (each distinct prompt once) and,
    with `rl.eval_samples` > 0, the mean accuracy of that many samples per prompt at
    `rl.temperature` (smoother: it moves with the probability of the right answer)."""
    r = self.config.rl
    drawn = self.tasks("heldout", r.eval_prompts, self.config.train.seed + 1)
    tasks = list({t.prompt: t for t in drawn}.values())
    out = self.sample(variables, tasks, 1, generate_lib.Sampling(), jax.random.key(0))
    result = {"heldout_accuracy": float(np.mean([rl_tasks.is_correct(t, x, self.limits)
                                                 for t, x in zip(tasks, out["texts"])]))}
    samples = r.get("eval_samples", 0)
    if samples:
      sampling = generate_lib.Sampling(temperature=r.temperature, top_p=r.top_p)
      out = self.sample(variables, tasks, samples, sampling, jax.random.key(1))
      result["heldout_sampled_accuracy"] = float(np.mean(
          [rl_tasks.is_correct(tasks[i // samples], x, self.limits)
           for i, x in enumerate(out["texts"])]))
    return result


def _sampled(scalars: dict) -> str:
  value = scalars.get("heldout_sampled_accuracy")
  return "" if value is None else f" (sampled {value:.3f})"


def _signature(state: train_lib.TrainState) -> dict[str, Any]:
  variables = {"params": state.params, "moe_state": state.moe_state}
  return {"/".join(k): list(v.shape) for k, v in traverse_util.flatten_dict(variables).items()}


def train(config: Any, workdir: str) -> dict[str, float]:
  """Runs (or resumes) RL post-training in `workdir`; returns the last step's metrics."""
  validate_config(config)
  r, t = config.rl, config.train
  tokenizer = tokenizer_lib.make_tokenizer(config.data)
  m, ref_variables = starting_policy(config)
  if tokenizer.vocab_size > m.vocab_size:
    config_lib.fail("model.vocab_size", f"{m.vocab_size} is smaller than the tokenizer's "
                    f"{tokenizer.vocab_size} ids", "use the tokenizer the policy was trained with")
  config = ml_collections.ConfigDict(config.to_dict())
  config.model = m  # The policy's own model (from init_from when set).
  device = jax.devices()[0]  # One device: RL here is for models that fit it (CPU experiments).
  ref_variables = jax.device_put(ref_variables, device)
  moe_state = ref_variables.get(moe.STATE, {})
  os.makedirs(workdir, exist_ok=True)
  shapes = jax.eval_shape(functools.partial(init_state, t=t), ref_variables["params"], moe_state)
  single = jax.sharding.SingleDeviceSharding(device)
  target = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=single), shapes)
  ckpt = checkpoint_lib.Checkpointer(workdir, save_every=t.checkpoint_every,
                                     keep=t.keep_checkpoints, model_signature=_signature(target))
  restored = ckpt.restore_latest(target)
  if restored is None:
    # jit returns new buffers: the update donates the state's, the reference must outlive them.
    step, state = 0, _init_state(ref_variables["params"], moe_state, t_json=_optimizer_json(t))
    metrics_lib.log("Starting RL (%s) from %s in %s", r.objective,
                    t.get("init_from") or "a fresh init", workdir)
  else:
    step, state, _ = restored
    metrics_lib.log("Resumed RL from step %d in %s", step, workdir)
  with open(os.path.join(workdir, "config.json"), "w") as f:
    f.write(config.to_json_best_effort(indent=2))

  runner = Runner(config, m, tokenizer)
  logp_fn, step_fn = make_step_fns(m, r, t)
  writer = metrics_lib.MetricWriter(workdir)
  sampling = generate_lib.Sampling(temperature=r.temperature, top_p=r.top_p)
  group, final = r.group_size, {}
  if step == 0:
    final.update(runner.heldout_accuracy({"params": state.params, moe.STATE: state.moe_state}))
    writer.write(0, final)
    metrics_lib.log("step 0 | held-out accuracy %.3f (starting policy)%s",
                    final["heldout_accuracy"], _sampled(final))
  with checkpoint_lib.install_preemption_handler() as preempted:
    while step < t.num_steps:
      start = time.time()
      variables = {"params": state.params, moe.STATE: state.moe_state}
      tasks = runner.tasks("train", r.prompts_per_step, _task_seed(t.seed, step, "tasks"))
      rng = jax.random.fold_in(jax.random.key(t.seed), step)
      out = runner.sample(variables, tasks, group, sampling, rng)
      scored = runner.score(tasks, out["texts"], out["responses"], group)
      advantages_B = obj.group_advantages(scored["reward"], group)
      batch = rollout_batch(out["prompts"], out["responses"], r.max_new_tokens + 1, tokenizer)
      batch["old_logp"] = logp_fn(state.params, state.moe_state, batch)
      batch["ref_logp"] = logp_fn(ref_variables["params"], moe_state, batch)
      batch["advantages"] = jnp.asarray(advantages_B, jnp.float32)
      rows = advantages_B.size // r.num_minibatches
      sums: dict[str, float] = {}
      for _ in range(r.ppo_epochs):
        for k in range(r.num_minibatches):
          rows_k = slice(k * rows, (k + 1) * rows)
          mini = jax.tree.map(lambda x, rows_k=rows_k: x[rows_k], batch)
          state, update_metrics = step_fn(state, mini)
          for name, value in jax.device_get(update_metrics).items():
            sums[name] = sums.get(name, 0.0) + float(value) / (r.ppo_epochs * r.num_minibatches)
      step += 1
      if int(state.nan_streak) >= t.max_consecutive_nan_steps:
        raise RuntimeError(f"{int(state.nan_streak)} consecutive RL updates up to step {step} "
                           "had a non-finite loss or gradient. Lower config.train.learning_rate; "
                           f"the last good checkpoint is in {ckpt.directory}.")
      lengths_B = np.array([len(x) for x in out["responses"]], np.float64)
      scalars = {**sums, "reward_mean": float(scored["reward"].mean()),
                 "reward_std": float(scored["reward"].std()),
                 "accuracy": float(scored["correct"].mean()),
                 "response_length": float(lengths_B.mean()),
                 "ended_fraction": float(np.mean(out["ended"])),
                 "format_penalty": float(scored["format_penalty"].mean()),
                 "nan_skips": float(state.nan_skips), "sec_per_step": time.time() - start}
      if step % r.eval_every == 0 or step == t.num_steps:
        scalars.update(runner.heldout_accuracy(
            {"params": state.params, moe.STATE: state.moe_state}))
      if step % t.log_every == 0 or "heldout_accuracy" in scalars:
        metrics_lib.log("step %d/%d | reward %.3f +- %.3f | acc %.3f | len %.1f | clip %.3f | "
                        "kl %.4f | entropy %.3f%s", step, t.num_steps, scalars["reward_mean"],
                        scalars["reward_std"], scalars["accuracy"], scalars["response_length"],
                        scalars["clip_fraction"], scalars["kl"], scalars["entropy"],
                        f" | held-out acc {scalars['heldout_accuracy']:.3f}{_sampled(scalars)}"
                        if "heldout_accuracy" in scalars else "")
      writer.write(step, scalars)
      final.update(scalars)
      if ckpt.is_due(step):
        ckpt.save(step, state, data_state={"step": step})
      if preempted():
        ckpt.save(step, state, data_state={"step": step}, force=True)
        ckpt.wait()
        metrics_lib.log("Stopped by a signal at step %d; checkpoint saved. Run the same "
                        "command to resume.", step)
        break
    else:
      ckpt.save(step, state, data_state={"step": step}, force=True)
  ckpt.close()
  writer.close()
  final["step"] = step
  return final


def read_curve(workdir: str) -> dict[int, dict[str, float]]:
  """Returns the metrics of an RL run by step (the `metrics.jsonl` it wrote)."""
  return metrics_lib.read_jsonl(os.path.join(workdir, "metrics.jsonl"))

