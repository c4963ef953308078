"""Runtime inputs a stage reads (model directories, data files), checked before anything is written.

A bad input is the user's to fix, not a bug: it surfaces as :class:`InputError`, whose message
names the key, the value seen and the fix, and ``jobs`` prints it as one ``error: ...`` line with
exit code 2 (the same contract as a bad config value). Checks that need no model or data loaded run
first (:func:`check_model_paths`); errors found while reading data are re-raised as InputError by
:func:`data_error`.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

# What HF accepts as a hub id: "name" or "owner/name", no leading "/", "." or "~".
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


class InputError(ValueError):
    """A runtime input (a path, a data file, a checkpoint) is unusable; the message says the fix."""


def check_model_path(key: str, path: str | None) -> None:
    """Raise InputError unless ``path`` is None, an HF model directory, or a reachable hub id."""
    if path is None:
        return
    local = Path(path).expanduser()
    if local.is_dir():
        if not (local / "config.json").is_file():
            raise InputError(
                f"{key}={path!r}: the directory has no config.json, so it is not a Hugging Face "
                "model; give an earlier stage's <run_dir>/export/ or a hub id"
            )
        return
    if local.exists():
        raise InputError(f"{key}={path!r} is a file: give a model directory (an export/ dir)")
    if not _HUB_ID.match(path) or os.path.isabs(path):
        raise InputError(
            f"{key}={path!r}: no such directory; give an existing export/ dir or a hub id "
            "(owner/name)"
        )
    if os.environ.get("HF_HUB_OFFLINE") == "1" and not _in_hf_cache(path):
        raise InputError(
            f"{key}={path!r}: not a local directory and not in the HF cache, and HF_HUB_OFFLINE=1 "
            f"(compute nodes have no network): run `hf download {path}` on a login node or give a "
            "local copy"
        )


def _in_hf_cache(repo_id: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)


def check_model_paths(config) -> None:
    """Every model path a stage config names (``model``, ``reward_model``, ``reference``,
    ``policies``), before any is loaded."""
    for key in ("model", "reward_model", "reference"):
        section = getattr(config, key, None)
        if section is not None:
            check_model_path(f"{key}.path", getattr(section, "path", None))
    for i, path in enumerate(getattr(config, "policies", None) or []):
        check_model_path(f"policies[{i}]", path)


def check_data_source(key: str, source: str | None) -> None:
    """A local data path that does not exist fails here, before any model is loaded (hub names
    and the built-in sets are left to the loaders)."""
    if source is None or source in ("synthetic", "held_out"):
        return
    local = Path(source).expanduser()
    if local.exists():
        return
    if _HUB_ID.match(source) and local.suffix not in (".json", ".jsonl", ".parquet", ".txt"):
        return
    raise InputError(
        f"{key}={source!r}: no such file or directory; fix the path, or give a hub dataset as "
        "owner/name (e.g. Dahoas/rm-static)"
    )


def check_inputs(config) -> None:
    """Every model path and local data path a stage config names, before anything is loaded."""
    check_model_paths(config)
    data = getattr(config, "data", None)
    if data is not None:
        check_data_source("data.source", data.source)
    check_data_source("prompt_source", getattr(config, "prompt_source", None))


def data_error(source: str, exc: Exception) -> InputError:
    """``exc`` from reading ``data.source`` as an InputError that names the key."""
    first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return InputError(f"data.source={source!r}: {first}")
