"""Supervised fine-tuning data: JSONL chat records, the Ling chat format, assistant-only loss.

Shape key: T tokens of one record.

A record is one JSON object per line:

    {"messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}],
     "mode": "instant"}

`mode` is optional. DFT (decoupled fine-tuning, Ling 2.0) trains one model in two modes, chosen
by the system prompt: a record with `"mode": "instant"` or `"deep"` is rendered under the system
prompt `config.data.sft_system_prompts.<mode>` (answer only, or reasoning then answer), so the
same weights learn both; such a record must not carry its own system message.

Rendering is the released chat format of `tokenizer.render_chat`: each message is
`<role>ROLE</role>content<|role_end|>`. The loss covers exactly the assistant replies: every
token of an assistant message's `content<|role_end|>` (the model must learn to stop), nothing of
the role headers, system, user or tool messages. A record is framed as [bos] + tokens + [eos]
like a pre-training document; `loss_mask[t]` says whether `targets[t]` is trained.
"""

import hashlib
import json
import os
from typing import Any

import numpy as np

from ling_jax import config as config_lib
from ling_jax import tokenizer as tokenizer_lib

MODES = ("instant", "deep")
_SUFFIXES = (".jsonl",)


def _fail(where: str, problem: str, fix: str) -> None:
  raise config_lib.ConfigError(f"{where}: {problem}. Fix: {fix}.")


def list_jsonl_files(path: str) -> tuple[str, list[str]]:
  """Returns (root, sorted relative paths) of the .jsonl files at `path` (a file or a folder)."""
  if os.path.isfile(path):
    return os.path.dirname(path) or ".", [os.path.basename(path)]
  paths = []
  for dirpath, dirnames, filenames in os.walk(path):
    dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
    rel = os.path.relpath(dirpath, path)
    paths += [os.path.normpath(os.path.join(rel, f)) for f in filenames if f.endswith(_SUFFIXES)]
  return path, sorted(paths)


def check_record(record: Any, where: str) -> dict:
  """Returns `record` if it is a valid chat record; raises ConfigError naming `where` if not."""
  if not isinstance(record, dict) or not isinstance(record.get("messages"), list):
    _fail(where, "a record must be an object with a 'messages' list",
          'write {"messages": [{"role": "user", "content": ...}, ...]}')
  messages = record["messages"]
  for i, message in enumerate(messages):
    if not isinstance(message, dict) or not isinstance(message.get("content"), str):
      _fail(f"{where} messages[{i}]", "each message needs a string 'content'",
            "give every message a role and a content string")
    if str(message.get("role", "")).lower() not in tokenizer_lib.CHAT_ROLES:
      _fail(f"{where} messages[{i}].role", f"{message.get('role')!r} is not a chat role",
            f"use one of {sorted(tokenizer_lib.CHAT_ROLES)}")
  if not any(m["role"].lower() == "assistant" for m in messages):
    _fail(where, "the record has no assistant message, so nothing to learn",
          "add the assistant reply or drop the record")
  mode = record.get("mode")
  if mode is not None:
    if mode not in MODES:
      _fail(f"{where} mode", f"unknown mode {mode!r}", f"use one of {MODES} or leave it out")
    if any(m["role"].lower() == "system" for m in messages):
      _fail(f"{where} mode", f"mode {mode!r} selects the system prompt, but the record has its "
            "own system message", "drop either the mode or the system message")
  return record


def read_records(path: str, validation_fraction: float) -> tuple[list[dict], list[dict]]:
  """Returns the (train, validation) records of the .jsonl files at `path`.

  A record is held out when the hash of `file:line` is below `validation_fraction` (at least
  one when the fraction is positive and there are >= 2 records), so the split is stable.
  """
  root, files = list_jsonl_files(path)
  keyed = []
  for rel in files:
    with open(os.path.join(root, rel), encoding="utf-8") as f:
      for line_no, line in enumerate(f, start=1):
        if not line.strip():
          continue
        where = f"{os.path.join(root, rel)}:{line_no}"
        try:
          record = json.loads(line)
        except json.JSONDecodeError as e:
          _fail(where, f"not valid JSON ({e.msg})", "write one JSON object per line")
        keyed.append((f"{rel}:{line_no}", check_record(record, where)))
  if len(keyed) < 2:
    _fail("config.data.data_dir", f"{path!r} holds {len(keyed)} chat record(s) in .jsonl "
          "files, need >= 2 (train and validation)", "point it at a .jsonl file or folder")
  scores = [int.from_bytes(hashlib.sha256(k.encode()).digest()[:8], "big") / 2**64
            for k, _ in keyed]
  held = {i for i, s in enumerate(scores) if s < validation_fraction}
  if not held and validation_fraction > 0:
    held = {int(np.argmin(scores))}
  train = [r for i, (_, r) in enumerate(keyed) if i not in held]
  return train, [r for i, (_, r) in enumerate(keyed) if i in held]


def with_mode(record: dict, system_prompts: Any) -> list[dict]:
  """Returns the record's messages, preceded by its mode's system prompt when it has a mode."""
  messages = [{"role": m["role"].lower(), "content": m["content"]} for m in record["messages"]]
  mode = record.get("mode")
  if mode is None:
    return messages
  return [{"role": "system", "content": system_prompts[mode]}] + messages


def render_pieces(messages: list[dict]) -> list[tuple[str, bool]]:
  """Returns the chat text as (piece, trained) pairs: role headers and bodies, in order.

  The pieces concatenate to `render_chat(messages, add_generation_prompt=False)`.
  """
  pieces = []
  for message in messages:
    text = tokenizer_lib.render_chat([message], add_generation_prompt=False)
    body = message["content"] + tokenizer_lib.ROLE_END
    header = text[:len(text) - len(body)]
    assert header + body == text, "render_chat no longer ends a message with content+role_end"
    pieces += [(header, False), (body, message["role"] == "assistant")]
  return pieces


def tokenize_chat(messages: list[dict], tokenizer: Any) -> dict[str, np.ndarray]:
  """Returns {inputs, targets, loss_mask} of a chat framed as [bos] + tokens + [eos].

  Pieces are encoded one by one so each token knows whether it is an assistant token; the role
  tags and <|role_end|> are special tokens of the released tokenizer (single bytes for the byte
  tokenizer), so the ids equal those of encoding the whole rendered text.
  """
  ids, trained = [np.asarray([tokenizer.bos_id], np.int32)], [np.zeros(1, np.int32)]
  for text, is_trained in render_pieces(messages):
    piece_T = np.asarray(tokenizer.encode(text), np.int32)
    ids.append(piece_T)
    trained.append(np.full(piece_T.shape, int(is_trained), np.int32))
  ids.append(np.asarray([tokenizer.eos_id], np.int32))
  trained.append(np.zeros(1, np.int32))
  ids_T, trained_T = np.concatenate(ids), np.concatenate(trained)
  return {"inputs": ids_T[:-1], "targets": ids_T[1:], "loss_mask": trained_T[1:]}


def tokenize_record(record: dict, tokenizer: Any, system_prompts: Any,
                    max_length: int | None = None) -> dict[str, np.ndarray]:
  """Returns the training example of one record (mode applied), cut to `max_length` tokens."""
  example = tokenize_chat(with_mode(record, system_prompts), tokenizer)
  if max_length is not None:
    example = {k: v[:max_length] for k, v in example.items()}
  return example
