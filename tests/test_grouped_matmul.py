"""Tests for kernels/grouped_matmul.py: forward, dgrad and wgrad against a float64 per-group loop.

Key: M rows, K contraction dim, N output dim, G groups.
"""

import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels import grouped_matmul as gmm_lib


def _np_gmm(lhs_MK, rhs_GKN, sizes_G):
  """Float64 reference: a loop over groups; rows past the last group stay zero."""
  lhs_MK, rhs_GKN = np.float64(lhs_MK), np.float64(rhs_GKN)
  out_MN = np.zeros((lhs_MK.shape[0], rhs_GKN.shape[2]))
  start = 0
  for g, size in enumerate(sizes_G):
    out_MN[start:start + size] = lhs_MK[start:start + size] @ rhs_GKN[g]
    start += size
  return out_MN


def _np_tgmm(lhs_MK, rhs_MN, sizes_G):
  lhs_MK, rhs_MN = np.float64(lhs_MK), np.float64(rhs_MN)
  out_GKN = np.zeros((len(sizes_G), lhs_MK.shape[1], rhs_MN.shape[1]))
  start = 0
  for g, size in enumerate(sizes_G):
    out_GKN[g] = lhs_MK[start:start + size].T @ rhs_MN[start:start + size]
    start += size
  return out_GKN


def _np_gmm_grads(lhs_MK, rhs_GKN, sizes_G, dout_MN):
  """Per group: dlhs = dout @ rhs[g].T, drhs[g] = lhs.T @ dout."""
  dlhs_MK = _np_gmm(dout_MN, np.swapaxes(np.float64(rhs_GKN), 1, 2), sizes_G)
  return dlhs_MK, _np_tgmm(lhs_MK, dout_MN, sizes_G)


def _dense_gmm_jax(lhs_MK, rhs_GKN, sizes_G):
  """Plain autodiff-able JAX oracle with static sizes, for second-order checks."""
  parts, start = [], 0
  for g, size in enumerate(sizes_G):
    parts.append(lhs_MK[start:start + size] @ rhs_GKN[g])
    start += size
  parts.append(jnp.zeros((lhs_MK.shape[0] - start, rhs_GKN.shape[2]), lhs_MK.dtype))
  return jnp.concatenate(parts, axis=0)


def _assert_close(actual, expected, tol):
  """Elementwise closeness, with the absolute part scaled to the largest reference value."""
  expected = np.asarray(expected, np.float64)
  scale = max(1.0, float(np.abs(expected).max(initial=0.0)))
  np.testing.assert_allclose(np.asarray(actual, np.float64), expected, rtol=tol, atol=tol * scale)


def _inputs(seed, m, k, n, g, dtype):
  rng = np.random.default_rng(seed)
  # Scaled so that outputs are O(1) and one tolerance fits every case.
  lhs_MK = (rng.standard_normal((m, k)) / np.sqrt(k)).astype(np.float32)
  rhs_GKN = rng.standard_normal((g, k, n)).astype(np.float32)
  dout_MN = rng.standard_normal((m, n)).astype(np.float32)
  cast = lambda a: jnp.asarray(a, dtype)
  return cast(lhs_MK), cast(rhs_GKN), cast(dout_MN)


def _random_sizes(seed, m, g, fill):
  """Random sizes, with zeros, that add up to fill * m rows."""
  rng = np.random.default_rng(seed)
  total = int(fill * m)
  cuts = np.sort(rng.integers(0, total + 1, g - 1))
  sizes = np.diff(np.concatenate([[0], cuts, [total]]))
  sizes[rng.random(g) < 0.25] = 0  # extra empty groups; the rows go to the tail
  return sizes.astype(np.int32)


# name -> (M, K, N, group sizes, tile_m). The reference shrinks tiles towards M / G, so each
# case is sized for the tile it names to be the one used (random_b exercises the shrinking).
_CASES = {
    "zero_groups_and_tail": (100, 8, 12, [0, 37, 5, 0, 40], 16),
    "one_group_holds_all": (64, 16, 8, [64], 16),
    "one_of_many_holds_all": (50, 8, 8, [0, 0, 50, 0], 8),
    "groups_smaller_than_tile": (60, 8, 8, [3, 1, 2, 7, 0, 5, 40], 16),
    "tile_multiples": (64, 8, 8, [16, 32, 16], 16),
    "last_tile_shifted": (37, 8, 8, [10, 20, 7], 16),
    "all_groups_empty": (24, 8, 8, [0, 0, 0], 8),
    "tile_larger_than_rows": (10, 4, 4, [7], 128),
    "random_a": (96, 24, 16, _random_sizes(1, 96, 6, 0.9), 16),
    "random_b": (200, 16, 24, _random_sizes(2, 200, 9, 1.0), 128),
}


def _gmm_and_grads(use_jit, tile_m, backend="reference"):
  def run(lhs_MK, rhs_GKN, sizes_G, dout_MN):
    out_MN, vjp = jax.vjp(
        lambda a, b: gmm_lib.grouped_matmul(a, b, sizes_G, tile_m=tile_m, backend=backend),
        lhs_MK, rhs_GKN)
    return (out_MN, *vjp(dout_MN))
  return jax.jit(run) if use_jit else run


_EAGER_CASES = ("zero_groups_and_tail", "last_tile_shifted", "all_groups_empty")


@pytest.mark.parametrize(
    "case, use_jit",
    [pytest.param(c, True, id=f"{c}-jit") for c in sorted(_CASES)]
    + [pytest.param(c, False, id=f"{c}-eager") for c in _EAGER_CASES])
def test_grouped_matmul_fp32_matches_loop(case, use_jit):
  m, k, n, sizes, tile_m = _CASES[case]
  sizes = np.asarray(sizes, np.int32)
  lhs_MK, rhs_GKN, dout_MN = _inputs(0, m, k, n, len(sizes), jnp.float32)
  out_MN, dlhs_MK, drhs_GKN = _gmm_and_grads(use_jit, tile_m)(
      lhs_MK, rhs_GKN, jnp.asarray(sizes), dout_MN)
  chex.assert_shape([out_MN, dlhs_MK, drhs_GKN], [(m, n), (m, k), (len(sizes), k, n)])
  chex.assert_type([out_MN, dlhs_MK, drhs_GKN], jnp.float32)
  _assert_close(out_MN, _np_gmm(lhs_MK, rhs_GKN, sizes), 1e-5)
  dlhs_ref, drhs_ref = _np_gmm_grads(lhs_MK, rhs_GKN, sizes, dout_MN)
  _assert_close(dlhs_MK, dlhs_ref, 1e-5)
  _assert_close(drhs_GKN, drhs_ref, 1e-5)
  # Rows past the last group: exactly zero output and exactly zero gradient.
  used = int(sizes.sum())
  assert not np.any(np.asarray(out_MN[used:]))
  assert not np.any(np.asarray(dlhs_MK[used:]))


@pytest.mark.parametrize("case", ["zero_groups_and_tail", "random_b"])
def test_grouped_matmul_bf16_matches_fp32_loop(case):
  m, k, n, sizes, tile_m = _CASES[case]
  sizes = np.asarray(sizes, np.int32)
  lhs_MK, rhs_GKN, dout_MN = _inputs(3, m, k, n, len(sizes), jnp.bfloat16)
  out_MN, dlhs_MK, drhs_GKN = _gmm_and_grads(True, tile_m)(
      lhs_MK, rhs_GKN, jnp.asarray(sizes), dout_MN)
  chex.assert_type([out_MN, dlhs_MK, drhs_GKN], jnp.bfloat16)
  # The reference sees the same bf16-rounded inputs; what is left is the bf16 rounding of the
  # result (fp32 accumulation inside).
  _assert_close(out_MN, _np_gmm(lhs_MK, rhs_GKN, sizes), 1e-2)
  dlhs_ref, drhs_ref = _np_gmm_grads(lhs_MK, rhs_GKN, sizes, dout_MN)
  _assert_close(dlhs_MK, dlhs_ref, 1e-2)
  _assert_close(drhs_GKN, drhs_ref, 1e-2)


def test_preferred_element_type_sets_output_dtype():
  lhs_MK, rhs_GKN, _ = _inputs(4, 32, 8, 8, 2, jnp.bfloat16)
  sizes_G = jnp.asarray([20, 12], jnp.int32)
  out_MN = gmm_lib.grouped_matmul(lhs_MK, rhs_GKN, sizes_G, preferred_element_type=jnp.float32)
  chex.assert_type(out_MN, jnp.float32)
  _assert_close(out_MN, _np_gmm(lhs_MK, rhs_GKN, [20, 12]), 1e-5)


@pytest.mark.parametrize("use_jit", [True, False], ids=["jit", "eager"])
def test_transposed_grouped_matmul_and_its_vjp(use_jit):
  m, k, n = 70, 8, 12
  sizes = np.asarray([9, 0, 30, 1, 20], np.int32)  # 60 of 70 rows
  lhs_MK, rhs_GKN, dout_MN = _inputs(5, m, k, n, len(sizes), jnp.float32)
  rhs_MN = dout_MN
  dout_GKN = rhs_GKN

  def run(lhs_MK, rhs_MN, sizes_G, dout_GKN):
    out_GKN, vjp = jax.vjp(
        lambda a, b: gmm_lib.transposed_grouped_matmul(a, b, sizes_G, tile_m=16), lhs_MK, rhs_MN)
    return (out_GKN, *vjp(dout_GKN))

  run = jax.jit(run) if use_jit else run
  out_GKN, dlhs_MK, drhs_MN = run(lhs_MK, rhs_MN, jnp.asarray(sizes), dout_GKN)
  _assert_close(out_GKN, _np_tgmm(lhs_MK, rhs_MN, sizes), 1e-5)
  assert not np.any(np.asarray(out_GKN[1]))  # the empty group
  # d lhs[rows of g] = rhs[rows] @ dout[g].T and d rhs[rows of g] = lhs[rows] @ dout[g].
  _assert_close(dlhs_MK, _np_gmm(rhs_MN, np.swapaxes(dout_GKN, 1, 2), sizes), 1e-5)
  _assert_close(drhs_MN, _np_gmm(lhs_MK, dout_GKN, sizes), 1e-5)


def test_transposed_grouped_matmul_num_groups_drops_later_groups():
  lhs_MK, _, rhs_MN = _inputs(6, 30, 4, 6, 3, jnp.float32)
  sizes = np.asarray([10, 5, 15], np.int32)
  out_GKN = gmm_lib.transposed_grouped_matmul(lhs_MK, rhs_MN, jnp.asarray(sizes), num_groups=2)
  chex.assert_shape(out_GKN, (2, 4, 6))
  _assert_close(out_GKN, _np_tgmm(lhs_MK, rhs_MN, sizes)[:2], 1e-5)


def test_second_order_gradients_match_dense_autodiff():
  """grad of a grad runs both custom VJPs' backward passes through each other."""
  sizes = [5, 0, 14, 9]
  lhs_MK, rhs_GKN, dout_MN = _inputs(7, 32, 8, 6, len(sizes), jnp.float32)
  sizes_G = jnp.asarray(sizes, jnp.int32)
  rng = np.random.default_rng(8)
  u_MK = jnp.asarray(rng.standard_normal(lhs_MK.shape), jnp.float32)
  v_GKN = jnp.asarray(rng.standard_normal(rhs_GKN.shape), jnp.float32)

  def second_order(gmm):
    loss = lambda a, b: jnp.sum(jnp.tanh(gmm(a, b)) * dout_MN)

    def grad_dot(a, b):
      da, db = jax.grad(loss, argnums=(0, 1))(a, b)
      return jnp.sum(da * u_MK) + jnp.sum(db * v_GKN)

    return jax.grad(grad_dot, argnums=(0, 1))(lhs_MK, rhs_GKN)

  ours = jax.jit(lambda: second_order(
      lambda a, b: gmm_lib.grouped_matmul(a, b, sizes_G, tile_m=8)))()
  ref = jax.jit(lambda: second_order(lambda a, b: _dense_gmm_jax(a, b, sizes)))()
  for a, b in zip(ours, ref, strict=True):
    _assert_close(a, b, 1e-5)


def test_grouped_matmul_swiglu_and_its_vjp_match_dense_autodiff():
  """The SwiGLU VJP on the saved pre-activation equals autodiff of the plain formula."""
  sizes = [5, 0, 14, 9]  # 4 tail rows
  lhs_MK, rhs_GKN, _ = _inputs(11, 32, 8, 12, len(sizes), jnp.float32)
  dact_MF = jnp.asarray(np.random.default_rng(12).standard_normal((32, 6)), jnp.float32)

  def dense(a, b):
    gate, up = jnp.split(_dense_gmm_jax(a, b, sizes), 2, axis=-1)
    return jax.nn.silu(gate) * up

  ours = jax.jit(lambda a, b: gmm_lib.grouped_matmul_swiglu(a, b, jnp.asarray(sizes, jnp.int32)))
  act, vjp = jax.vjp(ours, lhs_MK, rhs_GKN)
  ref_act, ref_vjp = jax.vjp(dense, lhs_MK, rhs_GKN)
  _assert_close(act, ref_act, 1e-5)
  for a, b in zip(vjp(dact_MF), ref_vjp(dact_MF), strict=True):
    _assert_close(a, b, 1e-5)
  with pytest.raises(ValueError, match=r"rhs \[G, K, 2F\]"):
    gmm_lib.grouped_matmul_swiglu(lhs_MK, rhs_GKN[:, :, :5], jnp.asarray(sizes, jnp.int32))


def test_fused_swiglu_only_where_it_won_or_interpreted():
  assert not gmm_lib.fused_swiglu_wins("reference", jnp.bfloat16, 2048, 1024)
  assert not gmm_lib.fused_swiglu_wins("auto", jnp.bfloat16, 2048, 1024)  # CPU: reference
  assert gmm_lib.fused_swiglu_wins("pallas_mosaic_gpu_interpret", jnp.bfloat16, 64, 128)
  assert not gmm_lib.fused_swiglu_wins("pallas_mosaic_gpu_interpret", jnp.float32, 64, 128)
  assert not gmm_lib.fused_swiglu_wins("pallas_mosaic_gpu", jnp.bfloat16, 2048, 1024)  # no GPU


def test_ragged_dot_backend_matches_loop():
  m, k, n, sizes, _ = _CASES["zero_groups_and_tail"]
  lhs_MK, rhs_GKN, dout_MN = _inputs(9, m, k, n, len(sizes), jnp.float32)
  out_MN, dlhs_MK, drhs_GKN = _gmm_and_grads(True, 128, "ragged_dot")(
      lhs_MK, rhs_GKN, jnp.asarray(sizes, jnp.int32), dout_MN)
  _assert_close(out_MN, _np_gmm(lhs_MK, rhs_GKN, sizes), 1e-5)
  dlhs_ref, drhs_ref = _np_gmm_grads(lhs_MK, rhs_GKN, sizes, dout_MN)
  _assert_close(dlhs_MK, dlhs_ref, 1e-5)
  _assert_close(drhs_GKN, drhs_ref, 1e-5)


def test_group_sizes_over_m_are_clipped():
  lhs_MK, rhs_GKN, _ = _inputs(10, 20, 4, 4, 3, jnp.float32)
  out_MN = gmm_lib.grouped_matmul(lhs_MK, rhs_GKN, jnp.asarray([8, 9, 50], jnp.int32))
  _assert_close(out_MN, _np_gmm(lhs_MK, rhs_GKN, [8, 9, 3]), 1e-5)


@pytest.mark.parametrize("n, dtype", [(1, jnp.int32), (257, jnp.int32), (514, jnp.int32),
                                      (300, jnp.float32), (4097, jnp.int32)])
def test_prefix_sum_matches_numpy_cumsum(n, dtype, monkeypatch):
  """The pairwise prefix sum (and, past _PAIRWISE_PREFIX_MAX, cumsum) against NumPy, with
  negative and zero entries; 4097 once with the pairwise sum forced too."""
  rng = np.random.default_rng(n)
  x = rng.integers(-50, 400, n).astype(np.dtype(dtype))
  want = np.cumsum(x, dtype=np.dtype(dtype))
  got = jax.jit(gmm_lib.prefix_sum)(jnp.asarray(x))
  assert got.dtype == dtype
  np.testing.assert_array_equal(np.asarray(got), want)
  if n > gmm_lib._PAIRWISE_PREFIX_MAX:
    monkeypatch.setattr(gmm_lib, "_PAIRWISE_PREFIX_MAX", n)
    np.testing.assert_array_equal(np.asarray(gmm_lib.prefix_sum(jnp.asarray(x))), want)


def test_fit_group_sizes_clips_at_m():
  sizes = jnp.asarray([5, -1, 300, 0, 900, 7, 0, 3], jnp.int32)
  np.testing.assert_array_equal(np.asarray(gmm_lib.fit_group_sizes(sizes, 1024)),
                                [5, 0, 300, 0, 719, 0, 0, 0])


def test_reference_tiles_shrink_to_the_average_group():
  assert gmm_lib._reference_tile_rows(16384, 32, 128) == 128
  assert gmm_lib._reference_tile_rows(2048, 256, 128) == 8
  assert gmm_lib._reference_tile_rows(100, 5, 16) == 16
  assert gmm_lib._reference_tile_rows(10, 1, 128) == 10


def _all_eqns(jaxpr):
  """Yields every equation of a jaxpr and of the jaxprs nested in its parameters."""
  for eqn in jaxpr.eqns:
    yield eqn
    for param in eqn.params.values():
      for sub in param if isinstance(param, (tuple, list)) else (param,):
        sub = getattr(sub, "jaxpr", sub)  # ClosedJaxpr -> Jaxpr
        if hasattr(sub, "eqns"):
          yield from _all_eqns(sub)


def _largest_hlo_array(hlo_text):
  sizes = [int(np.prod([int(d) for d in dims.split(",") if d]))
           for dims in re.findall(r"\b(?:f32|bf16|f16|s32|pred)\[([\d,]*)\]", hlo_text)]
  return max(sizes)


def _gmm_value_and_grads(backend):
  def f(lhs_MK, rhs_GKN, sizes_G):
    loss = lambda a, b: jnp.sum(gmm_lib.grouped_matmul(a, b, sizes_G, backend=backend) ** 2)
    return jax.value_and_grad(loss, argnums=(0, 1))(lhs_MK, rhs_GKN)
  return f


def test_reference_never_builds_a_groups_by_rows_array():
  """Memory is O(G*K*N + M*K + M*N): nothing of G*M*K elements, forward or backward."""
  g, m, k, n = 256, 1024, 16, 32
  lhs_MK = jnp.zeros((m, k), jnp.float32)
  rhs_GKN = jnp.zeros((g, k, n), jnp.float32)
  sizes_G = jnp.full((g,), m // g, jnp.int32)
  limit = g * m * k
  f = _gmm_value_and_grads("reference")

  eqns = list(_all_eqns(jax.make_jaxpr(f)(lhs_MK, rhs_GKN, sizes_G).jaxpr))
  assert not [e for e in eqns if "ragged" in e.primitive.name]
  sizes = [v.aval.size for e in eqns for v in e.outvars if hasattr(v.aval, "size")]
  assert max(sizes) < limit, max(sizes)
  # The compiled program too, since XLA could in principle expand something.
  assert _largest_hlo_array(jax.jit(f).lower(lhs_MK, rhs_GKN, sizes_G).compile().as_text()) < limit
  # The check has teeth: ragged_dot on CPU is exactly the dense masked product we avoid.
  ragged_hlo = jax.jit(_gmm_value_and_grads("ragged_dot")).lower(
      lhs_MK, rhs_GKN, sizes_G).compile().as_text()
  assert _largest_hlo_array(ragged_hlo) >= limit


@pytest.mark.parametrize(
    "args, kwargs, match",
    [
        (((8, 4), (2, 5, 3), [4, 4]), {}, "contraction dims"),
        (((8,), (2, 4, 3), [4, 4]), {}, r"lhs \[M, K\]"),
        (((8, 4), (3, 4, 3), [4, 4]), {}, "3 groups"),
        (((8, 4), (2, 4, 3), [4.0, 4.0]), {}, "integer"),
        (((8, 4), (2, 4, 3), [4, 4]), {"backend": "cuda_magic"}, "Unknown grouped matmul"),
        (((8, 4), (2, 4, 3), [4, 4]), {"tile_m": 0}, "tile_m"),
    ])
def test_grouped_matmul_rejects_bad_inputs(args, kwargs, match):
  lhs_shape, rhs_shape, sizes = args
  with pytest.raises(ValueError, match=match):
    gmm_lib.grouped_matmul(jnp.zeros(lhs_shape), jnp.zeros(rhs_shape), jnp.asarray(sizes),
                           **kwargs)


def test_transposed_grouped_matmul_rejects_bad_inputs():
  with pytest.raises(ValueError, match="same M"):
    gmm_lib.transposed_grouped_matmul(jnp.zeros((8, 4)), jnp.zeros((9, 3)), jnp.asarray([8]))
  with pytest.raises(ValueError, match="num_groups"):
    gmm_lib.transposed_grouped_matmul(
        jnp.zeros((8, 4)), jnp.zeros((8, 3)), jnp.asarray([8]), num_groups=2)
