"""Every notebook runs top to bottom, so none goes stale."""

import os

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "notebooks")


@pytest.mark.parametrize("name", sorted(f for f in os.listdir(NOTEBOOKS) if f.endswith(".ipynb")))
def test_notebook_runs(name):
  with open(os.path.join(NOTEBOOKS, name)) as f:
    notebook = nbformat.read(f, as_version=4)
  NotebookClient(notebook, timeout=600, kernel_name="python3",
                 resources={"metadata": {"path": NOTEBOOKS}}).execute()
  errors = [o for cell in notebook.cells for o in cell.get("outputs", [])
            if o.get("output_type") == "error"]
  assert not errors
