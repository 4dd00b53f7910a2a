# Two commands on a fresh machine: `make eval` (main job) and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
export HF_HUB_OFFLINE := 1

.PHONY: setup test test-fast eval clean

$(BIN)/bcllm: pyproject.toml
	$(PY) -m venv $(VENV)
	# The pinned CPU build lies on local disk; asking for any other torch can pull a multi-GB CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

setup: $(BIN)/bcllm

test: setup
	$(BIN)/python -m pytest -q

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow"

eval: setup
	$(BIN)/bcllm eval

clean:
	rm -rf $(VENV) build src/*.egg-info
