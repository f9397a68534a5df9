"""The configs reproduce the released parameter totals exactly (ling2_spec.md section 1)."""

import pytest

from configs import ling2
from ling_jax import params


@pytest.mark.parametrize("variant, total, bias", [
    ("mini", 16_255_638_528, 19 * 256),
    ("flash", 102_889_697_280, 7_936),
    ("1t", 999_705_309_184, 76 * 256),
])
def test_released_totals(variant, total, bias):
  counts = params.count_params(ling2.model_config(variant))
  assert counts["total"] == total
  assert counts["expert_bias"] == bias


def test_mini_active():
  counts = params.count_params(ling2.model_config("mini"))
  assert round(counts["active"] / 1e9, 3) == 1.433
  assert round(counts["active_non_embedding"] / 1e6, 1) == 789.1


def test_1t_active():
  counts = params.count_params(ling2.model_config("1t"))
  assert round(counts["active"] / 1e9, 2) == 51.05


def test_small_is_about_100m_and_mtp_counts_when_asked():
  m = ling2.model_config("small")
  assert 90e6 < params.count_params(m)["total"] < 110e6
  with_mtp = params.count_params(m, include_mtp=True)["total"]
  assert with_mtp > params.count_params(m)["total"]
