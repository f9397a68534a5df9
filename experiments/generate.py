"""Generates text from a checkpoint: a Hugging Face dir, a converted orbax dir or a run dir.

  # A released chat model, one prompt per --prompt, in the Ling 2.0 chat format:
  python -m experiments.generate --ckpt=/ckpt/Ling-mini-2.0 --chat \
      --prompt="Write a haiku about JAX." --max_new_tokens=64 --temperature=0.7 --top_p=0.9
  # The tiny model trained by `make train` (byte tokenizer), greedy:
  python -m experiments.generate --ckpt=workdirs/tiny --prompt="def main(" --max_new_tokens=80

The tokenizer is the checkpoint dir's tokenizer.json when it has one, else --tokenizer (a
tokenizer.json path, or "byte"). Prompts of different lengths are decoded together.
"""

import os
import sys

import jax
from absl import app
from absl import flags

from ling_jax import config as config_lib
from ling_jax import generate
from ling_jax import hf
from ling_jax import metrics
from ling_jax import tokenizer as tokenizer_lib

_CKPT = flags.DEFINE_string("ckpt", None, "HF dir, orbax dir or training run dir.")
_PROMPTS = flags.DEFINE_multi_string("prompt", None, "A prompt (repeat for a batch).")
_CHAT = flags.DEFINE_bool("chat", False, "Wrap each prompt as a user turn of the chat format.")
_SYSTEM = flags.DEFINE_string("system", None, "Chat mode: a system message.")
_TOKENIZER = flags.DEFINE_string("tokenizer", "byte", "When the ckpt has no tokenizer.json: "
                                 "'byte' or a tokenizer.json path.")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 128, "Tokens to generate per prompt.")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.0, "0 is greedy.")
_TOP_K = flags.DEFINE_integer("top_k", 0, "Keep the k most likely tokens (0: all).")
_TOP_P = flags.DEFINE_float("top_p", 1.0, "Nucleus mass to keep.")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")
_DTYPE = flags.DEFINE_enum("dtype", None, ["float32", "bfloat16"], "Activation dtype.")
flags.mark_flags_as_required(["ckpt", "prompt"])


def _tokenizer(ckpt: str):
  if os.path.exists(os.path.join(ckpt, "tokenizer.json")):
    return tokenizer_lib.HFTokenizer.from_model_dir(ckpt)
  data_cfg = {"tokenizer": _TOKENIZER.value, "bos_token": None, "eos_token": None}
  return tokenizer_lib.make_tokenizer(data_cfg)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  metrics.setup_console()
  try:
    tok = _tokenizer(_CKPT.value)
    prompts = []
    for text in _PROMPTS.value:
      if _CHAT.value:
        messages = ([{"role": "system", "content": _SYSTEM.value}] if _SYSTEM.value else [])
        prompts.append(tok.encode_chat(messages + [{"role": "user", "content": text}]).tolist())
      else:
        prompts.append([tok.bos_id] + tok.encode(text).tolist())
    m, variables = hf.load_pretrained(_CKPT.value, dtype=_DTYPE.value)
    stop = getattr(tok, "stop_ids", (tok.eos_id,))
    result = generate.generate(
        m, variables, prompts, max_new_tokens=_MAX_NEW.value,
        sampling=generate.Sampling(_TEMPERATURE.value, _TOP_K.value, _TOP_P.value),
        stop_tokens=stop, rng=jax.random.key(_SEED.value),
        progress=lambda s: metrics.log("%s", s))
  except config_lib.ConfigError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  for text, tokens, reason in zip(_PROMPTS.value, result.tokens, result.finish_reasons):
    print(f"--- prompt: {text!r} ({reason}, {len(tokens)} tokens)")
    print(tok.decode(tokens))
  metrics.log("prefill %.0f tokens/s, decode %.1f tokens/s", result.prompt_tokens_per_s,
              result.tokens_per_s)


if __name__ == "__main__":
  app.run(main)
