# slimline — the two quick-start commands are `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test test-core lint venv services data browser bench clean

venv: $(STAMP)

# torch is installed explicitly first: a bare `torch` requirement with no torch installed would
# pull a multi-GB CUDA build; 2.13.0 resolves to the CPU build on this platform.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

data: $(STAMP)
	bash scripts/ensure-fashion-mnist.sh $(PY)

services:
	bash scripts/ensure-services.sh

# Debian's chromium for the dashboard's browser test (tests/ui): installed with apt when missing
# (root or passwordless sudo), a loud failure otherwise
browser:
	bash scripts/ensure-browser.sh

demo: $(STAMP) data
	$(VENV)/bin/slimline demo

test: $(STAMP) data services browser lint
	$(PY) -m pytest -q -p no:cacheprovider

test-core: $(STAMP)
	$(PY) -m pytest -q tests/core

# ruff (rules in pyproject.toml) and mypy (api/, cli/, service/, worker/, core/; see pyproject.toml)
lint: $(STAMP)
	$(VENV)/bin/ruff check api cli core service worker tests benchmarks migrations
	$(VENV)/bin/mypy

clean:
	rm -rf $(VENV) .slimline .slimline-demo .pytest_cache
