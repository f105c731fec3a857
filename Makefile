# One environment (.venv) for everything, created on first use and installed only from
# requirements.lock, which pins every distribution (torch's CPU build included) to the set that
# `make lock` resolved and the tests passed with. Ranges live in pyproject.toml.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
LOCK := requirements.lock
PIP := pip install -qq --disable-pip-version-check

.PHONY: setup demo test check lint format bench readme clean browser lock

$(STAMP): pyproject.toml $(LOCK)
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/$(PIP) -c $(LOCK) torch
	$(BIN)/$(PIP) -c $(LOCK) -e '.[dev,distributed,s3]'
	touch $(STAMP)

# Re-resolve pyproject.toml's ranges (newest releases that satisfy them, CPU torch) in a scratch
# environment, check it with `pip check`, and write every installed distribution to the lock.
LOCK_VENV := .lock-venv
lock:
	rm -rf $(LOCK_VENV) && $(PY) -m venv $(LOCK_VENV)
	$(LOCK_VENV)/bin/$(PIP) torch==2.13.0
	$(LOCK_VENV)/bin/$(PIP) -e '.[dev,distributed,s3]'
	$(LOCK_VENV)/bin/pip check
	{ echo "# Every distribution \`make setup\` installs, resolved by \`make lock\` from pyproject.toml's"; \
	  echo "# ranges on Python $$($(LOCK_VENV)/bin/python -c 'import platform; print(platform.python_version())') ($$(date -u +%F)). Do not edit: rerun \`make lock\`."; \
	  $(LOCK_VENV)/bin/pip freeze --exclude-editable | LC_ALL=C sort -f; } > $(LOCK)
	rm -rf $(LOCK_VENV)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/actstore demo $(or $(DIR),demo-store)

# The report's browser test drives Debian's chromium (Playwright cannot download its own here):
# install it when missing and we can (root with apt-get); otherwise that one test skips.
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; } \
	      >/dev/null 2>&1 || echo "note: apt-get install chromium failed; the browser test skips" >&2; \
	  else \
	    echo "note: no chromium and no root apt-get to install it; the browser test skips" >&2; \
	  fi; }

# Both test targets run one pytest-xdist worker per core of the 2-core machine they are sized
# for (JOBS=0 runs them in one process); tests/conftest.py hands them out a test file at a time.
JOBS ?= 2
PARALLEL := -n $(JOBS) --dist loadfile --no-loadscope-reorder

# The whole suite: what CI runs (.ci/run) and the README's test command.
test: lint browser
	$(BIN)/python -m pytest -q $(PARALLEL)

# The inner loop: lint, import contracts and the tests not marked slow (pyproject.toml's
# markers); under 2 minutes on an idle 2-core machine.
check: lint
	$(BIN)/python -m pytest -q $(PARALLEL) -m "not slow"

# Ruff and the import contracts of pyproject.toml (lint-imports).
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports --no-logo

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

# Rerun the README's console blocks and rewrite their output in place (cog).
readme: $(STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/cog -r -I tests/support README.md

bench: $(STAMP)
	$(BIN)/python benchmarks/patching.py

clean:
	rm -rf $(VENV) $(LOCK_VENV) demo-store .pytest_cache
