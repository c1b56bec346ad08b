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

# the experiment file's study: 32 trials on GPUs, 16 on CPUs (experiments/study.toml, [cpu])
study: $(STAMP)
	$(PY) tune/run.py

# The report's browser test needs Debian's chromium: installed here when missing and we are root
# (CI); otherwise that one test is skipped (it fails under CI=true instead).
test: $(STAMP)
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } || \
	  echo "no chromium: the report's browser test will be skipped"
	$(PY) -m pytest

bench: $(STAMP)
	$(PY) -m crackcore.bench

clean-venv:
	rm -rf $(VENV)
