"""Tests for kernels/dispatch.py: permutation, and the expert FFN against per-expert loops.

Key: T tokens, K experts per token, M = T * K copies, D model dim, E experts, F expert width.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels import dispatch


def _routing(seed, t, k, e):
  """Distinct experts per token (as the router picks them) and positive weights."""
  rng = np.random.default_rng(seed)
  ids_TK = np.stack([rng.choice(e, k, replace=False) for _ in range(t)]).astype(np.int32)
  weights_TK = rng.uniform(0.1, 1.0, (t, k)).astype(np.float32)
  return ids_TK, weights_TK


def _ffn_inputs(seed, t, d, e, f):
  rng = np.random.default_rng(seed)
  x_TD = rng.standard_normal((t, d)).astype(np.float32)
  w_gate_up_EDF2 = (rng.standard_normal((e, d, 2 * f)) / np.sqrt(d)).astype(np.float32)
  w_down_EFD = (rng.standard_normal((e, f, d)) / np.sqrt(f)).astype(np.float32)
  return x_TD, w_gate_up_EDF2, w_down_EFD


def _np_expert_ffn(x_TD, ids_TK, weights_TK, w_gate_up_EDF2, w_down_EFD):
  """Float64 per-expert loop: each expert runs its tokens, weighted, summed into their rows."""
  x_TD, weights_TK = np.float64(x_TD), np.float64(weights_TK)
  w_gate_up_EDF2, w_down_EFD = np.float64(w_gate_up_EDF2), np.float64(w_down_EFD)
  f = w_down_EFD.shape[1]
  y_TD = np.zeros_like(x_TD)
  for e in range(w_gate_up_EDF2.shape[0]):
    tokens, slots = np.nonzero(ids_TK == e)
    h = x_TD[tokens] @ w_gate_up_EDF2[e]
    gate, up = h[:, :f], h[:, f:]
    out = (gate / (1 + np.exp(-gate)) * up) @ w_down_EFD[e]
    np.add.at(y_TD, tokens, weights_TK[tokens, slots][:, None] * out)
  return y_TD


def _dense_expert_ffn_jax(x_TD, ids_TK, weights_TK, w_gate_up_EDF2, w_down_EFD):
  """Every expert on every token, masked by its routing weight: autodiff-able, plainly right."""
  f = w_down_EFD.shape[1]
  y_TD = jnp.zeros_like(x_TD)
  for e in range(w_gate_up_EDF2.shape[0]):
    weight_T = jnp.sum(jnp.where(ids_TK == e, weights_TK, 0.0), axis=1)
    h_TF2 = x_TD @ w_gate_up_EDF2[e]
    out_TD = (jax.nn.silu(h_TF2[:, :f]) * h_TF2[:, f:]) @ w_down_EFD[e]
    y_TD = y_TD + weight_T[:, None] * out_TD
  return y_TD


def test_permute_hand_worked():
  ids_TK = jnp.asarray([[1, 0], [0, 2], [1, 2]], jnp.int32)
  x_TD = jnp.arange(3 * 2, dtype=jnp.float32).reshape(3, 2)
  x_MD, sizes_E, sort_idx_M = dispatch.permute(x_TD, ids_TK, num_experts=4)
  # Flattened (token, slot) ids are [1, 0, 0, 2, 1, 2]; a stable sort keeps ties in token order.
  np.testing.assert_array_equal(sort_idx_M, [1, 2, 0, 4, 3, 5])
  np.testing.assert_array_equal(sizes_E, [2, 2, 2, 0])
  np.testing.assert_array_equal(x_MD, np.asarray(x_TD)[[0, 1, 0, 2, 1, 2]])
  chex.assert_type([sizes_E, sort_idx_M], jnp.int32)


def test_permute_pads_groups_through_the_routing_map():
  """group_align=4: each expert's copies, then zero rows up to a multiple of 4; unused padding
  and dropped slots (id E) last. Padding changes neither the output nor the gradients."""
  ids_TK = jnp.asarray([[0, 2], [2, 3], [0, 4], [4, 2], [1, 0]], jnp.int32)  # E = 4: 4 drops
  x_TD = jnp.arange(5 * 2, dtype=jnp.float32).reshape(5, 2) + 1
  x_MD, sizes_E, sort_idx_M = dispatch.permute(x_TD, ids_TK, 4, group_align=4)
  # 10 copies + 4 * 3 padding slots = 22, rounded up to 24 rows; copy c is token c // 2.
  tok = [0, 2, 4, -1, 4, -1, -1, -1, 0, 1, 3, -1, 1, -1, -1, -1, 2, 3] + [-1] * 6
  np.testing.assert_array_equal(sizes_E, [4, 4, 4, 4])
  sort_idx_M = np.asarray(sort_idx_M)
  np.testing.assert_array_equal(np.where(sort_idx_M < 10, sort_idx_M // 2, -1), tok)
  assert sorted(sort_idx_M) == list(range(24))
  want_MD = np.where(np.asarray(tok)[:, None] >= 0, np.asarray(x_TD)[np.asarray(tok)], 0.0)
  np.testing.assert_array_equal(x_MD, want_MD)
  weights_TK = jnp.asarray([[0.5, 1.0], [2.0, 0.25], [1.5, 3.0], [1.0, 0.5], [0.75, 2.5]])
  scale_MD = jnp.asarray(np.random.default_rng(0).standard_normal((10, 2)), jnp.float32)

  def loss(x_TD, weights_TK, align):
    x_MD, _, sort_idx_M = dispatch.permute(x_TD, ids_TK, 4, group_align=align)
    # Each copy gets its own factor, so a mix-up between rows shows.
    y_MD = jnp.tanh(x_MD * jnp.concatenate([scale_MD, jnp.ones((14, 2))])[sort_idx_M])
    return jnp.sum(dispatch.unpermute(y_MD, sort_idx_M, weights_TK) ** 2)
  value_and_grad = jax.jit(jax.value_and_grad(loss, (0, 1)), static_argnums=2)
  chex.assert_trees_all_close(value_and_grad(x_TD, weights_TK, 4),
                              value_and_grad(x_TD, weights_TK, 1), rtol=1e-6)


def test_permute_random_is_sorted_and_complete():
  t, k, e, d = 50, 4, 12, 3
  ids_TK, _ = _routing(0, t, k, e)
  x_TD = jnp.asarray(np.random.default_rng(1).standard_normal((t, d)), jnp.float32)
  x_MD, sizes_E, sort_idx_M = dispatch.permute(x_TD, jnp.asarray(ids_TK), e)
  chex.assert_shape([x_MD, sizes_E, sort_idx_M], [(t * k, d), (e,), (t * k,)])
  sorted_ids = ids_TK.reshape(-1)[np.asarray(sort_idx_M)]
  assert np.all(np.diff(sorted_ids) >= 0)
  np.testing.assert_array_equal(np.sort(sort_idx_M), np.arange(t * k))
  np.testing.assert_array_equal(sizes_E, np.bincount(ids_TK.reshape(-1), minlength=e))
  np.testing.assert_array_equal(x_MD, np.asarray(x_TD)[np.asarray(sort_idx_M) // k])


def test_unpermute_inverts_permute():
  t, k, e, d = 40, 3, 8, 5
  ids_TK, weights_TK = _routing(2, t, k, e)
  x_TD = jnp.asarray(np.random.default_rng(3).standard_normal((t, d)), jnp.float32)
  x_MD, _, sort_idx_M = dispatch.permute(x_TD, jnp.asarray(ids_TK), e)
  y_TD = dispatch.unpermute(x_MD, sort_idx_M, jnp.asarray(weights_TK))
  np.testing.assert_allclose(y_TD, x_TD * weights_TK.sum(1, keepdims=True), rtol=1e-6)


def test_permute_unpermute_gradients_match_plain_gathers():
  """The custom VJPs (gathers by the inverse permutation) against autodiff of plain gathers."""
  t, k, e, d = 30, 4, 6, 5
  ids_TK, weights_TK = _routing(4, t, k, e)
  rng = np.random.default_rng(5)
  x_TD = jnp.asarray(rng.standard_normal((t, d)), jnp.float32)
  scale_MD = jnp.asarray(rng.standard_normal((t * k, d)), jnp.float32)
  dout_TD = jnp.asarray(rng.standard_normal((t, d)), jnp.float32)
  ids_TK, weights_TK = jnp.asarray(ids_TK), jnp.asarray(weights_TK)
  sort_idx_M = dispatch.permute(x_TD, ids_TK, e)[2]

  def ours(x_TD, weights_TK):
    x_MD = dispatch.permute(x_TD, ids_TK, e)[0]
    return dispatch.unpermute(jnp.tanh(x_MD * scale_MD), sort_idx_M, weights_TK)

  def plain(x_TD, weights_TK):
    y_MD = jnp.tanh(x_TD[sort_idx_M // k] * scale_MD)
    y_TKD = jnp.zeros((t * k, d)).at[sort_idx_M].set(y_MD).reshape(t, k, d)
    return jnp.einsum("tkd,tk->td", y_TKD, weights_TK)

  for fn in (ours, jax.jit(ours)):
    out, vjp = jax.vjp(fn, x_TD, weights_TK)
    out_ref, vjp_ref = jax.vjp(plain, x_TD, weights_TK)
    np.testing.assert_allclose(out, out_ref, rtol=1e-6, atol=1e-6)
    for a, b in zip(vjp(dout_TD), vjp_ref(dout_TD), strict=True):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("use_jit", [True, False], ids=["jit", "eager"])
def test_expert_ffn_matches_per_expert_loop(use_jit):
  t, k, e, d, f = 48, 4, 8, 16, 12
  ids_TK, weights_TK = _routing(6, t, k, e)
  x_TD, w_gate_up_EDF2, w_down_EFD = _ffn_inputs(7, t, d, e, f)
  fn = jax.jit(dispatch.expert_ffn) if use_jit else dispatch.expert_ffn
  y_TD = fn(x_TD, ids_TK, weights_TK, w_gate_up_EDF2, w_down_EFD)
  chex.assert_shape(y_TD, (t, d))
  chex.assert_type(y_TD, jnp.float32)
  y_ref = _np_expert_ffn(x_TD, ids_TK, weights_TK, w_gate_up_EDF2, w_down_EFD)
  np.testing.assert_allclose(y_TD, y_ref, rtol=1e-5, atol=1e-5)


def test_expert_ffn_skewed_routing_leaves_experts_empty():
  """All tokens on 2 of 16 experts: empty groups must not disturb the others."""
  t, k, e, d, f = 40, 2, 16, 8, 8
  ids_TK = np.tile(np.asarray([[11, 3]], np.int32), (t, 1))
  weights_TK = np.random.default_rng(8).uniform(0.1, 1.0, (t, k)).astype(np.float32)
  x_TD, w_gate_up_EDF2, w_down_EFD = _ffn_inputs(9, t, d, e, f)
  y_TD = jax.jit(dispatch.expert_ffn)(x_TD, ids_TK, weights_TK, w_gate_up_EDF2, w_down_EFD)
  y_ref = _np_expert_ffn(x_TD, ids_TK, weights_TK, w_gate_up_EDF2, w_down_EFD)
  np.testing.assert_allclose(y_TD, y_ref, rtol=1e-5, atol=1e-5)


def test_expert_ffn_bf16_matches_fp32_loop():
  t, k, e, d, f = 64, 4, 8, 32, 16
  ids_TK, weights_TK = _routing(10, t, k, e)
  bf16 = lambda a: jnp.asarray(a, jnp.bfloat16)
  x_TD, w_gate_up_EDF2, w_down_EFD = map(bf16, _ffn_inputs(11, t, d, e, f))
  y_TD = jax.jit(dispatch.expert_ffn)(x_TD, ids_TK, weights_TK, w_gate_up_EDF2, w_down_EFD)
  chex.assert_type(y_TD, jnp.bfloat16)
  y_ref = _np_expert_ffn(x_TD, ids_TK, weights_TK, w_gate_up_EDF2, w_down_EFD)
  # The hidden activations are rounded to bf16 twice on the way (as in training).
  scale = np.abs(y_ref).max()
  np.testing.assert_allclose(np.float32(y_TD), y_ref, rtol=3e-2, atol=3e-2 * scale)


def test_expert_ffn_gradients_match_dense_loop():
  t, k, e, d, f = 32, 4, 8, 12, 8
  ids_TK, weights_TK = _routing(12, t, k, e)
  x_TD, w_gate_up_EDF2, w_down_EFD = _ffn_inputs(13, t, d, e, f)
  dout_TD = np.random.default_rng(14).standard_normal((t, d)).astype(np.float32)
  ids_TK = jnp.asarray(ids_TK)

  def grads(ffn):
    loss = lambda *params: jnp.sum(ffn(params[0], ids_TK, *params[1:]) * dout_TD)
    return jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))(
        x_TD, weights_TK, w_gate_up_EDF2, w_down_EFD)

  ours = grads(dispatch.expert_ffn)
  ref = grads(_dense_expert_ffn_jax)
  for name, a, b in zip(("x", "weights", "w_gate_up", "w_down"), ours, ref, strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5, err_msg=name)


def test_expert_ffn_ragged_dot_backend_agrees():
  t, k, e, d, f = 24, 2, 4, 8, 8
  ids_TK, weights_TK = _routing(15, t, k, e)
  inputs = _ffn_inputs(16, t, d, e, f)
  args = (inputs[0], ids_TK, weights_TK, *inputs[1:])
  np.testing.assert_allclose(
      dispatch.expert_ffn(*args, backend="ragged_dot"),
      dispatch.expert_ffn(*args, backend="reference"), rtol=1e-5, atol=1e-6)


def _all_eqns(jaxpr):
  for eqn in jaxpr.eqns:
    yield eqn
    for param in eqn.params.values():
      for sub in param if isinstance(param, (tuple, list)) else (param,):
        sub = getattr(sub, "jaxpr", sub)
        if hasattr(sub, "eqns"):
          yield from _all_eqns(sub)


def test_expert_ffn_never_builds_an_experts_by_copies_array():
  t, k, e, d, f = 64, 8, 64, 16, 8
  ids_TK, weights_TK = _routing(17, t, k, e)
  x_TD, w_gate_up_EDF2, w_down_EFD = _ffn_inputs(18, t, d, e, f)
  loss = lambda x, w, wgu, wd: jnp.sum(dispatch.expert_ffn(x, ids_TK, w, wgu, wd) ** 2)
  jaxpr = jax.make_jaxpr(jax.value_and_grad(loss, argnums=(0, 1, 2, 3)))(
      x_TD, weights_TK, w_gate_up_EDF2, w_down_EFD)
  sizes = [v.aval.size for q in _all_eqns(jaxpr.jaxpr) for v in q.outvars
           if hasattr(v.aval, "size")]
  assert max(sizes) < e * t * k * d, max(sizes)


def test_expert_ffn_rejects_bad_shapes():
  x_TD, w_gate_up_EDF2, w_down_EFD = _ffn_inputs(19, 4, 8, 3, 4)
  ids_TK, weights_TK = _routing(20, 4, 2, 3)
  with pytest.raises(ValueError, match="w_down"):
    dispatch.expert_ffn(x_TD, ids_TK, weights_TK, w_gate_up_EDF2, w_down_EFD[:, :3])
  with pytest.raises(ValueError, match="must both be"):
    dispatch.expert_ffn(x_TD, ids_TK, weights_TK[:, :1], w_gate_up_EDF2, w_down_EFD)
  with pytest.raises(ValueError, match="integers"):
    dispatch.permute(x_TD, jnp.float32(ids_TK), 3)


def test_expert_ids_past_the_last_expert_are_dropped():
  t, k, e, d, f = 16, 2, 4, 8, 8
  ids_TK, weights_TK = _routing(21, t, k, e)
  ids_TK[::3, 1] = e  # these slots go nowhere
  x_TD, w_gate_up_EDF2, w_down_EFD = _ffn_inputs(22, t, d, e, f)
  y_TD = dispatch.expert_ffn(x_TD, ids_TK, weights_TK, w_gate_up_EDF2, w_down_EFD)
  kept_TK = np.where(ids_TK < e, weights_TK, 0.0)
  y_ref = _np_expert_ffn(x_TD, ids_TK, kept_TK, w_gate_up_EDF2, w_down_EFD)
  np.testing.assert_allclose(y_TD, y_ref, rtol=1e-5, atol=1e-5)


# --- The Pallas Mosaic GPU row kernels (kernels/permute_mgpu.py) under Pallas's GPU interpreter.

def _interpret():
  from jax.experimental.pallas import mosaic_gpu as plgpu
  return plgpu.InterpretGPUParams()


@pytest.mark.parametrize("num_sms", [1, 3, 5])
def test_gather_rows_kernel_matches_numpy(num_sms):
  """Repeated and skipped source rows; with 5 SMs and 4 blocks one SM has no block at all."""
  from kernels import permute_mgpu
  rng = np.random.default_rng(num_sms)
  x_ND = jnp.asarray(rng.standard_normal((24, 128)), jnp.bfloat16)
  rows_M = jnp.asarray(rng.integers(0, 24, 32), jnp.int32)
  cfg = permute_mgpu.PermuteConfig(block=8, stages=2)
  out = permute_mgpu.gather_rows(x_ND, rows_M, config=cfg, interpret=_interpret(),
                                 num_sms=num_sms)
  np.testing.assert_array_equal(np.asarray(out), np.asarray(x_ND)[np.asarray(rows_M)])


def test_combine_rows_kernel_matches_fp64_weighted_sum():
  from kernels import permute_mgpu
  t, k, d = 12, 3, 256
  rng = np.random.default_rng(0)
  y_MD = jnp.asarray(rng.standard_normal((t * k, d)), jnp.bfloat16)
  rows_M = jnp.asarray(rng.permutation(t * k), jnp.int32)
  weights_TK = jnp.asarray(rng.uniform(0.1, 1.0, (t, k)), jnp.float32)
  out = permute_mgpu.combine_rows(y_MD, rows_M, weights_TK, interpret=_interpret(), num_sms=3,
                                  config=permute_mgpu.PermuteConfig(block=2, stages=3))
  chex.assert_type(out, jnp.bfloat16)
  y64 = np.asarray(y_MD, np.float64)[np.asarray(rows_M)].reshape(t, k, d)
  ref = np.sum(y64 * np.float64(weights_TK)[:, :, None], axis=1)
  # One bf16 rounding of an fp32 sum.
  np.testing.assert_allclose(np.float64(out), ref, rtol=2 ** -8, atol=1e-6)


def test_permute_kernels_cover_ling_mini_and_refuse_what_they_cannot_hold():
  from kernels import permute_mgpu
  assert permute_mgpu.gather_config(131072, 2048, jnp.bfloat16, 132) is not None
  assert permute_mgpu.combine_config(16384, 8, 2048, jnp.bfloat16, 132) is not None
  # Eight 16 KiB rows per token do not fit three times in shared memory: XLA handles Ling-1T.
  assert permute_mgpu.combine_config(16384, 8, 8192, jnp.bfloat16, 132) is None
  assert permute_mgpu.gather_config(128, 96, jnp.bfloat16, 132) is None  # 192-byte rows
  with pytest.raises(ValueError, match="gather_rows"):
    permute_mgpu.gather_rows(jnp.zeros((4, 96), jnp.bfloat16), jnp.zeros((16,), jnp.int32))


def test_permute_kernels_lower_for_cuda_at_ling_mini_shapes():
  """Layouts and shared memory are checked at lowering, without a GPU."""
  from kernels import permute_mgpu
  t, k, d = 16384, 8, 2048
  gather = jax.jit(lambda x, r: permute_mgpu.gather_rows(x, r, num_sms=132)).trace(
      jax.ShapeDtypeStruct((t, d), jnp.bfloat16), jax.ShapeDtypeStruct((t * k,), jnp.int32))
  combine = jax.jit(lambda y, r, w: permute_mgpu.combine_rows(y, r, w, num_sms=132)).trace(
      jax.ShapeDtypeStruct((t * k, d), jnp.bfloat16), jax.ShapeDtypeStruct((t * k,), jnp.int32),
      jax.ShapeDtypeStruct((t, k), jnp.float32))
  for traced in (gather, combine):
    assert "mosaic_gpu" in traced.lower(lowering_platforms=("cuda",)).as_text()


def test_permute_unpermute_through_kernels_match_reference_with_gradients():
  """permute -> per-row map -> unpermute, values and VJPs, interpreted kernels vs XLA gathers."""
  t, k, e, d = 16, 4, 6, 128
  ids_TK, weights_TK = _routing(23, t, k, e)
  ids_TK[::5, 0] = e  # dropped slots too
  rng = np.random.default_rng(24)
  x_TD = jnp.asarray(rng.standard_normal((t, d)), jnp.bfloat16)
  scale_MD = jnp.asarray(rng.standard_normal((t * k, d)), jnp.float32)
  dout_TD = jnp.asarray(rng.standard_normal((t, d)), jnp.bfloat16)
  ids_TK, weights_TK = jnp.asarray(ids_TK), jnp.asarray(weights_TK)

  def run(backend):
    def fn(x_TD, weights_TK):
      x_MD, _, sort_idx_M = dispatch.permute(x_TD, ids_TK, e, backend=backend)
      y_MD = (x_MD.astype(jnp.float32) * scale_MD).astype(jnp.bfloat16)
      return dispatch.unpermute(y_MD, sort_idx_M, weights_TK, backend=backend)
    out, vjp = jax.vjp(jax.jit(fn), x_TD, weights_TK)
    return (out, *vjp(dout_TD))

  ours = run("pallas_mosaic_gpu_interpret")
  ref = run("reference")
  for name, a, b in zip(("out", "dx", "dweights"), ours, ref, strict=True):
    assert a.dtype == b.dtype, name
    # Same fp32 sums in the same order, rounded once: bitwise on this platform.
    np.testing.assert_allclose(np.float32(a), np.float32(b), rtol=1e-6, atol=1e-6, err_msg=name)


def test_unknown_backend_fails_with_the_list():
  x_TD = jnp.zeros((4, 8), jnp.float32)
  with pytest.raises(ValueError, match="pallas_mosaic_gpu_interpret"):
    dispatch.permute(x_TD, jnp.zeros((4, 2), jnp.int32), 3, backend="triton")
