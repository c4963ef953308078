"""Where a run lives and how it is logged (``run``, ``log``)."""

from __future__ import annotations

import enum
from dataclasses import dataclass

from remax.config.base import _require


class WandbMode(str, enum.Enum):
    auto = "auto"  # online when an API key is present and WANDB_MODE is not "offline", else offline
    online = "online"
    offline = "offline"
    disabled = "disabled"


@dataclass(kw_only=True)
class RunConfig:
    root: str = "runs"
    """Root of all run directories: ``<root>/<stage>/<name>-<signature>/``."""
    name: str = "default"
    """Human label, the prefix of the run directory name."""
    attempt: int = 0
    """Part of the signature: bump it for a deliberately fresh run of an identical config."""
    force: bool = False
    """Start even when the run directory holds a different config (the old one is kept as
    config.previous.yaml)."""

    def __post_init__(self) -> None:
        _require(
            bool(self.name) and "/" not in self.name, "run.name", self.name, "use a plain name"
        )


@dataclass(kw_only=True)
class LogConfig:
    wandb_mode: WandbMode = WandbMode.auto
    """W&B mode. ``auto``: online with an API key, offline otherwise (compute nodes)."""
    wandb_project: str = "remax"
    """W&B project."""
    wandb_entity: str | None = None
    """W&B entity (team); None uses the key's default."""
    wandb_group: str | None = None
    """W&B group; None groups by run name (a pipeline or sweep shares one)."""
    progress: bool = True
    """Show progress bars (tqdm)."""
