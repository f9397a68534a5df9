"""Sort-based MoE dispatch: copy tokens to their experts, run the experts, combine the results.

Dropless: every (token, expert) pair is computed. The copies are sorted by expert so that the expert
FFN is two grouped matmuls; the custom VJPs make both directions of the permutation plain gathers
(a permutation's transpose is its inverse), never scatter-adds.

With the full FP8 recipe `expert_ffn` hands the experts to `kernels/fp8_experts.py`, which makes
the copies inside its quantisations (`_route` gives it the sort order without them).

With `group_align` (the FP8 expert path), `permute` pads every expert's copies to a multiple of
that many rows through the routing map: extra copies of a zero row, sorted right after the
expert's own, with no router weight. Padding rows are zeros forward and get zero gradients back,
so they change no result; they let the FP8 quantise kernel store its per-expert tiles aligned.

The permute's row copies run as an XLA gather, or on Hopper GPUs as the Pallas Mosaic GPU
kernel `permute_mgpu.gather_rows` (bulk row copies; 1.3x XLA's gather on an H200). `backend`
picks it as it picks the grouped matmul: "auto" and "pallas_mosaic_gpu" use the kernel on Hopper
where it covers the shape, "pallas_mosaic_gpu_interpret" runs it in Pallas's GPU interpreter (CPU
tests), and the rest use XLA. The un-permute, router-weight multiply fused in, is XLA's fused
gather-reduce everywhere: it beat the Pallas `permute_mgpu.combine_rows` (see `_combine_rows`).

Shape key:
  T: tokens
  K: experts per token (top_k)
  M: token copies (T * K), sorted by expert, and with group_align the padding rows
  D: model dim
  E: experts
  F: expert width
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from kernels import grouped_matmul as gmm_lib


def _inverse_permutation(perm_M: jax.Array) -> jax.Array:
  """Returns inv with inv[perm[i]] = i, in O(M) instead of a second sort."""
  iota_M = jnp.arange(perm_M.shape[0], dtype=perm_M.dtype)
  return jnp.zeros_like(perm_M).at[perm_M].set(iota_M, unique_indices=True)


def _row_impl(backend: str) -> str:
  """Which row-move implementation goes with a grouped-matmul backend: xla, pallas, interpret."""
  if backend == "pallas_mosaic_gpu_interpret":
    return "interpret"
  if backend == "pallas_mosaic_gpu" or (backend == "auto" and gmm_lib._is_hopper_gpu()):
    return "pallas"
  gmm_lib._resolve_backend(backend)  # unknown names fail here, with the list of backends
  return "xla"


def _interpret_error(fn: str, shape, dtype) -> ValueError:
  return ValueError(
      f"{fn}: backend 'pallas_mosaic_gpu_interpret' has no permute kernel for {dtype}{shape}. "
      "Use bf16, fp16 or fp32 rows with D a multiple of 128, or backend='reference'.")


def _gather_rows(x_ND: jax.Array, rows_M: jax.Array, impl: str) -> jax.Array:
  """x[rows]: a Pallas kernel where one covers the shape, else an XLA gather."""
  if impl != "xla":
    from kernels import permute_mgpu  # lazy: keeps CPU imports free of Mosaic GPU

    num_sms = gmm_lib.INTERPRET_NUM_SMS if impl == "interpret" else None
    covered = permute_mgpu.gather_config(
        rows_M.shape[0], x_ND.shape[1], x_ND.dtype, num_sms) is not None
    if impl == "pallas" and covered:
      return permute_mgpu.gather_rows(x_ND, rows_M)
    if impl == "interpret":
      if not covered:
        raise _interpret_error("permute", list(x_ND.shape), x_ND.dtype)
      out_type = jax.ShapeDtypeStruct((rows_M.shape[0], x_ND.shape[1]), x_ND.dtype)
      return gmm_lib._as_pure_callback(
          gmm_lib._interpreted_kernel(permute_mgpu.gather_rows), out_type, x_ND, rows_M)
  return x_ND[rows_M]


def _combine_rows(y_MD: jax.Array, rows_M: jax.Array, weights_TK: jax.Array) -> jax.Array:
  """sum_k weights[t, k] * y[rows[t * K + k]] in fp32, in y's dtype.

  Always XLA: its gather-multiply-reduce fusion measured 4060 GB/s on an H200 at Ling-mini
  shapes against 3600 for `permute_mgpu.combine_rows` (BENCHMARKS.md), since this direction
  reads 8 rows for each row it writes and needs no write-side help.
  """
  num_tokens, top_k = weights_TK.shape
  y_TKD = y_MD[rows_M].reshape(num_tokens, top_k, y_MD.shape[-1])
  return _combine(y_TKD, weights_TK).astype(y_MD.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _copy_tokens(x_TD: jax.Array, sort_idx_M: jax.Array, top_k: int, impl: str,
                 num_tokens: int) -> jax.Array:
  if sort_idx_M.shape[0] == num_tokens * top_k:
    return _gather_rows(x_TD, sort_idx_M // top_k, impl)
  # Padding copies (sort_idx >= T * K) read a zero row appended to x.
  x_T1D = jnp.concatenate([x_TD, jnp.zeros((1, x_TD.shape[1]), x_TD.dtype)])
  return _gather_rows(x_T1D, jnp.minimum(sort_idx_M // top_k, num_tokens), impl)


def _copy_tokens_fwd(x_TD, sort_idx_M, top_k, impl, num_tokens):
  return _copy_tokens(x_TD, sort_idx_M, top_k, impl, num_tokens), sort_idx_M


def _copy_tokens_bwd(top_k, impl, num_tokens, sort_idx_M, dx_MD):
  del impl  # the un-permute direction is XLA's in every implementation (see _combine_rows)
  # Undo the sort with a gather, then add up each token's K copies in fp32 (padding rows are
  # nobody's copy and are never read).
  ones_TK = jnp.ones((num_tokens, top_k), jnp.float32)
  rows_M = _inverse_permutation(sort_idx_M)[:num_tokens * top_k]
  dx_TD = _combine_rows(dx_MD, rows_M, ones_TK)
  return dx_TD, np.zeros(sort_idx_M.shape, jax.dtypes.float0)


_copy_tokens.defvjp(_copy_tokens_fwd, _copy_tokens_bwd)


def permute(
    x_TD: jax.Array, expert_ids_TK: jax.Array, num_experts: int, *, backend: str = "auto",
    group_align: int = 1,
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Copies each token once per chosen expert and sorts the copies by expert.

  Args:
    x_TD: token activations.
    expert_ids_TK: chosen experts per token, in [0, num_experts]; the id num_experts (or more)
      marks a dropped slot: its copy sorts last, outside every group, and contributes zero.
    num_experts: E.
    backend: a grouped-matmul backend name; picks the row-copy implementation (module doc).
    group_align: pads each expert's copies with zero rows to a multiple of this many (module
      doc); M is then T * K + E * (group_align - 1) rounded up to a multiple of it (static),
      and the unused padding sorts last, as dropped slots do.

  Returns:
    x_MD: the copies, sorted by expert id; ties keep (token, slot) order, padding last.
    group_sizes_E: int32 rows per expert (copies and padding).
    sort_idx_M: for each sorted row, its index into the flattened (token, slot) list; indices
      from T * K on are padding rows.
  """
  x_TD, expert_ids_TK = jnp.asarray(x_TD), jnp.asarray(expert_ids_TK)
  if x_TD.ndim != 2 or expert_ids_TK.ndim != 2 or x_TD.shape[0] != expert_ids_TK.shape[0]:
    raise ValueError(
        f"permute: expected x [T, D] and expert_ids [T, K] with the same T, got x "
        f"{list(x_TD.shape)} and expert_ids {list(expert_ids_TK.shape)}.")
  if not jnp.issubdtype(expert_ids_TK.dtype, jnp.integer):
    raise ValueError(f"permute: expert_ids must be integers, got {expert_ids_TK.dtype}.")
  if group_align < 1:
    raise ValueError(f"permute: group_align must be >= 1 (1: no padding), got {group_align}.")
  num_tokens, top_k = expert_ids_TK.shape
  impl = _row_impl(backend)
  with jax.named_scope("dispatch"):  # Named for profiles (ling_jax/profiling.py).
    group_sizes_E, sort_idx_M = _route(expert_ids_TK, num_experts, group_align)
    x_MD = _copy_tokens(x_TD, sort_idx_M, top_k, impl, num_tokens)
    return x_MD, group_sizes_E, sort_idx_M


def _route(expert_ids_TK: jax.Array, num_experts: int,
           group_align: int) -> tuple[jax.Array, jax.Array]:
  """`permute`'s group sizes and sort order, without the copy."""
  ids_M = expert_ids_TK.reshape(-1).astype(jnp.int32)
  group_sizes_E = jnp.bincount(ids_M, length=num_experts).astype(jnp.int32)
  if group_align > 1:
    ids_M = jnp.concatenate([ids_M, _padding_ids(group_sizes_E, ids_M.shape[0], group_align)])
    group_sizes_E = -(-group_sizes_E // group_align) * group_align
  return group_sizes_E, jnp.argsort(ids_M, stable=True).astype(jnp.int32)


def route_with_rows(expert_ids_TK: jax.Array, num_experts: int,
                    group_align: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  """`_route`'s group sizes and sort order, and the row of each (token, slot) copy [T, K] (the
  order's inverse): the routing `fp8_experts.fused_expert_ffn` takes."""
  num_tokens, top_k = expert_ids_TK.shape
  group_sizes_E, sort_idx_M = _route(expert_ids_TK, num_experts, group_align)
  rows_TK = _inverse_permutation(sort_idx_M)[:num_tokens * top_k].reshape(num_tokens, top_k)
  return group_sizes_E, sort_idx_M, rows_TK


def _padding_ids(group_sizes_E: jax.Array, num_copies: int, align: int) -> jax.Array:
  """Expert ids of the padding copies: expert e's first (-size_e mod align) of its align - 1
  slots, E (dropped) for the rest and for the slots that round M up to a multiple of align."""
  num_experts = group_sizes_E.shape[0]
  num_rows = -(-(num_copies + num_experts * (align - 1)) // align) * align
  pads_E = -group_sizes_E % align
  slot_EA = jnp.arange(align - 1, dtype=jnp.int32)[None, :]
  ids_EA = jnp.where(slot_EA < pads_E[:, None],
                     jnp.arange(num_experts, dtype=jnp.int32)[:, None], num_experts)
  tail = jnp.full((num_rows - num_copies - ids_EA.size,), num_experts, jnp.int32)
  return jnp.concatenate([ids_EA.reshape(-1), tail])


def _gather_copies(y_MD: jax.Array, sort_idx_M: jax.Array, num_tokens: int,
                   top_k: int) -> jax.Array:
  """Puts sorted rows back in (token, slot) order as [T, K, D] (padding rows left out)."""
  y_MD = y_MD[_inverse_permutation(sort_idx_M)[:num_tokens * top_k]]
  return y_MD.reshape(num_tokens, top_k, y_MD.shape[-1])


def _combine(y_TKD: jax.Array, weights_TK: jax.Array) -> jax.Array:
  # A multiply and a sum rather than an einsum: a dot in fp32 may run as TF32 on GPU.
  return jnp.sum(y_TKD.astype(jnp.float32) * weights_TK.astype(jnp.float32)[:, :, None], axis=1)


def _combine_weights_grad(y_TKD: jax.Array, dout_TD: jax.Array) -> jax.Array:
  """`_combine`'s gradient in the router weights: [T, K] of <y[t, k], dout[t]>, in fp32."""
  return jnp.sum(y_TKD.astype(jnp.float32) * dout_TD.astype(jnp.float32)[:, None, :], axis=-1)


@jax.custom_vjp
def _unpermute(y_MD: jax.Array, sort_idx_M: jax.Array, weights_TK: jax.Array) -> jax.Array:
  return _combine_rows(y_MD, _inverse_permutation(sort_idx_M)[:weights_TK.size], weights_TK)


def _unpermute_fwd(y_MD, sort_idx_M, weights_TK):
  return _unpermute(y_MD, sort_idx_M, weights_TK), (y_MD, sort_idx_M, weights_TK)


def _unpermute_bwd(res, dout_TD):
  y_MD, sort_idx_M, weights_TK = res
  num_tokens, top_k = weights_TK.shape
  dout_TD = dout_TD.astype(jnp.float32)
  # Row m of y is copy (t, k) = divmod(sort_idx[m], K): its cotangent is weights[t, k] * dout[t].
  padded = sort_idx_M.shape[0] != weights_TK.size
  copy_M = jnp.minimum(sort_idx_M, weights_TK.size - 1) if padded else sort_idx_M
  weights_M = weights_TK.reshape(-1)[copy_M].astype(jnp.float32)
  dout_MD = dout_TD[copy_M // top_k]
  dy_MD = dout_MD * weights_M[:, None]
  if not padded:
    dy_MD = dy_MD.astype(y_MD.dtype)
    dweights_TK = _combine_weights_grad(_gather_copies(y_MD, sort_idx_M, num_tokens, top_k),
                                        dout_TD)
  else:
    # Padding rows: exactly zero (a select, not a zero weight, which keeps inf * 0).
    dy_MD = jnp.where((sort_idx_M < weights_TK.size)[:, None], dy_MD, 0.0).astype(y_MD.dtype)
    # The weights' gradient in the rows' sorted order, from the same gathered dout and y read
    # in order, then put in (token, slot) order by the inverse permutation: one pass over the
    # rows with dy's. (Without padding XLA fuses the token-order sum above with dy's pass; with
    # padding rows it did not: 1.87 against 1.20 ms a layer at Ling-mini on an H200, session 12.
    # Padding rows' sums are never read.)
    dweights_M = jnp.sum(y_MD.astype(jnp.float32) * dout_MD, axis=-1)
    rows_TK = _inverse_permutation(sort_idx_M)[:weights_TK.size]
    dweights_TK = dweights_M[rows_TK].reshape(num_tokens, top_k)
  return (dy_MD, np.zeros(sort_idx_M.shape, jax.dtypes.float0),
          dweights_TK.astype(weights_TK.dtype))


_unpermute.defvjp(_unpermute_fwd, _unpermute_bwd)


def unpermute(y_MD: jax.Array, sort_idx_M: jax.Array, weights_TK: jax.Array, *,
              backend: str = "auto") -> jax.Array:
  """Inverse of `permute` fused with the router weights: y_TD[t] = sum_k w[t, k] * y[row of (t, k)].

  Args:
    y_MD: expert outputs in the sorted order of `permute`.
    sort_idx_M: from `permute`.
    weights_TK: router weights; differentiable.
    backend: as for `permute`; accepted for symmetry, since every backend runs XLA's fused
      gather-reduce here (see `_combine_rows`).

  Returns:
    y_TD in y_MD's dtype, combined in fp32.
  """
  y_MD, sort_idx_M, weights_TK = map(jnp.asarray, (y_MD, sort_idx_M, weights_TK))
  if (y_MD.ndim != 2 or sort_idx_M.shape != (y_MD.shape[0],) or weights_TK.ndim != 2
      or weights_TK.size > y_MD.shape[0]):
    raise ValueError(
        f"unpermute: expected y [M, D], sort_idx [M] and weights [T, K] with M >= T * K (M = "
        f"T * K, or more with permute's group_align), got y "
        f"{list(y_MD.shape)}, sort_idx {list(sort_idx_M.shape)}, weights "
        f"{list(weights_TK.shape)}.")
  _row_impl(backend)  # every backend un-permutes with XLA (see _combine_rows); names still checked
  with jax.named_scope("dispatch"):
    return _unpermute(y_MD, sort_idx_M, weights_TK)


# Rows per expert the FP8 path pads to: the quantise kernel's per-expert tiles of x^T and dy^T
# then start at multiples of it and store 16 bytes at a time (kernels/fp8_quant_triton.py). On an
# H200 (BENCHMARKS.md, "Blockwise FP8 kernels", session 7), both layouts of [131072, 2048] bf16
# over 256 experts: 0.64 of copy against 0.42 unpadded, and 32 or 128 rows no faster (0.65); the
# Ling-mini up-projection's FP8 GEMM over the padded rows: 1.01x, 1.00x, 0.97x of unpadded.
# 32 rows or more also let the weight gradient run in the FP8 wgrad kernel, fastest from 128
# (`fp8_gemm._WGRAD_KERNEL_ON_GPU`'s note): configs/ling2.py's mini_h200 takes 128. The default
# stays 16 for the configs that train on CPUs, where padding is only cost.
FP8_GROUP_ALIGN = 16


def expert_ffn(
    x_TD: jax.Array,
    expert_ids_TK: jax.Array,
    weights_TK: jax.Array,
    w_gate_up_EDF2: jax.Array,
    w_down_EFD: jax.Array,
    *,
    backend: str = "auto",
    quant: str = "none",
    fp8_probes: tuple[jax.Array, jax.Array] | None = None,
    fp8_recipe=None,
    fp8_group_align: int = FP8_GROUP_ALIGN,
    fp8_fused_dispatch: bool = True,
    fp8_backend: str = "auto",
) -> jax.Array:
  """Runs the routed SwiGLU experts of a Ling 2.0 MoE layer and sums them with the router weights.

  Args:
    x_TD: token activations.
    expert_ids_TK: chosen experts per token, in [0, E); E drops the slot (see `permute`).
    weights_TK: router weights (already normalised and scaled); differentiable.
    w_gate_up_EDF2: fused gate and up projections: columns [0, F) are gate, [F, 2F) are up.
    w_down_EFD: down projections.
    backend: grouped matmul backend, see `grouped_matmul`; it also picks the permutation's
      implementation (module doc), and whether the SwiGLU runs fused into the first GEMM
      (`grouped_matmul.fused_swiglu_wins`).
    quant: "none", or "fp8_blockwise" for both projections in FP8 (`fp8_recipe`'s GEMMs in
      E4M3), with each expert's rows padded to `fp8_group_align` (module doc): as
      `fp8_experts.fused_expert_ffn` (see `fp8_fused_dispatch`), or as two
      `fp8_gemm.fp8_grouped_linear`s with the permutation and SwiGLU in x's dtype.
    fp8_probes: with FP8, zero [2] arrays for the two projections whose cotangents become the
      output gradients' [underflow, cosine] (see `kernels/fp8_gemm.py`).
    fp8_recipe: with FP8, the `fp8_gemm.Fp8Recipe` of both projections (None: the full one).
    fp8_group_align: with FP8, rows each expert's copies are padded to (`FP8_GROUP_ALIGN` by
      default; `config.model.fp8_group_align`); from `fp8_tgmm_mgpu.MIN_ROW_ALIGN` (32) up, the
      weight gradient can run the FP8 wgrad kernel (`fp8_gemm.fp8_transposed_grouped_matmul`).
    fp8_fused_dispatch: with the full FP8 recipe, one custom VJP (`fp8_experts.fused_expert_ffn`)
      whose quantise kernels make the token copies, the SwiGLU's output, the output gradient's
      rows and the SwiGLU's gradient as they read their inputs: those exist only as E4M3 codes.
      False (or another recipe): `permute`, the FP8 GEMMs and SwiGLU, `unpermute`.
    fp8_backend: with FP8, the FP8 GEMMs' backend (`fp8_gemm`'s module doc): "auto" (the FP8
      kernels on Hopper GPUs), or e.g. "dequantize_bf16" (the same codes, bf16 GEMMs).

  Returns:
    y_TD = sum_k weights[t, k] * down_e(silu(gate_e(x_t)) * up_e(x_t)), e = expert_ids[t, k],
    in x's dtype.
  """
  x_TD, expert_ids_TK, weights_TK, w_gate_up_EDF2, w_down_EFD = map(
      jnp.asarray, (x_TD, expert_ids_TK, weights_TK, w_gate_up_EDF2, w_down_EFD))
  num_experts, d_model, two_f = w_gate_up_EDF2.shape
  if (x_TD.ndim != 2 or x_TD.shape[1] != d_model or two_f % 2
      or w_down_EFD.shape != (num_experts, two_f // 2, d_model)):
    raise ValueError(
        f"expert_ffn: expected x [T, D], w_gate_up [E, D, 2F] and w_down [E, F, D], got x "
        f"{list(x_TD.shape)}, w_gate_up {list(w_gate_up_EDF2.shape)}, w_down "
        f"{list(w_down_EFD.shape)}.")
  if weights_TK.shape != expert_ids_TK.shape:
    raise ValueError(
        f"expert_ffn: weights {list(weights_TK.shape)} and expert_ids "
        f"{list(expert_ids_TK.shape)} must both be [T, K].")
  if quant not in ("none", "fp8_blockwise"):
    raise ValueError(f"expert_ffn: unknown quant {quant!r}; use 'none' or 'fp8_blockwise'.")
  if quant == "fp8_blockwise":
    from kernels import fp8_gemm  # lazy: the default path does not need it

    probe_up, probe_down = fp8_probes or (jnp.zeros((2,), jnp.float32),) * 2
    group_align = fp8_group_align
    recipe = fp8_recipe or fp8_gemm.FULL_RECIPE
    if fp8_fused_dispatch and recipe.fprop and recipe.dgrad and recipe.wgrad:
      return _fp8_fused_expert_ffn(x_TD, expert_ids_TK, weights_TK, w_gate_up_EDF2, w_down_EFD,
                                   probe_up, probe_down, recipe, group_align, fp8_backend)

    def matmul(x, w, sizes, probe):
      return fp8_gemm.fp8_grouped_linear(x, w, sizes, probe, fp8_backend,
                                         fp8_recipe or fp8_gemm.FULL_RECIPE, group_align)
  else:
    probe_up = probe_down = None
    group_align = 1

    def matmul(x, w, sizes, probe):
      del probe
      return gmm_lib.grouped_matmul(x, w, sizes, backend=backend)
  x_MD, group_sizes_E, sort_idx_M = permute(x_TD, expert_ids_TK, num_experts, backend=backend,
                                            group_align=group_align)
  if quant == "none" and gmm_lib.fused_swiglu_wins(backend, x_TD.dtype, d_model, two_f):
    # The SwiGLU in the first GEMM's epilogue (kernels/grouped_matmul_mgpu.py).
    act_MF = gmm_lib.grouped_matmul_swiglu(x_MD, w_gate_up_EDF2, group_sizes_E, backend=backend)
  else:
    # The SwiGLU the FP8 quantiser's prologue computes too (`grouped_matmul.swiglu_f32`).
    act_MF = gmm_lib._swiglu_of(matmul(x_MD, w_gate_up_EDF2, group_sizes_E, probe_up),
                                x_TD.dtype)
  y_MD = matmul(act_MF, w_down_EFD, group_sizes_E, probe_down)
  return unpermute(y_MD, sort_idx_M, weights_TK, backend=backend)


def _fp8_fused_expert_ffn(x_TD, expert_ids_TK, weights_TK, w_gate_up_EDF2, w_down_EFD, probe_up,
                          probe_down, recipe, group_align, fp8_backend):
  """`expert_ffn`'s FP8 path as `fp8_experts.fused_expert_ffn` (its docstring)."""
  from kernels import fp8_experts

  with jax.named_scope("dispatch"):
    group_sizes_E, sort_idx_M, rows_TK = route_with_rows(expert_ids_TK, w_gate_up_EDF2.shape[0],
                                                         group_align)
  return fp8_experts.fused_expert_ffn(x_TD, sort_idx_M, rows_TK, weights_TK, w_gate_up_EDF2,
                                      w_down_EFD, group_sizes_E, probe_up, probe_down,
                                      fp8_backend, recipe, group_align)
