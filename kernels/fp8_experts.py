"""The routed experts' SwiGLU FFN in FP8 as one custom VJP, its data movement inside the
quantisations.

`dispatch.expert_ffn`'s FP8 path as separate ops (`dispatch.permute`, two
`fp8_gemm.fp8_grouped_linear`s, the SwiGLU and `dispatch.unpermute` between them) writes four
[M, *] tensors in the input dtype that only a quantise kernel then reads: the token copies x,
the SwiGLU's output, the output gradient's rows (router weights multiplied in) and the SwiGLU's
gradient. Here the quantise kernel (`fp8_quant.quantize_tiles_with_transpose`) makes each of
them from its own inputs as it reads them, and writes only their E4M3 codes:
  - x: token rows read by index (`src_M`);
  - the SwiGLU's output: from the first projection's output h = [gate | up] (`prologue=
    "swiglu"`);
  - the second projection's output gradient: the combined output's gradient read by index,
    times each row's router weight (`src_M`, `mult_M`);
  - the SwiGLU's gradient [dgate | dup]: from h and the second projection's input gradient
    (`prologue="swiglu_grad"`; `_SWIGLU_GRAD_IN_QUANTIZE`, off: XLA makes it, then the kernel
    quantises it).
Each is what the separate ops compute, rounded to the input dtype where they would store it, so
the two paths differ only where those ops round differently (the output gradient's rows: the
separate path rounds weight * dout to the input dtype first; the SwiGLU's gradient: its formula
against autodiff's). On the reference backend (CPU) XLA computes each tensor, then quantises.

Ling's full recipe only (fprop, dgrad and wgrad in E4M3); `dispatch.expert_ffn` takes this path
with it unless `fp8_fused_dispatch` is off.

Shape key: T tokens, K experts per token, M rows (copies sorted by expert, padding rows
included), D model dim, F expert width, E experts.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from kernels import dispatch
from kernels import fp8_gemm
from kernels import fp8_quant as fq

# The SwiGLU's gradient made inside dh's quantisation (prologue "swiglu_grad") while this is
# True; else XLA computes dh (one fusion) and the kernel quantises it. Off: on an H200 (session
# 13, Ling-mini, 425,728 rows) the kernel took 1.27 ms a layer at its 8 warps (3.81 at 4)
# against 1.23 for XLA's fusion then the kernel: no gain to pay for a second code path in the
# step. The forward's "swiglu" prologue is on: 0.51 ms against 0.68.
# `python -m kernels.fp8_quant_triton --gathered` times both at 4, 8 and 16 warps.
_SWIGLU_GRAD_IN_QUANTIZE = False


def _swap(s):
  return jnp.swapaxes(s, 1, 2)


@functools.partial(jax.custom_vjp, nondiff_argnums=(9, 10, 11))
def fused_expert_ffn(x_TD: jax.Array, copy_M: jax.Array, rows_TK: jax.Array,
                     weights_TK: jax.Array, w_gate_up_EDF2: jax.Array, w_down_EFD: jax.Array,
                     group_sizes_E: jax.Array, probe_up: jax.Array, probe_down: jax.Array,
                     backend: str = "auto", recipe: fp8_gemm.Fp8Recipe = fp8_gemm.FULL_RECIPE,
                     row_align: int = 1) -> jax.Array:
  """y_T = sum_k weights[t, k] * down_e(silu(gate_e(x_t)) * up_e(x_t)), every GEMM in FP8.

  Args:
    x_TD: the tokens.
    copy_M: int32, each row's copy t * K + k (`dispatch.permute`'s sort_idx; padding rows at
      T * K and past read as zeros).
    rows_TK: int32, the row of each copy (copy_M's inverse).
    weights_TK: the router weights; differentiable.
    w_gate_up_EDF2, w_down_EFD: the experts' weights, [gate | up] fused.
    group_sizes_E: rows per expert (padding included).
    probe_up, probe_down: [2] arrays whose cotangents are the two projections' output-gradient
      metrics, as for `fp8_gemm.fp8_grouped_linear`.
    backend, recipe, row_align: as for `fp8_gemm.fp8_grouped_linear`.
  Returns:
    y_TD in x's dtype, combined in fp32.
  """
  return _fwd(x_TD, copy_M, rows_TK, weights_TK, w_gate_up_EDF2, w_down_EFD, group_sizes_E,
              probe_up, probe_down, backend, recipe, row_align)[0]


def _quantizer(copy_M, group_sizes_E, recipe, backend, row_align):
  """Both layouts of an [M, *] operand with the experts' row tiles, and the tiles."""
  tile_ids_M, num_tiles = fq.row_tile_ids(copy_M.shape[0], group_sizes_E)
  quant = functools.partial(fq.quantize_tiles_with_transpose, tile_ids_M=tile_ids_M,
                            num_tiles=num_tiles, pow2_scales=recipe.pow2_scales,
                            backend=fp8_gemm._quant_backend(backend), row_align=row_align)
  return quant, tile_ids_M, num_tiles


def _fwd(x_TD, copy_M, rows_TK, weights_TK, w_gate_up_EDF2, w_down_EFD, group_sizes_E, probe_up,
         probe_down, backend, recipe, row_align):
  if not (recipe.fprop and recipe.dgrad and recipe.wgrad):
    raise ValueError(f"fused_expert_ffn: needs all three GEMMs in FP8, got {recipe}. Use "
                     "dispatch.expert_ffn(fp8_fused_dispatch=False) for other recipes.")
  top_k = rows_TK.shape[1]
  quant, _, _ = _quantizer(copy_M, group_sizes_E, recipe, backend, row_align)
  qb, pow2 = fp8_gemm._quant_backend(backend), recipe.pow2_scales
  # Each weight's codes K-major for fprop ([E, N, K]) and dgrad ([E, K, N]), with its scales.
  w1_GKN, w1_GNK, w1_s = fq.quantize_blocks_with_transpose(w_gate_up_EDF2, pow2, backend=qb)
  w2_GKN, w2_GNK, w2_s = fq.quantize_blocks_with_transpose(w_down_EFD, pow2, backend=qb)
  gmm = functools.partial(fp8_gemm.fp8_grouped_matmul, group_sizes_G=group_sizes_E,
                          out_dtype=x_TD.dtype, backend=backend)
  x_q, x_s, xt_q, xt_s = quant(x_TD, src_M=copy_M // top_k)
  h_MF2 = gmm(x_q, x_s, w1_GNK, _swap(w1_s))
  a_q, a_s, at_q, at_s = quant(h_MF2, prologue="swiglu")
  y_MD = gmm(a_q, a_s, w2_GNK, _swap(w2_s))
  with jax.named_scope("dispatch"):  # the un-permutation's part, for profiles
    y_TD = dispatch._combine_rows(y_MD, rows_TK.reshape(-1), weights_TK)
  dtypes = (jnp.zeros((0,), x_TD.dtype), jnp.zeros((0,), w_gate_up_EDF2.dtype),
            jnp.zeros((0,), w_down_EFD.dtype))
  measure = (fp8_gemm.metrics_wanted(probe_up), fp8_gemm.metrics_wanted(probe_down))
  res = ((xt_q, xt_s), (at_q, at_s), h_MF2, y_MD, (w1_GKN, w1_s), (w2_GKN, w2_s), group_sizes_E,
         copy_M, rows_TK, weights_TK, dtypes, measure)
  return y_TD, res


def _bwd(backend, recipe, row_align, res, dy_TD):
  (xt, at, h_MF2, y_MD, w1, w2, group_sizes_E, copy_M, rows_TK, weights_TK,
   (x_dt, w1_dt, w2_dt), (measure_up, measure_down)) = res
  num_tokens, top_k = rows_TK.shape
  _, tile_ids_M, num_tiles = _quantizer(copy_M, group_sizes_E, recipe, backend, row_align)
  quant_grad = functools.partial(fp8_gemm._quantize_dy, tile_ids_M=tile_ids_M,
                                 num_tiles=num_tiles, pow2=recipe.pow2_scales, backend=backend,
                                 row_align=row_align)
  gmm = functools.partial(fp8_gemm.fp8_grouped_matmul, group_sizes_G=group_sizes_E,
                          out_dtype=x_dt.dtype, backend=backend)
  tgmm = functools.partial(fp8_gemm.fp8_transposed_grouped_matmul, tile_ids_M=tile_ids_M,
                           group_sizes_G=group_sizes_E, backend=backend, row_align=row_align)
  # The second projection's output gradient: row m is weights[c] * dy[c // K], c = copy_M[m].
  mult_M = weights_TK.reshape(-1)[jnp.minimum(copy_M, weights_TK.size - 1)]
  dy_q, dy_s, dyt_q, dyt_s, dy_metrics = quant_grad(
      dy_TD, measure=measure_down, src_M=copy_M // top_k, mult_M=mult_M.astype(jnp.float32))
  d_act_MF = gmm(dy_q, dy_s, *w2)
  dw2 = tgmm(*at, dyt_q, dyt_s, out_dtype=w2_dt.dtype)
  # The first projection's output gradient: the SwiGLU's, from h and d_act.
  if _SWIGLU_GRAD_IN_QUANTIZE:
    dh_from, made_in_kernel = h_MF2, dict(prologue="swiglu_grad", aux=d_act_MF)
  else:
    dh_from, made_in_kernel = fq.apply_prologue(h_MF2, "swiglu_grad", d_act_MF), {}
  dh_q, dh_s, dht_q, dht_s, dh_metrics = quant_grad(dh_from, measure=measure_up,
                                                    **made_in_kernel)
  dx_MD = gmm(dh_q, dh_s, *w1)
  dw1 = tgmm(*xt, dht_q, dht_s, out_dtype=w1_dt.dtype)
  with jax.named_scope("dispatch"):  # the permutations' parts, for profiles
    # Each token's K rows summed in fp32 (padding rows are nobody's copy and are never read).
    dx_TD = dispatch._combine_rows(dx_MD, rows_TK.reshape(-1),
                                   jnp.ones(rows_TK.shape, jnp.float32))
    dweights_TK = dispatch._combine_weights_grad(y_MD[rows_TK], dy_TD)
  zeros = lambda a: np.zeros(a.shape, jax.dtypes.float0)
  return (dx_TD, zeros(copy_M), zeros(rows_TK), dweights_TK.astype(weights_TK.dtype), dw1, dw2,
          zeros(group_sizes_E), dh_metrics, dy_metrics)


fused_expert_ffn.defvjp(_fwd, _bwd)
