"""Row-wise log-sum-exp in one read, through Pallas's Triton lowering: the cross-entropy's
forward pass on GPUs.

`jax.nn.logsumexp` over the last axis reads x twice on the GPU (a max reduction, then a sum of
exponentials shifted by it). For the LM heads' logits that is the cost: [49,152, 157,184] bf16
is 15.4 GB a head, and at 2 layers of Ling-mini width the two passes of both heads took 23 ms
of a 419 ms step (BENCHMARKS.md, "Training throughput", session 11). This kernel reads each
row once, keeping a running max m and a running sum s of exp(x - m) per row:
  m' = max(m, max(chunk)),  s' = s * exp(m - m') + sum(exp(chunk - m')),  lse = m + log(s),
in fp32 whatever the input dtype. Program i takes `rows` rows and walks their vocabulary in
`chunk`-column pieces (a loop that Triton software-pipelines over `num_stages` loads).

The kernel takes shapes whose rows divide into the programs and whose columns divide into the
chunks (`kernel_takes`): every access is then in bounds, on the GPU and in interpret mode
alike. Others, and every backend but "pallas_triton", take XLA's logsumexp. Its result differs
from XLA's by fp32 rounding (summation order), ~1e-7 relative.

`_KERNEL_ON_GPU` is on: `python -m kernels.lse_triton` on an H200 (session 12, [49,152, 157,184]
bf16) gave 5.29 ms (2,920 GB/s) against XLA's 9.51 ms (1,625 GB/s), largest relative difference
1.2e-7; launches of 4-8 rows, 4-8 warps and 3-4 stages were within 0.5% of each other.

Shape key: N rows, V columns (the vocabulary), R rows per program, C columns per chunk.
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

# On since session 12's GPU check (the module doc).
_KERNEL_ON_GPU = True
ROWS, CHUNKS, NUM_WARPS, NUM_STAGES = 8, (2048, 1024, 512, 256, 128), 4, 3


def _chunk_for(vocab: int) -> int | None:
  """The widest chunk (`CHUNKS`) that divides V, or None."""
  return next((c for c in CHUNKS if vocab % c == 0), None)


def kernel_takes(x: jax.Array, rows: int = ROWS) -> bool:
  """Whether the kernel covers x: [..., V] in bf16, fp16 or fp32, rows a multiple of `rows`, V of
  a chunk."""
  return (x.ndim >= 1 and x.size > 0 and _chunk_for(x.shape[-1]) is not None
          and (x.size // x.shape[-1]) % rows == 0
          and jnp.dtype(x.dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16),
                                     jnp.dtype(jnp.float32)))


def _lse_kernel(x_ref, out_ref, *, rows: int, chunk: int):
  """Program i: rows [i R, (i + 1) R), their V columns in chunks of C."""
  row0 = pl.multiple_of(pl.program_id(0) * rows, rows)
  num_chunks = x_ref.shape[1] // chunk

  def body(c, carry):
    m_R, s_R = carry
    x_RC = x_ref[pl.ds(row0, rows), pl.ds(pl.multiple_of(c * chunk, chunk), chunk)]
    x_RC = x_RC.astype(jnp.float32)
    new_m_R = jnp.maximum(m_R, jnp.max(x_RC, axis=1))
    s_R = s_R * jnp.exp(m_R - new_m_R) + jnp.sum(jnp.exp(x_RC - new_m_R[:, None]), axis=1)
    return new_m_R, s_R

  init = (jnp.full((rows,), -jnp.inf, jnp.float32), jnp.zeros((rows,), jnp.float32))
  m_R, s_R = jax.lax.fori_loop(0, num_chunks, body, init)
  # A row of -inf only: m = -inf and s = nan (exp(-inf - -inf)); XLA gives -inf there.
  out_ref[pl.ds(row0, rows)] = jnp.where(m_R == -jnp.inf, m_R, m_R + jnp.log(s_R))


@functools.partial(jax.jit, static_argnames=("rows", "num_warps", "num_stages", "interpret"))
def logsumexp_rows(x: jax.Array, *, rows: int = ROWS, num_warps: int = NUM_WARPS,
                   num_stages: int = NUM_STAGES, interpret: bool = False) -> jax.Array:
  """log(sum(exp(x), axis=-1)) in fp32, [...]: one read of x (`kernel_takes` says which x)."""
  if not kernel_takes(x, rows):
    raise ValueError(
        f"logsumexp_rows: x {x.shape} {x.dtype} needs bf16, fp16 or fp32 with its rows a multiple "
        f"of {rows} and its last axis a multiple of one of {CHUNKS}; use jax.nn.logsumexp.")
  vocab = x.shape[-1]
  x_NV = x.reshape(-1, vocab)
  num_rows = x_NV.shape[0]
  out = pl.pallas_call(
      functools.partial(_lse_kernel, rows=rows, chunk=_chunk_for(vocab)),
      out_shape=jax.ShapeDtypeStruct((num_rows,), jnp.float32),
      grid=(num_rows // rows,),
      compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages),
      interpret=interpret,
  )(x_NV)
  return out.reshape(x.shape[:-1])


def logsumexp(x: jax.Array, backend: str = "auto") -> jax.Array:
  """log(sum(exp(x), axis=-1)) of x in fp32: the kernel on "pallas_triton" (on "auto", a GPU while
  `_KERNEL_ON_GPU` is set) where it takes x, else XLA's (x converted to fp32 first)."""
  if backend == "auto":
    backend = "pallas_triton" if _KERNEL_ON_GPU and jax.default_backend() == "gpu" else "xla"
  if backend not in ("xla", "pallas_triton", "pallas_triton_interpret"):
    raise ValueError(f"logsumexp: unknown backend {backend!r}; expected 'auto', 'xla', "
                     "'pallas_triton' or 'pallas_triton_interpret' (as kernels/fp8_quant.py).")
  if backend != "xla" and kernel_takes(x):
    return logsumexp_rows(x, interpret=backend == "pallas_triton_interpret")
  return jax.nn.logsumexp(x.astype(jnp.float32), axis=-1)


def self_check(num_rows: int = 49152, vocab: int = 157184,
               launches: tuple[tuple[int, int, int], ...] = ((8, 4, 3), (4, 4, 3), (16, 8, 3),
                                                              (8, 8, 4))) -> None:
  """GPU check at Ling-mini's logits (12 x 4096 tokens, bf16): the kernel's largest relative
  difference from XLA's fp32 logsumexp and the ms of both, per launch (rows, warps, stages)."""
  from ling_jax.profiling import time_queued
  x = (jax.random.normal(jax.random.key(0), (num_rows, vocab), jnp.float32) * 3).astype(
      jnp.bfloat16)
  xla = jax.jit(lambda x: jax.nn.logsumexp(x.astype(jnp.float32), axis=-1))
  want = xla(x)
  gb = x.size * x.dtype.itemsize / 1e9
  seconds = time_queued(xla, x)
  print(f"{jax.devices()[0].device_kind}: [{num_rows}, {vocab}] bf16, {gb:.1f} GB; XLA "
        f"{seconds * 1e3:.3f} ms ({gb / seconds:.0f} GB/s)")
  for rows, warps, stages in launches:
    fn = jax.jit(functools.partial(logsumexp_rows, rows=rows, num_warps=warps,
                                   num_stages=stages))
    try:
      got = fn(x)
      err = float(jnp.max(jnp.abs(got - want) / jnp.abs(want)))
      seconds = time_queued(fn, x)
    except Exception as e:  # noqa: BLE001 (print it and go on to the next launch)
      print(f"rows {rows} warps {warps} stages {stages}: FAILED {type(e).__name__}: "
            f"{str(e)[:300]}")
      continue
    print(f"rows {rows} warps {warps} stages {stages}: max rel diff {err:.1e}, "
          f"{seconds * 1e3:.3f} ms ({gb / seconds:.0f} GB/s)")


if __name__ == "__main__":  # python -m kernels.lse_triton (on a GPU)
  self_check()
