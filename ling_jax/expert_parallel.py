"""Expert parallelism: the routed experts of one MoE layer under `shard_map`.

Key: T tokens of this shard, K experts per token, M token copies (T * K), D model dim,
E experts (global), X experts per shard (E / N), N shards of the `expert` mesh axis,
C rows of one padded all-to-all block.

Every device holds the tokens of its batch shard and the experts of its `expert` shard. Per layer:
  1. copy and sort this shard's tokens by expert (`kernels.dispatch.permute`): the copies bound for
     expert shard j are then one contiguous block;
  2. exchange the group sizes (an all-to-all of N x X counts);
  3. move each block to the shard holding its experts: a ragged all-to-all where XLA has one (GPU,
     TPU), else an all-to-all of blocks padded to the worst case C = M;
  4. run the local experts on what arrived (a grouped matmul per projection);
  5. send the results back the same way, and un-permute them with the router weights.

Routing happens outside, on the global batch, so the token counts that drive the expert-bias
update are summed over every shard by construction.
"""

import functools

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from kernels import dispatch
from ling_jax import sharding

AXIS = "expert"


def all_to_all_impl(requested: str) -> str:
  """Returns "ragged" or "padded" for `config.mesh.all_to_all` on the current backend."""
  if requested != "auto":
    return requested
  return "padded" if jax.default_backend() == "cpu" else "ragged"


def expert_ffn(
    x_TD: jax.Array,
    expert_ids_TK: jax.Array,
    weights_TK: jax.Array,
    w_gate_up_EDF2: jax.Array,
    w_down_EFD: jax.Array,
    *,
    backend: str = "auto",
    all_to_all: str = "auto",
    quant: str = "none",
    fp8_probes: tuple[jax.Array, jax.Array] | None = None,
    fp8_recipe=None,
    fp8_group_align: int = dispatch.FP8_GROUP_ALIGN,
    fp8_fused_dispatch: bool = True,
    fp8_backend: str = "auto",
) -> jax.Array:
  """`kernels.dispatch.expert_ffn` over the mesh being traced under (see the module docstring).

  The inputs are global arrays; tokens are split over data x fsdp x expert and the experts over
  `expert`. Without a mesh, or on one device, this is `dispatch.expert_ffn` itself. `quant`,
  `fp8_probes`, `fp8_recipe`, `fp8_group_align`, `fp8_fused_dispatch` and `fp8_backend` go to
  it unchanged (see there).
  """
  with jax.named_scope("experts"):  # Named for profiles (ling_jax/profiling.py).
    return _expert_ffn(x_TD, expert_ids_TK, weights_TK, w_gate_up_EDF2, w_down_EFD,
                       backend=backend, all_to_all=all_to_all, quant=quant,
                       fp8_probes=fp8_probes, fp8_recipe=fp8_recipe,
                       fp8_group_align=fp8_group_align, fp8_fused_dispatch=fp8_fused_dispatch,
                       fp8_backend=fp8_backend)


def _expert_ffn(x_TD, expert_ids_TK, weights_TK, w_gate_up_EDF2, w_down_EFD, *, backend,
                all_to_all, quant, fp8_probes, fp8_recipe, fp8_group_align, fp8_fused_dispatch,
                fp8_backend):
  mesh = jax.sharding.get_abstract_mesh()
  if fp8_probes is None:
    fp8_probes = (jnp.zeros((2,), jnp.float32),) * 2
  if mesh.empty or mesh.size == 1:
    return dispatch.expert_ffn(x_TD, expert_ids_TK, weights_TK, w_gate_up_EDF2, w_down_EFD,
                               backend=backend, quant=quant, fp8_probes=fp8_probes,
                               fp8_recipe=fp8_recipe, fp8_group_align=fp8_group_align,
                               fp8_fused_dispatch=fp8_fused_dispatch, fp8_backend=fp8_backend)
  shape = dict(mesh.shape)
  num_shards = shape.get(AXIS, 1)
  num_experts = w_gate_up_EDF2.shape[0]
  if num_experts % num_shards:
    raise ValueError(f"expert_ffn: {num_experts} experts do not split over the {num_shards} "
                     "devices of the 'expert' mesh axis; fix config.mesh.expert.")
  batch_axes = sharding.split_batch_axes(shape)
  token_spec = P(batch_axes or None)
  local = functools.partial(_local_expert_ffn, num_shards=num_shards, backend=backend,
                            impl=all_to_all_impl(all_to_all), quant=quant,
                            fp8_recipe=fp8_recipe, fp8_group_align=fp8_group_align,
                            fp8_fused_dispatch=fp8_fused_dispatch, fp8_backend=fp8_backend,
                            num_devices=mesh.size)
  return jax.shard_map(
      local, mesh=mesh,
      in_specs=(token_spec, token_spec, token_spec, P(AXIS), P(AXIS), P()),
      # No varying-axes checks: the kernels' loops carry plain zeros. The transpose still sums
      # the experts' gradients over the axes they are replicated on.
      out_specs=token_spec, check_vma=False,
  )(x_TD, expert_ids_TK, weights_TK, w_gate_up_EDF2, w_down_EFD, fp8_probes)


def _local_expert_ffn(x_TD, expert_ids_TK, weights_TK, w_gate_up_XDF2, w_down_XFD, fp8_probes,
                      *, num_shards, backend, impl, quant, fp8_recipe, fp8_group_align,
                      fp8_fused_dispatch, fp8_backend, num_devices):
  """The per-device body: dispatch, exchange, local experts, exchange back, combine."""
  # The transpose sums a replicated input's cotangent over devices; the probes' cotangents are
  # per-device metrics, so scale them to come out as the mean.
  fp8_probes = tuple(p / num_devices for p in fp8_probes)
  if num_shards == 1:
    return dispatch.expert_ffn(x_TD, expert_ids_TK, weights_TK, w_gate_up_XDF2, w_down_XFD,
                               backend=backend, quant=quant, fp8_probes=fp8_probes,
                               fp8_recipe=fp8_recipe, fp8_group_align=fp8_group_align,
                               fp8_fused_dispatch=fp8_fused_dispatch, fp8_backend=fp8_backend)
  local_experts = w_gate_up_XDF2.shape[0]
  x_MD, group_sizes_E, sort_idx_M = dispatch.permute(
      x_TD, expert_ids_TK, local_experts * num_shards)
  send_counts_NX = group_sizes_E.reshape(num_shards, local_experts)
  # recv_counts[j, x]: rows that shard j sends for my local expert x.
  exchange = _padded_exchange if impl == "padded" else _ragged_exchange
  with jax.named_scope("all_to_all"):
    recv_counts_NX = jax.lax.all_to_all(send_counts_NX, AXIS, 0, 0, tiled=True)
    recv_RD, back = exchange(x_MD, send_counts_NX, recv_counts_NX)
  local_ids_R = _local_expert_ids(recv_counts_NX, recv_RD.shape[0] // num_shards)
  ones_R1 = jnp.ones((recv_RD.shape[0], 1), jnp.float32)
  # Rows that carry nothing get the id X: they sort past every group and come out zero.
  y_RD = dispatch.expert_ffn(recv_RD, local_ids_R[:, None], ones_R1, w_gate_up_XDF2,
                             w_down_XFD, backend=backend, quant=quant, fp8_probes=fp8_probes,
                             fp8_recipe=fp8_recipe, fp8_group_align=fp8_group_align,
                             fp8_fused_dispatch=fp8_fused_dispatch, fp8_backend=fp8_backend)
  with jax.named_scope("all_to_all"):
    y_MD = back(y_RD)
  return dispatch.unpermute(y_MD, sort_idx_M, weights_TK)


def _local_expert_ids(recv_counts_NX: jax.Array, rows_per_block: int) -> jax.Array:
  """Returns the local expert of each received row; X for rows past a block's content."""
  ends_NX = jnp.cumsum(recv_counts_NX, axis=1)
  rows_C = jnp.arange(rows_per_block, dtype=ends_NX.dtype)
  ids_NC = jax.vmap(lambda ends: jnp.searchsorted(ends, rows_C, side="right"))(ends_NX)
  return ids_NC.reshape(-1).astype(jnp.int32)


def _block_offsets(counts_N: jax.Array) -> jax.Array:
  return jnp.cumsum(counts_N) - counts_N


def _padded_exchange(x_MD, send_counts_NX, recv_counts_NX):
  """Sends block j of the sorted rows to shard j, padded to M rows; returns (recv, back)."""
  del recv_counts_NX
  num_shards, rows = send_counts_NX.shape[0], x_MD.shape[0]
  send_totals_N = jnp.sum(send_counts_NX, axis=1)
  send_offsets_N = _block_offsets(send_totals_N)
  rows_C = jnp.arange(rows, dtype=jnp.int32)
  src_NC = send_offsets_N[:, None] + rows_C[None, :]
  valid_NC = rows_C[None, :] < send_totals_N[:, None]
  send_NCD = jnp.where(valid_NC[..., None], x_MD[jnp.minimum(src_NC, rows - 1)], 0)
  recv_NCD = jax.lax.all_to_all(send_NCD, AXIS, 0, 0, tiled=True)

  def back(y_RD):
    y_NCD = jax.lax.all_to_all(y_RD.reshape(num_shards, rows, -1), AXIS, 0, 0, tiled=True)
    # Sorted row m went to shard dest[m] at row m - offset[dest[m]] of its block.
    dest_M = jnp.searchsorted(jnp.cumsum(send_totals_N), rows_C, side="right")
    dest_M = jnp.minimum(dest_M, num_shards - 1)
    return y_NCD[dest_M, rows_C - send_offsets_N[dest_M]]

  return recv_NCD.reshape(num_shards * rows, -1), back


def _ragged_exchange(x_MD, send_counts_NX, recv_counts_NX):
  """Sends block j of the sorted rows to shard j with ragged all-to-alls; returns (recv, back).

  The receive buffer keeps the padded layout (N blocks of M rows, block j from shard j), so the
  local experts see the same rows as with the padded exchange; only the traffic is ragged.
  """
  num_shards, rows = send_counts_NX.shape[0], x_MD.shape[0]
  send_totals_N = jnp.sum(send_counts_NX, axis=1)
  recv_totals_N = jnp.sum(recv_counts_NX, axis=1)
  send_offsets_N = _block_offsets(send_totals_N)
  me = jax.lax.axis_index(AXIS)
  # My block lands at row me * M of every receiver's buffer.
  remote_offsets_N = jnp.full((num_shards,), me * rows, jnp.int32)
  recv_offsets_N = jnp.arange(num_shards, dtype=jnp.int32) * rows
  out_RD = jnp.zeros((num_shards * rows, x_MD.shape[1]), x_MD.dtype)
  recv_RD = jax.lax.ragged_all_to_all(
      x_MD, out_RD, send_offsets_N.astype(jnp.int32), send_totals_N.astype(jnp.int32),
      remote_offsets_N, recv_totals_N.astype(jnp.int32), axis_name=AXIS)

  def back(y_RD):
    # The reverse trip: block j of y (from shard j) returns to where it came from.
    out_MD = jnp.zeros((rows, y_RD.shape[1]), y_RD.dtype)
    return jax.lax.ragged_all_to_all(
        y_RD, out_MD, recv_offsets_N, recv_totals_N.astype(jnp.int32),
        _remote_send_offsets(send_offsets_N), send_totals_N.astype(jnp.int32), axis_name=AXIS)

  return recv_RD, back


def _remote_send_offsets(send_offsets_N: jax.Array) -> jax.Array:
  """Returns, for each shard j, where j's block for me started in j's sorted rows."""
  return jax.lax.all_to_all(send_offsets_N.astype(jnp.int32), AXIS, 0, 0, tiled=True)
