"""Golden test for ling_jax/model.py: the whole forward pass against a float64 NumPy reference.

The reference is written from ling2_spec.md sections 2-4 only (no JAX, a per-expert loop for the
MoE). It also returns, per token and MoE layer, the routing margin: how far the closest selection
(groups kept, experts picked) was from flipping. bf16 comparisons are restricted to positions whose
causal history inside their segment routed with a comfortable margin, since a near tie can flip
under bf16 rounding and legitimately change a token's output by O(1).

The batch's tokens are drawn so that (almost) no decision is near a tie.

Key: B batch, L length, D model dim, H query heads, K kv heads in attention and experts per token
in the router, d head dim, E experts, G groups, T tokens, V vocabulary, C candidates, n MoE blocks.
"""

import copy
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import ling2
from ling_jax import model

SEED = 0
# Expert-bias spread; sigmoid scores spread about 0.2, so this reorders many selections.
BIAS_STD = 0.15
# A routing decision closer than this (in biased-score units) may flip under bf16 activations.
BF16_MARGIN = 0.02


@pytest.fixture(autouse=True)
def _strict_rank_promotion():
  with jax.numpy_rank_promotion("raise"):
    yield


# ---------------------------------------------------------------------------------------------
# The float64 NumPy reference.
# ---------------------------------------------------------------------------------------------


def _tree_map(fn, tree):
  if isinstance(tree, dict):
    return {k: _tree_map(fn, v) for k, v in tree.items()}
  return fn(tree)


def _rms_norm(x, scale, eps):
  return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * scale


def _silu(x):
  return x / (1.0 + np.exp(-x))


def _sigmoid(x):
  return 1.0 / (1.0 + np.exp(-x))


def _swiglu(x, gate_up, down):
  width = gate_up.shape[-1] // 2
  h = x @ gate_up
  return (_silu(h[..., :width]) * h[..., width:]) @ down


def _rope(x_BLHd, positions_BL, rotary_dim, theta):
  """NeoX 'rotate half' on the first `rotary_dim` dims of each head."""
  half = rotary_dim // 2
  inv_freq = theta ** (-np.arange(0, rotary_dim, 2, dtype=np.float64) / rotary_dim)
  angle = positions_BL.astype(np.float64)[..., None] * inv_freq
  cos, sin = np.cos(angle)[:, :, None, :], np.sin(angle)[:, :, None, :]
  x1, x2 = x_BLHd[..., :half], x_BLHd[..., half:rotary_dim]
  return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin, x_BLHd[..., rotary_dim:]], -1)


def _attention(m, p, x_BLD, positions_BL, segments_BL):
  nq, nkv, hd = m.num_attention_heads, m.num_key_value_heads, m.head_dim
  rotary_dim = m.rotary_dim if m.get("rotary_dim") is not None else int(
      hd * m.partial_rotary_factor)
  batch, length, _ = x_BLD.shape
  qkv = x_BLD @ p["qkv"]["kernel"]
  q_BLHd = qkv[..., :nq * hd].reshape(batch, length, nq, hd)
  k_BLKd = qkv[..., nq * hd:(nq + nkv) * hd].reshape(batch, length, nkv, hd)
  v_BLKd = qkv[..., (nq + nkv) * hd:].reshape(batch, length, nkv, hd)
  if m.use_qk_norm:
    q_BLHd = _rms_norm(q_BLHd, p["q_norm"]["scale"], m.rms_norm_eps)
    k_BLKd = _rms_norm(k_BLKd, p["k_norm"]["scale"], m.rms_norm_eps)
  q_BLHd = _rope(q_BLHd, positions_BL, rotary_dim, m.rope_theta)
  k_BLKd = _rope(k_BLKd, positions_BL, rotary_dim, m.rope_theta)
  # GQA: query head i reads kv head i // (nq / nkv).
  k_BLHd = np.repeat(k_BLKd, nq // nkv, axis=2)
  v_BLHd = np.repeat(v_BLKd, nq // nkv, axis=2)
  idx = np.arange(length)
  allowed_BLL = ((idx[:, None] >= idx[None, :])[None]
                 & (segments_BL[:, :, None] == segments_BL[:, None, :]))
  scores_BHLL = np.einsum("blhd,bmhd->bhlm", q_BLHd, k_BLHd) / np.sqrt(hd)
  scores_BHLL = np.where(allowed_BLL[:, None], scores_BHLL, -np.inf)
  probs_BHLL = np.exp(scores_BHLL - scores_BHLL.max(-1, keepdims=True))
  probs_BHLL /= probs_BHLL.sum(-1, keepdims=True)
  out_BLHd = np.einsum("bhlm,bmhd->blhd", probs_BHLL, v_BLHd)
  return out_BLHd.reshape(batch, length, nq * hd) @ p["out"]["kernel"]


def route(m, x_TD, router_DE, bias_E):
  """Spec section 3 routing; returns expert ids [T, K], weights [T, K] and margins [T].

  The margin is the smallest gap, in biased-score units, between a kept and a dropped group score
  or between the last picked and the first unpicked eligible expert.
  """
  e, k, n_group, topk_group = (m.num_experts, m.num_experts_per_tok, m.n_group, m.topk_group)
  scores_TE = _sigmoid(x_TD @ router_DE)
  sel_TE = scores_TE + bias_E
  tokens = np.arange(len(x_TD))[:, None]
  group_TG = np.sort(sel_TE.reshape(-1, n_group, e // n_group), -1)[..., -2:].sum(-1)
  group_order_TG = np.argsort(-group_TG, -1, kind="stable")
  kept_TG = np.zeros(group_TG.shape, bool)
  kept_TG[tokens, group_order_TG[:, :topk_group]] = True
  masked_TE = np.where(np.repeat(kept_TG, e // n_group, axis=1), sel_TE, -np.inf)
  order_TE = np.argsort(-masked_TE, -1, kind="stable")
  ids_TK = order_TE[:, :k]
  w_TK = scores_TE[tokens, ids_TK]
  w_TK = w_TK / (w_TK.sum(-1, keepdims=True) + 1e-20) * m.routed_scaling_factor
  margins_T = np.full(len(x_TD), np.inf)
  if k < e:
    ranked_TE = masked_TE[tokens, order_TE]
    margins_T = ranked_TE[:, k - 1] - ranked_TE[:, k]  # inf when only k experts are eligible.
  if topk_group < n_group:
    ranked_TG = group_TG[tokens, group_order_TG]
    margins_T = np.minimum(margins_T, ranked_TG[:, topk_group - 1] - ranked_TG[:, topk_group])
  return ids_TK, w_TK, margins_T


def _moe(m, p, bias_E, x_TD):
  ids_TK, w_TK, margins_T = route(m, x_TD, p["router"], bias_E)
  y_TD = _swiglu(x_TD, p["shared_experts"]["gate_up"]["kernel"],
                 p["shared_experts"]["down"]["kernel"])
  for expert in range(m.num_experts):
    tokens, slot = np.nonzero(ids_TK == expert)
    if tokens.size:
      out = _swiglu(x_TD[tokens], p["wi_gate_up"][expert], p["wo"][expert])
      y_TD[tokens] += w_TK[tokens, slot][:, None] * out
  return y_TD, margins_T, ids_TK


def _decoder_layer(m, p, bias_E, x_BLD, positions_BL, segments_BL):
  """One pre-norm block; `bias_E=None` selects the dense SwiGLU. Also returns the routing."""
  eps = m.rms_norm_eps
  h_BLD = x_BLD + _attention(m, p["attention"], _rms_norm(x_BLD, p["input_norm"]["scale"], eps),
                             positions_BL, segments_BL)
  ffn_in_BLD = _rms_norm(h_BLD, p["post_attention_norm"]["scale"], eps)
  if bias_E is None:
    return h_BLD + _swiglu(ffn_in_BLD, p["mlp"]["gate_up"]["kernel"],
                           p["mlp"]["down"]["kernel"]), None
  ffn_TD, margins_T, ids_TK = _moe(m, p["mlp"], bias_E, ffn_in_BLD.reshape(-1, m.hidden_size))
  batch, length, _ = h_BLD.shape
  return (h_BLD + ffn_TD.reshape(h_BLD.shape),
          (margins_T.reshape(batch, length), ids_TK.reshape(batch, length, -1)))


def reference_forward(m, params, moe_state, inputs_BL, positions_BL, segments_BL, targets_BL):
  """The whole model in float64 NumPy; params and moe_state are nested dicts of float64 arrays.

  Returns next-token logits [B, L, V], depth-1 MTP logits [B, L, V], and for the n MoE blocks
  (trunk layers, then the MTP block) the routing margins [B, L, n] and expert ids [B, L, n, K].
  """
  eps = m.rms_norm_eps
  embed_VD = params["embed"]["embedding"]
  x_BLD = embed_VD[inputs_BL]
  routing = []
  for layer in range(m.num_hidden_layers):
    if layer < m.first_k_dense_replace:
      p = _tree_map(lambda a, i=layer: a[i], params["dense_layers"])
      x_BLD, _ = _decoder_layer(m, p, None, x_BLD, positions_BL, segments_BL)
    else:
      i = layer - m.first_k_dense_replace
      p = _tree_map(lambda a, i=i: a[i], params["moe_layers"])
      bias_E = moe_state["moe_layers"]["mlp"]["expert_bias"][i]
      x_BLD, layer_routing = _decoder_layer(m, p, bias_E, x_BLD, positions_BL, segments_BL)
      routing.append(layer_routing)
  h_main_BLD = _rms_norm(x_BLD, params["final_norm"]["scale"], eps)
  lm_head_DV = params["lm_head"]["kernel"]
  logits_BLV = h_main_BLD @ lm_head_DV

  # MTP depth 1: position t combines the trunk state with the embedding of token t + 1.
  mtp = params["mtp_0"]
  h_BL2D = np.concatenate([_rms_norm(embed_VD[targets_BL], mtp["enorm"]["scale"], eps),
                           _rms_norm(h_main_BLD, mtp["hnorm"]["scale"], eps)], -1)
  h_BLD, layer_routing = _decoder_layer(
      m, mtp["block"], moe_state["mtp_0"]["block"]["mlp"]["expert_bias"],
      h_BL2D @ mtp["eh_proj"]["kernel"], positions_BL, segments_BL)
  routing.append(layer_routing)
  mtp_logits_BLV = _rms_norm(h_BLD, mtp["final_norm"]["scale"], eps) @ lm_head_DV
  margins, ids = zip(*routing)
  return logits_BLV, mtp_logits_BLV, np.stack(margins, -1), np.stack(ids, 2)


def _float64(tree):
  return _tree_map(lambda a: np.asarray(a, np.float64), tree)


# ---------------------------------------------------------------------------------------------
# Fixtures: random weights with O(1) activations, a non-zero bias, a packed batch.
# ---------------------------------------------------------------------------------------------


def _config(dtype="float32"):
  m = ling2.model_config("tiny")
  m.dtype = dtype
  return m


def _randomise(tree, rng, path=()):
  """Replaces every initial value: O(1) activations, sigmoid router scores spread over (0, 1)."""
  if isinstance(tree, dict):
    return {k: _randomise(v, rng, path + (k,)) for k, v in tree.items()}
  shape = tree.shape
  if path[-1] == "scale":
    value = 1.0 + 0.1 * rng.standard_normal(shape)
  elif path[-1] == "embedding":
    value = rng.standard_normal(shape)
  elif path[-1] == "expert_bias":
    value = BIAS_STD * rng.standard_normal(shape)
  else:  # A kernel [..., in, out]: unit-variance outputs for unit-variance inputs.
    value = rng.standard_normal(shape) / np.sqrt(shape[-2])
  return np.asarray(value, tree.dtype)


def _next_tokens(inputs_BL, segments_BL):
  """MTP targets: the next token inside the same document, 0 after a document's last token."""
  next_BL = np.concatenate([inputs_BL[:, 1:], np.zeros_like(inputs_BL[:, :1])], 1)
  same_BL = np.concatenate([segments_BL[:, 1:], np.zeros_like(segments_BL[:, :1])], 1)
  return np.where(same_BL == segments_BL, next_BL, 0)


def _comfortable_tokens(m, params, moe_state, positions_BL, segments_BL, rng):
  """Draws each document left to right so that every routing decision clears BF16_MARGIN.

  Routing at position t depends on the document's tokens <= t (trunk) and t + 1 (MTP), so each
  new token is drawn among a few candidates to keep its own trunk decisions, the previous
  position's MTP decisions and, at a document's end, its own MTP decisions clear of ties.
  Positions where no candidate clears are left to the safe-position mask.
  """
  num_candidates = 16
  inputs_BL = np.zeros(segments_BL.shape, np.int32)
  for b, t in zip(*np.nonzero(segments_BL)):
    doc = np.flatnonzero(segments_BL[b] == segments_BL[b, t])
    start, last = doc[0], t == doc[-1]
    rows_CL = np.repeat(inputs_BL[b:b + 1, start:t + 1], num_candidates, 0)
    rows_CL[:, -1] = rng.integers(1, m.vocab_size, num_candidates)
    seg_CL = np.repeat(segments_BL[b:b + 1, start:t + 1], num_candidates, 0)
    _, _, margins_CLn, _ = reference_forward(
        m, params, moe_state, rows_CL, np.repeat(positions_BL[b:b + 1, start:t + 1],
                                                 num_candidates, 0),
        seg_CL, _next_tokens(rows_CL, seg_CL))
    worst_C = margins_CLn[:, -1, :-1 if not last else None].min(-1)
    if t > start:
      worst_C = np.minimum(worst_C, margins_CLn[:, -2, -1])
    ok = np.flatnonzero(worst_C >= BF16_MARGIN)
    inputs_BL[b, t] = rows_CL[ok[0] if ok.size else np.argmax(worst_C), -1]
  return inputs_BL


@pytest.fixture(scope="module")
def setup():
  """Random weights and bias, and two packed rows of 24 tokens with their reference outputs."""
  m = _config("float32")
  shapes = jax.eval_shape(functools.partial(model.init_variables, m), jax.random.PRNGKey(SEED))
  rng = np.random.default_rng(SEED)
  params = _randomise(shapes["params"], rng)
  moe_state = _randomise(shapes["moe_state"], rng)
  params64, moe_state64 = _float64(params), _float64(moe_state)
  # Row 0 packs two documents (positions restart), row 1 is one document then padding.
  segments_BL = np.array([[1] * 10 + [2] * 14, [1] * 20 + [0] * 4], np.int32)
  positions_BL = np.array([list(range(10)) + list(range(14)), list(range(20)) + [0] * 4],
                          np.int32)
  inputs_BL = _comfortable_tokens(m, params64, moe_state64, positions_BL, segments_BL, rng)
  targets_BL = _next_tokens(inputs_BL, segments_BL)
  batch = (inputs_BL, positions_BL, segments_BL, targets_BL)
  return {
      "variables": {"params": params, "moe_state": moe_state},
      "variables64": (params64, moe_state64),
      "batch": batch,
      "ref": reference_forward(m, params64, moe_state64, *batch),
  }


def _model_outputs(dtype, variables, batch):
  """Runs the jitted model; returns logits, MTP logits (float64) and the expert counts [n, E]."""
  m = _config(dtype)
  out, stats = jax.jit(lambda v, *args: model.apply(m, v, *args))(
      variables, *(jnp.asarray(a) for a in batch))
  counts_nE = np.concatenate([np.asarray(stats["moe_layers"]["mlp"]["counts"]),
                              np.asarray(stats["mtp_0"]["block"]["mlp"]["counts"])[None]])
  return (np.asarray(out.logits_BLV, np.float64), np.asarray(out.mtp_logits[0], np.float64),
          counts_nE)


def _reference_counts(m, ids_BLnK, segments_BL):
  ids_TnK = ids_BLnK[segments_BL != 0]
  return np.stack([np.bincount(ids_TnK[:, i].ravel(), minlength=m.num_experts)
                   for i in range(ids_TnK.shape[1])])


def _safe_positions(margins_BLn, segments_BL):
  """Non-padding positions whose same-segment causal history never routed within BF16_MARGIN.

  A near tie may flip under bf16 and change that token's output by O(1); attention then carries
  the change to every later token of the segment.
  """
  unsafe_BL = (margins_BLn < BF16_MARGIN).any(-1)
  safe_BL = np.zeros_like(unsafe_BL)
  for b, t in zip(*np.nonzero(segments_BL)):
    history = segments_BL[b, :t + 1] == segments_BL[b, t]
    safe_BL[b, t] = not unsafe_BL[b, :t + 1][history].any()
  return safe_BL


def _bf16_close(got, want):
  """Whether bf16-activation logits agree with the float64 ones up to bf16 rounding.

  bf16 keeps 8 mantissa bits; a few dozen roundings in sequence stay within 4% of the logit scale
  (measured: about 1.4%), while a wrong expert, weight or bias moves logits by 50% or more.
  """
  return (np.abs(got - want).max() <= 0.04 * np.abs(want).max()
          and np.corrcoef(got.ravel(), want.ravel())[0, 1] > 0.999)


# ---------------------------------------------------------------------------------------------
# Tests.
# ---------------------------------------------------------------------------------------------


def test_reference_is_well_conditioned(setup):
  """O(1) logits, most experts in use, routing decisions clear of ties almost everywhere."""
  logits_BLV, mtp_BLV, margins_BLn, ids_BLnK = setup["ref"]
  segments_BL = setup["batch"][2]
  valid = segments_BL != 0
  assert 0.3 < logits_BLV[valid].std() < 30 and 0.3 < mtp_BLV[valid].std() < 30
  used_n = (_reference_counts(_config("float32"), ids_BLnK, segments_BL) > 0).sum(-1)
  assert (used_n >= 12).all(), used_n  # Of 16 experts, in every MoE block.
  safe = _safe_positions(margins_BLn, segments_BL)
  assert safe.sum() >= 0.8 * valid.sum(), f"{safe.sum()} of {valid.sum()} positions are safe"


def test_fp32_matches_reference(setup):
  ref_logits, ref_mtp, _, ref_ids = setup["ref"]
  logits, mtp, counts_nE = _model_outputs("float32", setup["variables"], setup["batch"])
  valid = setup["batch"][2] != 0
  # fp32 sums over at most 384 terms through 5 blocks: about 1e-6 relative; 1e-4 is headroom.
  for got, want in ((logits, ref_logits), (mtp, ref_mtp)):
    scale = np.abs(want[valid]).max()
    np.testing.assert_allclose(got[valid], want[valid], rtol=1e-4, atol=1e-4 * scale)
  np.testing.assert_array_equal(
      counts_nE, _reference_counts(_config("float32"), ref_ids, setup["batch"][2]))


def test_bf16_matches_reference(setup):
  ref_logits, ref_mtp, margins, ref_ids = setup["ref"]
  logits, mtp, counts_nE = _model_outputs("bfloat16", setup["variables"], setup["batch"])
  segments_BL = setup["batch"][2]
  safe = _safe_positions(margins, segments_BL)
  assert _bf16_close(logits[safe], ref_logits[safe])
  assert _bf16_close(mtp[safe], ref_mtp[safe])
  if safe.sum() == (segments_BL != 0).sum():  # No near tie anywhere: routing must agree exactly.
    np.testing.assert_array_equal(
        counts_nE, _reference_counts(_config("bfloat16"), ref_ids, segments_BL))


def _perturbed_reference(setup, perturb):
  params64, moe_state64 = copy.deepcopy(setup["variables64"])
  perturb(params64, moe_state64)
  return reference_forward(_config("float32"), params64, moe_state64, *setup["batch"])


def _zero_bias(params, moe_state):
  del params
  moe_state["moe_layers"]["mlp"]["expert_bias"][:] = 0
  moe_state["mtp_0"]["block"]["mlp"]["expert_bias"][:] = 0


def _swap_two_experts(params, moe_state):
  del moe_state
  for mlp in (params["moe_layers"]["mlp"], params["mtp_0"]["block"]["mlp"]):
    for name in ("wi_gate_up", "wo"):
      mlp[name][..., [0, 1], :, :] = mlp[name][..., [1, 0], :, :]


def _no_routed_scaling(params, moe_state):
  del moe_state  # As if routed_scaling_factor were dropped.
  for mlp in (params["moe_layers"]["mlp"], params["mtp_0"]["block"]["mlp"]):
    mlp["wo"] /= 2.5


@pytest.mark.parametrize("perturb", [_zero_bias, _swap_two_experts, _no_routed_scaling])
def test_checks_catch_a_wrong_moe(setup, perturb):
  """Each perturbation of the reference fails the bf16 check (hence the much tighter fp32 one)."""
  ref_logits, ref_mtp, margins, _ = setup["ref"]
  logits, mtp, _, _ = _perturbed_reference(setup, perturb)
  safe = _safe_positions(margins, setup["batch"][2])
  assert not (_bf16_close(logits[safe], ref_logits[safe])
              and _bf16_close(mtp[safe], ref_mtp[safe]))
