"""Supervised fine-tuning: next-token NLL on response tokens and the EOS only (spec test 23)."""

from __future__ import annotations

import torch

from remax.algo.sft import sft_loss
from remax.config import SFTJobConfig
from remax.data.batching import EpochSampler, collate_sft
from remax.data.stage_data import format_prompts, stage_records
from remax.models.policy import load_policy, token_logprobs
from remax.trainers.loop import build_optimizer, optimizer_step, select_device


class SFTTrainer:
    def __init__(self, cfg: SFTJobConfig) -> None:
        self.cfg = cfg
        self.device = select_device(cfg.cluster.device)
        self.model, self.tokenizer = load_policy(cfg.model, seed=cfg.seed, device=self.device)
        train, held_out = stage_records("sft", cfg.data)
        self.train_records = format_prompts(train, cfg.data, self.tokenizer)
        self.eval_records = format_prompts(held_out, cfg.data, self.tokenizer)
        self.sampler = EpochSampler(len(self.train_records), cfg.train.batch_size, cfg.seed)
        self.total_steps = min(
            cfg.train.max_steps, cfg.train.epochs * self.sampler.batches_per_epoch
        )
        self.optimizer, self.scheduler = build_optimizer(self.model, cfg.optim, self.total_steps)
        self.step = 0
        self.loss_before: float | None = None

    def _batch(self, records: list[dict]):
        d = self.cfg.data
        return collate_sft(self.tokenizer, records, d.max_prompt_len, d.max_seq_len, self.device)

    def _loss(self, records: list[dict]) -> torch.Tensor:
        batch = self._batch(records)
        logprobs = token_logprobs(self.model, batch.input_ids, batch.attention_mask)  # (B, L−1)
        return sft_loss(logprobs, batch.loss_mask)

    def train_step(self) -> dict:
        self.model.train()
        records = [self.train_records[i] for i in self.sampler.next_indices()]
        micro = self.cfg.train.micro_batch_size
        total = 0.0
        for start in range(0, len(records), micro):
            loss = self._loss(records[start : start + micro]) / self.cfg.train.grad_accum
            loss.backward()
            total += float(loss.detach())
        grad_norm = optimizer_step(
            self.model, self.optimizer, self.scheduler, self.cfg.optim.grad_clip
        )
        return {
            "loss/sft": total,
            "optim/grad_norm": grad_norm,
            "optim/lr": self.scheduler.get_last_lr()[0],
        }

    @torch.no_grad()
    def eval_loss(self) -> float:
        self.model.eval()
        mb = self.cfg.train.micro_batch_size
        losses = [
            float(self._loss(self.eval_records[i : i + mb])) * len(self.eval_records[i : i + mb])
            for i in range(0, len(self.eval_records), mb)
        ]
        return sum(losses) / len(self.eval_records)

    def before_training(self, run_dir) -> None:
        if self.loss_before is None:
            self.loss_before = self.eval_loss()

    def should_stop_early(self) -> bool:
        return False

    def evaluate_final(self, run_dir) -> dict:
        return {"eval": {"loss_before": self.loss_before, "loss_after": self.eval_loss()}}

    def export_model(self, run_dir):
        return self.model

    def state_dict(self) -> dict:
        return {
            "step": self.step,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "sampler": self.sampler.state_dict(),
            "loss_before": self.loss_before,
        }

    def load_state_dict(self, state: dict) -> None:
        self.step = state["step"]
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.sampler.load_state_dict(state["sampler"])
        self.loss_before = state["loss_before"]
