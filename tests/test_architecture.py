"""Layer boundaries (style.md §2, docs/architecture.md), checked on every module's imports.

Layers, lowest first: L0 ``remax/algo`` (maths) → L1 the capabilities (every other module of
``remax/`` outside ``remax/trainers``: config, models, data, rollout, engines, checkpoint, ...) →
L2 ``remax/trainers`` → L3 ``jobs/``. A module may import its own layer and the layers below,
never above; and no chain of imports may lead back to where it started (a circle). Imports inside
functions count too: a lazy import is still a dependency.

The checks are functions of a source tree, so a test plants violations in a scratch copy and
asserts that they are found (a test that cannot fail checks nothing).
"""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STDLIB = set(sys.stdlib_module_names)
LAYERS = ("algo", "capability", "trainers", "jobs")


def _module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules(root: Path) -> dict[str, Path]:
    """Every project module (``remax.*``, ``jobs.*``) of the tree at ``root``."""
    out = {}
    for top in ("remax", "jobs"):
        for path in sorted((root / top).rglob("*.py")):
            out[_module_name(root, path)] = path
    assert out, f"no modules under {root}"
    return out


def _imported(node: ast.AST, modules: dict[str, Path]) -> set[str]:
    """Project modules an import statement names (``from a import b``: ``a.b`` when it is a
    module, else ``a``)."""
    names: list[str] = []
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
        names = [f"{node.module}.{a.name}" for a in node.names] + [node.module]
    out = set()
    for name in names:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        if name:
            out.add(name)
    if isinstance(node, ast.ImportFrom) and node.module:
        # `from a import b` with b a module imports a.b, not (only) the package a.
        subs = {f"{node.module}.{a.name}" for a in node.names} & set(modules)
        if subs:
            out = (out - {node.module}) | subs
    return out


def import_graph(root: Path) -> dict[str, set[str]]:
    """Module → the project modules it imports (anywhere in its body)."""
    modules = _modules(root)
    graph = {}
    for name, path in modules.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            deps |= _imported(node, modules)
        graph[name] = deps - {name}
    return graph


def layer(module: str) -> int:
    if module.startswith("jobs"):
        return 3
    if module.startswith("remax.trainers"):
        return 2
    if module == "remax" or module.startswith("remax.algo"):
        return 0
    return 1


def upward_imports(root: Path) -> list[str]:
    """``"a (layer) imports b (layer)"`` for every import of a higher layer."""
    return [
        f"{m} ({LAYERS[layer(m)]}) imports {d} ({LAYERS[layer(d)]})"
        for m, deps in sorted(import_graph(root).items())
        for d in sorted(deps)
        if layer(d) > layer(m)
    ]


def import_circles(root: Path) -> list[list[str]]:
    """Strongly connected groups of more than one module (Tarjan), each a circle of imports."""
    graph = import_graph(root)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    circles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                circles.append(sorted(group))

    sys.setrecursionlimit(10_000)
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return circles


def _third_party(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names - STDLIB - {"remax", "jobs"}


# ---------------------------------------------------------------- the tree


def test_imports_only_go_down_the_layers():
    bad = upward_imports(REPO)
    assert not bad, "imports against the layers (docs/architecture.md):\n" + "\n".join(bad)


def test_no_import_circle():
    circles = import_circles(REPO)
    assert not circles, "import circles: " + "; ".join(" ↔ ".join(c) for c in circles)


def test_algo_imports_only_torch_and_stdlib():
    for name, path in _modules(REPO).items():
        if layer(name) == 0:
            bad = _third_party(path) - {"torch"}
            assert not bad, f"{name} imports {bad}; remax/algo may import torch only"


def test_only_jobs_know_hydra_omegaconf_submitit():
    for name, path in _modules(REPO).items():
        if not name.startswith("jobs"):
            bad = _third_party(path) & {"hydra", "omegaconf", "submitit"}
            assert not bad, f"{name} imports {bad}; only jobs/ may"


def test_only_log_module_imports_wandb():
    for name, path in _modules(REPO).items():
        if name.startswith("remax") and name != "remax.log":
            assert "wandb" not in _third_party(path), f"{name} imports wandb"


def test_only_distributed_names_nccl_or_cuda_devices():
    """Device and process-group choice live in remax/distributed.py (style.md §2)."""
    for name, path in _modules(REPO).items():
        if name in ("remax.distributed",) or not name.startswith("remax"):
            continue
        text = path.read_text()
        for needle in ('"nccl"', 'torch.device("cuda"', "init_process_group"):
            assert needle not in text, f"{name} names {needle}: use remax.distributed"


def test_trainers_do_not_import_each_other():
    """Trainers share the loop and the conventions module, never another trainer."""
    shared = {"remax.trainers", "remax.trainers.loop", "remax.trainers.rl_eval"}
    shared |= {
        "remax.trainers.conventions",
        "remax.trainers.best_actor",
        "remax.trainers.checkpointer",
        "remax.trainers.rl_setup",
    }
    graph = import_graph(REPO)
    for name, deps in graph.items():
        if name.startswith("remax.trainers."):
            others = {d for d in deps if d.startswith("remax.trainers")} - shared
            assert not others, f"{name} imports {others}"


def test_importing_remax_and_algo_does_not_import_transformers():
    code = "import sys, remax, remax.algo, remax.config; print('transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# ---------------------------------------------------------------- size budgets

MAX_MODULE_LINES, MAX_FUNCTION_LINES = 500, 60
SIZED = ("remax", "jobs", "benchmarks")
# Over budget on purpose; the README's layout section says why for each (checked below).
SIZE_EXEMPT = ("remax/plan.py",)


def _function_lines(node: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    """``def`` to the last line, the docstring not counted (a long why is welcome)."""
    lines = node.end_lineno - node.lineno + 1
    first = node.body[0]
    if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
        if isinstance(first.value.value, str):
            lines -= first.end_lineno - first.lineno + 1
    return lines


def size_violations(root: Path) -> list[str]:
    found = []
    for top in SIZED:
        for path in sorted((root / top).rglob("*.py")):
            rel = path.relative_to(root).as_posix()
            if rel in SIZE_EXEMPT:
                continue
            text = path.read_text()
            if (n := len(text.splitlines())) > MAX_MODULE_LINES:
                found.append(f"{rel}: {n} lines")
            for node in ast.walk(ast.parse(text)):
                if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                    if (n := _function_lines(node)) > MAX_FUNCTION_LINES:
                        found.append(f"{rel}:{node.lineno} {node.name}: {n} lines")
    return found


def test_modules_and_functions_keep_their_size_budgets():
    assert size_violations(REPO) == []


def test_every_size_exemption_is_explained_in_the_readme():
    readme = (REPO / "README.md").read_text()
    layout = readme[readme.index("## Layout") :]
    budget = layout[layout.index("Size budgets") :].split("\n\n")[0]
    assert all(f"`{path}`" in budget for path in SIZE_EXEMPT), budget


# ---------------------------------------------------------------- the checks catch what they claim


def _scratch(tmp_path: Path) -> Path:
    for top in SIZED:
        shutil.copytree(REPO / top, tmp_path / top, ignore=shutil.ignore_patterns("__pycache__"))
    return tmp_path


def _append(path: Path, line: str) -> None:
    path.write_text(path.read_text() + f"\n\ndef _planted():\n    {line}\n")


def test_an_upward_import_planted_in_a_copy_is_found(tmp_path):
    root = _scratch(tmp_path)
    assert upward_imports(root) == []  # the copy is the tree
    _append(root / "remax" / "models" / "tiny.py", "from remax.trainers.loop import run")
    _append(root / "remax" / "algo" / "masked.py", "import remax.config")
    assert upward_imports(root) == [
        "remax.algo.masked (algo) imports remax.config (capability)",
        "remax.models.tiny (capability) imports remax.trainers.loop (trainers)",
    ]


def test_a_circle_planted_in_a_copy_is_found(tmp_path):
    root = _scratch(tmp_path)
    before = import_circles(root)  # the tree's own (none, by the test above)
    _append(root / "remax" / "stats.py", "from remax.fileio import write_json")
    _append(root / "remax" / "fileio.py", "from remax.stats import mean_stderr")
    assert [c for c in import_circles(root) if c not in before] == [["remax.fileio", "remax.stats"]]


def test_an_oversized_function_and_module_planted_in_a_copy_are_found(tmp_path):
    root = _scratch(tmp_path)
    assert size_violations(root) == []
    long_body = "\n".join(f"    x{i} = {i}" for i in range(MAX_FUNCTION_LINES))
    fileio = root / "remax" / "fileio.py"
    fileio.write_text(fileio.read_text() + f'\n\ndef _planted():\n    """Why."""\n{long_body}\n')
    (root / "jobs" / "_planted.py").write_text("x = 1\n" * (MAX_MODULE_LINES + 1))
    found = size_violations(root)
    assert len(found) == 2 and "jobs/_planted.py: 501 lines" in found, found
    [planted] = [f for f in found if f.startswith("remax/fileio.py:")]
    assert planted.endswith(" _planted: 61 lines"), found  # the docstring is not counted
