# `make train` and `make test` work on a fresh machine: they create .venv and install on first use.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
PRESET ?= tiny_moe
# Hugging Face interop test deps (CPU torch). `make test HF_DEPS=` skips them (tests marked hf then skip).
HF_DEPS ?= torch==2.13.0 transformers

.PHONY: train test test-all install clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e ".[test]"
	$(if $(strip $(HF_DEPS)),$(BIN)/python -m pip install -q $(HF_DEPS) || echo "note: HF extras not installed: tests marked hf will skip")
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
