"""The one-read log-sum-exp kernel (kernels/lse_triton.py) in Triton's interpret mode, against a
float64 NumPy oracle."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels import lse_triton

_INTERP = "pallas_triton_interpret"


def _np_lse(x):
  x = np.asarray(x, np.float64)
  m = x.max(axis=-1, keepdims=True)
  return (m + np.log(np.exp(x - m).sum(axis=-1, keepdims=True)))[..., 0]


@pytest.mark.parametrize("dtype, shape", [(jnp.bfloat16, (2, 8, 1536)), (jnp.float32, (16, 384))])
def test_kernel_matches_float64(dtype, shape):
  """Several chunks per row (1536 = 3 x 512; 384 = 3 x 128), rows whose maxima sit in different
  chunks, a row of one large logit, and magnitudes that overflow exp() unless shifted."""
  rng = np.random.default_rng(0)
  x = rng.standard_normal(shape).astype(np.float32) * 4
  flat = x.reshape(-1, shape[-1])
  flat[1, -1] = 95.0  # the max in the last chunk
  flat[2, 0] = 120.0  # in the first: later chunks must rescale nothing
  flat[3] = -30.0
  flat[3, 200] = 60.0
  x = jnp.asarray(x, dtype)
  got = lse_triton.logsumexp_rows(x, interpret=True)
  assert got.shape == shape[:-1] and got.dtype == jnp.float32
  np.testing.assert_allclose(got, _np_lse(np.asarray(x.astype(jnp.float32))), rtol=2e-6,
                             atol=1e-5)
  # The public op on the interpret backend takes the kernel; on "xla", XLA: both agree.
  np.testing.assert_array_equal(lse_triton.logsumexp(x, _INTERP), got)
  np.testing.assert_allclose(lse_triton.logsumexp(x, "xla"), got, rtol=2e-6, atol=1e-5)


def test_rows_of_minus_infinity_and_uncovered_shapes():
  x = jnp.full((8, 256), -jnp.inf, jnp.float32).at[0, 3].set(1.0)
  got = np.asarray(lse_triton.logsumexp_rows(x, interpret=True))
  assert got[0] == pytest.approx(1.0) and np.all(got[1:] == -np.inf)
  # 7 rows (not a multiple of 8) or 200 columns (no chunk divides it): XLA, and a clear error
  # from the kernel itself.
  for shape in ((7, 256), (8, 200)):
    x = jnp.asarray(np.random.default_rng(1).standard_normal(shape), jnp.float32)
    assert not lse_triton.kernel_takes(x)
    np.testing.assert_allclose(lse_triton.logsumexp(x, _INTERP), _np_lse(x), rtol=1e-6)
    with pytest.raises(ValueError, match="multiple of 8.*jax.nn.logsumexp"):
      lse_triton.logsumexp_rows(x, interpret=True)
  with pytest.raises(ValueError, match="unknown backend 'cuda'"):
    lse_triton.logsumexp(x, "cuda")


def test_on_for_gpus_since_checked_there_and_xla_elsewhere():
  assert lse_triton._KERNEL_ON_GPU  # session 12's GPU check (the module doc)
  assert jax.default_backend() != "gpu"  # so "auto" takes XLA's below
  x = jnp.zeros((8, 256), jnp.bfloat16)
  np.testing.assert_allclose(lse_triton.logsumexp(x), np.log(256.0), rtol=1e-6)
