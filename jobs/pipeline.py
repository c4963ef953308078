"""``python -m jobs.pipeline [key=value ...]``: SFT → reward model → ReMax → evaluate, on the exports.

Overrides without a prefix go to every stage (``seed=1 run.root=out``); ``sft.<key>=``,
``reward_model.<key>=`` and ``remax.<key>=`` go to one stage only (``remax.algo.kl_coef=0.1``).
The ReMax stage gets ``model.path=<sft export>`` and ``reward_model.path=<reward_model export>``.
``reward_model`` is both a stage and a ReMax key: ``reward_model.train.max_steps=9`` goes to the
reward-model stage, ``remax.reward_model.path=...`` to ReMax's reward source.
The evaluate stage compares the ReMax export (A) with the SFT export (B) on held-out prompts:
``policies=[<remax export>,<sft export>]``, ``reward_model.path=<reward_model export>``,
``reference.path=<sft export>``; ``evaluate.<key>=`` goes to it alone, and an override without a
prefix reaches it only when its schema has the key (it has no model, optim, train, algo or
experiment). ``evaluate=false`` skips it.
Each stage resumes or is skipped when complete, so re-running the command after an interruption
continues where it stopped.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import sys
import time
from pathlib import Path

from jobs._config import compose_stage, fail
from jobs._output import human, wants_json
from remax import stages
from remax.config import Backend
from remax.run_dir import run_dir_for

STAGES = tuple(name for name, s in stages.STAGES.items() if s.in_pipeline)


def run_stage(stage: str, config):
    """:func:`jobs._stage.run_stage`, imported on first use: it imports torch, which a Slurm
    submission from the login node never needs."""
    from jobs._stage import run_stage as run

    return run(stage, config)


def split_overrides(argv: list[str]) -> dict[str, list[str]]:
    per_stage: dict[str, list[str]] = {s: [] for s in STAGES}
    for arg in argv:
        stage, _, rest = arg.partition(".")
        if stage in per_stage and rest:
            per_stage[stage].append(rest)
        else:
            for s in STAGES:
                if _has_key(s, arg):
                    per_stage[s].append(arg)
    return per_stage


def _has_key(stage: str, arg: str) -> bool:
    """Whether an unprefixed override applies to ``stage`` (evaluate lacks the training keys)."""
    spec = stages.stage(stage)
    if spec.trainer is not None:  # a training stage takes every key (a typo fails there)
        return True
    key = arg.lstrip("+~").split("=", 1)[0].split(".", 1)[0]
    return key in {f.name for f in dataclasses.fields(spec.schema)}


def _evaluate_overrides(remax: str, sft: str, rm: str, algo=None) -> list[str]:
    """Evaluate ReMax (A) against SFT (B), decoding as the ReMax stage's own evaluation does."""
    decoding = []
    if algo is not None:
        decoding = [
            f"decoding={algo.eval_decoding.value}",
            f"temperature={algo.temperature}",
            f"top_p={algo.top_p}",
            f"top_k={algo.top_k}",
        ]
    return [
        f"policies=['{remax}','{sft}']",
        "names=[remax,sft]",
        f"reward_model.path='{rm}'",
        f"reference.path='{sft}'",
        *decoding,
    ]


def main(argv: list[str]) -> dict:
    if "-h" in argv or "--help" in argv:
        print("usage: " + __doc__.strip())
        return None
    from jobs._output import use_json

    use_json("--json" in argv)
    argv = [a for a in argv if a != "--json"]
    evaluate = "evaluate=false" not in argv
    overrides = split_overrides([a for a in argv if a not in ("evaluate=false", "evaluate=true")])
    # Compose (and validate) every stage before training any: a typo in a remax.* override should
    # not surface after the SFT and RM stages have run.
    sft_cfg = compose_stage("sft", overrides["sft"])
    rm_cfg = compose_stage("reward_model", overrides["reward_model"])
    placeholders = ["model.path='<sft export>'", "reward_model.path='<reward_model export>'"]
    compose_stage("remax", placeholders + overrides["remax"])
    if evaluate:
        exports = _evaluate_overrides("<remax export>", "<sft export>", "<reward_model export>")
        compose_stage("evaluate", exports + overrides["evaluate"])
    if sft_cfg.cluster.backend == Backend.slurm:
        return submit_pipeline(overrides, evaluate, sft_cfg, rm_cfg)
    start = time.perf_counter()
    sft = run_stage("sft", sft_cfg)
    rm = run_stage("reward_model", rm_cfg)
    remax_overrides = [
        f"model.path={sft['run_dir']}/export",
        f"reward_model.path={rm['run_dir']}/export",
        *overrides["remax"],
    ]
    remax_cfg = compose_stage("remax", remax_overrides)
    remax = run_stage("remax", remax_cfg)
    done = [sft, rm, remax]
    if evaluate:
        exports = [f"{s['run_dir']}/export" for s in (remax, sft, rm)]
        evaluate_overrides = _evaluate_overrides(*exports, remax_cfg.algo) + overrides["evaluate"]
        done.append(run_stage("evaluate", compose_stage("evaluate", evaluate_overrides)))
    summary = {
        **{s["stage"]: s["eval"] for s in done},
        "run_dirs": {s["stage"]: s["run_dir"] for s in done},
        "wall_s": round(time.perf_counter() - start, 1),
    }
    print(json.dumps(summary, indent=2))
    _print_table(summary)
    return summary


def submit_pipeline(overrides: dict[str, list[str]], evaluate: bool, sft_cfg, rm_cfg) -> dict:
    """Slurm: submit every stage now, chained with ``afterok`` so each starts on its inputs.

    SFT and the reward model do not depend on each other and run side by side; ReMax waits for
    both, evaluation for ReMax. Export paths are known before anything runs (run dirs follow from
    the configs). ``--kill-on-invalid-dep=yes`` cancels the dependents of a failed stage instead of
    leaving them pending forever, and a failed stage exits non-zero (no Hydra on the node).
    """
    from jobs._submit import submit

    sft_export, rm_export = (
        run_dir_for(sft_cfg, "sft") / "export",
        run_dir_for(rm_cfg, "reward_model") / "export",
    )
    remax_cfg = compose_stage(
        "remax", [f"model.path={sft_export}", f"reward_model.path={rm_export}", *overrides["remax"]]
    )
    eval_cfg = None
    if evaluate:
        remax_export = run_dir_for(remax_cfg, "remax") / "export"
        eval_cfg = compose_stage(
            "evaluate",
            _evaluate_overrides(remax_export, sft_export, rm_export, remax_cfg.algo)
            + overrides["evaluate"],
        )
    stages = [("sft", sft_cfg), ("reward_model", rm_cfg), ("remax", remax_cfg)]
    stages += [("evaluate", eval_cfg)] if eval_cfg is not None else []
    _check_total_budget(stages)
    scope = _budget_scope(stages)
    records = [
        submit("sft", sft_cfg, quiet=True, budget_scope=scope),
        submit("reward_model", rm_cfg, quiet=True, budget_scope=scope),
    ]
    after = _after(records)
    records.append(submit("remax", remax_cfg, dependency=after, quiet=True, budget_scope=scope))
    if eval_cfg is not None:
        after = _after(records[2:])
        records.append(
            submit("evaluate", eval_cfg, dependency=after, quiet=True, budget_scope=scope)
        )
    for stage, record in zip(STAGES, records):
        record.setdefault("stage", stage)
    summary = {"jobs": records, "record": str(_write_pipeline_record(sft_cfg.run.root, records))}
    if wants_json():
        print(json.dumps(summary, indent=2))
    else:
        for r in records:
            print(human(r))
        print(f"cancel all: python -m jobs.cancel {summary['record']}")
    return summary


def _check_total_budget(stages: list) -> None:
    """The pipeline's budget bounds the sum of its stages, checked before anything is submitted
    (each stage alone might fit while the whole does not)."""
    from jobs._submit import estimate

    budget = stages[0][1].cluster.budget
    parts = {s: estimate(s, c.cluster)["cost"] for s, c in stages}
    if budget is not None and sum(parts.values()) > budget:
        detail = ", ".join(f"{s} {v}" for s, v in parts.items())
        fail(
            f"the pipeline's estimated cost {round(sum(parts.values()), 2)} ({detail}) exceeds "
            f"cluster.budget={budget}: lower cluster.time_min or raise the budget"
        )


def _budget_scope(stages: list) -> Path | None:
    """The scope file through which every stage's segments share the pipeline's one cap
    (``cluster.budget`` of the first stage, as in :func:`_check_total_budget`); None on a dry
    run. A resubmission is refused when what the stages cost so far plus the estimates of those
    not yet complete would exceed it."""
    from jobs._costs import read_scope, scope_refusal, write_scope
    from jobs._submit import estimate

    first = stages[0][1]
    if first.cluster.dry_run:
        return None
    run_dirs = [run_dir_for(c, s) for s, c in stages]
    members = [str(d) for d in run_dirs]
    scope = write_scope(Path(first.run.root), _pipeline_id(members), first.cluster.budget, members)
    todo = [(s, c) for (s, c), d in zip(stages, run_dirs) if not (d / "summary.json").exists()]
    next_cost = sum(estimate(s, c.cluster)["cost"] for s, c in todo)
    reason = scope_refusal(read_scope(scope), next_cost, first.cluster.currency)
    if reason:
        fail(f"{reason}; nothing was submitted")
    return scope


def _pipeline_id(run_dirs: list[str]) -> str:
    key = ",".join(sorted(run_dirs))
    return f"pipeline-{hashlib.sha1(key.encode()).hexdigest()[:8]}"


def _write_pipeline_record(root: str, records: list[dict]) -> Path:
    """``<run.root>/pipelines/<id>.json``: what ``jobs.cancel`` and ``jobs.status`` read back."""
    path = Path(root) / "pipelines" / f"{_pipeline_id([r['run_dir'] for r in records])}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"jobs": records}, indent=2))
    return path


def _after(records: list[dict]) -> str | None:
    ids = [r["job_id"] for r in records if r.get("job_id")]
    return "afterok:" + ":".join(ids) if ids else None


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
    if "evaluate" in s:
        _evaluate_rows(table, s["evaluate"])
    Console(stderr=True).print(table)


def _evaluate_rows(table, ev: dict) -> None:
    """Win rates of ReMax (A) vs SFT (B) in the "after" column; per-policy means as SFT → ReMax."""
    a, b = ev["policies"][:2]
    by = ev["by_policy"]
    for prefix, label in (("", "RM"), ("gold_", "gold")):
        if f"{prefix}win_rate" in ev:
            low, high = ev[f"{prefix}win_rate_ci"]
            rate = f"{ev[f'{prefix}win_rate']:.3f} [{low:.3f}, {high:.3f}]"
            table.add_row("evaluate", f"{label} win rate, {a} vs {b}", "", rate)
    if "gold" in by[a]:
        table.add_row("evaluate", "gold score (± stderr)", _ms(by[b]["gold"]), _ms(by[a]["gold"]))


def cli() -> None:
    """Console-script entry point (``remax-pipeline``)."""
    main(sys.argv[1:])


if __name__ == "__main__":
    cli()
