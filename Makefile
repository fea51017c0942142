# `make train` and `make test` work on a fresh machine: they create .venv and install on first use.
# `make train` installs what training needs (the package); `make test` adds pytest, the data extra
# (tokenizers, tiktoken, pyarrow) and the Hugging Face test deps.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
TRAIN_STAMP := $(VENV)/.installed-train
TEST_STAMP  := $(VENV)/.installed-test
PRESET ?= tiny_moe
# pytest workers (pytest-xdist): 2 on the 2-core CI machine take the suite from ~20 to ~15 minutes
TEST_WORKERS ?= 2
# Hugging Face interop test deps (CPU torch). `make test HF_DEPS=` skips them (tests marked hf then skip).
HF_DEPS ?= torch==2.13.0 transformers

.PHONY: train test test-all install clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(TRAIN_STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e .
	touch $(TRAIN_STAMP)

$(TEST_STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e ".[test,data]"
	$(if $(strip $(HF_DEPS)),$(BIN)/python -m pip install -q $(HF_DEPS) || echo "note: HF extras not installed: tests marked hf will skip")
	touch $(TEST_STAMP)

install: $(TRAIN_STAMP)

train: $(TRAIN_STAMP)
	$(BIN)/python experiments/train.py --config $(PRESET) $(ARGS)

# JAX_PLATFORMS=cpu: on a GPU machine too, the suite runs on the CPU's 8 host devices, as in CI (tests marked
# devices(8) would otherwise skip on a machine with fewer GPUs)
test: $(TEST_STAMP)
	JAX_PLATFORMS=cpu $(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist worksteal -m "not gpu and not slow" $(ARGS)

test-all: $(TEST_STAMP)
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist worksteal $(ARGS)

clean:
	rm -rf runs .pytest_cache
