"""One seed for every random number generator a stage touches (torch CPU and CUDA, Python, NumPy).

Called once at the start of every stage, before any model is loaded, so a run is a function of its
config whatever the model source: a tiny model built from config and an export loaded with
``from_pretrained`` start the sampler from the same state on every launch. Checkpoints carry the
generators' later states (``remax.checkpoint.rng_state``), so a resumed run continues the stream.
"""

from __future__ import annotations

import random

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    """Seed Python's ``random``, NumPy's global generator and torch (CPU and every CUDA device).

    ``seed`` is already per rank (``remax.distributed.rank_seed``): ranks draw different samples,
    each reproducibly. NumPy only accepts seeds below 2**32, hence the modulo.
    """
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds every CUDA device (torch.cuda.manual_seed_all)
