# One environment (.venv) for everything; created on first use. Torch is pinned to the CPU
# build through constraints.txt so that setup never downloads a CUDA wheel.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test check lint format bench readme clean browser

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -qq --disable-pip-version-check -c constraints.txt torch==2.13.0
	$(BIN)/pip install -qq --disable-pip-version-check -c constraints.txt -e '.[dev,distributed]'
	touch $(STAMP)

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
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/cog -r -I tests README.md

bench: $(STAMP)
	$(BIN)/python benchmarks/patching.py

clean:
	rm -rf $(VENV) demo-store .pytest_cache
