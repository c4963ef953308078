"""One way to write a file so that a kill at any moment leaves the old content or the new, never a
torn one: write a hidden sibling, then ``os.replace`` it over the target (atomic on POSIX)."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path


def atomic_write(path: Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)`` on a sibling of ``path``, then rename it onto ``path``.

    ``write`` produces the whole file (``save_file``, ``torch.save`` ...). The sibling is named
    after this process, so two writers never share one temporary file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def atomic_write_text(path: Path, text: str) -> Path:
    """``path`` holds exactly ``text`` (UTF-8), written atomically."""
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_json(path: Path, obj: dict) -> Path:
    """``obj`` as indented, key-sorted JSON, written atomically."""
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True))


def replace_dir(tmp: Path, final: Path) -> Path:
    """Put the complete directory ``tmp`` at ``final``; an older ``final`` is renamed aside first
    and deleted only after the new one is in place, so a kill in between leaves one of the two
    complete (never a deleted old one and a missing new one)."""
    tmp, final = Path(tmp), Path(final)
    aside = final.with_name(f".{final.name}.old.{os.getpid()}")
    if final.exists():
        os.replace(final, aside)
    os.replace(tmp, final)
    if aside.exists():
        shutil.rmtree(aside, ignore_errors=True)
    return final
