# Two entry points (README): `make demo` runs the quickstart, `make test` runs the test suite.
# Each creates the virtual environment it needs. torch is pinned in the same pip command as the
# package so that a CPU machine takes the CPU build and never resolves a multi-GB CUDA one.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin

.PHONY: demo test install clean

$(BIN)/alignloop: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e ".[dev]" "$(TORCH)"
	touch $@

install: $(BIN)/alignloop

demo: $(BIN)/alignloop
	$(BIN)/alignloop run recipes/quickstart.yaml

test: $(BIN)/alignloop
	$(BIN)/python -m pytest -q

clean:
	rm -rf runs .pytest_cache
