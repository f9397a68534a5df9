"""Loss curves of several bench_train processes: each variant against the baseline's own band.

  python -m experiments.compare_curves --results=/tmp/a/results.jsonl,/tmp/b/results.jsonl \\
      --baseline=none --window=20

`experiments/bench_train.py` compares its variants' curves with its first variant's, one run
each. On a GPU that pair is not enough: the same bf16 step run in two processes drifts 2-4%% apart
within 100 steps at Ling-mini width (BENCHMARKS.md, sessions 9 and 24), so a gap of that size
says nothing about FP8. Run the same bench_train command (same config, seed and data) in several
processes and hand their results.jsonl files here. Every run of the `--baseline` variant (a
--quants entry, e.g. `none`) adds to a band, the lowest to the highest of their window means;
each other variant's mean over its runs overlaps where it lies inside that band widened by
`--tolerance`. Prints the table (Markdown) and writes it to `--out` when given; exits 1 when a
variant's curve leaves the band.
"""

import json
import sys

from absl import app
from absl import flags

from ling_jax import profiling

_RESULTS = flags.DEFINE_list("results", [], "bench_train results.jsonl files, one per process.")
_BASELINE = flags.DEFINE_string("baseline", None,
                                "The baseline's variant (--quants entry); default: the first "
                                "row's.")
_WINDOW = flags.DEFINE_integer("window", 20, "Steps per window mean.")
_TOLERANCE = flags.DEFINE_float("tolerance", 0.01, "How far past the band, relative, still "
                                "counts as inside.")
_SPAN = flags.DEFINE_string("span", "0:", "Steps FIRST:LAST (LAST left out: every compared "
                            "step) over which each run's mean loss is also given, e.g. 40:120 "
                            "to leave out the early fall.")
_OUT = flags.DEFINE_string("out", None, "Also write the Markdown here.")


def parse_span(text: str) -> tuple[int, int | None]:
  """Returns --span's (first, last) steps; last None for every compared step."""
  first, sep, last = text.partition(":")
  try:
    if not sep:
      raise ValueError
    return int(first), (int(last) if last.strip() else None)
  except ValueError:
    raise app.UsageError(f"--span={text!r}: give FIRST:LAST steps, e.g. 40:120, or FIRST: for "
                         "every compared step from FIRST") from None


def read_rows(paths: list[str]) -> list[dict]:
  """Returns the rows of bench_train results.jsonl files, each tagged with its file."""
  rows = []
  for path in paths:
    try:
      with open(path) as f:
        lines = [line for line in f if line.strip()]
    except OSError as e:
      raise app.UsageError(f"--results: cannot read {path} ({e.strerror}); give bench_train's "
                           "results.jsonl files") from None
    for n, line in enumerate(lines, 1):
      row = json.loads(line)
      if "losses" not in row:
        raise app.UsageError(f"--results: {path} line {n} has no per-step losses; it is not a "
                             "bench_train results.jsonl row")
      rows.append({**row, "file": path})
  return rows


def main(argv: list[str]) -> None:
  del argv
  if len(_RESULTS.value) < 1:
    raise app.UsageError("--results: give one or more bench_train results.jsonl files")
  try:
    bands = profiling.loss_bands(read_rows(_RESULTS.value), _BASELINE.value, _WINDOW.value,
                                 _TOLERANCE.value, parse_span(_SPAN.value))
  except ValueError as e:
    raise app.UsageError(str(e)) from None
  if not bands:
    raise app.UsageError("nothing to compare: no depth has a baseline run and another variant "
                         f"over at least --window={_WINDOW.value} steps")
  text = profiling.format_bands(bands)
  print(text)
  if _OUT.value:
    with open(_OUT.value, "w") as f:
      f.write(text)
  sys.exit(0 if all(b["overlap"] for b in bands) else 1)


if __name__ == "__main__":
  app.run(main)
