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
TFDS dataset read through `tfds.data_source` (array_record files, no TensorFlow needed); or
"jsonl", chat records for SFT (`ling_jax/sft.py`) under `config.data.data_dir`, rendered in the
Ling chat format, packed first-fit without splitting a record, and carrying one more [B, L]
feature, `loss_mask` (1 where the target is an assistant token).

Mixtures (`config.data.mixture = "name=weight,..."`): each name is a source described by
`config.data.sources.<name>` (fields of `config.data` that override the ones above), packed on
its own; grain's mixture then interleaves packed rows in proportion to the weights, so a weight
is a share of the training tokens. The iterator state holds every source's position.
"""

import copy
import functools
import hashlib
import itertools
import os
import pathlib
import queue
import sysconfig
import threading
from typing import Any
from typing import NoReturn

import grain
import ml_collections
import numpy as np
from grain import experimental as grain_experimental
from ml_collections import config_dict

from ling_jax import config as config_lib
from ling_jax import sft
from ling_jax import tokenizer as tokenizer_lib

Batch = dict[str, np.ndarray]
_FEATURES = ("inputs", "targets", "segment_ids", "positions")

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
  # Shards of the corpus (every S-th document); each process reads S / process_count of them.
  # Fixing S keeps the batches the same on any number of processes; None: one per process.
  c.num_shards = config_dict.placeholder(int)
  # Chat records ("jsonl" source): DFT system prompts selected by a record's "mode"
  # (ling2_spec.md section 8; the released prompt wording is not public, so these are ours).
  # The released Ling chat models switch reasoning with these system prompts (as used publicly
  # with Ling 2.0, e.g. `<role>SYSTEM</role>detailed thinking off<|role_end|>`).
  c.sft_system_prompts = ml_collections.ConfigDict({
      "instant": "detailed thinking off",
      "deep": "detailed thinking on",
  })
  c.sft_packing_bins = 8  # open rows first-fit packing fills with chat records
  # "name=weight,...": mix the sources of `sources` by token share; "" reads the one above.
  c.mixture = ""
  c.sources = ml_collections.ConfigDict()  # name -> fields overriding the ones above
  return c


def _fail(field: str, problem: str, fix: str) -> NoReturn:
  # `from None`: the message says it all; tfds's own traceback runs to pages.
  raise config_lib.ConfigError(f"config.data.{field}: {problem}. Fix: {fix}.") from None


def validate_data_config(data_cfg: ml_collections.ConfigDict) -> None:
  """Raises ValueError naming the field and the fix when `config.data` cannot work."""
  if data_cfg.get("mixture"):
    for _, (source_cfg, _) in mixture_sources(data_cfg).items():
      validate_data_config(source_cfg)
    return
  source = data_cfg.source
  if source not in ("stdlib", "jsonl") and not (source.startswith("tfds:") and len(source) > 5):
    _fail("source", f"unknown source {source!r}", "use 'stdlib', 'jsonl' or 'tfds:NAME'")
  data_dir = data_cfg.data_dir
  if source == "jsonl":
    if data_dir is None or not os.path.exists(data_dir):
      _fail("data_dir", f"source 'jsonl' reads chat records from data_dir, got {data_dir!r}",
            "point config.data.data_dir at a .jsonl file or a folder of them")
    for mode in sft.MODES:
      if not isinstance(data_cfg.sft_system_prompts.get(mode), str):
        _fail(f"sft_system_prompts.{mode}", "missing DFT system prompt",
              f"set config.data.sft_system_prompts.{mode} to a string")
    if data_cfg.get("sft_packing_bins", 1) < 1:
      _fail("sft_packing_bins", f"{data_cfg.sft_packing_bins} < 1", "set it >= 1")
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
  if data_cfg.get("num_shards") is not None and data_cfg.num_shards < 1:
    _fail("num_shards", f"{data_cfg.num_shards} < 1", "unset it or make it positive")


def mixture_sources(
    data_cfg: ml_collections.ConfigDict) -> dict[str, tuple[ml_collections.ConfigDict, float]]:
  """Returns {name: (that source's full data config, weight)} of `config.data.mixture`."""
  sources = data_cfg.get("sources") or {}
  result = {}
  for item in str(data_cfg.mixture).split(","):
    name, sep, weight = item.strip().partition("=")
    try:
      value = float(weight) if sep else float("nan")
    except ValueError:
      value = float("nan")
    if not value > 0:
      _fail("mixture", f"{item.strip()!r} is not name=weight with a weight > 0",
            "write e.g. 'general=0.6,reasoning=0.4'")
    if name not in sources:
      _fail("mixture", f"no source {name!r} in config.data.sources (it has "
            f"{sorted(sources)})", "define config.data.sources.<name> or fix the name")
    if name in result:
      _fail("mixture", f"source {name!r} is listed twice", "list each source once")
    source_cfg = ml_collections.ConfigDict(data_cfg.to_dict())
    source_cfg.mixture = ""
    source_cfg.sources = ml_collections.ConfigDict()
    for key, override in sources[name].items():
      if key not in source_cfg or key in ("mixture", "sources"):
        _fail(f"sources.{name}.{key}", "is not a field a source can set",
              "use fields of config.data such as source, data_dir, max_files")
      source_cfg[key] = override
    result[name] = (source_cfg, value)
  return result


def has_loss_mask(data_cfg: ml_collections.ConfigDict) -> bool:
  """Returns whether batches carry `loss_mask` (chat records, alone or in a mixture)."""
  if data_cfg.get("mixture"):
    return any(c.source == "jsonl" for c, _ in mixture_sources(data_cfg).values())
  return data_cfg.source == "jsonl"


def batch_features(data_cfg: ml_collections.ConfigDict) -> tuple[str, ...]:
  """Returns the names of the [B, L] arrays of a batch."""
  return _FEATURES + (("loss_mask",) if has_loss_mask(data_cfg) else ())


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
  """Returns the 'train' or 'validation' documents of `config.data.source`.

  Texts, or chat-record dicts for the "jsonl" source (held in memory: SFT sets are small).
  """
  if data_cfg.source == "stdlib":
    return _file_documents(data_cfg, split)
  if data_cfg.source == "jsonl":
    train, validation = sft.read_records(data_cfg.data_dir, data_cfg.validation_fraction)
    records = (train if split == "train" else validation)[:data_cfg.max_files]
    return grain.MapDataset.source(records)
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


def _chat_features(row: dict[str, np.ndarray]) -> Batch:
  return {**_batch_features(row), "loss_mask": row["loss_mask"]}


def _with_loss_mask(row: Batch) -> Batch:
  # Text rows in a mixture with chat rows: every target of a document is trained.
  return {**row, "loss_mask": (row["segment_ids"] != 0).astype(np.int32)}


def pack_chat_examples(examples: grain.IterDataset, seq_len: int,
                       num_bins: int) -> grain.IterDataset:
  """Returns rows of length `seq_len` first-fit packed from chat examples, none split.

  A record never continues in another row (its reply would lose its prompt); rows end in
  padding (segment 0) where the next record does not fit. Records are cut to `seq_len` first.
  """
  features = ("inputs", "targets", "loss_mask")
  rows = grain_experimental.FirstFitPackIterDataset(
      examples, length_struct={k: seq_len for k in features}, num_packing_bins=num_bins,
      shuffle_bins=False)
  return rows.map(_chat_features)


def _pack(examples: grain.IterDataset, data_cfg: ml_collections.ConfigDict, seq_len: int,
          loss_mask: bool) -> grain.IterDataset:
  """Returns the packed rows of a source's examples (chat or text)."""
  if data_cfg.source == "jsonl":
    return pack_chat_examples(examples, seq_len, data_cfg.get("sft_packing_bins", 8))
  rows = pack_examples(examples, seq_len)
  return rows.map(_with_loss_mask) if loss_mask else rows


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


def _examples(docs: grain.MapDataset, data_cfg: ml_collections.ConfigDict,
              seq_len: int | None = None) -> grain.IterDataset:
  """Returns the tokenised documents (chat records cut to `seq_len`), read ahead, in order."""
  tokenizer = tokenizer_lib.make_tokenizer(data_cfg)
  if data_cfg.source == "jsonl":
    examples = docs.map(functools.partial(
        sft.tokenize_record, tokenizer=tokenizer, system_prompts=data_cfg.sft_system_prompts,
        max_length=seq_len))
    # A record cut before its reply teaches nothing; drop it rather than pack padding.
    examples = examples.filter(lambda example: bool(example["loss_mask"].any()))
  else:
    examples = docs.map(functools.partial(tokenize_document, tokenizer=tokenizer))
  return examples.to_iter_dataset(grain.ReadOptions(
      num_threads=data_cfg.read_threads, prefetch_buffer_size=data_cfg.read_prefetch))


def _train_rows(data_cfg: ml_collections.ConfigDict, *, seq_len: int, seed: int,
                process_index: int, process_count: int, loss_mask: bool) -> grain.IterDataset:
  """Returns the endless packed train rows of one source, documents reshuffled every epoch."""
  docs = load_documents(data_cfg, "train")[process_index::process_count]
  if not len(docs):
    _fail("max_files", f"process {process_index} of {process_count} got no train documents",
          "use more files or fewer processes")
  if data_cfg.source == "jsonl":
    _check_replies_fit(docs, data_cfg, seq_len)
  doc_seed = np.random.SeedSequence(seed).generate_state(2).tolist()[0]
  examples = _examples(docs.shuffle(seed=doc_seed).repeat(None), data_cfg, seq_len)
  return _pack(examples, data_cfg, seq_len, loss_mask)


def _check_replies_fit(records: grain.MapDataset, data_cfg: ml_collections.ConfigDict,
                       seq_len: int) -> None:
  """Fails when none of the first records keeps an assistant token within `seq_len`."""
  tokenizer = tokenizer_lib.make_tokenizer(data_cfg)
  for i in range(min(len(records), 64)):
    example = sft.tokenize_record(records[i], tokenizer, data_cfg.sft_system_prompts, seq_len)
    if example["loss_mask"].any():
      return
  _fail("data_dir", f"no chat record keeps an assistant token within seq_len={seq_len} "
        "(system prompt and prompt fill the row)", "raise train.seq_len or shorten the prompts")


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
  _, window_seed = np.random.SeedSequence(seed).generate_state(2).tolist()
  loss_mask = has_loss_mask(data_cfg)
  if data_cfg.get("mixture"):
    components = {}
    for i, (name, (source_cfg, _)) in enumerate(mixture_sources(data_cfg).items()):
      source_seed = int(np.random.SeedSequence([seed, i]).generate_state(1)[0])
      components[name] = _train_rows(source_cfg, seq_len=seq_len, seed=source_seed,
                                     process_index=process_index, process_count=process_count,
                                     loss_mask=loss_mask)
    weights = {name: w for name, (_, w) in mixture_sources(data_cfg).items()}
    rows = grain.IterDataset.mix(components, weights)
  else:
    rows = _train_rows(data_cfg, seq_len=seq_len, seed=seed, process_index=process_index,
                       process_count=process_count, loss_mask=loss_mask)
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
  if data_cfg.get("mixture"):
    loss_mask = has_loss_mask(data_cfg)
    return [b for source_cfg, _ in mixture_sources(data_cfg).values()
            for b in _eval_batches_of(source_cfg, seq_len, batch_size, max_batches,
                                      process_index, process_count, loss_mask)]
  return _eval_batches_of(data_cfg, seq_len, batch_size, max_batches, process_index,
                          process_count, has_loss_mask(data_cfg))


def _eval_batches_of(data_cfg: ml_collections.ConfigDict, seq_len: int, batch_size: int,
                     max_batches: int | None, process_index: int, process_count: int,
                     loss_mask: bool) -> list[Batch]:
  docs = load_documents(data_cfg, "validation")[process_index::process_count]
  if not len(docs):
    _fail("validation_fraction", f"process {process_index} of {process_count} got no "
          "validation documents", "raise validation_fraction or use more files")
  rows = _pack(_examples(docs, data_cfg, seq_len), data_cfg, seq_len, loss_mask)
  batches = itertools.islice(rows.batch(batch_size, drop_remainder=False), max_batches)
  return [_pad_rows(batch, batch_size) for batch in batches]


def process_shards(num_shards: int, process_index: int, process_count: int) -> range:
  """Returns the data shards a process reads: a consecutive block of num_shards / process_count."""
  if num_shards % process_count:
    _fail("num_shards", f"{num_shards} shards do not split over {process_count} processes",
          "make num_shards a multiple of the process count (or unset it)")
  per_process = num_shards // process_count
  return range(process_index * per_process, (process_index + 1) * per_process)


class _ShardsIterator(grain.DatasetIterator):
  """Concatenates one batch of each of several shard iterators along the batch axis."""

  def __init__(self, shards: dict[int, grain.DatasetIterator]):
    super().__init__(list(shards.values()))
    self._shards = shards

  def __next__(self) -> Batch:
    batches = [next(it) for it in self._shards.values()]
    return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}

  def get_state(self) -> dict[str, Any]:
    return {"shards": {str(s): it.get_state() for s, it in self._shards.items()}}

  def set_state(self, state: dict[str, Any]) -> None:
    saved = state.get("shards", {})
    missing = [s for s in self._shards if str(s) not in saved]
    if missing:
      raise ValueError(f"data state has no entry for shards {missing}; it was saved with "
                       f"shards {sorted(saved, key=int)}. Fix: resume with the same "
                       "config.data.num_shards")
    for s, it in self._shards.items():
      it.set_state(saved[str(s)])


def make_sharded_train_iterator(data_cfg: ml_collections.ConfigDict, *, seq_len: int,
                                global_batch_size: int, seed: int, num_shards: int,
                                process_index: int = 0,
                                process_count: int = 1) -> grain.DatasetIterator:
  """Returns this process's rows of the global [B, L] train batches.

  The corpus is split into `num_shards` shards of documents (every num_shards-th one); global
  rows [s * B / S, (s + 1) * B / S) come from shard s. A process reads only its own block of
  shards, so the global batch is the same whatever the number of processes, and a checkpoint
  (whose data state holds every shard) resumes on another process count. The state is
  {"shards": {shard: state}}.
  """
  if global_batch_size % num_shards:
    _fail("num_shards", f"{num_shards} shards do not divide the batch of {global_batch_size}",
          "use a num_shards that divides train.batch_size")
  shards = {s: make_train_iterator(data_cfg, seq_len=seq_len,
                                   batch_size=global_batch_size // num_shards, seed=seed,
                                   process_index=s, process_count=num_shards)
            for s in process_shards(num_shards, process_index, process_count)}
  return _ShardsIterator(shards)


def make_sharded_eval_batches(data_cfg: ml_collections.ConfigDict, *, seq_len: int,
                              global_batch_size: int, max_batches: int | None, num_shards: int,
                              process_index: int = 0, process_count: int = 1) -> list[Batch]:
  """Returns this process's rows of the validation batches, shards laid out as in training.

  Shards with fewer batches (a small split may leave a shard none) are padded with all-padding
  rows, so every batch has every shard's rows; `pad_batches` evens out processes. Returns []
  when none of this process's shards holds a validation document.
  """
  validate_data_config(data_cfg)
  features = batch_features(data_cfg)
  if data_cfg.get("mixture"):  # Each source's validation batches in turn.
    return [b for source_cfg, _ in mixture_sources(data_cfg).values()
            for b in _sharded_eval_batches_of(source_cfg, seq_len, global_batch_size,
                                              max_batches, num_shards, process_index,
                                              process_count, features)]
  return _sharded_eval_batches_of(data_cfg, seq_len, global_batch_size, max_batches, num_shards,
                                  process_index, process_count, features)


def _sharded_eval_batches_of(data_cfg: ml_collections.ConfigDict, seq_len: int,
                             global_batch_size: int, max_batches: int | None, num_shards: int,
                             process_index: int, process_count: int,
                             features: tuple[str, ...]) -> list[Batch]:
  docs = load_documents(data_cfg, "validation")
  rows = global_batch_size // num_shards
  per_shard = []
  for s in process_shards(num_shards, process_index, process_count):
    examples = _examples(docs[s::num_shards], data_cfg, seq_len)
    packed = _pack(examples, data_cfg, seq_len, "loss_mask" in features)
    batches = itertools.islice(packed.batch(rows, drop_remainder=False), max_batches)
    per_shard.append([_pad_rows(batch, rows) for batch in batches])
  count = max(len(b) for b in per_shard)
  if not count:
    return []
  per_shard = [pad_batches(b, count, rows=rows, seq_len=seq_len, features=features)
               for b in per_shard]
  return [{k: np.concatenate([b[i][k] for b in per_shard]) for k in features}
          for i in range(count)]


def pad_batches(batches: list[Batch], count: int, *, rows: int, seq_len: int,
                features: tuple[str, ...] = _FEATURES) -> list[Batch]:
  """Returns `batches` followed by all-padding (segment 0) [rows, seq_len] batches up to `count`."""
  empty = {k: np.zeros((rows, seq_len), np.int32) for k in features}
  return batches + [empty] * (count - len(batches))


class SyntheticBatches:
  """Random-token batches (one document per row), with the data-iterator interface. A step's
  batch depends only on the seed and the step."""

  def __init__(self, rows: int, seq_len: int, vocab: int, seed: int = 0):
    self._seed, self._shape, self._vocab = seed, (rows, seq_len), vocab

  def next_batch(self, step: int) -> Batch:
    rng = np.random.default_rng((self._seed, step))
    tokens = rng.integers(0, self._vocab, (self._shape[0], self._shape[1] + 1), np.int32)
    return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
            "positions": np.broadcast_to(np.arange(self._shape[1], dtype=np.int32), self._shape),
            "segment_ids": np.ones(self._shape, np.int32)}

  def get_state(self) -> dict[str, Any]:
    return {}  # Nothing to rewind: a batch is a function of (seed, step).

  def set_state(self, state: dict[str, Any]) -> None:
    del state


class RampedBatches:
  """Train batches whose size ramps up: step s joins `rows_at(s) / base_rows` base batches.

  Wraps an iterator of fixed `base_rows`-row batches, so the data state (and bitwise resumption)
  is that of the base iterator; the step number decides how many are drawn.
  """

  def __init__(self, base: grain.DatasetIterator, *, base_rows: int, rows_at: Any):
    self._base = base
    self._base_rows = base_rows
    self._rows_at = rows_at

  def next_batch(self, step: int) -> Batch:
    """Returns the (process-local rows of the) batch of optimiser step `step` (from 0)."""
    batches = [next(self._base) for _ in range(self._rows_at(step) // self._base_rows)]
    if len(batches) == 1:
      return batches[0]
    return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}

  def get_state(self) -> dict[str, Any]:
    return self._base.get_state()

  def set_state(self, state: dict[str, Any]) -> None:
    self._base.set_state(state)


class Prefetcher:
  """Builds the batches of the next `depth` steps on a background thread (0: on demand).

  Wraps an iterator with `next_batch(step)`/`get_state()`/`set_state()` (e.g. `RampedBatches`)
  and keeps that interface. `transform` runs on the thread too (e.g. the host-to-device copy of
  `sharding.global_batch`), so the train loop never waits on input. `get_state` is the data state
  after the last batch handed out, not after the ones built ahead, so a checkpoint resumes at the
  right batch. An error on the thread is raised by the next `next_batch`.
  """

  def __init__(self, source: Any, *, first_step: int, depth: int = 2, transform: Any = None):
    if not isinstance(depth, int) or depth < 0:
      raise ValueError(f"train.prefetch_batches: must be an integer >= 0, got {depth!r}. Fix: "
                       "use 0 for synchronous input, 2 to build two steps ahead.")
    self._source = source
    self._transform = transform or (lambda batch: batch)
    self._depth = depth
    self._state = source.get_state()
    self._start(first_step)

  def _start(self, first_step: int) -> None:
    self._queue: queue.Queue = queue.Queue(maxsize=max(self._depth, 1))
    self._stop = threading.Event()
    self._next_step = first_step
    self._thread = None
    if not self._depth:  # Synchronous: next_batch builds its own batch.
      return
    self._thread = threading.Thread(target=self._fill, args=(first_step, self._stop, self._queue),
                                    daemon=True, name="ling_jax-prefetch")
    self._thread.start()

  def _fill(self, step: int, stop: threading.Event, out: queue.Queue) -> None:
    while not stop.is_set():
      try:
        batch = self._transform(self._source.next_batch(step))
        item = (step, batch, copy.deepcopy(self._source.get_state()))
      except BaseException as e:  # pylint: disable=broad-except  (re-raised by next_batch)
        item = (step, e, None)
      while not stop.is_set():
        try:
          out.put(item, timeout=0.1)
          break
        except queue.Full:
          continue
      if item[2] is None:
        return
      step += 1

  def next_batch(self, step: int) -> Any:
    """Returns the batch of optimiser step `step`; steps must be asked for in order."""
    if step != self._next_step:
      raise ValueError(f"Prefetcher: asked for step {step}, but the next batch built is for "
                       f"step {self._next_step}. Fix: call set_state before skipping steps.")
    if self._thread is None:
      batch = self._transform(self._source.next_batch(step))
      self._state, self._next_step = copy.deepcopy(self._source.get_state()), step + 1
      return batch
    built_step, batch, state = self._queue.get()
    assert built_step == step, (built_step, step)
    if state is None:
      raise batch
    self._state, self._next_step = state, step + 1
    return batch

  def get_state(self) -> dict[str, Any]:
    return self._state

  def set_state(self, state: dict[str, Any], first_step: int | None = None) -> None:
    """Restarts from data `state`; the next batch is that of `first_step` (default: unchanged)."""
    self.close()
    self._source.set_state(state)
    self._state = state
    self._start(self._next_step if first_step is None else first_step)

  def close(self) -> None:
    """Stops the thread; batches built ahead are dropped (the data state is unaffected)."""
    self._stop.set()
    if self._thread is not None:
      self._thread.join()
