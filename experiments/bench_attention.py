"""Attention core forward+backward time per implementation (ling_jax/attention.py), one device.

  python -m experiments.bench_attention --batch=4 --seq_len=4096 --heads=16 --kv_heads=4

Times `attention.dot_product_attention` for each `--impls` on packed rows of `--docs` documents
each (segment ids), bf16. FLOPs count causal attention at half (QK^T and PV, forward + backward
= 3x forward: 4 * L^2 / 2 * N * H * 3 per row), as `ling_jax.scaling` does.
"""


import jax
import jax.numpy as jnp
import numpy as np
from absl import app
from absl import flags

from ling_jax import attention
from ling_jax import profiling

_BATCH = flags.DEFINE_integer("batch", 4, "Rows.")
_SEQ = flags.DEFINE_integer("seq_len", 4096, "Row length.")
_HEADS = flags.DEFINE_integer("heads", 16, "Query heads.")
_KV = flags.DEFINE_integer("kv_heads", 4, "Key/value heads.")
_HEAD_DIM = flags.DEFINE_integer("head_dim", 128, "Head dim.")
_DOCS = flags.DEFINE_integer("docs", 4, "Documents packed per row.")
_IMPLS = flags.DEFINE_list("impls", ["xla", "cudnn", "cudnn_causal"], "Implementations.")
_ITERS = flags.DEFINE_integer("iters", 20, "Calls per timing batch.")


def main(argv):
  del argv
  b, length, n, k, h = _BATCH.value, _SEQ.value, _HEADS.value, _KV.value, _HEAD_DIM.value
  keys = jax.random.split(jax.random.key(0), 4)
  q = jax.random.normal(keys[0], (b, length, n, h), jnp.bfloat16)
  kk = jax.random.normal(keys[1], (b, length, k, h), jnp.bfloat16)
  v = jax.random.normal(keys[2], (b, length, k, h), jnp.bfloat16)
  dout = jax.random.normal(keys[3], (b, length, n, h), jnp.bfloat16)
  segment_ids = jnp.asarray(np.repeat(np.arange(1, _DOCS.value + 1), length // _DOCS.value)
                            [None].repeat(b, 0).astype(np.int32))
  flops = 3 * 4 * b * n * h * length * (length + 1) / 2
  print(f"{'impl':<14} {'ms':>8} {'TFLOP/s':>8}", flush=True)
  for impl in _IMPLS.value:
    def loss(q, kk, v, impl=impl):
      out = attention.dot_product_attention(q, kk, v, segment_ids, impl)
      return jnp.sum(out.astype(jnp.float32) * dout)
    fn = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
    try:
      seconds = profiling.time_queued(fn, q, kk, v, calls=_ITERS.value)
    except Exception as e:  # pylint: disable=broad-except  (report and go on)
      print(f"{impl:<14} failed: {type(e).__name__}: {str(e)[:200]}", flush=True)
      continue
    print(f"{impl:<14} {seconds * 1e3:8.2f} {flops / seconds / 1e12:8.0f}", flush=True)


if __name__ == "__main__":
  app.run(main)
