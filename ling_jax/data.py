"""Text pipelines: a document corpus, tokenised, packed into fixed-length rows, batched.

Shape key: B batch, L sequence length (seq_len), T tokens of one document.

Every batch is a dict of int32 NumPy arrays, all [B, L]:
  inputs, targets  targets[b, t] is the token after inputs[b, t] in the same document;
  segment_ids      1, 2, ... for the document pieces of a row; 0 marks padding (all zeros);
  positions        position within the piece, restarting at 0 for each segment.

Each document is framed as [bos] + tokens + [eos] and split into inputs = doc[:-1] and
targets = doc[1:] before packing, so no target ever comes from another document. Packing is
grain's concat-then-split: documents are laid end to end and cut every L tokens, so rows have
no padding (only the last row of a finite split has some). A document cut at a row boundary
continues as the first segment of the next packed row, with positions restarting at 0: no
token is dropped or repeated, but attention does not reach across the cut.

Sources (`config.data.source`): "stdlib", the Python standard library's .py files found at run
time (or the .py/.txt files under `config.data.data_dir`), one file per document, validation
files held out by a hash of their relative path; or "tfds:NAME[/CONFIG][:VERSION]", a prepared
TFDS dataset read through `tfds.data_source` (array_record files, no TensorFlow needed).
"""

import copy
import functools
import hashlib
import itertools
import os
import pathlib
import sysconfig
from typing import Any
from typing import NoReturn

import grain
import ml_collections
import numpy as np
from grain import experimental as grain_experimental
from ml_collections import config_dict

from ling_jax import config as config_lib
from ling_jax import tokenizer as tokenizer_lib

Batch = dict[str, np.ndarray]

_STDLIB_SUFFIXES = (".py",)
_DATA_DIR_SUFFIXES = (".py", ".txt")
_SKIP_DIRS = ("site-packages", "__pycache__")


def default_data_config() -> ml_collections.ConfigDict:
  """Returns `config.data` with its defaults: byte-level stdlib source code."""
  c = ml_collections.ConfigDict()
  c.source = "stdlib"  # or "tfds:NAME[/CONFIG][:VERSION]"
  c.data_dir = config_dict.placeholder(str)  # .py/.txt corpus replacing the stdlib
  c.max_files = config_dict.placeholder(int)  # first N sorted files (per split for tfds)
  c.validation_fraction = 0.02  # share of files held out, chosen by path hash
  c.tfds_data_dir = config_dict.placeholder(str)  # where the prepared TFDS data lives
  c.tfds_train_split = "train"
  c.tfds_eval_split = "validation"
  c.text_key = "text"  # TFDS feature holding the document text
  c.tokenizer = "byte"  # or the path of a tokenizer.json
  c.bos_token = config_dict.placeholder(str)  # tokenizer.json only; else guessed
  c.eos_token = config_dict.placeholder(str)
  c.shuffle_window = 1024  # packed rows shuffled together, so a batch mixes documents
  c.read_threads = 2  # threads reading and tokenising documents ahead of packing
  c.read_prefetch = 64  # documents read ahead
  c.worker_count = 0  # >0 runs the pipeline in grain worker processes
  return c


def _fail(field: str, problem: str, fix: str) -> NoReturn:
  # `from None`: the message says it all; tfds's own traceback runs to pages.
  raise config_lib.ConfigError(f"config.data.{field}: {problem}. Fix: {fix}.") from None


def validate_data_config(data_cfg: ml_collections.ConfigDict) -> None:
  """Raises ValueError naming the field and the fix when `config.data` cannot work."""
  source = data_cfg.source
  if source != "stdlib" and not (source.startswith("tfds:") and len(source) > 5):
    _fail("source", f"unknown source {source!r}", "use 'stdlib' or 'tfds:NAME'")
  data_dir = data_cfg.data_dir
  if source == "stdlib" and data_dir is not None and not os.path.isdir(data_dir):
    _fail("data_dir", f"directory {data_dir!r} does not exist",
          "point it at a folder of .py/.txt files, or unset it to read the stdlib")
  if not 0.0 <= data_cfg.validation_fraction < 1.0:
    _fail("validation_fraction", f"{data_cfg.validation_fraction} is outside [0, 1)",
          "use e.g. 0.02")
  if data_cfg.max_files is not None and data_cfg.max_files < 1:
    _fail("max_files", f"{data_cfg.max_files} < 1", "unset it or make it positive")
  for field in ("shuffle_window", "worker_count", "read_prefetch"):
    if data_cfg[field] < 0:
      _fail(field, f"{data_cfg[field]} is negative", f"set {field} >= 0")
  if data_cfg.read_threads < 1:
    _fail("read_threads", f"{data_cfg.read_threads} < 1", "set read_threads >= 1")


def list_corpus_files(root: str, suffixes: tuple[str, ...] = _STDLIB_SUFFIXES) -> list[str]:
  """Returns the sorted POSIX paths, relative to `root`, of its text files."""
  paths = []
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = [d for d in dirnames if d not in _SKIP_DIRS and not d.startswith(".")]
    rel_dir = pathlib.Path(dirpath).relative_to(root)
    paths.extend((rel_dir / f).as_posix() for f in filenames if f.endswith(suffixes))
  return sorted(paths)


def _holdout_score(rel_path: str) -> float:
  """Returns a stable pseudo-random number in [0, 1) for a path (not salted like `hash`)."""
  digest = hashlib.sha256(rel_path.encode("utf-8")).digest()
  return int.from_bytes(digest[:8], "big") / 2**64


def split_files(rel_paths: list[str], validation_fraction: float) -> tuple[list[str], list[str]]:
  """Returns (train, validation) paths, holding out those whose path hash is below the fraction.

  Membership depends only on a file's own path, so adding files never moves others between
  splits. The one exception keeps tiny corpora evaluable: when the hash holds out nothing and
  the fraction is positive, the lowest-hash file is held out.
  """
  scores = [_holdout_score(p) for p in rel_paths]
  held_out = {p for p, s in zip(rel_paths, scores) if s < validation_fraction}
  if not held_out and validation_fraction > 0 and len(rel_paths) > 1:
    held_out = {min(zip(scores, rel_paths))[1]}
  train = [p for p in rel_paths if p not in held_out]
  return train, [p for p in rel_paths if p in held_out]


def _read_text(rel_path: str, root: str) -> str:
  with open(os.path.join(root, rel_path), "rb") as f:
    return f.read().decode("utf-8", errors="replace")


def _text_feature(example: dict[str, Any], text_key: str) -> str:
  text = example[text_key]
  return text.decode("utf-8", errors="replace") if isinstance(text, bytes) else str(text)


def _file_documents(data_cfg: ml_collections.ConfigDict, split: str) -> grain.MapDataset:
  """Returns one split of the stdlib (or `data_dir`) files as lazily-read texts."""
  if data_cfg.data_dir is None:
    root, suffixes = sysconfig.get_paths()["stdlib"], _STDLIB_SUFFIXES
  else:
    root, suffixes = data_cfg.data_dir, _DATA_DIR_SUFFIXES
  paths = list_corpus_files(root, suffixes)[:data_cfg.max_files]
  if len(paths) < 2:
    _fail("data_dir", f"{root!r} holds {len(paths)} {'/'.join(suffixes)} file(s), need >= 2",
          "add files or raise config.data.max_files")
  train, validation = split_files(paths, data_cfg.validation_fraction)
  paths = train if split == "train" else validation
  return grain.MapDataset.source(paths).map(functools.partial(_read_text, root=root))


def _tfds_documents(data_cfg: ml_collections.ConfigDict, split: str) -> grain.MapDataset:
  """Returns one split of a prepared TFDS dataset as texts, via its random-access source."""
  import tensorflow_datasets as tfds  # Lazy: GPU images do not ship it.

  name = data_cfg.source.removeprefix("tfds:")
  tfds_split = data_cfg.tfds_train_split if split == "train" else data_cfg.tfds_eval_split
  data_dir = data_cfg.tfds_data_dir
  where = data_dir or os.environ.get("TFDS_DATA_DIR", "~/tensorflow_datasets")
  try:
    source = tfds.data_source(name, split=tfds_split, data_dir=data_dir, download=False)
  except tfds.core.DatasetNotFoundError:
    _fail("source", f"no TFDS dataset {name!r} in config.data.tfds_data_dir={where!r}",
          f"use a name listed by `ls {where}` (prepared with file_format='array_record') or "
          "by tfds.list_builders(), and set config.data.tfds_data_dir to where it lives")
  except (ValueError, NotImplementedError, AssertionError, FileNotFoundError) as e:
    first_line = (str(e).strip().splitlines() or [type(e).__name__])[0].rstrip(".")
    _fail("source", f"cannot read split {tfds_split!r} of TFDS {name!r} from {where!r}: "
          f"{first_line}", "check config.data.tfds_train_split/tfds_eval_split, or prepare "
          "the dataset there with download_and_prepare(file_format='array_record')")
  docs = grain.MapDataset.source(source)[:data_cfg.max_files]
  return docs.map(functools.partial(_text_feature, text_key=data_cfg.text_key))


def load_documents(data_cfg: ml_collections.ConfigDict, split: str) -> grain.MapDataset:
  """Returns the 'train' or 'validation' documents of `config.data.source` as texts."""
  if data_cfg.source == "stdlib":
    return _file_documents(data_cfg, split)
  return _tfds_documents(data_cfg, split)


def tokenize_document(text: str, tokenizer: tokenizer_lib.Tokenizer) -> dict[str, np.ndarray]:
  """Returns {inputs, targets} of one document framed as [bos] + tokens + [eos]."""
  doc_T = np.concatenate([[tokenizer.bos_id], tokenizer.encode(text), [tokenizer.eos_id]])
  doc_T = doc_T.astype(np.int32)
  return {"inputs": doc_T[:-1], "targets": doc_T[1:]}


def _batch_features(row: dict[str, np.ndarray]) -> Batch:
  # The packer numbers inputs and targets alike; keep one copy of segments and positions.
  return {"inputs": row["inputs"], "targets": row["targets"],
          "segment_ids": row["inputs_segment_ids"], "positions": row["inputs_positions"]}


def pack_examples(examples: grain.IterDataset, seq_len: int) -> grain.IterDataset:
  """Returns rows of length `seq_len` concat-then-split packed from {inputs, targets} examples."""
  rows = grain_experimental.ConcatThenSplitIterDataset(
      examples, length_struct={"inputs": seq_len, "targets": seq_len})
  return rows.map(_batch_features)


class _RowShuffleIterator(grain.DatasetIterator):
  """Yields the parent's rows shuffled within consecutive windows of `window_size` rows.

  Same contract as grain's WindowShuffleIterDataset, but one NumPy permutation per window
  instead of an index_shuffle call per row (~0.1 ms each, which nearly doubled the cost of a
  16 x 256 batch).
  The state is the parent's state where the window starts plus the offset into it; restoring
  re-reads that window.
  """

  def __init__(self, parent: grain.DatasetIterator, *, window_size: int, seed: int):
    super().__init__(parent)
    self._window_size = window_size
    self._seed = seed
    self._window_index = 0
    self._window_start = self._parent.get_state()
    self._window: list[Any] = []
    self._order = np.zeros(0, np.int64)
    self._pos = 0

  def _fill_window(self) -> None:
    self._window_start = self._parent.get_state()
    self._window = list(itertools.islice(self._parent, self._window_size))
    rng = np.random.default_rng([self._seed, self._window_index])
    self._order = rng.permutation(len(self._window))
    self._pos = 0

  def __next__(self) -> Any:
    if self._pos == len(self._window):
      self._window_index += bool(self._window)
      self._fill_window()
      if not self._window:
        raise StopIteration
    row = self._window[self._order[self._pos]]
    self._pos += 1
    return row

  def get_state(self) -> dict[str, Any]:
    return {"window_start": copy.deepcopy(self._window_start),
            "window_index": self._window_index, "pos": self._pos}

  def set_state(self, state: dict[str, Any]) -> None:
    self._parent.set_state(state["window_start"])
    self._window_index = state["window_index"]
    self._fill_window()
    self._pos = state["pos"]


class _RowShuffleDataset(grain.IterDataset):

  def __init__(self, parent: grain.IterDataset, *, window_size: int, seed: int):
    super().__init__(parent)
    self._window_size = window_size
    self._seed = seed

  def __iter__(self) -> _RowShuffleIterator:
    return _RowShuffleIterator(self._parent.__iter__(), window_size=self._window_size,
                               seed=self._seed)


def _as_tuples(state: Any) -> Any:
  # JSON turns tuples into lists; the packer compares its slices to tuples (grain 0.2.18).
  if isinstance(state, dict):
    return {k: _as_tuples(v) for k, v in state.items()}
  if isinstance(state, list | tuple):
    return tuple(_as_tuples(v) for v in state)
  return state


class _JsonStateIterator(grain.DatasetIterator):
  """Passes batches through; accepts states that went through a JSON round trip."""

  def __next__(self) -> Batch:
    return next(self._parent)

  def get_state(self) -> dict[str, Any]:
    return self._parent.get_state()

  def set_state(self, state: dict[str, Any]) -> None:
    self._parent.set_state(_as_tuples(state))


class _JsonStateDataset(grain.IterDataset):

  def __iter__(self) -> _JsonStateIterator:
    return _JsonStateIterator(self._parent.__iter__())


def _examples(docs: grain.MapDataset, data_cfg: ml_collections.ConfigDict) -> grain.IterDataset:
  """Returns the tokenised documents, read ahead in threads, in order."""
  tokenizer = tokenizer_lib.make_tokenizer(data_cfg)
  examples = docs.map(functools.partial(tokenize_document, tokenizer=tokenizer))
  return examples.to_iter_dataset(grain.ReadOptions(
      num_threads=data_cfg.read_threads, prefetch_buffer_size=data_cfg.read_prefetch))


def make_train_iterator(data_cfg: ml_collections.ConfigDict, *, seq_len: int, batch_size: int,
                        seed: int, process_index: int = 0,
                        process_count: int = 1) -> grain.DatasetIterator:
  """Returns an endless, checkpointable iterator of this host's packed [B, L] train batches.

  Hosts read disjoint documents (every `process_count`-th file from `process_index`). Each
  epoch reshuffles the documents from `seed`; packed rows are then shuffled within windows of
  `config.data.shuffle_window` rows so that one long file does not fill a whole batch.
  `get_state()` is JSON-serialisable and `set_state()` resumes bit-exactly.
  """
  validate_data_config(data_cfg)
  docs = load_documents(data_cfg, "train")[process_index::process_count]
  if not len(docs):
    _fail("max_files", f"process {process_index} of {process_count} got no train documents",
          "use more files or fewer processes")
  doc_seed, window_seed = np.random.SeedSequence(seed).generate_state(2).tolist()
  examples = _examples(docs.shuffle(seed=doc_seed).repeat(None), data_cfg)
  rows = pack_examples(examples, seq_len)
  if data_cfg.shuffle_window > 1:
    rows = _RowShuffleDataset(rows, window_size=data_cfg.shuffle_window, seed=window_seed)
  batches = rows.batch(batch_size, drop_remainder=True)
  if data_cfg.worker_count > 0:
    batches = batches.mp_prefetch(grain.MultiprocessingOptions(num_workers=data_cfg.worker_count))
  return iter(_JsonStateDataset(batches))


def _pad_rows(batch: Batch, batch_size: int) -> Batch:
  """Returns `batch` with all-zero (segment 0) rows appended up to `batch_size`."""
  pad = batch_size - len(batch["inputs"])
  return {k: np.pad(v, ((0, pad), (0, 0))) for k, v in batch.items()}


def make_eval_batches(data_cfg: ml_collections.ConfigDict, *, seq_len: int, batch_size: int,
                      max_batches: int | None, process_index: int = 0,
                      process_count: int = 1) -> list[Batch]:
  """Returns the first `max_batches` packed [B, L] validation batches, the same every call.

  Documents are taken in corpus order without shuffling; the last batch is padded with
  segment-0 rows. `max_batches=None` returns the whole split.
  """
  validate_data_config(data_cfg)
  docs = load_documents(data_cfg, "validation")[process_index::process_count]
  if not len(docs):
    _fail("validation_fraction", f"process {process_index} of {process_count} got no "
          "validation documents", "raise validation_fraction or use more files")
  rows = pack_examples(_examples(docs, data_cfg), seq_len)
  batches = itertools.islice(rows.batch(batch_size, drop_remainder=False), max_batches)
  return [_pad_rows(batch, batch_size) for batch in batches]
