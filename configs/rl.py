"""RL post-training (Evo-CoT with LPO, GRPO or GSPO updates; GAR rewards) after DFT.

  python -m experiments.rl --config=configs/rl.py --workdir=w/rl --config.train.init_from=w/sft
  python -m experiments.rl --config=configs/rl.py:grpo --workdir=w/rl_grpo \
      --config.train.init_from=w/sft

The argument is `OBJECTIVE[,key=value...]` (default `lpo`); keys:
  variant=tiny      the model of configs/ling2.py used when train.init_from is not set
  task=arithmetic   the task family (arithmetic, string, python; ling_jax/rl_tasks.py)

The policy model comes from `train.init_from` (the SFT phase's workdir, or an HF / converted
directory), which is also the frozen KL reference. Running the same command again resumes.
"""

import ml_collections
from ml_collections import config_dict

from configs import ling2
from ling_jax import rl_objectives


def _parse(arg: str) -> tuple[str, dict[str, str]]:
  objective, *items = [x.strip() for x in arg.split(",") if x.strip()] or ["lpo"]
  if objective not in rl_objectives.OBJECTIVES:
    raise ValueError(f"configs/rl.py: unknown objective {objective!r}; use one of "
                     f"{', '.join(rl_objectives.OBJECTIVES)} (e.g. --config=configs/rl.py:grpo).")
  options = {}
  for item in items:
    key, sep, value = item.partition("=")
    if not sep or key not in ("variant", "task"):
      raise ValueError(f"configs/rl.py: bad argument {item!r}; use key=value with key in "
                       "variant, task.")
    options[key] = value
  return objective, options


def get_config(arg: str = "lpo") -> ml_collections.ConfigDict:
  """Returns the RL config for `arg` (see the module docstring)."""
  objective, options = _parse(arg)
  variant = options.get("variant", "tiny")
  config = ling2.get_config(variant)
  config.variant = variant
  config.phase = "rl"
  t = config.train
  t.init_from = config_dict.placeholder(str)  # The SFT run (policy and frozen reference).
  t.num_steps = 100  # RL steps (each: one batch of rollouts, several optimiser steps).
  t.learning_rate = 1e-4
  t.warmup_steps = 0
  t.schedule = "wsm"
  t.weight_decay = 0.0
  t.grad_clip_norm = 1.0
  t.log_every = 1
  t.checkpoint_every = 10
  t.keep_checkpoints = 3

  r = config.rl = ml_collections.ConfigDict()
  r.objective = objective  # "lpo" (sentence ratio), "grpo" (token), "gspo" (sequence).
  r.clip_eps = config_dict.placeholder(float)  # None: 0.03 LPO, 0.2 GRPO, 4e-4 GSPO.
  r.beta_kl = 0.01  # KL(pi || reference) weight, k3 estimator per token; 0 turns it off.
  r.group_size = 8  # G samples per prompt.
  r.prompts_per_step = 8
  r.temperature = 1.0
  r.top_p = 1.0
  r.max_new_tokens = 16
  r.ppo_epochs = 1  # Passes over each batch of rollouts.
  r.num_minibatches = 2  # Optimiser steps per pass.
  r.mode = "instant"  # DFT mode of the prompts (its system prompt; thinking tags penalised).
  r.reward = "evo_cot"  # "evo_cot" (verifiable) or "gar" (round robin of a judge).
  r.judge = "rule"  # GAR judge: "rule" (keywords, then shorter) or "model" (a checkpoint).
  r.judge_path = config_dict.placeholder(str)
  r.judge_keywords = ()
  r.length_alpha = 0.1  # Evo-CoT length-term weight (larger for easier tasks).
  r.task_family = options.get("task", "arithmetic")
  r.max_operand = 49
  r.ops = "+"
  r.heldout_fraction = 0.2
  r.eval_every = 10  # Held-out greedy accuracy every this many RL steps.
  r.eval_prompts = 128  # Held-out prompts drawn (each distinct one evaluated once, greedy).
  r.eval_samples = 0  # > 0: also the mean accuracy of this many samples per held-out prompt.
  r.sandbox = ml_collections.ConfigDict({"timeout_s": 5.0, "cpu_s": 2, "memory_mb": 256,
                                         "max_processes": 16, "max_file_mb": 1})
  return config
