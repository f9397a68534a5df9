"""Where metrics go: a console progress line, TensorBoard event files and a JSONL log."""

import json
import logging
import os
import sys
from typing import Any


def format_duration(seconds: float) -> str:
  """Returns a short h:mm:ss rendering of a duration."""
  seconds = max(int(seconds), 0)
  return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def progress_line(step: int, num_steps: int, scalars: dict[str, float]) -> str:
  """Returns the console line for one logged step."""
  mfu = scalars.get("mfu")
  parts = [
      f"step {step}/{num_steps}",
      f"loss {scalars['loss']:.4f}",
      f"mtp {scalars['mtp_ce']:.4f}" if "mtp_ce" in scalars else None,
      f"lr {scalars['lr']:.2e}",
      f"gnorm {scalars['grad_norm']:.3f}",
      f"tok/s {scalars['tokens_per_sec']:,.0f}" if "tokens_per_sec" in scalars else None,
      f"mfu {100 * mfu:.1f}%" if mfu is not None else
      ("mfu n/a" if "tokens_per_sec" in scalars else None),
      f"maxvio {scalars['max_violation']:.2f}",
      f"nan-skips {int(scalars['nan_skips'])}" if scalars.get("nan_skips") else None,
      f"eta {format_duration(scalars['eta_sec'])}" if "eta_sec" in scalars else None,
  ]
  return " | ".join(p for p in parts if p)


class MetricWriter:
  """Writes scalars to TensorBoard (`workdir/tb`) and to `workdir/metrics.jsonl`."""

  def __init__(self, workdir: str, enabled: bool = True):
    self._enabled = enabled
    self._tb = None
    self._jsonl = None
    if enabled:
      from tensorboardX import SummaryWriter  # Only the writing host needs it.
      self._tb = SummaryWriter(os.path.join(workdir, "tb"))
      self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")

  def write(self, step: int, scalars: dict[str, Any]) -> None:
    """Records `scalars` at `step` (a resumed run may write a step again; the last wins)."""
    if not self._enabled:
      return
    clean = {k: float(v) for k, v in scalars.items() if v is not None}
    for name, value in clean.items():
      self._tb.add_scalar(name, value, step)
    self._jsonl.write(json.dumps({"step": step, **clean}) + "\n")
    self._jsonl.flush()

  def close(self) -> None:
    if self._enabled:
      self._tb.close()
      self._jsonl.close()


def read_jsonl(path: str) -> dict[int, dict[str, float]]:
  """Returns the metrics of a `metrics.jsonl` by step, the last record of a step winning."""
  records: dict[int, dict[str, float]] = {}
  with open(path) as f:
    for line in f:
      record = json.loads(line)
      records.setdefault(record["step"], {}).update(record)
  return records


_LOGGER = logging.getLogger("ling_jax")


def log(message: str, *args: Any) -> None:
  """Logs a progress line to the `ling_jax` logger (the console, via `setup_console`)."""
  _LOGGER.info(message, *args)


def setup_console(quiet_libraries: bool = True) -> None:
  """Prints `ling_jax` lines to stdout with a timestamp; other libraries only warn and worse."""
  if not _LOGGER.handlers:
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
    _LOGGER.addHandler(handler)
  _LOGGER.setLevel(logging.INFO)
  _LOGGER.propagate = False
  if quiet_libraries:
    from absl import logging as absl_logging  # orbax and grain log through absl.
    absl_logging.set_verbosity(absl_logging.WARNING)
