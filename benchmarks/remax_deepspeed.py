"""ReMax steps with the actor as plain PyTorch and as DeepSpeed engines, side by side, one GPU.

``python -m benchmarks.remax_deepspeed [--size 1.1b] [--variants plain,zero2,zero3,zero3_nogather]``

Each variant runs in its own process (a DeepSpeed engine does not give all of its memory back), on
the same random-init Llama policy and RM of ``--size`` (written once, bf16), the same prompts, one
warm-up and ``--steps`` timed ``RemaxTrainer.train_step`` calls. Reports per variant: median step
time, CUDA peak memory, the step's loss and gradient norm (finite, and the same order across
variants: they start from the same weights and draw the same samples), and the ratio to plain.

- ``zero2``: actor ZeRO-2, reference and RM ZeRO-3 inference engines (the release's placement).
- ``zero3``: actor ZeRO-3 too, gathered once per rollout (``deepspeed.gather_for_generation``).
- ``zero3_nogather``: ZeRO-3 fetching each layer at every decoding step.

At world size 1 ZeRO shards nothing: what this measures is the engines' overhead and that the
DeepSpeed path runs on CUDA with bf16 and nccl; the memory savings need N ranks (``jobs.plan``).
Writes ``remax_deepspeed.json`` and ``.md`` under ``--out`` ($OUT or runs/benchmarks).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks._models import llama_config, write_models

VARIANTS = {
    "plain": None,
    "zero2": dict(zero_stage=2),
    "zero3": dict(zero_stage=3),
    "zero3_nogather": dict(zero_stage=3, gather_for_generation=False),
}


def _job_config(args):
    """The ReMax job of one variant: the same models, batch and lengths for every variant."""
    from remax.config import (
        ClusterConfig,
        DataConfig,
        DeepSpeedConfig,
        DType,
        LogConfig,
        ModelConfig,
        OptimConfig,
        RemaxJobConfig,
        RewardSourceConfig,
        Scheduler,
        TrainConfig,
        WandbMode,
    )

    ds = VARIANTS[args.variant]
    return RemaxJobConfig(
        seed=0,
        model=ModelConfig(
            name="bench", path=args.policy, dtype=DType.bfloat16, grad_checkpointing=True
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
        cluster=ClusterConfig(device="cuda"),
        reward_model=RewardSourceConfig(path=args.rm),
        deepspeed=DeepSpeedConfig(enabled=ds is not None, **(ds or {})),
        eval_prompts=64,
    )


def run_variant(args) -> dict:
    """One variant in this process; returns its measurements."""
    from remax.trainers.remax import RemaxTrainer

    cfg = _job_config(args)
    torch.manual_seed(0)
    trainer = RemaxTrainer(cfg)
    rng = random.Random(0)  # the same long prompts for every variant
    long_prompts = [
        "".join(rng.choice("abcdefghijklmnop") for _ in range(args.prompt_len))
        for _ in trainer.setup.prompts.train
    ]
    trainer.setup.prompts = trainer.setup.prompts._replace(train=long_prompts)
    times, metrics = [], []
    for step in range(args.steps + 1):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        m = trainer.train_step()
        torch.cuda.synchronize()
        if step:  # step 0 is the warm-up
            times.append(time.perf_counter() - t0)
            metrics.append(m)
        print(f"[bench] {args.variant} step {step}: {time.perf_counter() - t0:.3f}s", flush=True)
    from remax.engines import close_all

    close_all()
    return {
        "variant": args.variant,
        "step_time_median_s": statistics.median(times),
        "cuda_peak_gib": torch.cuda.max_memory_allocated() / 2**30,
        "loss_first": metrics[0]["loss/policy"],
        "grad_norm_first": metrics[0]["optim/grad_norm"],
        "response_length_mean": statistics.mean(m["response/length_mean"] for m in metrics),
    }


def markdown(report: dict) -> str:
    meta = report["meta"]
    rows = report["results"]
    base = next((r for r in rows if r["variant"] == "plain"), None)
    lines = [
        f"# ReMax step, plain PyTorch vs DeepSpeed engines ({meta['device_name']}, 1 rank)",
        "",
        f"{meta['size']} policy and RM, batch {meta['batch']}, prompt {meta['prompt_len']} + "
        f"response {meta['response_len']} tokens, bf16, gradient checkpointing, "
        f"{meta['steps']} timed steps after one warm-up, each variant in its own process.",
        "",
        "| variant | step time median (s) | vs plain | CUDA peak (GiB) | vs plain | "
        "first loss | first grad norm |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        t = r["step_time_median_s"] / base["step_time_median_s"] if base else float("nan")
        m = r["cuda_peak_gib"] / base["cuda_peak_gib"] if base else float("nan")
        lines.append(
            f"| {r['variant']} | {r['step_time_median_s']:.3f} | {t:.2f} | "
            f"{r['cuda_peak_gib']:.2f} | {m:.2f} | {r['loss_first']:.4g} | "
            f"{r['grad_norm_first']:.4g} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", default="1.1b")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--prompt-len", type=int, default=256)
    p.add_argument("--response-len", type=int, default=256)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--out", default=os.environ.get("OUT", "runs/benchmarks"))
    p.add_argument("--variant", help=argparse.SUPPRESS)  # child process: one variant
    p.add_argument("--policy", help=argparse.SUPPRESS)
    p.add_argument("--rm", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.variant:
        print("RESULT " + json.dumps(run_variant(args)), flush=True)
        return
    if not torch.cuda.is_available():
        sys.exit("benchmarks.remax_deepspeed needs a CUDA GPU (the CPU path is tested in tests/)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = {
        "meta": {
            "device_name": torch.cuda.get_device_name(0),
            "size": args.size,
            "batch": args.batch,
            "prompt_len": args.prompt_len,
            "response_len": args.response_len,
            "steps": args.steps,
            "torch": torch.__version__,
        },
        "results": [],
    }
    max_len = args.prompt_len + args.response_len
    with tempfile.TemporaryDirectory(prefix="remax_ds_bench_") as tmp:
        config = llama_config(args.size, max_len)
        policy, rm = write_models(config, config, Path(tmp), torch.bfloat16, "cpu")
        for variant in args.variants.split(","):
            cmd = [sys.executable, "-m", "benchmarks.remax_deepspeed", "--variant", variant]
            cmd += ["--policy", policy, "--rm", rm, "--size", args.size]
            for key in ("batch", "prompt_len", "response_len", "steps"):
                cmd += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            sys.stderr.write(proc.stderr[-3000:] if proc.returncode else "")
            lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
            if proc.returncode or not lines:
                report["results"].append({"variant": variant, "error": proc.stderr[-500:]})
                print(f"[bench] {variant} failed (exit {proc.returncode})", flush=True)
                continue
            report["results"].append(json.loads(lines[-1].removeprefix("RESULT ")))
            print(f"[bench] {report['results'][-1]}", flush=True)
    ok = {**report, "results": [r for r in report["results"] if "error" not in r]}
    (out / "remax_deepspeed.json").write_text(json.dumps(report, indent=2))
    table = markdown(ok)
    (out / "remax_deepspeed.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
