"""Hydra glue: register the dataclass schemas, compose, convert to dataclasses, fail in one line.

The library's schemas (``remax/config.py``) are stored in the ConfigStore as ``<stage>_schema``;
each ``hydra_conf/<stage>.yaml`` starts from its schema, so group files only select and override,
a misspelt key fails at composition, and ``OmegaConf.to_object`` runs the ``__post_init__`` checks.
"""

from __future__ import annotations

import sys
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from remax.config import (
    ConfigError,
    EvaluateJobConfig,
    PPOJobConfig,
    RemaxJobConfig,
    RewardModelJobConfig,
    SFTJobConfig,
)

CONF_DIR = str(Path(__file__).resolve().parent.parent / "hydra_conf")
SCHEMAS = {
    "sft": SFTJobConfig,
    "reward_model": RewardModelJobConfig,
    "remax": RemaxJobConfig,
    "ppo": PPOJobConfig,
    "evaluate": EvaluateJobConfig,
}

_cs = ConfigStore.instance()
for _stage, _schema in SCHEMAS.items():
    _cs.store(name=f"{_stage}_schema", node=_schema)


def fail(message: str, code: int = 2) -> None:
    """One line on stderr and a non-zero exit: the bad-input contract of every job."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(code)


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


def compose_stage(stage: str, overrides: list[str]):
    """Compose ``hydra_conf/<stage>.yaml`` with ``overrides`` outside ``@hydra.main`` (pipeline)."""
    try:
        with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
            cfg = compose(config_name=stage, overrides=overrides)
    except (HydraException, OmegaConfBaseException) as exc:
        parts, seen = [], exc
        while seen is not None:  # Hydra wraps the useful detail (valid values, key) in the cause
            text = " ".join(str(seen).split())
            if text and text not in parts:
                parts.append(text)
            seen = seen.__cause__
        fail(f"{stage}: " + ": ".join(parts))
    return to_config(cfg)
