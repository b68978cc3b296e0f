# The README's two commands: `make demo` (the main job, end to end) and
# `make test`. Both create .venv from this checkout on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup demo test system-packages

$(VENV)/.installed: setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[test,tfrs,bench,beam]"
	touch $@

setup: $(VENV)/.installed

# Train, evaluate and export; then serve one request from the export.
demo: setup
	$(PY) -m tfmm.train --flagfile=configs/ctr.flags
	$(PY) -m tfmm.serving.predict --world=small

# Debian packages the tests need, installed when missing: redis-server (the
# Redis index and stream tests start their own on a free port,
# tests/conftest.py) and g++ (the TF Serving loader check, tfmm.serving.check).
system-packages:
	@missing=""; \
	command -v redis-server >/dev/null || missing="$$missing redis-server"; \
	command -v g++ >/dev/null || missing="$$missing g++"; \
	[ -z "$$missing" ] || { \
	  sudo=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	  install="$$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends $$missing"; \
	  $$install || { $$sudo env DEBIAN_FRONTEND=noninteractive apt-get update && $$install; }; }

test: setup system-packages
	$(PY) -m ruff check .
	# Two workers (pytest-xdist): the two cores CI has; tests hold no shared state
	# but the session's tiny world, which each worker makes for itself.
	$(PY) -m pytest -q -n 2 tests
