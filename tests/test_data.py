"""Tests for ling_jax.data: packing against a reference, coverage, splits, resume, sources."""

import functools
import json
import pathlib
import sysconfig

import grain
import numpy as np
import pytest

from ling_jax import data
from ling_jax import tokenizer as tokenizer_lib

_BYTES = tokenizer_lib.ByteTokenizer()
_KEYS = ("inputs", "targets", "segment_ids", "positions")


def _write_corpus(root: pathlib.Path, num_files: int = 24) -> list[str]:
  """Writes .py/.txt files of varied length (some non-ASCII, one empty) plus files to skip."""
  rng = np.random.default_rng(0)
  rel_paths = []
  for i in range(num_files):
    rel = f"pkg{i % 3}/sub{i % 2}/mod_{i:02d}." + ("txt" if i % 5 == 4 else "py")
    body = "".join(rng.choice(list("abcdefgh é世\n"), size=int(rng.integers(0, 150))))
    text = "" if i == 7 else f"# file {i}\n{body}"
    (root / rel).parent.mkdir(parents=True, exist_ok=True)
    (root / rel).write_bytes(text.encode("utf-8"))
    rel_paths.append(rel)
  for skipped in ("README.md", "__pycache__/cached.py", "site-packages/dep.py", ".git/x.py"):
    (root / skipped).parent.mkdir(parents=True, exist_ok=True)
    (root / skipped).write_text("skip me")
  return sorted(rel_paths)


def _cfg(root: pathlib.Path, **fields):
  cfg = data.default_data_config()
  cfg.data_dir = str(root)
  cfg.validation_fraction = 0.25
  cfg.shuffle_window = 8
  cfg.update(fields)
  return cfg


def _texts(root: pathlib.Path, rel_paths: list[str]) -> list[str]:
  return [(root / p).read_bytes().decode("utf-8") for p in rel_paths]


def _documents(batches: list[dict[str, np.ndarray]]) -> list[str]:
  """Returns the texts of the documents laid out in `batches` (rows in stream order)."""
  inputs_T = np.concatenate([b["inputs"][b["segment_ids"] > 0] for b in batches])
  targets_T = np.concatenate([b["targets"][b["segment_ids"] > 0] for b in batches])
  # Across row boundaries too, each target is the next input, or EOS before the next BOS.
  next_T = np.where(inputs_T[1:] == _BYTES.bos_id, _BYTES.eos_id, inputs_T[1:])
  np.testing.assert_array_equal(targets_T[:-1], next_T)
  starts = np.flatnonzero(inputs_T == _BYTES.bos_id)
  return [_BYTES.decode(doc_T) for doc_T in np.split(inputs_T, starts)[1:]]


def _reference_pack(docs: list[np.ndarray], seq_len: int) -> list[np.ndarray]:
  """Concat-then-split one token at a time; each row is [4, seq_len] in _KEYS order."""
  rows, row = [], []
  for doc_T in docs:
    new_segment = True
    for t in range(len(doc_T) - 1):
      if len(row) == seq_len:
        rows.append(row)
        row, new_segment = [], True
      if new_segment:
        segment, position, new_segment = (row[-1][2] + 1 if row else 1), 0, False
      row.append((doc_T[t], doc_T[t + 1], segment, position))
      position += 1
  rows.append(row + [(0, 0, 0, 0)] * (seq_len - len(row)))
  return [np.array(r, dtype=np.int32).T for r in rows]


def _check_packing(batches: list[dict[str, np.ndarray]], batch_size: int, seq_len: int):
  """Asserts shapes, dtypes and the per-row packing invariants of consecutive batches."""
  for batch in batches:
    assert sorted(batch) == sorted(_KEYS)
    for v in batch.values():
      assert v.shape == (batch_size, seq_len) and v.dtype == np.int32
    for inputs, targets, segments, positions in zip(*(batch[k] for k in _KEYS)):
      pad = segments == 0
      assert not (inputs[pad].any() or targets[pad].any() or positions[pad].any())
      real = segments[~pad]
      if not len(real):
        continue  # A padding row.
      assert real[0] == 1 and set(np.diff(real)) <= {0, 1}
      for s in np.unique(real):
        (idx,) = np.nonzero(segments == s)
        np.testing.assert_array_equal(positions[idx], np.arange(len(idx)))
        np.testing.assert_array_equal(targets[idx[:-1]], inputs[idx[1:]])
        # A segment ending inside the row ended its document: no target crosses into the next.
        if idx[-1] < seq_len - 1:
          assert targets[idx[-1]] == _BYTES.eos_id


def test_pack_examples_hand_worked():
  examples = grain.MapDataset.source(["ab", "cde"]).map(
      functools.partial(data.tokenize_document, tokenizer=_BYTES))
  rows = list(data.pack_examples(examples.to_iter_dataset(), seq_len=4))
  bos, eos = _BYTES.bos_id, _BYTES.eos_id
  expected = [
      {"inputs": [bos, 97, 98, bos], "targets": [97, 98, eos, 99],
       "segment_ids": [1, 1, 1, 2], "positions": [0, 1, 2, 0]},
      {"inputs": [99, 100, 101, 0], "targets": [100, 101, eos, 0],
       "segment_ids": [1, 1, 1, 0], "positions": [0, 1, 2, 0]},
  ]
  assert len(rows) == len(expected)
  for row, want in zip(rows, expected):
    for k in _KEYS:
      np.testing.assert_array_equal(row[k], want[k], err_msg=k)


def test_pack_examples_matches_reference():
  rng = np.random.default_rng(1)
  docs = [np.concatenate([[256], rng.integers(0, 256, n), [257]]).astype(np.int32)
          for n in rng.integers(0, 40, size=30)]
  examples = grain.MapDataset.source(docs).map(
      lambda d: {"inputs": d[:-1], "targets": d[1:]})
  rows = list(data.pack_examples(examples.to_iter_dataset(), seq_len=16))
  want = _reference_pack(docs, seq_len=16)
  assert len(rows) == len(want)
  for row, want_row in zip(rows, want):
    np.testing.assert_array_equal(np.stack([row[k] for k in _KEYS]), want_row)


def test_file_order_and_split_are_deterministic_and_disjoint(tmp_path):
  rel_paths = _write_corpus(tmp_path)
  listed = data.list_corpus_files(str(tmp_path), (".py", ".txt"))
  assert listed == rel_paths  # sorted, without README.md, __pycache__, site-packages, .git
  train, validation = data.split_files(listed, 0.25)
  assert (train, validation) == data.split_files(list(listed), 0.25)
  assert not set(train) & set(validation) and sorted(train + validation) == listed
  assert 0 < len(validation) < len(listed)
  # Membership depends only on a file's own path: more files move no existing one.
  train2, validation2 = data.split_files(sorted(listed + ["zzz/new.py"]), 0.25)
  assert set(validation) <= set(validation2) and set(train) <= set(train2)
  assert data.split_files(listed, 0.0) == (listed, [])


def test_eval_batches_hold_every_token_in_order(tmp_path):
  rel_paths = _write_corpus(tmp_path)
  cfg = _cfg(tmp_path, validation_fraction=0.5)
  _, validation = data.split_files(rel_paths, 0.5)
  batches = data.make_eval_batches(cfg, seq_len=32, batch_size=3, max_batches=None)
  _check_packing(batches, batch_size=3, seq_len=32)
  assert _documents(batches) == _texts(tmp_path, validation)
  assert batches[-1]["targets"][batches[-1]["segment_ids"] > 0][-1] == _BYTES.eos_id
  num_tokens = sum(len(t.encode("utf-8")) + 1 for t in _texts(tmp_path, validation))
  assert sum((b["segment_ids"] > 0).sum() for b in batches) == num_tokens
  assert (batches[-1]["segment_ids"][-1] == 0).any()  # The split's end is padded.
  again = data.make_eval_batches(cfg, seq_len=32, batch_size=3, max_batches=2)
  assert len(again) == 2
  for a, b in zip(again, batches):
    for k in _KEYS:
      np.testing.assert_array_equal(a[k], b[k])


def test_train_epochs_cover_each_host_shard_disjointly(tmp_path):
  rel_paths = _write_corpus(tmp_path)
  cfg = _cfg(tmp_path, shuffle_window=0)
  train, _ = data.split_files(rel_paths, cfg.validation_fraction)
  epochs = []
  for process_index in (0, 1):
    it = data.make_train_iterator(cfg, seq_len=32, batch_size=4, seed=3,
                                  process_index=process_index, process_count=2)
    batches = [next(it) for _ in range(40)]
    _check_packing(batches, batch_size=4, seq_len=32)
    docs = _documents(batches)
    shard = _texts(tmp_path, train[process_index::2])
    assert len(docs) > 2 * len(shard)  # two epochs complete, in shuffled order
    first, second = docs[:len(shard)], docs[len(shard):2 * len(shard)]
    assert sorted(first) == sorted(second) == sorted(shard)
    assert first != second and first != shard
    epochs.append(first)
  assert not set(epochs[0]) & set(epochs[1])
  assert sorted(epochs[0] + epochs[1]) == sorted(_texts(tmp_path, train))


def test_train_batches_depend_only_on_seed(tmp_path):
  _write_corpus(tmp_path)
  cfg = _cfg(tmp_path)
  runs = [data.make_train_iterator(cfg, seq_len=16, batch_size=2, seed=s) for s in (5, 5, 6)]
  a, b, c = ([next(it)["inputs"] for _ in range(6)] for it in runs)
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)


@pytest.mark.parametrize("shuffle_window", [0, 8])
@pytest.mark.parametrize("num_taken", [0, 7])
def test_train_resume_from_json_state_is_exact(tmp_path, shuffle_window, num_taken):
  _write_corpus(tmp_path)
  cfg = _cfg(tmp_path, shuffle_window=shuffle_window)
  make = functools.partial(data.make_train_iterator, cfg, seq_len=24, batch_size=3, seed=0)
  it = make()
  for _ in range(num_taken):
    next(it)
  state = json.dumps(it.get_state())
  want = [next(it) for _ in range(5)]
  resumed = make()
  resumed.set_state(json.loads(state))
  for a, b in zip(want, [next(resumed) for _ in range(5)]):
    for k in _KEYS:
      np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_stdlib_corpus_builds_batches():
  cfg = data.default_data_config()
  files = data.list_corpus_files(sysconfig.get_paths()["stdlib"])
  assert len(files) > 100 and "os.py" in files
  assert not any("site-packages" in f for f in files)
  make = functools.partial(data.make_train_iterator, cfg, seq_len=128, batch_size=4, seed=0)
  it = make()
  _check_packing([next(it) for _ in range(7)], batch_size=4, seq_len=128)
  state = json.dumps(it.get_state())
  want = [next(it) for _ in range(5)]
  resumed = make()
  resumed.set_state(json.loads(state))
  for a, b in zip(want, [next(resumed) for _ in range(5)]):
    np.testing.assert_array_equal(a["inputs"], b["inputs"])
  evals = data.make_eval_batches(cfg, seq_len=128, batch_size=4, max_batches=2)
  _check_packing(evals, batch_size=4, seq_len=128)
  assert len(evals) == 2


def test_missing_data_dir_and_bad_source_raise_clear_errors(tmp_path):
  missing = str(tmp_path / "nowhere")
  with pytest.raises(ValueError, match=f"config.data.data_dir: .*{missing}"):
    data.make_train_iterator(_cfg(pathlib.Path(missing)), seq_len=8, batch_size=1, seed=0)
  cfg = data.default_data_config()
  cfg.source = "hf:wikitext"
  with pytest.raises(ValueError, match="config.data.source"):
    data.make_eval_batches(cfg, seq_len=8, batch_size=1, max_batches=1)


def _tiny_tfds_builder(tfds, docs: dict[str, list[str]]):
  """Returns a builder class for `docs` (split -> texts), not registered by name."""

  class LingJaxTinyText(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    VERSION = tfds.core.Version("1.0.0")
    # tfds 4.9.10 finds a packaged builder's code (for checksums.tsv) via `importlib_resources`,
    # a dependency it declares only for Python < 3.9; there are no checksums to find here.
    code_path = None

    def _info(self):
      features = tfds.features.FeaturesDict({"text": tfds.features.Text()})
      return tfds.core.DatasetInfo(builder=self, features=features)

    def _split_generators(self, dl_manager):
      return {split: self._generate_examples(texts) for split, texts in docs.items()}

    def _generate_examples(self, texts):
      for i, text in enumerate(texts):
        yield i, {"text": text}

  return LingJaxTinyText


def test_tfds_source_reads_local_array_record_builder(tmp_path):
  tfds = pytest.importorskip("tensorflow_datasets")
  docs = {"train": [f"train doc {i} é\n" * (i + 1) for i in range(6)],
          "validation": ["validation 世界", "second validation doc"]}
  builder = _tiny_tfds_builder(tfds, docs)(data_dir=str(tmp_path), file_format="array_record")
  builder.download_and_prepare()
  # Found by name from the files in tfds_data_dir; the class is deliberately unregistered.
  cfg = data.default_data_config()
  cfg.update(source="tfds:ling_jax_tiny_text", tfds_data_dir=str(tmp_path), shuffle_window=0)
  evals = data.make_eval_batches(cfg, seq_len=16, batch_size=2, max_batches=None)
  _check_packing(evals, batch_size=2, seq_len=16)
  assert sorted(_documents(evals)) == sorted(docs["validation"])
  it = data.make_train_iterator(cfg, seq_len=16, batch_size=2, seed=0)
  train_docs = _documents([next(it) for _ in range(20)])
  assert sorted(train_docs[:6]) == sorted(docs["train"])

  cfg.source = "tfds:no_such_dataset_xyz"
  with pytest.raises(ValueError, match="config.data.source: no TFDS dataset 'no_such"):
    data.make_eval_batches(cfg, seq_len=16, batch_size=2, max_batches=1)
  cfg.update(source="tfds:ling_jax_tiny_text", tfds_eval_split="test")
  with pytest.raises(ValueError, match="config.data.source: cannot read split 'test'"):
    data.make_eval_batches(cfg, seq_len=16, batch_size=2, max_batches=1)


def test_sharded_batches_do_not_depend_on_the_process_count(tmp_path):
  _write_corpus(tmp_path)
  cfg = _cfg(tmp_path)
  make = functools.partial(data.make_sharded_train_iterator, cfg, seq_len=16,
                           global_batch_size=4, seed=1, num_shards=2)
  one = make()
  two = [make(process_index=p, process_count=2) for p in (0, 1)]
  for _ in range(5):
    whole = next(one)
    halves = [next(it) for it in two]
    for k in _KEYS:
      np.testing.assert_array_equal(whole[k], np.concatenate([h[k] for h in halves]))
  # The two processes' states together resume the one-process iterator, and vice versa.
  merged = {"shards": {**two[0].get_state()["shards"], **two[1].get_state()["shards"]}}
  resumed = make()
  resumed.set_state(json.loads(json.dumps(merged)))
  back = make(process_index=1, process_count=2)
  back.set_state(json.loads(json.dumps(one.get_state())))
  want = next(one)
  np.testing.assert_array_equal(next(resumed)["inputs"], want["inputs"])
  np.testing.assert_array_equal(next(back)["inputs"], want["inputs"][2:])
  with pytest.raises(ValueError, match="num_shards"):
    make(num_shards=4).set_state(merged)


def test_sharded_eval_batches_cover_every_shard(tmp_path):
  _write_corpus(tmp_path, num_files=40)
  cfg = _cfg(tmp_path, validation_fraction=0.5)
  make = functools.partial(data.make_sharded_eval_batches, cfg, seq_len=16, global_batch_size=4,
                           max_batches=None, num_shards=2)
  whole = make()
  halves = [make(process_index=p, process_count=2) for p in (0, 1)]
  assert len(whole) == max(len(h) for h in halves)
  assert len(halves[0]) != len(halves[1])  # The trainer evens out processes like this:
  halves = [data.pad_batches(h, len(whole), rows=2, seq_len=16) for h in halves]
  for k in _KEYS:
    np.testing.assert_array_equal(
        np.concatenate([b[k] for b in whole]),
        np.concatenate([np.concatenate([h[i][k] for h in halves])
                        for i in range(len(halves[0]))]))
  with pytest.raises(ValueError, match="num_shards"):
    make(num_shards=3, process_count=2)


class _CountingBatches:
  """A stand-in source: batch s holds s; its state is the count handed out; fails at `fail_at`."""

  def __init__(self, fail_at: int | None = None):
    self.count, self.fail_at = 0, fail_at

  def next_batch(self, step):
    if step == self.fail_at:
      raise OSError("disk gone")
    self.count += 1
    return {"inputs": np.full((2, 3), step)}

  def get_state(self):
    return {"count": self.count}

  def set_state(self, state):
    self.count = state["count"]


@pytest.mark.parametrize("depth", [0, 1, 3])
def test_prefetcher_hands_out_steps_in_order_and_reports_the_consumed_state(depth):
  source = _CountingBatches()
  batches = data.Prefetcher(source, first_step=5, depth=depth,
                            transform=lambda b: {"inputs": b["inputs"] * 10})
  try:
    assert batches.get_state() == {"count": 0}
    for step in range(5, 9):
      np.testing.assert_array_equal(batches.next_batch(step)["inputs"], np.full((2, 3), 10 * step))
      # The source may be ahead, but the state is that after the batches handed out.
      assert batches.get_state() == {"count": step - 4}
    with pytest.raises(ValueError, match="asked for step 11"):
      batches.next_batch(11)
    batches.set_state({"count": 2}, first_step=7)  # Rewind, as a restore does.
    assert batches.next_batch(7)["inputs"][0, 0] == 70
    assert batches.get_state() == {"count": 3}
  finally:
    batches.close()


def test_prefetcher_raises_the_source_error_at_its_step():
  batches = data.Prefetcher(_CountingBatches(fail_at=2), first_step=0, depth=2)
  try:
    batches.next_batch(0)
    batches.next_batch(1)
    with pytest.raises(OSError, match="disk gone"):
      batches.next_batch(2)
  finally:
    batches.close()
  with pytest.raises(ValueError, match="prefetch_batches"):
    data.Prefetcher(_CountingBatches(), first_step=0, depth=-1)
