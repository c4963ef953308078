"""Supervised fine-tuning: next-token NLL on response tokens and the EOS only (spec test 23).

Data parallel at any world size, with one code path: every rank draws the same global batch, cuts
it into the same micro-batches as a single process would, and computes the part of each micro-batch
that falls in its contiguous block of rows (``distributed.micro_batch_parts``). A micro-batch's loss
is its token mean over all its tokens, wherever they live (the count is all-reduced), and the step
averages the ``train.grad_accum`` micro-batches, as a single process does (DS-Chat: per-micro-batch
token mean, averaged over accumulation steps). The ranks' summed gradients are therefore the
world-size-1 gradient for the same ``micro_batch_size`` (spec test 20).
"""

from __future__ import annotations

import torch

from remax import distributed
from remax.algo.sft import sft_loss
from remax.config import SFTJobConfig
from remax.data.batching import EpochSampler, SFTBatch, collate_sft
from remax.data.stage_data import format_prompts, stage_records
from remax.distributed import select_device
from remax.engines import build_actor
from remax.models import lora
from remax.models.policy import load_policy, token_logprobs


class SFTTrainer:
    def __init__(self, cfg: SFTJobConfig) -> None:
        self.cfg = cfg
        self.device = select_device(cfg.cluster.device)
        self.model, self.tokenizer = load_policy(cfg.model, seed=cfg.seed, device=self.device)
        lora.adapt(self.model, cfg.model.lora, seed=cfg.seed)  # model.lora.rank=0: unchanged
        train, held_out = stage_records("sft", cfg.data)
        self.train_records = format_prompts(train, cfg.data, self.tokenizer)
        self.eval_records = format_prompts(held_out, cfg.data, self.tokenizer)
        self.world_size = distributed.world_size()
        cfg.train.per_rank(self.world_size)  # refuses a batch the ranks cannot share
        self.sampler = EpochSampler(len(self.train_records), cfg.train.batch_size, cfg.seed)
        self.total_steps = min(
            cfg.train.max_steps, cfg.train.epochs * self.sampler.batches_per_epoch
        )
        # Rank 0's weights everywhere, before an engine shards them.
        distributed.broadcast_params(self.model)
        self.actor = build_actor(self.model, cfg, self.total_steps)  # plain or DeepSpeed
        self.model = self.actor.module
        self.optimizer, self.scheduler = self.actor.optimizer, self.actor.scheduler
        self.step = 0
        self.loss_before: float | None = None

    def _batch(self, records: list[dict]) -> SFTBatch:
        d = self.cfg.data
        return collate_sft(
            self.tokenizer,
            records,
            d.max_prompt_len,
            d.max_seq_len,
            self.device,
            special_tokens=d.special_tokens,
        )

    def _loss(self, batch: SFTBatch, denominator: torch.Tensor | None = None) -> torch.Tensor:
        logprobs = token_logprobs(self.model, batch.input_ids, batch.attention_mask)  # (B, L−1)
        return sft_loss(logprobs, batch.loss_mask, denominator=denominator)

    def token_counts(self, parts: list[tuple[int, slice]], batches: list[SFTBatch]) -> torch.Tensor:
        """(K,) trained tokens of each of the step's K micro-batches, summed over the ranks that
        hold a part of it: the global normaliser of that micro-batch's token mean."""
        counts = torch.zeros(self.cfg.train.grad_accum, dtype=torch.long, device=self.device)
        for (k, _), batch in zip(parts, batches):
            counts[k] += batch.loss_mask.sum()
        return distributed.all_reduce_sum(counts)

    def train_step(self) -> dict:
        self.model.train()
        records = [self.train_records[i] for i in self.sampler.next_indices()]  # global batch
        parts = distributed.micro_batch_parts(len(records), self.cfg.train.micro_batch_size)
        batches = [self._batch(records[rows]) for _, rows in parts]
        tokens = self.token_counts(parts, batches)
        total = 0.0
        for (k, _), batch in zip(parts, batches):
            loss = self._loss(batch, denominator=tokens[k]) / self.cfg.train.grad_accum
            self.actor.backward(loss)
            total += float(loss.detach())
        # Summed over parts and ranks: each part's loss already carries the global normalisers.
        grad_norm = self.actor.step()
        return {
            **distributed.sum_over_ranks({"loss/sft": total}),  # each rank's share of the loss
            "optim/grad_norm": grad_norm,
            "optim/lr": self.actor.lr,
        }

    @torch.no_grad()
    def eval_loss(self) -> float:
        self.model.eval()
        mb = self.cfg.train.micro_batch_size
        losses = [
            float(self._loss(self._batch(self.eval_records[i : i + mb])))
            * len(self.eval_records[i : i + mb])
            for i in range(0, len(self.eval_records), mb)
        ]
        return sum(losses) / len(self.eval_records)

    def before_training(self, run_dir) -> None:
        # Every rank: under ZeRO-3 each forward gathers parameters from all of them.
        if self.loss_before is None:
            self.loss_before = self.eval_loss()

    def should_stop_early(self, stop) -> bool:
        return False

    def evaluate_final(self, run_dir, stop) -> dict:
        return {"eval": {"loss_before": self.loss_before, "loss_after": self.eval_loss()}}

    def export_model(self, run_dir) -> tuple[torch.nn.Module, dict | None]:
        """The module and its weights (consolidated from ZeRO-3 shards: collective)."""
        return self.model, self.actor.export_weights()

    def engines(self) -> list:
        return [self.actor]

    def state_dict(self) -> dict:
        return {
            "step": self.step,
            "sampler": self.sampler.state_dict(),
            "loss_before": self.loss_before,
        }

    def load_state_dict(self, state: dict) -> None:
        self.step = state["step"]
        self.sampler.load_state_dict(state["sampler"])
        self.loss_before = state["loss_before"]
