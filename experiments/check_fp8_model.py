"""FP8 kernels against the XLA reference at one model's own shapes, and the model's first loss.

  python -m experiments.check_fp8_model --config=configs/ling2.py:mini_h200 \\
      --config.model.num_hidden_layers=2 --out_dir=/tmp/check_fp8

The CPU tests check every FP8 kernel in interpret mode at small shapes; this runs the compiled
kernels on the GPU at the shapes a config actually feeds them, which the tests cannot reach.

1. Op by op. The model's loss is traced once (abstractly) in FP8 and every FP8 op it calls is
   recorded: `fp8_gemm.fp8_linear`, `fp8_gemm.fp8_grouped_linear` and the experts' fused FFN
   (`fp8_experts.fused_expert_ffn`), with their shapes, dtypes and (grouped) row alignment.
   Each distinct op then runs forward and backward on random operands twice, with the kernels
   ("auto": Mosaic GPU GEMMs, Triton quantisation) and with the reference backend (XLA
   dequantise-then-multiply in fp32), and y, dx and dw are compared. Both
   see the same E4M3 codes, so they should agree to bf16 rounding (~1e-3); the product in bf16
   without quantisation is printed beside as the scale of FP8's own error (~3-5%%). Grouped ops
   get expert sizes drawn as a router would (multinomial), each padded to the op's row alignment;
   the fused experts get random top-k routing (dw: the worse of its two weights). With
   `--routing=collapsed` both route as Ling's init does real text: nearly every token to one
   set of top-k experts, so a few groups hold tens of thousands of rows.
   The fused experts quantise intermediates (the SwiGLU's output, its gradient) made from a
   GEMM's bf16 output, so a one-step difference there moves some of their codes: they take
   --requant_tolerance, and two more numbers say what that noise is: their forward against the
   separate ops on the same kernels (identical codes, so ~0), and the reference against its own
   forward compiled for its gradient (XLA's other GEMMs: the noise floor).
   `--op_kinds` picks and orders the kinds checked.
2. The model. Loss and gradients at initialisation on one batch of random tokens: bf16, FP8 with
   the kernels and FP8 with the reference. The two FP8 runs should agree far more closely than
   either does with bf16.

Writes `check.json` and `check.md` to --out_dir (after each part) and exits 1 when an op's kernel
and reference differ by more than --tolerance (the fused experts: --requant_tolerance, and
their forward from the separate ops' by more than --tolerance), when any one row of y, dx or dw
does by more than --row_tolerance (--requant_row_tolerance), or the two FP8 losses by more
than --loss_tolerance. The row check is there for errors confined to a few rows (a misplaced
store, one tile's scale), which a large output's Frobenius error hides inside the noise floor.
"""

import functools
import json
import os
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app
from absl import flags
from ml_collections import config_flags

from kernels import dispatch
from kernels import fp8_experts
from kernels import fp8_gemm
from kernels import fp8_quant
from kernels import grouped_matmul as gmm_lib
from ling_jax import data as data_lib
from ling_jax import metrics as metrics_lib
from ling_jax import profiling
from ling_jax import train as train_lib
from ling_jax import trainer

_CONFIG = config_flags.DEFINE_config_file("config", "configs/ling2.py:mini_h200",
                                          "Model and batch to take the shapes from.")
_OUT_DIR = flags.DEFINE_string("out_dir", "/tmp/check_fp8", "check.json and check.md go here.")
_TOLERANCE = flags.DEFINE_float("tolerance", 1e-2,
                                "Largest relative error of kernel against reference.")
_REQUANT_TOLERANCE = flags.DEFINE_float(
    "requant_tolerance", 3e-2, "The same for the fused experts, which quantise intermediates made "
    "from a GEMM's bf16 output (the SwiGLU and its gradient): where the kernel's accumulation "
    "order moves that output by one bf16 step, a few percent of the intermediate's E4M3 codes "
    "move by one step: 1.3e-2 on the H200 at Ling-mini, where the reference differs from its "
    "own forward compiled for its gradient by 1.2e-2 (session 14). Their forward is also checked "
    "against the separate-op path on the same kernels (same codes) at --tolerance.")
_ROW_TOLERANCE = flags.DEFINE_float(
    "row_tolerance", 5e-2, "Largest relative error of any one row of y, dx or dw (the last axis), "
    "kernel against reference, for the linear and grouped ops: their rows see the same codes, "
    "so each agrees to bf16 rounding (~1e-3), while a misplaced store or a tile's wrong scale "
    "puts a few rows off by ~1 and moves the Frobenius error of a large output by little.")
_REQUANT_ROW_TOLERANCE = flags.DEFINE_float(
    "requant_row_tolerance", 0.25, "The same for the fused experts, whose rows also carry the "
    "requantisation noise of --requant_tolerance (a token's row more of it than the whole).")
_LOSS_TOLERANCE = flags.DEFINE_float(
    "loss_tolerance", 1e-3, "Largest relative gap of the model's first loss, FP8 with kernels "
    "against FP8 with the reference (same codes but for accumulation order: ~1e-5).")
_PARTS = flags.DEFINE_list("parts", ["ops", "model"], "What to check: ops, model.")
_OP_KIND_NAMES = ("experts", "grouped", "linear")
_OP_KINDS = flags.DEFINE_list(
    "op_kinds", list(_OP_KIND_NAMES), "Which recorded ops to check, in this order: experts (the "
    "fused expert FFN), grouped, linear.")
_ROUTING = flags.DEFINE_enum(
    "routing", "uniform", ["uniform", "collapsed"], "How the grouped ops' and the fused "
    "experts' rows spread over the experts: uniform (each token's top-k at random), or "
    "collapsed, as Ling's init routes real text (BENCHMARKS.md, session 24): all tokens but one "
    "in 64 go to one set of top-k experts, so a few groups of tens of thousands of rows stand "
    "beside many small and empty ones.")
# Collapsed routing: one token in this many picks its own top-k experts.
_STRAY = 64
_KERNEL_BACKEND = flags.DEFINE_string(
    "kernel_backend", "auto", "FP8 GEMM backend of the ops' kernel runs (kernels/fp8_gemm.py); "
    "pallas_mosaic_gpu_interpret checks the wiring on a CPU.")


def record_ops(config: Any) -> list[dict[str, Any]]:
  """Returns the distinct FP8 ops the model's loss calls, from an abstract trace."""
  m, t = config.model, config.train
  seen: dict[tuple, dict[str, Any]] = {}
  real = {"linear": fp8_gemm.fp8_linear, "grouped": fp8_gemm.fp8_grouped_linear,
          "experts": fp8_experts.fused_expert_ffn}

  def linear(x_MK, w_KN, probe_2, backend="auto", recipe=fp8_gemm.FULL_RECIPE):
    key = ("linear", x_MK.shape, w_KN.shape, str(x_MK.dtype), str(w_KN.dtype))
    seen.setdefault(key, {"op": "linear", "x": list(x_MK.shape), "w": list(w_KN.shape),
                          "dtype": str(x_MK.dtype), "w_dtype": str(w_KN.dtype), "calls": 0,
                          "recipe": recipe})["calls"] += 1
    return real["linear"](x_MK, w_KN, probe_2, backend, recipe)

  def grouped(x_MK, w_GKN, group_sizes_G, probe_2, backend="auto",
              recipe=fp8_gemm.FULL_RECIPE, row_align=1):
    key = ("grouped", x_MK.shape, w_GKN.shape, str(x_MK.dtype), str(w_GKN.dtype), row_align)
    seen.setdefault(key, {"op": "grouped", "x": list(x_MK.shape), "w": list(w_GKN.shape),
                          "dtype": str(x_MK.dtype), "w_dtype": str(w_GKN.dtype),
                          "row_align": row_align, "top_k": m.num_experts_per_tok, "calls": 0,
                          "recipe": recipe})["calls"] += 1
    return real["grouped"](x_MK, w_GKN, group_sizes_G, probe_2, backend, recipe, row_align)

  def experts(x_TD, copy_M, rows_TK, weights_TK, w1, w2, sizes, probe_up, probe_down,
              backend="auto", recipe=fp8_gemm.FULL_RECIPE, row_align=1):
    key = ("experts", x_TD.shape, w1.shape, w2.shape, str(x_TD.dtype), rows_TK.shape[1],
           copy_M.shape[0], row_align)
    seen.setdefault(key, {"op": "experts", "x": list(x_TD.shape), "w": list(w1.shape),
                          "w_down": list(w2.shape), "dtype": str(x_TD.dtype),
                          "w_dtype": str(w1.dtype), "top_k": rows_TK.shape[1],
                          "rows": copy_M.shape[0], "row_align": row_align, "calls": 0,
                          "recipe": recipe})["calls"] += 1
    return real["experts"](x_TD, copy_M, rows_TK, weights_TK, w1, w2, sizes, probe_up,
                           probe_down, backend, recipe, row_align)

  # Neither the initialisation's forward nor the one that shapes the FP8 probes (8 tokens each)
  # is recorded: only the step's.
  state = jax.eval_shape(train_lib.init_state_fn(m, t))
  batch = jax.eval_shape(lambda: _batch(config, 0))
  probes = train_lib.fp8_probes(m)
  saved = train_lib.fp8_probes
  fp8_gemm.fp8_linear, fp8_gemm.fp8_grouped_linear = linear, grouped
  fp8_experts.fused_expert_ffn = experts
  train_lib.fp8_probes = lambda *_: probes
  try:
    jax.eval_shape(functools.partial(_loss_and_grads, m=m, t=t), state, batch)
  finally:
    fp8_gemm.fp8_linear, fp8_gemm.fp8_grouped_linear = real["linear"], real["grouped"]
    fp8_experts.fused_expert_ffn = real["experts"]
    train_lib.fp8_probes = saved
  return list(seen.values())


def select_ops(recorded: list[dict[str, Any]], kinds: list[str]) -> list[dict[str, Any]]:
  """The recorded ops of the given kinds, kind by kind in `kinds`' order (stable within one)."""
  if unknown := sorted(set(kinds) - set(_OP_KIND_NAMES)):
    raise ValueError(f"--op_kinds: unknown {unknown}; choose from {', '.join(_OP_KIND_NAMES)}.")
  return sorted((op for op in recorded if op["op"] in kinds), key=lambda op: kinds.index(op["op"]))


def _batch(config: Any, seed: int) -> dict[str, np.ndarray]:
  t = config.train
  return data_lib.SyntheticBatches(t.batch_size, t.seq_len, config.model.vocab_size,
                                   seed).next_batch(0)


def _loss_and_grads(state: Any, batch: dict, *, m: Any, t: Any) -> tuple[jax.Array, Any]:
  """The training step's loss and gradients (no update)."""
  loss, _, grads = train_lib.accumulate_gradients(state, batch, m=m, t=t)
  return loss, grads


def _group_sizes(rows: int, groups: int, align: int, top_k: int, routing: str,
                 key: jax.Array) -> jax.Array:
  """Router-like expert sizes: the real rows (all but the padding room) spread multinomially
  over the groups as `routing` spreads tokens (see `_top_k_ids`), each padded up to `align`;
  their sum fits `rows`."""
  real = rows - groups * (align - 1) if align > 1 else rows
  real -= real % max(align, 1)
  k_hot, k_draw = jax.random.split(key)
  p = np.full(groups, 1.0 / groups)
  if routing == "collapsed":
    p /= _STRAY
    p[np.asarray(jax.random.permutation(k_hot, groups)[:top_k])] += (1 - 1 / _STRAY) / top_k
  sizes = np.random.default_rng(int(jax.random.randint(k_draw, (), 0, 2**30))).multinomial(real, p)
  sizes = -(-sizes // align) * align
  assert sizes.sum() <= rows, (sizes.sum(), rows)
  return jnp.asarray(sizes, jnp.int32)


def _top_k_ids(key: jax.Array, num_tokens: int, num_experts: int, top_k: int,
               routing: str) -> jax.Array:
  """Each token's top-k experts [T, K]: distinct and at random ("uniform"), or ("collapsed")
  one random set shared by every token but each `_STRAY`-th, which keeps its own."""
  k_own, k_hot = jax.random.split(key)
  ids_TK = jax.vmap(lambda k: jax.random.permutation(k, num_experts)[:top_k])(
      jax.random.split(k_own, num_tokens))
  if routing == "collapsed":
    hot_K = jax.random.permutation(k_hot, num_experts)[:top_k]
    stray_T = jnp.arange(num_tokens) % _STRAY == 0
    ids_TK = jnp.where(stray_T[:, None], ids_TK, hot_K[None])
  return ids_TK.astype(jnp.int32)


def _weight(key: jax.Array, shape, dtype) -> jax.Array:
  """A random weight [..., K, N] at 1 / sqrt(K), so that its products keep x's scale."""
  return (jax.random.normal(key, shape, jnp.float32) / np.sqrt(shape[-2])).astype(dtype)


def check_op(op: dict[str, Any], key: jax.Array, kernel_backend: str = "auto",
             routing: str = "uniform") -> dict[str, Any]:
  """Forward and backward of one FP8 op: kernels against the reference, and against bf16.
  `routing` ("uniform" or "collapsed", as --routing) spreads the rows of a grouped op or of the
  fused experts over the experts."""
  if routing not in ("uniform", "collapsed"):
    raise ValueError(f"routing must be 'uniform' or 'collapsed', got {routing!r}.")
  if op["op"] == "experts":
    return _check_experts(op, key, kernel_backend, routing)
  kx, kw, kd, kg = jax.random.split(key, 4)
  x = jax.random.normal(kx, op["x"], jnp.float32).astype(op["dtype"])
  w = _weight(kw, op["w"], op["w_dtype"])
  probe = jnp.zeros((2,), jnp.float32)
  if op["op"] == "linear":
    fn = lambda backend: (lambda x, w: fp8_gemm.fp8_linear(x, w, probe, backend, op["recipe"]))
    plain = lambda x, w: jnp.dot(x, w, preferred_element_type=jnp.float32).astype(x.dtype)
  else:
    sizes = _group_sizes(op["x"][0], op["w"][0], op["row_align"], op["top_k"], routing, kg)
    fn = lambda backend: (lambda x, w: fp8_gemm.fp8_grouped_linear(
        x, w, sizes, probe, backend, op["recipe"], op["row_align"]))
    plain = lambda x, w: gmm_lib.grouped_matmul(x, w, sizes)
  dy = jax.random.normal(kd, (op["x"][0], op["w"][-1]), jnp.float32).astype(op["dtype"])

  result = _compare(op, fn(kernel_backend), fn("reference"), plain, (x, w), dy)[0]
  if op["op"] == "grouped":
    result["largest_group"] = int(sizes.max())
  return result


def _compare(op, kernel, reference, plain, args, dy) -> tuple[dict[str, Any], tuple]:
  """y and the gradients of `args` (x, then the weights: dw the worst of them) of the kernel
  function against the reference's and the unquantised one's; also the kernel's and the
  reference's y (each from the forward compiled for its gradient)."""
  def run(f):
    y, vjp = jax.vjp(f, *args)
    dx, *dws = vjp(dy)
    return jax.device_get((y, dx, dws))

  start = time.time()
  got, ref, bf16 = (run(jax.jit(f)) for f in (kernel, reference, plain))
  result = {k: v for k, v in op.items() if k != "recipe"}
  result["seconds"] = time.time() - start
  for i, name in enumerate(("y", "dx", "dw")):
    g, r, b = got[i], ref[i], bf16[i]
    if name != "dw":
      g, r, b = [g], [r], [b]
    result[f"{name}_kernel_vs_ref"] = max(map(profiling.rel_error, g, r))
    result[f"{name}_worst_row"] = max(map(profiling.worst_row_error, g, r))
    result[f"{name}_fp8_vs_bf16"] = max(map(profiling.rel_error, r, b))
    result[f"{name}_finite"] = all(bool(np.isfinite(np.asarray(v, np.float32)).all()) for v in g)
  return result, (got[0], ref[0])


def _check_experts(op: dict[str, Any], key: jax.Array, kernel_backend: str,
                   routing: str) -> dict[str, Any]:
  """The fused expert FFN on `routing`'s top-k choices, against its reference and bf16's."""
  kx, kw, kw2, kd, kr, kp = jax.random.split(key, 6)
  num_tokens = op["x"][0]
  num_experts, top_k = op["w"][0], op["top_k"]
  x = jax.random.normal(kx, op["x"], jnp.float32).astype(op["dtype"])
  w1, w2 = _weight(kw, op["w"], op["w_dtype"]), _weight(kw2, op["w_down"], op["w_dtype"])
  ids_TK = _top_k_ids(kr, num_tokens, num_experts, top_k, routing)
  weights_TK = jax.random.uniform(kp, (num_tokens, top_k), jnp.float32, 0.1, 1.0)
  sizes_E, copy_M, rows_TK = dispatch.route_with_rows(ids_TK, num_experts, op["row_align"])
  assert copy_M.shape[0] == op["rows"], (copy_M.shape, op["rows"])
  probe = jnp.zeros((2,), jnp.float32)
  fn = lambda backend: (lambda x, w1, w2: fp8_experts.fused_expert_ffn(
      x, copy_M, rows_TK, weights_TK, w1, w2, sizes_E, probe, probe, backend, op["recipe"],
      op["row_align"]))
  plain = lambda x, w1, w2: dispatch.expert_ffn(x, ids_TK, weights_TK, w1, w2)
  dy = jax.random.normal(kd, op["x"], jnp.float32).astype(op["dtype"])
  result, (y_fused, y_ref_in_vjp) = _compare(op, fn(kernel_backend), fn("reference"), plain,
                                             (x, w1, w2), dy)
  # The separate ops (permute, two fp8_grouped_linears, unpermute; FP8 GEMMs on "auto") quantise
  # the same values forward: on a GPU the same kernels give the same codes, so their y differs
  # from the fused path's only by the combine's summation order.
  separate = lambda x, w1, w2: dispatch.expert_ffn(
      x, ids_TK, weights_TK, w1, w2, quant="fp8_blockwise", fp8_probes=(probe, probe),
      fp8_recipe=op["recipe"], fp8_group_align=op["row_align"], fp8_fused_dispatch=False)
  y_separate, y_ref = (jax.device_get(jax.jit(f)(x, w1, w2))
                       for f in (separate, fn("reference")))
  result["y_fused_vs_separate"] = profiling.rel_error(y_fused, y_separate)
  # For scale, what requantising the intermediates does to two runs with the same codes in and
  # GEMMs that differ only in accumulation order: the reference compiled alone against the
  # reference's forward compiled for its gradient (XLA picks each one's GEMMs), and the separate
  # ops against the reference (each of their GEMMs matches it as the "grouped" rows do).
  result["y_ref_vs_ref_in_vjp"] = profiling.rel_error(y_ref, y_ref_in_vjp)
  result["y_separate_vs_ref"] = profiling.rel_error(y_separate, y_ref)
  result["largest_group"] = int(sizes_E.max())
  return result


def _with_reference_fp8(fn):
  """Runs `fn` with "auto" FP8 resolving to the XLA reference (GEMMs and quantisation)."""
  saved = fp8_gemm._AUTO_USES_KERNEL, fp8_quant._AUTO_USES_KERNEL
  fp8_gemm._AUTO_USES_KERNEL = fp8_quant._AUTO_USES_KERNEL = False
  try:
    return fn()
  finally:
    fp8_gemm._AUTO_USES_KERNEL, fp8_quant._AUTO_USES_KERNEL = saved


def check_model(config: Any) -> list[dict[str, Any]]:
  """Loss and gradients at init, one batch: bf16, FP8 (kernels), FP8 (reference)."""
  rows, grads_of = [], {}
  for name, quant, reference in (("bf16", "none", False), ("fp8_kernels", "fp8_blockwise", False),
                                 ("fp8_reference", "fp8_blockwise", True)):
    c = ml_collections.ConfigDict(config.to_dict())
    c.model.quant = quant
    m, t = c.model, c.train
    state = jax.jit(train_lib.init_state_fn(m, t))()
    batch = _batch(c, 0)
    step = jax.jit(functools.partial(_loss_and_grads, m=m, t=t))
    start = time.time()
    run = functools.partial(lambda f, *args: jax.device_get(f(*args)), step, state, batch)
    loss, grads = _with_reference_fp8(run) if reference else run()
    grads_of[name] = grads
    norm = float(np.sqrt(sum(np.sum(np.square(np.asarray(g, np.float64)))
                             for g in jax.tree.leaves(grads))))
    rows.append({"variant": name, "loss": float(loss), "grad_norm": norm,
                 "seconds": time.time() - start})
    metrics_lib.log("[%s] loss %.5f, gradient norm %.4f (%.0f s)", name, loss, norm,
                    rows[-1]["seconds"])
    del state, run  # (the next variant's state takes the memory)
  flat = {k: jax.tree_util.tree_flatten_with_path(v)[0] for k, v in grads_of.items()}
  worst = []
  for (path, g), (_, r), (_, b) in zip(flat["fp8_kernels"], flat["fp8_reference"], flat["bf16"]):
    worst.append((jax.tree_util.keystr(path), profiling.rel_error(g, r), profiling.rel_error(r, b)))
  worst.sort(key=lambda w: -w[1])
  rows.append({"variant": "grad_leaves", "leaves": [
      {"path": p, "kernel_vs_ref": a, "fp8_ref_vs_bf16": b} for p, a, b in worst]})
  loss = {r["variant"]: r["loss"] for r in rows if "loss" in r}
  rows.append({"variant": "loss_gap", "kernels_vs_reference": abs(
      loss["fp8_kernels"] - loss["fp8_reference"]) / abs(loss["fp8_reference"]),
               "reference_vs_bf16": abs(loss["fp8_reference"] - loss["bf16"]) / abs(loss["bf16"])})
  return rows


def failures(ops: list[dict[str, Any]], tolerance: float,
             requant_tolerance: float | None = None, row_tolerance: float | None = None,
             requant_row_tolerance: float | None = None) -> list[dict[str, Any]]:
  """The ops whose kernels differ from the reference by more than `tolerance` (the fused
  experts: `requant_tolerance`, None for `tolerance`; and their forward from the separate ops'
  by more than `tolerance`), whose worst row does by more than `row_tolerance` (the fused
  experts: `requant_row_tolerance`; None: not checked), or not finite."""
  worst = lambda o, kind: max(o[f"{g}_{kind}"] for g in ("y", "dx", "dw"))
  fused = lambda o: o["op"] == "experts"
  limit = lambda o: requant_tolerance if fused(o) and requant_tolerance is not None else tolerance
  row_limit = lambda o: requant_row_tolerance if fused(o) else row_tolerance
  return [o for o in ops if not worst(o, "kernel_vs_ref") <= limit(o)
          or not o.get("y_fused_vs_separate", 0.0) <= tolerance
          or (row_limit(o) is not None and not worst(o, "worst_row") <= row_limit(o))
          or not (o["y_finite"] and o["dx_finite"] and o["dw_finite"])]


def _markdown(ops: list[dict[str, Any]], model: list[dict[str, Any]], tol: float,
              requant_tol: float) -> str:
  lines = []
  if ops:
    lines += [f"FP8 ops, kernels against the reference (relative Frobenius error; tolerance "
              f"{tol:g}, the fused experts {requant_tol:g}); FP8 against bf16 for scale:", "",
              "| op | x | w | align | largest group | traced | y | dx | dw | worst row y / dx / dw "
              "| y fp8/bf16 | dx fp8/bf16 | dw fp8/bf16 |",
              "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for o in ops:
      lines.append(
          f"| {o['op']} | {o['x']} {o['dtype']} | {o['w']} {o['w_dtype']} "
          f"| {o.get('row_align', '-')} | {o.get('largest_group', '-')} | {o['calls']} "
          f"| {o['y_kernel_vs_ref']:.2e} "
          f"| {o['dx_kernel_vs_ref']:.2e} | {o['dw_kernel_vs_ref']:.2e} "
          f"| {o['y_worst_row']:.1e} / {o['dx_worst_row']:.1e} / {o['dw_worst_row']:.1e} "
          f"| {o['y_fp8_vs_bf16']:.2e} | {o['dx_fp8_vs_bf16']:.2e} | {o['dw_fp8_vs_bf16']:.2e} |")
    lines += ["", *(f"Fused experts x{o['x']}: y against the separate ops' (same kernels, same "
                     f"codes forward) {o['y_fused_vs_separate']:.2e}. For scale: the "
                     f"reference against its forward compiled for its gradient "
                     f"{o['y_ref_vs_ref_in_vjp']:.2e}; the separate ops against the reference "
                     f"{o['y_separate_vs_ref']:.2e}."
                     for o in ops if "y_fused_vs_separate" in o)]
  if model:
    lines += ["", "Model at initialisation, one batch:", "", "| variant | loss | gradient norm |",
              "|---|---:|---:|"]
    lines += [f"| {r['variant']} | {r['loss']:.5f} | {r['grad_norm']:.4f} |"
              for r in model if "loss" in r]
    gap = [r for r in model if r["variant"] == "loss_gap"]
    if gap:
      lines += ["", f"Loss gap: FP8 kernels against FP8 reference "
                f"{gap[0]['kernels_vs_reference']:.2e}; FP8 reference against bf16 "
                f"{gap[0]['reference_vs_bf16']:.2e} (relative)."]
    leaves = [r for r in model if r["variant"] == "grad_leaves"]
    if leaves:
      lines += ["", "Gradient leaves, FP8 kernels against FP8 reference (worst 12):", "",
                "| leaf | kernels vs reference | reference vs bf16 |", "|---|---:|---:|"]
      lines += [f"| {x['path']} | {x['kernel_vs_ref']:.2e} | {x['fp8_ref_vs_bf16']:.2e} |"
                for x in leaves[0]["leaves"][:12]]
  return "\n".join(lines) + "\n"


def main(argv: list[str]) -> None:
  del argv
  config = _CONFIG.value
  config.model.quant = "fp8_blockwise"
  trainer.validate_config(config)
  os.makedirs(_OUT_DIR.value, exist_ok=True)
  ops, model = [], []

  def write():
    with open(os.path.join(_OUT_DIR.value, "check.json"), "w") as f:
      json.dump({"ops": ops, "model": model}, f, indent=1)
    with open(os.path.join(_OUT_DIR.value, "check.md"), "w") as f:
      f.write(_markdown(ops, model, _TOLERANCE.value, _REQUANT_TOLERANCE.value))

  if "ops" in _PARTS.value:
    kinds = _OP_KINDS.value
    try:
      select_ops([], kinds)  # the flag's error before the trace
    except ValueError as e:
      raise app.UsageError(str(e)) from None
    recorded = record_ops(config)
    metrics_lib.log("%d distinct FP8 ops in the model's step; checking the %s ones",
                    len(recorded), ", ".join(kinds))
    recorded = select_ops(recorded, kinds)
    for i, op in enumerate(recorded):
      ops.append(check_op(op, jax.random.key(i), _KERNEL_BACKEND.value, _ROUTING.value))
      o = ops[-1]
      metrics_lib.log("%s x%s w%s align %s largest group %s: kernel/ref y %.2e dx %.2e dw %.2e "
                      "(worst row %.1e / %.1e / %.1e; %.0f s)", o["op"], o["x"], o["w"],
                      o.get("row_align", "-"), o.get("largest_group", "-"), o["y_kernel_vs_ref"],
                      o["dx_kernel_vs_ref"], o["dw_kernel_vs_ref"], o["y_worst_row"],
                      o["dx_worst_row"], o["dw_worst_row"], o["seconds"])
      write()
  if "model" in _PARTS.value:
    model = check_model(config)
    write()
  print(_markdown(ops, model, _TOLERANCE.value, _REQUANT_TOLERANCE.value), flush=True)
  bad = failures(ops, _TOLERANCE.value, _REQUANT_TOLERANCE.value, _ROW_TOLERANCE.value,
                 _REQUANT_ROW_TOLERANCE.value)
  gap = [r["kernels_vs_reference"] for r in model if r["variant"] == "loss_gap"]
  if bad or (gap and not gap[0] <= _LOSS_TOLERANCE.value):
    print(f"FP8 KERNEL CHECK FAIL: {len(bad)} of {len(ops)} ops; model loss gap "
          f"{gap[0] if gap else 'not run'}", flush=True)
    sys.exit(1)
  print(f"FP8 KERNEL CHECK PASS ({len(ops)} ops)", flush=True)


if __name__ == "__main__":
  app.run(main)
