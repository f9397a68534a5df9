"""Tokenizers for the data pipeline: raw UTF-8 bytes (default) or a Hugging Face tokenizer.json.

Both kinds share one small interface (`Tokenizer`): `encode(text)` gives int32 ids without
specials, `decode(ids)` drops specials, and `bos_id`, `eos_id`, `vocab_size` say how to frame
documents and size the embedding. `make_tokenizer(config.data)` picks one.

`HFTokenizer.from_model_dir(dir)` loads a released model's tokenizer (tokenizer.json, its
special tokens from tokenizer_config.json and the stop tokens from generation_config.json), and
`render_chat` writes the Ling 2.0 chat format the released chat models were tuned on:

    <role>SYSTEM</role>...<|role_end|><role>HUMAN</role>...<|role_end|><role>ASSISTANT</role>
"""

import json
import os
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


ROLE_END = "<|role_end|>"
# Chat roles to the role names of the Ling 2.0 chat format.
CHAT_ROLES = {"system": "SYSTEM", "user": "HUMAN", "assistant": "ASSISTANT",
              "tool": "OBSERVATION"}


def render_chat(messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
  """Returns `messages` ({"role", "content"} dicts) in the Ling 2.0 chat format.

  Each message is `<role>ROLE</role>content<|role_end|>` (user is HUMAN); with
  `add_generation_prompt` the text ends with `<role>ASSISTANT</role>` for the reply, which the
  model ends with `<|role_end|>`.
  """
  parts = []
  for i, message in enumerate(messages):
    role = CHAT_ROLES.get(str(message.get("role", "")).lower())
    if role is None:
      config_lib.fail(f"messages[{i}].role", f"{message.get('role')!r} is not a chat role",
                      f"use one of {sorted(CHAT_ROLES)}")
    parts.append(f"<role>{role}</role>{message.get('content', '')}{ROLE_END}")
  if add_generation_prompt:
    parts.append("<role>ASSISTANT</role>")
  return "".join(parts)


def _token_text(value: Any) -> str | None:
  """Returns the text of a tokenizer_config.json token entry (a string or an AddedToken dict)."""
  return value.get("content") if isinstance(value, dict) else value


class HFTokenizer:
  """Wraps a Hugging Face `tokenizers` tokenizer.json behind the `Tokenizer` interface."""

  def __init__(self, path: str, *, bos_token: str | None = None,
               eos_token: str | None = None, stop_ids: tuple[int, ...] = ()):
    self.path = str(path)
    self._tokenizer = tokenizers.Tokenizer.from_file(self.path)
    self.vocab_size = self._tokenizer.get_vocab_size(with_added_tokens=True)
    self.bos_id = self._special_id(bos_token, _BOS_CANDIDATES, "bos_token")
    self.eos_id = self._special_id(eos_token, _EOS_CANDIDATES, "eos_token")
    # Tokens that end a generated reply (EOS, and the chat format's <|role_end|>).
    role_end = self._tokenizer.token_to_id(ROLE_END)
    extra = () if role_end is None else (role_end,)
    self.stop_ids = tuple(dict.fromkeys((*stop_ids, self.eos_id, *extra)))

  @classmethod
  def from_model_dir(cls, model_dir: str) -> "HFTokenizer":
    """Returns the tokenizer of a released model directory (tokenizer.json and its configs)."""
    path = os.path.join(model_dir, "tokenizer.json")
    if not os.path.exists(path):
      raise config_lib.ConfigError(f"{path} does not exist. Fix: copy the released "
                                   "tokenizer.json into the model directory.")
    special: dict[str, Any] = {}
    config_path = os.path.join(model_dir, "tokenizer_config.json")
    if os.path.exists(config_path):
      with open(config_path) as f:
        special = json.load(f)
      template = special.get("chat_template")
      if isinstance(template, str) and "<role>" not in template:
        raise config_lib.ConfigError(
            f"{config_path}: its chat_template is not the Ling 2.0 format (<role>...</role>). "
            "Fix: render prompts yourself and call encode().")
    stop_ids: tuple[int, ...] = ()
    generation_path = os.path.join(model_dir, "generation_config.json")
    if os.path.exists(generation_path):
      with open(generation_path) as f:
        eos = json.load(f).get("eos_token_id")
      stop_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
    return cls(path, bos_token=_token_text(special.get("bos_token")),
               eos_token=_token_text(special.get("eos_token")), stop_ids=stop_ids)

  def encode_chat(self, messages: list[dict[str, str]],
                  add_generation_prompt: bool = True) -> np.ndarray:
    """Returns the ids of `messages` in the Ling 2.0 chat format (specials as single ids)."""
    return self.encode(render_chat(messages, add_generation_prompt))

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
