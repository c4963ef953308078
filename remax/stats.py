"""Summary statistics of evaluation samples (trainers and ``jobs.evaluate`` report the same way)."""

from __future__ import annotations

import math

import torch


def mean_stderr(values: torch.Tensor) -> dict:
    """``{"mean", "stderr", "n"}`` of a 1-D sample (stderr = sample std / sqrt(n))."""
    v = values.detach().double().cpu()
    n = v.numel()
    std = float(v.std(unbiased=True)) if n > 1 else 0.0
    return {"mean": float(v.mean()), "stderr": std / math.sqrt(n) if n else 0.0, "n": n}
