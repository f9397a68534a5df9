"""Train state, optimiser, schedules, losses and the jit-able train and eval steps.

Key: A accumulation steps, B batch, L length, V vocabulary.
"""

import functools
import math
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util
from jax.sharding import PartitionSpec as P

from kernels import fp8_gemm
from kernels import lse_triton
from ling_jax import config as config_lib
from ling_jax import fp8
from ling_jax import model as model_lib
from ling_jax import moe
from ling_jax import router
from ling_jax import sharding


@flax.struct.dataclass
class TrainState:
  """Everything a resumed run needs besides the data iterator."""
  step: jax.Array  # Optimiser steps taken (skipped NaN steps included), int32.
  params: Any  # Trained weights, fp32.
  opt_state: Any  # AdamW moments.
  moe_state: Any  # Expert biases, fp32, updated from token counts, never by the optimiser.
  nan_skips: jax.Array  # Steps skipped so far because the loss or gradients were not finite.
  nan_streak: jax.Array  # Consecutive skipped steps up to now.


def make_schedule(t: Any) -> optax.Schedule:
  """Returns the learning-rate schedule: WSM (warmup, then constant), cosine or WSD."""
  warmup = optax.linear_schedule(0.0, t.learning_rate, max(t.warmup_steps, 1))
  stable_steps = max(t.num_steps - t.warmup_steps, 1)
  floor = t.learning_rate * t.min_lr_ratio
  if t.schedule == "wsm":
    rest = optax.constant_schedule(t.learning_rate)
  elif t.schedule == "cosine":
    rest = optax.cosine_decay_schedule(t.learning_rate, stable_steps, alpha=t.min_lr_ratio)
  elif t.schedule == "wsd":
    decay_steps = max(int(t.num_steps * t.decay_fraction), 1)
    rest = optax.join_schedules(
        [optax.constant_schedule(t.learning_rate),
         optax.linear_schedule(t.learning_rate, floor, decay_steps)],
        [max(stable_steps - decay_steps, 0)])
  else:
    raise ValueError(f"config.train.schedule: unknown {t.schedule!r}. "
                     "Fix: use 'wsm', 'cosine' or 'wsd'.")
  return optax.join_schedules([warmup, rest], [t.warmup_steps])


def _decay_mask(params: Any) -> Any:
  """Returns True for weights that get weight decay: everything but norm scales."""
  flat = traverse_util.flatten_dict(params)
  return traverse_util.unflatten_dict({k: k[-1] != "scale" for k in flat})


def scale_by_adam_stored_in(dtype: Any, b1: float, b2: float,
                            eps: float) -> optax.GradientTransformation:
  """Returns Adam's scaling with both moments stored in `dtype` and updated in fp32.

  The state is optax's `ScaleByAdamState`, so checkpoints keep their structure. bf16 moments
  move 4 bytes less per parameter in and out of the update (the update is memory-bound) and
  hold 4 bytes less per parameter: with fp32 master weights, 12 bytes instead of 16.
  """
  def init(params):
    zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, dtype), params)
    return optax.ScaleByAdamState(count=jnp.zeros((), jnp.int32), mu=zeros, nu=zeros)

  def update(grads, state, params=None):
    del params
    count = optax.safe_increment(state.count)
    mu = jax.tree.map(lambda g, m: b1 * m.astype(jnp.float32) + (1 - b1) * g.astype(jnp.float32),
                      grads, state.mu)
    nu = jax.tree.map(
        lambda g, v: b2 * v.astype(jnp.float32) + (1 - b2) * jnp.square(g.astype(jnp.float32)),
        grads, state.nu)
    mu_fix = 1 - b1 ** count.astype(jnp.float32)
    nu_fix = 1 - b2 ** count.astype(jnp.float32)
    updates = jax.tree.map(lambda m, v, g: ((m / mu_fix) / (jnp.sqrt(v / nu_fix) + eps)
                                            ).astype(g.dtype), mu, nu, grads)
    cast = functools.partial(jax.tree.map, lambda x: x.astype(dtype))
    return updates, optax.ScaleByAdamState(count=count, mu=cast(mu), nu=cast(nu))

  return optax.GradientTransformation(init, update)


def make_optimizer(t: Any) -> optax.GradientTransformation:
  """Returns global-norm clipping followed by AdamW on the schedule.

  `train.moment_dtype` "float32" is optax's AdamW; "bfloat16" the same update with the moments
  stored in bf16 (`scale_by_adam_stored_in`).
  """
  moment_dtype = t.get("moment_dtype", "float32")
  if moment_dtype == "float32":
    adamw = optax.adamw(make_schedule(t), b1=t.b1, b2=t.b2, eps=t.eps,
                        weight_decay=t.weight_decay, mask=_decay_mask)
  else:
    adamw = optax.chain(
        scale_by_adam_stored_in(jnp.dtype(moment_dtype), t.b1, t.b2, t.eps),
        optax.add_decayed_weights(t.weight_decay, _decay_mask),
        optax.scale_by_learning_rate(make_schedule(t)))
  return optax.chain(optax.clip_by_global_norm(t.grad_clip_norm), adamw)


def init_state(m: Any, t: Any, rng: jax.Array) -> TrainState:
  """Returns a fresh train state."""
  variables = model_lib.init_variables(m, rng)
  params = variables["params"]
  return TrainState(
      step=jnp.zeros((), jnp.int32), params=params,
      opt_state=make_optimizer(t).init(params),
      moe_state=variables.get(moe.STATE, {}),
      nan_skips=jnp.zeros((), jnp.int32), nan_streak=jnp.zeros((), jnp.int32))


_INIT_FNS: dict[str, Any] = {}


def init_state_fn(m: Any, t: Any) -> Any:
  """Returns `init_state` bound to (m, t, the key of `t.seed`): one object per distinct config.

  Jobs call it twice, `jax.eval_shape` for the restore target, then `jax.jit` for a fresh state;
  with the same function object JAX traces it once.
  """
  key = m.to_json_best_effort() + t.to_json_best_effort()
  if key not in _INIT_FNS:
    _INIT_FNS[key] = functools.partial(init_state, m, t, jax.random.key(t.seed))
  return _INIT_FNS[key]


@jax.custom_vjp
def token_cross_entropy(logits_BLV: jax.Array, targets_BL: jax.Array) -> jax.Array:
  """Returns each position's cross-entropy [B, L] in nats, computed in fp32 from the logits.

  The logits may be bf16 (`model.logits_dtype`). The backward writes the logits' gradient
  softmax - one_hot in their own dtype in one elementwise pass, where autodiff would scatter the
  target term into a zero [B, L, V] fp32 array and convert afterwards: at Ling's vocabulary
  (157K) and 16K tokens each such array is 10 GB. The forward's log-sum-exp reads the logits
  once on GPUs where `kernels/lse_triton.py` is switched on, twice in XLA otherwise.
  """
  return _token_cross_entropy_fwd(logits_BLV, targets_BL)[0]


def _token_cross_entropy_fwd(logits_BLV, targets_BL):
  logz_BL = lse_triton.logsumexp(logits_BLV)
  target_logits_BL = jnp.take_along_axis(logits_BLV, targets_BL[..., None], axis=-1)[..., 0]
  target_logits_BL = target_logits_BL.astype(jnp.float32)
  return logz_BL - target_logits_BL, (logits_BLV, targets_BL, logz_BL)


def _token_cross_entropy_bwd(residuals, grad_BL):
  logits_BLV, targets_BL, logz_BL = residuals
  probs_BLV = jnp.exp(logits_BLV.astype(jnp.float32) - logz_BL[..., None])
  is_target_BLV = jax.lax.broadcasted_iota(
      jnp.int32, logits_BLV.shape, logits_BLV.ndim - 1) == targets_BL[..., None]
  grad_BLV = (probs_BLV - is_target_BLV) * grad_BL[..., None]
  return grad_BLV.astype(logits_BLV.dtype), np.zeros(targets_BL.shape, jax.dtypes.float0)


token_cross_entropy.defvjp(_token_cross_entropy_fwd, _token_cross_entropy_bwd)


def cross_entropy_sum(logits_BLV: jax.Array, targets_BL: jax.Array,
                      mask_BL: jax.Array) -> jax.Array:
  """Returns the summed token cross-entropy (nats) over positions where mask is 1."""
  with jax.named_scope("cross_entropy"):
    return jnp.sum(token_cross_entropy(logits_BLV, targets_BL) * mask_BL)


def chunked_cross_entropy_sum(hidden_BLD: jax.Array, targets_BL: jax.Array, mask_BL: jax.Array,
                              *, kernel_DV: jax.Array, chunk_len: int, m: Any) -> jax.Array:
  """`cross_entropy_sum` of the LM head's logits (hidden @ kernel), `chunk_len` positions at a
  time: only one chunk's [B, chunk_len, V] logits exist at once.

  The head is `layers.dense`'s product (in m.dtype, then m.logits_dtype). Under autodiff the
  forward pass also makes each chunk's gradients, since the logits' gradient needs only the
  chunk (softmax - one_hot, masked): the hidden states' in m.dtype, the head's summed over the
  chunks in fp32. The backward pass scales them by the loss's cotangent. So the step runs the
  three LM-head matmuls of whole logits, not a fourth to recompute them. On a mesh whose batch
  is split (and no tensor axis), each device runs the chunks of its own rows (`shard_map`) and
  the head's gradient is summed over the batch shards once.
  """
  dtype = config_lib.dtype_of(m.dtype)
  logits_dtype = config_lib.logits_dtype(m)
  with jax.named_scope("lm_head"):
    return _linear_cross_entropy(hidden_BLD, kernel_DV, targets_BL, mask_BL, chunk_len, dtype,
                                 logits_dtype)


def _linear_cross_entropy_scan(hidden_BLD, kernel_DV, targets_BL, mask_BL, chunk_len, dtype,
                               logits_dtype, with_grads: bool):
  """Returns (the masked cross-entropy sum, and with_grads its gradients for a cotangent of 1:
  hidden's [B, L, D] in dtype and the kernel's [D, V] in fp32), one scan step per chunk."""
  batch, length, _ = hidden_BLD.shape
  num_chunks = length // chunk_len
  split = lambda a: jnp.moveaxis(a.reshape(batch, num_chunks, chunk_len, *a.shape[2:]), 1, 0)
  kernel_DV = kernel_DV.astype(dtype)

  def chunk(carry, xs):
    total, dkernel_DV = carry
    h_BCD, targets_BC, mask_BC = xs
    h_BCD = h_BCD.astype(dtype)
    logits_BCV = jax.lax.dot_general(h_BCD, kernel_DV, (((2,), (0,)), ((), ()))
                                     ).astype(logits_dtype)
    ce_BC, residuals = _token_cross_entropy_fwd(logits_BCV, targets_BC)
    total += jnp.sum(ce_BC * mask_BC)
    if not with_grads:
      return (total, dkernel_DV), None
    dlogits_BCV = _token_cross_entropy_bwd(residuals, mask_BC.astype(jnp.float32))[0]
    dlogits_BCV = dlogits_BCV.astype(dtype)
    dh_BCD = jax.lax.dot_general(dlogits_BCV, kernel_DV, (((2,), (1,)), ((), ())))
    dkernel_DV += jax.lax.dot_general(h_BCD, dlogits_BCV, (((0, 1), (0, 1)), ((), ())),
                                      preferred_element_type=jnp.float32)
    return (total, dkernel_DV), dh_BCD

  dkernel_DV = jnp.zeros(kernel_DV.shape, jnp.float32) if with_grads else None
  (total, dkernel_DV), dh_NBCD = jax.lax.scan(
      chunk, (jnp.zeros((), jnp.float32), dkernel_DV),
      (split(hidden_BLD), split(targets_BL), split(mask_BL)))
  if not with_grads:
    return total, None
  dh_BLD = jnp.moveaxis(dh_NBCD, 0, 1).reshape(hidden_BLD.shape[:2] + dh_NBCD.shape[-1:])
  return total, (dh_BLD, dkernel_DV)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _linear_cross_entropy(hidden_BLD, kernel_DV, targets_BL, mask_BL, chunk_len, dtype,
                          logits_dtype):
  return _linear_cross_entropy_scan(hidden_BLD, kernel_DV, targets_BL, mask_BL, chunk_len,
                                    dtype, logits_dtype, with_grads=False)[0]


def _linear_cross_entropy_fwd(hidden_BLD, kernel_DV, targets_BL, mask_BL, chunk_len, dtype,
                              logits_dtype):
  scan = functools.partial(_linear_cross_entropy_scan, chunk_len=chunk_len, dtype=dtype,
                           logits_dtype=logits_dtype, with_grads=True)
  mesh = jax.sharding.get_abstract_mesh()
  shape = {} if mesh.empty else dict(mesh.shape)
  batch_axes = sharding.split_batch_axes(shape)
  num_shards = math.prod(shape[a] for a in batch_axes)
  if not batch_axes or shape.get("tensor", 1) > 1 or hidden_BLD.shape[0] % num_shards:
    total, (dh_BLD, dkernel_DV) = scan(hidden_BLD, kernel_DV, targets_BL, mask_BL)
  else:
    # Each device runs the chunks of its own rows with the whole head, and the head's gradient
    # is summed over the batch shards once, after the last chunk: left to the partitioner, the
    # scan's carry would be all-reduced at every chunk ([D, V] fp32: 1.3 GB at Ling-mini).
    # With a tensor axis the vocabulary stays split instead, as the partitioner does it (and
    # rows that do not split over the shards stay with it too).
    def local(h_BLD, w_DV, t_BL, m_BL):
      total, (dh_BLD, dw_DV) = scan(h_BLD, w_DV, t_BL, m_BL)
      return jax.lax.psum(total, batch_axes), dh_BLD, jax.lax.psum(dw_DV, batch_axes)

    rows = P(batch_axes)
    total, dh_BLD, dkernel_DV = jax.shard_map(
        local, mesh=mesh, in_specs=(rows, P(), rows, rows), out_specs=(P(), rows, P()),
        check_vma=False)(hidden_BLD, kernel_DV, targets_BL, mask_BL)
  # The kernel's dtype rides along as an empty array (residuals are arrays).
  return total, (dh_BLD.astype(hidden_BLD.dtype), dkernel_DV, jnp.zeros((0,), kernel_DV.dtype))


def _linear_cross_entropy_bwd(chunk_len, dtype, logits_dtype, residuals, g):
  """The forward's gradients times the loss's cotangent g; none for the targets and mask."""
  del chunk_len, dtype, logits_dtype
  dh_BLD, dkernel_DV, kernel_like = residuals
  return ((g * dh_BLD.astype(jnp.float32)).astype(dh_BLD.dtype),
          (g * dkernel_DV).astype(kernel_like.dtype), None, None)


_linear_cross_entropy.defvjp(_linear_cross_entropy_fwd, _linear_cross_entropy_bwd)


def loss_masks(batch: dict, depth: int) -> jax.Array:
  """Returns the mask of positions with a depth-`depth` target in the same document.

  Depth 0 is the main next-token loss; depth d >= 1 is MTP, whose target is token t + d + 1.
  Padding (segment 0) and an optional `loss_mask` (e.g. prompt tokens in SFT) are excluded.
  """
  seg_BL = batch["segment_ids"]
  mask_BL = seg_BL != 0
  if depth:
    mask_BL &= model_lib.shift_left(seg_BL, depth) == seg_BL
  if "loss_mask" in batch:  # Whether this depth's target (targets[t + depth]) is trained.
    mask_BL &= model_lib.shift_left(batch["loss_mask"], depth) != 0
  return mask_BL.astype(jnp.float32)


def _stats_sum(stats: dict, name: str) -> jax.Array:
  flat = traverse_util.flatten_dict(stats)
  return sum((jnp.sum(v) for k, v in flat.items() if k[-1] == name), jnp.zeros(()))


def _apply_heads(m: Any, variables: dict, batch: dict, chunk_len: int):
  """Runs the model on a batch; returns (ce_of, heads, stats): `ce_of(head, targets, mask)` is
  the summed cross-entropy of one head (the main one first, then each MTP depth's), from whole
  logits, or with `chunk_len` (`train.loss_chunk_len`) from the head's inputs, chunk by chunk."""
  out, stats = model_lib.apply(m, variables, batch["inputs"], batch["positions"],
                               batch["segment_ids"], batch["targets"], logits=not chunk_len)
  if not chunk_len:
    return cross_entropy_sum, (out.logits_BLV, *out.mtp_logits), stats
  ce_of = functools.partial(chunked_cross_entropy_sum, chunk_len=chunk_len, m=m,
                            kernel_DV=variables["params"]["lm_head"]["kernel"])
  return ce_of, (out.hidden_BLD, *out.mtp_hidden), stats


def loss_fn(params: Any, moe_state: Any, batch: dict, denominators: jax.Array, m: Any,
            t: Any, fp8_probes: Any = None) -> tuple[jax.Array, dict]:
  """Returns the training loss of one micro-batch and its metrics.

  Losses are sums divided by the token counts of the WHOLE (accumulated) batch, so that summing
  micro-batch gradients gives exactly the full-batch gradient. `fp8_probes` (FP8 runs only):
  the probes whose gradients are the FP8 gradient metrics (ling_jax/fp8.py).
  """
  variables = {"params": params, moe.STATE: moe_state}
  if fp8_probes:
    variables[fp8.PROBES] = fp8_probes
  ce_of, heads, stats = _apply_heads(m, variables, batch, t.get("loss_chunk_len", 0))
  ce = ce_of(heads[0], batch["targets"], loss_masks(batch, 0))
  loss = ce / denominators[0]
  mtp_ce = jnp.zeros(())
  for depth, head_in in enumerate(heads[1:], start=1):
    mtp_targets_BL = model_lib.shift_left(batch["targets"], depth)
    mtp_ce += ce_of(head_in, mtp_targets_BL, loss_masks(batch, depth)) / denominators[depth]
  if len(heads) > 1:
    mtp_ce = mtp_ce / (len(heads) - 1)
    loss += t.mtp_loss_weight * mtp_ce
  num_micro = t.grad_accum_steps
  z_loss = _stats_sum(stats, "z_loss") / num_micro
  loss += t.router_z_loss_coef * z_loss
  counts = {k[:-1] + ("expert_bias",): v
            for k, v in traverse_util.flatten_dict(stats).items() if k[-1] == "counts"}
  aux = {"ce": ce / denominators[0], "mtp_ce": mtp_ce, "z_loss": z_loss,
         "counts": traverse_util.unflatten_dict(counts)}
  if fp8.enabled(m):
    aux["fp8_stats"] = stats
  return loss, aux


def fp8_probes(m: Any, measure: Any = True) -> Any:
  """The model's FP8 probes ({} without FP8): zeros, which measure the safeguard metrics, or
  where `measure` (a bool, traced or not) is false `fp8_gemm.SKIP_METRICS`, which skips them."""
  if not fp8.enabled(m):
    return {}
  shapes = jax.eval_shape(lambda: model_lib.init_variables(m, jax.random.key(0)))
  value_2 = jnp.where(measure, jnp.zeros((2,), jnp.float32),
                      jnp.asarray(fp8_gemm.SKIP_METRICS, jnp.float32))
  return jax.tree.map(lambda s: jnp.broadcast_to(value_2, s.shape).astype(s.dtype),
                      shapes.get(fp8.PROBES, {}))


def fp8_metrics_due(step: Any, t: Any) -> Any:
  """Whether the step numbered `step` (0-based: state.step before it runs) measures the FP8
  safeguard metrics: on the steps the trainer logs (every log_every-th and the last), or on
  every step with `train.fp8_metrics_every_step`. Elsewhere they cost a quantisation and a
  reduction of every FP8 op's operands and output gradient (BENCHMARKS.md, session 11)."""
  if t.get("fp8_metrics_every_step", False):
    return jnp.bool_(True)
  done = step + 1
  return (done % t.log_every == 0) | (done == t.num_steps)


def _split_micro(batch: dict, num_micro: int) -> dict:
  return jax.tree.map(lambda x: x.reshape(num_micro, x.shape[0] // num_micro, *x.shape[1:]),
                      batch)


# Weights the model reads only through a cast to `model.dtype`: the kernels of its matmuls.
# Not the LM head's or the embedding's: the MTP head reads both a second time, and the sum of
# their two gradients should stay fp32.
_COMPUTE_DTYPE_NAMES = ("kernel", "wi_gate_up", "wo")
_READ_TWICE = ("lm_head", "embed")


def compute_dtype_params(params: Any, m: Any, t: Any) -> Any:
  """Returns `params` with the matmul kernels cast to `model.dtype`, under
  `train.compute_dtype_grads` (else `params` unchanged).

  The model casts these kernels to `model.dtype` where it uses them, so their gradients are
  `model.dtype` values either way. Differentiating with respect to the cast copies leaves those
  gradients in `model.dtype` (bf16), which halves the bytes of the gradient copy, the norm and
  the update's read of them; `apply_gradients` upcasts inside those passes. The values are the
  same.
  """
  if not t.get("compute_dtype_grads", False):
    return params
  dtype = jnp.dtype(m.dtype)

  def cast(path, x):
    names = [getattr(k, "key", str(k)) for k in path]
    if names[-1] in _COMPUTE_DTYPE_NAMES and names[0] not in _READ_TWICE:
      return x.astype(dtype)
    return x
  return jax.tree_util.tree_map_with_path(cast, params)


def accumulate_gradients(state: TrainState, batch: dict, *, m: Any, t: Any,
                         fp8_metrics: Any = True) -> tuple[jax.Array, dict, Any]:
  """Returns (loss, aux metrics, gradients) of `batch`, summed over its micro-batches.

  Gradients of micro-batches are summed in the parameters' dtype (fp32); with one micro-batch
  and `train.compute_dtype_grads` the matmul kernels' gradients come back in `model.dtype`.
  fp8_metrics: whether FP8 ops measure their safeguard metrics (a bool, traced or not; zeros
  in aux["fp8"] where not).
  """
  num_micro = t.grad_accum_steps
  depths = 1 + m.num_nextn_predict_layers
  denominators = jnp.stack([jnp.maximum(jnp.sum(loss_masks(batch, d)), 1.0)
                            for d in range(depths)])
  probes = fp8_probes(m, fp8_metrics)
  grad_fn = jax.value_and_grad(loss_fn, argnums=(0, 6), has_aux=True)

  def micro_loss(micro_batch):
    (loss, aux), (grads, probe_grads) = grad_fn(
        compute_dtype_params(state.params, m, t), state.moe_state, micro_batch, denominators,
        m, t, probes)
    if "fp8_stats" in aux:  # FP8 safeguard metrics, averaged over the micro-batches.
      aux["fp8"] = jax.tree.map(lambda v: v / num_micro,
                                fp8.summarize(aux.pop("fp8_stats"), probe_grads))
    return loss, aux, grads

  def micro_step(carry, micro_batch):
    return jax.tree.map(jnp.add, carry, micro_loss(micro_batch)), None

  if num_micro == 1:  # No loop: tracing the loss once, not twice (eval_shape, then scan).
    loss, aux, grads = micro_loss(batch)
    aux["tokens"] = denominators[0]
    return loss, aux, _materialize(grads, t)
  micro_batches = _split_micro(batch, num_micro)
  aux_shapes = jax.eval_shape(
      lambda: micro_loss(jax.tree.map(lambda x: x[0], micro_batches))[1])
  init = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype),
                      (jax.ShapeDtypeStruct((), jnp.float32), aux_shapes, state.params))
  (loss, aux, grads), _ = jax.lax.scan(micro_step, init, micro_batches)
  aux["tokens"] = denominators[0]
  return loss, aux, _materialize(grads, t)


def _materialize(grads: Any, t: Any) -> Any:
  """With `train.materialize_grads`, writes every gradient out whole before the optimizer.

  The values are unchanged; what changes is XLA's fusion. Under `model.unroll_layers` a stacked
  parameter's gradient is a concatenation of per-layer pieces, and XLA fuses that concatenation
  into the update: one fusion per output (the parameter and each moment), each reading all the
  pieces again. Behind the barrier the concatenation is one copy and the update one pass that
  writes all three (BENCHMARKS.md, training throughput).
  """
  return jax.lax.optimization_barrier(grads) if t.get("materialize_grads", False) else grads


def train_step(state: TrainState, batch: dict, *, m: Any, t: Any) -> tuple[TrainState, dict]:
  """Returns the state after one optimiser step on `batch` and that step's metrics.

  The batch is split into `grad_accum_steps` micro-batches whose gradients are summed. A step
  whose loss or gradients are not finite leaves params, optimiser state and expert bias unchanged.
  """
  loss, aux, grads = accumulate_gradients(state, batch, m=m, t=t,
                                          fp8_metrics=fp8_metrics_due(state.step, t))
  return apply_gradients(state, loss, aux, grads, t=t)


def apply_gradients(state: TrainState, loss: jax.Array, aux: dict, grads: Any, *,
                    t: Any) -> tuple[TrainState, dict]:
  """Returns the state after the optimiser and expert-bias updates from `accumulate_gradients`."""
  with jax.named_scope("optimizer"):  # Named for profiles (ling_jax/profiling.py).
    # bf16 gradients (`train.compute_dtype_grads`) in fp32: XLA fuses the cast into each reader.
    grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, state.params)
    grad_norm = optax.global_norm(grads)
    # One scalar test: a NaN or Inf anywhere in the gradients makes their norm non-finite.
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    optimizer = make_optimizer(t)
    updates, new_opt_state = optimizer.update(grads, state.opt_state, state.params)
    new_params = optax.apply_updates(state.params, updates)
  new_moe_state = jax.tree.map(
      lambda b, c: router.update_expert_bias(b, c, t.expert_bias_update_rate),
      state.moe_state, aux["counts"])

  def keep(new, old):  # A non-finite step leaves the state as it was.
    with jax.named_scope("optimizer"):
      return jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)

  new_state = TrainState(
      step=state.step + 1,
      params=keep(new_params, state.params),
      opt_state=keep(new_opt_state, state.opt_state),
      moe_state=keep(new_moe_state, state.moe_state),
      nan_skips=state.nan_skips + (~finite).astype(jnp.int32),
      nan_streak=jnp.where(finite, 0, state.nan_streak + 1))
  # Each MoE layer's max violation, in expert_load's order (MTP blocks last).
  violations = [router.max_violation(c).reshape(-1) for c in jax.tree.leaves(aux["counts"])]
  layer_violations = jnp.concatenate(violations) if violations else jnp.zeros((0,))
  metrics = {
      "loss": loss, "ce": aux["ce"], "mtp_ce": aux["mtp_ce"], "z_loss": aux["z_loss"],
      "grad_norm": grad_norm, "lr": make_schedule(t)(state.step),
      "max_violation": jnp.max(layer_violations) if violations else jnp.zeros(()),
      "layer_violations": layer_violations,
      "skipped": (~finite).astype(jnp.int32), "nan_streak": new_state.nan_streak,
      "tokens": aux["tokens"],
      **aux.get("fp8", {}),  # FP8 safeguards: fp8_{act,weight,grad}_{underflow,cos}[_max|_min]
      # Tokens per expert of every MoE layer (MTP blocks last), for load heatmaps.
      "expert_load": (jnp.concatenate([c.reshape(-1, c.shape[-1])
                                       for c in jax.tree.leaves(aux["counts"])])
                      if violations else jnp.zeros((0, 0))),
  }
  return new_state, metrics


def eval_step(params: Any, moe_state: Any, batch: dict, *, m: Any, t: Any) -> dict:
  """Returns summed cross-entropy (nats) and token counts of the main and MTP heads (the logits
  made a chunk at a time with `t.loss_chunk_len`, as in training)."""
  ce_of, heads, _ = _apply_heads(m, {"params": params, moe.STATE: moe_state}, batch,
                                 t.get("loss_chunk_len", 0))
  mask_BL = loss_masks(batch, 0)
  result = {"ce_sum": ce_of(heads[0], batch["targets"], mask_BL), "tokens": jnp.sum(mask_BL)}
  if len(heads) > 1:
    mtp_mask_BL = loss_masks(batch, 1)
    result["mtp_ce_sum"] = ce_of(heads[1], model_lib.shift_left(batch["targets"], 1),
                                 mtp_mask_BL)
    result["mtp_tokens"] = jnp.sum(mtp_mask_BL)
  return result


def bits(nats: float) -> float:
  """Returns nats in bits."""
  return nats / math.log(2)
