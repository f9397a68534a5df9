"""Meshes, logical-axis rules, and the sharded train step against one device (tiny Ling 2.0)."""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from jax.sharding import PartitionSpec as P

from configs import ling2
from ling_jax import config as config_lib
from ling_jax import model as model_lib
from ling_jax import moe
from ling_jax import router
from ling_jax import sharding
from ling_jax import train as train_lib

B, L, STEPS = 8, 32, 5

# Each mesh compiles the whole five-step run (20-35 s on 2 cores). The three axes together,
# data=2 x fsdp=2 x expert=2, run in the chunked-loss test below, against the same reference with
# the same checks (its losses at the tighter 1e-5); whole logits on a mesh run on these three.
MESHES = {
    "8 data": dict(data=8),
    "2 data x 4 expert": dict(data=2, expert=4),
    "2 fsdp x 4 expert": dict(fsdp=2, expert=4),
}


def _config(**mesh):
  config = ling2.get_config("tiny")
  config.model.num_hidden_layers = 2  # One dense and one MoE layer, plus the MTP block.
  config.train.batch_size, config.train.seq_len = B, L
  config.train.warmup_steps = 1
  for axis in sharding.MESH_AXES:
    config.mesh[axis] = mesh.get(axis, 1)
  return config


def _batches(vocab: int) -> dict:
  """STEPS packed batches: two documents per row, the second cut at a random point."""
  rng = np.random.default_rng(0)
  tokens = rng.integers(3, vocab, (STEPS, B, L + 1)).astype(np.int32)
  cut = rng.integers(4, L - 4, (STEPS, B, 1))
  pos = np.arange(L)[None, None, :]
  segment_ids = np.where(pos < cut, 1, 2).astype(np.int32)
  segment_ids[:, -1, L // 2:] = 0  # Some padding.
  positions = np.where(pos < cut, pos, pos - cut).astype(np.int32)
  return {"inputs": tokens[..., :-1], "targets": tokens[..., 1:],
          "segment_ids": segment_ids, "positions": positions}


def _initial_state(config):
  state = jax.jit(functools.partial(train_lib.init_state, config.model, config.train,
                                    jax.random.key(0)))()
  # A non-zero expert bias, large enough to change which experts win.
  rng = np.random.default_rng(1)
  moe_state = jax.tree.map(lambda b: jnp.asarray(rng.normal(0, 0.05, b.shape), b.dtype),
                           state.moe_state)
  return state.replace(moe_state=moe_state)


def _run(state, batches, *, m, t):
  """Returns five train steps' losses and expert biases, and the first step's gradients."""

  def step(state, batch):
    loss, aux, grads = train_lib.accumulate_gradients(state, batch, m=m, t=t)
    state, _ = train_lib.apply_gradients(state, loss, aux, grads, t=t)
    return state, (loss, state.moe_state, grads)

  _, (losses, biases, grads) = jax.lax.scan(step, state, batches)
  return losses, biases, jax.tree.map(lambda g: g[0], grads)


@pytest.fixture(scope="module")
def reference():
  config = _config(data=1)
  state = _initial_state(config)
  batches = _batches(config.model.vocab_size)
  run = jax.jit(functools.partial(_run, m=config.model, t=config.train))
  return state, batches, jax.device_get(run(state, batches))


_COMPILED = {}  # mesh name -> compiled text, for the HLO test without compiling again


def _sharded_run(config, state, batches):
  mesh = sharding.make_mesh(config.mesh)
  state_shardings = sharding.tree_shardings(state, mesh)
  batch_sharding = jax.sharding.NamedSharding(mesh, P(None, tuple(sharding.BATCH_AXES)))
  run = jax.jit(functools.partial(_run, m=config.model, t=config.train),
                in_shardings=(state_shardings, batch_sharding))
  with jax.set_mesh(mesh):
    state = jax.device_put(state, state_shardings)
    batches = jax.device_put(batches, batch_sharding)
    compiled = run.lower(state, batches).compile()
    return compiled(state, batches), compiled.as_text()


@pytest.mark.parametrize("mesh_name", list(MESHES))
def test_mesh_matches_one_device(mesh_name, reference):
  state, batches, want = reference
  config = _config(**MESHES[mesh_name])
  (losses, biases, grads0), _COMPILED[mesh_name] = _sharded_run(config, state, batches)
  want_losses, want_biases, want_grads = want
  np.testing.assert_allclose(losses[0], want_losses[0], rtol=1e-5)
  flat_want = traverse_util.flatten_dict(want_grads)
  for path, g in traverse_util.flatten_dict(jax.device_get(grads0)).items():
    scale = np.max(np.abs(flat_want[path])) + 1e-12
    np.testing.assert_allclose(g / scale, flat_want[path] / scale, atol=2e-5,
                               err_msg="/".join(path))
  np.testing.assert_allclose(losses, want_losses, rtol=1e-4)
  _assert_biases_match(biases, want_biases)


def _assert_biases_match(biases, want_biases):
  """The same expert bias after every step, and identical on every device."""
  for got_bias, want_bias in zip(jax.tree.leaves(biases), jax.tree.leaves(want_biases)):
    np.testing.assert_allclose(got_bias, want_bias, atol=1e-6)
    shards = [np.asarray(s.data) for s in got_bias.addressable_shards]
    assert len(shards) == 8 and all(np.array_equal(s, shards[0]) for s in shards)


def test_chunked_loss_on_a_mesh_matches_whole_logits_on_one_device(reference):
  """train.loss_chunk_len on a 2 fsdp x 2 data x 2 expert mesh against the one-device run with
  whole logits: five steps' losses, the first step's gradients (the MTP head's included) and the
  expert biases (identical on every device); and no collective inside the chunks' loop (the
  head's gradient is summed over the batch shards once, not at every chunk). This is also the
  run of the three mesh axes together (MESHES above leaves it out so as not to compile it twice)."""
  state, batches, want = reference
  config = _config(data=2, fsdp=2, expert=2)
  config.train.loss_chunk_len = 8
  (losses, biases, grads0), hlo = _sharded_run(config, state, batches)
  for op in ("all-reduce", "all-gather", "reduce-scatter"):
    assert not [line for line in _collectives(hlo, op) if "lm_head)/while/body" in line], op
  want_losses, want_biases, want_grads = want
  np.testing.assert_allclose(losses, want_losses, rtol=1e-5)
  flat_want = traverse_util.flatten_dict(want_grads)
  for path, g in traverse_util.flatten_dict(jax.device_get(grads0)).items():
    scale = np.max(np.abs(flat_want[path])) + 1e-12
    np.testing.assert_allclose(g / scale, flat_want[path] / scale, atol=2e-5,
                               err_msg="/".join(path))
  _assert_biases_match(biases, want_biases)


def test_per_shard_counts_would_give_another_bias(reference):
  """The bias check above can fail: per-shard token counts move the bias differently."""
  state, batches, want = reference
  config = _config(data=1)
  m, t = config.model, config.train
  first = jax.tree.map(lambda x: x[0], batches)
  biases_after_one = jax.tree.map(lambda b: b[0], want[1])

  @jax.jit
  @jax.vmap
  def counts_of(batch):
    _, stats = model_lib.apply(m, {"params": state.params, moe.STATE: state.moe_state},
                               batch["inputs"], batch["positions"], batch["segment_ids"],
                               batch["targets"])
    flat = traverse_util.flatten_dict(stats)
    return {k[:-1]: v for k, v in flat.items() if k[-1] == "counts"}

  # What each of 4 batch shards sees on its own; counts add up to the global ones.
  per_shard = counts_of(jax.tree.map(lambda x: x.reshape(4, B // 4, *x.shape[1:]), first))
  global_counts = {k: v.sum(0) for k, v in per_shard.items()}
  shard_counts = {k: v[0] for k, v in per_shard.items()}
  flat_bias = {k[:-1]: v for k, v in traverse_util.flatten_dict(state.moe_state).items()}
  flat_want = {k[:-1]: v for k, v in traverse_util.flatten_dict(biases_after_one).items()}
  differs = False
  for key, bias in flat_bias.items():
    from_global = router.update_expert_bias(bias, global_counts[key], t.expert_bias_update_rate)
    from_shard = router.update_expert_bias(bias, shard_counts[key], t.expert_bias_update_rate)
    np.testing.assert_allclose(from_global, flat_want[key], atol=1e-6)
    differs |= not np.allclose(from_shard, flat_want[key], atol=1e-6)
  assert differs


def _collectives(hlo: str, op: str) -> list[str]:
  return [line for line in hlo.splitlines() if re.search(rf"\b{op}(-start)?\(", line)]


def test_expert_parallel_step_exchanges_tokens_with_all_to_all(reference):
  state, batches, _ = reference
  config = _config(data=2, expert=4)
  hlo = _COMPILED.get("2 data x 4 expert")
  if hlo is None:  # Run on its own (pytest -k): compile it here.
    _, hlo = _sharded_run(config, state, batches)
  assert _collectives(hlo, "all-to-all")
  # No all-gather carries activations: tokens stay split, only the exchange moves them.
  d = config.model.hidden_size
  token_shapes = [f"[{B * L},{d}]", f"[{B},{L},{d}]", f"[{B * L * 4},{d}]"]
  for line in _collectives(hlo, "all-gather"):
    assert not any(s in line for s in token_shapes), line


@pytest.mark.parametrize("field,value,match", [
    ("data", 3, "mesh.*needs 3 devices but there are 8"),
    ("expert", 3, r"mesh.data.*other axes use 3 devices"),
])
def test_bad_mesh_names_the_field(field, value, match):
  config = _config()
  config.mesh.data = -1 if field != "data" else value
  if field != "data":
    config.mesh[field] = value
  with pytest.raises(config_lib.ConfigError, match=match):
    sharding.validate_mesh_config(config, 8)


def test_experts_must_split_over_expert_axis():
  config = _config(data=1, expert=8)
  config.model.num_experts, config.model.n_group, config.model.topk_group = 12, 2, 2
  with pytest.raises(config_lib.ConfigError, match="mesh.expert"):
    sharding.validate_mesh_config(config, 8)


def test_batch_must_split_over_batch_shards():
  config = _config(data=8)
  config.train.batch_size = 12
  with pytest.raises(config_lib.ConfigError, match="train.batch_size"):
    sharding.validate_mesh_config(config, 8)


def test_logical_rules_lay_out_the_tiny_model():
  config = _config(data=1, fsdp=2, expert=2, tensor=2)
  mesh = sharding.make_mesh(config.mesh)
  shapes = jax.eval_shape(functools.partial(train_lib.init_state, config.model, config.train,
                                            jax.random.key(0)))
  specs = {"/".join(k): v.spec for k, v in traverse_util.flatten_dict(
      sharding.tree_shardings(shapes.params, mesh)).items()}
  assert specs["embed/embedding"] == P("tensor", "fsdp")
  assert specs["moe_layers/mlp/wi_gate_up"] == P(None, "expert", "fsdp", None)
  assert specs["moe_layers/mlp/wo"] == P(None, "expert", None, "fsdp")
  assert specs["dense_layers/attention/qkv/kernel"] == P(None, "fsdp", "tensor")
  assert specs["mtp_0/block/mlp/router"] == P("fsdp", None)
  assert specs["final_norm/scale"] == P(None)
  # The optimiser moments follow their params.
  opt_specs = [s.spec for s in jax.tree.leaves(sharding.tree_shardings(shapes.opt_state, mesh))]
  assert P("tensor", "fsdp") in opt_specs
  with pytest.raises(KeyError, match="PARAM_AXES"):
    sharding.param_logical_axes("mystery/kernel", 2)
