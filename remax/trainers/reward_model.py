"""Reward model: Bradley–Terry loss −log σ(r_chosen − r_rejected) on the end-token score."""

from __future__ import annotations

import torch

from remax.algo.preference import bradley_terry_loss, pairwise_accuracy
from remax.config import RewardModelJobConfig
from remax.data.batching import EpochSampler, collate_pairs
from remax.data.stage_data import format_prompts, stage_records
from remax.models.reward import load_reward_model, score
from remax.trainers.loop import build_optimizer, optimizer_step, select_device


class RewardModelTrainer:
    def __init__(self, cfg: RewardModelJobConfig) -> None:
        self.cfg = cfg
        self.device = select_device(cfg.cluster.device)
        self.model, self.tokenizer = load_reward_model(cfg.model, seed=cfg.seed, device=self.device)
        train, held_out = stage_records("preference", cfg.data)
        self.train_records = format_prompts(train, cfg.data, self.tokenizer)
        self.eval_records = format_prompts(held_out, cfg.data, self.tokenizer)
        self.sampler = EpochSampler(len(self.train_records), cfg.train.batch_size, cfg.seed)
        self.total_steps = min(
            cfg.train.max_steps, cfg.train.epochs * self.sampler.batches_per_epoch
        )
        self.optimizer, self.scheduler = build_optimizer(self.model, cfg.optim, self.total_steps)
        self.step = 0

    def _scores(self, records: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
        d = self.cfg.data
        b = collate_pairs(self.tokenizer, records, d.max_prompt_len, d.max_seq_len, self.device)
        # Left padding puts every end token (the EOS after the response) in the last column.
        end_c = torch.full((b.chosen_ids.shape[0],), b.chosen_ids.shape[1] - 1, device=self.device)
        end_r = torch.full(
            (b.rejected_ids.shape[0],), b.rejected_ids.shape[1] - 1, device=self.device
        )
        return (
            score(self.model, b.chosen_ids, b.chosen_mask, end_c),
            score(self.model, b.rejected_ids, b.rejected_mask, end_r),
        )

    def train_step(self) -> dict:
        self.model.train()
        records = [self.train_records[i] for i in self.sampler.next_indices()]
        micro = self.cfg.train.micro_batch_size
        loss_sum, acc_sum = 0.0, 0.0
        for start in range(0, len(records), micro):
            chosen, rejected = self._scores(records[start : start + micro])
            loss = bradley_terry_loss(chosen, rejected) / self.cfg.train.grad_accum
            loss.backward()
            loss_sum += float(loss.detach())
            acc_sum += float(pairwise_accuracy(chosen, rejected)) / self.cfg.train.grad_accum
        grad_norm = optimizer_step(
            self.model, self.optimizer, self.scheduler, self.cfg.optim.grad_clip
        )
        return {
            "loss/reward_model": loss_sum,
            "reward_model/accuracy": acc_sum,
            "optim/grad_norm": grad_norm,
            "optim/lr": self.scheduler.get_last_lr()[0],
        }

    @torch.no_grad()
    def evaluate(self) -> dict:
        self.model.eval()
        mb = self.cfg.train.micro_batch_size
        chosen, rejected = [], []
        for i in range(0, len(self.eval_records), mb):
            c, r = self._scores(self.eval_records[i : i + mb])
            chosen.append(c)
            rejected.append(r)
        c, r = torch.cat(chosen), torch.cat(rejected)
        return {
            "accuracy": float(pairwise_accuracy(c, r)),
            "loss": float(bradley_terry_loss(c, r)),
            "margin_mean": float((c - r).mean()),
            "n": int(c.numel()),
        }

    def before_training(self, run_dir) -> None:
        pass

    def should_stop_early(self) -> bool:
        return False

    def evaluate_final(self, run_dir) -> dict:
        return {"eval": self.evaluate()}

    def export_model(self, run_dir):
        return self.model

    def state_dict(self) -> dict:
        return {
            "step": self.step,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "sampler": self.sampler.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.step = state["step"]
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.sampler.load_state_dict(state["sampler"])
