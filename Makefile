# corella: every target does its own set-up on a fresh machine.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# The CPU build of PyTorch that lies on this kind of machine; a bare `torch` requirement would
# otherwise pull a multi-GB CUDA build. Override with TORCH_SPEC=... elsewhere.
TORCH_SPEC ?= torch==2.13.0

.PHONY: quickstart test lint format clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(STAMP): pyproject.toml | $(BIN)/python
	@$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install "$(TORCH_SPEC)"
	@echo "Installing corella[all] (llama-cpp-python compiles llama.cpp on first install: ~6 min on 2 cores)"
	$(BIN)/python -m pip install -e ".[all]"
	@touch $(STAMP)

quickstart: $(STAMP)
	$(BIN)/corella quickstart

test: $(STAMP)
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache build *.egg-info
