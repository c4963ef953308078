"""Where a trainer's step goes: one ``train_step`` timed whole and by part.

``step_breakdown(trainer, device)`` is the entry point (``benchmarks.remax_vs_ppo`` and any other
benchmark import it). Parts, each exclusive of the parts nested in it:

- ``decode``: the rollout engine's ``generate`` (its weight push excluded);
- ``weight_push``: the ``vllm`` engine's push of the actor's weights (``hf``: 0, nothing to push);
- ``scoring``: the frozen reward (``trainer.setup.rewards``);
- ``forward``: the loss's forwards: ReMax's ``_micro_loss`` (actor with grad, reference), PPO's
  ``experience`` (old log-probs, reference, values) and ``_update`` (its backward and optimizer
  steps excluded);
- ``backward`` and ``optimizer``: the actor's (and PPO's critic's) ``backward`` and ``step``;
- ``other``: the rest of the step (batching, advantages outside the parts above, metrics).

The parts add up to the step's wall time exactly (``other`` is the remainder). On CUDA every part
boundary synchronizes, so asynchronous kernels are charged to the part that launched them.
"""

from __future__ import annotations

import functools
import time

import torch

PARTS = ("decode", "weight_push", "scoring", "forward", "backward", "optimizer", "other")

# (dotted object path on the trainer, method name, part); a missing object or method is skipped.
_TIMED = (
    ("setup.rollout_engine", "generate", "decode"),
    ("setup.rollout_engine", "_push", "weight_push"),
    ("setup", "rewards", "scoring"),
    ("", "_micro_loss", "forward"),
    ("", "experience", "forward"),
    ("", "_update", "forward"),
    ("actor", "backward", "backward"),
    ("critic_actor", "backward", "backward"),
    ("actor", "step", "optimizer"),
    ("critic_actor", "step", "optimizer"),
)


class _PartTimer:
    """Exclusive time per part: a stack of open parts, each charged its time minus its children's."""

    def __init__(self, device: str) -> None:
        self.sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
        self.parts = dict.fromkeys(PARTS, 0.0)
        self.stack: list[list[float]] = []  # [start, time of nested parts]

    def wrap(self, part: str, fn):
        @functools.wraps(fn)
        def timed(*args, **kwargs):
            self.sync()
            self.stack.append([time.perf_counter(), 0.0])
            try:
                return fn(*args, **kwargs)
            finally:
                self.sync()
                start, nested = self.stack.pop()
                elapsed = time.perf_counter() - start
                self.parts[part] += elapsed - nested
                if self.stack:
                    self.stack[-1][1] += elapsed

        return timed

    def take(self, total: float) -> dict[str, float]:
        """This step's parts (``other``: the remainder of ``total``), and a fresh count."""
        parts, self.parts = self.parts, dict.fromkeys(PARTS, 0.0)
        parts["other"] = total - sum(v for k, v in parts.items() if k != "other")
        return parts


def _instrument(trainer, device: str) -> _PartTimer:
    """The trainer's part timer, its methods wrapped on first use (instance attributes only)."""
    timer = getattr(trainer, "_part_timer", None)
    if timer is not None:
        return timer
    timer = _PartTimer(device)
    for path, name, part in _TIMED:
        obj = trainer
        for attr in path.split(".") if path else ():
            obj = getattr(obj, attr, None)
        fn = getattr(obj, name, None) if obj is not None else None
        if callable(fn):
            setattr(obj, name, timer.wrap(part, fn))
    trainer._part_timer = timer
    return timer


def step_breakdown(trainer, device: str) -> tuple[float, dict, dict[str, float]]:
    """One ``trainer.train_step()`` (then ``trainer.step += 1``), timed whole and by part.

    ``trainer``: a ``RemaxTrainer`` or ``PPOTrainer`` (anything with ``train_step`` and the
    methods of ``_TIMED``); ``device``: ``"cpu"`` or ``"cuda"``. Returns (step seconds, the step's
    metrics, {part: seconds} over ``PARTS``, summing to the step seconds)."""
    timer = _instrument(trainer, device)
    timer.sync()
    t0 = time.perf_counter()
    metrics = trainer.train_step()
    timer.sync()
    total = time.perf_counter() - t0
    trainer.step += 1
    return total, metrics, timer.take(total)
