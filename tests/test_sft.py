"""SFT data: chat rendering, DFT modes, and the assistant-only loss mask, token by token."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ling_jax import config as config_lib
from ling_jax import data as data_lib
from ling_jax import sft
from ling_jax import tokenizer as tokenizer_lib
from ling_jax import train as train_lib

TOK = tokenizer_lib.ByteTokenizer()
PROMPTS = {"instant": "Be brief.", "deep": "Think first."}
CHAT = [{"role": "system", "content": "You are Ling."},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "and 3+3?"},
        {"role": "assistant", "content": "<think>3 and 3</think>6"}]


def _expected_mask(messages):
  """Per byte of the rendered chat, 1 on assistant content and its <|role_end|>; by hand."""
  text, mask = "", []
  for message in messages:
    header = {"system": "<role>SYSTEM</role>", "user": "<role>HUMAN</role>",
              "assistant": "<role>ASSISTANT</role>"}[message["role"]]
    body = message["content"] + "<|role_end|>"
    text += header + body
    mask += [0] * len(header.encode()) + [int(message["role"] == "assistant")] * len(body.encode())
  return text, mask


def test_loss_mask_is_exactly_the_assistant_tokens_token_by_token():
  example = sft.tokenize_chat(CHAT, TOK)
  text, byte_mask = _expected_mask(CHAT)
  assert text == tokenizer_lib.render_chat(CHAT, add_generation_prompt=False)
  # Framed as [bos] + text + [eos]; targets are the tokens after each input.
  ids = [TOK.bos_id] + list(text.encode()) + [TOK.eos_id]
  np.testing.assert_array_equal(example["inputs"], ids[:-1])
  np.testing.assert_array_equal(example["targets"], ids[1:])
  want = byte_mask + [0]  # The final eos target is not trained.
  for t, (got_bit, want_bit) in enumerate(zip(example["loss_mask"].tolist(), want)):
    assert got_bit == want_bit, (t, chr(example["targets"][t]) if example["targets"][t] < 256
                                 else example["targets"][t])
  trained = bytes(int(x) for x in example["targets"][example["loss_mask"] == 1]).decode()
  assert trained == "4<|role_end|><think>3 and 3</think>6<|role_end|>"


def test_dft_mode_selects_the_system_prompt():
  record = {"messages": CHAT[1:3], "mode": "deep"}
  messages = sft.with_mode(record, PROMPTS)
  assert messages[0] == {"role": "system", "content": "Think first."}
  example = sft.tokenize_record(record, TOK, PROMPTS)
  assert TOK.decode(example["inputs"]).startswith("<role>SYSTEM</role>Think first.<|role_end|>")
  instant = sft.tokenize_record({"messages": CHAT[1:3], "mode": "instant"}, TOK, PROMPTS)
  assert TOK.decode(instant["inputs"]).startswith("<role>SYSTEM</role>Be brief.<|role_end|>")
  # The mode changes the prompt, never the trained tokens.
  for ex in (example, instant):
    assert bytes(ex["targets"][ex["loss_mask"] == 1].tolist()).decode() == "4<|role_end|>"
  plain = sft.tokenize_record({"messages": CHAT[1:3]}, TOK, PROMPTS)
  assert TOK.decode(plain["inputs"]).startswith("<role>HUMAN</role>")


def test_truncation_keeps_the_mask_aligned():
  example = sft.tokenize_record({"messages": CHAT}, TOK, PROMPTS, max_length=70)
  full = sft.tokenize_chat(CHAT, TOK)
  assert all(len(v) == 70 for v in example.values())
  for k in example:
    np.testing.assert_array_equal(example[k], full[k][:70])


@pytest.mark.parametrize("line, fragment", [
    ("{not json", "not valid JSON"),
    (json.dumps({"text": "hi"}), "'messages' list"),
    (json.dumps({"messages": [{"role": "user", "content": "hi"}]}), "no assistant message"),
    (json.dumps({"messages": CHAT[1:3], "mode": "slow"}), "unknown mode"),
    (json.dumps({"messages": CHAT, "mode": "deep"}), "own system message"),
    (json.dumps({"messages": [{"role": "bot", "content": "x"}]}), "not a chat role"),
])
def test_bad_records_name_the_file_and_line(tmp_path, line, fragment):
  path = tmp_path / "sft.jsonl"
  path.write_text(json.dumps({"messages": CHAT[1:3]}) + "\n" + line + "\n")
  with pytest.raises(config_lib.ConfigError, match="Fix") as e:
    sft.read_records(str(path), 0.5)
  assert f"{path}:2" in str(e.value) and fragment in str(e.value)


def _write_records(path, count):
  rng = np.random.default_rng(0)
  with open(path, "w") as f:
    for i in range(count):
      a, b = (int(x) for x in rng.integers(0, 50, size=2))
      record = {"messages": [{"role": "user", "content": f"{a}+{b}?"},
                             {"role": "assistant", "content": str(a + b)}]}
      if i % 2:
        record["mode"] = "instant"
      f.write(json.dumps(record) + "\n")


def _chat_data_config(path):
  cfg = data_lib.default_data_config()
  cfg.source = "jsonl"
  cfg.data_dir = str(path)
  cfg.validation_fraction = 0.25
  cfg.sft_system_prompts.instant = "Be brief."
  return cfg


def test_packed_chat_batches_train_only_assistant_tokens(tmp_path):
  path = tmp_path / "chat.jsonl"
  _write_records(path, 24)
  cfg = _chat_data_config(path)
  train, validation = sft.read_records(str(path), 0.25)
  assert len(train) + len(validation) == 24 and validation
  batches = data_lib.make_sharded_eval_batches(cfg, seq_len=128, global_batch_size=4,
                                               max_batches=None, num_shards=2)
  want_replies = sorted(m["content"] + "<|role_end|>" for r in validation
                        for m in r["messages"] if m["role"] == "assistant")
  replies = []
  for batch in batches:
    assert set(batch) == set(data_lib.batch_features(cfg))
    for b in range(4):
      seg, mask, tgt = batch["segment_ids"][b], batch["loss_mask"][b], batch["targets"][b]
      assert not mask[seg == 0].any()  # Padding is never trained.
      for s in set(seg[seg > 0].tolist()):
        piece = seg == s
        # Records are never split across rows: each segment starts with bos and ends in eos.
        assert batch["inputs"][b][piece][0] == TOK.bos_id and tgt[piece][-1] == TOK.eos_id
        replies.append(bytes(tgt[piece & (mask == 1)].tolist()).decode())
  assert sorted(replies) == want_replies


def test_train_loss_ignores_every_non_assistant_position():
  # The loss masks the trainer builds (main head and MTP depth 1) and their gradients.
  example = sft.tokenize_chat(CHAT, TOK)
  length = len(example["inputs"])
  batch = {"inputs": example["inputs"][None], "targets": example["targets"][None],
           "segment_ids": np.ones((1, length), np.int32), "loss_mask": example["loss_mask"][None],
           "positions": np.arange(length, dtype=np.int32)[None]}
  mask0 = np.asarray(train_lib.loss_masks(batch, 0))[0]
  np.testing.assert_array_equal(mask0, example["loss_mask"])
  mask1 = np.asarray(train_lib.loss_masks(batch, 1))[0]
  # MTP's target at t is targets[t + 1]: trained iff that token is an assistant token.
  np.testing.assert_array_equal(mask1[:-1], example["loss_mask"][1:])
  assert mask1[-1] == 0
  logits = jax.random.normal(jax.random.key(0), (1, length, 258))
  grads = jax.grad(lambda x: train_lib.cross_entropy_sum(
      x, jnp.asarray(batch["targets"]), train_lib.loss_masks(batch, 0)))(logits)
  touched = np.asarray(jnp.any(grads[0] != 0, axis=-1))
  np.testing.assert_array_equal(touched, example["loss_mask"] == 1)
  # And the value: a NumPy cross-entropy over the assistant positions only.
  lg = np.asarray(logits[0], np.float64)
  logz = np.log(np.exp(lg - lg.max(-1, keepdims=True)).sum(-1)) + lg.max(-1)
  ce = logz - lg[np.arange(length), example["targets"]]
  got = float(train_lib.cross_entropy_sum(logits, jnp.asarray(batch["targets"]),
                                          train_lib.loss_masks(batch, 0)))
  assert got == pytest.approx(float(ce[example["loss_mask"] == 1].sum()), rel=1e-5)
