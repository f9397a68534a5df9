"""Tests for ling_jax/checkpoint.py: round trips, retention, corruption fallback, preemption."""

import logging as py_logging
import os
import pathlib
import shutil
import signal
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ling_jax import checkpoint

SIGNATURE = {"d_model": 32, "params": {"w": [64, 32], "b": [32]}}
DATA_STATE = {"file_index": 3, "offsets": [0, 17, 2**40], "seed": 7, "name": "train", "f": 0.25}


@flax.struct.dataclass
class State:
  """A small stand-in for train.TrainState, with the same kinds of leaves."""

  step: jax.Array  # int32 scalar.
  params: Any  # fp32 and bf16 leaves.
  opt_state: Any  # optax AdamW state over `params`.
  moe_state: Any  # fp32 expert bias.
  nan_skips: jax.Array  # int32 scalar.


@jax.jit  # One compile for every step, instead of dozens of eager optax ops per call.
def _state(step: int) -> State:
  key_w, key_b, key_e = jax.random.split(jax.random.key(step), 3)
  params = {
      # Big enough (8 KiB of incompressible fp32) that the largest files hold array data.
      "w": jax.random.normal(key_w, (64, 32), jnp.float32),
      "b": jax.random.normal(key_b, (32,), jnp.bfloat16),
  }
  tx = optax.adamw(1e-3, b1=0.9, b2=0.95, weight_decay=0.1)
  opt_state = tx.init(params)
  grads = jax.tree.map(jnp.ones_like, params)
  _, opt_state = tx.update(grads, opt_state, params)  # Non-zero moments and count.
  return State(
      step=jnp.int32(step),
      params=params,
      opt_state=opt_state,
      moe_state={"expert_bias_E": jax.random.normal(key_e, (16,), jnp.float32)},
      nan_skips=jnp.int32(step % 3),
  )


ABSTRACT = jax.eval_shape(_state, 0)


def _assert_bitwise_equal(got, want):
  assert jax.tree.structure(got) == jax.tree.structure(want)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    g, w = np.asarray(g), np.asarray(w)
    assert g.dtype == w.dtype and g.shape == w.shape
    assert g.tobytes() == w.tobytes()


def _make(workdir, *, keep=10, save_every=1, signature=SIGNATURE, async_save=False):
  return checkpoint.Checkpointer(
      workdir, save_every=save_every, keep=keep, model_signature=signature, async_save=async_save
  )


def _save_steps(workdir, steps, **kwargs):
  with _make(workdir, **kwargs) as ckpt:
    for step in steps:
      assert ckpt.save(step, _state(step), data_state={**DATA_STATE, "step": step})


def _snapshot(root: pathlib.Path) -> dict[str, tuple[int, int]]:
  return {
      str(p.relative_to(root)): (p.stat().st_mtime_ns, p.stat().st_size)
      for p in [root, *root.rglob("*")]
  }


def test_round_trip_is_bitwise(tmp_path):
  state = _state(5)
  with _make(tmp_path) as ckpt:
    assert ckpt.save(5, state, data_state=DATA_STATE)
  with _make(tmp_path) as ckpt:
    step, restored, data_state = ckpt.restore_latest(ABSTRACT)
    assert step == 5 and ckpt.all_steps() == [5] and ckpt.latest_step() == 5
    restored_5, data_5 = ckpt.restore(5, ABSTRACT)
  _assert_bitwise_equal(restored, state)
  _assert_bitwise_equal(restored_5, state)
  assert data_state == DATA_STATE and data_5 == DATA_STATE
  assert isinstance(restored, State)
  # optax needs its own state classes back, not tuples of arrays.
  assert type(restored.opt_state[0]) is type(state.opt_state[0])


def test_relative_workdir_round_trips(tmp_path, monkeypatch):
  """`--workdir=workdirs/tiny` as the README writes it: orbax's writer needs absolute paths."""
  monkeypatch.chdir(tmp_path)
  mesh = jax.make_mesh((len(jax.devices()),), ("data",))
  sharded = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  state = {"x": jax.device_put(jnp.arange(16.0), sharded)}
  with _make("workdirs/run") as ckpt:
    assert ckpt.save(3, state, data_state=DATA_STATE)
  with _make("workdirs/run") as ckpt:
    step, restored, _ = ckpt.restore_latest(
        {"x": jax.ShapeDtypeStruct((16,), jnp.float32, sharding=sharded)})
  assert step == 3 and (tmp_path / "workdirs" / "run" / "checkpoints" / "3").is_dir()
  np.testing.assert_array_equal(restored["x"], np.arange(16.0))


def test_scalars_and_keys_round_trip_with_concrete_template(tmp_path):
  state = {"epoch": 2, "lr": 0.5, "rng": jax.random.key(1), "mask": jnp.array([True, False])}
  with _make(tmp_path) as ckpt:
    ckpt.save(1, state, data_state={})
    restored, _ = ckpt.restore(1, state)  # Arrays or scalars work as the template too.
  assert restored["epoch"] == 2 and isinstance(restored["epoch"], int)
  assert restored["lr"] == 0.5
  key_data = jax.random.key_data
  np.testing.assert_array_equal(key_data(restored["rng"]), key_data(state["rng"]))
  np.testing.assert_array_equal(restored["mask"], [True, False])


def test_restore_into_sharded_abstract_state(tmp_path):
  mesh = jax.make_mesh((len(jax.devices()),), ("data",))
  sharded = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  state = {
      "x": jax.device_put(jnp.arange(16.0), sharded),
      # Committed to one device, unlike "x": the fingerprint must not jit them together.
      "y": jax.device_put(jnp.ones(3), jax.devices()[-1]),
      "s": jnp.int32(3),
  }
  with _make(tmp_path) as ckpt:
    ckpt.save(1, state, data_state={})
    abstract = {
        "x": jax.ShapeDtypeStruct((16,), jnp.float32, sharding=replicated),
        "y": jax.ShapeDtypeStruct((3,), jnp.float32, sharding=replicated),
        "s": jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated),
    }
    _, restored, _ = ckpt.restore_latest(abstract)
  assert restored["x"].sharding == replicated and restored["y"].sharding == replicated
  np.testing.assert_array_equal(restored["x"], np.arange(16.0))
  np.testing.assert_array_equal(restored["y"], np.ones(3))


def test_restore_latest_on_empty_workdir_returns_none(tmp_path):
  with _make(tmp_path) as ckpt:
    assert ckpt.restore_latest(ABSTRACT) is None
    assert ckpt.all_steps() == [] and ckpt.latest_step() is None


def test_save_every_force_and_duplicates(tmp_path):
  with _make(tmp_path, save_every=4) as ckpt:
    saved = [s for s in range(1, 11) if ckpt.save(s, _state(s), data_state={})]
    assert saved == [4, 8]
    assert ckpt.save(10, _state(10), data_state={}, force=True)
    assert not ckpt.save(10, _state(10), data_state={}, force=True)  # Already there.
    assert ckpt.all_steps() == [4, 8, 10]


def test_keep_prunes_oldest(tmp_path):
  _save_steps(tmp_path, range(1, 7), keep=3)
  with _make(tmp_path, keep=3) as ckpt:
    assert ckpt.all_steps() == [4, 5, 6]
  assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()) == [
      4, 5, 6,
  ]


def test_async_save_copies_before_returning(tmp_path):
  state = _state(3)
  want = jax.tree.map(np.array, state)
  with _make(tmp_path, async_save=True) as ckpt:
    assert ckpt.save(3, state, data_state=DATA_STATE)
    # The train step donates its input state; the save must not depend on those buffers.
    for leaf in jax.tree.leaves(state):
      if isinstance(leaf, jax.Array):
        leaf.delete()
    ckpt.wait()
    assert ckpt.all_steps() == [3]
    assert not list((tmp_path / "checkpoints").glob("*tmp*"))
    _, restored, data_state = ckpt.restore_latest(ABSTRACT)
  _assert_bitwise_equal(restored, want)
  assert data_state == DATA_STATE


def _chunks(step_dir):
  # OCDBT data files of the state item, largest first (the fp32 params and moments live there).
  files = (step_dir / "state").rglob("d/*")
  return sorted((p for p in files if p.is_file()), key=lambda p: -p.stat().st_size)


def _truncate_chunk(step_dir):
  path = _chunks(step_dir)[0]
  os.truncate(path, path.stat().st_size // 2)


def _delete_chunk(step_dir):
  _chunks(step_dir)[0].unlink()


def _flip_bit(step_dir):
  path = _chunks(step_dir)[0]
  data = bytearray(path.read_bytes())
  data[len(data) // 2] ^= 0x10
  path.write_bytes(bytes(data))


CORRUPTIONS = {
    "truncated_chunk": _truncate_chunk,
    "deleted_chunk": _delete_chunk,
    "flipped_bit": _flip_bit,  # Decodes without error; only the fingerprint catches it.
    "deleted_tree_metadata": lambda d: (d / "state" / "_METADATA").unlink(),
    "truncated_data_json": lambda d: os.truncate(d / "data" / "metadata", 5),
    "truncated_meta_json": lambda d: os.truncate(d / "meta" / "metadata", 5),
    "deleted_state_item": lambda d: shutil.rmtree(d / "state"),
}


@pytest.mark.parametrize("corrupt", CORRUPTIONS.values(), ids=CORRUPTIONS.keys())
def test_corrupt_newest_falls_back_to_previous(tmp_path, caplog, corrupt):
  _save_steps(tmp_path, [1, 2, 3])
  corrupt(tmp_path / "checkpoints" / "3")
  with caplog.at_level(py_logging.WARNING), _make(tmp_path) as ckpt:
    step, restored, data_state = ckpt.restore_latest(ABSTRACT)
    assert step == 2
    _assert_bitwise_equal(restored, _state(2))
    assert data_state["step"] == 2
    warnings = [r.getMessage() for r in caplog.records if r.levelno == py_logging.WARNING]
    assert any("step 3" in m and "corrupt" in m for m in warnings), warnings
    if corrupt is _flip_bit:
      assert any("fingerprint" in m for m in warnings), warnings
    # The bad step is moved aside so the resumed run can write step 3 again.
    assert ckpt.all_steps() == [1, 2]
    assert [p.name.split("-")[0] for p in (tmp_path / "checkpoints_corrupt").iterdir()] == ["3"]
    assert ckpt.save(3, _state(3), data_state={"step": 3})
  with _make(tmp_path) as ckpt:
    step, restored, _ = ckpt.restore_latest(ABSTRACT)
  assert step == 3
  _assert_bitwise_equal(restored, _state(3))


def test_unfinished_tmp_checkpoint_is_ignored(tmp_path):
  _save_steps(tmp_path, [1, 2])
  # What a crash in the middle of writing step 3 leaves behind.
  partial = tmp_path / "checkpoints" / "3.orbax-checkpoint-tmp"
  shutil.copytree(tmp_path / "checkpoints" / "2", partial)
  shutil.rmtree(partial / "data")
  _truncate_chunk(partial)
  with _make(tmp_path) as ckpt:
    assert ckpt.all_steps() == [1, 2]
    step, restored, _ = ckpt.restore_latest(ABSTRACT)
    assert step == 2
    _assert_bitwise_equal(restored, _state(2))
    assert ckpt.save(3, _state(3), data_state={})  # Orbax replaces the stale tmp dir.
    assert ckpt.all_steps() == [1, 2, 3]
    _assert_bitwise_equal(ckpt.restore(3, ABSTRACT)[0], _state(3))


def test_all_checkpoints_corrupt_raises_and_moves_nothing(tmp_path):
  _save_steps(tmp_path, [1, 2])
  for step in (1, 2):
    _delete_chunk(tmp_path / "checkpoints" / str(step))
  before = _snapshot(tmp_path)
  with _make(tmp_path) as ckpt, pytest.raises(checkpoint.CheckpointCorruptError, match="step 1"):
    ckpt.restore_latest(ABSTRACT)
  assert _snapshot(tmp_path) == before


def test_restore_of_corrupt_step_raises(tmp_path):
  _save_steps(tmp_path, [1])
  _flip_bit(tmp_path / "checkpoints" / "1")
  with _make(tmp_path) as ckpt, pytest.raises(checkpoint.CheckpointCorruptError, match="params/w"):
    ckpt.restore(1, ABSTRACT)


def test_other_model_raises_before_touching_files(tmp_path):
  _save_steps(tmp_path, [1, 2])
  _delete_chunk(tmp_path / "checkpoints" / "2")  # Even a fallback must not move files.
  before = _snapshot(tmp_path)
  other = {"d_model": 32, "params": {"w": [64, 16], "b": [32]}}
  with _make(tmp_path, signature=other) as ckpt:
    with pytest.raises(ValueError) as e:
      ckpt.restore_latest(ABSTRACT)
    message = str(e.value)
    assert "\n" not in message
    assert f"--workdir: {tmp_path} holds a checkpoint of a different model" in message
    assert "params.w" in message and "[64, 32]" in message and "[64, 16]" in message
    assert "--workdir" in message
    # A train loop that saves without restoring first is stopped too.
    with pytest.raises(ValueError, match="different model"):
      ckpt.save(3, _state(3), data_state={})
  assert _snapshot(tmp_path) == before


def test_signature_field_added_is_named(tmp_path):
  _save_steps(tmp_path, [1])
  with _make(tmp_path, signature={**SIGNATURE, "num_experts": 16}) as ckpt:
    with pytest.raises(ValueError, match="num_experts: the checkpoint has no such field"):
      ckpt.restore(1, ABSTRACT)


def test_bad_arguments_raise(tmp_path):
  with pytest.raises(ValueError, match="save_every"):
    _make(tmp_path, save_every=0)
  with pytest.raises(ValueError, match="keep"):
    _make(tmp_path, keep=0)
  with _make(tmp_path) as ckpt, pytest.raises(TypeError, match="data_state must be JSON-able"):
    ckpt.save(1, _state(1), data_state={"x": object()})


def test_preemption_handler_sets_flag_and_restores_handlers():
  def previous_term(signum, frame):
    del signum, frame

  old_term = signal.signal(signal.SIGTERM, previous_term)
  old_int = signal.getsignal(signal.SIGINT)
  try:
    with checkpoint.install_preemption_handler() as preemption:
      assert not preemption.should_stop() and not preemption()
      os.kill(os.getpid(), signal.SIGTERM)
      assert preemption.should_stop() and preemption() and preemption.signum == signal.SIGTERM
      os.kill(os.getpid(), signal.SIGTERM)  # A repeated SIGTERM only keeps the flag.
      assert preemption.should_stop()
    assert signal.getsignal(signal.SIGTERM) is previous_term
    assert signal.getsignal(signal.SIGINT) is old_int
  finally:
    signal.signal(signal.SIGTERM, old_term)


def test_second_ctrl_c_aborts():
  old_int = signal.getsignal(signal.SIGINT)
  with pytest.raises(KeyboardInterrupt):
    with checkpoint.install_preemption_handler() as preemption:
      os.kill(os.getpid(), signal.SIGINT)
      assert preemption.should_stop() and preemption.signum == signal.SIGINT
      os.kill(os.getpid(), signal.SIGINT)
  assert signal.getsignal(signal.SIGINT) is old_int
