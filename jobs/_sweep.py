"""``-m`` sweeps without Hydra's launcher: expand, compose once per config-group choice, override.

Hydra's multirun recomposes the whole config for every element (~0.2 s each on a 2-core login
node: 20 s for 100 elements). The elements of a sweep differ only in a few keys, so the product of
the sweep overrides is built here (Hydra's own grammar and BasicSweeper order), the config is
composed once per distinct choice of config groups (``algo=a,b`` composes twice), and each
element's plain ``key=value`` overrides are applied to a copy of that composition. Validation is
unchanged: a misspelt key fails in the first composition, a bad value in ``to_object``.
"""

from __future__ import annotations

import itertools
from pathlib import Path

from jobs._config import CONF_DIR, compose_dict, fail, to_config


def _parse(args: list[str]):
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    try:
        return OverridesParser.create().parse_overrides(args)
    except HydraException as exc:
        fail(" ".join(str(exc).split()))


def _plain(value):
    """Hydra's parsed value → what OmegaConf takes (quoted strings lose their quotes)."""
    from hydra.core.override_parser.types import QuotedString

    if isinstance(value, QuotedString):
        return value.text
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _selects_config(override) -> bool:
    """Whether an override changes the defaults list (group choice, +/~, package), so the
    config must be composed for it rather than patched."""
    key = override.key_or_group
    if override.package is not None or "@" in key:
        return True
    if override.is_add() or override.is_delete() or override.is_force_add():
        return True
    return (Path(CONF_DIR) / key.replace(".", "/")).is_dir()


def expand(args: list[str]) -> list[list[tuple[str, str, object, bool]]]:
    """The sweep's elements in BasicSweeper's order (``a=1,2 b=x,y`` → 4), each a list of
    ``(override text, key, value, selects config)``; every override is parsed once."""
    choices = []
    for text, override in zip(args, _parse(args)):
        key, group = override.get_key_element(), _selects_config(override)
        if override.is_sweep_override():
            pairs = zip(override.sweep_string_iterator(), override.sweep_iterator())
            choices.append(
                [(f"{key}={t}", override.key_or_group, _plain(v), group) for t, v in pairs]
            )
        else:
            choices.append([(text, override.key_or_group, _plain(override.value()), group)])
    return [list(element) for element in itertools.product(*choices)]


def compose_elements(stage: str, elements: list) -> list:
    """One config per element of :func:`expand`, composing once per distinct set of
    config-group choices.

    Elements of one product share their keys, so each element's values overwrite the previous
    element's in the same composed DictConfig: no copy (a deep copy costs more than to_object).
    """
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    bases: dict[tuple[str, ...], object] = {}
    configs = []
    for element in elements:
        groups = tuple(text for text, _, _, group in element if group)
        if groups not in bases:
            # The first element's values go in too: a misspelt key fails here, naming it.
            bases[groups] = compose_dict(stage, [text for text, *_ in element])
        cfg = bases[groups]
        try:
            for _, key, value, group in element:
                if not group:
                    OmegaConf.update(cfg, key, value, merge=True)
        except OmegaConfBaseException as exc:
            fail(f"{stage}: " + " ".join(str(exc).split()))
        configs.append(to_config(cfg))
    return configs


def sweep_configs(stage: str, args: list[str]) -> list:
    """The configs of ``python -m jobs.<stage> -m <args>``."""
    return compose_elements(stage, expand(args))
