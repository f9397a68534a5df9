"""A small reader and writer of the safetensors format, one tensor at a time.

The format: 8 bytes (little-endian u64) giving the header length N, N bytes of JSON mapping each
tensor name to `{"dtype", "shape", "data_offsets": [begin, end]}` (offsets relative to the end
of the header) plus an optional `__metadata__` of strings, then the raw little-endian bytes.
Reading seeks to one tensor and reads only its bytes (no memory map, so nothing of the file
stays resident); writing lays out the header first and then streams each tensor from a
producer, so neither direction holds more than one tensor besides the caller's arrays.
"""

import json
import os
from collections.abc import Callable
from collections.abc import Iterable

import ml_dtypes
import numpy as np

from ling_jax import config as config_lib

_DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32), "I16": np.dtype(np.int16), "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}
_NAMES = {v: k for k, v in _DTYPES.items()}
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


def dtype_name(dtype: np.dtype) -> str:
  """Returns the safetensors name of a NumPy dtype (e.g. 'BF16')."""
  return _NAMES[np.dtype(dtype)]


def read_header(path: str) -> tuple[dict, int]:
  """Returns the tensor table of one .safetensors file and the byte offset of its data."""
  with open(path, "rb") as f:
    size_bytes = f.read(8)
    if len(size_bytes) != 8:
      raise config_lib.ConfigError(f"{path}: not a safetensors file (shorter than 8 bytes). "
                                   "Fix: re-download or re-write the shard.")
    size = int.from_bytes(size_bytes, "little")
    if size > os.path.getsize(path) - 8:
      raise config_lib.ConfigError(f"{path}: header of {size} bytes runs past the end of the "
                                   "file. Fix: re-download or re-write the shard.")
    header = json.loads(f.read(size))
  header.pop("__metadata__", None)
  return header, 8 + size


class SafetensorsDir:
  """The tensors of a Hugging Face model directory: one `model.safetensors` or an index."""

  def __init__(self, model_dir: str):
    self.model_dir = str(model_dir)
    index_path = os.path.join(self.model_dir, INDEX_FILE)
    single_path = os.path.join(self.model_dir, SINGLE_FILE)
    if os.path.exists(index_path):
      with open(index_path) as f:
        weight_map = json.load(f)["weight_map"]
    elif os.path.exists(single_path):
      weight_map = None
    else:
      raise config_lib.ConfigError(
          f"{self.model_dir}: neither {INDEX_FILE} nor {SINGLE_FILE} exists. Fix: point at a "
          "Hugging Face model directory with its safetensors weights.")
    self._headers: dict[str, tuple[dict, int]] = {}
    if weight_map is None:
      self.weight_map = {name: SINGLE_FILE for name in self._header(SINGLE_FILE)[0]}
    else:
      self.weight_map = dict(weight_map)

  def _header(self, shard: str) -> tuple[dict, int]:
    if shard not in self._headers:
      self._headers[shard] = read_header(os.path.join(self.model_dir, shard))
    return self._headers[shard]

  def _entry(self, name: str) -> tuple[str, dict, int]:
    if name not in self.weight_map:
      raise config_lib.ConfigError(
          f"tensor {name!r} is missing from {self.model_dir} (not in its weight map). Fix: use "
          "a checkpoint whose config.json matches its weights (layers, experts, MTP depth).")
    shard = self.weight_map[name]
    path = os.path.join(self.model_dir, shard)
    if not os.path.exists(path):
      raise config_lib.ConfigError(
          f"tensor {name!r}: its shard {path} does not exist. Fix: download every file the "
          f"index lists ({INDEX_FILE}).")
    header, data_start = self._header(shard)
    if name not in header:
      raise config_lib.ConfigError(
          f"tensor {name!r}: {INDEX_FILE} places it in {shard}, which does not hold it. Fix: "
          "re-download the shard or the index.")
    return path, header[name], data_start

  def shape(self, name: str) -> tuple[int, ...]:
    """Returns the stored shape of tensor `name`."""
    return tuple(self._entry(name)[1]["shape"])

  def read(self, name: str, dtype: np.dtype | None = None) -> np.ndarray:
    """Returns tensor `name`, read from disk and cast to `dtype` (default: as stored)."""
    path, entry, data_start = self._entry(name)
    stored = _DTYPES.get(entry["dtype"])
    if stored is None:
      raise config_lib.ConfigError(f"tensor {name!r}: dtype {entry['dtype']} is not supported. "
                                   f"Fix: store it as one of {sorted(_DTYPES)}.")
    begin, end = entry["data_offsets"]
    count = int(np.prod(entry["shape"], dtype=np.int64))
    if end - begin != count * stored.itemsize:
      raise config_lib.ConfigError(f"tensor {name!r}: {end - begin} bytes do not hold shape "
                                   f"{entry['shape']} of {entry['dtype']}. Fix: re-write the "
                                   "shard.")
    with open(path, "rb") as f:
      f.seek(data_start + begin)
      array = np.fromfile(f, dtype=stored.newbyteorder("<"), count=count)
    array = array.reshape(entry["shape"])
    if dtype is not None and np.dtype(dtype) != stored:
      array = array.astype(dtype)
    return array


# A tensor to write: its name, shape, dtype, and a function that returns its value.
TensorSpec = tuple[str, tuple[int, ...], np.dtype, Callable[[], np.ndarray]]


def write_file(path: str, specs: Iterable[TensorSpec], metadata: dict | None = None) -> int:
  """Writes one .safetensors file, producing each tensor only when its turn comes.

  Returns the number of data bytes written. Each producer's array must have the declared shape.
  """
  specs = list(specs)
  header: dict = {"__metadata__": dict(metadata or {"format": "pt"})}
  offset = 0
  for name, shape, dtype, _ in specs:
    nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
    header[name] = {"dtype": dtype_name(dtype), "shape": list(shape),
                    "data_offsets": [offset, offset + nbytes]}
    offset += nbytes
  header_bytes = json.dumps(header, separators=(",", ":")).encode()
  header_bytes += b" " * (-len(header_bytes) % 8)  # Keeps the data 8-byte aligned.
  with open(path, "wb") as f:
    f.write(len(header_bytes).to_bytes(8, "little"))
    f.write(header_bytes)
    for name, shape, dtype, produce in specs:
      array = np.ascontiguousarray(produce(), dtype=np.dtype(dtype).newbyteorder("<"))
      if array.shape != tuple(shape):
        raise ValueError(f"tensor {name!r}: produced shape {array.shape}, declared {shape}")
      f.write(array.tobytes())
  return offset


def write_dir(model_dir: str, specs: Iterable[TensorSpec], max_shard_bytes: int,
              progress: Callable[[str], None] | None = None) -> list[str]:
  """Writes tensors as `model.safetensors`, or as numbered shards plus an index when they
  exceed `max_shard_bytes`; returns the file names written."""
  specs = list(specs)
  shards: list[list[TensorSpec]] = [[]]
  size = total = 0
  for spec in specs:
    nbytes = int(np.prod(spec[1], dtype=np.int64)) * np.dtype(spec[2]).itemsize
    if shards[-1] and size + nbytes > max_shard_bytes:
      shards.append([])
      size = 0
    shards[-1].append(spec)
    size += nbytes
    total += nbytes
  if len(shards) == 1:
    names = [SINGLE_FILE]
  else:
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
  for name, shard in zip(names, shards):
    if progress:
      progress(f"writing {name} ({len(shard)} tensors)")
    write_file(os.path.join(model_dir, name), shard)
  if len(shards) > 1:
    index = {"metadata": {"total_size": total},
             "weight_map": {spec[0]: name for name, shard in zip(names, shards)
                            for spec in shard}}
    with open(os.path.join(model_dir, INDEX_FILE), "w") as f:
      json.dump(index, f, indent=2)
  return names
