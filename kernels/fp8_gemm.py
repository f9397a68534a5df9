"""Blockwise-scaled FP8 GEMMs, dense and grouped, and the FP8 linear ops built on them.

The GEMMs take E4M3 operands with their fp32 scales (`kernels.fp8_quant`) and return
`out = A @ B^T` with both operands K-major (the layout Hopper's FP8 wgmma reads):
  - `fp8_matmul`: A [M, K] in 1x128 tiles; B [N, K] in 128x128 blocks (a weight) or in 1x128
    tiles (an activation or gradient, for the weight gradient);
  - `fp8_grouped_matmul`: rows of A sorted by group, one blocked B [N, K] per group;
  - `fp8_transposed_grouped_matmul`: per group, A_g^T B_g from the M-tiled transposes (wgrad).
The reference backend (CPU, and the oracle for GPU kernels) dequantises and multiplies in fp32,
which is what a kernel that promotes its partial sums to fp32 every 128 of K computes up to
summation order. Backends:
  - "pallas_mosaic_gpu": `kernels.fp8_gemm_mgpu` (Hopper, e4m3 wgmma) for `fp8_matmul` and
    `fp8_grouped_matmul` where `fp8_gemm_mgpu.supports` holds (K a multiple of 128, N of 128,
    bf16 or fp32 out); other shapes take the reference. `fp8_transposed_grouped_matmul` (tiles
    that restart per group) has its own kernel, `kernels.fp8_tgmm_mgpu`, for groups padded to
    32 rows or more (`_WGRAD_KERNEL_ON_GPU` switches it off); otherwise it dequantises to bf16
    for the bf16 wgrad kernel.
  - "pallas_mosaic_gpu_interpret": the same kernels in Pallas's GPU interpreter with small tiles,
    for CPU tests; strict: a shape they do not cover raises instead of falling back.
  - "auto": "pallas_mosaic_gpu" on Hopper GPUs (`_AUTO_USES_KERNEL`: the measurement), else
    "reference".
  - "dequantize_bf16": no FP8 GEMM. The operands are quantised as on "auto" (the same E4M3 codes
    and scales), dequantised to bf16 (code x scale in fp32, rounded once: 2^-9 relative, far
    inside E4M3's own 2^-4) and multiplied by the bf16 GEMMs of the unquantised model (XLA's dot,
    `grouped_matmul`'s "auto" backend) with fp32 accumulation. A training run on it has the FP8
    recipe's rounding without the FP8 kernels, which tells the two apart where FP8's loss curve
    strays from bf16's (`config.model.fp8_backend`).
  - "reference_bf16": the same, but quantised as the reference is (XLA), so that on a GPU it
    runs the CPU's quantisation: between the two, the Triton quantisers are told apart too.

`fp8_linear` and `fp8_grouped_linear` are the training ops (and `kernels/fp8_experts.py`'s
fused expert FFN, built from this module's GEMMs): custom VJPs whose forward (fprop),
input gradient (dgrad) and weight gradient (wgrad) run as FP8 GEMMs, E4M3 in both directions.
Their quantisation (`kernels.fp8_quant`) follows the GEMM backend (`_QUANT_BACKEND`): the Triton
kernels with "pallas_mosaic_gpu" and on "auto", XLA with the reference and the interpreter; x and
the output gradient are each read once for both of their layouts.
Their `recipe` (`Fp8Recipe`, static) can keep any of the three GEMMs in the input dtype (bf16
operands, fp32 accumulation, as the unquantised model computes them) and round scales to powers
of two; the default is Ling's full recipe. Their `probe_2` input is a [2] array that carries
the safeguard metrics of the output gradient's 1x128 quantisation out of the backward pass as
its cotangent: [underflow, cosine]. Its value never reaches the output; a negative first
element (`SKIP_METRICS`) asks the backward pass to skip the metrics (a cond: their reductions do
not run) and return zeros, which the trainer does on the steps it does not log.

Shape key: M rows (tokens), K contraction, N output, G groups, Kt/Nt/Mt 128-tiles,
C M-tiles that restart per group.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

from kernels import fp8_quant as fq
from kernels import grouped_matmul as gmm_lib

BACKENDS = ("reference", "pallas_mosaic_gpu", "pallas_mosaic_gpu_interpret", "dequantize_bf16",
            "reference_bf16")
# No FP8 GEMM: they dequantise (in bf16 / in fp32), then multiply.
_BF16_GEMMS = ("dequantize_bf16", "reference_bf16")
_DEQUANTIZED = ("reference", *_BF16_GEMMS)


def _is_hopper_gpu() -> bool:
  if jax.default_backend() != "gpu":
    return False
  return getattr(jax.devices()[0], "compute_capability", None) == "9.0"


# "auto" takes the Mosaic GPU kernels on sm_90. On an H200 (BENCHMARKS.md, "Blockwise FP8
# kernels", session 4) they match NumPy's FP8 product inside a jitted fp8_linear to 1.6e-4 (fp32
# out) in fprop, dgrad and wgrad (session 3's 2.6% "kernel error" was the reference's: see
# fp8_quant), and the jitted fp8_linear forward + backward at 16384 x 2048 -> 3072 runs at 236
# TFLOP/s through them against 47 through the reference (bf16 XLA: 749).
_AUTO_USES_KERNEL = True


@dataclasses.dataclass(frozen=True)
class Fp8Recipe:
  """Which GEMMs of an FP8 linear op run in E4M3, and how scales are rounded.

  A GEMM that is off multiplies the unquantised operands in their dtype with fp32 accumulation.
  """

  fprop: bool = True  # y = x @ w
  dgrad: bool = True  # dx = dy @ w^T
  wgrad: bool = True  # dw = x^T @ dy
  pow2_scales: bool = False  # scales rounded up to powers of two (fp8_quant module doc)


FULL_RECIPE = Fp8Recipe()  # Ling 2.0: fprop, dgrad and wgrad in E4M3, exact amax / 448 scales


def _resolve_backend(backend: str) -> str:
  if backend == "auto":
    return "pallas_mosaic_gpu" if _AUTO_USES_KERNEL and _is_hopper_gpu() else "reference"
  if backend not in BACKENDS:
    raise ValueError(f"Unknown FP8 GEMM backend {backend!r}; expected 'auto' or one of "
                     f"{list(BACKENDS)}.")
  return backend


@functools.cache
def _interpreted_gmm(out_dtype: jnp.dtype, b_scaling: str):
  from jax.experimental.pallas import mosaic_gpu as plgpu

  from kernels import fp8_gemm_mgpu as mgpu
  return jax.jit(functools.partial(mgpu.gmm_fp8, out_dtype=out_dtype, b_scaling=b_scaling,
                                   config=mgpu.INTERPRET_CONFIG,
                                   interpret=plgpu.InterpretGPUParams(),
                                   num_sms=gmm_lib.INTERPRET_NUM_SMS))


def _kernel_gmm(backend: str, fn: str, k_dim: int, n_dim: int, out_dtype):
  """The Mosaic GPU grouped GEMM for this shape and backend, or None for the reference.

  The returned callable takes `fp8_gemm_mgpu.gmm_fp8`'s operands and b_scaling.
  """
  if backend in _DEQUANTIZED:
    return None
  from kernels import fp8_gemm_mgpu as mgpu
  out_dtype = jnp.dtype(out_dtype)
  if backend == "pallas_mosaic_gpu":
    if not mgpu.supports(k_dim, n_dim, out_dtype):
      return None
    return functools.partial(mgpu.gmm_fp8, out_dtype=out_dtype)
  if not mgpu.supports(k_dim, n_dim, out_dtype, mgpu.INTERPRET_CONFIG):
    raise ValueError(
        f"{fn}: backend 'pallas_mosaic_gpu_interpret' has no kernel for K={k_dim}, N={n_dim}, "
        f"out {out_dtype.name}: it needs K a multiple of 128, N of "
        f"{mgpu.INTERPRET_CONFIG.cta_n} and a bf16 or fp32 output. Use backend='reference'.")

  def call(a_q_MK, *args, b_scaling):
    # The interpreter's ordered IO effects must not leak into enclosing jaxprs (scan, custom
    # VJPs); the kernel is a pure function of its operands, so run it as a pure callback.
    out_type = jax.ShapeDtypeStruct((a_q_MK.shape[0], n_dim), out_dtype)
    return gmm_lib._as_pure_callback(_interpreted_gmm(out_dtype, b_scaling), out_type, a_q_MK,
                                     *args)
  return call


def _check_e4m3(fn: str, **operands: jax.Array) -> None:
  for name, q in operands.items():
    if q.dtype != fq.E4M3:
      raise ValueError(f"{fn}: {name} must be float8_e4m3fn (quantise it with "
                       f"kernels.fp8_quant), got {q.dtype}.")


def _dot_t(a_MK: jax.Array, b_NK: jax.Array) -> jax.Array:
  """A @ B^T accumulated in fp32; fp32 operands at full precision (the reference)."""
  precision = jax.lax.Precision.HIGHEST if a_MK.dtype == jnp.float32 else None
  return jax.lax.dot_general(a_MK, b_NK, (((1,), (1,)), ((), ())), precision=precision,
                             preferred_element_type=jnp.float32)


def _dequantized(backend: str) -> tuple[jnp.dtype, str]:
  """Where a GEMM runs on dequantised operands (`_DEQUANTIZED`, or a shape the kernels do not
  cover): the dtype to dequantise to and the `grouped_matmul` backend."""
  if backend in _BF16_GEMMS:
    return jnp.bfloat16, "auto"
  return jnp.float32, "reference"


def fp8_matmul(a_q_MK: jax.Array, a_scale_MKt: jax.Array, b_q_NK: jax.Array,
               b_scale: jax.Array, *, b_scaling: str = "block",
               out_dtype: jnp.dtype = jnp.bfloat16, backend: str = "auto") -> jax.Array:
  """Returns A @ B^T in `out_dtype`, accumulated in fp32.

  Args:
    a_q_MK, a_scale_MKt: A in E4M3 with one scale per 1x128 tile along K.
    b_q_NK, b_scale: B in E4M3; scales [Nt, Kt] for b_scaling="block" (a weight), [N, Kt] for
      "tile" (an activation or gradient, transposed, for wgrad).
    out_dtype: the output dtype (bf16 in the Ling recipe).
    backend: "auto", "reference", "pallas_mosaic_gpu", "pallas_mosaic_gpu_interpret",
      "dequantize_bf16" or "reference_bf16" (module doc).
  """
  fn = "fp8_matmul"
  _check_e4m3(fn, a_q=a_q_MK, b_q=b_q_NK)
  backend = _resolve_backend(backend)
  (m_dim, k_dim), (n_dim, k_b) = a_q_MK.shape, b_q_NK.shape
  kt, nt = pl.cdiv(k_dim, fq.TILE), pl.cdiv(n_dim, fq.TILE)
  want_b = {"block": (nt, kt), "tile": (n_dim, kt)}.get(b_scaling)
  if want_b is None:
    raise ValueError(f"{fn}: b_scaling must be 'block' or 'tile', got {b_scaling!r}.")
  if k_b != k_dim or a_scale_MKt.shape != (m_dim, kt) or b_scale.shape != want_b:
    raise ValueError(
        f"{fn}: expected A [M, K] with scales [M, {kt}] and B [N, K] with {b_scaling} scales "
        f"{list(want_b)}, got A {list(a_q_MK.shape)}, scales {list(a_scale_MKt.shape)}, B "
        f"{list(b_q_NK.shape)}, scales {list(b_scale.shape)}.")
  kernel = _kernel_gmm(backend, fn, k_dim, n_dim, out_dtype)
  if kernel is not None:
    return kernel(a_q_MK, a_scale_MKt.T, b_q_NK[None], b_scale.T[None],
                  jnp.full((1,), m_dim, jnp.int32), b_scaling=b_scaling)
  dtype, _ = _dequantized(backend)
  a_MK = fq.dequantize_tiles(a_q_MK, a_scale_MKt, dtype)
  if b_scaling == "block":
    b_NK = fq.dequantize_blocks(b_q_NK, b_scale, dtype)
  else:
    b_NK = fq.dequantize_tiles(b_q_NK, b_scale, dtype)
  return _dot_t(a_MK, b_NK).astype(out_dtype)


def fp8_grouped_matmul(a_q_MK: jax.Array, a_scale_MKt: jax.Array, b_q_GNK: jax.Array,
                       b_scale_GNtKt: jax.Array, group_sizes_G: jax.Array, *,
                       out_dtype: jnp.dtype = jnp.bfloat16, backend: str = "auto") -> jax.Array:
  """Returns out[rows of g] = A[rows of g] @ B[g]^T; rows past the groups give zeros.

  A is 1x128-tiled along K, each B[g] [N, K] 128x128-blocked; rows sorted by group as for
  `kernels.grouped_matmul.grouped_matmul`.
  """
  fn = "fp8_grouped_matmul"
  _check_e4m3(fn, a_q=a_q_MK, b_q=b_q_GNK)
  backend = _resolve_backend(backend)
  (m_dim, k_dim), (g_dim, n_dim, k_b) = a_q_MK.shape, b_q_GNK.shape
  kt, nt = pl.cdiv(k_dim, fq.TILE), pl.cdiv(n_dim, fq.TILE)
  if (k_b != k_dim or a_scale_MKt.shape != (m_dim, kt)
      or b_scale_GNtKt.shape != (g_dim, nt, kt) or group_sizes_G.shape != (g_dim,)):
    raise ValueError(
        f"{fn}: expected A [M, K], scales [M, Kt], B [G, N, K], scales [G, Nt, Kt], "
        f"group_sizes [G], got A {list(a_q_MK.shape)}, {list(a_scale_MKt.shape)}, B "
        f"{list(b_q_GNK.shape)}, {list(b_scale_GNtKt.shape)}, {list(group_sizes_G.shape)}.")
  kernel = _kernel_gmm(backend, fn, k_dim, n_dim, out_dtype)
  if kernel is not None:
    return kernel(a_q_MK, a_scale_MKt.T, b_q_GNK, jnp.swapaxes(b_scale_GNtKt, 1, 2),
                  gmm_lib.fit_group_sizes(group_sizes_G, m_dim), b_scaling="block")
  dtype, gmm_backend = _dequantized(backend)
  a_MK = fq.dequantize_tiles(a_q_MK, a_scale_MKt, dtype)
  b_GKN = jnp.swapaxes(fq.dequantize_blocks(b_q_GNK, b_scale_GNtKt, dtype), 1, 2)
  return gmm_lib.grouped_matmul(a_MK, b_GKN, group_sizes_G, preferred_element_type=out_dtype,
                                backend=gmm_backend)


# "pallas_mosaic_gpu" runs the FP8 wgrad kernel (`fp8_tgmm_mgpu.tgmm_fp8`) while this is True;
# False: the dequantise + bf16 path below. On an H200 (BENCHMARKS.md, sessions 10-11) the kernel
# matched the reference (2e-4 fp32 out, 3e-3 bf16 out). At a Ling-mini MoE layer's 397,056 rows
# (up / down): 348 / 338 TFLOP/s with groups padded to 32 rows (fp32 out; its bf16 store is
# slower there, so a bf16 gradient is computed in fp32 and then rounded, `_kernel_tgmm`), 584 /
# 556 with groups padded to 128 (two CTAs per SM, bf16 out), against 287 / 208 for the
# dequantise + bf16 path and 521-530 / 454-527 for the bf16 model's own wgrad.
_WGRAD_KERNEL_ON_GPU = True


def _kernel_tgmm(backend: str, fn: str, k_dim: int, n_dim: int, out_dtype, row_align: int):
  """The FP8 wgrad kernel for this shape, backend and row_align, or None for the bf16 path.

  The returned callable takes `fp8_tgmm_mgpu.tgmm_fp8`'s operands.
  """
  if backend in _DEQUANTIZED:
    return None
  from kernels import fp8_tgmm_mgpu as tgmm
  out_dtype = jnp.dtype(out_dtype)
  if row_align < tgmm.MIN_ROW_ALIGN:
    return None
  if backend == "pallas_mosaic_gpu":
    # Groups padded to 128 rows: the warp-specialised tilings store bf16 faster than fp32 (671 /
    # 681 against 630 / 595 TFLOP/s at Ling-mini's up / down, session 12). Below that, the
    # one-CTA 128 x 128 tiling stores bf16 at half its fp32 speed (session 10): fp32, rounded.
    store_dtype = out_dtype if row_align >= tgmm.TILE_M else jnp.dtype(jnp.float32)
    tiling = tgmm.default_config(row_align, store_dtype)
    if not (_WGRAD_KERNEL_ON_GPU and tgmm.supports(k_dim, n_dim, store_dtype, tiling)):
      return None
    kernel = functools.partial(tgmm.tgmm_fp8, row_align=row_align, out_dtype=store_dtype)
    return lambda *args: kernel(*args).astype(out_dtype)
  if not tgmm.supports(k_dim, n_dim, out_dtype, tgmm.INTERPRET_CONFIG):
    raise ValueError(
        f"{fn}: backend 'pallas_mosaic_gpu_interpret' has no FP8 wgrad kernel for K={k_dim}, "
        f"N={n_dim}, out {out_dtype.name}: it needs K a multiple of "
        f"{tgmm.INTERPRET_CONFIG.tile_k}, N of {tgmm.INTERPRET_CONFIG.tile_n} and a bf16 or fp32 "
        f"output. Use backend='reference', or row_align=1 for the dequantising path.")
  from jax.experimental.pallas import mosaic_gpu as plgpu
  kernel = functools.partial(  # tgmm_fp8 is jitted: each shape compiles once
      tgmm.tgmm_fp8, row_align=row_align, out_dtype=out_dtype, config=tgmm.INTERPRET_CONFIG,
      interpret=plgpu.InterpretGPUParams(), num_sms=gmm_lib.INTERPRET_NUM_SMS)

  def call(*args):
    # As `_kernel_gmm`: the interpreter's IO effects stay inside a pure callback.
    out_type = jax.ShapeDtypeStruct((args[-1].shape[0], k_dim, n_dim), out_dtype)
    return gmm_lib._as_pure_callback(kernel, out_type, *args)
  return call


def fp8_transposed_grouped_matmul(
    a_q_KM: jax.Array, a_scale_KC: jax.Array, b_q_NM: jax.Array, b_scale_NC: jax.Array,
    tile_ids_M: jax.Array, group_sizes_G: jax.Array, *,
    out_dtype: jnp.dtype = jnp.float32, backend: str = "auto", row_align: int = 1) -> jax.Array:
  """Returns out[g] = A[rows of g]^T-contracted with B[rows of g]: [G, K, N], the weight gradient.

  Both operands come transposed and 1x128-tiled along M with tiles that restart per group
  (`fp8_quant.row_tile_ids`, whose numbering of the tiles the kernel assumes), so a tile's scale
  never spans two experts. row_align: a promise that M and every group size are multiples of it,
  as `fp8_quant.quantize_rows_transposed` takes it.

  The FP8 kernel (`kernels.fp8_tgmm_mgpu`: e4m3 wgmma per 128-row tile, fp32 promotion) runs in
  the interpret backend, and on "pallas_mosaic_gpu" while `_WGRAD_KERNEL_ON_GPU` is set (below
  128-row alignment with fp32 out, rounded to out_dtype after), for
  row_align >= `fp8_tgmm_mgpu.MIN_ROW_ALIGN` (32) and the shapes `fp8_tgmm_mgpu.supports`. Else
  the reference dequantises to fp32 and loops over row tiles in XLA, and the kernel backends and
  the "_bf16" ones dequantise to bf16 (each value an E4M3 code times its fp32 scale, rounded
  once: 2^-9 relative, far inside FP8's own error) and run the bf16 grouped weight-gradient
  kernel (`grouped_matmul.transposed_grouped_matmul`) on tensor cores.
  """
  fn = "fp8_transposed_grouped_matmul"
  _check_e4m3(fn, a_q=a_q_KM, b_q=b_q_NM)
  resolved = _resolve_backend(backend)
  if (a_q_KM.shape[1] != b_q_NM.shape[1] or tile_ids_M.shape != (a_q_KM.shape[1],)
      or a_scale_KC.shape[0] != a_q_KM.shape[0] or b_scale_NC.shape[0] != b_q_NM.shape[0]):
    raise ValueError(
        f"{fn}: expected A^T [K, M], B^T [N, M], tile_ids [M] and scales [K, C], [N, C], got "
        f"{list(a_q_KM.shape)}, {list(b_q_NM.shape)}, {list(tile_ids_M.shape)}, "
        f"{list(a_scale_KC.shape)}, {list(b_scale_NC.shape)}.")
  kernel = _kernel_tgmm(resolved, fn, a_q_KM.shape[0], b_q_NM.shape[0], out_dtype, row_align)
  if kernel is not None:
    return kernel(a_q_KM, a_scale_KC, b_q_NM, b_scale_NC,
                  gmm_lib.fit_group_sizes(group_sizes_G, a_q_KM.shape[1]))
  # The kernel backends' bf16 path runs the bf16 wgrad kernel of their own backend.
  dtype, gmm_backend = _dequantized(resolved) if resolved in _DEQUANTIZED else (jnp.bfloat16,
                                                                                 resolved)
  a_MK = fq.dequantize_rows_transposed(a_q_KM, a_scale_KC, tile_ids_M, dtype).T
  b_MN = fq.dequantize_rows_transposed(b_q_NM, b_scale_NC, tile_ids_M, dtype).T
  return gmm_lib.transposed_grouped_matmul(a_MK, b_MN, group_sizes_G,
                                           preferred_element_type=out_dtype, backend=gmm_backend)


# The quantisation backend (kernels/fp8_quant.py) that goes with each GEMM backend: the reference
# stays all-XLA; the interpret backend keeps XLA quantisation too (the Triton kernels have their
# own interpret-mode tests, and CPU tests stay cheap).
_QUANT_BACKEND = {"auto": "auto", "reference": "xla", "pallas_mosaic_gpu": "pallas_triton",
                  "pallas_mosaic_gpu_interpret": "xla", "dequantize_bf16": "auto",
                  "reference_bf16": "xla"}


def _quant_backend(backend: str) -> str:
  _resolve_backend(backend)  # the clear error for an unknown name
  return _QUANT_BACKEND[backend]


def _quantize_x(x_MK, tile_ids_M, num_tiles, recipe, backend, row_align=1):
  """x's FP8 operands for the forward's GEMM (1x128 tiles) and for wgrad (its transpose), from
  one read of x where both are asked for; None where the recipe keeps a GEMM unquantised."""
  pow2, qb = recipe.pow2_scales, _quant_backend(backend)
  if recipe.fprop and recipe.wgrad:
    x_q, x_s, xt_q, xt_s = fq.quantize_tiles_with_transpose(x_MK, tile_ids_M, num_tiles, pow2,
                                                            backend=qb, row_align=row_align)
    return (x_q, x_s), (xt_q, xt_s)
  if recipe.fprop:
    return fq.quantize_tiles(x_MK, pow2_scales=pow2, backend=qb), None
  if recipe.wgrad:
    return None, fq.quantize_rows_transposed(x_MK, tile_ids_M, num_tiles, pow2, backend=qb,
                                             row_align=row_align)
  return None, None


# ---- FP8 linear: y = x @ w, the recipe's GEMMs in FP8. ----


def _dot_hp(a: jax.Array, b: jax.Array, contract: tuple[int, int], out_dtype) -> jax.Array:
  """A GEMM that the recipe keeps unquantised: inputs as they come, fp32 accumulation."""
  return jax.lax.dot_general(a, b, (((contract[0],), (contract[1],)), ((), ())),
                             preferred_element_type=jnp.float32).astype(out_dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def fp8_linear(x_MK: jax.Array, w_KN: jax.Array, probe_2: jax.Array, backend: str = "auto",
               recipe: Fp8Recipe = FULL_RECIPE) -> jax.Array:
  """x @ w with the recipe's GEMMs in FP8; output in x's dtype. See the module doc for probe."""
  return _fp8_linear_fwd(x_MK, w_KN, probe_2, backend, recipe)[0]


def metrics_wanted(probe_2: jax.Array) -> jax.Array:
  """Whether an FP8 op's probe asks for its safeguard metrics (module doc): a traced bool."""
  return probe_2[0] >= 0


SKIP_METRICS = (-1.0, 0.0)  # a probe's value that skips the metrics


def _quantize_dy(dy_MN, tile_ids_M, num_tiles, pow2, backend, row_align, measure, **values):
  """The output gradient's two layouts and, where `measure` holds, its metrics (else zeros).
  values: `fq.quantize_tiles_with_transpose`'s src_M, mult_M, prologue, aux (what is quantised
  is made from dy_MN inside the quantisation; `kernels/fp8_experts.py`)."""

  def quantize(with_metrics):
    outs = fq.quantize_tiles_with_transpose(
        dy_MN, tile_ids_M, num_tiles, pow2, backend=_quant_backend(backend),
        row_align=row_align, with_metrics=with_metrics, **values)
    return outs if with_metrics else (*outs, jnp.zeros((2,), jnp.float32))
  return jax.lax.cond(measure, lambda: quantize(True), lambda: quantize(False))


def _fp8_linear_fwd(x_MK, w_KN, probe_2, backend, recipe):
  pow2 = recipe.pow2_scales
  w_q_KN, w_q_NK, w_s = fq.quantize_blocks_with_transpose(w_KN, pow2,
                                                          backend=_quant_backend(backend))
  # 128-row tiles for x^T (tile ids None: no groups).
  x_fp8, xt_fp8 = _quantize_x(x_MK, None, pl.cdiv(x_MK.shape[0], fq.TILE), recipe, backend)
  if recipe.fprop:
    y_MN = fp8_matmul(*x_fp8, w_q_NK, w_s.T, out_dtype=x_MK.dtype, backend=backend)
  else:
    y_MN = _dot_hp(x_MK, w_KN, (1, 0), x_MK.dtype)
  # Saved for the backward pass in FP8 where its GEMM is FP8: x^T for wgrad, w for dgrad (w's
  # transpose for fprop was built on the fly).
  x_saved = xt_fp8 if recipe.wgrad else x_MK
  w_saved = (w_q_KN, w_s) if recipe.dgrad else w_KN
  dtypes = (jnp.zeros((0,), x_MK.dtype), jnp.zeros((0,), w_KN.dtype))
  return y_MN, (x_saved, w_saved, dtypes, metrics_wanted(probe_2))


def _fp8_linear_bwd(backend, recipe, res, dy_MN):
  x_saved, w_saved, (x_dt, w_dt), measure = res
  dy_q, dy_s, dyt_q_NM, dyt_s_NC, dy_metrics = _quantize_dy(
      dy_MN, None, pl.cdiv(dy_MN.shape[0], fq.TILE), recipe.pow2_scales, backend, 1, measure)
  if recipe.dgrad:
    dx_MK = fp8_matmul(dy_q, dy_s, *w_saved, out_dtype=x_dt.dtype, backend=backend)
  else:
    dx_MK = _dot_hp(dy_MN, w_saved, (1, 1), x_dt.dtype)
  if recipe.wgrad:
    dw_KN = fp8_matmul(*x_saved, dyt_q_NM, dyt_s_NC, b_scaling="tile", out_dtype=w_dt.dtype,
                       backend=backend)
  else:
    dw_KN = _dot_hp(x_saved, dy_MN, (0, 0), w_dt.dtype)
  return dx_MK, dw_KN, dy_metrics


fp8_linear.defvjp(_fp8_linear_fwd, _fp8_linear_bwd)


# ---- FP8 grouped linear: the routed experts' projections. ----


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def fp8_grouped_linear(x_MK: jax.Array, w_GKN: jax.Array, group_sizes_G: jax.Array,
                       probe_2: jax.Array, backend: str = "auto",
                       recipe: Fp8Recipe = FULL_RECIPE, row_align: int = 1) -> jax.Array:
  """out[rows of g] = x[rows of g] @ w[g], the recipe's GEMMs in FP8; in x's dtype.

  Unquantised GEMMs go through `grouped_matmul` with its "auto" backend. row_align: a promise
  that M and every group size are multiples of it (`dispatch.permute`'s group_align), which
  lets the quantise kernel store the per-expert tiles of x^T and dy^T aligned
  (`fp8_quant.quantize_rows_transposed`); the results do not depend on it.
  """
  return _fp8_grouped_fwd(x_MK, w_GKN, group_sizes_G, probe_2, backend, recipe, row_align)[0]


def _fp8_grouped_fwd(x_MK, w_GKN, group_sizes_G, probe_2, backend, recipe, row_align):
  pow2 = recipe.pow2_scales
  w_q_GKN, w_q_GNK, w_s_GKtNt = fq.quantize_blocks_with_transpose(
      w_GKN, pow2, backend=_quant_backend(backend))
  x_fp8, xt_fp8 = _quantize_x(x_MK, *fq.row_tile_ids(x_MK.shape[0], group_sizes_G), recipe,
                              backend, row_align)
  if recipe.fprop:
    y_MN = fp8_grouped_matmul(*x_fp8, w_q_GNK, jnp.swapaxes(w_s_GKtNt, 1, 2), group_sizes_G,
                              out_dtype=x_MK.dtype, backend=backend)
  else:
    y_MN = gmm_lib.grouped_matmul(x_MK, w_GKN, group_sizes_G, preferred_element_type=x_MK.dtype)
  x_saved = xt_fp8 if recipe.wgrad else x_MK
  w_saved = (w_q_GKN, w_s_GKtNt) if recipe.dgrad else w_GKN
  dtypes = (jnp.zeros((0,), x_MK.dtype), jnp.zeros((0,), w_GKN.dtype))
  return y_MN, (x_saved, w_saved, group_sizes_G, dtypes, metrics_wanted(probe_2))


def _fp8_grouped_bwd(backend, recipe, row_align, res, dy_MN):
  x_saved, w_saved, group_sizes_G, (x_dt, w_dt), measure = res
  tile_ids_M, num_tiles = fq.row_tile_ids(dy_MN.shape[0], group_sizes_G)
  dy_q, dy_s, dyt_q_NM, dyt_s_NC, dy_metrics = _quantize_dy(
      dy_MN, tile_ids_M, num_tiles, recipe.pow2_scales, backend, row_align, measure)
  if recipe.dgrad:
    dx_MK = fp8_grouped_matmul(dy_q, dy_s, *w_saved, group_sizes_G, out_dtype=x_dt.dtype,
                               backend=backend)
  else:
    dx_MK = gmm_lib.grouped_matmul(dy_MN, jnp.swapaxes(w_saved, 1, 2), group_sizes_G,
                                   preferred_element_type=x_dt.dtype)
  if recipe.wgrad:
    dw_GKN = fp8_transposed_grouped_matmul(*x_saved, dyt_q_NM, dyt_s_NC, tile_ids_M,
                                           group_sizes_G, out_dtype=w_dt.dtype, backend=backend,
                                           row_align=row_align)
  else:
    dw_GKN = gmm_lib.transposed_grouped_matmul(x_saved, dy_MN, group_sizes_G,
                                               preferred_element_type=w_dt.dtype)
  return dx_MK, dw_GKN, np.zeros(group_sizes_G.shape, jax.dtypes.float0), dy_metrics


fp8_grouped_linear.defvjp(_fp8_grouped_fwd, _fp8_grouped_bwd)
