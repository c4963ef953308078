"""ReMax trainer: REINFORCE with the greedy response's reward as baseline (Li et al., Algorithm 1).

One step, as in the paper (numbers are Algorithm 1's lines):
  1. sample a ~ π_θ(·|x) and 2. greedy-decode ā — one batched decode, greedy rows flagged;
  3. score both with the frozen reward model: A(x) = r(x, a) − r(x, ā);
  4. loss −A · Σ_t log π_θ(a_t | x, a_<t), with the release's per-token KL, discount and clip as
     switches (``remax.algo.remax``); 5. one optimizer step.

The same trainer runs the other critic-free algorithms: ``algo.baseline`` picks the advantage of
``remax.algo.registry.BASELINES`` (RLOO's leave-one-out, GRPO's group normalisation over the
k = ``rollout.samples_per_prompt`` samples of a prompt, which decode no greedy response), and
``algo.clip_ratio``, ``algo.kl_loss_coef`` are GRPO's loss switches (``algo=rloo``, ``algo=grpo``).

The reference model is a frozen copy of the initial policy (the SFT export); with LoRA adapters
(``model.lora``) it is the policy with its adapters disabled, no second copy. Experience-time and
training-time log-probs are one forward: with dropout off and one on-policy pass they are equal
(spec test 18), so the KL penalty uses the detached training log-probs instead of a second forward.
"""

from __future__ import annotations

import logging
import math

import torch

from remax import distributed
from remax.algo.registry import KL_ESTIMATORS, lookup
from remax.algo.remax import (
    policy_gradient_loss,
    remax_stats,
    sequence_advantages,
    token_returns,
)
from remax.algo.types import as_enum
from remax.config import (
    Aggregation,
    Baseline,
    ExportPolicy,
    KLEstimator,
    LogprobDist,
    RemaxJobConfig,
)
from remax.data.batching import EpochSampler
from remax.distributed import select_device
from remax.engines import build_actor
from remax.inputs import InputError
from remax.models import lora
from remax.models.policy import load_policy
from remax.models.policy import response_logits as policy_response_logits
from remax.rollout import Rollout, offpolicy_gap
from remax.trainers import best_actor, conventions, rl_eval, rl_setup

log = logging.getLogger("remax.trainers.remax")


def response_logits(model, rollout: Rollout) -> torch.Tensor:
    """(B, T, V) logits scoring each response token of ``rollout``."""
    return policy_response_logits(
        model, rollout.sequences, rollout.attention_mask, rollout.prompt_len
    )


class RemaxTrainer:
    def __init__(self, cfg: RemaxJobConfig) -> None:
        self.cfg, algo = cfg, cfg.algo
        self.device = select_device(cfg.cluster.device)
        model, self.tokenizer = load_policy(cfg.model, seed=cfg.seed, device=self.device)
        lora.adapt(model, cfg.model.lora, seed=cfg.seed)  # model.lora.rank=0: unchanged
        # Rank 0's weights everywhere, before any engine shards them.
        distributed.broadcast_params(model)
        # The reference (a frozen copy of the initial policy; with adapters the policy itself,
        # adapters off), the frozen reward (any tokenizer, head or a function: remax.rewards; None:
        # the synthetic task's gold score) and the prompts.
        loaded = rl_setup.load(cfg, model, self.tokenizer, self.device)
        prompts = loaded.prompts
        self.keep_best = cfg.export_policy == ExportPolicy.best_eval_reward
        # Periodic evals (best actor, KL early stop) on prompts the final report does not use.
        self.select_prompts = self.select_raw_prompts = None
        if self.keep_best:
            self.select_prompts = best_actor.selection_prompts(prompts.held, cfg.eval_prompts)
            self.select_raw_prompts = best_actor.selection_prompts(
                prompts.held_raw, cfg.eval_prompts
            )
        # Data parallel: every rank draws the same global batch from the same sampler order and
        # takes its contiguous block of rows (rank r: rows r·B/N … (r+1)·B/N − 1), so the ranks'
        # blocks concatenated in rank order are exactly the world-size-1 batch.
        self.world_size, self.rank = distributed.world_size(), distributed.rank()
        cfg.train.per_rank(self.world_size)  # refuses a batch the ranks cannot share
        self.sampler = EpochSampler(len(prompts.train), cfg.train.batch_size, cfg.seed)
        self.total_steps = min(
            cfg.train.max_steps, cfg.train.epochs * self.sampler.batches_per_epoch
        )
        # The actor: plain PyTorch, or a DeepSpeed engine (ZeRO stage, offload, bf16). The frozen
        # reference and RM: as they are, or ZeRO-3 inference engines (remax.engines).
        self.actor = build_actor(model, cfg, self.total_steps, cfg.rollout.samples_per_prompt)
        self.model = self.actor.module
        if self.keep_best and getattr(self.actor, "partitioned", False):
            # The best actor is loaded back into the module for the final evaluation.
            raise InputError(
                "export_policy=best_eval_reward with a ZeRO-3 actor (deepspeed.zero_stage=3) is "
                "not supported: use deepspeed=zero2 or export_policy=last"
            )
        self.optimizer, self.scheduler = self.actor.optimizer, self.actor.scheduler
        self.setup = rl_setup.build(
            cfg,
            self.actor,
            loaded,
            device=self.device,
            train_cfg=cfg.train,
            logprob_dist=algo.logprob_dist,
        )
        self.off_policy_sampling = self._off_policy_sampling()
        conventions.seed_ranks(cfg.seed, self.world_size)
        self.step = 0
        self.best = best_actor.BestActor()
        self.last_eval_kl: float | None = None

    def _off_policy_sampling(self) -> bool:
        """Spec test 19: top-p < 1 or T != 1 samples from a distribution other than the softmax
        that raw_softmax scores, which makes the update slightly off-policy. Said once, logged."""
        algo = self.cfg.algo
        off = algo.logprob_dist == LogprobDist.raw_softmax and self.setup.sampling.filtered
        if off:
            log.warning(
                "algo.logprob_dist=raw_softmax with top_p=%s temperature=%s top_k=%s scores the raw "
                "softmax, not the sampled distribution (slightly off-policy, as the release); "
                "algo.logprob_dist=sampling_adjusted scores the sampled one",
                algo.top_p,
                algo.temperature,
                algo.top_k,
            )
        return off

    # ----------------------------------------------------------------- experience
    def rollout(self, prompts: list[str]) -> tuple[Rollout, Rollout | None]:
        """Steps 1–2: k sampled responses per prompt and, when the baseline reads it (ReMax's
        ``greedy``), one greedy response per prompt, in one decode. RLOO and GRPO decode no greedy
        row: (sampled, None)."""
        n = self.cfg.rollout.samples_per_prompt
        batch = self.setup.prompt_batch(prompts)
        B = len(prompts)
        n_greedy = B if as_enum(Baseline, self.cfg.algo.baseline).needs_greedy else 0
        ids = torch.cat([batch.input_ids.repeat_interleave(n, 0), batch.input_ids[:n_greedy]])
        mask = torch.cat(
            [batch.attention_mask.repeat_interleave(n, 0), batch.attention_mask[:n_greedy]]
        )
        greedy = torch.arange(B * n + n_greedy, device=self.device) >= B * n
        # One decode (the actor's: parameters gathered once under ZeRO-3), empty answers rewritten.
        both = self.setup.decode(ids, mask, greedy)
        sampled = both.select(slice(0, B * n))
        return sampled, (both.select(slice(B * n, None)) if n_greedy else None)

    # ----------------------------------------------------------------- update
    def _logprobs(self, model, rollout: Rollout):
        """(B, T) realised-token log-probs under the distribution trained on, (B, T, V) logits when
        a path needs them, and (B, T) bool: realised tokens outside the recomputed nucleus
        (``sampling_adjusted`` only)."""
        logprobs, logits, outside = self.setup.scored(response_logits(model, rollout), rollout)
        keep = self.cfg.algo.kl_estimator == KLEstimator.full_vocab
        return logprobs, (logits if keep else None), outside

    def shard(self, indices: list[int]) -> list[int]:
        """This rank's contiguous block of the global batch (all of it at world size 1)."""
        return distributed.block(indices)

    def denominator(self, mask: torch.Tensor) -> torch.Tensor | int:
        """The global normaliser: token count (token_mean) or row count (seq_sum) of the whole
        batch across ranks, so the ranks' losses add up to the world-size-1 loss (spec test 20)."""
        if self.cfg.algo.aggregation == Aggregation.token_mean:
            return distributed.all_reduce_sum(mask.sum())
        if self.cfg.algo.aggregation == Aggregation.rank_token_mean:
            return None  # per micro-batch: conventions.rank_token_denominator
        return mask.shape[0] * self.world_size

    def train_step(self) -> dict:
        rows = self.shard(self.sampler.next_indices())
        prompts = self.setup.prompts
        sampled, greedy = self.rollout([prompts.train[i] for i in rows])  # 1–2
        return self.update(sampled, greedy, [prompts.train_raw[i] for i in rows])

    def update(
        self, sampled: Rollout, greedy: Rollout | None, prompts: list[str] | None = None
    ) -> dict:
        """Steps 3–5 on this rank's rows: rewards, advantages, loss, one optimizer step.

        ``greedy``: one greedy row per prompt, read by the ``greedy`` baseline only (None for the
        others). ``prompts``: the raw prompt of each prompt (None: the decoded prompt text)."""
        algo, n = self.cfg.algo, self.cfg.rollout.samples_per_prompt
        sampled_prompts = None if prompts is None else [p for p in prompts for _ in range(n)]
        rewards = self.setup.rewards(sampled, sampled_prompts)  # 3: r(x, a), (B·n,)
        needs_greedy = as_enum(Baseline, algo.baseline).needs_greedy
        greedy_rewards = self.setup.rewards(greedy, prompts) if needs_greedy else None  # r(x, ā)
        seq = sequence_advantages(  # (B·n,) per sample: remax.algo.registry.BASELINES
            rewards,
            greedy_rewards,
            k=n,
            baseline=algo.baseline,
            std_norm=algo.group_std_norm,
            reward_clip=algo.reward_clip,
            clip_target=algo.clip_target,
        )
        mask = self.setup.train_mask(sampled)  # (B·n, T)
        # Global normaliser, so micro-batches and ranks add up to the whole batch's loss.
        denominator = self.denominator(mask)
        self.model.train()
        micro = self.cfg.train.micro_batch_size * n
        n_micro = -(-mask.shape[0] // micro)
        loss_sum, kls, advs, gaps, outside = 0.0, [], [], [], 0
        for start in range(0, mask.shape[0], micro):
            rows = slice(start, start + micro)
            if algo.aggregation == Aggregation.rank_token_mean:
                denominator = conventions.rank_token_denominator(
                    mask[rows], n_micro, self.world_size
                )
            loss, kl, advantages, (gap, n_outside) = self._micro_loss(
                sampled.select(rows), seq.advantages[rows], mask[rows], denominator
            )
            outside += n_outside
            self.actor.backward(loss)
            loss_sum += float(loss.detach())
            kls.append(kl)
            advs.append(advantages)
            gaps.append(gap)
        grad_norm = self.actor.step()  # 5: gradients summed over micro-batches and ranks
        self.setup.rollout_engine.weights_updated()
        # What each sample is compared with; its mean is the greedy reward (ReMax), the group mean
        # (RLOO, GRPO: their advantages average to 0) or 0 (none).
        stats = remax_stats(
            rewards, rewards - seq.raw, mask, torch.cat(advs), kl=torch.cat(kls), margins=seq
        )
        metrics = self._metrics(stats, seq.raw, sampled, greedy, (loss_sum, outside))
        if gaps and gaps[0] is not None:  # vllm: max |log p_vLLM − log p_actor| of this rank
            metrics["rollout/offpolicy_gap_max"] = max(gaps)
        return {**metrics, "optim/grad_norm": grad_norm, "optim/lr": self.actor.lr}

    def _micro_loss(self, part: Rollout, seq_advantages, mask, denominator):
        """One micro-batch: (loss with grad, per-token KL, per-token returns, (engine log-prob gap
        or None, trained tokens outside the recomputed nucleus)). Step 4: the KL-shaped returns of
        the (b,) sequence advantages; the loss of Algorithm 1 line 7 (GRPO: clipped, KL in it)."""
        algo = self.cfg.algo
        logprobs, logits, outside = self._logprobs(self.actor.forward_module, part)  # with grad
        gap = None
        if algo.logprob_dist == LogprobDist.raw_softmax:  # the engine reports raw log-probs
            gap = offpolicy_gap(part, logprobs)
        with torch.no_grad():
            ref_logprobs, ref_logits, _ = self._logprobs(self.setup.reference, part)
        # GRPO's KL in the loss keeps its graph; a KL only in the reward is a constant.
        with torch.set_grad_enabled(algo.kl_loss_coef > 0):
            kl_graph = lookup(KL_ESTIMATORS, algo.kl_estimator)(
                logprobs=logprobs, ref_logprobs=ref_logprobs, logits=logits, ref_logits=ref_logits
            )
        kl = kl_graph.detach()
        advantages = token_returns(  # 4: returns per token, (b, T)
            seq_advantages,
            mask,
            kl=kl,
            kl_coef=algo.kl_coef,
            gamma=algo.gamma,
            kl_mode=algo.kl_mode,
            discount_convention=algo.discount_convention,
        )
        loss = policy_gradient_loss(
            logprobs,
            advantages,
            mask,
            aggregation=algo.aggregation,
            denominator=denominator,
            old_logprobs=logprobs.detach(),  # on-policy, one update: π_old is this forward
            clip_ratio=algo.clip_ratio,
            kl_loss=kl_graph,
            kl_loss_coef=algo.kl_loss_coef,
        )
        return loss, kl, advantages, (gap, int((outside & mask).sum()))

    def _metrics(self, stats, margin, sampled: Rollout, greedy: Rollout | None, sums) -> dict:
        """The step's metrics, reduced over ranks. Equal shards: each rank logs its mean / world
        size, and the ranks' sum is the global mean; ``sums`` (this rank's share of the loss, its
        count of trained tokens outside the recomputed nucleus) add up over ranks as they are."""
        loss_sum, outside = sums
        share = {
            "reward/mean": stats.reward_mean,
            "reward/baseline_mean": stats.baseline_mean,
            "reward/advantage_mean": stats.advantage_mean,
            "reward/advantage_abs_mean": margin.abs().mean(),
            "reward/win_frac": stats.win_frac,
            "reward/tie_frac": stats.tie_frac,
            "reward/clip_frac": stats.clip_frac,
            "kl/mean": stats.kl_seq_mean,  # per sequence: Σ_t kl_t averaged over rows
            "return/mean": stats.return_mean,
            "response/length_mean": sampled.lengths.float().mean(),
        }
        if greedy is not None:  # only the greedy baseline decodes them
            share["response/greedy_length_mean"] = greedy.lengths.float().mean()
            share["response/same_as_greedy"] = self._same(sampled, greedy).float().mean()
        share = {k: float(v) / self.world_size for k, v in share.items()}
        # rollout/outside_nucleus: sampling_adjusted tokens scored by nucleus_with_token (bf16 or
        # vLLM put them past the recomputed top-p/top-k edge); 0 on any other path.
        metrics = distributed.sum_over_ranks(
            {**share, "loss/policy": loss_sum, "rollout/outside_nucleus": float(outside)}
        )
        return {**metrics, "rollout/offpolicy_sampling": float(self.off_policy_sampling)}

    def _same(self, sampled: Rollout, greedy: Rollout) -> torch.Tensor:
        g = greedy.select(
            torch.arange(greedy.response.shape[0], device=self.device).repeat_interleave(
                self.cfg.rollout.samples_per_prompt
            )
        )
        return ((sampled.response == g.response) | ~(sampled.response_mask | g.response_mask)).all(
            -1
        )

    # ----------------------------------------------------------------- evaluation
    def evaluate(self) -> dict[str, torch.Tensor]:
        """Per held-out prompt: reward, gold (synthetic), exact and sampled KL, length (collective)."""
        return rl_eval.evaluate_policy(self.setup, self.model)

    def before_training(self, run_dir) -> None:
        self.best.run_dir = run_dir
        rl_eval.write_eval_before(self.setup, self.model, run_dir)

    def _selection_summary(self, stop) -> dict:
        """The periodic eval's summary, on the selection prompts (``best_actor``)."""
        select = (self.select_prompts, self.select_raw_prompts)
        return rl_eval.eval_summary(self.setup, self.model, *select, stop)

    def should_stop_early(self, stop) -> bool:
        """Periodic eval (``train.eval_every``): track the best actor and the KL early stop."""
        every = self.cfg.train.eval_every
        if not every or self.step == 0 or self.step % every:
            return False
        ev = self._selection_summary(stop)
        # The release's quantity: the exact full-vocabulary KL per token along the eval answers
        # (not the sampled log π − log π_ref, which reads high under top-p). Per-token units: the
        # release's --target_kl 1.0 is a mean over tokens, not over answers (an answer's Σ_t grows
        # with its length: 256 tokens would stop at ~0.004 nats/token).
        self.last_eval_kl = ev["kl_token"]["mean"]
        if self.keep_best:
            self.best.consider(self.step, ev["reward"]["mean"], self.actor)
        limit = self.cfg.algo.early_stop_kl
        if limit is not None and not math.isfinite(self.last_eval_kl):
            # A NaN compares False with everything: it would silently disable the early stop.
            log.error(
                "exact eval KL per token is %s at step %d: stopping", self.last_eval_kl, self.step
            )
            self.total_steps = self.step
            return True
        if limit is not None and self.last_eval_kl >= limit:
            log.info(
                "early stop at step %d: exact eval KL per token %.4f >= %.4f",
                self.step,
                self.last_eval_kl,
                limit,
            )
            self.total_steps = self.step
            return True
        return False

    def evaluate_final(self, run_dir, stop) -> dict:
        """Collective (every rank calls it); rank 0 writes ``eval_after.json``. With
        ``best_eval_reward`` the final actor competes, then the exported actor is evaluated."""
        export = {"policy": self.cfg.export_policy.value, "step": self.step}
        if self.keep_best:
            self.best.consider(
                self.step, self._selection_summary(stop)["reward"]["mean"], self.actor
            )
            self.best.load_into(self.model, self.setup.rollout_engine, self.device)
            export.update(step=self.best.step, selection_reward=self.best.reward)
        return {
            **conventions.final_summary(self.setup, self.model, run_dir, stop),
            "export": export,
        }

    def export_model(self, run_dir) -> tuple[torch.nn.Module, dict | None]:
        """The module to save and its weights (None: its own). Collective under ZeRO-3."""
        if self.keep_best:  # evaluate_final loaded the best actor into the module
            return self.model, None
        return self.model, self.actor.export_weights()

    # ----------------------------------------------------------------- state
    def engines(self) -> list:
        return [self.actor]

    def state_dict(self) -> dict:
        return {
            "step": self.step,
            "total_steps": self.total_steps,
            "sampler": self.sampler.state_dict(),
            **self.best.state_dict(),  # best_eval_reward, best_step
        }

    def load_state_dict(self, state: dict) -> None:
        self.step = state["step"]
        self.total_steps = state["total_steps"]
        self.sampler.load_state_dict(state["sampler"])
        self.best.load_state_dict(state)
