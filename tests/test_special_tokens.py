"""One special-token rule in every stage (remax-spec §3, ``data.special_tokens``), per real family.

For each tokenizer family (tests/tokenizer_families.py) and each value of the switch, the same
(prompt, response) must reach every stage with the same prompt tokens: the SFT batch, the RM pair
batch, the ReMax and PPO rollouts, the RL evaluation and ``jobs.evaluate``, each through the very
function the stage calls. With the switch on (the release's), a family with a BOS has exactly one
(a chat template that renders ``{{ bos_token }}`` gets no second one); GPT-2 has none.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from tokenizer_families import FAMILIES, WITH_BOS

from remax.config import (
    Baseline,
    DataConfig,
    EvalDecoding,
    ModelConfig,
    RewardSourceConfig,
)
from remax.data.batching import collate_prompts, encode, special_prefix
from remax.data.stage_data import format_prompts
from remax.evaluation import Prompt, answer_turns
from remax.models.policy import load_tokenizer
from remax.rewards import RewardScorer
from remax.rollout import Rollout, SamplingConfig
from remax.trainers import rl_eval
from remax.trainers.ppo import PPOTrainer
from remax.trainers.remax import RemaxTrainer
from remax.trainers.reward_model import RewardModelTrainer
from remax.trainers.rl_setup import RLSetup
from remax.trainers.sft import SFTTrainer

PROMPT = "Why is the sky blue?"
RESPONSES = [" Rayleigh scattering.", " Dust.", " Because the air scatters blue light most"]


def templates(tok) -> list[str]:
    return ["plain", "hh"] + (["tokenizer"] if tok.chat_template else [])


class Recorder:
    """A decoding engine that records the prompt rows it is given and answers EOS at once."""

    def __init__(self, tok) -> None:
        self.tok, self.rows = tok, []

    def generate(self, ids, mask, *args, **kwargs) -> Rollout:
        self.rows += [r[m.bool()].tolist() for r, m in zip(ids, mask)]
        eos = torch.full((ids.shape[0], 1), self.tok.eos_token_id)
        return Rollout(ids, mask.bool(), eos, torch.ones_like(eos, dtype=torch.bool))


def stage(tok, data: DataConfig, recorder: Recorder) -> SimpleNamespace:
    """What the trainers' methods read: enough of a trainer to run them without a model."""
    cfg = SimpleNamespace(
        data=data,
        seed=0,
        algo=SimpleNamespace(baseline=Baseline.greedy, eval_decoding=EvalDecoding.greedy),
        rollout=SimpleNamespace(samples_per_prompt=1),
        train=SimpleNamespace(batch_size=4, micro_batch_size=4),
    )
    zeros = lambda ro, *a: torch.zeros(ro.response.shape[0], ro.response.shape[1])  # noqa: E731
    setup = SimpleNamespace(
        cfg=cfg,
        tokenizer=tok,
        device=torch.device("cpu"),
        rank=0,
        reference=None,
        decode=lambda ids, mask, greedy: recorder.generate(ids, mask),
        score=lambda model, ro: (zeros(ro), zeros(ro)[..., None]),  # (log π, logits)
        rewards=lambda ro, raw: zeros(ro)[:, 0],
    )
    setup.prompt_batch = lambda prompts: RLSetup.prompt_batch(setup, prompts)
    return SimpleNamespace(
        cfg=cfg,
        tokenizer=tok,
        device=torch.device("cpu"),
        rank=0,
        model=torch.nn.Linear(1, 1),
        setup=setup,
    )


def stage_prompts(tok, data: DataConfig, raw: str) -> dict[str, list[int]]:
    """The unpadded prompt tokens each stage builds from one raw prompt and one response."""
    rec = {"prompt": raw, "response": RESPONSES[0], "chosen": RESPONSES[0], "rejected": " no"}
    rec = format_prompts([rec], data, tok)[0]
    text, n_response = rec["prompt"], len(encode(tok, RESPONSES[0])) + 1  # + EOS
    recorder = Recorder(tok)
    trainer = stage(tok, data, recorder)
    sft = SFTTrainer._batch(trainer, [rec])
    pairs = RewardModelTrainer._batch(trainer, [rec])
    RemaxTrainer.rollout(trainer, [text])  # n sampled rows, then the greedy row
    PPOTrainer.rollout(trainer, [text])
    rl_eval.evaluate_policy(trainer.setup, trainer.model, [text], [raw])
    answer_turns(
        torch.nn.Linear(1, 1),
        tok,
        [Prompt(0, [raw])],
        template=data.template,
        sampling=SamplingConfig(max_new_tokens=1),
        greedy=True,
        max_prompt_len=data.max_prompt_len,
        special_tokens=data.special_tokens,  # as jobs.evaluate passes it (_policy_rows)
        engine=recorder,
    )
    names = ["remax sampled", "remax greedy", "ppo", "rl eval", "jobs.evaluate"]
    out = dict(zip(names, recorder.rows, strict=True))
    out["sft"] = sft.input_ids[0][sft.attention_mask[0]].tolist()[:-n_response]
    out["rm chosen"] = pairs.chosen_ids[0][pairs.chosen_mask[0]].tolist()[:-n_response]
    return out


@pytest.mark.parametrize("special_tokens", [True, False], ids=["special", "plain"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_stage_reads_the_same_prompt_tokens(family_checkpoint, family, special_tokens):
    tok = load_tokenizer(str(family_checkpoint(family)))
    prefix = special_prefix(tok)
    assert (prefix == [tok.bos_token_id]) == (family in WITH_BOS)
    for template in templates(tok):
        data = DataConfig(
            source="prompts.jsonl",
            template=template,
            max_prompt_len=128,
            max_seq_len=192,
            special_tokens=special_tokens,
        )
        rows = stage_prompts(tok, data, PROMPT)
        first = rows["sft"]
        assert all(r == first for r in rows.values()), (template, rows)
        text = format_prompts([{"prompt": PROMPT}], data, tok)[0]["prompt"]
        rendered_bos = bool(prefix) and text.startswith(tok.bos_token)
        n_bos = first.count(prefix[0]) if prefix else 0
        want = 1 if prefix and (special_tokens or rendered_bos) else 0
        assert n_bos == want, (template, tok.decode(first))
        assert first[:want] == prefix[:want]  # the BOS, if any, comes first
        assert tok.decode(first[want:]) == text.removeprefix(tok.bos_token if want else "")


@pytest.mark.parametrize("family", WITH_BOS)
def test_a_truncated_prompt_keeps_its_bos(family_checkpoint, family):
    tok = load_tokenizer(str(family_checkpoint(family)))
    bos = special_prefix(tok)
    batch = collate_prompts(tok, ["abcdef", "ab"], 4, "cpu", special_tokens=True)
    assert batch.input_ids.tolist()[0] == bos + encode(tok, "def")
    assert batch.input_ids.tolist()[1][-3:] == bos + encode(tok, "ab")


def _rollout(tok, prompts: list[str], data: DataConfig) -> Rollout:
    """Prompts as the RL stage batches them; responses of several lengths, one without EOS."""
    setup = SimpleNamespace(cfg=SimpleNamespace(data=data), tokenizer=tok, device="cpu")
    batch = RLSetup.prompt_batch(setup, prompts)
    rows = [encode(tok, r) + [tok.eos_token_id] for r in RESPONSES[:-1]] + [
        encode(tok, RESPONSES[-1])
    ]
    width = max(len(r) for r in rows)
    response = torch.full((len(rows), width), tok.pad_token_id)
    mask = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, r in enumerate(rows):
        response[i, : len(r)], mask[i, : len(r)] = torch.tensor(r), True
    return Rollout(batch.input_ids, batch.attention_mask, response, mask)


@pytest.mark.parametrize("special_tokens", [True, False], ids=["special", "plain"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_rm_fast_path_equals_the_text_path(family_checkpoint, family, special_tokens):
    """The RM reading the rollout's ids (fast path) and the RM reading the decoded text, rendered
    and tokenized again under the same rule (text path), give the same score within 1e-5."""
    path = str(family_checkpoint(family))
    tok = load_tokenizer(path)
    kw = {"max_prompt_len": 128, "special_tokens": special_tokens}
    torch.manual_seed(0)  # the random score head of a causal-LM checkpoint
    fast = RewardScorer.load(
        RewardSourceConfig(path=path), ModelConfig(), tok, seed=0, device="cpu", **kw
    )
    # max_len (no truncation at 1000) turns the fast path off and nothing else.
    text = RewardScorer(
        RewardSourceConfig(path=path, max_len=1000),
        tok,
        model=fast.model,
        tokenizer=fast.tokenizer,
        **kw,
    )
    assert fast.fast_path and not text.fast_path
    for template in templates(tok):
        data = DataConfig(
            source="prompts.jsonl",
            template=template,
            max_prompt_len=128,
            special_tokens=special_tokens,
        )
        raw = [PROMPT, "Hi", "Name a colour."]
        prompts = [r["prompt"] for r in format_prompts([{"prompt": p} for p in raw], data, tok)]
        ro = _rollout(tok, prompts, data)
        a, b = fast(ro, raw), text(ro, raw)
        assert torch.allclose(a, b, atol=1e-5, rtol=0), (template, a, b)
        assert a.unique().numel() == 3  # three different texts: nothing is read at a pad
