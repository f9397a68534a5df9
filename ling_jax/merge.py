"""WSM checkpoint merging: the decay a merge emulates and the weighted parameter average.

Warmup-stable-merge (ling2_spec.md section 5) trains at constant LR and anneals afterwards by
averaging checkpoints. Merging theta_n, ..., theta_{n+k} (k + 1 checkpoints, one per interval
of equal length) with coefficients c_0..c_k gives

    sum_j c_j theta_{n+j} = theta_n + sum_{i=1..k} w_i * (theta_{n+i} - theta_{n+i-1}),
    w_i = sum_{j>=i} c_j,

i.e. the updates of interval i are replayed scaled by w_i, as if the LR had decayed by w_i.
The inverse map gives the coefficients of a chosen decay: c_k = w_k, c_j = w_j - w_{j+1}
(1 <= j < k), c_0 = 1 - w_1.

Convention (every kind): the decay shape f, with f(0) = 1 and f(1) = 0, is sampled at
t_i = i / (k + 1), i = 1..k, so w_i = f(i / (k + 1)). The emulated LR reaches zero one interval
after the newest checkpoint, which therefore keeps a positive weight. (The spec writes 1-sqrt as
1 - sqrt(i/k); sampled at t = i/k every shape has w_k = 0, so c_k = 0 and the newest checkpoint
would be wasted.)

    "mean":   c_j = 1 / (k + 1), hence w_i = 1 - i / (k + 1).
    "linear": f(t) = 1 - t. Identical to "mean": a uniform average emulates a linear decay.
    "cosine": f(t) = (1 + cos(pi t)) / 2.
    "1-sqrt": f(t) = 1 - sqrt(t).

All four shapes are monotone, so every coefficient is >= 0, and the coefficients telescope to 1.
"""

from collections.abc import Iterable
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ling_jax import checkpoint as checkpoint_lib
from ling_jax import config as config_lib
from ling_jax import trainer

PyTree = object

# The merge weight options, as the `--weights` flag of experiments/merge.py spells them.
MERGE_KINDS = ("mean", "linear", "cosine", "1-sqrt")

_SHAPES = {
    "linear": lambda t: 1.0 - t,
    "cosine": lambda t: 0.5 * (1.0 + np.cos(np.pi * t)),
    "1-sqrt": lambda t: 1.0 - np.sqrt(t),
}


def _check_kind(kind: str) -> None:
  if kind not in MERGE_KINDS:
    raise config_lib.ConfigError(
        f"unknown merge weights {kind!r}: --weights must be one of {', '.join(MERGE_KINDS)}"
    )


def decay_weights(kind: str, k: int) -> np.ndarray:
  """Returns the decay weights w_1..w_k (float64) that merging k + 1 checkpoints emulates.

  See the module docstring for the convention: w_i = f(i / (k + 1)).

  Args:
    kind: one of MERGE_KINDS.
    k: the number of intervals between the oldest and newest checkpoint (num_checkpoints - 1).
  """
  _check_kind(kind)
  if k < 0:
    raise ValueError(f"k must be >= 0 (number of checkpoints - 1), got {k}")
  t_i = np.arange(1, k + 1, dtype=np.float64) / (k + 1)
  if kind == "mean":
    return decay_weights_from_coefficients(np.full(k + 1, 1.0 / (k + 1)))
  return _SHAPES[kind](t_i)


def decay_weights_from_coefficients(coeffs: Sequence[float]) -> np.ndarray:
  """Returns w_1..w_k emulated by merge coefficients c_0..c_k: w_i = sum_{j>=i} c_j."""
  c = np.asarray(coeffs, dtype=np.float64)
  return np.cumsum(c[::-1])[::-1][1:]


def merge_coefficients(kind: str, num_checkpoints: int) -> np.ndarray:
  """Returns the coefficients c_0..c_k (oldest first, float64) that emulate decay `kind`.

  Inverse map of decay_weights_from_coefficients: c_k = w_k, c_j = w_j - w_{j+1}, c_0 = 1 - w_1.
  """
  _check_kind(kind)
  if num_checkpoints < 1:
    raise ValueError(f"need at least one checkpoint to merge, got {num_checkpoints}")
  w = np.concatenate([[1.0], decay_weights(kind, num_checkpoints - 1), [0.0]])
  return w[:-1] - w[1:]


def merge_params(param_trees: Iterable[PyTree], coeffs: Sequence[float]) -> PyTree:
  """Returns sum_j coeffs[j] * param_trees[j], accumulated in fp32, in each leaf's own dtype.

  `param_trees` may be a generator: each tree is folded into the running sum as it arrives and
  dropped, so at most the sum and one tree are alive (load checkpoints lazily for large models).
  Elementwise jnp ops keep each leaf's sharding.

  Args:
    param_trees: pytrees of the same structure and leaf dtypes, oldest first.
    coeffs: one coefficient per tree; they must sum to 1 (a weighted average).
  """
  c = np.asarray(coeffs, dtype=np.float64)
  if c.ndim != 1 or c.size == 0 or not np.all(np.isfinite(c)):
    raise ValueError(f"coeffs must be a non-empty 1-D array of finite numbers, got {coeffs!r}")
  if abs(c.sum() - 1.0) > 1e-6:
    raise ValueError(f"coeffs must sum to 1 (a weighted average), they sum to {c.sum()!r}")

  treedef, paths, dtypes, sum_leaves = None, None, None, None
  num_trees = 0
  for j, tree in enumerate(param_trees):
    if j >= c.size:
      raise ValueError(f"got more than {c.size} param trees for {c.size} coefficients")
    leaves, this_treedef = jax.tree.flatten(tree)
    del tree  # Only the flat leaves stay alive, and only until the next tree arrives.
    if treedef is None:
      treedef, paths = this_treedef, _leaf_paths(this_treedef)
      dtypes = [jnp.result_type(x) for x in leaves]
      for path, dtype in zip(paths, dtypes):
        if not jnp.issubdtype(dtype, jnp.inexact):
          raise TypeError(f"merge_params averages float leaves only; {path} is {dtype}")
      sum_leaves = [jnp.zeros(jnp.shape(x), _acc_dtype(d)) for x, d in zip(leaves, dtypes)]
    elif this_treedef != treedef:
      raise ValueError(f"param tree {j} has structure {this_treedef}, tree 0 has {treedef}")
    else:
      for path, x, dtype in zip(paths, leaves, dtypes):
        if jnp.result_type(x) != dtype:
          raise ValueError(f"param tree {j}: {path} is {jnp.result_type(x)}, tree 0 has {dtype}")
    if c[j] != 0.0:
      sum_leaves = [
          s + c[j].astype(s.dtype) * jnp.asarray(x).astype(s.dtype)
          for s, x in zip(sum_leaves, leaves)
      ]
    del leaves
    num_trees = j + 1
  if num_trees != c.size:
    raise ValueError(f"got {num_trees} param trees for {c.size} coefficients")
  return jax.tree.unflatten(treedef, [s.astype(d) for s, d in zip(sum_leaves, dtypes)])


def _acc_dtype(dtype) -> jnp.dtype:
  # fp32 at least, so bf16 checkpoints don't lose the small differences being averaged.
  return jnp.promote_types(dtype, jnp.float32)


def _leaf_paths(treedef) -> list[str]:
  dummy = jax.tree.unflatten(treedef, [0] * treedef.num_leaves)
  return [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(dummy)[0]]


def merge_checkpoints(config, workdir: str, *, last: int, weights: str,
                      output: str | None = None, eval_inputs: bool = False) -> dict:
  """Merges the newest `last` checkpoints of a run into `output`; returns the val losses.

  The merged params and expert biases are the `weights`-shaped average; the rest of the state
  (optimiser moments, step) is the newest checkpoint's. Written as a checkpoint of the newest
  step under `output` (default `workdir/merged`), so evaluation and generation read it like
  any run directory. Returns the merge's and the newest checkpoint's val losses, and with
  `eval_inputs` every merged checkpoint's (`input_val_losses`, oldest first; one more
  evaluation per checkpoint, each made as the merge reads it).
  """
  _check_kind(weights)
  source = checkpoint_lib.Checkpointer(workdir, save_every=1, keep=1_000_000)
  steps = source.all_steps()
  if last < 1 or len(steps) < last:
    raise config_lib.ConfigError(
        f"--last: {workdir} holds {len(steps)} checkpoints ({steps}), cannot merge the last "
        f"{last}. Fix: pass --last between 1 and {len(steps)}, or save checkpoints more often.")
  steps = steps[-last:]
  target = trainer.abstract_state(config)
  coeffs = merge_coefficients(weights, last)
  evaluate = trainer.make_evaluator(config)  # Batches read and the step jitted once.
  input_losses = []

  def states():
    for step in steps:
      state = source.restore(step, target)[0]
      if eval_inputs:
        input_losses.append(evaluate(state.params, state.moe_state)["val_loss"])
      yield state

  newest, _ = source.restore(steps[-1], target)
  merged = merge_params(((s.params, s.moe_state) for s in states()), coeffs)
  merged_state = newest.replace(params=merged[0], moe_state=merged[1])
  output = output or f"{workdir}/merged"
  sink = checkpoint_lib.Checkpointer(output, save_every=1, keep=1, async_save=False)
  sink.save(steps[-1], merged_state, data_state={"merged_steps": steps,
                                                 "coefficients": coeffs.tolist(),
                                                 "weights": weights}, force=True)
  sink.close()
  source.close()
  result = {"merged_val_loss": evaluate(merged_state.params, merged_state.moe_state)["val_loss"],
            "steps": steps, "coefficients": coeffs.tolist()}
  if eval_inputs:
    result["input_val_losses"] = [float(x) for x in input_losses]
    result["last_val_loss"] = result["input_val_losses"][-1]
  else:
    result["last_val_loss"] = evaluate(newest.params, newest.moe_state)["val_loss"]
  return result
