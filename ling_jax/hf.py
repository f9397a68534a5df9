"""Hugging Face interop: the released `BailingMoeV2ForCausalLM` layout of the Ling 2.0 models.

Read and write `config.json` and safetensors weights of `inclusionAI/Ling-mini-2.0`,
`Ling-flash-2.0` and `Ling-1T`, and load any pretrained checkpoint (HF or ours) in one call:

    m, variables = hf.load_pretrained("/path/to/Ling-mini-2.0", dtype="bfloat16")
    logits_BLV = hf.compute_logits(m, variables, ids_BL)

Layout (PyTorch `nn.Linear` stores [out, in], so every kernel is transposed):

    model.word_embeddings.weight                       embed/embedding
    model.layers.{i}.input_layernorm.weight            {stack}/input_norm/scale[l]
    model.layers.{i}.attention.query_key_value.weight  {stack}/attention/qkv/kernel[l].T
        (rows: all query heads, then all key heads, then all value heads, head dim minor)
    model.layers.{i}.attention.{query,key}_layernorm   {stack}/attention/{q,k}_norm/scale[l]
    model.layers.{i}.attention.dense.weight            {stack}/attention/out/kernel[l].T
    model.layers.{i}.post_attention_layernorm.weight   {stack}/post_attention_norm/scale[l]
    model.layers.{i}.mlp.{gate,up,down}_proj.weight    dense_layers/mlp/{gate_up,down} (gate first)
    model.layers.{i}.mlp.gate.weight                   moe_layers/mlp/router[l].T
    model.layers.{i}.mlp.gate.expert_bias  (fp32)      moe_state/moe_layers/mlp/expert_bias[l]
    model.layers.{i}.mlp.experts.{e}.{gate,up,down}_proj.weight
                                                       moe_layers/mlp/{wi_gate_up,wo}[l, e]
    model.layers.{i}.mlp.shared_experts.{gate,up,down}_proj.weight
                                                       moe_layers/mlp/shared_experts/...
    model.norm.weight                                  final_norm/scale
    lm_head.weight                                     lm_head/kernel.T
    model.layers.{num_hidden_layers + d}.{enorm,hnorm,eh_proj,final_layernorm,...}   mtp_{d}

Layer i < first_k_dense_replace is `dense_layers[i]`, the others `moe_layers[i - first_k]`. The
MTP block follows the trunk as an extra layer (as inclusionAI's converter exports it and
SGLang's BailingMoE NextN loader reads it), with `num_hidden_layers` counting the trunk only;
it takes the trunk state after `model.norm`, as the released modeling code does.
"""

import dataclasses
import functools
import json
import os
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import traverse_util

from ling_jax import config as config_lib
from ling_jax import model as model_lib
from ling_jax import moe
from ling_jax import safetensors_io

ARCHITECTURE = "BailingMoeV2ForCausalLM"
MODEL_TYPE = "bailing_moe"

# config.json fields that map 1:1 onto ours (same names).
_MAPPED = ("vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size",
           "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
           "num_experts", "num_experts_per_tok", "num_shared_experts", "n_group", "topk_group",
           "routed_scaling_factor", "score_function", "moe_router_enable_expert_bias",
           "first_k_dense_replace", "rms_norm_eps", "rope_theta", "partial_rotary_factor",
           "rotary_dim", "rope_scaling", "max_position_embeddings", "use_qk_norm",
           "tie_word_embeddings", "initializer_range", "num_nextn_predict_layers")
# Fields the released code reads whose other values would change the forward pass.
_REQUIRED = {"hidden_act": "silu", "use_qkv_bias": False, "use_bias": False,
             "norm_topk_prob": True, "router_dtype": "fp32", "norm_head": False}
# Fields with no effect on the weights or the forward pass (training-only, bookkeeping, ids).
_IGNORED = ("architectures", "auto_map", "model_type", "torch_dtype", "dtype",
            "transformers_version", "use_cache", "attention_dropout", "embedding_dropout",
            "output_dropout", "max_window_layers", "output_router_logits", "pad_token_id",
            "eos_token_id", "bos_token_id", "mtp_loss_scaling_factor", "use_rmsnorm",
            "norm_softmax", "use_sliding_window", "sliding_window", "pretraining_tp",
            "moe_shared_expert_intermediate_size", "scoring_func", "topk_method", "seq_aux",
            "_name_or_path", "quantization_config")


def _fail(field: str, problem: str, fix: str) -> None:
  raise config_lib.ConfigError(f"config.json field {field!r}: {problem}. Fix: {fix}.")


def config_from_hf(hf: dict, *, dtype: str = "bfloat16",
                   param_dtype: str | None = None) -> ml_collections.ConfigDict:
  """Returns our model config for a released `config.json` (a dict); checks every field.

  `param_dtype` defaults to the checkpoint's `torch_dtype` (bf16 for the released models).
  """
  from configs import ling2  # The variant defaults live with the configs.

  if hf.get("model_type", MODEL_TYPE) != MODEL_TYPE:
    _fail("model_type", f"is {hf['model_type']!r}, not {MODEL_TYPE!r}",
          "load a Ling 2.0 (BailingMoeV2) checkpoint")
  archs = hf.get("architectures") or [ARCHITECTURE]
  if ARCHITECTURE not in archs:
    _fail("architectures", f"{archs} does not include {ARCHITECTURE}",
          "load a Ling 2.0 (BailingMoeV2) checkpoint")
  for field, value in hf.items():
    if field in _MAPPED or field in _IGNORED:
      continue
    if field in _REQUIRED:
      if value != _REQUIRED[field]:
        _fail(field, f"is {value!r}; only {_REQUIRED[field]!r} is implemented",
              f"use a checkpoint with {field}={_REQUIRED[field]!r}")
      continue
    _fail(field, "is unknown to ling_jax.hf and may change the model",
          "remove it from config.json if it does not change the forward pass, or add its "
          "meaning to ling_jax/hf.py")
  m = ling2.model_config("mini")
  m.rotary_dim = None  # Only Ling-1T states it; it wins over partial_rotary_factor when set.
  for field in _MAPPED:
    if field in hf:
      m[field] = hf[field]
  if m.num_shared_experts is None:  # The released code reads None as "no shared expert".
    m.num_shared_experts = 0
  shared = hf.get("moe_shared_expert_intermediate_size")
  if shared is not None and shared != m.moe_intermediate_size * m.num_shared_experts:
    _fail("moe_shared_expert_intermediate_size",
          f"{shared} differs from moe_intermediate_size * num_shared_experts = "
          f"{m.moe_intermediate_size * m.num_shared_experts}, the width the released code builds",
          "make them agree")
  m.dtype = dtype
  stored = hf.get("torch_dtype") or hf.get("dtype") or "float32"
  m.param_dtype = param_dtype or stored
  config_lib.validate_model_config(m)
  return m


def config_to_hf(m: Any) -> dict:
  """Returns a `config.json` dict for our model config, in the released field names."""
  config_lib.validate_model_config(m)
  hf = {"architectures": [ARCHITECTURE],
        "auto_map": {
            "AutoConfig": "configuration_bailing_moe_v2.BailingMoeV2Config",
            "AutoModel": "modeling_bailing_moe_v2.BailingMoeV2Model",
            "AutoModelForCausalLM": "modeling_bailing_moe_v2.BailingMoeV2ForCausalLM"},
        "model_type": MODEL_TYPE}
  for field in _MAPPED:
    if field == "rotary_dim" and m.get("rotary_dim") is None:
      continue
    hf[field] = m.get(field)
  # The released modeling code derives the rotary width from partial_rotary_factor only.
  hf["partial_rotary_factor"] = config_lib.rotary_dim(m) / m.head_dim
  hf.update(_REQUIRED)
  hf.update({"moe_shared_expert_intermediate_size": m.moe_intermediate_size
             * m.num_shared_experts, "torch_dtype": m.param_dtype, "use_cache": True,
             "attention_dropout": 0.0, "embedding_dropout": 0.0, "output_dropout": 0.0,
             "mtp_loss_scaling_factor": 0.0, "max_window_layers": m.num_hidden_layers,
             "use_rmsnorm": True, "output_router_logits": False})
  return hf


# ---------------------------------------------------------------------------------------------
# The tensor table.
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Piece:
  """One released tensor and where it sits in one of our variables."""
  hf_name: str
  path: tuple[str, ...]  # Our variable: ("params", ...) or ("moe_state", ...).
  index: tuple[int, ...]  # Leading indices into our leaf (layer, then expert).
  cols: tuple[int, int] | None  # A column range of our leaf's last axis (fused gate/up).
  transpose: bool  # Stored as [out, in] where we keep [in, out].


def _block_pieces(m: Any, prefix: str, path: tuple[str, ...], index: tuple[int, ...],
                  use_moe: bool, state_path: tuple[str, ...]) -> list[Piece]:
  """Returns the pieces of one decoder block stored under `prefix` (e.g. model.layers.3)."""
  pieces = []

  def add(name, sub, cols=None, transpose=False, root=path):
    pieces.append(Piece(f"{prefix}.{name}", root + sub, index, cols, transpose))

  add("input_layernorm.weight", ("input_norm", "scale"))
  add("post_attention_layernorm.weight", ("post_attention_norm", "scale"))
  add("attention.query_key_value.weight", ("attention", "qkv", "kernel"), transpose=True)
  add("attention.dense.weight", ("attention", "out", "kernel"), transpose=True)
  if m.use_qk_norm:
    add("attention.query_layernorm.weight", ("attention", "q_norm", "scale"))
    add("attention.key_layernorm.weight", ("attention", "k_norm", "scale"))
  if not use_moe:
    width = m.intermediate_size
    add("mlp.gate_proj.weight", ("mlp", "gate_up", "kernel"), (0, width), True)
    add("mlp.up_proj.weight", ("mlp", "gate_up", "kernel"), (width, 2 * width), True)
    add("mlp.down_proj.weight", ("mlp", "down", "kernel"), transpose=True)
    return pieces
  add("mlp.gate.weight", ("mlp", "router"), transpose=True)
  add("mlp.gate.expert_bias", ("mlp", "expert_bias"), root=state_path)
  f = m.moe_intermediate_size
  for e in range(m.num_experts):
    for name, cols in (("gate_proj", (0, f)), ("up_proj", (f, 2 * f))):
      pieces.append(Piece(f"{prefix}.mlp.experts.{e}.{name}.weight",
                          path + ("mlp", "wi_gate_up"), index + (e,), cols, True))
    pieces.append(Piece(f"{prefix}.mlp.experts.{e}.down_proj.weight", path + ("mlp", "wo"),
                        index + (e,), None, True))
  if m.num_shared_experts:
    width = f * m.num_shared_experts
    add("mlp.shared_experts.gate_proj.weight", ("mlp", "shared_experts", "gate_up", "kernel"),
        (0, width), True)
    add("mlp.shared_experts.up_proj.weight", ("mlp", "shared_experts", "gate_up", "kernel"),
        (width, 2 * width), True)
    add("mlp.shared_experts.down_proj.weight", ("mlp", "shared_experts", "down", "kernel"),
        transpose=True)
  return pieces


def tensor_table(m: Any) -> list[Piece]:
  """Returns every released tensor of the model `m` describes, in checkpoint order."""
  p, s = ("params",), (moe.STATE,)
  pieces = [Piece("model.word_embeddings.weight", p + ("embed", "embedding"), (), None, False)]
  for i in range(m.num_hidden_layers):
    use_moe = i >= m.first_k_dense_replace
    stack = "moe_layers" if use_moe else "dense_layers"
    layer = i - m.first_k_dense_replace if use_moe else i
    pieces += _block_pieces(m, f"model.layers.{i}", p + (stack,), (layer,), use_moe, s + (stack,))
  pieces.append(Piece("model.norm.weight", p + ("final_norm", "scale"), (), None, False))
  pieces.append(Piece("lm_head.weight", p + ("lm_head", "kernel"), (), None, True))
  for depth in range(m.num_nextn_predict_layers):
    prefix, mtp = f"model.layers.{m.num_hidden_layers + depth}", f"mtp_{depth}"
    for name, sub, transpose in (("enorm.weight", ("enorm", "scale"), False),
                                 ("hnorm.weight", ("hnorm", "scale"), False),
                                 ("eh_proj.weight", ("eh_proj", "kernel"), True),
                                 ("final_layernorm.weight", ("final_norm", "scale"), False)):
      pieces.append(Piece(f"{prefix}.{name}", p + (mtp,) + sub, (), None, transpose))
    pieces += _block_pieces(m, prefix, p + (mtp, "block"), (), True, s + (mtp, "block"))
  return pieces


def _piece_shape(piece: Piece, leaf_shape: tuple[int, ...]) -> tuple[int, ...]:
  """Returns the released shape of `piece` within a leaf of `leaf_shape`."""
  shape = list(leaf_shape[len(piece.index):])
  if piece.cols:
    shape[-1] = piece.cols[1] - piece.cols[0]
  if piece.transpose:
    shape[-2], shape[-1] = shape[-1], shape[-2]
  return tuple(shape)


def _piece_region(piece: Piece, leaf_shape: tuple[int, ...]) -> list[tuple[int, int]]:
  """Returns the [start, stop) range per axis that `piece` fills in its leaf."""
  region = [(i, i + 1) for i in piece.index]
  region += [(0, n) for n in leaf_shape[len(piece.index):]]
  if piece.cols:
    region[-1] = piece.cols
  return region


def abstract_variables(m: Any) -> dict:
  """Returns the ShapeDtypeStructs of `params` and `moe_state` for config `m`."""
  return jax.eval_shape(lambda rng: model_lib.init_variables(m, rng), jax.random.key(0))


# ---------------------------------------------------------------------------------------------
# Reading.
# ---------------------------------------------------------------------------------------------


def read_config(model_dir: str) -> dict:
  """Returns the `config.json` of a Hugging Face model directory."""
  path = os.path.join(model_dir, "config.json")
  if not os.path.exists(path):
    raise config_lib.ConfigError(f"{path} does not exist. Fix: point at a Hugging Face model "
                                 "directory (config.json plus safetensors).")
  with open(path) as f:
    return json.load(f)


def _check_shapes(m: Any, pieces: list[Piece], flat_shapes: dict, tensors) -> None:
  """Raises ConfigError naming the first released tensor whose stored shape is not expected."""
  for piece in pieces:
    want = _piece_shape(piece, flat_shapes[piece.path].shape)
    got = tensors.shape(piece.hf_name)
    if got != want:
      raise config_lib.ConfigError(
          f"tensor {piece.hf_name!r}: stored shape {list(got)}, but config.json "
          f"(hidden_size={m.hidden_size}, num_experts={m.num_experts}, ...) implies "
          f"{list(want)}. Fix: use the config.json that came with these weights.")


def _leaf_from_pieces(tensors, pieces: list[Piece], shape: tuple[int, ...],
                      dtype: np.dtype) -> Callable[[tuple[slice, ...]], np.ndarray]:
  """Returns a callback that builds any block (a tuple of slices) of one leaf from its pieces,
  reading only the released tensors that overlap the block."""

  def build(index: tuple[slice, ...]) -> np.ndarray:
    block = [(s.start or 0, shape[i] if s.stop is None else s.stop) for i, s in
             enumerate(index)] + [(0, n) for n in shape[len(index):]]
    out = np.empty([b - a for a, b in block], dtype)
    for piece in pieces:
      region = _piece_region(piece, shape)
      overlap = [(max(a, c), min(b, d)) for (a, b), (c, d) in zip(region, block)]
      if any(a >= b for a, b in overlap):
        continue
      value = tensors.read(piece.hf_name, dtype)
      if piece.transpose:
        value = value.T  # A view: the copy happens once, into `out`.
      value = value[(None,) * len(piece.index)]
      src = tuple(slice(a - r0, b - r0) for (a, b), (r0, _) in zip(overlap, region))
      dst = tuple(slice(a - b0, b - b0) for (a, b), (b0, _) in zip(overlap, block))
      out[dst] = value[src]
    return out

  return build


def load_hf(model_dir: str, *, dtype: str = "bfloat16", param_dtype: str | None = None,
            shardings: Any = None, progress: Callable[[str], None] | None = None
            ) -> tuple[ml_collections.ConfigDict, dict]:
  """Returns (model config, variables) of a Hugging Face Ling 2.0 directory (see iter_hf)."""
  m, leaves = iter_hf(model_dir, dtype=dtype, param_dtype=param_dtype, shardings=shardings,
                      progress=progress)
  return m, traverse_util.unflatten_dict(dict(leaves))


def iter_hf(model_dir: str, *, dtype: str = "bfloat16", param_dtype: str | None = None,
            shardings: Any = None, progress: Callable[[str], None] | None = None
            ) -> tuple[ml_collections.ConfigDict, Any]:
  """Returns the model config and a generator of (variable path, array), one leaf at a time.

  Each leaf is built tensor by tensor straight in `param_dtype` (default: the checkpoint's) and
  placed with its sharding (`shardings`: None for the default device, one Sharding for every
  leaf, or a tree of them like the variables); only the device blocks being built and one
  released tensor are on the host at a time. The fp32 expert bias stays fp32.
  """
  m = config_from_hf(read_config(model_dir), dtype=dtype, param_dtype=param_dtype)
  tensors = safetensors_io.SafetensorsDir(model_dir)
  abstract = abstract_variables(m)
  flat = traverse_util.flatten_dict(abstract)
  pieces = tensor_table(m)
  _check_shapes(m, pieces, flat, tensors)
  by_leaf: dict[tuple[str, ...], list[Piece]] = {}
  for piece in pieces:
    by_leaf.setdefault(piece.path, []).append(piece)
  missing = sorted("/".join(k) for k in flat if k not in by_leaf)
  if missing:
    raise AssertionError(f"tensor table misses our variables {missing}")
  if shardings is None or isinstance(shardings, jax.sharding.Sharding):
    default = shardings or jax.sharding.SingleDeviceSharding(jax.devices()[0])
    flat_shardings = {k: default for k in flat}
  else:
    flat_shardings = traverse_util.flatten_dict(shardings)

  def leaves():
    for n, (path, leaf) in enumerate(flat.items()):
      if progress:
        progress(f"[{n + 1}/{len(flat)}] {'/'.join(path)} {tuple(leaf.shape)} {leaf.dtype}")
      build = _leaf_from_pieces(tensors, by_leaf[path], leaf.shape, np.dtype(leaf.dtype))
      sharding = flat_shardings[path]
      if by_leaf[path][0].index and leaf.shape[0] > 1 and _slice_sharding(sharding):
        yield path, _put_stacked(build, leaf, sharding)
      else:
        yield path, jax.make_array_from_callback(leaf.shape, flat_shardings[path], build)

  return m, leaves()


def _put_stacked(build: Callable[[tuple[slice, ...]], np.ndarray], leaf: Any,
                 sharding: jax.sharding.Sharding) -> jax.Array:
  """Returns a stacked leaf (layers or experts first) filled one slice of its leading axis at a
  time into a buffer already in place, so the host holds one slice, never the whole leaf."""
  zeros, update = _buffer_fns(tuple(leaf.shape), np.dtype(leaf.dtype), sharding)
  block_sharding = _slice_sharding(sharding)
  buf = zeros()
  for i in range(leaf.shape[0]):
    buf = update(buf, jax.device_put(build((slice(i, i + 1),)), block_sharding), i)
  return buf


def _slice_sharding(sharding: jax.sharding.Sharding) -> jax.sharding.Sharding | None:
  """Returns the sharding of one leading-axis slice of a leaf, or None when the leading axis
  itself is split (then the leaf is built per device block instead)."""
  if isinstance(sharding, jax.sharding.SingleDeviceSharding):
    return sharding
  if isinstance(sharding, jax.sharding.NamedSharding) and (not sharding.spec
                                                           or sharding.spec[0] is None):
    return sharding
  return None


# ---------------------------------------------------------------------------------------------
# Writing.
# ---------------------------------------------------------------------------------------------


def save_hf(m: Any, variables: dict, model_dir: str, *, dtype: str | None = None,
            max_shard_bytes: int = 5 * 2**30,
            progress: Callable[[str], None] | None = None) -> list[str]:
  """Writes `variables` as a Hugging Face directory (config.json plus safetensors).

  Weights are written in `dtype` (default: each leaf's own), the expert bias always in fp32.
  Tensors are produced one at a time; each of our leaves is copied to the host at most once,
  while its tensors are written. Returns the safetensors file names.
  """
  os.makedirs(model_dir, exist_ok=True)
  flat = traverse_util.flatten_dict({k: v for k, v in variables.items() if k != moe.STATS})
  pieces = tensor_table(m)
  abstract = traverse_util.flatten_dict(abstract_variables(m))
  host: dict[tuple[str, ...], np.ndarray] = {}

  def producer(piece: Piece, out_dtype: np.dtype) -> Callable[[], np.ndarray]:
    def produce():
      if piece.path not in host:
        host.clear()  # Tensors come grouped by leaf, so one leaf is held at a time at most.
        leaf = flat[piece.path]
        host[piece.path] = np.asarray(jax.device_get(leaf() if callable(leaf) else leaf))
      value = host[piece.path][piece.index]
      if piece.cols:
        value = value[..., piece.cols[0]:piece.cols[1]]
      if piece.transpose:
        value = value.T
      return value.astype(out_dtype)
    return produce

  specs = []
  # Grouped by our leaf (the index maps every name to its shard, so order is free): each leaf
  # comes to the host once.
  for piece in sorted(pieces, key=lambda p: (p.path, p.index)):
    leaf = flat[piece.path] if not callable(flat[piece.path]) else abstract[piece.path]
    if piece.path[0] == moe.STATE:
      out_dtype = np.dtype(np.float32)
    else:
      out_dtype = np.dtype(config_lib.dtype_of(dtype)) if dtype else np.dtype(leaf.dtype)
    specs.append((piece.hf_name, _piece_shape(piece, leaf.shape), out_dtype,
                  producer(piece, out_dtype)))
  hf_config = config_to_hf(m)
  if dtype:
    hf_config["torch_dtype"] = dtype
  with open(os.path.join(model_dir, "config.json"), "w") as f:
    json.dump(hf_config, f, indent=2)
  return safetensors_io.write_dir(model_dir, specs, max_shard_bytes, progress)


# ---------------------------------------------------------------------------------------------
# Any pretrained checkpoint: HF directory, converted orbax params, or a training run.
# ---------------------------------------------------------------------------------------------

PARAMS_DIR = "params"  # Where `save_orbax` puts the variables, next to config.json.


def save_orbax(m: Any, variables: Any, out_dir: str,
               progress: Callable[[str], None] | None = None) -> None:
  """Writes variables (a tree, or an iterable of (path, array) as `iter_hf` yields) as orbax
  checkpoints `out_dir/params/<path>` (one per leaf, written and released one at a time, so a
  conversion never holds the whole model) plus the experiment config `out_dir/config.json`
  (the `mini` training settings with this model)."""
  import orbax.checkpoint as ocp

  from configs import ling2

  out_dir = os.path.abspath(out_dir)
  os.makedirs(out_dir, exist_ok=True)
  config = ling2.get_config("mini")
  config.model = m
  with open(os.path.join(out_dir, "config.json"), "w") as f:
    f.write(config.to_json_best_effort(indent=2))
  if isinstance(variables, dict):
    variables = traverse_util.flatten_dict(
        {k: v for k, v in variables.items() if k != moe.STATS}).items()
  with _checkpointer(abstract_variables(m)) as ckpt:
    for path, array in variables:
      if progress:
        progress(f"saving {'/'.join(path)}")
      ckpt.save(os.path.join(out_dir, PARAMS_DIR, ".".join(path)),
                args=ocp.args.StandardSave({"value": array}), force=True)
      del array


def _checkpointer(tree: Any):
  """Returns an orbax checkpointer that stages one leaf at a time (at least 0.25 GB): its
  default (96 GB in flight) lets a save or restore hold a second copy of the whole model."""
  import orbax.checkpoint as ocp
  largest = max(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))
  gb = max(largest / 1e9 * 1.01, 0.25)
  return ocp.Checkpointer(ocp.StandardCheckpointHandler(save_concurrent_gb=gb,
                                                        restore_concurrent_gb=gb))


def _abstract_with(m: Any, shardings: Any) -> dict:
  abstract = abstract_variables(m)
  if shardings is None:
    return abstract
  if isinstance(shardings, jax.sharding.Sharding):
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=shardings),
                        abstract)
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      abstract, shardings)


def is_hf_dir(path: str) -> bool:
  """Whether `path` holds a Hugging Face config.json (rather than one of our configs)."""
  config_path = os.path.join(path, "config.json")
  if not os.path.exists(config_path):
    return False
  with open(config_path) as f:
    return "model" not in json.load(f)


def load_pretrained(path: str, *, dtype: str | None = None, param_dtype: str | None = None,
                    shardings: Any = None, progress: Callable[[str], None] | None = None,
                    lazy: bool = False) -> tuple[ml_collections.ConfigDict, dict]:
  """Returns (model config, variables) of a pretrained checkpoint directory, whichever kind:

  - a Hugging Face directory (config.json with `model_type` bailing_moe, safetensors);
  - an orbax directory written by `save_orbax` / `experiments.convert` (config.json, params/);
  - a training run directory (config.json, checkpoints/): its newest intact checkpoint.

  `dtype` sets the activation dtype (default bf16 for HF, the run's for orbax); `param_dtype`
  the weights' (default: as stored). With `lazy`, the leaves of an orbax dir are functions that
  restore them (`save_hf` takes those, so orbax -> HF holds one leaf at a time).
  """
  path = os.path.abspath(path)
  if not os.path.isdir(path):
    raise config_lib.ConfigError(f"checkpoint path {path} is not a directory. Fix: pass a "
                                 "Hugging Face model dir, a converted orbax dir or a run dir.")
  config_path = os.path.join(path, "config.json")
  if not os.path.exists(config_path):
    raise config_lib.ConfigError(f"{config_path} does not exist. Fix: pass a directory with "
                                 "a config.json (HF, converted orbax, or a training run).")
  if is_hf_dir(path):
    return load_hf(path, dtype=dtype or "bfloat16", param_dtype=param_dtype,
                   shardings=shardings, progress=progress)
  with open(config_path) as f:
    config = ml_collections.ConfigDict(json.load(f))
  m = config.model
  stored_param_dtype = m.param_dtype
  if dtype:
    m.dtype = dtype
  import orbax.checkpoint as ocp

  if os.path.isdir(os.path.join(path, PARAMS_DIR)):
    if param_dtype:
      m.param_dtype = param_dtype
    abstract = traverse_util.flatten_dict(_abstract_with(m, shardings))
    ckpt = _checkpointer(abstract)

    def restore(leaf_path):
      restored = ckpt.restore(os.path.join(path, PARAMS_DIR, ".".join(leaf_path)),
                              args=ocp.args.StandardRestore({"value": abstract[leaf_path]}))
      return restored["value"]

    if lazy:
      return m, traverse_util.unflatten_dict(
          {k: functools.partial(restore, k) for k in abstract})
    return m, traverse_util.unflatten_dict({k: restore(k) for k in abstract})
  from ling_jax import checkpoint as checkpoint_lib
  from ling_jax import trainer

  m.param_dtype = stored_param_dtype
  with checkpoint_lib.Checkpointer(path, save_every=1, keep=1_000_000) as ckpt:
    restored = ckpt.restore_latest(trainer.abstract_state(config))
  if restored is None:
    raise config_lib.ConfigError(f"{path} holds no checkpoint. Fix: train first, or pass a "
                                 "converted or Hugging Face directory.")
  _, state, _ = restored
  variables = {"params": state.params, moe.STATE: state.moe_state}
  del state
  if param_dtype:
    m.param_dtype = param_dtype
    variables["params"] = jax.tree.map(
        lambda a: a.astype(config_lib.dtype_of(param_dtype)), variables["params"])
  return m, variables


def compute_logits(m: Any, variables: dict, ids_BL: Any, lengths_B: Any = None) -> jax.Array:
  """Returns next-token logits [B, L, V] (fp32) of a batch of token ids.

  Rows shorter than L are right-padded; pass their `lengths_B` so that padding is masked.
  """
  ids_BL = jnp.asarray(ids_BL, jnp.int32)
  batch, length = ids_BL.shape
  positions_BL = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
  if lengths_B is None:
    segment_ids_BL = jnp.ones_like(ids_BL)
  else:
    segment_ids_BL = (positions_BL < jnp.asarray(lengths_B)[:, None]).astype(jnp.int32)
  out, _ = _jitted_apply(m.to_json_best_effort())(variables, ids_BL, positions_BL,
                                                  segment_ids_BL)
  return out.logits_BLV


_JITTED: dict[str, Any] = {}


def _jitted_apply(key: str):
  if key not in _JITTED:
    m = ml_collections.ConfigDict(json.loads(key))
    _JITTED[key] = jax.jit(lambda v, *args: model_lib.apply(m, v, *args))
  return _JITTED[key]


@functools.cache
def _buffer_fns(shape: tuple[int, ...], dtype: np.dtype, sharding: jax.sharding.Sharding):
  """Returns jitted (zeros, in-place slice update) for one leaf shape, compiled once."""
  zeros = jax.jit(lambda: jnp.zeros(shape, dtype), out_shardings=sharding)
  update = jax.jit(lambda buf, block, i: jax.lax.dynamic_update_slice_in_dim(buf, block, i, 0),
                   out_shardings=sharding, donate_argnums=0)
  return zeros, update
