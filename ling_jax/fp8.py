"""FP8 training (Ling 2.0 recipe, ../shared/ling2_spec.md section 7): the switch, the FP8
linear layer, the expert path's plumbing and the safeguard metrics.

`config.model.quant = "fp8_blockwise"` runs every dense projection (attention QKV and output,
dense and shared-expert SwiGLU, the MTP projection) and the routed experts' grouped matmuls
through the FP8 ops of `kernels/fp8_gemm.py`: E4M3 operands in fprop, dgrad and wgrad, fp32
scales per 1x128 tile of activations and gradients and per 128x128 block of weights, fp32
accumulation. The router (fp32), embedding, LM head, norms and attention core are unchanged.

Safeguard metrics, [underflow, cosine] per FP8 op (see `fp8_quant.quant_metrics`):
  - activations and weights: written in the forward pass to the model's stats collection
    (`fp8_act`, `fp8_weight`), next to the MoE token counts;
  - output gradients: each op takes a zero probe from the `fp8_probes` collection, and its
    backward pass returns the gradient's metrics as the probe's cotangent, so differentiating
    the loss with respect to the probes yields them. `train.accumulate_gradients` does this.
`summarize` turns both into the scalars the trainer logs (mean and worst over ops).
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from kernels import fp8_gemm
from kernels import fp8_quant

STATS = "moe_stats"  # the model's per-call stats collection (moe.STATS; no import cycle)
PROBES = "fp8_probes"  # zero [2] arrays whose gradients are the output-gradient metrics
_KINDS = ("act", "weight", "grad")


def enabled(m: Any) -> bool:
  """Returns whether the model config asks for FP8 linear layers."""
  return m.get("quant", "none") == "fp8_blockwise"


def activation_metrics(x: jax.Array) -> jax.Array:
  """[underflow, cosine] of x quantised in 1x128 tiles along its last axis."""
  q, scale = fp8_quant.quantize_tiles(x)
  return fp8_quant.quant_metrics(x, q, fp8_quant.dequantize_tiles(q, scale))


def weight_metrics(w: jax.Array) -> jax.Array:
  """[underflow, cosine] of w quantised in 128x128 blocks over its last two axes."""
  q, scale = fp8_quant.quantize_blocks(w)
  return fp8_quant.quant_metrics(w, q, fp8_quant.dequantize_blocks(q, scale))


def probe(module: nn.Module, name: str = "grad") -> jax.Array:
  """A gradient probe of the module: a zero [2] from `fp8_probes` when the caller passed that
  collection (training), else a constant zero (evaluation, generation: nothing to measure)."""
  if module.is_initializing() or module.has_variable(PROBES, name):
    return module.variable(PROBES, name, jnp.zeros, (2,), jnp.float32).value
  return jnp.zeros((2,), jnp.float32)


def record(module: nn.Module, name: str, metrics_2: jax.Array) -> None:
  """Writes one FP8 op's forward metrics to the stats collection; `name` starts with
  `fp8_act` or `fp8_weight`, which is how `summarize` sorts them."""
  module.variable(STATS, name, jnp.zeros, (2,), jnp.float32).value = metrics_2


class Dense(nn.Module):
  """Bias-free FP8 projection; the same `kernel` parameter as `nn.Dense`, so checkpoints of
  either kind load into the other."""
  features: int
  kernel_init: Any
  dtype: Any = jnp.bfloat16
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kernel = self.param("kernel", self.kernel_init, (x.shape[-1], self.features),
                        self.param_dtype)
    x_MK = x.astype(self.dtype).reshape(-1, x.shape[-1])
    w_KN = kernel.astype(self.dtype)
    record(self, "fp8_act", activation_metrics(x_MK))
    record(self, "fp8_weight", weight_metrics(w_KN))
    y_MN = fp8_gemm.fp8_linear(x_MK, w_KN, probe(self))
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
