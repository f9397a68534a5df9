"""Token permutation on Hopper GPUs through Pallas Mosaic GPU: row gathers with bulk copies.

Hopper's TMA has no row gather (that is Blackwell's gather4), but a whole contiguous row is one
bulk copy (`cp.async.bulk`, no tensor map, no 256-element box limit). Both kernels are
persistent over the SMs; each SM walks blocks of rows with a ring of `stages` SMEM buffers, so
that the row loads of later blocks are in flight while earlier blocks are combined and stored.

  - `gather_rows`: out[m] = x[rows[m]]: the permute (token copies into expert order). Each block
    of R output rows is R one-row loads into SMEM, then one bulk store of the whole block.
  - `combine_rows`: out[t] = sum_k w[t, k] * y[rows[t * K + k]], summed in fp32: the un-permute
    with the router-weight multiply fused in (and, with unit weights, the permute's backward).
    Each block of R tokens is R * K one-row loads, a weighted sum in registers, one bulk store.

kernels/dispatch.py ties them into its custom VJPs; it keeps XLA gathers as the reference and
for shapes these kernels do not cover.

Shape key:
  T: tokens
  K: copies per token (top_k)
  M: rows of the permuted array (T * K)
  N: rows of the gathered source
  D: model dim
  R: rows (gather) or tokens (combine) per block
  S: ring stages
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from kernels.grouped_matmul_mgpu import device_num_sms

# Shared memory one CTA may use on Hopper is 227 KiB; keep 4 KiB for barriers and the like.
_SMEM_BUDGET = 232448 - 4096


@dataclasses.dataclass(frozen=True)
class PermuteConfig:
  """Static blocking of one launch."""

  block: int = 16  # R: output rows (gather) or tokens (combine) per block
  stages: int = 3  # S: buffers in the ring


def supports(num_blocks_rows: int, d_model: int, dtype, cfg: PermuteConfig, rows_per_block: int,
             out_rows: int, index_bytes: int) -> bool:
  """Whether the kernels cover this shape: whole blocks, rows of whole 128-byte lines with at
  least one element per thread, and in shared memory the ring, an output block of `out_rows` and
  the SM's indices."""
  itemsize = jnp.dtype(dtype).itemsize
  smem = (cfg.stages * rows_per_block + out_rows) * d_model * itemsize + index_bytes
  return (jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16),
                               jnp.dtype(jnp.float32))
          and num_blocks_rows > 0 and num_blocks_rows % cfg.block == 0 and cfg.stages >= 2
          and (d_model * itemsize) % 128 == 0 and d_model % 128 == 0 and smem <= _SMEM_BUDGET)


def _ring_loop(my_blocks, stages: int, issue, consume):
  """Runs this SM's blocks 0 .. my_blocks - 1 through a ring of `stages` buffers.

  issue(j, slot) starts the loads of local block j into a slot; consume(j, slot) waits for them
  and stores the block. A slot is refilled only after the store that last read it has read SMEM.
  """
  for j in range(stages - 1):
    @pl.when(j < my_blocks)
    def _(j=j):  # traced right here; the default only satisfies linters
      issue(j, j)

  @pl.loop(0, my_blocks)
  def _(j):
    consume(j, j % stages)
    nxt = j + stages - 1
    # The slot of block j + S - 1 last held block j - 1, whose store was committed before this
    # one's: allow one group in flight.
    plgpu.wait_smem_to_gmem(1, wait_read_only=True)

    @pl.when(nxt < my_blocks)
    def _():
      issue(nxt, nxt % stages)

  plgpu.wait_smem_to_gmem(0)


def _load_chunk(src_gmem, dst_smem, barrier):
  """Copies this SM's contiguous slice of a per-SM-padded 1-D array into SMEM and waits."""
  sm, size = jax.lax.axis_index("sm"), dst_smem.shape[0]
  plgpu.copy_gmem_to_smem(src_gmem.at[pl.ds(sm * size, size)], dst_smem, barrier,
                          oob_mode=plgpu.OOBFillMode.PROMISE_IN_BOUNDS)
  plgpu.barrier_wait(barrier)


def _my_blocks(num_blocks: int, blocks_per_sm: int):
  """Blocks of this SM: [sm * blocks_per_sm, ...), fewer for the last SMs."""
  first = jax.lax.axis_index("sm") * blocks_per_sm
  return first, jnp.clip(num_blocks - first, 0, blocks_per_sm)


def _gather_body(cfg: PermuteConfig, blocks_per_sm: int, rows_gmem, x_gmem, out_gmem, buf_smem,
                 idx_smem, barriers, idx_barrier):
  r = cfg.block
  first, my_blocks = _my_blocks(out_gmem.shape[0] // r, blocks_per_sm)
  # Row indices come from SMEM: a global load per row would serialise ~1 us of latency each.
  _load_chunk(rows_gmem, idx_smem, idx_barrier)

  def issue(j, slot):
    for i in range(r):
      row = idx_smem[j * r + i]
      plgpu.copy_gmem_to_smem(x_gmem.at[pl.ds(row, 1)], buf_smem.at[slot, pl.ds(i, 1)],
                              barriers.at[slot], oob_mode=plgpu.OOBFillMode.PROMISE_IN_BOUNDS)

  def consume(j, slot):
    plgpu.barrier_wait(barriers.at[slot])
    plgpu.copy_smem_to_gmem(buf_smem.at[slot], out_gmem.at[pl.ds((first + j) * r, r)])

  _ring_loop(my_blocks, cfg.stages, issue, consume)


def _per_sm_layout(num_blocks: int, rows_per_block: int, num_sms: int) -> tuple[int, int]:
  """Blocks per SM and the padded length of each SM's index chunk (whole 128-byte lines)."""
  blocks_per_sm = pl.cdiv(num_blocks, num_sms)
  return blocks_per_sm, pl.cdiv(blocks_per_sm * rows_per_block, 32) * 32


def _pad_per_sm(v_M: jax.Array, per_sm: int, blocks_per_sm: int, rows_per_block: int,
                num_sms: int) -> jax.Array:
  """Lays a 1-D array out as num_sms chunks of `per_sm` (zero padded), one per SM."""
  used = blocks_per_sm * rows_per_block
  v_M = jnp.pad(v_M, (0, num_sms * used - v_M.shape[0])).reshape(num_sms, used)
  return jnp.pad(v_M, ((0, 0), (0, per_sm - used))).reshape(-1)


def _gather_fits(num_rows, d_model, dtype, cfg: PermuteConfig, num_sms: int) -> bool:
  _, per_sm = _per_sm_layout(num_rows // cfg.block, cfg.block, num_sms)
  return supports(num_rows, d_model, dtype, cfg, cfg.block, 0, 4 * per_sm)


def _combine_fits(num_tokens, top_k, d_model, dtype, cfg: PermuteConfig, num_sms: int) -> bool:
  _, per_sm = _per_sm_layout(num_tokens // cfg.block, cfg.block * top_k, num_sms)
  return supports(num_tokens, d_model, dtype, cfg, cfg.block * top_k, cfg.block, 8 * per_sm)


# Tried in order: the first that fits is used. Bigger blocks mean fewer waits and stores; three
# stages keep two blocks of loads in flight while one is stored.
_GATHER_CANDIDATES = [PermuteConfig(b, s) for b in (16, 8, 4, 2, 1) for s in (3, 2)]
_COMBINE_CANDIDATES = [PermuteConfig(b, s) for b in (2, 1) for s in (3, 2)]


def gather_config(num_rows: int, d_model: int, dtype, num_sms: int | None = None):
  """Returns the blocking `gather_rows` uses for this shape, or None if no kernel covers it."""
  num_sms = num_sms or device_num_sms()
  return next((c for c in _GATHER_CANDIDATES
               if _gather_fits(num_rows, d_model, dtype, c, num_sms)), None)


def combine_config(num_tokens: int, top_k: int, d_model: int, dtype, num_sms: int | None = None):
  """Returns the blocking `combine_rows` uses for this shape, or None if no kernel covers it."""
  num_sms = num_sms or device_num_sms()
  return next((c for c in _COMBINE_CANDIDATES
               if _combine_fits(num_tokens, top_k, d_model, dtype, c, num_sms)), None)


def gather_rows(x_ND: jax.Array, rows_M: jax.Array, *, config: PermuteConfig | None = None,
                interpret=None, num_sms: int | None = None) -> jax.Array:
  """out[m] = x[rows[m]]; rows must lie in [0, N)."""
  num_rows, d_model = rows_M.shape[0], x_ND.shape[1]
  num_sms = num_sms or device_num_sms()
  cfg = config or gather_config(num_rows, d_model, x_ND.dtype, num_sms)
  if cfg is None or not _gather_fits(num_rows, d_model, x_ND.dtype, cfg, num_sms):
    raise ValueError(f"gather_rows: no Mosaic GPU kernel for {num_rows} rows of "
                     f"{x_ND.dtype}[{d_model}] with {cfg}.")
  blocks_per_sm, per_sm = _per_sm_layout(num_rows // cfg.block, cfg.block, num_sms)
  kernel = plgpu.kernel(
      functools.partial(_gather_body, cfg, blocks_per_sm),
      out_type=jax.ShapeDtypeStruct((num_rows, d_model), x_ND.dtype),
      grid=(num_sms,),
      grid_names=("sm",),
      scratch_types=(
          plgpu.SMEM((cfg.stages, cfg.block, d_model), x_ND.dtype),
          plgpu.SMEM((per_sm,), jnp.int32),
          plgpu.Barrier(num_arrivals=cfg.block, num_barriers=cfg.stages),
          plgpu.Barrier(num_arrivals=1),
      ),
      interpret=interpret,
  )
  rows = _pad_per_sm(rows_M.astype(jnp.int32), per_sm, blocks_per_sm, cfg.block, num_sms)
  return kernel(rows, x_ND)


def _combine_body(cfg: PermuteConfig, top_k: int, blocks_per_sm: int, rows_gmem, weights_gmem,
                  y_gmem, out_gmem, buf_smem, out_smem, idx_smem, w_smem, barriers, idx_barrier):
  r = cfg.block
  first, my_blocks = _my_blocks(out_gmem.shape[0] // r, blocks_per_sm)
  _load_chunk(rows_gmem, idx_smem, idx_barrier.at[0])
  _load_chunk(weights_gmem, w_smem, idx_barrier.at[1])

  def issue(j, slot):
    for i in range(r * top_k):
      row = idx_smem[j * r * top_k + i]
      plgpu.copy_gmem_to_smem(y_gmem.at[pl.ds(row, 1)], buf_smem.at[slot, pl.ds(i, 1)],
                              barriers.at[slot], oob_mode=plgpu.OOBFillMode.PROMISE_IN_BOUNDS)

  def consume(j, slot):
    plgpu.barrier_wait(barriers.at[slot])
    # The previous block's store must have read out_smem before it is overwritten.
    plgpu.wait_smem_to_gmem(0, wait_read_only=True)
    for t in range(r):
      acc_D = None
      for k in range(top_k):
        i = t * top_k + k
        term_D = buf_smem[slot, i].astype(jnp.float32) * w_smem[j * r * top_k + i]
        acc_D = term_D if acc_D is None else acc_D + term_D
      out_smem[t] = acc_D.astype(out_smem.dtype)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(out_smem, out_gmem.at[pl.ds((first + j) * r, r)])

  _ring_loop(my_blocks, cfg.stages, issue, consume)


def combine_rows(y_ND: jax.Array, rows_M: jax.Array, weights_TK: jax.Array, *,
                 config: PermuteConfig | None = None, interpret=None,
                 num_sms: int | None = None) -> jax.Array:
  """out[t] = sum_k weights[t, k] * y[rows[t * K + k]], in fp32, returned in y's dtype."""
  num_tokens, top_k = weights_TK.shape
  d_model = y_ND.shape[1]
  num_sms = num_sms or device_num_sms()
  cfg = config or combine_config(num_tokens, top_k, d_model, y_ND.dtype, num_sms)
  if (cfg is None or rows_M.shape != (num_tokens * top_k,)
      or not _combine_fits(num_tokens, top_k, d_model, y_ND.dtype, cfg, num_sms)):
    raise ValueError(f"combine_rows: no Mosaic GPU kernel for {num_tokens} tokens x top-{top_k} "
                     f"of {y_ND.dtype}[{d_model}] with {cfg}.")
  rows_per_block = cfg.block * top_k
  blocks_per_sm, per_sm = _per_sm_layout(num_tokens // cfg.block, rows_per_block, num_sms)
  kernel = plgpu.kernel(
      functools.partial(_combine_body, cfg, top_k, blocks_per_sm),
      out_type=jax.ShapeDtypeStruct((num_tokens, d_model), y_ND.dtype),
      grid=(num_sms,),
      grid_names=("sm",),
      scratch_types=(
          plgpu.SMEM((cfg.stages, rows_per_block, d_model), y_ND.dtype),
          plgpu.SMEM((cfg.block, d_model), y_ND.dtype),
          plgpu.SMEM((per_sm,), jnp.int32),
          plgpu.SMEM((per_sm,), jnp.float32),
          plgpu.Barrier(num_arrivals=rows_per_block, num_barriers=cfg.stages),
          plgpu.Barrier(num_arrivals=1, num_barriers=2),
      ),
      interpret=interpret,
  )
  pad = functools.partial(_pad_per_sm, per_sm=per_sm, blocks_per_sm=blocks_per_sm,
                          rows_per_block=rows_per_block, num_sms=num_sms)
  rows = pad(rows_M.astype(jnp.int32))
  weights = pad(weights_TK.reshape(-1).astype(jnp.float32))
  return kernel(rows, weights, y_ND)
