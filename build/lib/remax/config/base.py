"""What every schema shares: the one-line error, and the dtype and schedule choices."""

from __future__ import annotations

import enum


class ConfigError(ValueError):
    """A configuration value is invalid. The message names the key, the value seen and the fix."""


def _require(ok: bool, key: str, value: object, fix: str) -> None:
    if not ok:
        raise ConfigError(f"invalid config: {key}={value!r}: {fix}")


class DType(str, enum.Enum):
    float32 = "float32"
    bfloat16 = "bfloat16"


class Scheduler(str, enum.Enum):
    cosine = "cosine"
    constant = "constant"
