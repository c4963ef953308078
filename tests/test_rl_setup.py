"""The RL setup object (issue #21): a new RL algorithm is a trainer that holds an ``RLSetup`` and its
own actor, nothing more; and the RL stages' evaluation and ``jobs.evaluate`` measure with one code.
"""

from __future__ import annotations

import json

import pytest
import torch

from remax import evaluation
from remax.config import (
    DataConfig,
    EvalDecoding,
    EvaluateJobConfig,
    LogConfig,
    ModelConfig,
    ReferenceConfig,
    RemaxAlgoConfig,
    RemaxJobConfig,
    RewardSourceConfig,
    TrainConfig,
    WandbMode,
)
from remax.data.batching import EpochSampler
from remax.engines import build_actor
from remax.models.policy import load_policy
from remax.trainers import conventions, loop, rl_eval, rl_setup
from remax.trainers.remax import RemaxTrainer

LOG = LogConfig(wandb_mode=WandbMode.disabled, progress=False)
DATA = DataConfig(num_train=32, num_eval=64, max_response_len=6)


class Reinforce:
    """Plain REINFORCE (no baseline) written against the setup alone: the loop's contract
    (``loop.Trainer``) and nothing else. ``__slots__``: the shared code can neither read nor write
    an attribute this class does not declare (the old protocol wrote three)."""

    __slots__ = ("cfg", "tokenizer", "step", "total_steps", "sampler", "actor", "model", "setup")

    def __init__(self, cfg: RemaxJobConfig) -> None:
        self.cfg, device = cfg, torch.device("cpu")
        model, self.tokenizer = load_policy(cfg.model, seed=cfg.seed, device=device)
        loaded = rl_setup.load(cfg, model, self.tokenizer, device)  # no reward_model: gold
        self.sampler = EpochSampler(len(loaded.prompts.train), cfg.train.batch_size, cfg.seed)
        self.step, self.total_steps = 0, cfg.train.max_steps
        self.actor = build_actor(model, cfg, self.total_steps)
        self.model = self.actor.module
        self.setup = rl_setup.build(cfg, self.actor, loaded, device=device, train_cfg=cfg.train)

    def train_step(self) -> dict:
        setup, rows = self.setup, self.sampler.next_indices()
        batch = setup.prompt_batch([setup.prompts.train[i] for i in rows])
        rollout = setup.decode(batch.input_ids, batch.attention_mask, greedy=False)
        reward = setup.rewards(rollout, [setup.prompts.train_raw[i] for i in rows])  # (B,)
        mask = setup.train_mask(rollout)  # (B, T)
        logprobs, _ = setup.score(self.actor.forward_module, rollout)  # (B, T), with grad
        loss = -(reward[:, None] * torch.where(mask, logprobs, 0.0)).sum() / mask.sum()
        self.actor.backward(loss)
        self.actor.step()
        setup.rollout_engine.weights_updated()
        return {"reward/mean": float(reward.mean()), "loss/policy": float(loss.detach())}

    def before_training(self, run_dir) -> None:
        rl_eval.write_eval_before(self.setup, self.model, run_dir)

    def should_stop_early(self, stop) -> bool:
        return False

    def evaluate_final(self, run_dir, stop) -> dict:
        return conventions.final_summary(self.setup, self.model, run_dir, stop)

    def export_model(self, run_dir):
        return self.model, self.actor.export_weights()

    def engines(self) -> list:
        return [self.actor]

    def state_dict(self) -> dict:
        return {"step": self.step, "sampler": self.sampler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.step = state["step"]
        self.sampler.load_state_dict(state["sampler"])


def test_a_new_rl_trainer_needs_only_the_setup(tmp_path):
    cfg = RemaxJobConfig(
        data=DATA,
        log=LOG,
        train=TrainConfig(batch_size=8, micro_batch_size=8, max_steps=2, log_every=1),
        eval_prompts=64,
    )
    trainer = Reinforce(cfg)
    summary = loop.run(trainer, cfg, tmp_path, "remax")
    assert summary["step"] == 2 and summary["reward_source"] == "gold"
    ev = summary["eval"]
    assert ev["kl_after"] > 0, "two steps moved the policy away from its reference"
    assert ev["gold_before"] == ev["reward_before"]  # the gold score is the reward here
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    assert (tmp_path / "export" / "model.safetensors").exists()
    with pytest.raises(AttributeError):
        trainer.reference = None  # what place_frozen wrote onto trainers: now the setup's


def _tiny_exports(root):
    """A tiny policy and reward model, saved like stage exports."""
    from remax.models.tiny import build_tokenizer, llama_config, tiny_policy, tiny_reward_model

    tok = build_tokenizer()
    shape = dict(hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=64)
    out = {}
    for name, seed, build in (("policy", 0, tiny_policy), ("rm", 2, tiny_reward_model)):
        torch.manual_seed(seed)
        build(llama_config(len(tok), **shape)).save_pretrained(root / name)
        tok.save_pretrained(root / name)
        out[name] = str(root / name)
    return out


def test_the_rl_eval_and_the_evaluate_stage_measure_the_same(tmp_path):
    """The RL stage's held-out evaluation of its actor and ``jobs.evaluate`` of the same weights
    (saved as an export, against the stage's reference) give the same numbers per prompt: one
    measuring code (``remax.answer_metrics``). Greedy answers, so both decode the same text."""
    paths = _tiny_exports(tmp_path)
    cfg = RemaxJobConfig(
        model=ModelConfig(path=paths["policy"]),
        data=DATA,
        log=LOG,
        reward_model=RewardSourceConfig(path=paths["rm"]),
        train=TrainConfig(batch_size=16, micro_batch_size=4, max_steps=1),
        algo=RemaxAlgoConfig(eval_decoding=EvalDecoding.greedy),
        eval_prompts=64,
    )
    trainer = RemaxTrainer(cfg)
    with torch.no_grad():  # away from the reference, so the KLs are not all 0
        head = trainer.model.get_output_embeddings().weight
        head.add_(0.3 * torch.randn(head.shape, generator=torch.Generator().manual_seed(0)))
    ours = rl_eval.evaluate_policy(trainer.setup, trainer.model)
    trainer.model.save_pretrained(tmp_path / "actor")
    trainer.tokenizer.save_pretrained(tmp_path / "actor")
    ev_cfg = EvaluateJobConfig(
        data=DATA,
        log=LOG,
        policies=[str(tmp_path / "actor")],
        names=["actor"],
        reward_model=RewardSourceConfig(path=paths["rm"]),
        reference=ReferenceConfig(path=paths["policy"]),
        num_prompts=64,
        decoding=EvalDecoding.greedy,
        batch_size=16,
    )
    (tmp_path / "evaluate").mkdir()
    evaluation.run(ev_cfg, tmp_path / "evaluate")
    answers = (tmp_path / "evaluate" / "answers.jsonl").read_text()
    rows = [json.loads(x) for x in answers.splitlines()]
    theirs = {k: torch.tensor([r[k] for r in rows], dtype=torch.float64) for k in ours}
    assert set(ours) == set(evaluation.SCORES)
    assert float(ours["kl"].mean()) > 0.01
    for key in ("length", "gold"):  # the same greedy answers
        assert torch.equal(ours[key].double(), theirs[key]), key
    for key in ("reward", "kl", "kl_token", "kl_sampled", "kl_sampled_token"):
        # fp32 forwards of the same rows in the same batches: float noise only.
        torch.testing.assert_close(ours[key].double(), theirs[key], rtol=1e-5, atol=1e-6)
