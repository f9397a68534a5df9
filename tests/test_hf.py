"""Tests for ling_jax/hf.py: the released Hugging Face layout of Ling 2.0.

- round trips (HF and orbax) are bitwise, and the written tensors carry the released names,
  shapes and dtypes of a table written here from the released modeling code;
- a model loaded from an HF directory matches a float64 NumPy forward pass that parses the
  safetensors files itself and follows the released module structure (with and without MTP);
- the released config.json of mini, flash and 1T map onto our variants (and parameter counts);
- a missing shard, a shape mismatch and an unknown config field fail naming the tensor/field.
"""

import functools
import json
import os

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from configs import ling2
from ling_jax import config as config_lib
from ling_jax import hf
from ling_jax import model
from ling_jax import params as params_lib
from tests.test_model_reference import _config
from tests.test_model_reference import _randomise
from tests.test_model_reference import route

# ---------------------------------------------------------------------------------------------
# The released layout, written from modeling_bailing_moe_v2.py (nn.Linear weights are [out, in]).
# ---------------------------------------------------------------------------------------------


def released_table(c: dict) -> dict[str, tuple[int, ...]]:
  """Returns {tensor name: shape} of a BailingMoeV2ForCausalLM with config.json `c`."""
  d, v, hd = c["hidden_size"], c["vocab_size"], c["head_dim"]
  nq, nkv, e, f = c["num_attention_heads"], c["num_key_value_heads"], c["num_experts"], \
      c["moe_intermediate_size"]
  table = {"model.word_embeddings.weight": (v, d), "model.norm.weight": (d,),
           "lm_head.weight": (v, d)}

  def block(prefix, use_moe):
    table.update({
        f"{prefix}.input_layernorm.weight": (d,),
        f"{prefix}.post_attention_layernorm.weight": (d,),
        f"{prefix}.attention.query_key_value.weight": ((nq + 2 * nkv) * hd, d),
        f"{prefix}.attention.query_layernorm.weight": (hd,),
        f"{prefix}.attention.key_layernorm.weight": (hd,),
        f"{prefix}.attention.dense.weight": (d, nq * hd)})
    if not use_moe:
      i = c["intermediate_size"]
      for name, shape in (("gate_proj", (i, d)), ("up_proj", (i, d)), ("down_proj", (d, i))):
        table[f"{prefix}.mlp.{name}.weight"] = shape
      return
    table[f"{prefix}.mlp.gate.weight"] = (e, d)
    table[f"{prefix}.mlp.gate.expert_bias"] = (e,)
    s = f * c["num_shared_experts"]
    for name, shape in (("gate_proj", (f, d)), ("up_proj", (f, d)), ("down_proj", (d, f))):
      for x in range(e):
        table[f"{prefix}.mlp.experts.{x}.{name}.weight"] = shape
    for name, shape in (("gate_proj", (s, d)), ("up_proj", (s, d)), ("down_proj", (d, s))):
      table[f"{prefix}.mlp.shared_experts.{name}.weight"] = shape

  for i in range(c["num_hidden_layers"]):
    block(f"model.layers.{i}", i >= c["first_k_dense_replace"])
  for depth in range(c["num_nextn_predict_layers"]):
    prefix = f"model.layers.{c['num_hidden_layers'] + depth}"
    table.update({f"{prefix}.enorm.weight": (d,), f"{prefix}.hnorm.weight": (d,),
                  f"{prefix}.eh_proj.weight": (d, 2 * d),
                  f"{prefix}.final_layernorm.weight": (d,)})
    block(prefix, True)
  return table


_ST_DTYPES = {"F32": np.float32, "BF16": ml_dtypes.bfloat16}


def read_safetensors_dir(model_dir: str) -> tuple[dict[str, np.ndarray], dict[str, str]]:
  """Parses every .safetensors file of a directory; returns tensors and their stored dtypes."""
  tensors, dtypes = {}, {}
  for name in sorted(os.listdir(model_dir)):
    if not name.endswith(".safetensors"):
      continue
    blob = open(os.path.join(model_dir, name), "rb").read()
    size = int.from_bytes(blob[:8], "little")
    header = json.loads(blob[8:8 + size])
    header.pop("__metadata__", None)
    for key, entry in header.items():
      begin, end = entry["data_offsets"]
      raw = np.frombuffer(blob[8 + size + begin:8 + size + end], _ST_DTYPES[entry["dtype"]])
      tensors[key] = raw.reshape(entry["shape"])
      dtypes[key] = entry["dtype"]
  return tensors, dtypes


# ---------------------------------------------------------------------------------------------
# A float64 NumPy forward pass over the released tensors.
# ---------------------------------------------------------------------------------------------


def _rms(x, w, eps):
  return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps) * w


def _silu(x):
  return x / (1 + np.exp(-x))


def _mlp(x, w, prefix):
  gate = x @ w[f"{prefix}.gate_proj.weight"].T
  up = x @ w[f"{prefix}.up_proj.weight"].T
  return (_silu(gate) * up) @ w[f"{prefix}.down_proj.weight"].T


def _rotate(x, positions, rotary_dim, theta):
  inv_freq = 1.0 / theta ** (np.arange(0, rotary_dim, 2) / rotary_dim)
  freqs = positions[..., None] * inv_freq  # [B, L, R/2]
  emb = np.concatenate([freqs, freqs], -1)[:, :, None]  # rotate-half layout, as released
  cos, sin = np.cos(emb), np.sin(emb)
  rot, rest = x[..., :rotary_dim], x[..., rotary_dim:]
  half = rotary_dim // 2
  rotated_half = np.concatenate([-rot[..., half:], rot[..., :half]], -1)
  return np.concatenate([rot * cos + rotated_half * sin, rest], -1)


def _layer(c, w, prefix, x, use_moe):
  """One BailingMoeV2DecoderLayer; x [B, L, D]."""
  eps, hd = c["rms_norm_eps"], c["head_dim"]
  nq, nkv = c["num_attention_heads"], c["num_key_value_heads"]
  batch, length, _ = x.shape
  h = _rms(x, w[f"{prefix}.input_layernorm.weight"], eps)
  qkv = (h @ w[f"{prefix}.attention.query_key_value.weight"].T).reshape(
      batch, length, nq + 2 * nkv, hd)
  q, k, v = qkv[:, :, :nq], qkv[:, :, nq:nq + nkv], qkv[:, :, nq + nkv:]
  q = _rms(q, w[f"{prefix}.attention.query_layernorm.weight"], eps)
  k = _rms(k, w[f"{prefix}.attention.key_layernorm.weight"], eps)
  rotary_dim = c.get("rotary_dim") or int(hd * c["partial_rotary_factor"])
  positions = np.broadcast_to(np.arange(length, dtype=np.float64), (batch, length))
  q, k = (_rotate(t, positions, rotary_dim, c["rope_theta"]) for t in (q, k))
  k, v = (np.repeat(t, nq // nkv, axis=2) for t in (k, v))
  scores = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(hd)
  scores = np.where(np.tril(np.ones((length, length), bool)), scores, -np.inf)
  probs = np.exp(scores - scores.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  attn = np.einsum("bhqk,bkhd->bqhd", probs, v).reshape(batch, length, nq * hd)
  x = x + attn @ w[f"{prefix}.attention.dense.weight"].T
  h = _rms(x, w[f"{prefix}.post_attention_layernorm.weight"], eps)
  if not use_moe:
    return x + _mlp(h, w, f"{prefix}.mlp")
  h_TD = h.reshape(-1, h.shape[-1])
  ids_TK, weights_TK, _ = route(_Cfg(c), h_TD, w[f"{prefix}.mlp.gate.weight"].T,
                                w[f"{prefix}.mlp.gate.expert_bias"])
  y_TD = _mlp(h_TD, w, f"{prefix}.mlp.shared_experts")
  for t in range(len(h_TD)):
    for expert, weight in zip(ids_TK[t], weights_TK[t]):
      y_TD[t] += weight * _mlp(h_TD[t], w, f"{prefix}.mlp.experts.{expert}")
  return x + y_TD.reshape(x.shape)


class _Cfg:
  """Attribute access to config.json fields, for the routing reference."""

  def __init__(self, c):
    self.__dict__.update(c)


def numpy_forward(c: dict, w: dict, ids_BL: np.ndarray):
  """Returns logits [B, L, V] and, when the config has an MTP layer, its logits [B, L, V]."""
  eps = c["rms_norm_eps"]
  embed = w["model.word_embeddings.weight"]
  x = embed[ids_BL]
  for i in range(c["num_hidden_layers"]):
    x = _layer(c, w, f"model.layers.{i}", x, i >= c["first_k_dense_replace"])
  h = _rms(x, w["model.norm.weight"], eps)
  logits = h @ w["lm_head.weight"].T
  if not c["num_nextn_predict_layers"]:
    return logits, None
  prefix = f"model.layers.{c['num_hidden_layers']}"
  next_ids = np.concatenate([ids_BL[:, 1:], np.zeros_like(ids_BL[:, :1])], 1)  # roll, fill 0
  mtp_in = np.concatenate([_rms(embed[next_ids], w[f"{prefix}.enorm.weight"], eps),
                           _rms(h, w[f"{prefix}.hnorm.weight"], eps)], -1)
  y = _layer(c, w, prefix, mtp_in @ w[f"{prefix}.eh_proj.weight"].T, True)
  y = _rms(y, w[f"{prefix}.final_layernorm.weight"], eps)
  return logits, y @ w["lm_head.weight"].T


# ---------------------------------------------------------------------------------------------
# Fixtures.
# ---------------------------------------------------------------------------------------------


def _tiny(mtp: int = 1, param_dtype: str = "float32"):
  m = _config("float32")
  m.num_nextn_predict_layers = mtp
  m.param_dtype = param_dtype
  return m


def _random_variables(m, seed=0, o1=True):
  """Random variables with a non-zero expert bias: O(1) weights as in the model reference test,
  or (o1=False) Ling's init distribution, normal with std 0.006 (norm scales 1 + that)."""
  shapes = jax.eval_shape(functools.partial(model.init_variables, m), jax.random.key(seed))
  rng = np.random.default_rng(seed)
  if o1:
    return jax.tree.map(jnp.asarray, _randomise(shapes, rng))

  def draw(path, leaf):
    value = rng.normal(0, m.initializer_range, leaf.shape)
    if path[-1].key == "scale":
      value += 1
    elif path[-1].key == "expert_bias":
      value *= 10
    return jnp.asarray(value, leaf.dtype)

  return jax.tree_util.tree_map_with_path(draw, shapes)


def _assert_bitwise(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    assert x.dtype == y.dtype and x.shape == y.shape
    np.testing.assert_array_equal(np.asarray(x).view(np.uint8), np.asarray(y).view(np.uint8))


@pytest.fixture(scope="module", params=[1, 0], ids=["mtp", "no_mtp"])
def written(request, tmp_path_factory):
  """A random tiny model written to an HF directory in fp32 (small shards, with an index)."""
  m = _tiny(mtp=request.param)
  variables = _random_variables(m)
  path = str(tmp_path_factory.mktemp("hf"))
  hf.save_hf(m, variables, path, max_shard_bytes=2**20)
  return m, variables, path


# ---------------------------------------------------------------------------------------------
# Tests.
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("param_dtype", ["float32", "bfloat16"])
def test_round_trip_is_bitwise_with_released_names(tmp_path, param_dtype):
  m = _tiny(param_dtype=param_dtype)
  variables = _random_variables(m, o1=False)
  files = hf.save_hf(m, variables, str(tmp_path), max_shard_bytes=2**20)
  assert len(files) > 1 and os.path.exists(tmp_path / "model.safetensors.index.json")
  with open(tmp_path / "config.json") as f:
    c = json.load(f)
  tensors, dtypes = read_safetensors_dir(str(tmp_path))
  table = released_table(c)
  assert set(tensors) == set(table)
  assert {k: tuple(v.shape) for k, v in tensors.items()} == table
  want = "F32" if param_dtype == "float32" else "BF16"
  assert dtypes == {k: "F32" if k.endswith("expert_bias") else want for k in table}
  with open(tmp_path / "model.safetensors.index.json") as f:
    assert set(json.load(f)["weight_map"]) == set(table)
  m2, loaded = hf.load_pretrained(str(tmp_path), dtype="float32")
  assert m2.param_dtype == param_dtype and m2.num_nextn_predict_layers == 1
  _assert_bitwise(variables, loaded)


def _reference_inputs(path):
  """Returns the written config.json, its tensors in float64, and a batch of token ids."""
  with open(os.path.join(path, "config.json")) as f:
    c = json.load(f)
  tensors, _ = read_safetensors_dir(path)
  w = {k: v.astype(np.float64) for k, v in tensors.items()}
  ids_BL = np.random.default_rng(1).integers(1, c["vocab_size"], (2, 10)).astype(np.int32)
  return c, w, ids_BL


def test_loaded_model_matches_numpy_reference(written):
  """fp32 logits (and MTP logits) of the loaded model against the float64 reference."""
  path = written[2]
  c, w, ids_BL = _reference_inputs(path)
  ref_logits, ref_mtp = numpy_forward(c, w, ids_BL)
  m_loaded, variables = hf.load_pretrained(path, dtype="float32")
  logits = np.asarray(hf.compute_logits(m_loaded, variables, ids_BL), np.float64)
  scale = np.abs(ref_logits).max()
  assert 1 < scale < 100
  np.testing.assert_allclose(logits, ref_logits, rtol=1e-5, atol=1e-5 * scale)
  if ref_mtp is not None:
    targets_BL = np.concatenate([ids_BL[:, 1:], np.zeros_like(ids_BL[:, :1])], 1)
    positions_BL = np.broadcast_to(np.arange(10, dtype=np.int32), ids_BL.shape)
    out, _ = jax.jit(lambda v, *a: model.apply(m_loaded, v, *a))(
        variables, ids_BL, positions_BL, np.ones_like(ids_BL), targets_BL)
    np.testing.assert_allclose(np.asarray(out.mtp_logits[0], np.float64), ref_mtp, rtol=1e-5,
                               atol=1e-5 * np.abs(ref_mtp).max())


def test_reference_catches_a_wrong_layout(written):
  """Swapping two experts' weights or q/k heads moves the reference logits far past 1e-5."""
  path = written[2]
  c, w, ids_BL = _reference_inputs(path)
  base, _ = numpy_forward(c, w, ids_BL)
  hd = c["head_dim"]
  for name, perturb in (
      ("model.layers.1.mlp.experts.0.up_proj.weight",
       lambda: w["model.layers.1.mlp.experts.0.gate_proj.weight"]),
      ("model.layers.0.attention.query_key_value.weight",
       lambda: np.roll(w["model.layers.0.attention.query_key_value.weight"], hd, axis=0))):
    saved = w[name]
    w[name] = perturb()
    moved, _ = numpy_forward(c, w, ids_BL)
    w[name] = saved
    assert np.abs(moved - base).max() > 1e-2 * np.abs(base).max(), name


def test_orbax_round_trip_and_sharded_load(written, tmp_path):
  m, variables, path = written
  hf.save_orbax(m, variables, str(tmp_path))
  m2, restored = hf.load_pretrained(str(tmp_path))
  assert m2.num_experts == m.num_experts
  _assert_bitwise(variables, restored)
  # Straight into a sharding: experts split over 8 devices, the embedding over the vocabulary.
  mesh = jax.make_mesh((8,), ("x",))

  def spec(path_, leaf):
    names = [p.key for p in path_]
    if names[-1] in ("wi_gate_up", "wo") and "moe_layers" in names:
      return NamedSharding(mesh, P(None, "x"))
    if names[-1] == "embedding":
      return NamedSharding(mesh, P("x", None))
    return NamedSharding(mesh, P())

  shardings = jax.tree_util.tree_map_with_path(spec, hf.abstract_variables(m))
  _, sharded = hf.load_hf(path, dtype="float32", shardings=shardings)
  wi = sharded["params"]["moe_layers"]["mlp"]["wi_gate_up"]
  assert wi.sharding.spec == P(None, "x") and wi.addressable_shards[0].data.shape[1] == 2
  _assert_bitwise(variables, sharded)


# The released config.json of the three models (fields as published; no weights needed).
_MINI = {
    "architectures": ["BailingMoeV2ForCausalLM"], "attention_dropout": 0.0,
    "auto_map": {"AutoConfig": "configuration_bailing_moe_v2.BailingMoeV2Config",
                 "AutoModel": "modeling_bailing_moe_v2.BailingMoeV2Model",
                 "AutoModelForCausalLM": "modeling_bailing_moe_v2.BailingMoeV2ForCausalLM"},
    "num_hidden_layers": 20, "hidden_size": 2048, "intermediate_size": 5120,
    "eos_token_id": 156892, "pad_token_id": 156892, "first_k_dense_replace": 1,
    "hidden_act": "silu", "max_position_embeddings": 32768, "model_type": "bailing_moe",
    "moe_intermediate_size": 512, "norm_topk_prob": True, "num_experts_per_tok": 8,
    "num_attention_heads": 16, "num_experts": 256, "num_key_value_heads": 4,
    "rope_theta": 600000, "rope_scaling": None, "tie_word_embeddings": False,
    "torch_dtype": "bfloat16", "transformers_version": "4.52.3", "use_bias": False,
    "use_rmsnorm": True, "rms_norm_eps": 1e-06, "head_dim": 128, "num_shared_experts": 1,
    "use_cache": True, "use_qkv_bias": False, "embedding_dropout": 0.0, "output_dropout": 0.0,
    "vocab_size": 157184, "partial_rotary_factor": 0.5, "router_dtype": "fp32",
    "moe_router_enable_expert_bias": True, "routed_scaling_factor": 2.5, "n_group": 8,
    "topk_group": 4, "use_qk_norm": True, "score_function": "sigmoid",
    "moe_shared_expert_intermediate_size": 512, "num_nextn_predict_layers": 0,
    "mtp_loss_scaling_factor": 0,
}
_FLASH = _MINI | {"num_hidden_layers": 32, "hidden_size": 4096, "intermediate_size": 9216,
                  "moe_intermediate_size": 1024, "num_attention_heads": 32,
                  "moe_shared_expert_intermediate_size": 1024}
_ONE_T = {k: v for k, v in _MINI.items() if k != "partial_rotary_factor"} | {
    "num_hidden_layers": 80, "hidden_size": 8192, "intermediate_size": 18432,
    "moe_intermediate_size": 2048, "num_attention_heads": 64, "num_key_value_heads": 8,
    "first_k_dense_replace": 4, "rotary_dim": 64, "moe_shared_expert_intermediate_size": 2048}


@pytest.mark.parametrize("variant,released,total", [
    ("mini", _MINI, 16_255_638_528), ("flash", _FLASH, 102_889_697_280),
    ("1t", _ONE_T, 999_705_309_184)])
def test_released_configs_map_onto_our_variants(variant, released, total):
  m = hf.config_from_hf(released)
  ours = ling2.model_config(variant)
  for field in ("num_hidden_layers", "hidden_size", "intermediate_size", "moe_intermediate_size",
                "num_attention_heads", "num_key_value_heads", "first_k_dense_replace",
                "num_experts", "num_experts_per_tok", "n_group", "topk_group", "head_dim",
                "vocab_size", "routed_scaling_factor", "rope_theta"):
    assert m[field] == ours[field], field
  assert config_lib.rotary_dim(m) == config_lib.rotary_dim(ours) == 64
  assert m.param_dtype == "bfloat16" and m.num_nextn_predict_layers == 0
  assert params_lib.count_params(m)["total"] == total
  again = hf.config_from_hf(hf.config_to_hf(m))
  assert again.to_dict() == m.to_dict()


def test_bad_checkpoints_name_the_tensor_or_field(written, tmp_path):
  m, _, path = written
  import shutil

  def copy():
    dst = tmp_path / f"copy{len(os.listdir(tmp_path))}"
    shutil.copytree(path, dst)
    return dst

  with open(os.path.join(path, "model.safetensors.index.json")) as f:
    weight_map = json.load(f)["weight_map"]
  missing = copy()
  shard = weight_map["model.layers.2.attention.dense.weight"]
  os.remove(missing / shard)
  with pytest.raises(config_lib.ConfigError, match=rf"tensor 'model\.[^']+': its shard .*"
                     rf"{shard} does not exist"):
    hf.load_pretrained(str(missing))

  for field, value, match in (
      ("intermediate_size", 192, r"tensor 'model\.layers\.0\.mlp\.gate_proj\.weight': stored "
       r"shape \[384, 128\], but .* implies \[192, 128\]"),
      ("use_magic_attention", True, r"config\.json field 'use_magic_attention': is unknown"),
      ("hidden_act", "gelu", r"config\.json field 'hidden_act': is 'gelu'")):
    bad = copy()
    with open(bad / "config.json") as f:
      c = json.load(f)
    c[field] = value
    with open(bad / "config.json", "w") as f:
      json.dump(c, f)
    with pytest.raises(config_lib.ConfigError, match=match):
      hf.load_pretrained(str(bad))
  with pytest.raises(config_lib.ConfigError, match="is not a directory"):
    hf.load_pretrained(str(tmp_path / "nowhere"))
