"""FP8 training (Ling 2.0 recipe, ../shared/ling2_spec.md section 7): the switch, the FP8
linear layer, the expert path's plumbing and the safeguard metrics.

`config.model.quant = "fp8_blockwise"` runs every dense projection (attention QKV and output,
dense and shared-expert SwiGLU) and the routed experts' grouped matmuls
through the FP8 ops of `kernels/fp8_gemm.py`: E4M3 operands in fprop, dgrad and wgrad, fp32
scales per 1x128 tile of activations and gradients and per 128x128 block of weights, fp32
accumulation. The router (fp32), embedding, LM head, MTP projection, norms and attention core are
unchanged.

`config.model.fp8_recipe` picks which GEMMs run in FP8 (`RECIPES`): "full" is Ling's recipe; the
others are ablations that keep a pass (fprop, dgrad or wgrad), the attention output projection,
the dense projections or the experts in the model dtype, or round scales to powers of two.
`recipe_for(m, role)` gives each kind of projection its `fp8_gemm.Fp8Recipe`, or None where it
stays unquantised.

Safeguard metrics, [underflow, cosine] per FP8 op (see `fp8_quant.quant_metrics`):
  - activations and weights: written in the forward pass to the model's stats collection
    (`fp8_act`, `fp8_weight`), next to the MoE token counts;
  - output gradients: each op takes a probe from the `fp8_probes` collection, and its
    backward pass returns the gradient's metrics as the probe's cotangent, so differentiating
    the loss with respect to the probes yields them. `train.accumulate_gradients` does this.
`summarize` turns both into the scalars the trainer logs (mean and worst over ops).
A probe's value never reaches the model's outputs; its first element says whether the metrics
are measured at all (`fp8_gemm.metrics_wanted`): zero probes (the default, evaluation) measure
them, `fp8_gemm.SKIP_METRICS` skips both the forward and the backward ones (conds: none of
their quantisations and reductions run; they read zero). `train.train_step` measures on the
steps the trainer logs only (`train.fp8_metrics_due`).
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from kernels import fp8_gemm
from kernels import fp8_quant

_FULL = fp8_gemm.FULL_RECIPE
_ONLY = {p: fp8_gemm.Fp8Recipe(**{q: q == p for q in ("fprop", "dgrad", "wgrad")})
         for p in ("fprop", "dgrad", "wgrad")}
# Roles: "dense" (attention QKV, dense and shared-expert SwiGLU), "attn_out" (the attention
# output projection; DeepSeek-V3 keeps its input in higher precision, since the attention
# backward reuses it), "experts" (the routed experts' grouped GEMMs). None: the model dtype.
# The experts' entry reaches dispatch.expert_ffn through ling_jax/moe.py and
# expert_parallel.expert_ffn: the full recipe runs as `fp8_experts.fused_expert_ffn` (unless
# model.fp8_fused_dispatch is off), the others as two `fp8_gemm.fp8_grouped_linear`s.
ROLES = ("dense", "attn_out", "experts")
RECIPES: dict[str, dict[str, fp8_gemm.Fp8Recipe | None]] = {
    "full": dict.fromkeys(ROLES, _FULL),
    "fprop_only": dict.fromkeys(ROLES, _ONLY["fprop"]),
    "dgrad_only": dict.fromkeys(ROLES, _ONLY["dgrad"]),
    "wgrad_only": dict.fromkeys(ROLES, _ONLY["wgrad"]),
    "bf16_attn_out": {"dense": _FULL, "attn_out": None, "experts": _FULL},
    "experts_only": {"dense": None, "attn_out": None, "experts": _FULL},
    "dense_only": {"dense": _FULL, "attn_out": _FULL, "experts": None},
    "pow2_scales": dict.fromkeys(ROLES, fp8_gemm.Fp8Recipe(pow2_scales=True)),
}
STATS = "moe_stats"  # the model's per-call stats collection (moe.STATS; no import cycle)
PROBES = "fp8_probes"  # zero [2] arrays whose gradients are the output-gradient metrics
_KINDS = ("act", "weight", "grad")


def enabled(m: Any) -> bool:
  """Returns whether the model config asks for FP8 linear layers."""
  return m.get("quant", "none") == "fp8_blockwise"


def recipe_for(m: Any, role: str) -> fp8_gemm.Fp8Recipe | None:
  """The FP8 recipe of one kind of projection (`ROLES`), or None where it runs unquantised."""
  if role not in ROLES:
    raise ValueError(f"fp8.recipe_for: unknown role {role!r}; use one of {ROLES}.")
  if not enabled(m):
    return None
  return RECIPES[m.get("fp8_recipe", "full")][role]


def activation_metrics(x: jax.Array, pow2_scales: bool = False) -> jax.Array:
  """[underflow, cosine] of x quantised in 1x128 tiles along its last axis.

  Metrics, not part of the loss: no gradient flows through them. (On Hopper the quantisation is
  a Pallas kernel, which cannot be differentiated; x's tangent must not reach it.)
  """
  x = jax.lax.stop_gradient(x)
  q, scale = fp8_quant.quantize_tiles(x, pow2_scales=pow2_scales)
  return fp8_quant.quant_metrics(x, q, fp8_quant.dequantize_tiles(q, scale))


def weight_metrics(w: jax.Array, pow2_scales: bool = False) -> jax.Array:
  """[underflow, cosine] of w quantised in 128x128 blocks over its last two axes (no gradient,
  as `activation_metrics`)."""
  w = jax.lax.stop_gradient(w)
  q, scale = fp8_quant.quantize_blocks(w, pow2_scales=pow2_scales)
  return fp8_quant.quant_metrics(w, q, fp8_quant.dequantize_blocks(q, scale))


def probe(module: nn.Module, name: str = "grad") -> jax.Array:
  """A gradient probe of the module: a [2] from `fp8_probes` when the caller passed that
  collection (training), else a constant zero (evaluation, generation: nothing to take the
  gradient's metrics out, and the forward metrics are measured)."""
  if module.is_initializing() or module.has_variable(PROBES, name):
    return module.variable(PROBES, name, jnp.zeros, (2,), jnp.float32).value
  return jnp.zeros((2,), jnp.float32)


def measured(probe_2: jax.Array, metrics_fn) -> jax.Array:
  """metrics_fn() where the op's probe asks for metrics, else zeros, in a cond (module doc)."""
  return jax.lax.cond(fp8_gemm.metrics_wanted(probe_2), metrics_fn,
                      lambda: jnp.zeros((2,), jnp.float32))


def record(module: nn.Module, name: str, metrics_2: jax.Array) -> None:
  """Writes one FP8 op's forward metrics to the stats collection; `name` starts with
  `fp8_act` or `fp8_weight`, which is how `summarize` sorts them."""
  module.variable(STATS, name, jnp.zeros, (2,), jnp.float32).value = metrics_2


class Dense(nn.Module):
  """Bias-free FP8 projection; the same `kernel` parameter as `nn.Dense`, so checkpoints of
  either kind load into the other. `recipe`: which of its GEMMs run in FP8; `backend`: theirs
  (`fp8_gemm`'s module doc, `config.model.fp8_backend`)."""
  features: int
  kernel_init: Any
  dtype: Any = jnp.bfloat16
  param_dtype: Any = jnp.float32
  recipe: fp8_gemm.Fp8Recipe = fp8_gemm.FULL_RECIPE
  backend: str = "auto"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kernel = self.param("kernel", self.kernel_init, (x.shape[-1], self.features),
                        self.param_dtype)
    x_MK = x.astype(self.dtype).reshape(-1, x.shape[-1])
    w_KN = kernel.astype(self.dtype)
    pow2 = self.recipe.pow2_scales
    probe_2 = probe(self)
    record(self, "fp8_act", measured(probe_2, lambda: activation_metrics(x_MK, pow2)))
    record(self, "fp8_weight", measured(probe_2, lambda: weight_metrics(w_KN, pow2)))
    y_MN = fp8_gemm.fp8_linear(x_MK, w_KN, probe_2, self.backend, self.recipe)
    return y_MN.reshape(*x.shape[:-1], self.features)


def init_probes(variables: dict) -> Any:
  """Returns the zero probes of a model's variables (from `init`), or {} without FP8."""
  return jax.tree.map(jnp.zeros_like, variables.get(PROBES, {}))


def summarize(stats: Any, probe_grads: Any) -> dict[str, jax.Array]:
  """Returns the logged scalars: `fp8_{act,weight,grad}_{underflow,cos}` averaged over every FP8
  op, and `..._underflow_max` / `..._cos_min`, the worst op. {} when nothing ran in FP8."""
  flat = traverse_util.flatten_dict(stats) if stats else {}
  per_kind = {
      "act": [v for k, v in flat.items() if k[-1].startswith("fp8_act")],
      "weight": [v for k, v in flat.items() if k[-1].startswith("fp8_weight")],
      "grad": jax.tree.leaves(probe_grads),
  }
  out = {}
  for kind in _KINDS:
    if not per_kind[kind]:
      continue
    ops_2 = jnp.concatenate([v.reshape(-1, 2) for v in per_kind[kind]])
    out[f"fp8_{kind}_underflow"] = jnp.mean(ops_2[:, 0])
    out[f"fp8_{kind}_underflow_max"] = jnp.max(ops_2[:, 0])
    out[f"fp8_{kind}_cos"] = jnp.mean(ops_2[:, 1])
    out[f"fp8_{kind}_cos_min"] = jnp.min(ops_2[:, 1])
  return out


def parity_report(baseline: dict[int, dict[str, float]], fp8: dict[int, dict[str, float]],
            window: int) -> dict[str, Any]:
  """Returns the FP8-against-baseline numbers of two runs' metrics (`metrics.read_jsonl` output).

  The final loss of each run is the mean over its last `window` logged steps; `curve` holds the
  `window`-step means, `validation` the evaluated steps (experiments/fp8_parity.py).
  """
  steps = sorted(set(s for s, r in baseline.items() if "loss" in r)
                 & set(s for s, r in fp8.items() if "loss" in r))
  if len(steps) < window:
    raise ValueError(f"--window: the runs share {len(steps)} logged steps, fewer than the "
                     f"window of {window}. Fix: log every step or lower --window.")
  base_loss = np.array([baseline[s]["loss"] for s in steps])
  fp8_loss = np.array([fp8[s]["loss"] for s in steps])
  final_base, final_fp8 = float(base_loss[-window:].mean()), float(fp8_loss[-window:].mean())
  curve = []
  for end in range(window, len(steps) + 1, window):
    sl = slice(end - window, end)
    curve.append({"step": steps[end - 1], "baseline": float(base_loss[sl].mean()),
                  "fp8": float(fp8_loss[sl].mean())})
  result = {"final_baseline": final_base, "final_fp8": final_fp8,
            "relative_difference": final_fp8 / final_base - 1.0, "curve": curve,
            "window": window, "steps": steps[-1]}
  vals = [(s, baseline[s].get("val_loss"), fp8.get(s, {}).get("val_loss")) for s in steps]
  result["validation"] = [{"step": s, "baseline": b, "fp8": f} for s, b, f in vals
                          if b is not None and f is not None]
  return result


def parity_markdown(result: dict[str, Any], baseline_name: str) -> str:
  """Returns the parity report as Markdown."""
  w = result["window"]
  lines = [f"Final training loss (mean of the last {w} steps): {baseline_name} "
           f"{result['final_baseline']:.4f}, FP8 {result['final_fp8']:.4f}, "
           f"relative difference {result['relative_difference']:+.2%}.", "",
           f"| steps | {baseline_name} loss ({w}-step mean) | FP8 loss | rel. diff |",
           "|---:|---:|---:|---:|"]
  for p in result["curve"]:
    lines.append(f"| {p['step'] - w + 1}-{p['step']} | {p['baseline']:.4f} | {p['fp8']:.4f} "
                 f"| {p['fp8'] / p['baseline'] - 1:+.2%} |")
  if result["validation"]:
    lines += ["", f"| step | {baseline_name} val loss | FP8 val loss | rel. diff |",
              "|---:|---:|---:|---:|"]
    lines += [f"| {v['step']} | {v['baseline']:.4f} | {v['fp8']:.4f} | "
              f"{v['fp8'] / v['baseline'] - 1:+.2%} |" for v in result["validation"]]
  return "\n".join(lines) + "\n"


def ablation_rows(runs: dict[str, dict[int, dict[str, float]]], baseline: str, reference: str,
                  window: int) -> list[dict[str, Any]]:
  """Compares several runs' losses over the steps all of them logged (experiments/fp8_parity.py).

  Each row: the run, its final loss (mean of the last `window` shared steps), that relative to
  the `baseline` run's and to the `reference` run's (the full FP8 recipe), and `gaps`, its
  relative difference from the baseline in each `window`-step mean (`spans`: their steps).
  """
  steps = sorted(set.intersection(*(set(s for s, r in m.items() if "loss" in r)
                                    for m in runs.values())))
  if len(steps) < window:
    raise ValueError(f"--window: the runs share {len(steps)} logged steps, fewer than the "
                     f"window of {window}. Fix: train longer or lower --window.")
  ends = range(window, len(steps) + 1, window)
  spans = [f"{steps[end - window]}-{steps[end - 1]}" for end in ends]
  means = {}
  for name, m in runs.items():
    loss = np.array([m[s]["loss"] for s in steps])
    means[name] = [float(loss[end - window:end].mean()) for end in ends]
  rows = []
  for name, curve in means.items():
    rows.append({"run": name, "final": curve[-1], "spans": spans,
                 "vs_baseline": curve[-1] / means[baseline][-1] - 1.0,
                 "vs_reference": curve[-1] / means[reference][-1] - 1.0,
                 "gaps": [c / b - 1.0 for c, b in zip(curve, means[baseline])]})
  return rows


def ablation_markdown(rows: list[dict[str, Any]], baseline_name: str) -> str:
  """Returns `ablation_rows` as a Markdown table."""
  spans = rows[0]["spans"]
  lines = [f"| run | final loss (steps {spans[-1]}) | vs {baseline_name} | vs full FP8 | "
           + " | ".join(f"vs {baseline_name}, steps {s}" for s in spans) + " |",
           "|---|---:|---:|---:|" + "---:|" * len(spans)]
  for r in rows:
    lines.append(f"| {r['run']} | {r['final']:.4f} | {r['vs_baseline']:+.2%} | "
                 f"{r['vs_reference']:+.2%} | " + " | ".join(f"{g:+.2%}" for g in r["gaps"])
                 + " |")
  return "\n".join(lines) + "\n"


def seed_summary(results: dict[int, dict[str, Any]]) -> dict[str, Any]:
  """Mean and spread over seeds of per-seed `parity_report` results ({seed: result}).

  One pair's gap is set as much by where two trajectories drift apart as by FP8 itself (about
  +-2% at the tiny config, BENCHMARKS.md), so the parity is judged on the mean gap over seeds,
  with its standard error beside it.
  """
  if not results:
    raise ValueError("--seeds: no seed's pair of runs finished. Fix: check the runs' logs.")
  seeds = sorted(results)
  gaps = np.array([results[s]["relative_difference"] for s in seeds])
  base = np.array([results[s]["final_baseline"] for s in seeds])
  quant = np.array([results[s]["final_fp8"] for s in seeds])
  std = float(gaps.std(ddof=1)) if len(seeds) > 1 else 0.0
  return {
      "seeds": seeds,
      "per_seed": [{"seed": s, "final_baseline": float(b), "final_fp8": float(q),
                    "relative_difference": float(g)}
                   for s, b, q, g in zip(seeds, base, quant, gaps)],
      "mean_relative_difference": float(gaps.mean()),
      "std_relative_difference": std,
      "stderr_relative_difference": std / np.sqrt(len(seeds)),
      "mean_final_baseline": float(base.mean()), "mean_final_fp8": float(quant.mean()),
      "window": results[seeds[0]]["window"],
  }


def parity_passed(gap: float, tolerance: float) -> bool:
  """fp8_parity's rule: FP8's relative final-loss gap lies within the tolerance, either way."""
  return abs(gap) <= tolerance


def parity_verdict(gap: float, tolerance: float, over: str = "") -> str:
  """fp8_parity's closing line: PASS by `parity_passed`, and which way the gap goes (a FAIL
  may be in FP8's favour)."""
  side = f"{abs(gap):.2%} {'above' if gap > 0 else 'below'}" if gap else "equal to"
  verdict = "PASS" if parity_passed(gap, tolerance) else "FAIL"
  return (f"PARITY {verdict}: FP8's final loss is {side} the baseline's{over} "
          f"(tolerance {tolerance:.1%})")


def seed_markdown(summary: dict[str, Any], baseline_name: str) -> str:
  """Returns `seed_summary` as Markdown: one row per seed, then the mean."""
  w = summary["window"]
  lines = [f"| seed | {baseline_name} final loss (last {w} steps) | FP8 final loss | rel. diff |",
           "|---:|---:|---:|---:|"]
  lines += [f"| {r['seed']} | {r['final_baseline']:.4f} | {r['final_fp8']:.4f} | "
            f"{r['relative_difference']:+.2%} |" for r in summary["per_seed"]]
  lines.append(f"| mean of {len(summary['seeds'])} | {summary['mean_final_baseline']:.4f} | "
               f"{summary['mean_final_fp8']:.4f} | {summary['mean_relative_difference']:+.2%} "
               f"(sd {summary['std_relative_difference']:.2%}, "
               f"s.e. {summary['stderr_relative_difference']:.2%}) |")
  return "\n".join(lines) + "\n"
