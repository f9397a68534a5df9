# Two entry points: `make train` (tiny Ling 2.0 pre-training) and `make test`.
# Each creates .venv with Python 3.12 on first use.
PYTHON ?= python3.12
VENV := .venv
WORKDIR ?= workdirs/tiny
ARGS ?=

.PHONY: setup train test lint clean

$(VENV)/.installed: requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -r requirements-dev.txt
	touch $@

setup: $(VENV)/.installed

train: setup
	$(VENV)/bin/python -m experiments.train --config=configs/ling2.py:tiny --workdir=$(WORKDIR) $(ARGS)

# Files run whole on 3 workers, longest first. On 2 cores a third worker uses the CPU that
# another leaves while it waits on its subprocesses (777 s against 808 s with 2, 2026-11-30).
# tests/conftest.py orders the files; xdist's own reorder, by test count, would start the
# longest files last.
test: setup
	$(VENV)/bin/python -m pytest -q -n 3 --dist loadfile --no-loadscope-reorder --durations=15 tests

lint: setup
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) workdirs
