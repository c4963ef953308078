"""Reward model: Bradley–Terry loss −log σ(r_chosen − r_rejected) on the end-token score.

Data parallel at any world size, as the SFT trainer: every rank draws the same global batch and
computes its parts of the step's micro-batches (``distributed.micro_batch_parts``). A part of n
pairs carries n / (pairs of its micro-batch over all ranks) of that micro-batch's mean loss, and the
step averages the ``train.grad_accum`` micro-batches, so every pair weighs 1 / batch_size on any
number of ranks and the summed gradients are the world-size-1 gradient (spec test 20).
"""

from __future__ import annotations

import torch

from remax import distributed
from remax.algo.preference import bradley_terry_loss, pairwise_accuracy
from remax.config import RewardModelJobConfig
from remax.data.batching import EpochSampler, PairBatch, collate_pairs
from remax.data.stage_data import format_prompts, stage_records
from remax.distributed import select_device
from remax.engines import build_actor
from remax.models import lora
from remax.models.reward import hf_pooling_at_end, load_reward_model, score


class RewardModelTrainer:
    def __init__(self, cfg: RewardModelJobConfig) -> None:
        self.cfg = cfg
        self.device = select_device(cfg.cluster.device)
        self.model, self.tokenizer = load_reward_model(cfg.model, seed=cfg.seed, device=self.device)
        # With adapters the score head is new, not a low-rank update: it trains fully.
        lora.adapt(self.model, cfg.model.lora, seed=cfg.seed, train=("score",))
        train, held_out = stage_records("preference", cfg.data)
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

    def _batch(self, records: list[dict]) -> PairBatch:
        d = self.cfg.data
        return collate_pairs(
            self.tokenizer,
            records,
            d.max_prompt_len,
            d.max_seq_len,
            self.device,
            special_tokens=d.special_tokens,
        )

    def _scores(self, records: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
        b = self._batch(records)
        # Left padding puts every end token (the EOS after the response) in the last column.
        end_c = torch.full((b.chosen_ids.shape[0],), b.chosen_ids.shape[1] - 1, device=self.device)
        end_r = torch.full(
            (b.rejected_ids.shape[0],), b.rejected_ids.shape[1] - 1, device=self.device
        )
        return (
            score(self.model, b.chosen_ids, b.chosen_mask, end_c),
            score(self.model, b.rejected_ids, b.rejected_mask, end_r),
        )

    def pair_counts(self, parts: list[tuple[int, slice]]) -> list[int]:
        """Pairs of each of the step's K micro-batches, summed over the ranks that hold a part of
        it: the global normaliser of that micro-batch's mean."""
        counts = torch.zeros(self.cfg.train.grad_accum, dtype=torch.long, device=self.device)
        for k, rows in parts:
            counts[k] += rows.stop - rows.start
        return distributed.all_reduce_sum(counts).tolist()

    def train_step(self) -> dict:
        self.model.train()
        records = [self.train_records[i] for i in self.sampler.next_indices()]  # global batch
        parts = distributed.micro_batch_parts(len(records), self.cfg.train.micro_batch_size)
        pairs = self.pair_counts(parts)
        loss_sum, acc_sum = 0.0, 0.0
        for k, rows in parts:
            chosen, rejected = self._scores(records[rows])
            share = (rows.stop - rows.start) / pairs[k]  # 1 when the micro-batch is whole here
            loss = bradley_terry_loss(chosen, rejected) * share / self.cfg.train.grad_accum
            self.actor.backward(loss)
            loss_sum += float(loss.detach())
            acc = float(pairwise_accuracy(chosen, rejected)) * share
            acc_sum += acc / self.cfg.train.grad_accum
        # Summed over parts and ranks: each part's loss already carries the global normalisers.
        grad_norm = self.actor.step()
        return {
            # Each rank holds its share of the global loss and accuracy: rank 0 logs the sums.
            **distributed.sum_over_ranks(
                {"loss/reward_model": loss_sum, "reward_model/accuracy": acc_sum}
            ),
            "optim/grad_norm": grad_norm,
            "optim/lr": self.actor.lr,
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

    def should_stop_early(self, stop) -> bool:
        return False

    def evaluate_final(self, run_dir, stop) -> dict:
        return {"eval": self.evaluate()}

    def export_model(self, run_dir) -> tuple[torch.nn.Module, dict | None]:
        """The module and its weights (consolidated from ZeRO-3 shards: collective). Its config
        lets HF's sequence classifier score at the EOS, as training does (``hf_pooling_at_end``)."""
        hf_pooling_at_end(self.model, self.tokenizer)
        return self.model, self.actor.export_weights()

    def engines(self) -> list:
        return [self.actor]

    def state_dict(self) -> dict:
        return {
            "step": self.step,
            "sampler": self.sampler.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.step = state["step"]
        self.sampler.load_state_dict(state["sampler"])
