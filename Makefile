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

.PHONY: demo test lint clean-demo

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet "$(TORCH)" -e .
	touch $@

$(VENV)/.installed-dev: pyproject.toml $(VENV)/.installed
	$(BIN)/pip install --quiet "$(TORCH)" -e ".[dev]"
	touch $@

## demo: SFT → reward model → ReMax on the tiny CPU default, then a summary (runs/demo/)
demo: $(VENV)/.installed
	$(BIN)/python -m jobs.pipeline run.root=runs/demo

## test: the whole test suite (CPU, offline; Slurm tests need scripts/local_slurm.sh up)
test: $(VENV)/.installed-dev
	$(BIN)/python -m pytest

lint: $(VENV)/.installed-dev
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

clean-demo:
	rm -rf runs/demo
