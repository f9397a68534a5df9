# Two entry points: `make train` (tiny Ling 2.0 pre-training) and `make test`.
# Each creates .venv with Python 3.12 on first use.
PYTHON ?= python3.12
VENV := .venv
WORKDIR ?= workdirs/tiny
ARGS ?=
# Python caches each module's bytecode (.pyc) on first import, whatever the environment says.
# With PYTHONDONTWRITEBYTECODE set, as on this project's machines, and pip's --no-compile below,
# every process compiled jax and the rest from source again: `import experiments.train` took
# 8-9 s a process, 3 s once cached, and the tests start dozens of processes.
export PYTHONDONTWRITEBYTECODE :=

.PHONY: setup train test lint clean

$(VENV)/.installed: requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q --no-compile -r requirements-dev.txt
	touch $@

setup: $(VENV)/.installed

train: setup
	$(VENV)/bin/python -m experiments.train --config=configs/ling2.py:tiny --workdir=$(WORKDIR) $(ARGS)

# Files run whole on 2 workers, longest first: tests/conftest.py orders them; xdist's own
# reorder, by test count, would start the longest files last. (3 workers on CI's 2 cores
# measured 777 and 866 s of tests against 808 s with 2: no steady gain.)
test: setup
	$(VENV)/bin/python -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder --durations=15 tests

lint: setup
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) workdirs
