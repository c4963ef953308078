"""Layer boundaries (style.md §2), checked on every module's imports by walking its AST."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STDLIB = set(sys.stdlib_module_names)


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def _modules(folder: str) -> list[Path]:
    files = sorted((REPO / folder).rglob("*.py"))
    assert files, f"no modules under {folder}"
    return files


def test_algo_imports_only_torch_and_stdlib():
    for path in _modules("remax/algo"):
        bad = {m for m in _imports(path) if m not in STDLIB and m not in ("torch", "remax")}
        assert not bad, f"{path.relative_to(REPO)} imports {bad}; remax/algo may import torch only"
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.ImportFrom)
                and node.module
                and node.module.startswith("remax.")
            ):
                assert node.module.startswith("remax.algo"), f"{path} imports {node.module}"


def test_only_jobs_know_hydra_omegaconf_submitit():
    for path in _modules("remax"):
        bad = _imports(path) & {"hydra", "omegaconf", "submitit"}
        assert not bad, f"{path.relative_to(REPO)} imports {bad}; only jobs/ may"


def test_only_log_module_imports_wandb():
    for path in _modules("remax"):
        if path.name == "log.py":
            continue
        assert "wandb" not in _imports(path), f"{path.relative_to(REPO)} imports wandb"


TRAINERS = {"sft", "reward_model", "remax", "ppo"}


def test_trainers_do_not_import_each_other():
    # Shared helpers of the trainers package (loop, conventions, rl_eval, ...) are not trainers.
    for path in _modules("remax/trainers"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.ImportFrom) and node.module == "remax.trainers":
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith(
                "remax.trainers."
            ):
                names = [node.module.split(".")[2]]
            bad = set(names) & TRAINERS
            assert not bad, f"{path.name} imports the trainer(s) {bad}"


def test_importing_remax_and_algo_does_not_import_transformers():
    code = "import sys, remax, remax.algo, remax.config; print('transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
