"""Top-k and top-p of vLLM's sampled rows by remax's own rule, as a vLLM logits processor.

vLLM's requests carry no top-k/top-p of their own (``top_k=0``, ``top_p=1``): each sampled
request names its ``(top_k, top_p)`` in ``SamplingParams.extra_args[KEY]`` and
:class:`NucleusFilter` applies ``remax.algo.sampling.filter_logits`` to those rows. Two reasons:

- one rule: the ``vllm`` engine samples from exactly the filtered distribution the ``hf`` engine
  samples from and ``logprob_dist=sampling_adjusted`` scores (the same function);
- speed: vLLM's CPU sampler sorts the whole vocabulary of every row (greedy ones included) at every
  step when top-p is on, which was 60 % of a CPU decode at hidden 256 (32k vocabulary); the filter
  ranks only the top-k survivors of the sampled rows.

Used on the CPU build only. On CUDA vLLM's own top-k/top-p runs (its Triton/FlashInfer kernels,
no host sync per step; the same rule up to rounding and ties at the cut, which
``remax.algo.sampling.nucleus_with_token`` absorbs when scoring).

vLLM applies "argmax-invariant" processors after the temperature and right before its own
top-k/top-p step, so the logits seen here are already divided by the row's temperature (the
filter runs at temperature 1), and greedy rows (not filtered) keep their argmax. vLLM's log-probs
(``Rollout.logprobs``, the raw softmax) are computed before any processor and do not change.

Imports vLLM: import this module only where vLLM is installed (``remax.rollout.vllm``).
"""

from __future__ import annotations

from collections import defaultdict

import torch
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor, MoveDirectionality

from remax.algo.sampling import filter_logits
from remax.config.sampling import SamplingConfig

KEY = "remax_top_k_top_p"
# Loaded by name in vLLM's engine process too (the file route starts one).
FQCN = f"{__name__}:NucleusFilter"


def request_sampling(sampling: SamplingConfig, *, greedy: bool, by_filter: bool = True) -> dict:
    """The ``SamplingParams`` fields of one request. ``by_filter``: vLLM's own top-k/top-p off and
    the filter's ``(top_k, top_p)`` in ``extra_args`` for a sampled row that truncates; else
    vLLM's own (its CUDA kernels: the GPU build)."""
    if greedy:
        return {"temperature": 0.0, "top_p": 1.0, "top_k": 0}
    if not by_filter:
        return {
            "temperature": sampling.temperature,
            "top_p": sampling.top_p,
            "top_k": sampling.top_k,
        }
    fields = {"temperature": sampling.temperature, "top_p": 1.0, "top_k": 0}
    if sampling.top_k > 0 or sampling.top_p < 1.0:
        fields["extra_args"] = {KEY: (sampling.top_k, sampling.top_p)}
    return fields


class NucleusFilter(LogitsProcessor):
    """vLLM logits processor: ``filter_logits`` on the rows whose request names a filter."""

    def __init__(self, vllm_config, device: torch.device, is_pin_memory: bool) -> None:
        self.rows: dict[int, tuple[int, float]] = {}  # batch index -> (top_k, top_p)

    def is_argmax_invariant(self) -> bool:
        return True  # the argmax is never filtered out; applied to sampled rows only

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        """Follow the persistent batch: removed, then added, then moved (vLLM's order)."""
        if batch_update is None:
            return
        for index in batch_update.removed:
            self.rows.pop(index, None)
        for index, params, _, _ in batch_update.added:
            wanted = (params.extra_args or {}).get(KEY)
            if wanted is None:
                self.rows.pop(index, None)
            else:
                self.rows[index] = (int(wanted[0]), float(wanted[1]))
        for a, b, direction in batch_update.moved:
            at_a, at_b = self.rows.pop(a, None), self.rows.pop(b, None)
            if at_a is not None:
                self.rows[b] = at_a
            if at_b is not None and direction == MoveDirectionality.SWAP:
                self.rows[a] = at_b

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        """(num_rows, V) logits, temperature applied → the same with filtered tokens at −inf."""
        groups: dict[tuple[int, float], list[int]] = defaultdict(list)
        for index, wanted in self.rows.items():
            groups[wanted].append(index)
        for (top_k, top_p), indices in groups.items():
            rows = torch.tensor(indices, device=logits.device)
            logits[rows] = filter_logits(logits[rows], temperature=1.0, top_p=top_p, top_k=top_k)
        return logits
