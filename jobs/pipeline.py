"""``python -m jobs.pipeline [key=value ...]``: SFT → reward model → ReMax, each on the last's export.

Overrides without a prefix go to every stage (``seed=1 run.root=out``); ``sft.<key>=``,
``reward_model.<key>=`` and ``remax.<key>=`` go to one stage only (``remax.algo.kl_coef=0.1``).
The ReMax stage gets ``model.path=<sft export>`` and ``reward_model.path=<reward_model export>``.
``reward_model`` is both a stage and a ReMax key: ``reward_model.train.max_steps=9`` goes to the
reward-model stage, ``remax.reward_model.path=...`` to ReMax's reward source.
Each stage resumes or is skipped when complete, so re-running the command after an interruption
continues where it stopped.
"""

from __future__ import annotations

import json
import sys
import time

from jobs._config import compose_stage
from jobs._stage import run_stage

STAGES = ("sft", "reward_model", "remax")


def split_overrides(argv: list[str]) -> dict[str, list[str]]:
    per_stage: dict[str, list[str]] = {s: [] for s in STAGES}
    for arg in argv:
        stage, _, rest = arg.partition(".")
        if stage in per_stage and rest:
            per_stage[stage].append(rest)
        else:
            for s in STAGES:
                per_stage[s].append(arg)
    return per_stage


def main(argv: list[str]) -> dict:
    overrides = split_overrides(argv)
    # Compose (and validate) every stage before training any: a typo in a remax.* override should
    # not surface after the SFT and RM stages have run.
    compose_stage("sft", overrides["sft"])
    compose_stage("reward_model", overrides["reward_model"])
    placeholders = ["model.path=<sft export>", "reward_model.path=<reward_model export>"]
    compose_stage("remax", placeholders + overrides["remax"])
    start = time.perf_counter()
    sft = run_stage("sft", compose_stage("sft", overrides["sft"]))
    rm = run_stage("reward_model", compose_stage("reward_model", overrides["reward_model"]))
    remax_overrides = [
        f"model.path={sft['run_dir']}/export",
        f"reward_model.path={rm['run_dir']}/export",
        *overrides["remax"],
    ]
    remax = run_stage("remax", compose_stage("remax", remax_overrides))
    summary = {
        "sft": sft["eval"],
        "reward_model": rm["eval"],
        "remax": remax["eval"],
        "run_dirs": {s["stage"]: s["run_dir"] for s in (sft, rm, remax)},
        "wall_s": round(time.perf_counter() - start, 1),
    }
    print(json.dumps(summary, indent=2))
    _print_table(summary)
    return summary


def _ms(d: dict) -> str:
    return f"{d['mean']:.3f} ± {d['stderr']:.3f} (n={d['n']})"


def _print_table(s: dict) -> None:
    """The demo's human summary (stderr, so stdout stays one JSON document for scripts)."""
    from rich.console import Console
    from rich.table import Table

    ev = s["remax"]
    table = Table(title=f"remax pipeline ({s['wall_s']:.0f} s)")
    for col in ("stage", "metric", "before", "after"):
        table.add_column(col)
    table.add_row(
        "sft", "held-out NLL", f"{s['sft']['loss_before']:.3f}", f"{s['sft']['loss_after']:.3f}"
    )
    table.add_row(
        "reward_model", "held-out pair accuracy", "", f"{s['reward_model']['accuracy']:.3f}"
    )
    table.add_row(
        "remax", "RM reward (± stderr)", _ms(ev["reward_before"]), _ms(ev["reward_after"])
    )
    if "gold_before" in ev:
        table.add_row(
            "remax", "gold score (± stderr)", _ms(ev["gold_before"]), _ms(ev["gold_after"])
        )
    table.add_row("remax", "KL(π‖π_ref) per answer", "0", f"{ev['kl_after']:.3f}")
    table.add_row(
        "remax", "answer length", f"{ev['length_before']:.2f}", f"{ev['length_after']:.2f}"
    )
    Console(stderr=True).print(table)


if __name__ == "__main__":
    main(sys.argv[1:])
