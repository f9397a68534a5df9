"""Grouped matmul for MoE experts: rows sorted by group, each group times its own weight.

`grouped_matmul` is the forward (and dgrad) op, `transposed_grouped_matmul` the weight gradient;
both carry a custom VJP written in terms of each other, so a backend only has to supply the two
forward ops. The pure-JAX reference here is the CPU path and the oracle for the Pallas kernels.
`grouped_matmul_swiglu` is the first GEMM of a SwiGLU expert with its activation; a backend may
fuse the activation into the GEMM's epilogue (the Mosaic GPU kernel does), and its VJP runs on the
pre-activation that the forward saves.

The reference splits the rows into tiles of R and loops (a while loop bounded by the data) over
the (tile, group) pairs that hold rows, in row order; each step multiplies one [R, K] tile by one
group's [K, N] matrix and keeps the rows of that group. There are at most cdiv(M, R) + G - 1 such
pairs, so work is O((M + G*R) * K * N) and memory O(M*K + M*N + G*K*N): no [G, M, ...] array,
no dense masking over experts, and no `lax.ragged_dot` (which on GPU lowers to exactly that).

Shape key:
  M: rows (tokens x top_k), sorted by group
  K: contraction dim of the forward op
  N: output dim of the forward op
  G: groups (experts)
  I: work items, one per (row tile, group) pair that holds rows
  R: rows of one tile
"""

import functools
from collections.abc import Callable
from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

# Smallest tile the reference shrinks to when groups are small (fine-grained MoE at small batch).
_MIN_REFERENCE_TILE = 8


class _Config(NamedTuple):
  """Static settings of one grouped matmul call."""

  out_dtype: jnp.dtype  # dtype of the result; accumulation is always fp32
  tile_m: int  # most rows per tile
  backend: str  # a key of _BACKENDS, already resolved from "auto"
  transpose_rhs: bool  # forward op only: multiply by rhs[g].T instead of rhs[g]


class _Plan(NamedTuple):
  """Which row tile and group each work item of the reference touches."""

  group_ids_I: jax.Array  # group of each work item
  tile_ids_I: jax.Array  # row tile each work item reads
  starts_G: jax.Array  # first row of each group
  ends_G: jax.Array  # one past the last row of each group
  num_items: jax.Array  # work items in use; the rest of the static I are never visited


def _reference_tile_rows(num_rows: int, num_groups: int, tile_m: int) -> int:
  """Rows per tile: tile_m, or less when the average group is much smaller than a tile.

  Each work item computes a whole tile, so the work is at most (cdiv(M, R) + G - 1) * R rows;
  keeping R near M / G bounds the waste at about 3x the M rows even for hundreds of experts.
  """
  balanced = 1 << max(pl.cdiv(num_rows, num_groups) - 1, 0).bit_length()
  return max(1, min(tile_m, num_rows, max(_MIN_REFERENCE_TILE, balanced)))


def _make_plan(group_sizes_G: jax.Array, num_rows: int, rows_per_tile: int) -> _Plan:
  """Lists the (tile, group) pairs that hold rows, in row order."""
  num_groups = group_sizes_G.shape[0]
  ends_G = jnp.cumsum(group_sizes_G)
  starts_G = ends_G - group_sizes_G
  first_tile_G = starts_G // rows_per_tile
  last_tile_G = (ends_G - 1) // rows_per_tile
  tiles_G = jnp.where(group_sizes_G > 0, last_tile_G - first_tile_G + 1, 0)
  item_ends_G = jnp.cumsum(tiles_G)
  item_starts_G = item_ends_G - tiles_G
  # A group of s rows touches at most cdiv(s, R) + 1 tiles, but summed over groups this
  # telescopes: each boundary between two groups adds at most one tile.
  max_items = pl.cdiv(num_rows, rows_per_tile) + num_groups - 1
  items_I = jnp.arange(max_items, dtype=jnp.int32)
  group_ids_I = jnp.searchsorted(item_ends_G, items_I, side="right").astype(jnp.int32)
  group_ids_I = jnp.minimum(group_ids_I, num_groups - 1)
  tile_ids_I = first_tile_G[group_ids_I] + items_I - item_starts_G[group_ids_I]
  return _Plan(group_ids_I, tile_ids_I, starts_G, ends_G, item_ends_G[-1])


def _item_rows(plan: _Plan, item: jax.Array, num_rows: int, rows_per_tile: int):
  """Returns an item's group, the first row it reads, and which rows it owns."""
  group = plan.group_ids_I[item]
  tile_start = plan.tile_ids_I[item] * rows_per_tile
  # The last tile is shifted back to stay in bounds instead of padding the operands; owning only
  # the rows of its nominal tile keeps the overlap from being counted twice.
  read_start = jnp.minimum(tile_start, num_rows - rows_per_tile)
  rows_R = read_start + jnp.arange(rows_per_tile, dtype=jnp.int32)
  lo = jnp.maximum(plan.starts_G[group], tile_start)
  hi = jnp.minimum(plan.ends_G[group], tile_start + rows_per_tile)
  return group, read_start, (rows_R >= lo) & (rows_R < hi)


def _reference_gmm(cfg: _Config, lhs_MK, rhs_GKN, group_sizes_G):
  """Loops over work items; each multiplies one row tile by one group's matrix."""
  num_rows = lhs_MK.shape[0]
  num_groups, _, out_dim = rhs_GKN.shape
  if cfg.transpose_rhs:
    out_dim = rhs_GKN.shape[1]
  rows_per_tile = _reference_tile_rows(num_rows, num_groups, cfg.tile_m)
  plan = _make_plan(group_sizes_G, num_rows, rows_per_tile)
  compute_dtype = jnp.result_type(lhs_MK, rhs_GKN)
  contract_rhs = 1 if cfg.transpose_rhs else 0

  def step(item, out_MN):
    group, start, mask_R = _item_rows(plan, item, num_rows, rows_per_tile)
    x_RK = jax.lax.dynamic_slice_in_dim(lhs_MK, start, rows_per_tile).astype(compute_dtype)
    w_KN = jax.lax.dynamic_index_in_dim(rhs_GKN, group, keepdims=False).astype(compute_dtype)
    y_RN = jax.lax.dot_general(
        x_RK, w_KN, (((1,), (contract_rhs,)), ((), ())), preferred_element_type=jnp.float32)
    # Rows of other groups in a shared tile keep what their own item wrote.
    old_RN = jax.lax.dynamic_slice_in_dim(out_MN, start, rows_per_tile)
    new_RN = jnp.where(mask_R[:, None], y_RN.astype(out_MN.dtype), old_RN)
    return jax.lax.dynamic_update_slice_in_dim(out_MN, new_RN, start, 0)

  # Rows past the last group are never written and stay zero.
  out_MN = jnp.zeros((num_rows, out_dim), cfg.out_dtype)
  return jax.lax.fori_loop(0, plan.num_items, step, out_MN)


def _reference_tgmm(cfg: _Config, lhs_MK, rhs_MN, group_sizes_G):
  """Loops over work items; each adds one row tile's product into its group's slot."""
  num_rows, k_dim = lhs_MK.shape
  n_dim = rhs_MN.shape[1]
  num_groups = group_sizes_G.shape[0]
  rows_per_tile = _reference_tile_rows(num_rows, num_groups, cfg.tile_m)
  plan = _make_plan(group_sizes_G, num_rows, rows_per_tile)
  compute_dtype = jnp.result_type(lhs_MK, rhs_MN)

  def step(item, acc_GKN):
    group, start, mask_R = _item_rows(plan, item, num_rows, rows_per_tile)
    x_RK = jax.lax.dynamic_slice_in_dim(lhs_MK, start, rows_per_tile).astype(compute_dtype)
    x_RK = jnp.where(mask_R[:, None], x_RK, 0)
    dy_RN = jax.lax.dynamic_slice_in_dim(rhs_MN, start, rows_per_tile).astype(compute_dtype)
    part_KN = jax.lax.dot_general(
        x_RK, dy_RN, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)
    old_KN = jax.lax.dynamic_index_in_dim(acc_GKN, group, keepdims=False)
    return jax.lax.dynamic_update_index_in_dim(acc_GKN, old_KN + part_KN, group, 0)

  acc_GKN = jnp.zeros((num_groups, k_dim, n_dim), jnp.float32)
  acc_GKN = jax.lax.fori_loop(0, plan.num_items, step, acc_GKN)
  return acc_GKN.astype(cfg.out_dtype)


def _ragged_dot_gmm(cfg: _Config, lhs_MK, rhs_GKN, group_sizes_G):
  """XLA's ragged dot: native on TPU, a dense masked product elsewhere."""
  if cfg.transpose_rhs:
    rhs_GKN = jnp.swapaxes(rhs_GKN, 1, 2)
  out_MN = jax.lax.ragged_dot(
      lhs_MK, rhs_GKN, group_sizes_G, preferred_element_type=jnp.float32)
  return out_MN.astype(cfg.out_dtype)


def _ragged_dot_tgmm(cfg: _Config, lhs_MK, rhs_MN, group_sizes_G):
  """XLA's ragged dot with the ragged dim contracted, which yields one product per group."""
  dims = jax.lax.RaggedDotDimensionNumbers(
      dot_dimension_numbers=(((0,), (0,)), ((), ())),
      lhs_ragged_dimensions=(0,),
      rhs_group_dimensions=())
  out_GKN = jax.lax.ragged_dot_general(
      lhs_MK, rhs_MN, group_sizes_G, dims, preferred_element_type=jnp.float32)
  return out_GKN.astype(cfg.out_dtype)


class _Backend(NamedTuple):
  gmm: Callable[..., jax.Array]
  tgmm: Callable[..., jax.Array]
  # (cfg, lhs, rhs, group_sizes, save_preact) -> act, or (act, preact) with save_preact; None:
  # the backend's gmm followed by the SwiGLU in XLA (`_composite_swiglu`).
  swiglu: Callable[..., jax.Array | tuple[jax.Array, jax.Array]] | None = None


def swiglu_f32(gate: jax.Array, up: jax.Array) -> jax.Array:
  """silu(gate) * up in fp32: the one definition of the experts' SwiGLU that the unfused paths
  (`_swiglu_of`) and the FP8 quantiser's "swiglu" prologue (`kernels/fp8_quant.py`) compute."""
  return gate * jax.nn.sigmoid(gate) * up


def swiglu_grad_f32(gate: jax.Array, up: jax.Array, d_act: jax.Array):
  """(dgate, dup) of swiglu_f32 for its output's gradient d_act, in fp32 (the fused SwiGLU's
  backward here, and the FP8 quantiser's "swiglu_grad" prologue)."""
  sig = jax.nn.sigmoid(gate)
  return d_act * up * sig * (1.0 + gate * (1.0 - sig)), d_act * gate * sig


def _swiglu_of(h_MN: jax.Array, out_dtype) -> jax.Array:
  """silu(gate) * up in fp32 for h = [gate | up], in out_dtype."""
  gate_MF, up_MF = jnp.split(h_MN.astype(jnp.float32), 2, axis=-1)
  return swiglu_f32(gate_MF, up_MF).astype(out_dtype)


def _composite_swiglu(cfg: _Config, lhs_MK, rhs_GKN, group_sizes_G, save_preact: bool):
  """The backend's grouped matmul into cfg.out_dtype, then the SwiGLU as XLA ops."""
  h_MN = _BACKENDS[cfg.backend].gmm(cfg, lhs_MK, rhs_GKN, group_sizes_G)
  act_MF = _swiglu_of(h_MN, cfg.out_dtype)
  return (act_MF, h_MN) if save_preact else act_MF


def _mosaic_gpu_gmm(cfg: _Config, lhs_MK, rhs_GKN, group_sizes_G):
  """Pallas Mosaic GPU kernel (Hopper); operands it does not cover go to the reference."""
  from kernels import grouped_matmul_mgpu  # lazy: keeps CPU imports free of Mosaic GPU

  if not grouped_matmul_mgpu.supports(lhs_MK, rhs_GKN, cfg.transpose_rhs, cfg.out_dtype):
    return _reference_gmm(cfg, lhs_MK, rhs_GKN, group_sizes_G)
  return grouped_matmul_mgpu.gmm(
      lhs_MK, rhs_GKN, group_sizes_G, out_dtype=cfg.out_dtype, transpose_rhs=cfg.transpose_rhs)


def _mosaic_gpu_swiglu(cfg: _Config, lhs_MK, rhs_GKN, group_sizes_G, save_preact: bool):
  """The SwiGLU fused into the Mosaic GPU kernel's epilogue, where the kernel covers the shape."""
  from kernels import grouped_matmul_mgpu

  if not grouped_matmul_mgpu.supports(lhs_MK, rhs_GKN, False, cfg.out_dtype, swiglu=True):
    return _composite_swiglu(cfg, lhs_MK, rhs_GKN, group_sizes_G, save_preact)
  return grouped_matmul_mgpu.gmm(lhs_MK, rhs_GKN, group_sizes_G, out_dtype=cfg.out_dtype,
                                 swiglu=True, save_preact=save_preact)


def _mosaic_gpu_tgmm(cfg: _Config, lhs_MK, rhs_MN, group_sizes_G):
  """Pallas Mosaic GPU weight-gradient kernel; operands it does not cover go to the reference."""
  from kernels import grouped_matmul_mgpu

  if not grouped_matmul_mgpu.supports_tgmm(lhs_MK, rhs_MN, cfg.out_dtype):
    return _reference_tgmm(cfg, lhs_MK, rhs_MN, group_sizes_G)
  return grouped_matmul_mgpu.tgmm(lhs_MK, rhs_MN, group_sizes_G, out_dtype=cfg.out_dtype)


@functools.cache
def _interpreted_kernel(kernel_fn: Callable[..., jax.Array], interpret: Any = None,
                        **static) -> Callable[..., jax.Array]:
  """The jitted kernel under a Pallas interpreter; cached so each shape compiles once.

  interpret: the interpreter's parameters, Pallas's GPU interpreter's by default (and then the
  interpreted grid's number of SMs); `_tpu_interpreted_kernel` passes the TPU interpreter's.
  """
  if interpret is None:
    from jax.experimental.pallas import mosaic_gpu as plgpu

    interpret, static = plgpu.InterpretGPUParams(), {"num_sms": INTERPRET_NUM_SMS, **static}
  return jax.jit(functools.partial(kernel_fn, interpret=interpret, **static))


def _as_pure_callback(kernel: Callable[..., jax.Array], out_type, *args) -> jax.Array:
  """Runs an interpreted kernel eagerly inside a pure callback.

  The interpreter simulates the GPU with ordered IO callbacks; traced inline, those effects pin
  the call in every enclosing jaxpr (flax's `nn.scan`, which the model's layer stack uses,
  rejects them). The kernel itself is a pure function of its operands, so say so.
  """
  return jax.pure_callback(lambda *a: jax.tree.map(np.asarray, kernel(*a)), out_type, *args)


# Simulated SMs of the interpreted kernels: few, since each is a thread of the interpreter.
INTERPRET_NUM_SMS = 2


def _interpret_error(op: str, lhs, rhs, detail: str) -> ValueError:
  return ValueError(
      f"{op}: backend 'pallas_mosaic_gpu_interpret' has no tiling for lhs {lhs.dtype}"
      f"{list(lhs.shape)} and rhs {rhs.dtype}{list(rhs.shape)} ({detail}). Use bf16 or fp16 "
      "operands (e.g. config.model.dtype='bfloat16') with K and N multiples of 32, or "
      "backend='reference'.")


def _mosaic_gpu_interpret_gmm(cfg: _Config, lhs_MK, rhs_GKN, group_sizes_G):
  """The Mosaic GPU forward/dgrad kernel run by Pallas's GPU interpreter (CPU tests).

  Strict: operands the kernel does not cover raise instead of taking the reference, so that a
  test through this backend really runs the kernel.
  """
  from kernels import grouped_matmul_mgpu as mgpu

  k_dim = lhs_MK.shape[1]
  n_dim = rhs_GKN.shape[1] if cfg.transpose_rhs else rhs_GKN.shape[2]
  tiles = mgpu.interpret_tile_config(k_dim, n_dim)
  if tiles is None or not mgpu.supports(lhs_MK, rhs_GKN, cfg.transpose_rhs, cfg.out_dtype, tiles):
    raise _interpret_error("grouped_matmul", lhs_MK, rhs_GKN, f"K={k_dim}, N={n_dim}")
  kernel = _interpreted_kernel(mgpu.gmm, out_dtype=cfg.out_dtype,
                               transpose_rhs=cfg.transpose_rhs, config=tiles)
  out_type = jax.ShapeDtypeStruct((lhs_MK.shape[0], n_dim), cfg.out_dtype)
  return _as_pure_callback(kernel, out_type, lhs_MK, rhs_GKN, group_sizes_G)


def _interpret_swiglu_tiles(k_dim: int, n_dim: int):
  """A small fused-SwiGLU tiling for rhs [G, K, N = 2F] in interpret mode, or None."""
  from kernels import grouped_matmul_mgpu as mgpu

  tiles = mgpu.interpret_tile_config(k_dim, n_dim // 2) if n_dim % 2 == 0 else None
  return tiles if tiles is not None and tiles.body != "pipe" else None


def _mosaic_gpu_interpret_swiglu(cfg: _Config, lhs_MK, rhs_GKN, group_sizes_G, save_preact: bool):
  """The fused SwiGLU kernel under Pallas's GPU interpreter; strict like gmm."""
  from kernels import grouped_matmul_mgpu as mgpu

  k_dim, n_dim = rhs_GKN.shape[1:]
  tiles = _interpret_swiglu_tiles(k_dim, n_dim)
  if tiles is None or not mgpu.supports(lhs_MK, rhs_GKN, False, cfg.out_dtype, tiles, swiglu=True):
    raise _interpret_error("grouped_matmul_swiglu", lhs_MK, rhs_GKN, f"K={k_dim}, N={n_dim}")
  kernel = _interpreted_kernel(mgpu.gmm, out_dtype=cfg.out_dtype, config=tiles, swiglu=True,
                               save_preact=save_preact)
  num_rows = lhs_MK.shape[0]
  out_type = jax.ShapeDtypeStruct((num_rows, n_dim // 2), cfg.out_dtype)
  if save_preact:
    out_type = (out_type, jax.ShapeDtypeStruct((num_rows, n_dim), cfg.out_dtype))
  return _as_pure_callback(kernel, out_type, lhs_MK, rhs_GKN, group_sizes_G)


def _mosaic_gpu_interpret_tgmm(cfg: _Config, lhs_MK, rhs_MN, group_sizes_G):
  """The Mosaic GPU weight-gradient kernel run by Pallas's GPU interpreter; strict like gmm."""
  from kernels import grouped_matmul_mgpu as mgpu

  k_dim, n_dim = lhs_MK.shape[1], rhs_MN.shape[1]
  tiles = mgpu.interpret_wgrad_config(k_dim, n_dim)
  if tiles is None or not mgpu.supports_tgmm(lhs_MK, rhs_MN, cfg.out_dtype, tiles):
    raise _interpret_error("transposed_grouped_matmul", lhs_MK, rhs_MN, f"K={k_dim}, N={n_dim}")
  kernel = _interpreted_kernel(mgpu.tgmm, out_dtype=cfg.out_dtype, config=tiles)
  out_type = jax.ShapeDtypeStruct((group_sizes_G.shape[0], k_dim, n_dim), cfg.out_dtype)
  return _as_pure_callback(kernel, out_type, lhs_MK, rhs_MN, group_sizes_G)


# Block size of the interpreted TPU kernels in K and N: the smallest the TPU takes, so that CPU
# tests of shapes from 256 up run several blocks of each.
INTERPRET_TPU_TILE_KN = 128


def _pallas_tpu_gmm(cfg: _Config, lhs_MK, rhs_GKN, group_sizes_G):
  """Pallas TPU kernel (megablox-style); operands it does not tile go to the reference."""
  from kernels import grouped_matmul_tpu as tpu  # lazy, as for the GPU kernels

  if not tpu.supports(tpu.check_gmm, lhs_MK, rhs_GKN, cfg.out_dtype, cfg.transpose_rhs,
                      tile_m=cfg.tile_m):
    return _reference_gmm(cfg, lhs_MK, rhs_GKN, group_sizes_G)
  return tpu.gmm(lhs_MK, rhs_GKN, group_sizes_G, out_dtype=cfg.out_dtype,
                 transpose_rhs=cfg.transpose_rhs, tile_m=cfg.tile_m)


def _pallas_tpu_tgmm(cfg: _Config, lhs_MK, rhs_MN, group_sizes_G):
  """Pallas TPU weight-gradient kernel; operands it does not tile go to the reference."""
  from kernels import grouped_matmul_tpu as tpu

  if not tpu.supports(tpu.check_tgmm, lhs_MK, rhs_MN, cfg.out_dtype, tile_m=cfg.tile_m):
    return _reference_tgmm(cfg, lhs_MK, rhs_MN, group_sizes_G)
  return tpu.tgmm(lhs_MK, rhs_MN, group_sizes_G, out_dtype=cfg.out_dtype, tile_m=cfg.tile_m)


def _tpu_interpret_checked(op: str, check, *args) -> None:
  """Raises, before anything is traced, for operands the interpreted TPU kernel does not take."""
  try:
    check(*args)
  except ValueError as e:
    raise ValueError(
        f"{op}: backend 'pallas_tpu_interpret' does not take these operands: {e} The "
        f"interpreted kernels tile K and N by {INTERPRET_TPU_TILE_KN}; tile_m is grouped_matmul's "
        "(a multiple of 8). Or use backend='reference'.") from e


def _tpu_interpreted_kernel(kernel_fn: Callable[..., jax.Array],
                            **static) -> Callable[..., jax.Array]:
  """The jitted kernel under Pallas's TPU interpreter, with the interpreted K and N tiles.

  The TPU interpreter (unlike `interpret=True`) simulates VMEM blocks that stay resident between
  grid steps, fills fresh memory with NaNs and rejects revisiting an output block, which is
  what the masked stores of the kernels rely on.
  """
  from jax.experimental.pallas import tpu as pltpu

  return _interpreted_kernel(kernel_fn, pltpu.InterpretParams(), tile_k=INTERPRET_TPU_TILE_KN,
                             tile_n=INTERPRET_TPU_TILE_KN, **static)


def _pallas_tpu_interpret_gmm(cfg: _Config, lhs_MK, rhs_GKN, group_sizes_G):
  """The Pallas TPU forward/dgrad kernel run by Pallas's TPU interpreter (CPU tests); strict
  like the Mosaic GPU interpreter's backend."""
  from kernels import grouped_matmul_tpu as tpu

  _tpu_interpret_checked("grouped_matmul", tpu.check_gmm, lhs_MK, rhs_GKN, cfg.out_dtype,
                         cfg.transpose_rhs, cfg.tile_m, INTERPRET_TPU_TILE_KN,
                         INTERPRET_TPU_TILE_KN)
  kernel = _tpu_interpreted_kernel(tpu.gmm, out_dtype=cfg.out_dtype,
                                   transpose_rhs=cfg.transpose_rhs, tile_m=cfg.tile_m)
  n_dim = rhs_GKN.shape[1] if cfg.transpose_rhs else rhs_GKN.shape[2]
  out_type = jax.ShapeDtypeStruct((lhs_MK.shape[0], n_dim), cfg.out_dtype)
  return _as_pure_callback(kernel, out_type, lhs_MK, rhs_GKN, group_sizes_G)


def _pallas_tpu_interpret_tgmm(cfg: _Config, lhs_MK, rhs_MN, group_sizes_G):
  """The Pallas TPU weight-gradient kernel run by Pallas's TPU interpreter; strict like gmm."""
  from kernels import grouped_matmul_tpu as tpu

  _tpu_interpret_checked("transposed_grouped_matmul", tpu.check_tgmm, lhs_MK, rhs_MN,
                         cfg.out_dtype, cfg.tile_m, INTERPRET_TPU_TILE_KN, INTERPRET_TPU_TILE_KN)
  kernel = _tpu_interpreted_kernel(tpu.tgmm, out_dtype=cfg.out_dtype, tile_m=cfg.tile_m)
  out_type = jax.ShapeDtypeStruct(
      (group_sizes_G.shape[0], lhs_MK.shape[1], rhs_MN.shape[1]), cfg.out_dtype)
  return _as_pure_callback(kernel, out_type, lhs_MK, rhs_MN, group_sizes_G)


# The switch point for kernels.
_BACKENDS: dict[str, _Backend] = {
    "reference": _Backend(_reference_gmm, _reference_tgmm),
    "ragged_dot": _Backend(_ragged_dot_gmm, _ragged_dot_tgmm),
    # Hopper only (wgmma); fp32 operands and untiled shapes go to the reference inside.
    "pallas_mosaic_gpu": _Backend(_mosaic_gpu_gmm, _mosaic_gpu_tgmm, _mosaic_gpu_swiglu),
    # The same kernels under Pallas's GPU interpreter, on any platform: slow, for CPU tests of
    # whole models. Needs bf16/fp16 operands and K, N that small tiles divide.
    "pallas_mosaic_gpu_interpret": _Backend(_mosaic_gpu_interpret_gmm, _mosaic_gpu_interpret_tgmm,
                                            _mosaic_gpu_interpret_swiglu),
    # Megablox-style Pallas TPU kernels; fp16 operands and shapes they do not tile go to the
    # reference inside. "auto" keeps ragged_dot on TPU until these are timed there.
    "pallas_tpu": _Backend(_pallas_tpu_gmm, _pallas_tpu_tgmm),
    # The same kernels under Pallas's TPU interpreter, on any platform: slow, for CPU tests.
    "pallas_tpu_interpret": _Backend(_pallas_tpu_interpret_gmm, _pallas_tpu_interpret_tgmm),
}


def _is_hopper_gpu() -> bool:
  if jax.default_backend() != "gpu":
    return False
  return getattr(jax.devices()[0], "compute_capability", None) == "9.0"


def _resolve_backend(backend: str) -> str:
  if backend == "auto":
    # ragged_dot lowers natively only on TPU; on GPU it becomes a dense masked product.
    if jax.default_backend() == "tpu":
      return "ragged_dot"
    return "pallas_mosaic_gpu" if _is_hopper_gpu() else "reference"
  if backend not in _BACKENDS:
    raise ValueError(
        f"Unknown grouped matmul backend {backend!r}; expected 'auto' or one of "
        f"{sorted(_BACKENDS)}.")
  return backend


def _int_zeros(x: jax.Array) -> np.ndarray:
  return np.zeros(x.shape, jax.dtypes.float0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _gmm(cfg: _Config, lhs_MK, rhs_GKN, group_sizes_G):
  return _BACKENDS[cfg.backend].gmm(cfg, lhs_MK, rhs_GKN, group_sizes_G)


def _gmm_fwd(cfg, lhs_MK, rhs_GKN, group_sizes_G):
  return _gmm(cfg, lhs_MK, rhs_GKN, group_sizes_G), (lhs_MK, rhs_GKN, group_sizes_G)


def _gmm_bwd(cfg, res, dout_MN):
  lhs_MK, rhs_GKN, group_sizes_G = res
  dlhs_MK = _gmm(
      cfg._replace(out_dtype=lhs_MK.dtype, transpose_rhs=not cfg.transpose_rhs),
      dout_MN, rhs_GKN, group_sizes_G)
  wgrad_cfg = cfg._replace(out_dtype=rhs_GKN.dtype, transpose_rhs=False)
  if cfg.transpose_rhs:
    drhs_GKN = _tgmm(wgrad_cfg, dout_MN, lhs_MK, group_sizes_G)
  else:
    drhs_GKN = _tgmm(wgrad_cfg, lhs_MK, dout_MN, group_sizes_G)
  return dlhs_MK, drhs_GKN, _int_zeros(group_sizes_G)


_gmm.defvjp(_gmm_fwd, _gmm_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _tgmm(cfg: _Config, lhs_MK, rhs_MN, group_sizes_G):
  return _BACKENDS[cfg.backend].tgmm(cfg, lhs_MK, rhs_MN, group_sizes_G)


def _tgmm_fwd(cfg, lhs_MK, rhs_MN, group_sizes_G):
  return _tgmm(cfg, lhs_MK, rhs_MN, group_sizes_G), (lhs_MK, rhs_MN, group_sizes_G)


def _tgmm_bwd(cfg, res, dout_GKN):
  lhs_MK, rhs_MN, group_sizes_G = res
  dlhs_MK = _gmm(
      cfg._replace(out_dtype=lhs_MK.dtype, transpose_rhs=True), rhs_MN, dout_GKN, group_sizes_G)
  drhs_MN = _gmm(
      cfg._replace(out_dtype=rhs_MN.dtype, transpose_rhs=False), lhs_MK, dout_GKN, group_sizes_G)
  return dlhs_MK, drhs_MN, _int_zeros(group_sizes_G)


_tgmm.defvjp(_tgmm_fwd, _tgmm_bwd)


def _swiglu_impl(cfg: _Config, lhs_MK, rhs_GKN, group_sizes_G, save_preact: bool):
  fused = _BACKENDS[cfg.backend].swiglu
  if fused is None:
    return _composite_swiglu(cfg, lhs_MK, rhs_GKN, group_sizes_G, save_preact)
  return fused(cfg, lhs_MK, rhs_GKN, group_sizes_G, save_preact)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _gmm_swiglu(cfg: _Config, lhs_MK, rhs_GKN, group_sizes_G):
  return _swiglu_impl(cfg, lhs_MK, rhs_GKN, group_sizes_G, save_preact=False)


def _gmm_swiglu_fwd(cfg, lhs_MK, rhs_GKN, group_sizes_G):
  act_MF, h_MN = _swiglu_impl(cfg, lhs_MK, rhs_GKN, group_sizes_G, save_preact=True)
  return act_MF, (lhs_MK, rhs_GKN, group_sizes_G, h_MN)


def _gmm_swiglu_bwd(cfg, res, dact_MF):
  lhs_MK, rhs_GKN, group_sizes_G, h_MN = res
  gate_MF, up_MF = jnp.split(h_MN.astype(jnp.float32), 2, axis=-1)
  dgate_MF, dup_MF = swiglu_grad_f32(gate_MF, up_MF, dact_MF.astype(jnp.float32))
  # The cotangent of the saved pre-activation, in its dtype, as the unfused path would have it.
  dh_MN = jnp.concatenate([dgate_MF, dup_MF], axis=-1).astype(h_MN.dtype)
  return _gmm_bwd(cfg._replace(out_dtype=h_MN.dtype), (lhs_MK, rhs_GKN, group_sizes_G), dh_MN)


_gmm_swiglu.defvjp(_gmm_swiglu_fwd, _gmm_swiglu_bwd)


def _check_group_sizes(group_sizes_G: jax.Array, fn: str) -> None:
  if group_sizes_G.ndim != 1 or not jnp.issubdtype(group_sizes_G.dtype, jnp.integer):
    raise ValueError(
        f"{fn}: group_sizes must be a rank-1 integer array [G], got "
        f"{group_sizes_G.dtype}{list(group_sizes_G.shape)}.")
  if group_sizes_G.shape[0] == 0:
    raise ValueError(f"{fn}: group_sizes must hold at least one group.")


def _check_float(x: jax.Array, name: str, fn: str) -> None:
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise ValueError(f"{fn}: {name} must be floating point, got {x.dtype}.")


def _check_tile_m(tile_m: int, fn: str) -> None:
  if not isinstance(tile_m, int) or tile_m < 1:
    raise ValueError(f"{fn}: tile_m must be a positive int, got {tile_m!r}.")


# Longest vector `prefix_sum` sums as all pairs (its [N, N] masked sum); longer ones use cumsum.
_PAIRWISE_PREFIX_MAX = 4096


def prefix_sum(x_N: jax.Array) -> jax.Array:
  """Inclusive cumulative sum of a short vector (group sizes, tile counts): out[i] = x[:i+1].sum().

  As one masked sum over all [N, N] pairs, which XLA fuses into a single small reduction. On an
  H200, `jnp.cumsum` of 256 group sizes (XLA's reduce-window lowering) added ~100 us to each
  grouped GEMM call that clipped its group sizes with it: 20% of the Ling-mini down
  projection (BENCHMARKS.md, blockwise FP8, session 17). Vectors past _PAIRWISE_PREFIX_MAX
  elements take `jnp.cumsum`.
  """
  n = x_N.shape[0]
  if n > _PAIRWISE_PREFIX_MAX:
    return jnp.cumsum(x_N)
  idx_N = jnp.arange(n, dtype=jnp.int32)
  upto_NN = idx_N[None, :] <= idx_N[:, None]  # [i, j]: j <= i
  return jnp.sum(jnp.where(upto_NN, x_N[None, :], jnp.zeros((), x_N.dtype)), axis=1,
                 dtype=x_N.dtype)


def fit_group_sizes(group_sizes_G: jax.Array, num_rows: int) -> jax.Array:
  """Clips sizes so that groups end within the M rows; rows past the last group stay zero."""
  ends_G = jnp.minimum(prefix_sum(jnp.maximum(group_sizes_G.astype(jnp.int32), 0)), num_rows)
  return jnp.diff(ends_G, prepend=jnp.zeros((1,), jnp.int32))


def _check_forward_operands(fn: str, lhs_MK: jax.Array, rhs_GKN: jax.Array,
                            group_sizes_G: jax.Array, tile_m: int) -> None:
  """The checks `grouped_matmul` and `grouped_matmul_swiglu` share (after their rank checks)."""
  _check_group_sizes(group_sizes_G, fn)
  _check_float(lhs_MK, "lhs", fn)
  _check_float(rhs_GKN, "rhs", fn)
  _check_tile_m(tile_m, fn)
  if lhs_MK.shape[1] != rhs_GKN.shape[1]:
    raise ValueError(
        f"{fn}: contraction dims differ: lhs K={lhs_MK.shape[1]}, rhs K={rhs_GKN.shape[1]}.")
  if rhs_GKN.shape[0] != group_sizes_G.shape[0]:
    raise ValueError(
        f"{fn}: rhs has {rhs_GKN.shape[0]} groups but group_sizes has {group_sizes_G.shape[0]}.")


def grouped_matmul(
    lhs_MK: jax.Array,
    rhs_GKN: jax.Array,
    group_sizes_G: jax.Array,
    *,
    preferred_element_type: jnp.dtype | None = None,
    tile_m: int = 128,
    backend: str = "auto",
) -> jax.Array:
  """Multiplies each group's rows of `lhs_MK` by that group's matrix `rhs_GKN[g]`.

  Args:
    lhs_MK: rows sorted by group: group g owns rows [sum(group_sizes[:g]), sum(group_sizes[:g+1])).
    rhs_GKN: one [K, N] matrix per group.
    group_sizes_G: int rows per group (traced data). Rows past sum(group_sizes) give zeros and
      get zero gradient; sizes that overrun M are clipped at M.
    preferred_element_type: output dtype; defaults to lhs's. Products accumulate in fp32.
    tile_m: most rows per tile. The reference uses fewer when the average group is smaller,
      which bounds its wasted work for many small groups.
    backend: "auto" (the Mosaic GPU kernel on Hopper GPUs, ragged_dot on TPU, else the
      reference), "reference", "ragged_dot", "pallas_mosaic_gpu",
      "pallas_mosaic_gpu_interpret" (the Mosaic GPU kernels in Pallas's interpreter; CPU tests),
      "pallas_tpu" (megablox-style Pallas TPU kernels; TPU only, not yet timed on one), or
      "pallas_tpu_interpret" (those in Pallas's TPU interpreter; CPU tests).

  Returns:
    out_MN with out_MN[rows of g] = lhs_MK[rows of g] @ rhs_GKN[g].
  """
  fn = "grouped_matmul"
  lhs_MK, rhs_GKN, group_sizes_G = map(jnp.asarray, (lhs_MK, rhs_GKN, group_sizes_G))
  if lhs_MK.ndim != 2 or rhs_GKN.ndim != 3:
    raise ValueError(
        f"{fn}: expected lhs [M, K] and rhs [G, K, N], got lhs {list(lhs_MK.shape)} and rhs "
        f"{list(rhs_GKN.shape)}.")
  _check_forward_operands(fn, lhs_MK, rhs_GKN, group_sizes_G, tile_m)
  out_dtype = jnp.dtype(lhs_MK.dtype if preferred_element_type is None else preferred_element_type)
  if lhs_MK.shape[0] == 0:
    return jnp.zeros((0, rhs_GKN.shape[2]), out_dtype)
  cfg = _Config(out_dtype, tile_m, _resolve_backend(backend), transpose_rhs=False)
  return _gmm(cfg, lhs_MK, rhs_GKN, fit_group_sizes(group_sizes_G, lhs_MK.shape[0]))


def transposed_grouped_matmul(
    lhs_MK: jax.Array,
    rhs_MN: jax.Array,
    group_sizes_G: jax.Array,
    *,
    num_groups: int | None = None,
    preferred_element_type: jnp.dtype | None = None,
    tile_m: int = 128,
    backend: str = "auto",
) -> jax.Array:
  """Sums, per group, the products lhs[rows of g].T @ rhs[rows of g]: the weight gradient.

  Args:
    lhs_MK: rows sorted by group, as for `grouped_matmul`.
    rhs_MN: rows in the same order.
    group_sizes_G: int rows per group (traced data).
    num_groups: groups in the output; only the first num_groups entries of group_sizes count and
      later rows are ignored. Defaults to G.
    preferred_element_type: output dtype; defaults to lhs's. Products accumulate in fp32.
    tile_m: most rows per tile, as for `grouped_matmul`.
    backend: as for `grouped_matmul`.

  Returns:
    out_GKN; groups without rows give zeros.
  """
  fn = "transposed_grouped_matmul"
  lhs_MK, rhs_MN, group_sizes_G = map(jnp.asarray, (lhs_MK, rhs_MN, group_sizes_G))
  if lhs_MK.ndim != 2 or rhs_MN.ndim != 2 or lhs_MK.shape[0] != rhs_MN.shape[0]:
    raise ValueError(
        f"{fn}: expected lhs [M, K] and rhs [M, N] with the same M, got lhs "
        f"{list(lhs_MK.shape)} and rhs {list(rhs_MN.shape)}.")
  _check_group_sizes(group_sizes_G, fn)
  _check_float(lhs_MK, "lhs", fn)
  _check_float(rhs_MN, "rhs", fn)
  _check_tile_m(tile_m, fn)
  if num_groups is not None:
    if not 1 <= num_groups <= group_sizes_G.shape[0]:
      raise ValueError(
          f"{fn}: num_groups={num_groups} must be in [1, {group_sizes_G.shape[0]}] (the length "
          "of group_sizes).")
    group_sizes_G = group_sizes_G[:num_groups]
  out_dtype = jnp.dtype(lhs_MK.dtype if preferred_element_type is None else preferred_element_type)
  if lhs_MK.shape[0] == 0:
    return jnp.zeros((group_sizes_G.shape[0], lhs_MK.shape[1], rhs_MN.shape[1]), out_dtype)
  cfg = _Config(out_dtype, tile_m, _resolve_backend(backend), transpose_rhs=False)
  return _tgmm(cfg, lhs_MK, rhs_MN, fit_group_sizes(group_sizes_G, lhs_MK.shape[0]))


def grouped_matmul_swiglu(
    lhs_MK: jax.Array,
    rhs_GKN: jax.Array,
    group_sizes_G: jax.Array,
    *,
    preferred_element_type: jnp.dtype | None = None,
    tile_m: int = 128,
    backend: str = "auto",
) -> jax.Array:
  """silu(lhs @ gate_g) * (lhs @ up_g) for each group's rows: a SwiGLU expert's first GEMM.

  Args:
    lhs_MK: rows sorted by group, as for `grouped_matmul`.
    rhs_GKN: per group [K, N = 2F]: gate columns [0, F), then up columns [F, 2F).
    group_sizes_G: int rows per group (traced data); rows past the last group give zeros.
    preferred_element_type: dtype of the output and of the pre-activation the VJP keeps;
      defaults to lhs's. Products accumulate in fp32.
    tile_m: as for `grouped_matmul`.
    backend: as for `grouped_matmul`. "pallas_mosaic_gpu" (and its interpreter) compute the
      SwiGLU in the GEMM's epilogue from the fp32 accumulators; the others (the TPU kernels
      too) run the GEMM and then the SwiGLU in XLA on the rounded pre-activation.

  Returns:
    act_MF. Its VJP recomputes nothing: the forward under differentiation also stores the
    pre-activation [M, 2F], and the backward is the grouped matmul's on d(pre-activation).
  """
  fn = "grouped_matmul_swiglu"
  lhs_MK, rhs_GKN, group_sizes_G = map(jnp.asarray, (lhs_MK, rhs_GKN, group_sizes_G))
  if lhs_MK.ndim != 2 or rhs_GKN.ndim != 3 or rhs_GKN.shape[2] % 2:
    raise ValueError(
        f"{fn}: expected lhs [M, K] and rhs [G, K, 2F] (gate then up columns), got lhs "
        f"{list(lhs_MK.shape)} and rhs {list(rhs_GKN.shape)}.")
  _check_forward_operands(fn, lhs_MK, rhs_GKN, group_sizes_G, tile_m)
  out_dtype = jnp.dtype(lhs_MK.dtype if preferred_element_type is None else preferred_element_type)
  if lhs_MK.shape[0] == 0:
    return jnp.zeros((0, rhs_GKN.shape[2] // 2), out_dtype)
  cfg = _Config(out_dtype, tile_m, _resolve_backend(backend), transpose_rhs=False)
  return _gmm_swiglu(cfg, lhs_MK, rhs_GKN, fit_group_sizes(group_sizes_G, lhs_MK.shape[0]))


def fused_swiglu_wins(backend: str, dtype, k_dim: int, n_dim: int) -> bool:
  """Whether `grouped_matmul_swiglu` should replace the GEMM + XLA SwiGLU for rhs [G, K, N = 2F].

  On Hopper: where the fused tiling table has the shape (it measured faster there). In the
  interpreter: wherever a small tiling covers it, so that CPU tests run the fused kernel.
  """
  resolved = _resolve_backend(backend)
  if resolved not in ("pallas_mosaic_gpu", "pallas_mosaic_gpu_interpret"):
    return False
  from kernels import grouped_matmul_mgpu as mgpu  # lazy, as for the kernels

  lhs = jax.ShapeDtypeStruct((1, k_dim), dtype)
  rhs = jax.ShapeDtypeStruct((1, k_dim, n_dim), dtype)
  if resolved == "pallas_mosaic_gpu_interpret":
    tiles = _interpret_swiglu_tiles(k_dim, n_dim)
    return tiles is not None and mgpu.supports(lhs, rhs, False, dtype, tiles, swiglu=True)
  if resolved == "pallas_mosaic_gpu" and _is_hopper_gpu():
    return ((k_dim, n_dim, jnp.dtype(dtype).name) in mgpu.SWIGLU_CONFIGS
            and mgpu.supports(lhs, rhs, False, dtype, swiglu=True))
  return False
