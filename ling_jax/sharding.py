"""The device mesh, the logical-axis rules, and the shardings of the train state and batches.

Mesh axes, outermost first:
  data    pure data parallelism: params replicated, the batch split;
  fsdp    data parallelism with params and optimiser state split too (gathered layer by layer by
          XLA, inside the scanned layer loop);
  expert  expert parallelism: routed experts split, tokens split too and exchanged with
          all-to-alls around the experts (`ling_jax/expert_parallel.py`);
  tensor  tensor parallelism of attention heads and the dense FFN.

The batch is split over data x fsdp x expert. Parameters are not annotated inside the modules:
`PARAM_AXES` names the logical axes of every parameter by its name, and `LOGICAL_RULES` maps
logical axes to mesh axes. A dimension that a mesh axis does not divide stays unsplit.
"""

import math
import re
from collections.abc import Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from ling_jax import config as config_lib

MESH_AXES = ("data", "fsdp", "expert", "tensor")
BATCH_AXES = ("data", "fsdp", "expert")

# Logical axis -> mesh axes. The one table to edit to change how the model is laid out.
LOGICAL_RULES: dict[str, tuple[str, ...]] = {
    "batch": BATCH_AXES,
    "vocab": ("tensor",),
    "embed": ("fsdp",),
    "heads": ("tensor",),  # fused q/k/v output features and the attention output's inputs
    "mlp": ("tensor",),  # dense and shared-expert FFN width
    "expert": ("expert",),
    "layers": (),  # the scanned layer axis
    "expert_mlp": (),  # routed expert width: the expert axis already splits the experts
    "norm": (),
    "router": (),
}

# (regex over the "/"-joined parameter path, logical axes without the scanned layer axis).
# The first match wins; every parameter must match one.
PARAM_AXES: tuple[tuple[str, tuple[str | None, ...]], ...] = (
    (r"embed/embedding$", ("vocab", "embed")),
    (r"lm_head/kernel$", ("embed", "vocab")),
    (r"attention/qkv/kernel$", ("embed", "heads")),
    (r"attention/(dense|out)/kernel$", ("heads", "embed")),
    (r"mlp/router$", ("embed", "router")),
    (r"mlp/wi_gate_up$", ("expert", "embed", "expert_mlp")),
    (r"mlp/wo$", ("expert", "expert_mlp", "embed")),
    (r"expert_bias$", ("router",)),
    (r"(gate_up|wi)/kernel$", ("embed", "mlp")),
    (r"(down|wo)/kernel$", ("mlp", "embed")),
    (r"eh_proj/kernel$", (None, "embed")),
    (r"/scale$", ("norm",)),
    (r"/bias$", ("norm",)),
)

_STACKED = re.compile(r"(^|/)(dense_layers|moe_layers)/")


def default_mesh_config() -> ml_collections.ConfigDict:
  """Returns `config.mesh`: the size of each mesh axis; -1 takes the devices left over."""
  c = ml_collections.ConfigDict()
  c.data = -1
  c.fsdp = 1
  c.expert = 1
  c.tensor = 1
  return c


def mesh_shape(mesh_cfg: Any, num_devices: int) -> dict[str, int]:
  """Returns {axis: size} for `num_devices`, resolving one -1; raises ConfigError if it cannot."""
  sizes = {axis: mesh_cfg[axis] for axis in MESH_AXES}
  for axis, size in sizes.items():
    if not isinstance(size, int) or size == 0 or size < -1:
      config_lib.fail(f"mesh.{axis}", f"must be a positive integer or -1, got {size!r}",
                      "set it to the number of devices along that axis")
  free = [axis for axis, size in sizes.items() if size == -1]
  if len(free) > 1:
    config_lib.fail(f"mesh.{free[1]}", f"only one axis may be -1, got {free}",
                    "give every axis but one an explicit size")
  fixed = math.prod(size for size in sizes.values() if size != -1)
  if free:
    if num_devices % fixed:
      config_lib.fail(f"mesh.{free[0]}", f"the other axes use {fixed} devices, which does not "
                      f"divide the {num_devices} devices", "make their product divide it")
    sizes[free[0]] = num_devices // fixed
  elif fixed != num_devices:
    shape = " x ".join(f"{axis}={size}" for axis, size in sizes.items())
    config_lib.fail("mesh", f"{shape} needs {fixed} devices but there are {num_devices}",
                    "make the product of data, fsdp, expert and tensor equal the device count, "
                    "or set one of them to -1")
  return sizes


def validate_mesh_config(config: Any, num_devices: int) -> dict[str, int]:
  """Checks `config.mesh` against the model and batch; returns the mesh shape."""
  sizes = mesh_shape(config.mesh, num_devices)
  m, t = config.model, config.train
  if m.num_experts % sizes["expert"]:
    config_lib.fail("mesh.expert", f"{sizes['expert']} does not divide "
                    f"model.num_experts={m.num_experts}", "use a divisor of num_experts")
  shards = num_batch_shards(sizes)
  micro = t.batch_size // t.grad_accum_steps
  if t.batch_size % t.grad_accum_steps or micro % shards:
    config_lib.fail("train.batch_size", f"a micro-batch of {t.batch_size} / "
                    f"{t.grad_accum_steps} sequences does not split over the {shards} batch "
                    "shards (mesh data x fsdp x expert)",
                    f"make batch_size a multiple of {t.grad_accum_steps * shards}")
  return sizes


def num_batch_shards(sizes: dict[str, int]) -> int:
  """Returns how many ways the batch is split: data x fsdp x expert."""
  return math.prod(sizes[axis] for axis in BATCH_AXES)


def make_mesh(mesh_cfg: Any, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """Returns the mesh of `config.mesh` over `devices` (default: every device of every process)."""
  devices = list(jax.devices() if devices is None else devices)
  sizes = mesh_shape(mesh_cfg, len(devices))
  shape = tuple(sizes[axis] for axis in MESH_AXES)
  return jax.make_mesh(shape, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 4,
                       devices=devices)


def logical_to_spec(logical_axes: Sequence[str | None], shape: Sequence[int],
                    mesh: Mesh) -> P:
  """Returns the PartitionSpec of an array with `logical_axes`, leaving undivided dims whole."""
  spec, used = [], set()
  for name, dim in zip(logical_axes, shape, strict=True):
    if name is not None and name not in LOGICAL_RULES:
      raise KeyError(f"logical axis {name!r} has no entry in sharding.LOGICAL_RULES")
    axes = [a for a in LOGICAL_RULES.get(name, ()) if mesh.shape.get(a, 1) > 1 and a not in used]
    size = math.prod(mesh.shape[a] for a in axes)
    if not axes or dim % size:
      spec.append(None)
      continue
    used.update(axes)
    spec.append(tuple(axes) if len(axes) > 1 else axes[0])
  return P(*spec)


def param_logical_axes(path: str, ndim: int) -> tuple[str | None, ...]:
  """Returns the logical axes of the parameter (or its optimiser moment) at `path`."""
  axes = next((axes for pattern, axes in PARAM_AXES if re.search(pattern, path)), None)
  if axes is None:
    raise KeyError(f"parameter {path!r} matches no entry of sharding.PARAM_AXES; add one")
  if _STACKED.search(path):
    axes = ("layers",) + axes
  if len(axes) != ndim:
    raise ValueError(f"parameter {path!r} has {ndim} dims but PARAM_AXES gives {axes}")
  return axes


def _dict_path(key_path: tuple[Any, ...]) -> str:
  # Only the dict keys: optax wraps param trees in NamedTuples whose field names are not paths.
  return "/".join(str(k.key) for k in key_path if isinstance(k, jax.tree_util.DictKey))


def tree_shardings(tree: Any, mesh: Mesh) -> Any:
  """Returns NamedShardings for a train state, params or gradients: scalars replicated."""
  def leaf_sharding(key_path, leaf):
    shape = np.shape(leaf)
    if not shape:
      return NamedSharding(mesh, P())
    axes = param_logical_axes(_dict_path(key_path), len(shape))
    return NamedSharding(mesh, logical_to_spec(axes, shape, mesh))
  return jax.tree_util.tree_map_with_path(leaf_sharding, tree)


def split_batch_axes(sizes: Any) -> tuple[str, ...]:
  """The batch axes (data, fsdp, expert) that `sizes` (a mesh's shape) splits, in order."""
  return tuple(a for a in BATCH_AXES if sizes.get(a, 1) > 1)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Returns the sharding of [B, ...] batch arrays: rows split over data x fsdp x expert."""
  return NamedSharding(mesh, P(split_batch_axes(mesh.shape) or None))


def replicated(mesh: Mesh) -> NamedSharding:
  """Returns the fully replicated sharding."""
  return NamedSharding(mesh, P())


def global_batch(local_batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Returns this process's rows of the batch as global arrays split like `batch_sharding`.

  Each process passes its own consecutive block of rows: process p holds rows
  [p * B / P, (p + 1) * B / P) of the global batch.
  """
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local_batch.items()}

