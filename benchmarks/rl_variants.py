"""ReMax, RLOO, GRPO and PPO side by side: memory, speed and gold score against samples and time.

``python -m benchmarks.rl_variants --exports runs/demo --out benchmarks/results`` (CPU, the demo's
SFT and RM exports: ``make demo`` first; about 15 min on 2 idle cores)
``python -m benchmarks.rl_variants --exports <root> --device cuda`` (the same on a GPU node)

Every algorithm trains the same SFT export against the same reward model on the synthetic task,
with the same prompts per step (``train.batch_size``), the same seeds and the same number of steps,
each through its job's own composition (``jobs.remax algo=remax_official|rloo|grpo``, ``jobs.ppo``:
every other setting is the preset's). Per algorithm and seed, in one process, one after another:

- train ``--steps`` steps; each ``train_step`` is timed alone (the evaluations are not);
- every ``--eval-every`` × prompts sampled answers (every ``--eval-every``/k steps: the same sample
  counts for every algorithm; and at step 0) the held-out gold score of the synthetic task
  (``trainer.evaluate()``: the stage's own evaluation, the demo's 128 held-out prompts by default);
- model state (parameters, buffers, gradients, optimizer state of every model, counted exactly as
  ``benchmarks.remax_vs_ppo`` counts them), decoded tokens per step (every decoded row: ReMax's
  greedy rows count, they are decode work) and samples per step (sampled answers: prompts × k).

Then, over the seeds: gold mean ± standard error (of the per-seed means) at each evaluation, and at
equal samples and at equal wall time: at the smallest final sample count (wall time) among the
algorithms. Equal samples fall on an evaluation of every algorithm when ``--steps`` is a multiple
of ``--eval-every``; wall time is interpolated linearly between a seed's evaluations. Results: ``rl_variants[_<device>].json`` and ``.md``,
and ``.png`` (gold against samples and against wall time).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from benchmarks.remax_vs_ppo import arm_state

ALGOS = {  # name -> (stage, algo preset)
    "remax": ("remax", "remax_official"),
    "rloo": ("remax", "rloo"),
    "grpo": ("remax", "grpo"),
    "ppo": ("ppo", "ppo_matched"),
}


def progress(msg: str) -> None:
    print(f"[rl_variants] {msg}", file=sys.stderr, flush=True)


def find_exports(root: Path) -> tuple[Path, Path]:
    """The SFT and RM ``export/`` dirs under a pipeline's ``run.root``."""
    found = {}
    for stage in ("sft", "reward_model"):
        hits = sorted(root.glob(f"{stage}/*/export/config.json"))
        if len(hits) != 1:
            raise SystemExit(
                f"error: --exports={root}: expected one {stage}/*/export under it, found "
                f"{len(hits)}: run `make demo` (or `python -m jobs.pipeline run.root={root}`) first"
            )
        found[stage] = hits[0].parent
    return found["sft"], found["reward_model"]


def build(name: str, seed: int, args, sft: Path, rm: Path):
    """One trainer, composed as its job composes it (``jobs._config.compose_stage``)."""
    from jobs._config import compose_stage

    stage, preset = ALGOS[name]
    overrides = [
        f"algo={preset}",
        f"model.path={sft}",
        f"reward_model.path={rm}",
        f"seed={seed}",
        f"train.max_steps={args.steps}",
        f"cluster.device={args.device}",
        "log.wandb_mode=disabled",
        "log.progress=false",
        *args.override,
    ]
    cfg = compose_stage(stage, overrides)
    if stage == "ppo":
        from remax.trainers.ppo import PPOTrainer

        return PPOTrainer(cfg)
    from remax.trainers.remax import RemaxTrainer

    return RemaxTrainer(cfg)


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _decoded_tokens(metrics: dict, rows: int, prompts: int) -> float:
    """Every decoded answer token of one step: the sampled rows and, for ReMax, the greedy ones."""
    greedy = metrics.get("response/greedy_length_mean", 0.0) * prompts
    return metrics["response/length_mean"] * rows + greedy


def _gold(trainer) -> float:
    return float(trainer.evaluate()["gold"].float().mean())


def run_one(name: str, seed: int, args, sft: Path, rm: Path) -> dict:
    """Train one algorithm at one seed: its gold curve, step times and counts."""
    trainer = build(name, seed, args, sft, rm)
    prompts = trainer.cfg.train.batch_size
    k = getattr(trainer.cfg.rollout, "samples_per_prompt", 1)
    if args.eval_every % k:
        raise SystemExit(
            f"error: --eval-every={args.eval_every} must be a multiple of k={k} ({name})"
        )
    every = args.eval_every // k  # the same sample counts for every k: equal samples read exactly
    curve = [{"step": 0, "samples": 0, "wall_s": 0.0, "gold": _gold(trainer)}]
    times, decoded, wall = [], [], 0.0
    for step in range(1, args.steps + 1):
        _sync(args.device)
        t0 = time.perf_counter()
        metrics = trainer.train_step()
        _sync(args.device)
        times.append(time.perf_counter() - t0)
        trainer.step += 1
        wall += times[-1]
        decoded.append(_decoded_tokens(metrics, prompts * k, prompts))
        if step % every == 0 or step == args.steps:
            gold = _gold(trainer)
            curve.append(
                {"step": step, "samples": step * prompts * k, "wall_s": wall, "gold": gold}
            )
            progress(f"{name} seed {seed} step {step}: gold {gold:.3f}, {wall:.1f} s")
    state = arm_state(trainer)
    del trainer
    return {
        "curve": curve,
        "step_s": times,
        "decoded_tokens_per_step": statistics.mean(decoded),
        "prompts_per_step": prompts,
        "samples_per_step": prompts * k,
        "model_state": state,
    }


def _interp(curve: list[dict], key: str, x: float) -> float:
    """The curve's gold at ``x`` of ``key`` (samples or wall_s), linear between evaluations."""
    for a, b in zip(curve, curve[1:]):
        if a[key] <= x <= b[key]:
            w = 0.0 if b[key] == a[key] else (x - a[key]) / (b[key] - a[key])
            return a["gold"] + w * (b["gold"] - a["gold"])
    raise ValueError(f"{key}={x} is outside the curve ({curve[0][key]}..{curve[-1][key]})")


def mean_se(values: list[float]) -> dict:
    n = len(values)
    se = statistics.stdev(values) / n**0.5 if n > 1 else None  # one seed: no spread (JSON null)
    return {"mean": statistics.mean(values), "se": se, "n": n}


def summarize(runs: dict[str, list[dict]]) -> dict:
    """Per algorithm, over seeds: speed, memory, the gold curve, gold at equal samples and time."""
    equal_samples = min(r["curve"][-1]["samples"] for rs in runs.values() for r in rs)
    equal_wall = min(r["curve"][-1]["wall_s"] for rs in runs.values() for r in rs)
    out = {"equal_samples": equal_samples, "equal_wall_s": equal_wall, "algos": {}}
    for name, rs in runs.items():
        step_s = statistics.median(t for r in rs for t in r["step_s"])
        points = [
            {
                "step": p["step"],
                "samples": p["samples"],
                "wall_s": statistics.mean(r["curve"][i]["wall_s"] for r in rs),
                "gold": mean_se([r["curve"][i]["gold"] for r in rs]),
            }
            for i, p in enumerate(rs[0]["curve"])
        ]
        out["algos"][name] = {
            "model_state_bytes": rs[0]["model_state"]["total"],
            "model_state": rs[0]["model_state"],
            "step_s_median": step_s,
            "samples_per_s": rs[0]["samples_per_step"] / step_s,
            "prompts_per_step": rs[0]["prompts_per_step"],
            "samples_per_step": rs[0]["samples_per_step"],
            "decoded_tokens_per_step": statistics.mean(r["decoded_tokens_per_step"] for r in rs),
            "curve": points,
            "gold_start": points[0]["gold"],
            "gold_final": points[-1]["gold"],
            "gold_at_equal_samples": mean_se(
                [_interp(r["curve"], "samples", equal_samples) for r in rs]
            ),
            "gold_at_equal_wall": mean_se([_interp(r["curve"], "wall_s", equal_wall) for r in rs]),
        }
    return out


def _pm(g: dict) -> str:
    return f"{g['mean']:.3f}" + ("" if g["se"] is None else f" ± {g['se']:.3f}")


def markdown(report: dict) -> str:
    s, meta = report["summary"], report["meta"]
    lines = [
        "# ReMax, RLOO, GRPO and PPO side by side",
        "",
        f"`{meta['command']}` on {meta['device_name']} ({meta['threads']} threads), "
        f"{meta['steps']} steps, seeds {meta['seeds']}, {meta['date']}. Gold: held-out mean ± SE "
        f"over seeds. Equal samples: {s['equal_samples']} sampled answers; equal wall time: "
        f"{s['equal_wall_s']:.1f} s of training steps.",
        "",
        "| algorithm | model state (MiB) | step (s) | samples/s | decoded tokens/step | "
        "gold at start | gold final | at equal samples | at equal wall time |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, a in s["algos"].items():
        lines.append(
            f"| {name} (k={a['samples_per_step'] // a['prompts_per_step']}) | "
            f"{a['model_state_bytes'] / 2**20:.1f} | {a['step_s_median']:.3f} | "
            f"{a['samples_per_s']:.1f} | {a['decoded_tokens_per_step']:.0f} | "
            f"{_pm(a['gold_start'])} | {_pm(a['gold_final'])} | "
            f"{_pm(a['gold_at_equal_samples'])} | {_pm(a['gold_at_equal_wall'])} |"
        )
    return "\n".join(lines) + "\n"


def plot(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display: a compute node or CI
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for name, a in summary["algos"].items():
        gold = [p["gold"]["mean"] for p in a["curve"]]
        se = [p["gold"]["se"] or 0.0 for p in a["curve"]]
        for ax, key in zip(axes, ("samples", "wall_s")):
            xs = [p[key] for p in a["curve"]]
            ax.errorbar(xs, gold, yerr=se, label=name, capsize=2)
    axes[0].set(xlabel="sampled answers seen", ylabel="held-out gold score")
    axes[1].set(xlabel="training wall time (s)")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--exports", type=Path, help="a pipeline's run.root (runs/demo after make demo)")
    p.add_argument("--sft", type=Path, help="instead of --exports: the SFT export dir")
    p.add_argument("--rm", type=Path, help="instead of --exports: the reward model's export dir")
    p.add_argument("--algos", default=",".join(ALGOS))
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--steps", type=int, default=100, help="the demo's default")
    p.add_argument(
        "--eval-every", type=int, default=20, help="steps at k = 1 (a multiple of every k)"
    )
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--threads", type=int, default=0, help="torch threads on CPU (0: all cores)")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    p.add_argument(
        "--override", action="append", default=[], help="one more override for every run"
    )
    args = p.parse_args(argv)
    args.algos = args.algos.split(",")
    args.seeds = [int(s) for s in args.seeds.split(",")]
    unknown = sorted(set(args.algos) - set(ALGOS))
    if unknown or args.steps < 1 or args.eval_every < 1:
        p.error(f"--algos from {', '.join(ALGOS)} (got {unknown}); --steps, --eval-every >= 1")
    if (args.exports is None) == (args.sft is None or args.rm is None):
        p.error("give --exports (a pipeline's run.root) or both --sft and --rm")
    return args


def main(argv=None) -> dict:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.device == "cpu" and args.threads:
        torch.set_num_threads(args.threads)
    sft, rm = (args.sft, args.rm) if args.exports is None else find_exports(args.exports)
    runs = {n: [run_one(n, s, args, sft, rm) for s in args.seeds] for n in args.algos}
    gpu = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    report = {
        "meta": {
            "command": "python -m benchmarks.rl_variants " + " ".join(argv or sys.argv[1:]),
            "device_name": gpu,
            "threads": torch.get_num_threads(),
            "steps": args.steps,
            "seeds": args.seeds,
            "exports": {"sft": str(sft), "reward_model": str(rm)},
            "date": time.strftime("%Y-%m-%d"),
        },
        "summary": summarize(runs),
        "runs": runs,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "rl_variants" if args.device == "cpu" else "rl_variants_cuda"
    (args.out / f"{stem}.json").write_text(json.dumps(report, indent=1))
    (args.out / f"{stem}.md").write_text(markdown(report))
    plot(report["summary"], args.out / f"{stem}.png")
    print(markdown(report))
    return report


if __name__ == "__main__":
    main()
