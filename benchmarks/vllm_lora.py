"""vLLM with LoRA adapters on the CPU build: the merged weights pushed after each optimizer step
(what ``rollout.engine=vllm`` does with ``model.lora``) against vLLM's own LoRA requests (the base
loaded once; after each step the adapter saved in PEFT format and decoded with a new
``LoRARequest``), issue #22 item 4.

    .venv-vllm/bin/python -m benchmarks.vllm_lora [--hidden 512] [--layers 4] [--rank 8]
        [--batch 16] [--new-tokens 32] [--steps 8]

Each route runs in its own process (one in-process vLLM engine each, as a rank has), on the same
model, prompts and adapter updates: each step moves every adapter weight by seeded noise (an
optimizer step's stand-in), then times what the next rollout pays, sync and greedy decode of the
batch. The first step (vLLM's warm-up) is not counted. The answers of the two routes are compared
step by step: both decode base + adapters, merged or not.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROUTES = ("merged_push", "lora_requests")


def _model(args):
    """The tiny char tokenizer and a Llama of ``args``' shape (head_dim 64) with LoRA adapters."""
    from remax.config import LoraConfig
    from remax.models import lora
    from remax.models.tiny import build_tokenizer, llama_config, tiny_policy

    tok = build_tokenizer()
    torch.manual_seed(0)
    shape = dict(hidden_size=args.hidden, num_layers=args.layers, intermediate_size=2 * args.hidden)
    heads = args.hidden // 64
    model = tiny_policy(llama_config(len(tok), num_heads=heads, num_kv_heads=heads, **shape))
    lora.adapt(model, LoraConfig(rank=args.rank), seed=0)
    return tok, model.eval()


def _prompts(tok, args) -> list[list[int]]:
    gen = torch.Generator().manual_seed(1)
    letters = "abcdefghijklmnop"
    texts = [
        "".join(letters[i] for i in torch.randint(0, 16, (12,), generator=gen)) + "="
        for _ in range(args.batch)
    ]
    return [tok(t)["input_ids"] for t in texts]


@torch.no_grad()
def _step_adapters(model, step: int) -> None:
    """An optimizer step's stand-in: every adapter weight moved by seeded noise."""
    gen = torch.Generator().manual_seed(100 + step)
    for name, p in model.named_parameters():
        if ".lora_" in name:
            p.add_(0.02 * torch.randn(p.shape, generator=gen))


def _merged_push(args, tok, model, prompts, dirs):
    """``rollout.engine=vllm`` as the stages run it (direct route, in process)."""
    from remax.config.rollout import PushRoute, RolloutConfig, RolloutEngine
    from remax.config.sampling import SamplingConfig
    from remax.rollout import as_actor
    from remax.rollout.vllm import VLLMEngine

    cfg = RolloutConfig(engine=RolloutEngine.vllm, push=PushRoute.direct)
    engine = VLLMEngine(as_actor(model), tok, cfg, max_model_len=128, seed=0)
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[tok.pad_token_id] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    sampling = SamplingConfig(max_new_tokens=args.new_tokens)

    def rollout(step: int):
        engine.weights_updated()  # as the trainer after its optimizer step
        ro = engine.generate(ids, mask, sampling, greedy=True)
        return [r[m].tolist() for r, m in zip(ro.response, ro.response_mask)]

    return rollout


def _lora_requests(args, tok, model, prompts, dirs):
    """vLLM's LoRA path: the base once, then one adapter directory and request id per step."""
    from safetensors.torch import save_file
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    from remax.config.rollout import PushRoute, RolloutConfig
    from remax.models import lora
    from remax.rollout.vllm import _configure_cpu, engine_placement

    base, _ = lora.export_weights(model, None)  # before any step: B = 0, merged = base
    model.config.save_pretrained(dirs / "base")
    save_file({k: v.contiguous() for k, v in base.items()}, dirs / "base" / "model.safetensors")
    _configure_cpu(RolloutConfig(), model.config)
    os.environ.update(engine_placement(PushRoute.direct, "cpu", os.environ).env)
    set_threads, threads = torch.set_num_threads, torch.get_num_threads()
    llm = LLM(
        model=str(dirs / "base"),
        skip_tokenizer_init=True,
        dtype="float32",
        max_model_len=128,
        enforce_eager=True,
        seed=0,
        enable_lora=True,
        max_lora_rank=args.rank,
        max_loras=1,
    )
    torch.set_num_threads = set_threads
    torch.set_num_threads(threads)
    params = SamplingParams(
        temperature=0.0,
        max_tokens=args.new_tokens,
        stop_token_ids=[tok.eos_token_id],
        ignore_eos=True,
        detokenize=False,
    )
    requests = [{"prompt_token_ids": p} for p in prompts]

    def rollout(step: int):
        path = dirs / f"adapter_{step}"
        lora.save_adapter(model, lora.export_weights(model, None)[1], path)
        request = LoRARequest(f"step_{step}", step + 1, str(path))  # a new id: a new adapter
        outputs = llm.generate(requests, params, lora_request=request, use_tqdm=False)
        return [list(o.outputs[0].token_ids) for o in outputs]

    return rollout


def run_route(args) -> dict:
    tok, model = _model(args)
    prompts = _prompts(tok, args)
    dirs = Path(tempfile.mkdtemp(prefix="vllm-lora-", dir="/dev/shm"))
    build = _merged_push if args.route == "merged_push" else _lora_requests
    rollout = build(args, tok, model, prompts, dirs)
    times, answers = [], []
    for step in range(args.steps + 1):
        _step_adapters(model, step)
        t0 = time.perf_counter()
        answers.append(rollout(step))
        times.append(time.perf_counter() - t0)
    return {"route": args.route, "seconds": times[1:], "answers": answers}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--route", choices=ROUTES, help=argparse.SUPPRESS)  # one child's route
    parser.add_argument("--out", default=None, help="also write the results as JSON here")
    args = parser.parse_args()
    if args.route:
        print(json.dumps(run_route(args)))
        return
    results = {}
    for route in ROUTES:
        cmd = [sys.executable, "-m", "benchmarks.vllm_lora", *sys.argv[1:], "--route", route]
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode:
            sys.exit(f"{route} failed (exit {out.returncode}):\n{out.stderr[-3000:]}")
        results[route] = json.loads(out.stdout.strip().splitlines()[-1])
    a, b = (results[r] for r in ROUTES)
    same = sum(x == y for sa, sb in zip(a["answers"], b["answers"]) for x, y in zip(sa, sb))
    total = sum(len(s) for s in a["answers"])
    med = {r: statistics.median(results[r]["seconds"]) for r in ROUTES}
    print(
        f"hidden {args.hidden}, {args.layers} layers, LoRA rank {args.rank}, batch {args.batch}, "
        f"{args.new_tokens} new tokens, median of {args.steps} steps (sync + greedy decode):"
    )
    print("| route | s per step | vs merged push |")
    print("|---|---|---|")
    for r in ROUTES:
        print(f"| {r} | {med[r]:.3f} | {med[r] / med['merged_push']:.2f}× |")
    print(f"identical greedy answers: {same}/{total}")
    if args.out:
        Path(args.out).write_text(
            json.dumps(
                {"args": vars(args), "median_s": med, "same_answers": [same, total]}, indent=1
            )
        )


if __name__ == "__main__":
    main()
