# Two entry points (see README): `make study` and `make test`. Both create/reuse .venv.
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: setup study test bench clean-venv

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

study: $(STAMP)
	$(PY) tune/run.py --num-samples 32

test: $(STAMP)
	$(PY) -m pytest

bench: $(STAMP)
	$(PY) -m crackcore.bench

clean-venv:
	rm -rf $(VENV)
