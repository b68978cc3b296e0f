# The README's two commands: `make demo` (the main job, end to end) and
# `make test`. Both create .venv from this checkout on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup demo test

$(VENV)/.installed: setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[test,tfrs]"
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(PY) -m tfmm.train --flagfile=configs/ctr.flags

test: setup
	$(PY) -m pytest -q tests
