"""PPO baseline trainer, DeepSpeed-Chat style (remax-spec §7): actor, critic, GAE, clipped losses.

A copy of the ReMax trainer's orchestration (``remax/trainers/remax.py``; style rule 7: no
inheritance, copies kept aligned), with the greedy baseline replaced by a learned critic:
  1. sample a ~ π_θ(·|x) (sampled rows only: PPO has no greedy decode);
  2. score it with the frozen reward model (or the synthetic gold score);
  3. experience: log π_old, log π_ref and V_old(s_t) for every response token, no grad;
  4. per-token rewards (k1 KL on every token, clipped score on the last) and GAE advantages and
     returns (``remax.algo.ppo``);
  5. ``algo.ppo_epochs`` passes over ``algo.mini_batches`` minibatches, each one actor step
     (clipped surrogate) then one critic step (clipped value loss), in DS-Chat's order.

Critic. An ``*ForSequenceClassification`` model initialised from the reward model's export (the
DS-Chat convention), trained with its own optimizer (``critic_optim``). Its value of response token
t is the score head applied to the hidden state at column P + t − 1, the state that predicts token
t, i.e. V(s_t) before the action — DS-Chat's ``forward_value(...)[:, :-1]`` sliced from
``prompt_len − 1``. The critic reads the policy's tokens, so it starts from the RM only when the RM
is a sequence-classification model with the policy's vocabulary; otherwise (another tokenizer, a
``regression_head``, a reward function, the synthetic gold score) it is the policy's backbone with a
fresh scalar head (``load_reward_model(cfg.model)``; tiny random init when ``model.path`` is null),
said in one log line.

Departures from DS-Chat, as in ``remax.algo.ppo``: sampled generation for every architecture (DS-Chat
forces greedy for Llama), empty answers per ``algo.empty_response`` instead of dropped, and
minibatches taken in rollout order without shuffling (DS-Chat's ``MiniDataset`` does not shuffle
either). Experience and training forwards use the same micro-batch rows, so the importance ratio
of the first minibatch of the first epoch is exactly 1 (``ppo/ratio_mean_first``).

Data parallel at any world size, with one code path (spec test 20). Every rank draws the same global
batch; minibatch m is its rows m·B/M … (m+1)·B/M − 1, as in one process, and rank r rolls out and
trains the r-th of N equal blocks of every minibatch (``shard``), so each optimizer step sees the
whole minibatch across ranks. The losses are token means over the minibatch's token count summed
over ranks, gradients are summed over ranks before clipping, and the only batch statistics (the
logged means) are reduced globally; rewards and GAE are per row, and nothing is whitened. So N
ranks × B/N make the world-size-1 update of the same responses.

Notation: B batch, P prompt length, T response length, V vocab.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import replace

import torch

from remax import distributed
from remax.algo.masked import token_mean
from remax.algo.ppo import gae_advantages, ppo_policy_loss, ppo_rewards, ppo_value_loss
from remax.config import LoraConfig, PPOJobConfig
from remax.data.batching import EpochSampler
from remax.distributed import select_device
from remax.engines import build_actor
from remax.models import lora
from remax.models.policy import load_policy, position_ids, response_logprobs
from remax.models.reward import load_reward_model
from remax.models.reward_adapters import critic_compatible
from remax.rollout import Rollout, offpolicy_gap
from remax.trainers import conventions, rl_eval, rl_setup

log = logging.getLogger("remax.trainers.ppo")


def critic_values(critic, rollout: Rollout) -> torch.Tensor:
    """(B, T) float32 V(s_t): the score head on the hidden state at column P + t − 1.

    Only the T states that precede a response token go through the head; positions after a row's
    EOS hold garbage and are masked by the caller.
    """
    mask = rollout.attention_mask
    hidden = critic.base_model(
        input_ids=rollout.sequences,
        attention_mask=mask,
        position_ids=position_ids(mask),
        use_cache=False,
    ).last_hidden_state  # (B, P + T, H)
    P = rollout.prompt_len
    return critic.score(hidden[:, P - 1 : -1]).squeeze(-1).float()  # (B, T)


class PPOTrainer:
    def __init__(self, cfg: PPOJobConfig) -> None:
        self.cfg, algo = cfg, cfg.algo
        self.device = select_device(cfg.cluster.device)
        self.model, self.tokenizer = load_policy(cfg.model, seed=cfg.seed, device=self.device)
        lora.adapt(self.model, cfg.model.lora, seed=cfg.seed)  # model.lora.rank=0: unchanged
        distributed.broadcast_params(self.model)  # rank 0's weights, before an engine shards them
        # The reference (a frozen copy of the initial policy; with adapters the policy itself,
        # adapters off), the frozen reward (any tokenizer, head or a function: remax.rewards; None:
        # the synthetic task's gold score) and the prompts.
        loaded = rl_setup.load(cfg, self.model, self.tokenizer, self.device)
        self.critic = self._critic(loaded.scorer)
        self.critic.requires_grad_(True)
        # algo.critic_lora: the actor's adapter config on the critic too (score head trained fully).
        critic_lora = cfg.model.lora if algo.critic_lora else LoraConfig()
        lora.adapt(self.critic, critic_lora, seed=cfg.seed + 1, train=("score",))
        distributed.broadcast_params(self.critic)
        self.world_size, self.rank = distributed.world_size(), distributed.rank()
        self.sampler = EpochSampler(len(loaded.prompts.train), cfg.train.batch_size, cfg.seed)
        self.total_steps = min(
            cfg.train.max_steps, cfg.train.epochs * self.sampler.batches_per_epoch
        )
        # Each train_step makes ppo_epochs × mini_batches optimizer steps: schedule over all.
        updates = self.total_steps * algo.ppo_epochs * algo.mini_batches
        step = self._minibatch_train()
        self.actor = build_actor(self.model, cfg, updates, train=step)  # plain or DeepSpeed
        self.critic_actor = build_actor(
            self.critic, cfg, updates, train=step, optim=cfg.critic_optim, name="critic"
        )
        self.model, self.critic = self.actor.module, self.critic_actor.module
        self.optimizer, self.scheduler = self.actor.optimizer, self.actor.scheduler
        self.critic_optimizer = self.critic_actor.optimizer
        self.critic_scheduler = self.critic_actor.scheduler
        # The ratio and the KL score the raw softmax (DS-Chat): build's default.
        self.setup = rl_setup.build(cfg, self.actor, loaded, device=self.device, train_cfg=step)
        # As ReMax's raw_softmax (spec test 19): the ratio scores the raw softmax, so top-p < 1,
        # T != 1 or top-k sample from another distribution than the one the update assumes.
        self.off_policy_sampling = self.setup.sampling.filtered
        if self.off_policy_sampling:
            log.warning(
                "top_p=%s temperature=%s top_k=%s: log-probs score the raw softmax, not the "
                "sampled distribution (slightly off-policy, as DS-Chat and the ReMax release)",
                algo.top_p,
                algo.temperature,
                algo.top_k,
            )
        conventions.seed_ranks(cfg.seed, self.world_size)
        self.step = 0

    def _minibatch_train(self):
        """An optimizer step is one minibatch (a DeepSpeed engine's batch), in micro-batches per
        rank; refuses a batch whose minibatches the ranks cannot share equally."""
        cfg, algo = self.cfg, self.cfg.algo
        blocks = algo.mini_batches * self.world_size
        if cfg.train.batch_size % blocks:
            raise ValueError(
                f"train.batch_size={cfg.train.batch_size} is not divisible by algo.mini_batches × "
                f"world size = {algo.mini_batches}×{self.world_size}: every rank takes an equal block "
                f"of each minibatch; use a multiple of {blocks} or change the number of ranks"
            )
        minibatch = cfg.train.batch_size // algo.mini_batches
        return replace(
            cfg.train,
            batch_size=minibatch,
            micro_batch_size=min(cfg.train.micro_batch_size, minibatch),
        )

    def _critic(self, scorer):
        """The critic: a trainable copy of the RM (DS-Chat) when it reads the policy's tokens
        through a ``score`` head; else a fresh scalar head on the policy (tiny: its shape)."""
        cfg = self.cfg
        why = "the reward is the synthetic gold score"
        if scorer is not None:
            why = critic_compatible(cfg.reward_model, scorer.tokenizer, self.tokenizer)
        if why is None:
            # In the actor's dtype and grad-ckpt (the frozen RM is the policy's dtype too).
            critic, _ = load_reward_model(
                cfg.model, path=cfg.reward_model.path, seed=cfg.seed, device=self.device
            )
            log.info("critic: starts from the reward model %s", cfg.reward_model.path)
            return critic
        log.info(
            "critic: starts from the policy %s with a fresh value head, not from the reward "
            "model: %s",
            cfg.model.path or "(tiny random init)",
            why,
        )
        torch.manual_seed(cfg.seed + 1)  # a fresh head (and tiny backbone), not the policy's
        return load_reward_model(
            cfg.model, path=cfg.model.path, seed=cfg.seed + 1, device=self.device
        )[0]

    # ----------------------------------------------------------------- experience
    def rollout(self, prompts: list[str]) -> Rollout:
        """Step 1: one sampled response per prompt (the actor's decode: parameters gathered once
        under ZeRO-3), empty answers rewritten."""
        batch = self.setup.prompt_batch(prompts)
        return self.setup.decode(batch.input_ids, batch.attention_mask, greedy=False)

    def shard(self, indices: list[int]) -> list[int]:
        """This rank's block of every minibatch of the global batch, minibatch by minibatch (all
        of it, in order, at world size 1)."""
        mb = len(indices) // self.cfg.algo.mini_batches
        per_rank = mb // self.world_size
        first = self.rank * per_rank
        return [
            i
            for start in range(0, len(indices), mb)
            for i in indices[start + first : start + first + per_rank]
        ]

    def _minibatches(self, B: int) -> list[list[slice]]:
        """Row slices of this rank's B rows: ``algo.mini_batches`` minibatches in order, each cut
        into micro-batches (the last one shorter when the micro size does not divide a rank's
        block)."""
        mb = B // self.cfg.algo.mini_batches
        micro = min(self.cfg.train.micro_batch_size, mb)
        return [
            [slice(s, min(s + micro, start + mb)) for s in range(start, start + mb, micro)]
            for start in range(0, B, mb)
        ]

    def token_counts(self, mask: torch.Tensor, minibatches: list[list[slice]]) -> torch.Tensor:
        """(M,) trained tokens of each minibatch summed over ranks: its losses' normaliser."""
        local = torch.stack([sum(mask[rows].sum() for rows in chunks) for chunks in minibatches])
        return distributed.all_reduce_sum(local)

    @torch.no_grad()
    def experience(self, sampled: Rollout, chunks: list[slice]):
        """Step 3: (B, T) log π_old, log π_ref and V_old, over the rows the update will use."""
        parts = [sampled.select(rows) for rows in chunks]
        logprobs = torch.cat([self.logprobs(self.model, p) for p in parts])
        ref_logprobs = torch.cat([self.logprobs(self.setup.reference, p) for p in parts])
        values = torch.cat([critic_values(self.critic, p) for p in parts])
        return logprobs, ref_logprobs, values

    # ----------------------------------------------------------------- update
    def logprobs(self, model, rollout: Rollout) -> torch.Tensor:
        """(B, T) realised-token log-probs of the raw softmax (DS-Chat)."""
        return response_logprobs(
            model, rollout.sequences, rollout.attention_mask, rollout.prompt_len
        )

    def _update(
        self, chunks, n_tokens, sampled, mask, old_logprobs, old_values, advantages, returns
    ):
        """One minibatch: an actor step on the clipped surrogate, then a critic step.

        ``n_tokens`` is the minibatch's token count over all ranks. Micro-batch losses are token
        means; weighting each by its share of those tokens makes their sum over micro-batches and
        ranks the minibatch's token mean (what one big forward would give). The stats are shares
        of the same kind, summed over ranks by the caller.
        """
        algo, out = self.cfg.algo, defaultdict(float)
        n_tokens = max(1, n_tokens)
        for rows in chunks:
            w = int(mask[rows].sum()) / n_tokens
            logprobs = self.logprobs(
                self.actor.forward_module, sampled.select(rows)
            )  # (b, T), with grad
            loss, st = ppo_policy_loss(
                logprobs,
                old_logprobs[rows],
                advantages[rows],
                mask[rows],
                clip_range=algo.clip_range,
            )
            self.actor.backward(loss * w)
            out["loss/policy"] += float(loss.detach()) * w
            out["ppo/clip_fraction"] += float(st.clip_fraction) * w
            out["ppo/approx_kl"] += float(st.approx_kl) * w
            out["ppo/ratio_mean"] += float(st.ratio_mean) * w
        out["optim/grad_norm"] = self.actor.step()  # summed over ranks: w is already global
        for rows in chunks:
            w = int(mask[rows].sum()) / n_tokens
            values = critic_values(self.critic, sampled.select(rows))  # (b, T), with grad
            loss, st = ppo_value_loss(
                values,
                old_values[rows],
                returns[rows],
                mask[rows],
                clip_range_value=algo.clip_range_value,
            )
            self.critic_actor.backward(loss * w)
            out["loss/value"] += float(loss.detach()) * w
            out["ppo/value_clip_fraction"] += float(st.clip_fraction) * w
            out["value/mse"] += float(st.mse) * w
        out["optim/critic_grad_norm"] = self.critic_actor.step()
        return out

    def train_step(self) -> dict:
        rows = self.shard(self.sampler.next_indices())
        prompts = self.setup.prompts
        sampled = self.rollout([prompts.train[i] for i in rows])  # 1
        return self.update(sampled, [prompts.train_raw[i] for i in rows])

    def update(self, sampled: Rollout, prompts: list[str] | None = None) -> dict:
        """Steps 2–5 on this rank's rows (its block of every minibatch, minibatch by minibatch).

        ``prompts``: the raw prompt of each row (None: the decoded prompt text)."""
        algo = self.cfg.algo
        scores = self.setup.rewards(sampled, prompts)  # 2: (B,)
        mask = self.setup.train_mask(sampled)  # (B, T), contiguous from column 0 (ppo_rewards)
        minibatches = self._minibatches(mask.shape[0])
        n_tokens = self.token_counts(mask, minibatches)  # (M,) over all ranks
        self.model.train()
        self.critic.train()
        old_logprobs, ref_logprobs, old_values = self.experience(  # 3: each (B, T)
            sampled, [rows for mb in minibatches for rows in mb]
        )
        rewards = ppo_rewards(  # 4: (B, T)
            scores,
            old_logprobs,
            ref_logprobs,
            mask,
            kl_coef=algo.kl_coef,
            reward_clip=algo.reward_clip,
        )
        advantages, returns = gae_advantages(
            rewards, old_values, mask, gamma=algo.gamma, lam=algo.lam
        )
        totals, updates = defaultdict(float), []
        for _ in range(algo.ppo_epochs):  # 5
            for chunks, n in zip(minibatches, n_tokens.tolist()):
                updates.append(
                    self._update(
                        chunks, n, sampled, mask, old_logprobs, old_values, advantages, returns
                    )
                )
        self.setup.rollout_engine.weights_updated()  # the next rollout decodes with the stepped actor
        for u in updates:
            for k, v in u.items():
                totals[k] += v / len(updates)
        totals["ppo/ratio_mean_first"] = updates[0]["ppo/ratio_mean"]
        return self._metrics(
            sampled,
            mask,
            scores,
            rewards,
            n_tokens.sum(),
            totals,
            logprobs=(old_logprobs, ref_logprobs),
            values=(advantages, old_values, returns),
        )

    def _metrics(self, sampled, mask, scores, rewards, all_tokens, totals, *, logprobs, values):
        """The step's metrics: rank 0 logs the global values (each rank sums its share)."""
        old_logprobs, ref_logprobs = logprobs
        advantages, old_values, returns = values
        zeros = torch.zeros_like(old_logprobs)
        kl = torch.where(mask, old_logprobs - ref_logprobs, zeros).sum(-1)  # (B,) Σ_t k1

        def token_share(x: torch.Tensor) -> float:  # this rank's part of the global token mean
            return float(token_mean(values=x, mask=mask, denominator=all_tokens))

        N = self.world_size  # equal row counts: a row mean / N is this rank's share
        averaged = ("loss/policy", "loss/value", "ppo/clip_fraction", "ppo/approx_kl")
        averaged += ("ppo/ratio_mean", "ppo/value_clip_fraction", "value/mse")
        shares = {
            "reward/mean": float(scores.mean()) / N,
            "reward/total_mean": float(rewards.sum(-1).mean()) / N,  # clipped score + KL reward
            "kl/mean": float(kl.mean()) / N,
            "advantage/mean": token_share(advantages),
            "value/mean": token_share(old_values),
            "value/returns_mean": token_share(returns),
            **{k: totals[k] for k in averaged},
            # First epoch's first minibatch: π = π_old, so exactly 1 unless experience drifted.
            "ppo/ratio_mean_first": totals["ppo/ratio_mean_first"],
            "response/length_mean": float(sampled.lengths.float().mean()) / N,
        }
        gap = offpolicy_gap(sampled, old_logprobs)  # vllm: max |log p_vLLM − log p_actor|
        return {
            **({} if gap is None else {"rollout/offpolicy_gap_max": gap}),  # this rank's
            **distributed.sum_over_ranks(shares),
            # The same on every rank: all ranks step on the same all-reduced gradients.
            "rollout/offpolicy_sampling": float(self.off_policy_sampling),
            "optim/grad_norm": totals["optim/grad_norm"],
            "optim/critic_grad_norm": totals["optim/critic_grad_norm"],
            "optim/lr": self.actor.lr,
            "optim/critic_lr": self.critic_actor.lr,
        }

    # ----------------------------------------------------------------- evaluation
    def evaluate(self) -> dict[str, torch.Tensor]:
        """Per held-out prompt: reward, gold (synthetic), exact and sampled KL, length (collective)."""
        return rl_eval.evaluate_policy(self.setup, self.model)

    def before_training(self, run_dir) -> None:
        rl_eval.write_eval_before(self.setup, self.model, run_dir)

    def should_stop_early(self, stop) -> bool:
        """Never: DS-Chat's PPO has neither a KL early stop nor a best-actor export (ReMax's
        ``early_stop_kl`` and ``export_policy`` are release features, not PPO's)."""
        return False

    def evaluate_final(self, run_dir, stop) -> dict:
        """Collective (every rank calls it); rank 0 writes ``eval_after.json``."""
        return conventions.final_summary(self.setup, self.model, run_dir, stop)

    def export_model(self, run_dir) -> tuple[torch.nn.Module, dict | None]:
        """The actor and its weights (consolidated from ZeRO-3 shards: collective)."""
        return self.model, self.actor.export_weights()

    # ----------------------------------------------------------------- state
    def engines(self) -> list:
        return [self.actor, self.critic_actor]

    def state_dict(self) -> dict:
        """Counters and sampler; both models' weights and optimizers are their engines' files."""
        return {
            "step": self.step,
            "total_steps": self.total_steps,
            "sampler": self.sampler.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.step = state["step"]
        self.total_steps = state["total_steps"]
        self.sampler.load_state_dict(state["sampler"])
