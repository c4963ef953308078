"""Hydra glue: register the dataclass schemas, compose, convert to dataclasses, fail in one line.

The stage table's schemas (``remax/stages.py``) are stored in the ConfigStore as ``<stage>_schema``;
each ``hydra_conf/<stage>.yaml`` starts from its schema, so group files only select and override,
a misspelt key fails at composition, and ``OmegaConf.to_object`` runs the ``__post_init__`` checks.
"""

from __future__ import annotations

import sys
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException

from remax import stages
from remax.config import ConfigError

CONF_DIR = str(Path(__file__).resolve().parent.parent / "hydra_conf")
SCHEMAS = {name: s.schema for name, s in stages.STAGES.items()}

_cs = ConfigStore.instance()
for _stage, _schema in SCHEMAS.items():
    _cs.store(name=f"{_stage}_schema", node=_schema)


def fail(message: str, code: int = 2) -> None:
    """One line on stderr and a non-zero exit: the bad-input contract of every job."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(code)


def stage_spec(name: str) -> stages.Stage:
    """The stage table's row of ``name``; an unknown stage exits with one line."""
    try:
        return stages.stage(name)
    except ConfigError as exc:
        fail(str(exc))


def _root_cause(exc: BaseException) -> BaseException:
    while exc.__cause__ is not None or exc.__context__ is not None:
        nxt = exc.__cause__ or exc.__context__
        if isinstance(exc, ConfigError):
            break
        exc = nxt
    return exc


def to_config(cfg: DictConfig):
    """Composed DictConfig → the stage's dataclass; an invalid value exits with one line."""
    try:
        return OmegaConf.to_object(cfg)
    except (ConfigError, OmegaConfBaseException) as exc:
        cause = _root_cause(exc)
        if isinstance(cause, ConfigError):
            fail(str(cause))
        fail(str(exc).splitlines()[0])


def _hydra_error(stage: str, exc: BaseException) -> None:
    parts, seen = [], exc
    while seen is not None:  # Hydra wraps the useful detail (valid values, key) in the cause
        text = " ".join(str(seen).split())
        if text and text not in parts:
            parts.append(text)
        seen = seen.__cause__
    fail(f"{stage}: " + ": ".join(parts))


def compose_dict(stage: str, overrides: list[str], saved: dict | None = None) -> DictConfig:
    """THE composition of a stage config, as a DictConfig; every entry point goes through it.

    ``saved``: a run dir's ``config.yaml`` to start from instead of ``hydra_conf/<stage>.yaml``
    (``jobs.resume``); ``overrides`` then apply as ``key=value`` on top.
    """
    schema = stage_spec(stage).schema
    try:
        if saved is not None:
            cfg = OmegaConf.merge(OmegaConf.structured(schema), saved)
            OmegaConf.set_struct(cfg, True)
            return apply_values(cfg, overrides)
        with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
            return compose(config_name=stage, overrides=overrides)
    except (HydraException, OmegaConfBaseException) as exc:
        _hydra_error(stage, exc)


def apply_values(cfg: DictConfig, overrides: list[str]) -> DictConfig:
    """``key=value`` overrides (Hydra's grammar, no config groups) onto a composed config, in
    place: what Hydra does after the defaults list, without recomposing (sweeps, resume)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    for override in OverridesParser.create().parse_overrides(overrides):
        key = override.key_or_group
        if override.is_delete():
            parent, _, leaf = key.rpartition(".")
            node = OmegaConf.select(cfg, parent) if parent else cfg
            with open_dict(node):
                node.pop(leaf, None)
        elif override.is_add():
            with open_dict(cfg):
                OmegaConf.update(cfg, key, override.value(), merge=True, force_add=True)
        else:
            OmegaConf.update(cfg, key, override.value(), merge=True)
    return cfg


def compose_stage(stage: str, overrides: list[str], saved: dict | None = None):
    """:func:`compose_dict`, converted to the stage's dataclass; bad input exits in one line."""
    return to_config(compose_dict(stage, overrides, saved))
