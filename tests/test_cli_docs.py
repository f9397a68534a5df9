"""The command lines' --help: absl prints each main module's docstring through `%`."""

import ast
import pathlib
import sys
import types

import pytest
from absl import app

ROOT = pathlib.Path(__file__).resolve().parents[1]
MAINS = sorted(p for d in ("experiments", "kernels") for p in (ROOT / d).glob("*.py")
               if "app.run(" in p.read_text())


def _usage(doc, monkeypatch, capsys):
  main = types.ModuleType("__main__")
  main.__doc__ = doc
  monkeypatch.setitem(sys.modules, "__main__", main)
  monkeypatch.setattr(sys, "argv", ["prog"])
  app.usage(shorthelp=True, writeto_stdout=True)
  return capsys.readouterr().out


def test_a_lone_percent_garbles_help(monkeypatch, capsys):
  # What compare_curves printed: "drifts 2-4% apart" came out as "drifts 2-4'prog'part".
  assert "2-4'prog'part" in _usage("drifts 2-4% apart\n", monkeypatch, capsys)
  assert "drifts 2-4% apart" in _usage("drifts 2-4%% apart\n", monkeypatch, capsys)


def test_main_modules_exist():
  names = {p.stem for p in MAINS}
  assert {"train", "bench_train", "compare_curves", "fp8_parity"} <= names


@pytest.mark.parametrize("path", MAINS, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_help_prints_the_docstring_as_written(path, monkeypatch, capsys):
  doc = ast.get_docstring(ast.parse(path.read_text()), clean=False)
  assert doc, f"{path.name}: a command line needs a module docstring for --help"
  out = _usage(doc, monkeypatch, capsys)
  want = doc.replace("%%", "%")
  assert want.strip() in out, (
      f"{path.name}: its docstring has a lone '%', which absl's --help reads as a format "
      "specifier; write '%%' (absl prints one '%').")
