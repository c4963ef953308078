"""Shared fixtures: offline environment, tiny models, and a helper to run jobs as users do."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

# A hub miss otherwise hangs ~48 s before failing (python-stack.md); W&B must never reach out.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("WANDB_SILENT", "true")
# DeepSpeed JIT-builds its shared-memory comm op on CPU (~22 s; DeepSpeedCPUAdam's ~1 min): once per
# cache, kept across runs. One cache per venv: a build's paths name its venv, so two venvs sharing
# one cache (make test, make test-vllm) rebuild each other's ops on every switch.
_VENV = Path(sys.prefix).resolve()
_VENV_KEY = hashlib.sha256(str(_VENV).encode()).hexdigest()[:8]
os.environ.setdefault("TORCH_EXTENSIONS_DIR", f"/tmp/torch_ext/{_VENV.name}-{_VENV_KEY}")

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def tokenizer():
    from remax.models.tiny import build_tokenizer

    return build_tokenizer()


def _tiny(build, tokenizer, seed: int):
    """A tiny random-init Llama of the tests' one shape, seeded so fixtures are reproducible."""
    from remax.models.tiny import llama_config

    torch.manual_seed(seed)
    config = llama_config(
        len(tokenizer),
        hidden_size=32,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        intermediate_size=64,
    )
    return build(config).eval()


@pytest.fixture
def policy(tokenizer):
    from remax.models.tiny import tiny_policy

    return _tiny(tiny_policy, tokenizer, seed=0)


@pytest.fixture
def reward_model(tokenizer):
    from remax.models.tiny import tiny_reward_model

    return _tiny(tiny_reward_model, tokenizer, seed=1)


def run_job(
    module: str, *overrides: str, check: bool = True, timeout: float = 600, env: dict | None = None
):
    """Run ``python -m <module> <overrides>`` from the repo root, as a user would."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    full_env = {k: v for k, v in full_env.items() if v is not None}  # None removes a variable
    proc = subprocess.run(
        [sys.executable, "-m", module, *overrides],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=full_env,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"{module} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc


@pytest.fixture(scope="session")
def family_checkpoint(tmp_path_factory):
    """``name -> path`` of a saved tiny checkpoint of a real tokenizer family (Llama-2, Mistral,
    Llama-3, OPT, GPT-2: tests/tokenizer_families.py), built once per session."""
    from tokenizer_families import save_family

    saved: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in saved:
            saved[name] = save_family(name, tmp_path_factory.mktemp(name))
        return saved[name]

    return get
