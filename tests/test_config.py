"""Bad model configs fail with a ValueError naming the field, before anything is traced."""

import jax
import pytest

from configs import ling2
from ling_jax import config as config_lib
from ling_jax import model
from ling_jax import trainer


@pytest.mark.parametrize("variant", ["tiny", "small", "mini", "flash", "1t"])
def test_released_and_small_configs_are_valid(variant):
  config_lib.validate_model_config(ling2.model_config(variant))


@pytest.mark.parametrize("arg", ["tiny", "small", "mini", "flash", "1t", "mini_h200"])
def test_experiment_configs_are_valid(arg, monkeypatch):
  """The whole configs the jobs take (model, train, data, mesh), e.g. mini_h200's loss chunks
  dividing its sequence, on one device as mini_h200 runs (its 12 rows do not split over 8)."""
  monkeypatch.setattr(jax, "device_count", lambda: 1)
  trainer.validate_config(ling2.get_config(arg))


def test_1t_uses_rotary_dim_and_others_the_factor():
  assert config_lib.rotary_dim(ling2.model_config("1t")) == 64
  assert config_lib.rotary_dim(ling2.model_config("mini")) == 64


@pytest.mark.parametrize("field, value, fragment", [
    ("num_key_value_heads", 3, "num_attention_heads"),
    ("num_experts_per_tok", 3, "num_experts_per_tok"),
    ("n_group", 3, "num_experts"),
    ("topk_group", 5, "topk_group"),
    ("rotary_dim", 40, "rotary_dim"),
    ("first_k_dense_replace", 5, "first_k_dense_replace"),
    ("hidden_size", 0, "hidden_size"),
    ("dtype", "float8", "dtype"),
    ("remat_policy", "sometimes", "remat_policy"),
    ("embedding_backward", "atomic", "embedding_backward"),
])
def test_bad_config_names_the_field(field, value, fragment, monkeypatch):
  m = ling2.model_config("tiny")
  m[field] = value

  def traced(*args, **kwargs):
    raise AssertionError("the model was traced before the config was checked")

  monkeypatch.setattr(model.Ling2, "init", traced)
  with pytest.raises(ValueError, match=f"config.model.{fragment}.*Fix:"):
    model.init_variables(m, jax.random.key(0))


def test_unknown_variant():
  with pytest.raises(ValueError, match="tiny, small, mini, flash, 1t"):
    ling2.get_config("huge")


def test_cudnn_attention_off_gpu_names_the_field():
  """A GPU config (mini_h200's cuDNN attention) on CPU: a ConfigError while tracing, not XLA's
  "cuDNN is not detected" from the compiler."""
  m = ling2.model_config("tiny")
  m.attention_impl = "cudnn_causal"
  with pytest.raises(config_lib.ConfigError,
                     match=r"config.model.attention_impl: 'cudnn_causal' .* backend is cpu\. "
                           r"Fix: use attention_impl='xla' off GPUs"):
    jax.eval_shape(lambda: model.init_variables(m, jax.random.key(0)))
