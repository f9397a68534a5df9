"""Tests for ling_jax.tokenizer: byte round trips and a tokenizer.json built on the spot."""

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
