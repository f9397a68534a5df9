"""Parameter counts of a model config, from shapes alone (no memory spent on weights)."""

from typing import Any

import jax
import numpy as np
from flax import traverse_util

from ling_jax import model as model_lib
from ling_jax import moe

_ROUTED = ("wi_gate_up", "wo")  # Routed-expert weights: only top_k of num_experts are active.
_EMBEDDINGS = ("embed", "lm_head")


def abstract_variables(m: Any) -> dict:
  """Returns the ShapeDtypeStructs of the model's variables, without allocating them."""
  return jax.eval_shape(lambda rng: model_lib.init_variables(m, rng), jax.random.key(0))


def count_params(m: Any, include_mtp: bool = False) -> dict[str, int]:
  """Returns total, active and active non-embedding parameter counts, plus expert-bias entries.

  As in the released model cards, the MTP block is left out unless `include_mtp`, and the fp32
  expert bias (a buffer, not a trained weight) is reported on its own.
  """
  if not include_mtp:
    m = m.copy_and_resolve_references()
    m.num_nextn_predict_layers = 0
  variables = abstract_variables(m)
  total = active = embedding = 0
  for path, leaf in traverse_util.flatten_dict(variables["params"]).items():
    size = int(np.prod(leaf.shape))
    total += size
    if path[0] in _EMBEDDINGS:
      embedding += size
    if path[-1] in _ROUTED:
      active += size * m.num_experts_per_tok // m.num_experts
    else:
      active += size
  bias = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(variables.get(moe.STATE, {})))
  return {"total": total, "active": active, "active_non_embedding": active - embedding,
          "embedding": embedding, "expert_bias": bias}
