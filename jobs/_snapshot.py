"""The code a job runs is the code that was submitted.

Each submission copies the package tree (``remax/``, ``jobs/``) and its configs (``hydra_conf/``,
``slurm_templates/``) into ``<run.root>/.code/<hash>/``, content-addressed, and the job's sbatch
script runs from there. A requeue, or a job that pends for a day while someone edits the checkout,
still runs what was submitted. The job checks the hash of the tree it runs from and the versions of
the main packages against its submission record and refuses to mix either.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import shutil
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TREE = (("remax", "*.py"), ("jobs", "*.py"), ("hydra_conf", "*.yaml"), ("slurm_templates", "*"))
PACKAGES = ("torch", "transformers", "deepspeed", "submitit", "hydra-core", "omegaconf", "wandb")


def code_files(repo: Path = REPO) -> list[Path]:
    """Every file a job's behaviour depends on, relative to ``repo``, in a stable order."""
    files = []
    for folder, pattern in TREE:
        files += [
            p.relative_to(repo)
            for p in (repo / folder).rglob(pattern)
            if p.is_file() and "__pycache__" not in p.parts
        ]
    return sorted(files)


@functools.cache
def code_hash(repo: Path = REPO) -> str:
    """Hash of :func:`code_files`' names and contents (cached: a sweep hashes once)."""
    h = hashlib.sha1()
    for rel in code_files(repo):
        h.update(str(rel).encode())
        h.update((repo / rel).read_bytes())
    return h.hexdigest()[:12]


@functools.cache  # importlib.metadata parses every METADATA file: ~60 ms per call
def package_versions() -> dict[str, str | None]:
    """Installed versions, read from metadata: the login node never imports torch for this."""
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def snapshot(root: Path) -> Path:
    """``<root>/.code/<hash>/``: a copy of this checkout's code, made once per content."""
    digest = code_hash()
    target = Path(root) / ".code" / digest
    if (target / ".complete").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{digest}-", dir=target.parent))
    for rel in code_files():
        (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / rel, tmp / rel)
    (tmp / ".complete").write_text(digest + "\n")
    try:
        tmp.rename(target)  # atomic: a concurrent submission either wins or finds it complete
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def setup_lines(snapshot_dir: Path) -> list[str]:
    """Shell lines that make a job step import from ``snapshot_dir``.

    ``cd`` matters as much as PYTHONPATH: ``python -m`` puts the working directory first on
    ``sys.path``, and srun starts tasks in the batch script's working directory.
    """
    return [f"cd {snapshot_dir}", f"export PYTHONPATH={snapshot_dir}${{PYTHONPATH:+:$PYTHONPATH}}"]


def check_running_code(expected_hash: str | None, expected_versions: dict | None) -> str | None:
    """Why this process must not run the submitted job, or None when code and packages match."""
    running = code_hash(REPO)
    if expected_hash and running != expected_hash:
        return (
            f"this job runs code {running} from {REPO} but was submitted with {expected_hash}: "
            "it would mix code versions; resubmit (jobs.resume) to run the current code"
        )
    if expected_versions:
        now = package_versions()
        changed = {k: (v, now.get(k)) for k, v in expected_versions.items() if now.get(k) != v}
        if changed:
            text = ", ".join(f"{k} {a} -> {b}" for k, (a, b) in changed.items())
            return (
                f"packages changed since submission ({text}): the job would mix package "
                "versions; resubmit (jobs.resume) in the environment you mean to use"
            )
    return None
