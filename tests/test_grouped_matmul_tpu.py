"""Tests for kernels/grouped_matmul_tpu.py on CPU.

The kernels run under Pallas's TPU interpreter (`pltpu.InterpretParams`), which simulates VMEM
blocks that stay resident between grid steps, fills fresh memory with NaNs and rejects an output
block visited twice apart: what the kernels' masked stores rely on. They are also lowered for
TPU (no TPU needed), which checks the block shapes and the kernel bodies against Pallas's Mosaic
lowering. Nothing here times them; no TPU has yet.

Key: M rows, K contraction dim, N output dim, G groups, I work items.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels import grouped_matmul as gmm_lib
from kernels import grouped_matmul_tpu as tpu
from tests.test_grouped_matmul import _all_eqns
from tests.test_grouped_matmul import _assert_close
from tests.test_grouped_matmul import _inputs
from tests.test_grouped_matmul import _np_gmm
from tests.test_grouped_matmul import _np_gmm_grads
from tests.test_grouped_matmul import _np_tgmm
from tests.test_grouped_matmul import _random_sizes

_INTERPRET = "pallas_tpu_interpret"

# Group sizes over M = 56 rows in tiles of 16 (the last tile has 8 rows); K and N are one block
# each (test_bf16_matches_fp64_loop runs several). The group sizes are data, so every case reuses
# one compiled kernel per op; the interpreter's time goes with the grid steps.
_M, _K, _N, _TILE_M = 56, 128, 128, 16
_CASES = {
    "zeros_small_group_and_tail": [0, 30, 5, 0, 13],  # 8 rows past the last group
    "one_group_holds_all": [0, 0, 56, 0, 0],
    "groups_smaller_than_tile": [3, 1, 2, 7, 0],  # 43 rows past the last group
    "all_groups_empty": [0, 0, 0, 0, 0],
    "random": _random_sizes(3, _M, 5, 0.9),
}


@functools.partial(jax.jit, static_argnames="backend")
def _gmm_and_grads(lhs_MK, rhs_GKN, sizes_G, dout_MN, backend=_INTERPRET):
  out_MN, vjp = jax.vjp(
      lambda a, b: gmm_lib.grouped_matmul(a, b, sizes_G, tile_m=_TILE_M, backend=backend),
      lhs_MK, rhs_GKN)
  return (out_MN, *vjp(dout_MN))


@pytest.mark.parametrize("case", sorted(_CASES))
def test_forward_dgrad_wgrad_match_fp64_loop(case):
  sizes = np.asarray(_CASES[case], np.int32)
  lhs_MK, rhs_GKN, dout_MN = _inputs(0, _M, _K, _N, len(sizes), jnp.float32)
  out_MN, dlhs_MK, drhs_GKN = _gmm_and_grads(lhs_MK, rhs_GKN, jnp.asarray(sizes), dout_MN)
  _assert_close(out_MN, _np_gmm(lhs_MK, rhs_GKN, sizes), 1e-5)
  dlhs_ref, drhs_ref = _np_gmm_grads(lhs_MK, rhs_GKN, sizes, dout_MN)
  _assert_close(dlhs_MK, dlhs_ref, 1e-5)
  _assert_close(drhs_GKN, drhs_ref, 1e-5)
  # Rows past the last group start as NaN in the interpreter: they must come out exactly zero.
  used = int(sizes.sum())
  assert not np.any(np.asarray(out_MN[used:])) and not np.any(np.asarray(dlhs_MK[used:]))
  assert not np.any(np.asarray(drhs_GKN)[sizes == 0])  # empty groups' weight gradients


def test_grad_through_public_api_matches_reference_backend():
  sizes_G = jnp.asarray(_CASES["zeros_small_group_and_tail"], jnp.int32)
  lhs_MK, rhs_GKN, w_MN = _inputs(1, _M, _K, _N, sizes_G.shape[0], jnp.float32)

  def grads(backend):
    def loss(a, b):
      out_MN = gmm_lib.grouped_matmul(a, b, sizes_G, tile_m=_TILE_M, backend=backend)
      return jnp.sum(jnp.tanh(out_MN) * w_MN)
    return jax.jit(jax.grad(loss, argnums=(0, 1)))(lhs_MK, rhs_GKN)

  for ours, ref in zip(grads(_INTERPRET), grads("reference"), strict=True):
    _assert_close(ours, ref, 1e-5)
  # The weight-gradient op on its own, as the dispatcher exposes it.
  out_GKN = gmm_lib.transposed_grouped_matmul(lhs_MK, w_MN, sizes_G, tile_m=_TILE_M,
                                              backend=_INTERPRET)
  _assert_close(out_GKN, _np_tgmm(lhs_MK, w_MN, np.asarray(sizes_G)), 1e-5)


def test_bf16_matches_fp64_loop():
  """bf16 operands and outputs, fp32 accumulation, in several blocks of K and of N: K = 256 and
  N = 384 at the interpreter's 128-wide tiles. M = 40 rows end in a half tile."""
  sizes = np.asarray([0, 33, 0, 4], np.int32)
  lhs_MK, rhs_GKN, dout_MN = _inputs(2, 40, 256, 384, len(sizes), jnp.bfloat16)
  out_MN, dlhs_MK, drhs_GKN = _gmm_and_grads(lhs_MK, rhs_GKN, jnp.asarray(sizes), dout_MN)
  assert out_MN.dtype == dlhs_MK.dtype == drhs_GKN.dtype == jnp.bfloat16
  # The reference sees the same bf16 inputs; what is left is the bf16 rounding of the result.
  _assert_close(out_MN, _np_gmm(lhs_MK, rhs_GKN, sizes), 1e-2)
  dlhs_ref, drhs_ref = _np_gmm_grads(lhs_MK, rhs_GKN, sizes, dout_MN)
  _assert_close(dlhs_MK, dlhs_ref, 1e-2)
  _assert_close(drhs_GKN, drhs_ref, 1e-2)


# Jitted: eager, each of its small ops would compile on its own.
_make_schedule = jax.jit(tpu.make_schedule, static_argnums=(1, 2),
                         static_argnames=("tail", "visit_empty"))


def test_schedule_of_a_hand_worked_case():
  """Rows [0, 37) group 1, [37, 42) group 2, [42, 82) group 4, [82, 100) past the end; R = 16."""
  sizes_G = jnp.asarray([0, 37, 5, 0, 40], jnp.int32)
  fwd = _make_schedule(sizes_G, 100, 16, tail=True, visit_empty=False)
  n = int(fwd.num_items)
  assert n == 10 and fwd.group_I.shape == (7 + 6 - 1,)
  np.testing.assert_array_equal(fwd.group_I[:n], [1, 1, 1, 2, 4, 4, 4, 4, 5, 5])  # 5: the tail
  np.testing.assert_array_equal(fwd.tile_I[:n], [0, 1, 2, 2, 2, 3, 4, 5, 5, 6])
  np.testing.assert_array_equal(fwd.offsets_H1, [0, 0, 37, 42, 42, 82, 100])
  # The weight gradient visits each empty group once, on the tile where it would start.
  wgrad = _make_schedule(sizes_G, 100, 16, tail=False, visit_empty=True)
  n = int(wgrad.num_items)
  np.testing.assert_array_equal(wgrad.group_I[:n], [0, 1, 1, 1, 2, 3, 4, 4, 4, 4])
  np.testing.assert_array_equal(wgrad.tile_I[:n], [0, 0, 1, 2, 2, 2, 2, 3, 4, 5])


@pytest.mark.parametrize("seed", range(4))
def test_forward_schedule_covers_every_row_once_in_tile_order(seed):
  num_rows, tile_m = 300, 16  # one compile; the sizes vary
  rng = np.random.default_rng(seed)
  sizes = np.zeros(12, np.int32)
  num_groups = int(rng.integers(1, 13))
  sizes[:num_groups] = _random_sizes(seed, num_rows, num_groups, rng.random())
  schedule = _make_schedule(jnp.asarray(sizes), num_rows, tile_m, tail=True, visit_empty=False)
  n = int(schedule.num_items)
  group_I, tile_I = np.asarray(schedule.group_I[:n]), np.asarray(schedule.tile_I[:n])
  offsets_H1 = np.asarray(schedule.offsets_H1)
  count_M = np.zeros(num_rows, np.int64)
  for group, tile in zip(group_I, tile_I, strict=True):
    lo = max(offsets_H1[group], tile * tile_m)
    hi = min(offsets_H1[group + 1], (tile + 1) * tile_m)
    assert lo < hi  # no item without rows
    count_M[lo:hi] += 1
  np.testing.assert_array_equal(count_M, 1)
  # Tiles never come back once left: the output block of a tile stays resident across its items.
  assert (np.diff(tile_I) >= 0).all() and (np.diff(group_I) >= 0).all()


def test_kernels_lower_for_tpu_at_ling_mini_shapes():
  """Block shapes and kernel bodies pass Pallas's Mosaic TPU lowering, without a TPU."""
  bf16 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.bfloat16)
  sizes = jax.ShapeDtypeStruct((256,), jnp.int32)
  calls = [
      (tpu.gmm, (bf16(8192, 2048), bf16(256, 2048, 1024)), {}),  # up-projection
      (tpu.gmm, (bf16(8192, 1024), bf16(256, 2048, 1024)), {"transpose_rhs": True}),  # its dgrad
      (tpu.tgmm, (bf16(8192, 2048), bf16(8192, 1024)), {}),  # its wgrad
  ]
  for fn, operands, kwargs in calls:
    lowered = jax.jit(functools.partial(fn, **kwargs)).trace(*operands, sizes).lower(
        lowering_platforms=("tpu",))
    assert "tpu_custom_call" in lowered.as_text()


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda a, b, s: tpu.gmm(a, b, s, tile_k=96), "multiple of 128"),
        (lambda a, b, s: tpu.gmm(a, b, s, tile_k=384), "K=512 is not a multiple of tile_k"),
        (lambda a, b, s: tpu.tgmm(a, b[0, :64, :200], s, tile_n=128), "N=200 is not a multiple"),
        (lambda a, b, s: tpu.gmm(a, b, s, tile_m=12), "tile_m=12"),
        (lambda a, b, s: tpu.gmm(a.astype(jnp.float16), b, s), "float32 or bfloat16"),
        (lambda a, b, s: tpu.gmm(a, b, s.astype(jnp.float32)), "int array"),
        (lambda a, b, s: tpu.gmm(a, b, s, transpose_rhs=True), r"rhs \[G, N, K\]"),
        (lambda a, b, s: tpu.tgmm(a, b[0], s), r"rhs \[M, N\]"),
    ])
def test_kernels_reject_what_they_do_not_take(call, match):
  lhs_MK = jnp.zeros((64, 512), jnp.float32)
  rhs_GKN = jnp.zeros((2, 512, 256), jnp.float32)
  with pytest.raises(ValueError, match=match):
    call(lhs_MK, rhs_GKN, jnp.asarray([30, 30], jnp.int32))


def test_backends_on_operands_the_kernels_do_not_take():
  """The interpreter's backend raises (its tests must run the kernel); the TPU backend takes the
  reference instead (traced only: on CPU the kernel could not run)."""
  sizes_G = jnp.asarray([20, 0, 25], jnp.int32)
  lhs_MK, rhs_GKN, _ = _inputs(5, 50, 200, 8, 3, jnp.float32)  # K = 200: no 128-wide tile
  with pytest.raises(ValueError, match="'pallas_tpu_interpret'.*K=200.*backend='reference'"):
    gmm_lib.grouped_matmul(lhs_MK, rhs_GKN, sizes_G, backend=_INTERPRET)

  def primitives(lhs_MK, rhs_GKN):
    f = lambda a, b: gmm_lib.grouped_matmul(a, b, sizes_G, tile_m=8, backend="pallas_tpu")
    return {e.primitive.name for e in _all_eqns(jax.make_jaxpr(f)(lhs_MK, rhs_GKN).jaxpr)}

  assert "pallas_call" in primitives(lhs_MK, rhs_GKN)
  assert "pallas_call" not in primitives(lhs_MK.astype(jnp.float16), rhs_GKN.astype(jnp.float16))
  assert "pallas_call" not in primitives(lhs_MK, rhs_GKN[:, :, :7].repeat(100, axis=2))  # N=700
