"""experiments/check_fp8_model.py: the GPU check of the FP8 kernels at a model's shapes, run here
with the interpreted Mosaic GPU kernels, and shown to catch a kernel that writes wrong outputs."""

import jax.numpy as jnp
import numpy as np
import pytest

from experiments import check_fp8_model
from kernels import fp8_gemm
from ling_jax import profiling
from tests import test_moe_backends

_INTERPRET = "pallas_mosaic_gpu_interpret"


def _config():
  # One dense and one MoE layer at kernel-sized dimensions; the dense MLP as wide as the model.
  return test_moe_backends.kernel_sized_config("fp8_blockwise", intermediate_size=256,
                                               batch_size=1)


@pytest.fixture(scope="module")
def ops():
  return check_fp8_model.record_ops(_config())


def test_records_every_fp8_op_of_the_step(ops):
  kinds = sorted((o["op"], tuple(o["x"]), tuple(o["w"])) for o in ops)
  # 128 tokens. qkv 256 -> (2 + 2 * 1) * 128 and the dense MLP's 256 -> 2 * 256 (one shape), out
  # 256 -> 256 (also the MLP's down and the shared expert's 256 -> 2 * 128), the shared expert's
  # 128 -> 256; the routed experts as one fused op (kernels/fp8_experts.py) over 128 * 2 rows
  # plus up to 15 padding rows per expert (8 x 15 + 256 = 376, rounded up to 16: 384).
  assert kinds == sorted([("linear", (128, 256), (256, 512)), ("linear", (128, 256), (256, 256)),
                          ("linear", (128, 128), (128, 256)),
                          ("experts", (128, 256), (8, 256, 256))]), kinds
  (experts,) = [o for o in ops if o["op"] == "experts"]
  assert (experts["w_down"], experts["rows"], experts["top_k"], experts["row_align"]) == (
      [8, 128, 256], 384, 2, 16)
  assert all(o["dtype"] == "bfloat16" for o in ops)


def test_records_the_separate_expert_ops_without_fusion():
  config = _config()
  config.model.fp8_fused_dispatch = False
  kinds = sorted((o["op"], tuple(o["x"]), tuple(o["w"]))
                 for o in check_fp8_model.record_ops(config) if o["op"] != "linear")
  assert kinds == [("grouped", (384, 128), (8, 128, 256)), ("grouped", (384, 256), (8, 256, 256))]


def test_fused_experts_interpreted_match_the_reference(ops):
  """The fused expert FFN at the model's shapes with the interpreted GEMM kernels: the same
  codes as the reference, so y and dx agree to accumulation order; dw to bf16 operands (groups
  of 16 rows take the dequantise-then-bf16 wgrad); FP8 is ~6% from bf16."""
  result = check_fp8_model.check_op(_op(ops, "experts", (8, 256, 256)), jax_key(1), _INTERPRET)
  assert not check_fp8_model.failures([result], 1e-2, 3e-2, 5e-2, 0.25), result
  assert max(result["y_kernel_vs_ref"], result["dx_kernel_vs_ref"]) < 1e-3, result
  # The separate ops on "auto" (the reference here): the same codes forward.
  assert result["y_fused_vs_separate"] < 1e-3, result
  assert result["dw_kernel_vs_ref"] < 5e-3, result
  assert all(0.01 < result[f"{g}_fp8_vs_bf16"] < 0.1 for g in ("y", "dx", "dw")), result


def _op(ops, kind, w_shape):
  (op,) = [o for o in ops if o["op"] == kind and tuple(o["w"]) == w_shape]
  return op


def test_interpreted_kernels_match_the_reference_and_fp8_differs_from_bf16(ops):
  # One op (interpret mode is slow; tests/test_fp8_mgpu.py checks the grouped kernels).
  result = check_fp8_model.check_op(_op(ops, "linear", (256, 256)), jax_key(0), _INTERPRET)
  assert not check_fp8_model.failures([result], 1e-2, row_tolerance=5e-2)
  # Every row to bf16 rounding too.
  assert max(result[f"{g}_worst_row"] for g in ("y", "dx", "dw")) < 1e-2, result
  # Same E4M3 codes on both sides: only the accumulation order differs (bf16 outputs).
  assert max(result[f"{g}_kernel_vs_ref"] for g in ("y", "dx", "dw")) < 1e-3, result
  # Quantisation itself moves each product by ~4%, relative.
  assert all(0.02 < result[f"{g}_fp8_vs_bf16"] < 0.06 for g in ("y", "dx", "dw")), result


def test_a_kernel_with_wrong_outputs_fails_the_check(ops, monkeypatch):
  real = fp8_gemm._kernel_gmm

  def broken(*args, **kwargs):  # the kernel's rows, shifted by one: a misplaced store
    kernel = real(*args, **kwargs)
    return kernel and (lambda *a, **k: jnp.roll(kernel(*a, **k), 1, axis=0))
  monkeypatch.setattr(fp8_gemm, "_kernel_gmm", broken)
  result = check_fp8_model.check_op(_op(ops, "linear", (128, 256)), jax_key(0), _INTERPRET)
  assert result["y_kernel_vs_ref"] > 0.5
  assert check_fp8_model.failures([result], 1e-2) == [result]


def test_a_kernel_wrong_in_one_row_fails_the_row_check(ops, monkeypatch):
  """Row 0 of each kernel output off by 10%: a Frobenius error of 0.1 / sqrt(128) < 1e-2 passes
  the whole-output tolerance, and the worst row's 0.1 fails --row_tolerance."""
  real = fp8_gemm._kernel_gmm

  def one_bad_row(*args, **kwargs):
    kernel = real(*args, **kwargs)
    return kernel and (lambda *a, **k: kernel(*a, **k).at[0].multiply(1.1))
  monkeypatch.setattr(fp8_gemm, "_kernel_gmm", one_bad_row)
  result = check_fp8_model.check_op(_op(ops, "linear", (128, 256)), jax_key(0), _INTERPRET)
  assert result["y_kernel_vs_ref"] < 1e-2 and 0.09 < result["y_worst_row"] < 0.11, result
  assert check_fp8_model.failures([result], 1e-2) == []
  assert check_fp8_model.failures([result], 1e-2, row_tolerance=5e-2) == [result]


def test_worst_row_error_finds_one_bad_row_and_padding_garbage():
  rng = np.random.default_rng(0)
  ref = rng.standard_normal((10_000, 64))
  out = ref * (1 + 1e-3 * rng.standard_normal(ref.shape))
  assert profiling.worst_row_error(out, ref) < 1e-2
  out[1234] *= 2.0  # one row in 10,000 wrong by 100%: Frobenius 1%
  assert profiling.rel_error(out, ref) < 0.015
  assert profiling.worst_row_error(out, ref) == pytest.approx(1.0, rel=1e-2)
  ref[7], out[7] = 0.0, ref[8]  # a padding row written with a whole row's garbage
  assert profiling.worst_row_error(out, ref) > 0.9
  # [G, K, N] (a weight gradient): rows along the last axis, and an all-zero pair is exact.
  assert profiling.worst_row_error(np.zeros((2, 3, 4)), np.zeros((2, 3, 4))) == 0.0


def jax_key(i):
  import jax
  return jax.random.key(i)


def test_the_fused_experts_take_the_requantisation_tolerance():
  """Kernel against reference at 2e-2 passes the experts' 3e-2 but not a linear's 1e-2; the
  experts' forward against the separate ops is held to 1e-2 either way."""
  clean = {"y_finite": True, "dx_finite": True, "dw_finite": True, "dx_kernel_vs_ref": 0.0,
           "dw_kernel_vs_ref": 0.0, "y_worst_row": 0.0, "dx_worst_row": 0.0, "dw_worst_row": 0.0}
  experts = {**clean, "op": "experts", "y_kernel_vs_ref": 2e-2, "y_fused_vs_separate": 0.0}
  linear = {**clean, "op": "linear", "y_kernel_vs_ref": 2e-2}
  assert check_fp8_model.failures([experts, linear], 1e-2, 3e-2) == [linear]
  assert check_fp8_model.failures([experts], 1e-2) == [experts]
  apart = {**experts, "y_fused_vs_separate": 2e-2}
  assert check_fp8_model.failures([apart], 1e-2, 3e-2) == [apart]


def test_op_kinds_pick_and_order_the_ops():
  ops = [{"op": "linear", "i": 0}, {"op": "experts", "i": 1}, {"op": "linear", "i": 2},
         {"op": "grouped", "i": 3}]
  picked = check_fp8_model.select_ops(ops, ["experts", "linear"])
  assert [o["i"] for o in picked] == [1, 0, 2]
  with pytest.raises(ValueError, match=r"--op_kinds: unknown \['expert'\]; choose from experts"):
    check_fp8_model.select_ops(ops, ["expert"])


def test_collapsed_routing_sends_all_but_every_64th_token_to_one_set_of_experts():
  ids = np.asarray(check_fp8_model._top_k_ids(jax_key(0), 256, 16, 4, "collapsed"))
  stray = np.arange(256) % 64 == 0
  hot = set(ids[1])
  assert len(hot) == 4 and all(set(r) == hot for r in ids[~stray])
  assert all(len(set(r)) == 4 for r in ids)  # Each token's experts distinct, strays' too.
  uniform = np.asarray(check_fp8_model._top_k_ids(jax_key(0), 256, 16, 4, "uniform"))
  assert all(len(set(r)) == 4 for r in uniform)
  assert len({tuple(sorted(r)) for r in uniform}) > 100  # Of the 1,820 sets of 4 of 16.
  # The grouped ops' sizes: 3,856 real rows (4,096 less 15 of padding room per group), the
  # hot four groups holding 63/64 of them, each group padded to 16 rows.
  sizes = np.asarray(check_fp8_model._group_sizes(4096, 16, 16, 4, "collapsed", jax_key(1)))
  assert sizes.sum() <= 4096 and not (sizes % 16).any()
  assert np.sort(sizes)[-4:].sum() >= 0.95 * 3856 and np.sort(sizes)[-5] < 0.01 * 3856
  with pytest.raises(ValueError, match="routing must be 'uniform' or 'collapsed'"):
    check_fp8_model.check_op({"op": "linear"}, jax_key(0), _INTERPRET, "balanced")


def test_fused_experts_interpreted_match_the_reference_on_collapsed_routing(ops):
  """126 of the 128 tokens on the same two experts: one group of 128 rows (126, padded to 16)
  beside small and empty ones, where the kernels still give the reference's codes."""
  result = check_fp8_model.check_op(_op(ops, "experts", (8, 256, 256)), jax_key(1), _INTERPRET,
                                    "collapsed")
  assert result["largest_group"] == 128, result
  assert not check_fp8_model.failures([result], 1e-2, 3e-2, 5e-2, 0.25), result
  assert max(result["y_kernel_vs_ref"], result["dx_kernel_vs_ref"]) < 1e-3, result
  assert result["dw_kernel_vs_ref"] < 5e-3, result
