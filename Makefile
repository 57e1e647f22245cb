# corella: every target does its own set-up on a fresh machine.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# The CPU build of PyTorch that lies on this kind of machine; a bare `torch` requirement would
# otherwise pull a multi-GB CUDA build. Override with TORCH_SPEC=... elsewhere.
TORCH_SPEC ?= torch==2.13.0

.PHONY: quickstart test tools lint format clean install-gpu test-gpu

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

# tests/test_balancer.py runs Debian's nginx in front of two replicas, tests/test_pgstore.py a
# PostgreSQL server (Debian's binaries): installed here where make runs as root with apt-get;
# elsewhere those tests skip and say why
APT_INSTALL := apt-get install -y -qq --no-install-recommends
# $(1): a shell test that the tool is there; $(2): its Debian package; $(3): the tests that need it
define install_missing
	@$(1) || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && { $(APT_INSTALL) $(2) >/dev/null 2>&1 || \
	  { apt-get update -qq >/dev/null 2>&1 && $(APT_INSTALL) $(2) >/dev/null 2>&1; }; }; } || \
	  echo "$(2) could not be installed: $(3) will skip"
endef
tools:
	$(call install_missing,command -v nginx >/dev/null || [ -x /usr/sbin/nginx ],nginx,tests/test_balancer.py)
	$(call install_missing,ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || command -v initdb >/dev/null,postgresql,tests/test_pgstore.py)

test: $(STAMP) tools
	$(BIN)/python -m pytest -q

# A GPU box: llama.cpp rebuilt with CUDA for the card that is there, onnxruntime-gpu instead of
# onnxruntime, TensorRT where pip has it for this CUDA; then `corella doctor` says what works.
# CUDA_ARCH is read from nvidia-smi (9.0 -> 90); LLAMA_CMAKE_EXTRA adds CMake options.
CUDA_ARCH ?= $(shell nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -1 | tr -d '. ')
LLAMA_CMAKE_EXTRA ?=
install-gpu: $(STAMP)
	@command -v nvidia-smi >/dev/null || { echo "install-gpu: no nvidia-smi: is this a GPU box with the driver loaded?"; exit 1; }
	@command -v nvcc >/dev/null || { echo "install-gpu: no nvcc: install the CUDA toolkit (llama.cpp is compiled here)"; exit 1; }
	$(BIN)/python -m pip uninstall -y onnxruntime
	$(BIN)/python -m pip install "onnxruntime-gpu>=1.18"
	CMAKE_ARGS="-DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=$(CUDA_ARCH) $(LLAMA_CMAKE_EXTRA)" \
	  CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) $(BIN)/python -m pip install --force-reinstall --no-deps \
	  --no-binary llama-cpp-python --no-cache-dir "llama-cpp-python==$$($(BIN)/python -c 'import llama_cpp; print(llama_cpp.__version__)')"
	-$(BIN)/python -m pip install tensorrt || echo "install-gpu: no TensorRT wheel for this CUDA; the CUDA provider serves the CRM"
	$(BIN)/corella doctor

# The tests that need a card (skipped, with the reason, elsewhere).
test-gpu: $(STAMP)
	$(BIN)/python -m pytest -q -m gpu -rs

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache build *.egg-info
