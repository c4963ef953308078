"""Checkpoint bytes and save time, LoRA against full fine-tuning, on one policy.

``python -m benchmarks.lora_checkpoint --policy <sft export> [--rank 8] [--saves 20]`` builds the ReMax
trainer twice (``model.lora.rank=<rank>``, then 0) and times ``Checkpointer.save`` (engine files,
``state.pt``, fsync, marker: what the loop pays per checkpoint) after one step (so Adam's moments
are saved too), reporting the median and the bytes. The reward is the synthetic gold score.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from remax.config import LogConfig, LoraConfig, ModelConfig, RemaxJobConfig, WandbMode
from remax.trainers.checkpointer import Checkpointer
from remax.trainers.remax import RemaxTrainer


def measure(policy: str | None, rank: int, saves: int) -> dict:
    cfg = RemaxJobConfig(
        model=ModelConfig(path=policy, lora=LoraConfig(rank=rank)),
        log=LogConfig(wandb_mode=WandbMode.disabled, progress=False),
    )
    trainer = RemaxTrainer(cfg)
    trainer.train_step()  # Adam's moments exist from the first step on: a checkpoint holds them
    root = Path(tempfile.mkdtemp(prefix="lora-ckpt-")) / "checkpoints"
    ckpt = Checkpointer(cfg.checkpoint, trainer, root)
    times = []
    for step in range(saves + 1):  # the first save warms the page cache and imports: not counted
        t0 = time.perf_counter()
        ckpt.save(step + 1)
        times.append(time.perf_counter() - t0)
    last = root / f"step_{saves + 1}"
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    return {
        "rank": rank,
        "trainable": trainable,
        "bytes": sum(p.stat().st_size for p in last.rglob("*") if p.is_file()),
        "save_ms": 1000 * statistics.median(times[1:]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--policy", default=None, help="an SFT export (default: the tiny model)")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--saves", type=int, default=20)
    args = parser.parse_args()
    print("| run | trained parameters | checkpoint bytes | median save (ms) |")
    print("|---|---|---|---|")
    for rank in (args.rank, 0):
        m = measure(args.policy, rank, args.saves)
        name = f"LoRA r {rank}" if rank else "full fine-tuning"
        print(f"| {name} | {m['trainable']:,} | {m['bytes']:,} | {m['save_ms']:.1f} |")


if __name__ == "__main__":
    main()
