"""Run directories named by a signature of the config: the same config always finds the same dir.

``<run.root>/<stage>/<run.name>-<signature>/`` where the signature is a short hash of the resolved
config minus the keys that cannot change the result (where it runs, how it logs, how often it
checkpoints). Starting the same config again therefore resumes; a different one gets its own dir.
The idea is Dora's (config-delta signatures), applied to the whole resolved config.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import json
from pathlib import Path

import yaml

from remax.fileio import atomic_write_text

# Keys (dotted prefixes) that do not change what a run computes.
EXCLUDED_KEYS = (
    "run.root",
    "run.name",
    "run.force",
    "log",
    "cluster",
    "checkpoint",
    "train.log_every",
    # Placement only: ZeRO stages and offload shard the same computation (equal up to fp32
    # rounding, tests/test_deepspeed.py); keeps run dirs from before the key existed.
    "deepspeed",
)


class RunDirError(RuntimeError):
    """The run directory cannot be used with this config."""


def to_plain(obj):
    """Dataclasses → dicts, Enums → values, tuples → lists (JSON/YAML-safe, order-stable)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, enum.Enum):
        return obj.value
    if isinstance(obj, dict):
        return {str(k): to_plain(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [to_plain(v) for v in obj]
    return obj


def flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _excluded(key: str) -> bool:
    return any(key == e or key.startswith(e + ".") for e in EXCLUDED_KEYS)


def result_keys(config) -> dict:
    """Flat ``{dotted.key: value}`` of everything that can change the result."""
    return {k: v for k, v in flatten(to_plain(config)).items() if not _excluded(k)}


def signature(config, stage: str) -> str:
    payload = json.dumps({"stage": stage, **result_keys(config)}, sort_keys=True)
    return hashlib.sha1(payload.encode()).hexdigest()[:8]


def run_dir_for(config, stage: str) -> Path:
    return Path(config.run.root) / stage / f"{config.run.name}-{signature(config, stage)}"


def differing_keys(saved: dict, current: dict) -> list[str]:
    a, b = flatten(saved), flatten(current)
    return sorted(k for k in set(a) | set(b) if not _excluded(k) and a.get(k) != b.get(k))


def prepare(config, stage: str) -> Path:
    """Create (or reopen) the run dir and write ``config.yaml``.

    A dir whose saved config differs on a result key is refused, naming the keys, unless
    ``run.force``; the old config is then kept as ``config.previous.yaml``. Nothing else is touched.
    """
    path = run_dir_for(config, stage)
    path.mkdir(parents=True, exist_ok=True)
    cfg_file = path / "config.yaml"
    current = to_plain(config)
    if cfg_file.exists():
        try:
            saved = yaml.safe_load(cfg_file.read_text()) or {}
        except yaml.YAMLError as exc:
            raise RunDirError(
                f"{cfg_file} is not valid YAML ({str(exc).splitlines()[0]}): restore it or move the "
                "run dir away"
            ) from None
        if not isinstance(saved, dict):
            raise RunDirError(
                f"{cfg_file} does not hold a config mapping: restore it or move the run dir away"
            )
        diff = differing_keys(saved, current)
        if diff and not config.run.force:
            raise RunDirError(
                f"run dir {path} holds a different config (keys: {', '.join(diff)}); "
                "start with run.attempt=<n> for a fresh run dir, or run.force=true to reuse it"
            )
        if diff:
            (path / "config.previous.yaml").write_text(cfg_file.read_text())
    atomic_write_text(cfg_file, yaml.safe_dump(current, sort_keys=False))
    return path
