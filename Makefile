# Two entry points for a fresh machine:
#   make pipeline   set up .venv and run the whole DVC pipeline (dvc repro)
#   make test       set up .venv and run the test suite (what CI runs)
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin
export PATH := $(abspath $(BIN)):$(PATH)

.PHONY: setup check-python pipeline test test-fast ui team-server compare clean-outputs

setup: $(VENV)/.installed

# The torch build. Empty: whatever this machine's pip resolves for torch==2.13.0 (here the local CPU
# wheel; on an ordinary Linux machine with PyPI, the CUDA build). To choose, name PyTorch's index:
#   make setup TORCH_INDEX=https://download.pytorch.org/whl/cpu     CPU only (no CUDA libraries)
#   make setup TORCH_INDEX=https://download.pytorch.org/whl/cu126   CUDA 12.6
TORCH_INDEX ?=
TORCH_PIP_ARGS = $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))

check-python:
	@$(PYTHON) -c 'import sys; v = sys.version_info; sys.exit(0 if v >= (3, 11) else "SunFish needs Python 3.11 or newer, and $(PYTHON) is %d.%d: install one and run make with PYTHON=python3.11 (or newer)" % (v[0], v[1]))'

# torch is installed first and pinned, from TORCH_INDEX when given, so that the project's own
# install finds it satisfied and never pulls another build.
$(VENV)/.installed: pyproject.toml | check-python
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q $(TORCH_PIP_ARGS) "torch==2.13.0"
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

pipeline: setup
	dvc repro

test: setup
	$(BIN)/python -m pytest -q

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow"

# The MLflow UI over this project's store: one row per experiment, expand it for its stage runs.
ui: setup
	mlflow ui --backend-store-uri "sqlite:///$(abspath mlflow.db)" --host 127.0.0.1 --port 5000

# A tracking server shared by a team: runs in TEAM_DIR/mlflow.db, artifacts (checkpoints included)
# proxied into TEAM_DIR/artifacts. Point the stages at it with MLFLOW_TRACKING_URI=http://<host>:5000.
TEAM_DIR ?= mlflow-server
HOST ?= 127.0.0.1
team-server: setup
	mkdir -p "$(TEAM_DIR)/artifacts"
	mlflow server --backend-store-uri "sqlite:///$(abspath $(TEAM_DIR))/mlflow.db" \
		--artifacts-destination "$(abspath $(TEAM_DIR))/artifacts" --host $(HOST) --port 5000

# Experiments side by side in the terminal (sunfish compare --help for filters).
compare: setup
	sunfish compare
