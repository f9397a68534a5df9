"""Expert parallelism under shard_map against the single-device dispatch, values and gradients."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels import dispatch
from ling_jax import expert_parallel
from ling_jax import sharding

T, K, D, F, E = 64, 4, 16, 8, 16

MESHES = {
    "8 data": dict(data=8),
    "2 data x 4 expert": dict(data=2, expert=4),
    "2 fsdp x 4 expert": dict(fsdp=2, expert=4),
    "2 data x 2 fsdp x 2 expert": dict(data=2, fsdp=2, expert=2),
    "8 expert": dict(expert=8),
}


def _mesh(**sizes):
  cfg = sharding.default_mesh_config()
  cfg.data = sizes.get("data", 1)
  for axis in ("fsdp", "expert", "tensor"):
    cfg[axis] = sizes.get(axis, 1)
  return sharding.make_mesh(cfg)


def _inputs(skewed: bool):
  rng = np.random.default_rng(0)
  x = rng.standard_normal((T, D)).astype(np.float32)
  if skewed:  # Most copies go to the experts of the first shard; some shards get nothing.
    ids = rng.choice(E, size=(T, K), p=np.r_[np.full(4, 0.22), np.full(E - 4, 0.12 / (E - 4))])
  else:
    ids = np.stack([rng.permutation(E)[:K] for _ in range(T)])
  w = rng.uniform(0.1, 1.0, (T, K)).astype(np.float32)
  w1 = (rng.standard_normal((E, D, 2 * F)) / np.sqrt(D)).astype(np.float32)
  w2 = (rng.standard_normal((E, F, D)) / np.sqrt(F)).astype(np.float32)
  return x, ids.astype(np.int32), w, w1, w2


def _loss(fn, x, ids, w, w1, w2):
  y = fn(x, ids, w, w1, w2)
  return jnp.sum(y * jnp.cos(jnp.arange(y.size, dtype=y.dtype).reshape(y.shape)))


def _emulated_ragged_all_to_all(operand, output, input_offsets, send_sizes, output_offsets,
                                recv_sizes, *, axis_name):
  """jax.lax.ragged_all_to_all's documented semantics from dense all-to-alls (XLA:CPU has none).

  Rows [input_offsets[j], + send_sizes[j]) of my operand land in shard j's output at its row
  output_offsets[j] (offsets are the sender's view of the receiver's buffer).
  """
  num_shards, rows = send_sizes.shape[0], operand.shape[0]
  r = jnp.arange(rows)
  blocks = jnp.stack([jnp.where((r < send_sizes[j])[:, None],
                                jnp.roll(operand, -input_offsets[j], axis=0), 0)
                      for j in range(num_shards)])
  blocks = jax.lax.all_to_all(blocks, axis_name, 0, 0, tiled=True)
  offsets = jax.lax.all_to_all(output_offsets, axis_name, 0, 0, tiled=True)
  sizes = jax.lax.all_to_all(send_sizes, axis_name, 0, 0, tiled=True)
  np.testing.assert_equal(sizes.shape, recv_sizes.shape)
  out_rows = jnp.arange(output.shape[0])
  for j in range(num_shards):
    src = out_rows - offsets[j]
    take = (src >= 0) & (src < sizes[j])
    output = jnp.where(take[:, None], blocks[j][jnp.clip(src, 0, rows - 1)], output)
  return output


@functools.cache
def _single_device(skewed: bool):
  """The reference: output and gradients on one device (computed once per input set)."""
  x, ids, w, w1, w2 = _inputs(skewed)
  single = lambda *a: dispatch.expert_ffn(*a, backend="reference")
  return (single(x, ids, w, w1, w2),
          jax.grad(_loss, argnums=(1, 3, 4, 5))(single, x, ids, w, w1, w2))


@pytest.mark.parametrize("mesh_name,skewed,exchange", [
    ("8 data", False, "padded"),
    ("2 data x 4 expert", True, "padded"),
    ("2 fsdp x 4 expert", False, "padded"),
    ("2 data x 2 fsdp x 2 expert", False, "padded"),
    ("8 expert", True, "padded"),
    ("2 data x 4 expert", True, "ragged"),
    ("8 expert", False, "ragged"),
])
def test_matches_single_device(mesh_name, skewed, exchange, monkeypatch):
  x, ids, w, w1, w2 = _inputs(skewed)
  want_y, want_grads = _single_device(skewed)

  if exchange == "ragged":  # The offsets bookkeeping, checked against the op's semantics.
    monkeypatch.setattr(jax.lax, "ragged_all_to_all", _emulated_ragged_all_to_all)
  mesh = _mesh(**MESHES[mesh_name])
  parallel = lambda *a: expert_parallel.expert_ffn(*a, backend="reference", all_to_all=exchange)
  with jax.set_mesh(mesh):
    got_y = jax.jit(parallel)(x, ids, w, w1, w2)
    got_grads = jax.jit(jax.grad(_loss, argnums=(1, 3, 4, 5)), static_argnums=0)(
        parallel, x, ids, w, w1, w2)
  np.testing.assert_allclose(got_y, want_y, rtol=1e-5, atol=1e-5)
  for name, got, want in zip(("x", "weights", "w_gate_up", "w_down"), got_grads, want_grads):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5, err_msg=name)


def test_exchange_is_all_to_all_not_all_gather():
  x, ids, w, w1, w2 = _inputs(False)
  mesh = _mesh(data=2, expert=4)
  parallel = lambda *a: expert_parallel.expert_ffn(*a, backend="reference", all_to_all="padded")
  with jax.set_mesh(mesh):
    # Inputs laid out as the train step lays them out: tokens split, experts split.
    tokens = sharding.batch_sharding(mesh)
    experts = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("expert"))
    args = [jax.device_put(a, s) for a, s in zip(
        (x, ids, w, w1, w2), (tokens, tokens, tokens, experts, experts))]
    hlo = jax.jit(parallel).lower(*args).compile().as_text()
  assert "all-to-all" in hlo
  assert "all-gather" not in hlo
