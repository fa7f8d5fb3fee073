# kanvolution: set-up, tests and the main job.
PYTHON ?= python3
TORCH ?= torch
VENV ?= .venv
BIN := $(VENV)/bin
DATA_DIR ?= $(firstword $(wildcard ../shared/data) $(HOME)/.cache/kanvolution)

.PHONY: setup test demo bench clean

$(BIN)/kanvolution: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "$(TORCH)"
	$(BIN)/pip install --quiet -e ".[dev]"
	@touch $@

setup: $(BIN)/kanvolution

# The venv's bin first on PATH: the optional compiled CPU kernels look for ninja there.
test: setup
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python -m pytest -n 2 src tests

demo: setup
	$(BIN)/kanvolution demo --data-dir $(DATA_DIR)

bench: setup
	$(BIN)/kanvolution bench --data-dir $(DATA_DIR)

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
