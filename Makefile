# The README's two commands: `make demo` (the main job, end to end) and
# `make test`. Both create .venv from this checkout on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup demo test redis-server

$(VENV)/.installed: setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[test,tfrs]"
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(PY) -m tfmm.train --flagfile=configs/ctr.flags

# The Redis index and stream tests start their own redis-server on a free port
# (tests/conftest.py); this installs Debian's when it is not on PATH.
redis-server:
	@command -v redis-server >/dev/null || { \
	  sudo=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	  install="$$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends redis-server"; \
	  $$install || { $$sudo env DEBIAN_FRONTEND=noninteractive apt-get update && $$install; }; }

test: setup redis-server
	$(PY) -m pytest -q tests
