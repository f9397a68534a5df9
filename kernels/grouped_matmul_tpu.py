"""Grouped matmul on TPUs through Pallas Mosaic TPU, in the style of megablox.

The forward op `gmm` computes out[rows of g] = lhs[rows of g] @ rhs[g] (or @ rhs[g].T for the
dgrad); `tgmm`, the weight gradient, computes out[g] = lhs[rows of g].T @ rhs[rows of g]. Both
are registered as the "pallas_tpu" backend of kernels/grouped_matmul.py (and, run by Pallas's TPU
interpreter, as "pallas_tpu_interpret" for CPU tests), which ties them together with custom VJPs.

How ragged groups are handled: JAX lists the work items before the kernel starts, one per (row
tile, group) pair that holds rows, in row order, and passes them by scalar prefetch
(`pltpu.PrefetchScalarGridSpec`): the group and the row tile of each item, and the first row of
each group. The index maps read them to pick the blocks of each grid step. A tile shared by
several groups is visited once per group, and each visit stores only its own group's rows.
  - `gmm` runs the grid (N tiles, items, K tiles). Items of one row tile are consecutive for each
    N tile, so the output block stays in VMEM across them and each item overwrites only its rows
    (with items outermost, a row tile would leave VMEM between its groups and come back stale).
    Rows past the last group form an extra "tail" group that writes zeros, so every row is
    written exactly once. Empty groups have no items.
  - `tgmm` runs the grid (K tiles, N tiles, items). A group's items are consecutive, so its
    [K, N] output block accumulates in a VMEM scratch from its first item to its last; rows of
    other groups are zeroed in both operands before each product. An empty group gets one item,
    which writes its zeros.
The number of items is data: the grid's item axis has that traced size (at most
cdiv(M, R) + G), so no step is spent on padding. The last row tile may run past M; its rows past
M belong to no group and are masked like other groups' rows. K and N must be multiples of their
tiles (or fit in one), which `check_gmm`/`check_tgmm` say before anything is traced. Products
accumulate in fp32.

Shape key:
  M: rows, sorted by group
  K: contraction dim of the forward op
  N: output dim of the forward op
  G: groups (experts)
  H: groups of the schedule: G, or G + 1 with the tail group (index G)
  I: work items (static upper bound; the grid visits only the ones in use)
  R: rows of one tile (tile_m)
"""

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

# TPU vector registers are (8 sublanes, 128 lanes): a block's last dim must be a multiple of
# 128 and the one before a multiple of 8, unless the block spans the whole array dim.
_SUBLANES = 8
_LANES = 128
# Default block sizes: untuned, since no TPU has timed these kernels yet.
TILE_M, TILE_K, TILE_N = 128, 512, 512


class Tiles(NamedTuple):
  """Block sizes of one kernel launch, already fitted to the operands."""

  tile_m: int  # rows per tile (R)
  tile_k: int  # contraction dim (gmm) or K rows of the output (tgmm) per block
  tile_n: int  # output columns per block


class Schedule(NamedTuple):
  """The work items of one launch, in row order; every array is scalar-prefetched."""

  group_I: jax.Array  # group of each item
  tile_I: jax.Array  # row tile each item reads (and, in gmm, writes)
  offsets_H1: jax.Array  # first row of each group, then one past the last group's last row
  num_items: jax.Array  # items in use: the size of the grid's item axis


def make_schedule(group_sizes_G: jax.Array, num_rows: int, tile_m: int, *, tail: bool,
                  visit_empty: bool) -> Schedule:
  """Lists the (row tile, group) pairs that hold rows, in row order.

  With `tail`, rows past the last group form group G; with `visit_empty`, an empty group gets
  one item (on the tile where it would start) so that the kernel can write its output.
  """
  sizes_H = group_sizes_G.astype(jnp.int32)
  if tail:
    sizes_H = jnp.concatenate([sizes_H, num_rows - jnp.sum(sizes_H, keepdims=True)])
  num_groups = sizes_H.shape[0]
  num_tiles = pl.cdiv(num_rows, tile_m)
  ends_H = jnp.cumsum(sizes_H)
  starts_H = ends_H - sizes_H
  first_tile_H = jnp.minimum(starts_H // tile_m, num_tiles - 1)
  last_tile_H = (ends_H - 1) // tile_m
  tiles_H = jnp.where(sizes_H > 0, last_tile_H - first_tile_H + 1, 1 if visit_empty else 0)
  item_ends_H = jnp.cumsum(tiles_H)
  item_starts_H = item_ends_H - tiles_H
  # Each group adds at most one tile beyond the ones its rows fill (a tile it shares with the
  # group before), and an empty group visited adds one while sharing none.
  max_items = num_tiles + num_groups - 1
  items_I = jnp.arange(max_items, dtype=jnp.int32)
  group_I = jnp.searchsorted(item_ends_H, items_I, side="right").astype(jnp.int32)
  group_I = jnp.minimum(group_I, num_groups - 1)
  tile_I = first_tile_H[group_I] + items_I - item_starts_H[group_I]
  # Items past num_items are never visited; clamping keeps even their block indices in range.
  tile_I = jnp.clip(tile_I, 0, num_tiles - 1)
  offsets_H1 = jnp.concatenate([starts_H, ends_H[-1:]])
  return Schedule(group_I, tile_I, offsets_H1, item_ends_H[-1])


def _fit(dim: int, tile: int, quantum: int, name: str, dim_name: str, op: str,
         partial_ok: bool = False) -> int:
  """The block size for `dim`: the whole dim if the tile covers it, else the tile (checked)."""
  if not isinstance(tile, int) or tile < 1:
    raise ValueError(f"{op}: {name} must be a positive int, got {tile!r}.")
  if dim < 1:
    raise ValueError(f"{op}: {dim_name} must be at least 1, got {dim}.")
  if dim <= tile:
    return dim
  if tile % quantum:
    raise ValueError(
        f"{op}: {name}={tile} is smaller than {dim_name}={dim} and not a multiple of {quantum} "
        f"(the TPU's tiling): pass a multiple of {quantum}, or {name} >= {dim}.")
  if dim % tile and not partial_ok:
    raise ValueError(
        f"{op}: {dim_name}={dim} is not a multiple of {name}={tile}: pass a {name} that "
        f"divides {dim} (a multiple of {quantum}), or {name} >= {dim}.")
  return tile


def _fit_tiles(op: str, num_rows: int, k_dim: int, n_dim: int, tile_m: int, tile_k: int,
               tile_n: int) -> Tiles:
  # Only M may end in a partial tile: its rows past M are masked like other groups' rows.
  return Tiles(_fit(num_rows, tile_m, _SUBLANES, "tile_m", "M", op, partial_ok=True),
               _fit(k_dim, tile_k, _LANES, "tile_k", "K", op),
               _fit(n_dim, tile_n, _LANES, "tile_n", "N", op))


def check_gmm(lhs_MK, rhs_GKN, out_dtype, transpose_rhs: bool, tile_m: int = TILE_M,
              tile_k: int = TILE_K, tile_n: int = TILE_N) -> Tiles:
  """The tiles of `gmm` for these operands (arrays or ShapeDtypeStructs); a ValueError that
  names what to change for operands it does not take."""
  op = "grouped_matmul_tpu.gmm"
  _check_dtypes(op, out_dtype, lhs_MK, rhs_GKN)
  rhs_k_axis = 2 if transpose_rhs else 1
  if lhs_MK.ndim != 2 or rhs_GKN.ndim != 3 or lhs_MK.shape[1] != rhs_GKN.shape[rhs_k_axis]:
    raise ValueError(
        f"{op}: expected lhs [M, K] and rhs [G, {'N, K' if transpose_rhs else 'K, N'}], got "
        f"{list(lhs_MK.shape)} and {list(rhs_GKN.shape)}.")
  (num_rows, k_dim), n_dim = lhs_MK.shape, rhs_GKN.shape[1 if transpose_rhs else 2]
  return _fit_tiles(op, num_rows, k_dim, n_dim, tile_m, tile_k, tile_n)


def check_tgmm(lhs_MK, rhs_MN, out_dtype, tile_m: int = TILE_M, tile_k: int = TILE_K,
               tile_n: int = TILE_N) -> Tiles:
  """The tiles of `tgmm`, as `check_gmm`."""
  op = "grouped_matmul_tpu.tgmm"
  _check_dtypes(op, out_dtype, lhs_MK, rhs_MN)
  if lhs_MK.ndim != 2 or rhs_MN.ndim != 2 or lhs_MK.shape[0] != rhs_MN.shape[0]:
    raise ValueError(
        f"{op}: expected lhs [M, K] and rhs [M, N], got {list(lhs_MK.shape)} and "
        f"{list(rhs_MN.shape)}.")
  (num_rows, k_dim), n_dim = lhs_MK.shape, rhs_MN.shape[1]
  return _fit_tiles(op, num_rows, k_dim, n_dim, tile_m, tile_k, tile_n)


def supports(check, *args, **kwargs) -> bool:
  """Whether `check` (check_gmm or check_tgmm) takes these operands."""
  try:
    check(*args, **kwargs)
  except ValueError:
    return False
  return True


def _check_dtypes(op: str, out_dtype, *operands) -> None:
  for dtype in (*(x.dtype for x in operands), jnp.dtype(out_dtype)):
    if dtype not in (jnp.float32, jnp.bfloat16):
      raise ValueError(
          f"{op}: operands and output must be float32 or bfloat16, got {dtype}: cast them, or "
          "use backend='reference'.")


def _check_group_sizes(op: str, group_sizes_G, num_groups: int | None) -> None:
  if (group_sizes_G.ndim != 1 or not jnp.issubdtype(group_sizes_G.dtype, jnp.integer)
      or num_groups not in (None, group_sizes_G.shape[0])):
    raise ValueError(
        f"{op}: group_sizes must be an int array [G] (G={num_groups or 'any'}), got "
        f"{group_sizes_G.dtype}{list(group_sizes_G.shape)}.")


def _owned_rows(tile_I, offsets_H1, item: jax.Array, group: jax.Array, shape, tile_m: int):
  """Which rows of the item's tile belong to its group, broadcast to a block's `shape`."""
  rows = tile_I[item] * tile_m + jax.lax.broadcasted_iota(jnp.int32, shape, 0)
  return (rows >= offsets_H1[group]) & (rows < offsets_H1[group + 1])


def _gmm_kernel(group_I, tile_I, offsets_H1, lhs_ref, rhs_ref, out_ref, acc_ref, *,
                num_groups: int, tile_m: int, transpose_rhs: bool, compute_dtype):
  """One (N tile, item, K tile) step: accumulate, and at the last K step store owned rows."""
  item, k_step = pl.program_id(1), pl.program_id(2)
  group = group_I[item]

  @pl.when(k_step == 0)
  def _zero():
    acc_ref[...] = jnp.zeros_like(acc_ref)

  @pl.when(group < num_groups)  # the tail group multiplies nothing: its rows stay zero
  def _accumulate():
    contract_rhs = 1 if transpose_rhs else 0
    acc_ref[...] += jax.lax.dot_general(
        lhs_ref[...].astype(compute_dtype), rhs_ref[...].astype(compute_dtype),
        (((1,), (contract_rhs,)), ((), ())), preferred_element_type=jnp.float32)

  @pl.when(k_step == pl.num_programs(2) - 1)
  def _store():
    own = _owned_rows(tile_I, offsets_H1, item, group, acc_ref.shape, tile_m)
    # The block holds the rows earlier items of this tile stored (or garbage, on the tile's
    # first item, in rows that later items own). Selecting in fp32 avoids bf16 VPU ops.
    out_ref[...] = jnp.where(own, acc_ref[...], out_ref[...].astype(jnp.float32)).astype(
        out_ref.dtype)


def gmm(
    lhs_MK: jax.Array,
    rhs_GKN: jax.Array,
    group_sizes_G: jax.Array,
    *,
    out_dtype=None,
    transpose_rhs: bool = False,
    tile_m: int = TILE_M,
    tile_k: int = TILE_K,
    tile_n: int = TILE_N,
    interpret: bool | pltpu.InterpretParams = False,
) -> jax.Array:
  """out[rows of g] = lhs[rows of g] @ rhs[g] (rhs[g].T with `transpose_rhs`); other rows 0.

  Args:
    lhs_MK: rows sorted by group.
    rhs_GKN: [G, K, N], or [G, N, K] with `transpose_rhs`.
    group_sizes_G: int rows per group (traced); their sum may be less than M but not more.
    out_dtype: defaults to lhs's; float32 or bfloat16, like the operands.
    transpose_rhs: multiply by rhs[g].T: the dgrad of a forward gmm.
    tile_m, tile_k, tile_n: block sizes; a tile at least as large as its dim becomes the whole
      dim. K and N must be multiples of their tiles; M need not be.
    interpret: passed to `pl.pallas_call`: True or `pltpu.InterpretParams()` run on CPU.

  Returns:
    out_MN.
  """
  out_dtype = jnp.dtype(lhs_MK.dtype if out_dtype is None else out_dtype)
  tiles = check_gmm(lhs_MK, rhs_GKN, out_dtype, transpose_rhs, tile_m, tile_k, tile_n)
  _check_group_sizes("grouped_matmul_tpu.gmm", group_sizes_G, rhs_GKN.shape[0])
  (num_rows, k_dim), num_groups = lhs_MK.shape, rhs_GKN.shape[0]
  n_dim = rhs_GKN.shape[1 if transpose_rhs else 2]
  schedule = make_schedule(group_sizes_G, num_rows, tiles.tile_m, tail=True, visit_empty=False)

  def lhs_index(n, item, k, group_I, tile_I, offsets_H1):
    del n, group_I, offsets_H1
    return tile_I[item], k

  def rhs_index(n, item, k, group_I, tile_I, offsets_H1):
    del tile_I, offsets_H1
    group = jnp.minimum(group_I[item], num_groups - 1)  # the tail reads a block it ignores
    return (group, n, k) if transpose_rhs else (group, k, n)

  def out_index(n, item, k, group_I, tile_I, offsets_H1):
    del k, group_I, offsets_H1
    return tile_I[item], n

  rhs_block = (None, tiles.tile_n, tiles.tile_k) if transpose_rhs else (
      None, tiles.tile_k, tiles.tile_n)
  kernel = functools.partial(
      _gmm_kernel, num_groups=num_groups, tile_m=tiles.tile_m, transpose_rhs=transpose_rhs,
      compute_dtype=jnp.result_type(lhs_MK, rhs_GKN))
  grid = (n_dim // tiles.tile_n, schedule.num_items, k_dim // tiles.tile_k)
  return pl.pallas_call(
      kernel,
      out_shape=jax.ShapeDtypeStruct((num_rows, n_dim), out_dtype),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=3,
          grid=grid,
          in_specs=[pl.BlockSpec((tiles.tile_m, tiles.tile_k), lhs_index),
                    pl.BlockSpec(rhs_block, rhs_index)],
          out_specs=pl.BlockSpec((tiles.tile_m, tiles.tile_n), out_index),
          scratch_shapes=[pltpu.VMEM((tiles.tile_m, tiles.tile_n), jnp.float32)]),
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "arbitrary", "arbitrary")),
      interpret=interpret,
  )(schedule.group_I, schedule.tile_I, schedule.offsets_H1, lhs_MK, rhs_GKN)


def _tgmm_kernel(group_I, tile_I, offsets_H1, lhs_ref, rhs_ref, out_ref, acc_ref, *,
                 tile_m: int, compute_dtype):
  """One (K tile, N tile, item) step: add the item's masked product into its group's block."""
  item, last_item = pl.program_id(2), pl.num_programs(2) - 1
  group = group_I[item]

  @pl.when((item == 0) | (group_I[jnp.maximum(item - 1, 0)] != group))
  def _zero():
    acc_ref[...] = jnp.zeros_like(acc_ref)

  @pl.when(offsets_H1[group + 1] > offsets_H1[group])
  def _accumulate():
    def owned(ref):
      # Both operands: rows past M hold garbage on a TPU, and 0 * NaN would leak into the sum.
      x = ref[...].astype(jnp.float32)
      return jnp.where(_owned_rows(tile_I, offsets_H1, item, group, x.shape, tile_m), x, 0)

    x_KR = owned(lhs_ref).T.astype(compute_dtype)
    acc_ref[...] += jnp.dot(x_KR, owned(rhs_ref).astype(compute_dtype),
                            preferred_element_type=jnp.float32)

  @pl.when((item == last_item) | (group_I[jnp.minimum(item + 1, last_item)] != group))
  def _store():
    out_ref[...] = acc_ref[...].astype(out_ref.dtype)


def tgmm(
    lhs_MK: jax.Array,
    rhs_MN: jax.Array,
    group_sizes_G: jax.Array,
    *,
    out_dtype=None,
    tile_m: int = TILE_M,
    tile_k: int = TILE_K,
    tile_n: int = TILE_N,
    interpret: bool | pltpu.InterpretParams = False,
) -> jax.Array:
  """out[g] = lhs[rows of g].T @ rhs[rows of g]: the weight gradient; empty groups give zeros.

  Args:
    lhs_MK, rhs_MN: rows sorted by group, in the same order.
    group_sizes_G: int rows per group (traced); their sum may be less than M but not more.
    out_dtype: defaults to lhs's; float32 or bfloat16, like the operands.
    tile_m, tile_k, tile_n: rows per step and the output block [tile_k, tile_n], as for
      `gmm`.
    interpret: passed to `pl.pallas_call`, as for `gmm`.

  Returns:
    out_GKN.
  """
  out_dtype = jnp.dtype(lhs_MK.dtype if out_dtype is None else out_dtype)
  tiles = check_tgmm(lhs_MK, rhs_MN, out_dtype, tile_m, tile_k, tile_n)
  _check_group_sizes("grouped_matmul_tpu.tgmm", group_sizes_G, None)
  (num_rows, k_dim), n_dim = lhs_MK.shape, rhs_MN.shape[1]
  num_groups = group_sizes_G.shape[0]
  schedule = make_schedule(group_sizes_G, num_rows, tiles.tile_m, tail=False, visit_empty=True)

  def lhs_index(k, n, item, group_I, tile_I, offsets_H1):
    del n, group_I, offsets_H1
    return tile_I[item], k

  def rhs_index(k, n, item, group_I, tile_I, offsets_H1):
    del k, group_I, offsets_H1
    return tile_I[item], n

  def out_index(k, n, item, group_I, tile_I, offsets_H1):
    del tile_I, offsets_H1
    return group_I[item], k, n

  kernel = functools.partial(_tgmm_kernel, tile_m=tiles.tile_m,
                             compute_dtype=jnp.result_type(lhs_MK, rhs_MN))
  grid = (k_dim // tiles.tile_k, n_dim // tiles.tile_n, schedule.num_items)
  return pl.pallas_call(
      kernel,
      out_shape=jax.ShapeDtypeStruct((num_groups, k_dim, n_dim), out_dtype),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=3,
          grid=grid,
          in_specs=[pl.BlockSpec((tiles.tile_m, tiles.tile_k), lhs_index),
                    pl.BlockSpec((tiles.tile_m, tiles.tile_n), rhs_index)],
          out_specs=pl.BlockSpec((None, tiles.tile_k, tiles.tile_n), out_index),
          scratch_shapes=[pltpu.VMEM((tiles.tile_k, tiles.tile_n), jnp.float32)]),
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "arbitrary")),
      interpret=interpret,
  )(schedule.group_I, schedule.tile_I, schedule.offsets_H1, lhs_MK, rhs_MN)
