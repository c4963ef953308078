"""fp32 master weights for a model trained in bf16 without DeepSpeed (which keeps its own).

AdamW applied to bf16 weights rounds every update to bf16's 8-bit mantissa: at the release's actor
lr 1e-6 an update is far below half a bf16 step of a typical weight, so almost nothing changes.
Mixed-precision practice (and DeepSpeed's bf16 optimizer) keeps an fp32 copy that the optimizer
updates and copies back to the bf16 model after each step; forwards and backwards stay in bf16.
"""

from __future__ import annotations

import torch


class MasterWeights:
    """The fp32 parameters an optimizer should step, for ``model``'s trainable parameters.

    fp32 parameters are their own master (no copy); only lower-precision ones get one.
    """

    def __init__(self, model: torch.nn.Module) -> None:
        trainable = [p for p in model.parameters() if p.requires_grad]
        self.pairs = [
            (p, torch.nn.Parameter(p.detach().float().clone()))
            for p in trainable
            if p.dtype != torch.float32
        ]
        copies = {id(p): m for p, m in self.pairs}
        # An nn.Module, so build_optimizer / optimizer_step (which take a model) can use it as is.
        self.params = torch.nn.ParameterList([copies.get(id(p), p) for p in trainable])

    @property
    def active(self) -> bool:
        return bool(self.pairs)

    def grads_to_master(self) -> None:
        """Move the model's (all-reduced) low-precision gradients onto the fp32 copies."""
        for p, m in self.pairs:
            m.grad = None if p.grad is None else p.grad.float()
            p.grad = None

    @torch.no_grad()
    def copy_to_model(self) -> None:
        for p, m in self.pairs:
            p.copy_(m)

    def state_dict(self) -> list[torch.Tensor]:
        """The fp32 copies (not derivable from the bf16 weights: a resume needs them)."""
        return [m.detach().cpu().clone() for _, m in self.pairs]

    @torch.no_grad()
    def load_state_dict(self, tensors: list[torch.Tensor]) -> None:
        if len(tensors) != len(self.pairs):
            raise ValueError(f"{len(tensors)} master tensors for {len(self.pairs)} parameters")
        for (_, m), t in zip(self.pairs, tensors):
            m.copy_(t)
        self.copy_to_model()
