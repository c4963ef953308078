"""``export_policy=best_eval_reward`` on models whose weights share storage (issue 19)."""

from __future__ import annotations

import torch
from safetensors.torch import load_file
from transformers import OPTConfig, OPTForCausalLM

from remax.config import (
    DataConfig,
    ExportPolicy,
    LogConfig,
    ModelConfig,
    RemaxJobConfig,
    RunConfig,
    TrainConfig,
    WandbMode,
)
from remax.models.tiny import build_tokenizer


def save_tied_opt(path) -> OPTForCausalLM:
    """A tiny random-init OPT whose LM head is its input embedding (OPT's default tying)."""
    tok = build_tokenizer()
    torch.manual_seed(0)
    config = OPTConfig(
        vocab_size=len(tok),
        hidden_size=16,
        ffn_dim=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=64,
        word_embed_proj_dim=16,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        bos_token_id=tok.eos_token_id,
        tie_word_embeddings=True,
    )
    model = OPTForCausalLM(config)
    assert model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return model


def test_best_actor_of_a_tied_embedding_opt_is_saved_on_cpu(tmp_path):
    """On CPU ``.cpu()`` returns the tensor itself, so the tied ``lm_head`` and embedding reached
    safetensors as one storage ("tensors share memory"); the run now completes and ``export/``
    holds the chosen actor."""
    from remax.run_dir import prepare
    from remax.trainers import loop
    from remax.trainers.best_actor import BEST_FILE
    from remax.trainers.remax import RemaxTrainer

    save_tied_opt(tmp_path / "opt")
    cfg = RemaxJobConfig(
        model=ModelConfig(path=str(tmp_path / "opt")),
        data=DataConfig(num_train=16, num_eval=128, max_response_len=4),
        log=LogConfig(wandb_mode=WandbMode.disabled, progress=False),
        train=TrainConfig(batch_size=8, micro_batch_size=8, max_steps=2, eval_every=1),
        run=RunConfig(root=str(tmp_path / "runs")),
        export_policy=ExportPolicy.best_eval_reward,
        eval_prompts=64,
    )
    trainer = RemaxTrainer(cfg)
    summary = loop.run(trainer, cfg, prepare(cfg, "remax"), "remax")
    assert summary["export"]["step"] in (0, 1, 2)
    run_dir = tmp_path / "runs" / "remax" / summary["run_dir"].rsplit("/", 1)[-1]
    best = load_file(run_dir / BEST_FILE)
    assert torch.equal(best["lm_head.weight"], best["model.decoder.embed_tokens.weight"])
