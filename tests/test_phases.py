"""Training phases: presets, batch ramps, data mixtures, and the pretrain -> long_context -> sft
chain, each phase starting from the one before (run as a user would, on a micro model)."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from configs import phases as phases_config
from ling_jax import checkpoint as checkpoint_lib
from ling_jax import config as config_lib
from ling_jax import data as data_lib
from ling_jax import metrics as metrics_lib
from ling_jax import phases
from ling_jax import sft
from ling_jax import trainer
from tests import test_trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_CACHE = test_trainer._CACHE  # The session's persistent XLA cache.


def test_presets_set_each_phase():
  pre = phases_config.get_config("pretrain")
  assert pre.variant == "mini" and pre.train.seq_len == 4096
  assert pre.train.expert_bias_update_rate == 1e-3 and pre.model.rope_scaling is None
  assert pre.train.batch_size == 4400 and pre.train.batch_size_ramp_start == 1100
  assert pre.train.batch_size_ramp_steps == int(500e9 / (4400 * 4096))
  long = phases_config.get_config("long_context,yarn=8")
  assert long.train.seq_len == long.model.max_position_embeddings == 32_768
  assert long.model.rope_theta == 600_000.0 and long.train.expert_bias_update_rate == 1e-4
  assert dict(long.model.rope_scaling) == {"type": "yarn", "factor": 8.0,
                                           "original_max_position_embeddings": 4096}
  assert long.train.batch_size == 550  # 4400 x 4K tokens kept at 32K
  assert long.train.num_steps == int(150e9 / (550 * 32_768))
  assert pre.train.loss_chunk_len == 0 and long.train.loss_chunk_len == 4096
  assert phases_config.get_config("long_context").model.rope_scaling is None
  mid = phases_config.get_config("midtrain")
  assert mid.data.mixture == "general=0.5,reasoning=0.5" and mid.train.init_mode == "params"
  sft = phases_config.get_config("sft,variant=tiny,seq_len=256")
  assert sft.data.source == "jsonl" and sft.train.seq_len == 256
  assert sft.train.expert_bias_update_rate == 1e-4 and sft.train.loss_chunk_len == 0  # 256
  with pytest.raises(ValueError, match="Unknown phase"):
    phases_config.get_config("anneal")


def test_batch_size_ramp_is_linear_in_multiples_of_the_start():
  t = phases_config.get_config("pretrain,variant=tiny").train
  t.batch_size, t.batch_size_ramp_start, t.batch_size_ramp_steps = 16, 4, 6
  # K = 4 multiples; step s: 4 * (1 + floor(3 s / 6)).
  assert [phases.batch_size_at(t, s) for s in range(8)] == [4, 4, 8, 8, 12, 12, 16, 16]
  t.batch_size_ramp_start = None
  assert phases.batch_size_at(t, 0) == 16

  class Counter:
    def __init__(self):
      self.i = 0

    def __next__(self):
      self.i += 1
      return {"inputs": np.full((2, 3), self.i)}

    def get_state(self):
      return {"i": self.i}

    def set_state(self, state):
      self.i = state["i"]

  batches = data_lib.RampedBatches(Counter(), base_rows=2, rows_at=lambda s: 2 * (1 + s))
  assert batches.next_batch(0)["inputs"][:, 0].tolist() == [1, 1]
  assert batches.next_batch(2)["inputs"][:, 0].tolist() == [2, 2, 3, 3, 4, 4]
  assert batches.get_state() == {"i": 4}


def _write_corpus(root, letter, count=6):
  os.makedirs(root, exist_ok=True)
  for i in range(count):
    with open(os.path.join(root, f"{letter}{i}.txt"), "w") as f:
      f.write(letter * 200)


def _mixture_config(tmp_path, weights="a=0.75,b=0.25"):
  _write_corpus(tmp_path / "a", "a")
  _write_corpus(tmp_path / "b", "b")
  cfg = data_lib.default_data_config()
  cfg.shuffle_window = 1
  cfg.mixture = weights
  cfg.sources = {"a": {"data_dir": str(tmp_path / "a")}, "b": {"data_dir": str(tmp_path / "b")}}
  return cfg


def test_mixture_follows_the_weights_and_resumes(tmp_path):
  cfg = _mixture_config(tmp_path)
  it = data_lib.make_train_iterator(cfg, seq_len=16, batch_size=4, seed=0)
  rows = np.concatenate([next(it)["inputs"] for _ in range(10)])
  # A row comes from one source: all its text bytes are 'a' or all 'b'.
  from_a = sum(int(np.any(r == ord("a"))) for r in rows)
  assert not any(np.any(r == ord("a")) and np.any(r == ord("b")) for r in rows)
  assert from_a == 30  # 3/4 of 40 rows, grain interleaves deterministically
  state = json.loads(json.dumps(it.get_state()))
  want = [next(it)["inputs"] for _ in range(3)]
  again = data_lib.make_train_iterator(cfg, seq_len=16, batch_size=4, seed=0)
  again.set_state(state)
  for batch in want:
    np.testing.assert_array_equal(next(again)["inputs"], batch)
  # Validation: each source's held-out files in turn.
  cfg.validation_fraction = 0.2
  evals = data_lib.make_eval_batches(cfg, seq_len=16, batch_size=4, max_batches=1)
  assert len(evals) == 2 and np.any(evals[0]["inputs"] == ord("a"))
  assert np.any(evals[1]["inputs"] == ord("b"))


@pytest.mark.parametrize("field, value, fragment", [
    ("data.mixture", "a=0.75,c=0.25", "no source 'c'"),
    ("data.mixture", "a=-1,b=1", "weight > 0"),
    ("train.init_from", "/nonexistent/phase", "config.train.init_from"),
    ("train.init_mode", "weights", "config.train.init_mode"),
    ("train.batch_size_ramp_start", 3, "config.train.batch_size_ramp_start"),
])
def test_bad_phase_fields_fail_before_compiling(tmp_path, field, value, fragment):
  config = phases_config.get_config("pretrain,variant=tiny,seq_len=32")
  config.data = _mixture_config(tmp_path)
  config.train.batch_size, config.train.batch_size_ramp_start = 8, 4
  if field.startswith("train.init_mode"):
    config.train.init_from = str(tmp_path)
  section, key = field.split(".")
  config[section][key] = value
  with pytest.raises(config_lib.ConfigError, match="Fix") as e:
    trainer.validate_config(config)
  assert fragment in str(e.value)


# --- The CPU chain -------------------------------------------------------------------------

# The phases set seq_len themselves, so only the model flags of test_trainer's micro run.
MICRO = [
    *test_trainer.MICRO_MODEL, "--config.model.num_nextn_predict_layers=0",
    "--config.train.batch_size=4", "--config.train.warmup_steps=2", "--config.train.log_every=1",
    "--config.train.eval_every=1000", "--config.train.eval_batches=2",
    f"--config.train.compilation_cache_dir={_CACHE}",
]


def _run(module, *args):
  result = subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT,
                          env=test_trainer._cached_env(),
                          capture_output=True, text=True, timeout=900)
  assert result.returncode == 0, result.stdout + result.stderr
  return result.stdout


def _records(workdir):
  return metrics_lib.read_jsonl(os.path.join(workdir, "metrics.jsonl"))


def _restore(workdir, step):
  config = trainer.load_config(workdir)
  with checkpoint_lib.Checkpointer(workdir, save_every=1, keep=100) as ckpt:
    return ckpt.restore(step, trainer.abstract_state(config))[0]


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
  root = tmp_path_factory.mktemp("phases")
  rng = np.random.default_rng(0)
  words = ["def", "return", "self", "import", "class", "for", "in", "if", "x", "y", "("]
  os.makedirs(root / "corpus")
  for i in range(16):
    text = "\n".join(" ".join(rng.choice(words, size=10)) for _ in range(20))
    (root / "corpus" / f"f{i:02d}.py").write_text(text)
  with open(root / "sft.jsonl", "w") as f:
    for i in range(24):
      a, b = (int(x) for x in rng.integers(0, 50, size=2))
      reply = str(a + b) if i % 2 else f"<think>{a + b}</think>{a + b}"
      f.write(json.dumps({"messages": [{"role": "user", "content": f"{a}+{b}?"},
                                       {"role": "assistant", "content": reply}],
                          "mode": "deep" if i % 2 == 0 else "instant"}) + "\n")
  dirs = {name: str(root / name) for name in ("pretrain", "long", "sft")}
  corpus = f"--config.data.data_dir={root / 'corpus'}"
  out = {"pretrain": _run(
      "experiments.train", "--config=configs/phases.py:pretrain,variant=tiny,seq_len=32",
      f"--workdir={dirs['pretrain']}", corpus, *MICRO, "--config.train.num_steps=12",
      "--config.train.checkpoint_every=12")}
  # Context extension: twice the length, YaRN x2 over the 32-token pre-training context.
  out["long"] = _run(
      "experiments.train",
      "--config=configs/phases.py:long_context,variant=tiny,seq_len=64,pretrain_len=32,yarn=2",
      f"--workdir={dirs['long']}", corpus, *MICRO, "--config.train.num_steps=3",
      "--config.train.checkpoint_every=1", f"--config.train.init_from={dirs['pretrain']}")
  # DFT on chat records at 128 (YaRN x4 over the same 32), continuing the whole train state.
  out["sft"] = _run(
      "experiments.train", "--config=configs/phases.py:sft,variant=tiny,seq_len=128,yarn=4",
      f"--workdir={dirs['sft']}", f"--config.data.data_dir={root / 'sft.jsonl'}", *MICRO,
      "--config.data.validation_fraction=0.25", "--config.data.sft_system_prompts.deep=T.",
      "--config.data.sft_system_prompts.instant=A.", "--config.train.num_steps=3",
      "--config.train.eval_batches=4",
      "--config.train.checkpoint_every=3", f"--config.train.init_from={dirs['long']}",
      "--config.train.init_mode=full")
  out["eval"] = _run("experiments.evaluate", f"--workdir={dirs['sft']}", "--json")
  return dirs, out


def test_each_phase_starts_from_the_one_before(chain):
  dirs, out = chain
  assert "Initialised from" in out["long"] and "params and expert biases" in out["long"]
  assert "full train state" in out["sft"]
  # long_context, params mode: fresh AdamW and schedule, so step 1 runs at lr 0 and leaves
  # the weights bitwise those of the last pre-training checkpoint.
  pre, long1 = _restore(dirs["pretrain"], 12), _restore(dirs["long"], 1)
  assert _records(dirs["long"])[1]["lr"] == 0.0
  for a, b in zip(jax.tree.leaves(pre.params), jax.tree.leaves(long1.params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert int(long1.step) == 1
  # sft, full mode: the optimiser step and schedule continue (lr is past warmup at step 1).
  long3 = _restore(dirs["long"], 3)
  sft3 = _restore(dirs["sft"], 3)
  assert int(sft3.step) == int(long3.step) + 3 == 6
  sft_config = trainer.load_config(dirs["sft"])
  assert _records(dirs["sft"])[1]["lr"] == pytest.approx(sft_config.train.learning_rate)
  # Each phase's settings are its own.
  long_config = trainer.load_config(dirs["long"])
  assert long_config.train.seq_len == 64 and long_config.model.rope_scaling["factor"] == 2.0
  assert long_config.train.expert_bias_update_rate == 1e-4
  assert trainer.load_config(dirs["pretrain"]).train.expert_bias_update_rate == 1e-3


def test_evaluate_reports_the_assistant_token_loss(chain):
  dirs, out = chain
  result = json.loads(out["eval"].strip().splitlines()[-1])
  assert result["assistant_only"] and result["step"] == 3
  # The same checkpoint and batches the trainer evaluated at its last step.
  final = _records(dirs["sft"])[3]
  assert result["val_loss"] == pytest.approx(final["val_loss"], rel=1e-5)
  # Tokens scored = the assistant tokens (reply + <|role_end|>) of the validation records.
  config = trainer.load_config(dirs["sft"])
  _, validation = sft.read_records(config.data.data_dir, config.data.validation_fraction)
  want = sum(len((m["content"] + "<|role_end|>").encode()) for r in validation
             for m in r["messages"] if m["role"] == "assistant")
  assert result["val_tokens"] == want
