# `make train` and `make test` work on a fresh machine: they create .venv and install on first use.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
PRESET ?= tiny_moe

.PHONY: train test test-all install clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

train: $(STAMP)
	$(BIN)/python experiments/train.py --config $(PRESET) $(ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest -q -m "not gpu and not slow" $(ARGS)

test-all: $(STAMP)
	$(BIN)/python -m pytest -q $(ARGS)

clean:
	rm -rf runs .pytest_cache
