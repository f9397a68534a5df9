"""Tests for ling_jax.tokenizer: byte round trips, a tokenizer.json built on the spot, and the
released models' directory layout and chat format."""

import json

import ml_collections
import numpy as np
import pytest
import tokenizers
from tokenizers import decoders
from tokenizers import models
from tokenizers import pre_tokenizers
from tokenizers import trainers

from ling_jax import tokenizer as tokenizer_lib

_TEXT = "def f(x):\n  return 'héllo wörld 世界 🙂'  # ok\n"


def _data_cfg(**fields) -> ml_collections.ConfigDict:
  cfg = ml_collections.ConfigDict({"tokenizer": "byte", "bos_token": None, "eos_token": None})
  cfg.update(fields)
  return cfg


def _build_tokenizer_json(path, special_tokens: list[str]) -> str:
  """Trains a tiny byte-level BPE on a few lines and saves it as tokenizer.json."""
  tok = tokenizers.Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=special_tokens,
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator([_TEXT, "import os\nprint(os.path)\n"] * 10, trainer=trainer)
  tok.save(str(path))
  return str(path)


def test_byte_tokenizer_round_trips_non_ascii():
  tok = tokenizer_lib.ByteTokenizer()
  ids = tok.encode(_TEXT)
  assert ids.dtype == np.int32
  np.testing.assert_array_equal(ids, np.frombuffer(_TEXT.encode("utf-8"), np.uint8))
  assert tok.decode(ids) == _TEXT
  assert (tok.bos_id, tok.eos_id, tok.vocab_size) == (256, 257, 258)


def test_byte_tokenizer_decode_skips_specials():
  tok = tokenizer_lib.ByteTokenizer()
  ids = np.concatenate([[tok.bos_id], tok.encode("ab"), [tok.eos_id], tok.encode("é")])
  assert tok.decode(ids) == "abé"
  assert tok.encode("").shape == (0,)


def test_hf_tokenizer_from_local_json(tmp_path):
  path = _build_tokenizer_json(tmp_path / "tokenizer.json", ["<s>", "</s>", "<pad>"])
  tok = tokenizer_lib.make_tokenizer(_data_cfg(tokenizer=path))
  assert isinstance(tok, tokenizer_lib.HFTokenizer)
  raw = tokenizers.Tokenizer.from_file(path)
  assert (tok.bos_id, tok.eos_id) == (raw.token_to_id("<s>"), raw.token_to_id("</s>"))
  assert tok.vocab_size == raw.get_vocab_size(with_added_tokens=True)
  ids = tok.encode(_TEXT)
  assert ids.dtype == np.int32 and len(ids) < len(_TEXT.encode("utf-8"))
  assert tok.decode(np.concatenate([[tok.bos_id], ids, [tok.eos_id]])) == _TEXT


def test_hf_tokenizer_explicit_and_missing_specials(tmp_path):
  path = _build_tokenizer_json(tmp_path / "tokenizer.json", ["<pad>", "<|sep|>"])
  with pytest.raises(ValueError, match="config.data.bos_token"):
    tokenizer_lib.HFTokenizer(path)
  tok = tokenizer_lib.make_tokenizer(_data_cfg(tokenizer=path, bos_token="<|sep|>",
                                               eos_token="<pad>"))
  assert (tok.bos_id, tok.eos_id) == (1, 0)
  with pytest.raises(ValueError, match="config.data.eos_token"):
    tokenizer_lib.HFTokenizer(path, bos_token="<pad>", eos_token="<nope>")


def test_make_tokenizer_default_and_bad_path(tmp_path):
  assert isinstance(tokenizer_lib.make_tokenizer(_data_cfg()), tokenizer_lib.ByteTokenizer)
  with pytest.raises(ValueError, match="config.data.tokenizer"):
    tokenizer_lib.make_tokenizer(_data_cfg(tokenizer=str(tmp_path / "missing.json")))


_LING_SPECIALS = ["<|startoftext|>", "<|endoftext|>", "<role>", "</role>", "<|role_end|>"]


def test_render_chat_is_the_ling2_format():
  messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
              {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "2+2?"}]
  assert tokenizer_lib.render_chat(messages) == (
      "<role>SYSTEM</role>Be brief.<|role_end|><role>HUMAN</role>Hi<|role_end|>"
      "<role>ASSISTANT</role>Hello.<|role_end|><role>HUMAN</role>2+2?<|role_end|>"
      "<role>ASSISTANT</role>")
  assert tokenizer_lib.render_chat(messages[1:2], add_generation_prompt=False) == (
      "<role>HUMAN</role>Hi<|role_end|>")
  with pytest.raises(ValueError, match=r"config\.messages\[0\]\.role"):
    tokenizer_lib.render_chat([{"role": "narrator", "content": "x"}])


def _model_dir(tmp_path, template="{{ '<role>' + role + '</role>' }}"):
  _build_tokenizer_json(tmp_path / "tokenizer.json", _LING_SPECIALS)
  (tmp_path / "tokenizer_config.json").write_text(json.dumps({
      "bos_token": "<|startoftext|>",
      "eos_token": {"content": "<|endoftext|>", "special": True}, "chat_template": template}))
  return tmp_path


def test_released_model_dir_tokenizer_and_chat(tmp_path):
  raw = tokenizers.Tokenizer.from_file(_build_tokenizer_json(tmp_path / "t.json",
                                                             _LING_SPECIALS))
  ids = {t: raw.token_to_id(t) for t in _LING_SPECIALS}
  model_dir = _model_dir(tmp_path)
  (model_dir / "generation_config.json").write_text(json.dumps(
      {"eos_token_id": [ids["<|endoftext|>"], ids["<|role_end|>"]]}))
  tok = tokenizer_lib.HFTokenizer.from_model_dir(str(model_dir))
  assert (tok.bos_id, tok.eos_id) == (ids["<|startoftext|>"], ids["<|endoftext|>"])
  assert tok.stop_ids == (ids["<|endoftext|>"], ids["<|role_end|>"])
  encoded = tok.encode_chat([{"role": "user", "content": "import os"}])
  # The chat markers are single special ids around the user's text.
  assert encoded[0] == ids["<role>"] and encoded[-1] == ids["</role>"]
  assert (encoded == ids["<role>"]).sum() == 2 and (encoded == ids["</role>"]).sum() == 2
  assert (encoded == ids["<|role_end|>"]).sum() == 1
  text_ids = tok.encode("import os")
  start = int(np.flatnonzero(encoded == ids["</role>"])[0]) + 1
  np.testing.assert_array_equal(encoded[start:start + len(text_ids)], text_ids)
  assert "import os" in tok.decode(encoded)


def test_model_dir_without_tokenizer_or_with_another_template(tmp_path):
  with pytest.raises(ValueError, match="tokenizer.json does not exist"):
    tokenizer_lib.HFTokenizer.from_model_dir(str(tmp_path))
  model_dir = _model_dir(tmp_path, template="{{ '<|im_start|>' + message['role'] }}")
  with pytest.raises(ValueError, match="not the Ling 2.0 format"):
    tokenizer_lib.HFTokenizer.from_model_dir(str(model_dir))
