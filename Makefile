# Two entry points for a fresh machine:
#   make pipeline   set up .venv and run the whole DVC pipeline (dvc repro)
#   make test       set up .venv and run the test suite (what CI runs)
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin
export PATH := $(abspath $(BIN)):$(PATH)

.PHONY: setup pipeline test test-fast ui clean-outputs

setup: $(VENV)/.installed

# torch is installed first and pinned: the CPU wheel on this machine, never the registry's CUDA build.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q "torch==2.13.0"
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

pipeline: setup
	dvc repro

test: setup
	$(BIN)/python -m pytest -q

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow"

ui: setup
	mlflow ui --backend-store-uri "sqlite:///$(abspath mlflow.db)" --host 127.0.0.1 --port 5000
