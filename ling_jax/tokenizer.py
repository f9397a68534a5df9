"""Tokenizers for the data pipeline: raw UTF-8 bytes (default) or a Hugging Face tokenizer.json.

Both kinds share one small interface (`Tokenizer`): `encode(text)` gives int32 ids without
specials, `decode(ids)` drops specials, and `bos_id`, `eos_id`, `vocab_size` say how to frame
documents and size the embedding. `make_tokenizer(config.data)` picks one.
"""

import pathlib
from typing import Any
from typing import Protocol

import numpy as np
import tokenizers

from ling_jax import config as config_lib

# Tried in order when a tokenizer.json is given without explicit BOS/EOS tokens.
_BOS_CANDIDATES = ("<|begin_of_text|>", "<|startoftext|>", "<bos>", "<s>", "[BOS]",
                   "<|endoftext|>")
_EOS_CANDIDATES = ("<|end_of_text|>", "<|endoftext|>", "<eos>", "</s>", "[EOS]")


class Tokenizer(Protocol):
  """What the data pipeline and the samplers need from a tokenizer."""

  bos_id: int
  eos_id: int
  vocab_size: int

  def encode(self, text: str) -> np.ndarray: ...

  def decode(self, ids: Any) -> str: ...


class ByteTokenizer:
  """Maps text to its UTF-8 bytes (ids 0..255); 256 and 257 are BOS and EOS."""

  bos_id = 256
  eos_id = 257
  vocab_size = 258

  def encode(self, text: str) -> np.ndarray:
    """Returns the UTF-8 bytes of `text` as int32 ids."""
    return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32)

  def decode(self, ids: Any) -> str:
    """Returns the text of `ids`, skipping specials; broken UTF-8 decodes to U+FFFD."""
    ids = np.asarray(ids).reshape(-1)
    return ids[ids < 256].astype(np.uint8).tobytes().decode("utf-8", errors="replace")


class HFTokenizer:
  """Wraps a Hugging Face `tokenizers` tokenizer.json behind the `Tokenizer` interface."""

  def __init__(self, path: str, *, bos_token: str | None = None,
               eos_token: str | None = None):
    self.path = str(path)
    self._tokenizer = tokenizers.Tokenizer.from_file(self.path)
    self.vocab_size = self._tokenizer.get_vocab_size(with_added_tokens=True)
    self.bos_id = self._special_id(bos_token, _BOS_CANDIDATES, "bos_token")
    self.eos_id = self._special_id(eos_token, _EOS_CANDIDATES, "eos_token")

  def _special_id(self, token: str | None, candidates: tuple[str, ...], field: str) -> int:
    """Returns the id of `token`, or of the first candidate the file declares special."""
    if token is not None:
      token_id = self._tokenizer.token_to_id(token)
      if token_id is None:
        raise config_lib.ConfigError(f"config.data.{field}: {token!r} is not in the vocabulary of "
                         f"{self.path}. Fix: use a token that tokenizer.json defines.")
      return token_id
    specials = {t.content: i for i, t in self._tokenizer.get_added_tokens_decoder().items()
                if t.special}
    for candidate in candidates:
      if candidate in specials:
        return specials[candidate]
    raise config_lib.ConfigError(
        f"config.data.{field}: {self.path} declares none of {candidates} as a "
        f"special token (it has {sorted(specials)}). Fix: set "
        f"config.data.{field} to the token to use.")

  def encode(self, text: str) -> np.ndarray:
    """Returns the ids of `text` as int32, without the file's post-processor specials."""
    ids = self._tokenizer.encode(text, add_special_tokens=False).ids
    return np.asarray(ids, dtype=np.int32)

  def decode(self, ids: Any) -> str:
    """Returns the text of `ids`, skipping special tokens."""
    return self._tokenizer.decode(np.asarray(ids).reshape(-1).tolist(),
                                  skip_special_tokens=True)


def make_tokenizer(data_cfg: Any) -> ByteTokenizer | HFTokenizer:
  """Returns the tokenizer `config.data.tokenizer` names: "byte" or a tokenizer.json path."""
  name = data_cfg.get("tokenizer") or "byte"
  if name == "byte":
    return ByteTokenizer()
  if not pathlib.Path(name).is_file():
    raise config_lib.ConfigError(
        f"config.data.tokenizer: {name!r} is neither 'byte' nor an existing "
        "file. Fix: pass 'byte' or the path of a tokenizer.json.")
  return HFTokenizer(name, bos_token=data_cfg.get("bos_token"),
                     eos_token=data_cfg.get("eos_token"))
