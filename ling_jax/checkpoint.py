"""Orbax checkpoints of the train state, with the data-iterator state and a model signature.

Layout: `workdir/checkpoints/<step>/{state,data,meta}`. `state` is the train-state pytree
(StandardSave, any sharding), `data` the grain iterator state (JSON), `meta` the model signature
and a per-leaf fingerprint of the state (JSON). Orbax writes each step into
`<step>.orbax-checkpoint-tmp` and renames it when every item is written, so a step directory
without the suffix is complete; a crash mid-save leaves only the tmp directory, which orbax
lists as no step and removes when that step is saved again.

What the rename cannot promise is that the files stay intact afterwards. `restore_latest`
therefore treats any error while reading a step, or a fingerprint mismatch (a flipped bit in a
compressed chunk decodes without error), as corruption, falls back to the previous step, and
moves the bad steps to `workdir/checkpoints_corrupt/` so that the resumed run can save those step
numbers again.
"""

import contextlib
import dataclasses
import json
import os
import signal
import time
from collections.abc import Iterator
from collections.abc import Mapping
from typing import Any
from typing import Self

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

from ling_jax import config as config_lib

PyTree = Any

_STATE, _DATA, _META = "state", "data", "meta"
_CORRUPT_DIR = "checkpoints_corrupt"


class CheckpointCorruptError(RuntimeError):
  """A checkpoint step that exists on disk cannot be restored intact."""


class Checkpointer:
  """Saves and restores train states under `workdir/checkpoints`, newest `keep` kept.

  Typical use in a train loop:

      ckpt = Checkpointer(workdir, save_every=1000, keep=3, model_signature=sig)
      restored = ckpt.restore_latest(jax.eval_shape(init_state))  # None on a fresh workdir
      ...
      ckpt.save(step, state, data_state=iterator.get_state())  # every step; saves when due
      ckpt.close()
  """

  def __init__(
      self,
      workdir: str | os.PathLike[str],
      *,
      save_every: int,
      keep: int,
      model_signature: Mapping[str, Any] | None = None,
      async_save: bool = True,
  ):
    """Opens (creating if needed) `workdir/checkpoints`; writes nothing else.

    Args:
      workdir: the run's directory (a local path or anything etils.epath opens).
      save_every: `save` writes steps that are multiples of this (and forced saves).
      keep: how many of the newest checkpoints to keep; older ones are deleted.
      model_signature: JSON-able description of the model (config fields, param shapes) that
        must match the one stored in an existing checkpoint; None skips the check.
      async_save: write in a background thread; `save` returns once the state is on the host.
    """
    if save_every < 1:
      raise ValueError(f"save_every must be >= 1, got {save_every}")
    if keep < 1:
      raise ValueError(f"keep must be >= 1, got {keep}")
    # Orbax's tensorstore writer refuses relative paths (e.g. `--workdir=workdirs/tiny`).
    workdir = os.fspath(workdir)
    self._workdir = epath.Path(workdir if "://" in workdir else os.path.abspath(workdir))
    self._save_every = save_every
    self._signature = None if model_signature is None else _to_json(model_signature)
    self._signature_checked = model_signature is None
    _save_replicated_arrays_whole_on_cpu()
    self._manager = ocp.CheckpointManager(
        self._workdir / "checkpoints",
        options=ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            # `save` decides itself which steps are due, so orbax never skips one.
            save_interval_steps=1,
            enable_async_checkpointing=async_save,
        ),
    )

  @property
  def directory(self) -> epath.Path:
    """The directory holding one subdirectory per step."""
    return self._manager.directory

  def all_steps(self) -> list[int]:
    """Returns the saved steps (complete or in flight in this process), oldest first."""
    return sorted(self._manager.all_steps())

  def latest_step(self) -> int | None:
    """Returns the newest saved step (not checked for corruption), or None."""
    return self._manager.latest_step()

  def is_due(self, step: int) -> bool:
    """Returns whether `save` at `step` writes without `force`."""
    return step % self._save_every == 0

  def save(
      self, step: int, state: PyTree, *, data_state: Mapping[str, Any], force: bool = False
  ) -> bool:
    """Saves `state` at `step` if it is a multiple of save_every or `force`; returns whether.

    With async saving, the device arrays are copied to the host before this returns, so the
    caller may donate or delete them right away.
    """
    if not force and step % self._save_every:
      return False
    if not self._signature_checked:
      self._check_newest_signature()
    if step in self._manager.all_steps():
      # A forced save right after a periodic one, or a resumed run at its restored step.
      logging.info("checkpoint of step %d already exists in %s; not saving again", step,
                   self.directory)
      return False
    data_state = _to_json(data_state, what="data_state")
    meta = {"model_signature": self._signature, "fingerprint": _fingerprint(state)}
    saved = self._manager.save(
        step,
        args=ocp.args.Composite(**{
            _STATE: ocp.args.StandardSave(state),
            _DATA: ocp.args.JsonSave(data_state),
            _META: ocp.args.JsonSave(meta),
        }),
        force=True,
    )
    return bool(saved)

  def wait(self) -> None:
    """Blocks until in-flight saves are on disk, re-raising their errors."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    """Waits for in-flight saves and releases orbax's threads."""
    self._manager.wait_until_finished()
    self._manager.close()

  def __enter__(self) -> Self:
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()

  def restore(self, step: int, abstract_state: PyTree) -> tuple[PyTree, dict[str, Any]]:
    """Returns (state, data_state) of `step`, laid out like `abstract_state`.

    Args:
      step: a step from all_steps().
      abstract_state: a pytree of jax.ShapeDtypeStruct (e.g. from jax.eval_shape) or arrays
        with the structure, dtypes and shardings to restore into.

    Raises:
      ValueError: the checkpoint belongs to a model with another signature.
      CheckpointCorruptError: the restored arrays do not match the saved fingerprint.
      Exception: whatever orbax raises for missing or unreadable files.
    """
    self._check_signature(self._read_meta(step))
    return self._restore_verified(step, abstract_state)

  def restore_latest(self, abstract_state: PyTree) -> tuple[int, PyTree, dict[str, Any]] | None:
    """Returns (step, state, data_state) of the newest intact checkpoint, or None if none exist.

    A step that fails to restore is skipped with a warning and, once an older step restores,
    moved to `workdir/checkpoints_corrupt/`.

    Raises:
      ValueError: the workdir holds a checkpoint of another model (nothing is changed on disk).
      CheckpointCorruptError: checkpoints exist but none restores (nothing is changed on disk).
    """
    self.wait()
    self._manager.reload()
    bad_steps = []
    for step in reversed(self.all_steps()):
      try:
        meta = self._read_meta(step)
      except Exception as e:  # Orbax raises many types for unreadable files.
        bad_steps.append(self._warn_bad(step, e))
        continue
      # Outside the try: a foreign checkpoint is not a reason to fall back.
      self._check_signature(meta)
      try:
        state, data_state = self._restore_verified(step, abstract_state)
      except Exception as e:  # Any failure to read back is corruption here.
        bad_steps.append(self._warn_bad(step, e))
        continue
      self._quarantine([s for s, _ in bad_steps])
      return step, state, data_state
    if bad_steps:
      reasons = "; ".join(f"step {s}: {r}" for s, r in bad_steps)
      raise CheckpointCorruptError(f"no checkpoint in {self.directory} restores: {reasons}")
    return None

  def _read_meta(self, step: int) -> dict[str, Any]:
    args = ocp.args.Composite(**{_META: ocp.args.JsonRestore()})
    restored = self._manager.restore(step, args=args)
    return restored[_META]

  def _restore_verified(self, step: int, abstract_state: PyTree) -> tuple[PyTree, dict[str, Any]]:
    abstract_state = jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract_state)
    restored = self._manager.restore(
        step,
        args=ocp.args.Composite(**{
            _STATE: ocp.args.StandardRestore(abstract_state),
            _DATA: ocp.args.JsonRestore(),
            _META: ocp.args.JsonRestore(),
        }),
    )
    state = restored[_STATE]
    saved = restored[_META].get("fingerprint", {})
    for path, (dtype, value) in _fingerprint(state).items():
      # A leaf restored into another dtype has other bits; only like-for-like can be compared.
      if path in saved and saved[path][0] == dtype and saved[path][1] != value:
        raise CheckpointCorruptError(
            f"step {step}: {path} does not match the fingerprint written at save time"
        )
    return state, restored[_DATA]

  def _check_newest_signature(self) -> None:
    for step in reversed(self.all_steps()):
      try:
        meta = self._read_meta(step)
      except Exception as e:  # Orbax raises many types for unreadable files.
        logging.info("skipping unreadable step %d in the signature check: %r", step, e)
        continue
      self._check_signature(meta)
      return
    self._signature_checked = True

  def _check_signature(self, meta: Mapping[str, Any]) -> None:
    if self._signature is None:
      return
    difference = _first_difference(meta.get("model_signature"), self._signature)
    if difference is not None:
      raise config_lib.ConfigError(
          f"--workdir: {self._workdir} holds a checkpoint of a different model: {difference}; "
          "Fix: use a new --workdir, or delete its checkpoints/ to start over"
      )
    self._signature_checked = True

  def _warn_bad(self, step: int, error: Exception) -> tuple[int, str]:
    lines = str(error).strip().splitlines()
    reason = f"{type(error).__name__}: {lines[0][:300] if lines else ''}"
    logging.warning(
        "checkpoint step %d in %s is corrupt or incomplete (%s); trying the previous one",
        step, self.directory, reason,
    )
    return step, reason

  def _quarantine(self, steps: list[int]) -> None:
    if not steps:
      return
    if jax.process_index() == 0:
      corrupt_dir = self._workdir / _CORRUPT_DIR
      corrupt_dir.mkdir(parents=True, exist_ok=True)
      for step in steps:
        src = self.directory / str(step)
        dst = corrupt_dir / f"{step}-{time.strftime('%Y%m%d-%H%M%S')}"
        if src.exists():
          src.rename(dst)
          logging.warning("moved corrupt checkpoint step %d to %s", step, dst)
    ocp.multihost.sync_global_processes("ling_jax_checkpoint_quarantine")
    self._manager.reload()


def _to_json(value: Any, what: str = "model_signature") -> Any:
  """Returns `value` as it will read back from JSON (tuples become lists), or raises."""
  try:
    return json.loads(json.dumps(value))
  except (TypeError, ValueError) as e:
    raise TypeError(f"{what} must be JSON-able: {e}") from None


def _first_difference(stored: Any, current: Any, path: str = "") -> str | None:
  """Returns the first field where two model signatures differ, as one line, or None."""
  if isinstance(stored, dict) and isinstance(current, dict):
    for key in sorted(set(stored) | set(current)):
      where = f"{path}.{key}" if path else str(key)
      if key not in stored:
        return f"{where}: the checkpoint has no such field, this run has {_short(current[key])}"
      if key not in current:
        return f"{where}: the checkpoint has {_short(stored[key])}, this run has no such field"
      difference = _first_difference(stored[key], current[key], where)
      if difference is not None:
        return difference
    return None
  if stored != current:
    where = path or "model_signature"
    return f"{where}: the checkpoint has {_short(stored)}, this run has {_short(current)}"
  return None


def _short(value: Any) -> str:
  text = json.dumps(value)
  return text if len(text) <= 80 else text[:77] + "..."


def _save_replicated_arrays_whole_on_cpu() -> None:
  """Turns off orbax's replica-parallel saving on CPU (its default there; off on GPU already).

  With it, each replica of a replicated array writes a slice of it, cut out by an eager
  `slice_in_dim` that XLA compiles anew for every array shape, slice and device: the first save
  of a micro model's state on a mesh of 8 CPU devices compiled 183 of them (10.5 s, against
  0.3 s without). CPU devices share their host's memory, so the slicing spreads no work there.
  What is saved, and restored, is the same either way.
  """
  if jax.default_backend() != "cpu":
    return
  handler = ocp.type_handlers.get_type_handler(jax.Array)
  if getattr(handler, "_use_replica_parallel", False):
    handler._use_replica_parallel = False  # pylint: disable=protected-access


def _fingerprintable(x: Any) -> bool:
  if not hasattr(x, "dtype") and not isinstance(x, (bool, int, float)):
    return False
  dtype = jnp.result_type(x)
  if jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key) or dtype == jnp.bool_:
    return True
  if jnp.issubdtype(dtype, jnp.integer):
    return jnp.iinfo(dtype).bits == 8 * dtype.itemsize  # Sub-byte types cannot be bitcast.
  if jnp.issubdtype(dtype, jnp.floating):
    return jnp.finfo(dtype).bits == 8 * dtype.itemsize
  return False


def _sum_of_words(x: jax.Array) -> jax.Array:
  """Returns the sum mod 2**32 of `x`'s bits read as unsigned words: any 1-bit flip changes it."""
  if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  if x.dtype == jnp.bool_:
    words = x.astype(jnp.uint32)
  else:
    unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}[x.dtype.itemsize]
    words = jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)
  # Unsigned sums wrap, so the result does not depend on reduction order or sharding.
  return jnp.sum(words, dtype=jnp.uint32)


_sum_of_words_jit = jax.jit(lambda leaves: [_sum_of_words(jnp.asarray(x)) for x in leaves])


def _fingerprint(state: PyTree) -> dict[str, tuple[str, int]]:
  """Returns {leaf path: (dtype, sum of words)} for the leaves that can be fingerprinted."""
  by_devices = {}  # One jit call per device set: jit rejects inputs committed to different ones.
  for key_path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
    if _fingerprintable(leaf):
      committed = isinstance(leaf, jax.Array) and leaf.committed
      devices = frozenset(leaf.sharding.device_set) if committed else None
      by_devices.setdefault(devices, []).append((_path_str(key_path), leaf))
  fingerprint = {}
  for group in by_devices.values():
    sums = _sum_of_words_jit([leaf for _, leaf in group])
    for (path, leaf), value in zip(group, sums):
      fingerprint[path] = (str(jnp.result_type(leaf)), int(value))
  return fingerprint


def _path_str(key_path: tuple[Any, ...]) -> str:
  # Names only, so a state saved as a dataclass can be checked after restoring into a dict.
  parts = []
  for key in key_path:
    for attr in ("key", "name", "idx"):
      if hasattr(key, attr):
        parts.append(str(getattr(key, attr)))
        break
    else:
      parts.append(str(key))
  return "/".join(parts)


@dataclasses.dataclass
class PreemptionHandler:
  """Remembers that SIGTERM or SIGINT arrived so the train loop can save and stop cleanly."""

  signum: int | None = None  # The first signal received, None until then.

  def should_stop(self) -> bool:
    """Returns whether a stop signal arrived; the train loop polls this once per step."""
    return self.signum is not None

  def __call__(self) -> bool:
    """Same as should_stop(), so the handler itself can be polled: `if preempted(): ...`."""
    return self.should_stop()

  def _handle(self, signum: int, frame: Any) -> None:
    del frame
    if self.signum is not None and signum == signal.SIGINT:
      # A second Ctrl-C means "now": the final save may be what is hanging.
      raise KeyboardInterrupt
    self.signum = signum
    # os.write, not logging: a handler may run while the main thread holds a logging lock.
    os.write(2, f"\nreceived {signal.Signals(signum).name}; stopping after this step "
                "(Ctrl-C again to abort without saving)\n".encode())


@contextlib.contextmanager
def install_preemption_handler(
    signums: tuple[int, ...] = (signal.SIGTERM, signal.SIGINT),
) -> Iterator[PreemptionHandler]:
  """Routes `signums` to a PreemptionHandler for the `with` block, then restores the old handlers.

  Must be entered from the main thread (a restriction of `signal.signal`).

      with install_preemption_handler() as preemption:
        for step in ...:
          ...
          if preemption.should_stop():
            ckpt.save(step, state, data_state=..., force=True)
            break
  """
  handler = PreemptionHandler()
  previous = {}
  try:
    for signum in signums:
      previous[signum] = signal.signal(signum, handler._handle)
    yield handler
  finally:
    for signum, old in previous.items():
      # None means the old handler was not set from Python; the default is the closest.
      signal.signal(signum, signal.SIG_DFL if old is None else old)
