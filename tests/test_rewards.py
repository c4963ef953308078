"""Rewards from any reward model or a function (issue 14): cross-tokenizer scoring, the adapters
(HF sequence classification, this project's exports, UltraRM's regression head), reward functions,
normalisation, and ReMax learning through them."""

from __future__ import annotations

import json
import math
import string
from pathlib import Path

import pytest
import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from torch import nn
from transformers import (
    GPT2Config,
    GPT2ForSequenceClassification,
    LlamaModel,
    LlamaPreTrainedModel,
    PreTrainedTokenizerFast,
)

from remax.config import (
    ConfigError,
    DataConfig,
    EmptyResponse,
    LogConfig,
    ModelConfig,
    OptimConfig,
    RemaxAlgoConfig,
    RemaxJobConfig,
    RewardKind,
    RewardNormalization,
    RewardSourceConfig,
    RewardTemplate,
    Scheduler,
    TrainConfig,
    WandbMode,
)
from remax.data import synthetic
from remax.data.batching import encode
from remax.models.reward_adapters import RewardLoadError, load_reward_adapter
from remax.models.tiny import llama_config
from remax.rewards import RewardFunctionError, RewardScorer, call_reward_function
from remax.rollout import SamplingConfig, generate

CHARS = list(string.ascii_letters) + list(" =:.,?!\n")
CHAT = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% endfor %}<|end|>"


def other_tokenizer(*, bos: bool = False) -> PreTrainedTokenizerFast:
    """A character tokenizer unlike the policy's: upper case too, characters in reverse id order,
    pad != eos, chat markers as special tokens and a chat template; optionally a BOS it adds."""
    special = ["<pad>", "<unk>", "<|user|>", "<|assistant|>", "<|end|>", "<s>"]
    vocab = {s: i for i, s in enumerate(special)}
    vocab |= {c: i + len(special) for i, c in enumerate(reversed(CHARS))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    if bos:  # as Llama-2's tokenizer (UltraRM): BOS first, no EOS
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", special_tokens=[("<s>", vocab["<s>"])]
        )
    out = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        unk_token="<unk>",
        eos_token="<|end|>",
        bos_token="<s>",
        additional_special_tokens=["<|user|>", "<|assistant|>"],
        model_input_names=["input_ids", "attention_mask"],
    )
    out.chat_template = CHAT
    return out


def gpt2_reward_model(tok, seed: int = 0) -> GPT2ForSequenceClassification:
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=len(tok),
        n_embd=32,
        n_layer=2,
        n_head=2,
        n_positions=64,
        pad_token_id=tok.pad_token_id,
        num_labels=1,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    return GPT2ForSequenceClassification(config).eval()


def chat_text(tok, prompt: str, response: str) -> str:
    messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
    return tok.apply_chat_template(messages, tokenize=False)


def direct_hf_score(model, tok, prompt: str, response: str) -> float:
    """The RM on one decoded text, alone: its chat template, its tokenizer, its own forward."""
    enc = tok(chat_text(tok, prompt, response), add_special_tokens=False, return_tensors="pt")
    with torch.no_grad():
        return float(model(**enc).logits[0, 0])


def direct_hf_scores(model, tok, pairs: list[tuple[str, str]]) -> dict[tuple[str, str], float]:
    """:func:`direct_hf_score` of many texts, batched only among texts of equal token length (no
    padding: each row is computed as it would be alone)."""
    by_length: dict[int, list[tuple[tuple[str, str], list[int]]]] = {}
    for pair in pairs:
        ids = tok(chat_text(tok, *pair), add_special_tokens=False)["input_ids"]
        by_length.setdefault(len(ids), []).append((pair, ids))
    out = {}
    with torch.no_grad():
        for group in by_length.values():
            logits = model(input_ids=torch.tensor([ids for _, ids in group])).logits[:, 0]
            out.update({pair: float(v) for (pair, _), v in zip(group, logits)})
    return out


def sample_rollout(policy, tokenizer, prompts, n_new=8, seed=0):
    from remax.data.batching import collate_prompts

    batch = collate_prompts(tokenizer, prompts, 12, "cpu")
    torch.manual_seed(seed)
    return generate(
        policy,
        batch.input_ids,
        batch.attention_mask,
        SamplingConfig(max_new_tokens=n_new),
        greedy=False,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


PROMPTS = ["abc=", "ponmlk=", "hh=", "aiaiaj=", "ppppp=", "abcdefgh="]


# --------------------------------------------------------------------------- cross-tokenizer


def test_seq_cls_rm_of_another_tokenizer_and_architecture_scores_as_its_own_forward(
    tmp_path, policy, tokenizer
):
    """Llama policy (char tokenizer) → GPT-2 RM (another vocabulary, chat template): the batched
    scorer equals the RM's own forward on each decoded text alone (HF pools), within 1e-5."""
    rm_tok = other_tokenizer()
    gpt2_reward_model(rm_tok).save_pretrained(tmp_path / "rm")
    rm_tok.save_pretrained(tmp_path / "rm")
    cfg = RewardSourceConfig(
        path=str(tmp_path / "rm"), kind=RewardKind.hf_seq_cls, template=RewardTemplate.tokenizer
    )
    scorer = RewardScorer.load(
        cfg, ModelConfig(), tokenizer, max_prompt_len=12, seed=0, device="cpu"
    )
    assert not scorer.fast_path and rm_tok.get_vocab() != tokenizer.get_vocab()
    ro = sample_rollout(policy, tokenizer, PROMPTS)
    rewards = scorer(ro, PROMPTS)
    responses, _ = scorer.decode_responses(ro)
    assert len(set(responses)) > 1 and len({len(r) for r in responses}) > 1  # padding matters
    direct = [direct_hf_score(scorer.model, rm_tok, p, r) for p, r in zip(PROMPTS, responses)]
    assert torch.allclose(rewards, torch.tensor(direct), atol=1e-5, rtol=0), (rewards, direct)


def test_same_tokenizer_fast_path_equals_the_text_path(tmp_path, policy, tokenizer, reward_model):
    """This project's export with the policy's tokenizer: reading the rollout's ids (fast path)
    equals decoding, re-rendering and re-tokenizing (the cross-tokenizer path), within 1e-5."""
    reward_model.save_pretrained(tmp_path / "rm")
    tokenizer.save_pretrained(tmp_path / "rm")
    fast = RewardScorer.load(
        RewardSourceConfig(path=str(tmp_path / "rm")),
        ModelConfig(),
        tokenizer,
        max_prompt_len=12,
        seed=0,
        device="cpu",
    )
    # max_len (no truncation at 1000) turns the fast path off and nothing else.
    slow = RewardScorer(
        RewardSourceConfig(path=str(tmp_path / "rm"), max_len=1000),
        tokenizer,
        max_prompt_len=12,
        model=fast.model,
        tokenizer=fast.tokenizer,
    )
    assert fast.fast_path and not slow.fast_path
    ro = sample_rollout(policy, tokenizer, PROMPTS, n_new=10)
    stopped = (ro.response.gather(1, (ro.lengths - 1)[:, None]) == 0).squeeze(1)
    assert bool(stopped.any()) and bool((~stopped).any())  # both end rules are exercised
    a, b = fast(ro, PROMPTS), slow(ro, PROMPTS)
    # Rows whose text round-trips (a sampled <unk> is dropped by decoding: no text path keeps it).
    responses, _ = slow.decode_responses(ro)
    kept = [
        i
        for i, r in enumerate(responses)
        if encode(tokenizer, r) == [t for t in ro.response[i, : ro.lengths[i]].tolist() if t != 0]
    ]
    assert len(kept) >= 4 and stopped[kept].any() and (~stopped[kept]).any()
    assert torch.allclose(a[kept], b[kept], atol=1e-5, rtol=0), (a, b)


class CardLlamaRewardModel(LlamaPreTrainedModel):
    """UltraRM-13B's ``LlamaRewardModel``, as its model card defines it (huggingface.co/openbmb/
    UltraRM-13b): a ``LlamaModel`` and a bias-free ``regression_head`` read at the last attended
    token."""

    def __init__(self, config):
        super().__init__(config)
        self.model = LlamaModel(config)
        self.regression_head = nn.Linear(config.hidden_size, 1, bias=False)
        self.post_init()

    def forward(self, input_ids, attention_mask):
        hidden_states = self.model(input_ids, attention_mask=attention_mask)[0]
        rewards = self.regression_head(hidden_states).squeeze(-1)
        ends = attention_mask.cumsum(dim=1).argmax(dim=1).view(-1, 1)
        return torch.gather(rewards, 1, ends)


def test_ultrarm_shaped_model_reloaded_through_the_adapter_scores_as_its_own_forward(tmp_path):
    """Save a tiny UltraRM (Llama + regression_head), reload with kind=regression_head: the
    scorer, in UltraRM's "Human: ...\\nAssistant: ..." format with BOS, equals the card's forward
    on each text alone within 1e-5."""
    tok = other_tokenizer(bos=True)
    torch.manual_seed(0)
    card = CardLlamaRewardModel(
        llama_config(
            len(tok),
            hidden_size=32,
            num_layers=2,
            num_heads=4,
            num_kv_heads=2,
            intermediate_size=64,
            eos_token_id=tok.eos_token_id,
        )
    )
    nn.init.normal_(card.regression_head.weight)  # a head far from zero: scores differ clearly
    card.eval().save_pretrained(tmp_path / "ultrarm")
    tok.save_pretrained(tmp_path / "ultrarm")
    cfg = RewardSourceConfig(
        path=str(tmp_path / "ultrarm"),
        kind=RewardKind.regression_head,
        template=RewardTemplate.format,
    )
    model, rm_tok = load_reward_adapter(cfg, ModelConfig(), seed=0, device="cpu")
    scorer = RewardScorer(cfg, None, max_prompt_len=12, model=model, tokenizer=rm_tok)
    responses = ["abc", "", "Hello there, friend!", "zz"] + ["q" * (i + 1) for i in range(2)]
    got = scorer.score_text(PROMPTS, responses)
    direct = []
    for p, r in zip(PROMPTS, responses):
        enc = tok(f"Human: {p}\nAssistant: {r}", return_tensors="pt")  # the card's template
        assert int(enc["input_ids"][0, 0]) == tok.bos_token_id
        with torch.no_grad():
            direct.append(float(card(enc["input_ids"], enc["attention_mask"])))
    assert torch.allclose(got, torch.tensor(direct), atol=1e-5, rtol=0), (got, direct)
    assert got.std() > 0.01


def test_a_checkpoint_without_the_kinds_head_is_refused(tmp_path, tokenizer, reward_model):
    """A seq-cls export loaded as kind=regression_head would score with a random head: refused."""
    reward_model.save_pretrained(tmp_path / "rm")
    tokenizer.save_pretrained(tmp_path / "rm")
    cfg = RewardSourceConfig(path=str(tmp_path / "rm"), kind=RewardKind.regression_head)
    with pytest.raises(RewardLoadError, match="regression_head.*reward_model.kind"):
        load_reward_adapter(cfg, ModelConfig(), seed=0, device="cpu")


# --------------------------------------------------------------------------- functions


def test_reward_function_errors_name_the_failing_row():
    from tests.reward_functions import fails_on_z, not_finite, wrong_length

    prompts, responses = ["a=", "b=", "c="], ["ab", "xyz", "c"]
    with pytest.raises(RewardFunctionError, match=r"row 1 .*'xyz'.*ZeroDivisionError"):
        call_reward_function(fails_on_z, "m:fails_on_z", prompts, responses)
    with pytest.raises(RewardFunctionError, match="returned 1 values for 3 rows"):
        call_reward_function(wrong_length, "m:wrong_length", prompts, responses)
    with pytest.raises(RewardFunctionError, match=r"returned nan for row 1"):
        call_reward_function(not_finite, "m:not_finite", prompts, responses)
    ok = call_reward_function(fails_on_z, "m:f", ["a="], ["ab"])
    assert ok.tolist() == [1.0]


def test_reward_function_config_is_validated_and_imported():
    with pytest.raises(ConfigError, match="reward_model.function=None"):
        RewardSourceConfig(kind=RewardKind.function)
    with pytest.raises(ConfigError, match="reward_model.function='nocolon'"):
        RewardSourceConfig(kind=RewardKind.function, function="nocolon")
    with pytest.raises(ConfigError, match="only read with reward_model.kind=function"):
        RewardSourceConfig(function="a:b")
    with pytest.raises(ConfigError, match="kind=function takes no model path"):
        RewardSourceConfig(kind=RewardKind.function, function="a:b", path="x")
    cfg = RewardSourceConfig(kind=RewardKind.function, function="tests.no_such_module:f")
    with pytest.raises(RewardFunctionError, match="cannot import 'tests.no_such_module'"):
        RewardScorer(cfg, None, max_prompt_len=12)
    cfg = RewardSourceConfig(kind=RewardKind.function, function="tests.reward_functions:nope")
    with pytest.raises(RewardFunctionError, match="has no function 'nope'"):
        RewardScorer(cfg, None, max_prompt_len=12)


def test_fixed_normalisation_maps_raw_scores(policy, tokenizer):
    """normalize=fixed: (raw − offset) / scale, applied to the function's raw rewards."""
    fn = "tests.reward_functions:topic_margin"
    raw_cfg = RewardSourceConfig(kind=RewardKind.function, function=fn)
    norm_cfg = RewardSourceConfig(
        kind=RewardKind.function,
        function=fn,
        normalize=RewardNormalization.fixed,
        offset=0.5,
        scale=4.0,
    )
    ro = sample_rollout(policy, tokenizer, PROMPTS)
    raw = RewardScorer(raw_cfg, tokenizer, max_prompt_len=12)(ro, PROMPTS)
    norm = RewardScorer(norm_cfg, tokenizer, max_prompt_len=12)(ro, PROMPTS)
    assert torch.equal(norm, (raw - 0.5) / 4.0) and raw.std() > 0
    with pytest.raises(ConfigError, match="reward_model.scale=0.0"):
        RewardSourceConfig(normalize=RewardNormalization.fixed, scale=0.0)


# --------------------------------------------------------------------------- ReMax learns


def remax_config(reward_model: RewardSourceConfig, steps: int) -> RemaxJobConfig:
    return RemaxJobConfig(
        model=ModelConfig(hidden_size=32, intermediate_size=64),
        data=DataConfig(num_train=4096, num_eval=64, max_response_len=8),
        train=TrainConfig(batch_size=32, micro_batch_size=32, max_steps=steps),
        optim=OptimConfig(lr=3e-3, scheduler=Scheduler.constant),
        log=LogConfig(wandb_mode=WandbMode.disabled, progress=False),
        # Algorithm 1: no KL, no clip; EOS-first answers masked (the calibration of these runs)
        algo=RemaxAlgoConfig(empty_response=EmptyResponse.mask),
        reward_model=reward_model,
        eval_prompts=64,
    )


def assert_up_by_3_stderr(ev: dict, key: str) -> None:
    before, after = ev[f"{key}_before"], ev[f"{key}_after"]
    se = (before["stderr"] ** 2 + after["stderr"] ** 2) ** 0.5
    assert after["mean"] - before["mean"] > 3 * se, (key, before, after)


def max_abs_error(used: dict[tuple, list[float]], direct: dict[tuple, float]) -> float:
    """Largest |reward used − direct score| over every row (rows share a key when texts repeat)."""
    return max(abs(r - direct[key]) for key, values in used.items() for r in values)


class Recorder:
    """The trainer's scorer, keeping every (rollout, prompts, rewards) it returned."""

    def __init__(self, scorer) -> None:
        self.scorer, self.calls = scorer, []

    def __getattr__(self, name):
        return getattr(self.scorer, name)

    def __call__(self, rollout, prompts):
        rewards = self.scorer(rollout, prompts)
        self.calls.append((rollout, prompts, rewards))
        return rewards


@pytest.fixture
def one_thread():
    """One intra-op thread: on a shared 2-core machine two threads of tiny ops spin-wait on each
    other (measured 15× slower per GPT-2 step than one)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def train_gpt2_rm(tok, steps: int = 300) -> GPT2ForSequenceClassification:
    """A GPT-2 RM on the synthetic pairs rendered in its own chat template (Bradley–Terry)."""
    rm = gpt2_reward_model(tok).train()
    pairs = synthetic.preference_records(2048, seed=0)
    pairs = pairs * (steps * 32 // len(pairs) + 1)
    opt = torch.optim.AdamW(rm.parameters(), lr=3e-3)

    def scores(records, key):
        texts = [chat_text(tok, r["prompt"], r[key]) for r in records]
        enc = tok(texts, add_special_tokens=False, padding=True, return_tensors="pt")
        return rm(**enc).logits[:, 0]

    for step in range(steps):
        batch = pairs[step * 32 : (step + 1) * 32]
        chosen = scores(batch, "chosen")
        loss = -nn.functional.logsigmoid(chosen - scores(batch, "rejected"))
        # Any answer beats an empty one: without these pairs the RM has never seen an EOS-first
        # answer, scores it like a good one, and ReMax learns to answer nothing (how far it gets
        # depends on the CPU's floating point: 0.47 -> 0.03 gold on one machine, up on another).
        empty = [{**r, "rejected": ""} for r in batch[:8]]
        blank = -nn.functional.logsigmoid(chosen[:8] - scores(empty, "rejected"))
        loss = torch.cat([loss, blank])
        opt.zero_grad()
        loss.mean().backward()
        opt.step()
    held_out = synthetic.preference_records(256, seed=0, split="eval")
    with torch.no_grad():
        accuracy = (scores(held_out, "chosen") > scores(held_out, "rejected")).float().mean()
    assert accuracy > 0.8, accuracy  # the RM knows the task, else ReMax has nothing to learn
    return rm.eval()


@pytest.mark.slow
def test_remax_learns_from_an_rm_of_another_tokenizer_and_architecture(
    tmp_path, tokenizer, one_thread
):
    """Llama policy with the char tokenizer; GPT-2 RM with another vocabulary and a chat template.
    ReMax raises the RM reward by > 3 standard errors without gaming it (gold rises too), and
    every reward it used equals the RM's own forward on the decoded text alone, within 1e-5."""
    from remax.trainers import loop
    from remax.trainers.remax import RemaxTrainer

    rm_tok = other_tokenizer()
    rm = train_gpt2_rm(rm_tok)
    rm.save_pretrained(tmp_path / "rm")
    rm_tok.save_pretrained(tmp_path / "rm")
    source = RewardSourceConfig(
        path=str(tmp_path / "rm"), kind=RewardKind.hf_seq_cls, template=RewardTemplate.tokenizer
    )
    steps = 120
    cfg = remax_config(source, steps=steps)
    trainer = RemaxTrainer(cfg)
    assert trainer.tokenizer.get_vocab() == tokenizer.get_vocab()  # the policy's char tokenizer
    trainer.setup.scorer = recorder = Recorder(trainer.setup.scorer)
    (tmp_path / "run").mkdir()
    summary = loop.run(trainer, cfg, tmp_path / "run", "remax")
    assert summary["reward_source"] == "reward_model"
    assert_up_by_3_stderr(summary["eval"], "reward")
    # Gold only has to rise: this 300-step GPT-2 RM is a weak proxy of the gold score (0.47 ->
    # 0.55 here, < 3 SE), and how far ReMax climbs it depends on the CPU's floating point. What
    # the test pins is that the policy is not gaming it (answering nothing, gold 0.47 -> 0.03,
    # before the RM saw empty answers) and that every reward is the RM's own score, below.
    ev = summary["eval"]
    assert ev["gold_after"]["mean"] > ev["gold_before"]["mean"], (
        ev["gold_before"],
        ev["gold_after"],
    )
    # Every reward: training steps (sampled and greedy rows) and the two evaluations.
    assert len(recorder.calls) >= 2 * steps
    used: dict[tuple[str, str], list[float]] = {}
    for ro, prompts, rewards in recorder.calls:
        for i in range(ro.response.shape[0]):
            response = tokenizer.decode(ro.response[i, : ro.lengths[i]], skip_special_tokens=True)
            ids = ro.prompt_ids[i][ro.prompt_mask[i]]
            assert ids[0] == tokenizer.bos_token_id  # data.special_tokens: the policy's BOS
            prompt = tokenizer.decode(ids[1:])
            assert prompt == prompts[i]  # the raw prompt is the one the policy answered
            used.setdefault((prompt, response), []).append(float(rewards[i]))
    direct = direct_hf_scores(rm, rm_tok, list(used))
    rows = sum(len(v) for v in used.values())
    worst = max_abs_error(used, direct)
    assert rows >= steps * 64 and worst <= 1e-5, (rows, worst)


@pytest.mark.slow
def test_a_reward_function_drives_remax_to_a_higher_gold_score(tmp_path, one_thread):
    """reward_model.kind=function with tests.reward_functions:topic_margin (2·gold − 1, written
    independently of the gold score): ReMax raises reward and gold by > 3 standard errors."""
    from remax.trainers import loop
    from remax.trainers.remax import RemaxTrainer

    source = RewardSourceConfig(
        kind=RewardKind.function, function="tests.reward_functions:topic_margin"
    )
    cfg = remax_config(source, steps=100)
    (tmp_path / "run").mkdir()
    summary = loop.run(RemaxTrainer(cfg), cfg, tmp_path / "run", "remax")
    assert summary["reward_source"] == "function"
    assert_up_by_3_stderr(summary["eval"], "reward")
    assert_up_by_3_stderr(summary["eval"], "gold")


# --------------------------------------------------------------------------- jobs


def save_tiny_ultrarm(path, seed: int = 0) -> None:
    tok = other_tokenizer(bos=True)
    torch.manual_seed(seed)
    config = dict(hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=64)
    model = CardLlamaRewardModel(llama_config(len(tok), eos_token_id=tok.eos_token_id, **config))
    model.save_pretrained(path)
    tok.save_pretrained(path)


@pytest.mark.slow
def test_mistral_card_tiny_analogue_runs_through_jobs_remax(tmp_path):
    """The card's recipe on a CPU: algo=remax_mistral_card (β 0.1 full-vocabulary KL, clip 1.0,
    T 0.7, top-p 0.9) with a tiny UltraRM (Llama + regression_head, another tokenizer) read in
    UltraRM's format, as experiment=remax_mistral7b_card sets it, through ``python -m jobs.remax``."""
    from tests.conftest import run_job

    save_tiny_ultrarm(tmp_path / "ultrarm")
    proc = run_job(
        "jobs.remax",
        f"run.root={tmp_path / 'runs'}",
        "algo=remax_mistral_card",
        f"reward_model.path={tmp_path / 'ultrarm'}",
        "reward_model.kind=regression_head",
        "reward_model.template=format",
        "train.max_steps=2",
        "train.batch_size=8",
        "train.micro_batch_size=8",
        "data.num_train=64",
        "data.num_eval=64",
        "eval_prompts=64",
        "log.wandb_mode=disabled",
        "log.progress=false",
        "cluster.num_threads=1",  # two threads of tiny ops spin on a shared 2-core machine
    )
    line = json.loads(proc.stdout.strip().splitlines()[-1])
    summary = json.loads((Path(line["run_dir"]) / "summary.json").read_text())
    assert summary["reward_source"] == "reward_model"
    ev = summary["eval"]
    assert math.isfinite(ev["reward_after"]["mean"]) and ev["reward_after"]["n"] == 64
    assert "reward: " in proc.stderr and "kind=regression_head" in proc.stderr
    assert "template=format" in proc.stderr


@pytest.mark.slow
def test_jobs_evaluate_scores_with_a_reward_function(tmp_path, policy, tokenizer):
    """reward_model.kind=function in the evaluate stage: every answer's reward is the function of
    its raw prompt and answer text (here 2 · gold − 1, checked row by row)."""
    from jobs._config import compose_stage
    from jobs._stage import run_stage
    from tests.reward_functions import topic_margin

    policy.save_pretrained(tmp_path / "policy")
    tokenizer.save_pretrained(tmp_path / "policy")
    cfg = compose_stage(
        "evaluate",
        [
            f"policies=[{tmp_path / 'policy'}]",
            "names=[a]",
            "reward_model.kind=function",
            "reward_model.function=tests.reward_functions:topic_margin",
            f"run.root={tmp_path / 'runs'}",
            "num_prompts=64",
            "batch_size=16",
            "log.progress=false",
            "log.wandb_mode=disabled",
        ],
    )
    out = run_stage("evaluate", cfg)
    assert out["eval"]["reward_source"] == "function"
    rows = [
        json.loads(line)
        for line in (Path(out["run_dir"]) / "answers.jsonl").read_text().splitlines()
    ]
    assert len(rows) == 64 and len({r["reward"] for r in rows}) > 1
    for r in rows:
        assert r["reward"] == pytest.approx(topic_margin([r["prompt"]], [r["response"]])[0])
        assert r["reward"] == pytest.approx(2 * r["gold"] - 1)  # gold 0 without letters: −1


def test_the_gold_score_as_a_reward_function_equals_the_built_in_gold_reward(policy, tokenizer):
    """``remax.data.synthetic:gold_rewards`` (the README's example) gives the trainer's gold."""
    cfg = RewardSourceConfig(kind=RewardKind.function, function="remax.data.synthetic:gold_rewards")
    ro = sample_rollout(policy, tokenizer, PROMPTS)
    got = RewardScorer(cfg, tokenizer, max_prompt_len=12)(ro, PROMPTS)
    responses = [
        tokenizer.decode(ro.response[i, : ro.lengths[i]], skip_special_tokens=True)
        for i in range(len(PROMPTS))
    ]
    expected = [synthetic.gold_score(p, r) for p, r in zip(PROMPTS, responses)]
    assert got.tolist() == pytest.approx(expected) and len(set(expected)) > 1


@pytest.mark.slow
@pytest.mark.parametrize(
    ("function", "message"),
    [
        (
            "tests.reward_functions:fails_on_z",
            "error: reward function tests.reward_functions:fails_on_z failed on row ",
        ),
        ("tests.no_such_module:f", "error: reward_model.function=tests.no_such_module:f: cannot"),
    ],
)
def test_a_bad_reward_function_stops_the_job_in_one_line(tmp_path, function, message):
    from tests.conftest import run_job

    proc = run_job(
        "jobs.remax",
        f"run.root={tmp_path}",
        "reward_model.kind=function",
        f"reward_model.function={function}",
        "data.max_response_len=16",  # 34 symbols × 16 tokens × 64 rows: some answer has a z
        "train.max_steps=1",
        "log.wandb_mode=disabled",
        "log.progress=false",
        "cluster.num_threads=1",
        check=False,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(message) and "Traceback" not in proc.stderr, proc.stderr[-2000:]


def test_ppo_critic_starts_from_the_policy_when_the_rm_has_another_tokenizer(
    tmp_path, caplog, one_thread
):
    """PPO with a GPT-2 RM of another vocabulary: rewards come from the RM on the decoded text,
    the critic is the policy's shape with a fresh value head, and one log line says why."""
    import logging

    from remax.config import PPOAlgoConfig, PPOJobConfig
    from remax.trainers.ppo import PPOTrainer

    rm_tok = other_tokenizer()
    gpt2_reward_model(rm_tok).save_pretrained(tmp_path / "rm")
    rm_tok.save_pretrained(tmp_path / "rm")
    source = RewardSourceConfig(
        path=str(tmp_path / "rm"), kind=RewardKind.hf_seq_cls, template=RewardTemplate.tokenizer
    )
    cfg = PPOJobConfig(
        model=ModelConfig(hidden_size=32, intermediate_size=64),
        data=DataConfig(num_train=64, num_eval=64, max_response_len=8),
        train=TrainConfig(batch_size=8, micro_batch_size=8, max_steps=1),
        log=LogConfig(wandb_mode=WandbMode.disabled, progress=False),
        algo=PPOAlgoConfig(),
        reward_model=source,
        eval_prompts=64,
    )
    with caplog.at_level(logging.INFO, logger="remax"):
        trainer = PPOTrainer(cfg)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("critic:")]
    assert len(lines) == 1 and "another tokenizer" in lines[0] and "policy" in lines[0]
    assert type(trainer.critic).__name__ == "LlamaForSequenceClassification"
    assert type(trainer.setup.reward_model).__name__ == "GPT2ForSequenceClassification"
    metrics = trainer.train_step()
    assert math.isfinite(metrics["reward/mean"]) and metrics["reward/mean"] != 0.0


def test_template_tokenizer_needs_an_rm_chat_template(tokenizer, reward_model):
    cfg = RewardSourceConfig(path="rm", template=RewardTemplate.tokenizer)
    with pytest.raises(ConfigError, match="has no chat_template; use reward_model.template=format"):
        RewardScorer(cfg, tokenizer, max_prompt_len=12, model=reward_model, tokenizer=tokenizer)


def test_ppo_trains_on_a_reward_function(tmp_path, caplog):
    """kind=function in PPO: the rewards are the function's (here 2 · gold − 1, so the logged
    reward mean is 2 · gold mean − 1 of the same responses), and the critic starts from the policy."""
    import logging

    from remax.config import PPOAlgoConfig, PPOJobConfig
    from remax.trainers.ppo import PPOTrainer

    cfg = PPOJobConfig(
        model=ModelConfig(hidden_size=32, intermediate_size=64),
        data=DataConfig(num_train=64, num_eval=64, max_response_len=8),
        train=TrainConfig(batch_size=8, micro_batch_size=8, max_steps=1),
        log=LogConfig(wandb_mode=WandbMode.disabled, progress=False),
        algo=PPOAlgoConfig(),
        reward_model=RewardSourceConfig(
            kind=RewardKind.function, function="tests.reward_functions:topic_margin"
        ),
        eval_prompts=64,
    )
    with caplog.at_level(logging.INFO, logger="remax"):
        trainer = PPOTrainer(cfg)
    assert any(
        "not from the reward model: the reward is a function" in r.getMessage()
        for r in caplog.records
    )
    rows = trainer.shard(trainer.sampler.next_indices())
    sampled = trainer.rollout([trainer.setup.prompts.train[i] for i in rows])
    raw = [trainer.setup.prompts.train_raw[i] for i in rows]
    gold = trainer.setup.gold(sampled)
    metrics = trainer.update(sampled, raw)
    assert metrics["reward/mean"] == pytest.approx(float(2 * gold.mean() - 1), abs=1e-6)


def test_remote_code_runs_only_when_the_user_sets_trust_remote_code(tmp_path):
    """An RM repository with its own modelling code (``auto_map``): the library's class by
    default, the repository's class only with reward_model.trust_remote_code=true."""
    tok = other_tokenizer()
    path = tmp_path / "rm"
    gpt2_reward_model(tok).save_pretrained(path)
    tok.save_pretrained(path)
    config = json.loads((path / "config.json").read_text())
    config["auto_map"] = {"AutoModelForSequenceClassification": "custom_rm.CustomRM"}
    (path / "config.json").write_text(json.dumps(config))
    (path / "custom_rm.py").write_text(
        "from transformers import GPT2ForSequenceClassification\n\n\n"
        "class CustomRM(GPT2ForSequenceClassification):\n    pass\n"
    )
    kinds = {}
    for trust in (False, True):
        cfg = RewardSourceConfig(
            path=str(path), kind=RewardKind.hf_seq_cls, trust_remote_code=trust
        )
        model, _ = load_reward_adapter(cfg, ModelConfig(), seed=0, device="cpu")
        kinds[trust] = type(model).__name__
    assert kinds == {False: "GPT2ForSequenceClassification", True: "CustomRM"}
