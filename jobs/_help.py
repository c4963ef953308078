"""``--help`` for every stage: the module's usage, the config groups, and each field's documentation.

The documentation is the attribute docstring under each dataclass field (``remax/config/``), read
from the source with ``ast`` so the help text and the schema cannot drift apart.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import shutil
import textwrap
from pathlib import Path

from jobs._config import CONF_DIR, SCHEMAS


@functools.cache
def field_docs(cls) -> dict[str, str]:
    """``{field: docstring}`` of a dataclass (and its bases)."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__[:-1]):
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError):
            continue
        body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
        for node, nxt in zip(body, body[1:]):
            if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                if isinstance(nxt, ast.Expr) and isinstance(
                    getattr(nxt, "value", None), ast.Constant
                ):
                    docs[node.target.id] = " ".join(str(nxt.value.value).split())
    return docs


def _default(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        value = f.default
        return str(getattr(value, "value", value))
    if f.default_factory is not dataclasses.MISSING:
        return (
            "(see group)"
            if dataclasses.is_dataclass(f.default_factory)
            else str(f.default_factory())
        )
    return "(required)"


def field_lines(cls, prefix: str = "") -> list[str]:
    """One entry per leaf field: ``key = default`` and its documentation, wrapped."""
    width = min(shutil.get_terminal_size((100, 20)).columns, 100)
    lines, docs = [], field_docs(cls)
    for f in dataclasses.fields(cls):
        kind = f.type if isinstance(f.type, type) else None
        nested = f.default_factory if f.default_factory is not dataclasses.MISSING else kind
        if dataclasses.is_dataclass(nested):
            lines += field_lines(nested, f"{prefix}{f.name}.")
            continue
        lines.append(f"  {prefix}{f.name} = {_default(f)}")
        if docs.get(f.name):
            lines += textwrap.wrap(
                docs[f.name], width, initial_indent=" " * 6, subsequent_indent=" " * 6
            )
    return lines


def groups() -> list[str]:
    root = Path(CONF_DIR)
    out = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        names = sorted(p.stem for p in folder.glob("*.yaml"))
        out.append(f"  {folder.name}: {', '.join(names)}")
    return out


def stage_help(stage: str, usage: str) -> str:
    return "\n".join(
        [
            "usage: " + usage.strip(),
            "",
            "Flags: -m/--multirun (sweep: a=1,2 b=x,y is one job array), --json (machine output),",
            "       --help. Hydra's own flags (--cfg job, --info) still work.",
            "",
            "Config groups (group=choice):",
            *groups(),
            "",
            "Keys (key=value; the default shown is the schema's, before group files):",
            *field_lines(SCHEMAS[stage]),
        ]
    )
