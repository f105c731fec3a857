# One environment (.venv) for everything; created on first use. Torch is pinned to the CPU
# build through constraints.txt so that setup never downloads a CUDA wheel.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test lint format bench readme clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -qq --disable-pip-version-check -c constraints.txt torch==2.13.0
	$(BIN)/pip install -qq --disable-pip-version-check -c constraints.txt -e '.[dev,distributed]'
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/actstore demo $(or $(DIR),demo-store)

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

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
