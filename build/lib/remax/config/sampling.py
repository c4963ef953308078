"""The decoding triple (temperature, top-p, top-k), defined once for every stage that samples.

ReMax's and PPO's ``algo`` and the evaluation root all inherit :class:`SamplingFields`, so the keys
stay where users write them (``algo.temperature``, ``temperature``) while the fields, their checks
and their conversion to the sampler's :class:`SamplingConfig` exist once.
"""

from __future__ import annotations

from dataclasses import dataclass

from remax.config.base import _require


@dataclass(frozen=True, kw_only=True)
class SamplingConfig:
    """Decoding of the sampled rows (``remax.rollout.generate``). Greedy rows ignore everything
    but ``max_new_tokens``."""

    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0

    @property
    def filtered(self) -> bool:
        """True when the sampled law differs from the raw softmax (temperature, top-p or top-k)."""
        return self.top_p < 1 or self.temperature != 1 or self.top_k > 0


@dataclass(kw_only=True)
class SamplingFields:
    """The sampled decoding's three knobs, as config fields."""

    temperature: float = 1.0
    """Sampling temperature (> 0)."""
    top_p: float = 1.0
    """Nucleus sampling mass, in (0, 1]."""
    top_k: int = 0
    """Top-k sampling, 0 disables."""

    def check_sampling(self, prefix: str) -> None:
        """Raise ConfigError naming ``<prefix>temperature`` etc. for a bad value."""
        _require(self.temperature > 0, f"{prefix}temperature", self.temperature, "use a value > 0")
        _require(0 < self.top_p <= 1, f"{prefix}top_p", self.top_p, "use a value in (0, 1]")
        _require(self.top_k >= 0, f"{prefix}top_k", self.top_k, "use >= 0 (0 disables)")

    def sampling(self, max_new_tokens: int) -> SamplingConfig:
        """The sampler's config for answers of at most ``max_new_tokens`` tokens."""
        return SamplingConfig(
            max_new_tokens=max_new_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
        )
