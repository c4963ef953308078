"""Offline reports of run dirs: training curves as a PNG and a markdown table.

Reads only what every run dir holds (``metrics.jsonl``, ``summary.json``), so it works without
W&B, on a laptop, from a copied ``runs/`` folder. Several runs (a sweep, or every stage of a
pipeline) share one figure: one panel per metric, one line per run.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, NamedTuple

# (panel title, metric keys drawn in it, line style of each key). The greedy baseline shares the
# reward panel: ReMax's advantage is the gap between the two lines.
PANELS = (
    ("reward (solid) and greedy baseline (dashed)", ("reward/mean", "reward/baseline_mean")),
    ("KL(π‖π_ref) per answer", ("kl/mean",)),
    ("response length (tokens)", ("response/length_mean",)),
    ("policy loss", ("loss/policy",)),
    ("SFT loss", ("loss/sft",)),
    ("reward-model loss", ("loss/reward_model",)),
    ("reward-model pair accuracy", ("reward_model/accuracy",)),
)
STYLES = ("-", "--")
KEYS = tuple(key for _, keys in PANELS for key in keys)


class Run(NamedTuple):
    """A run dir: its ``stage`` (the parent folder), ``rows`` of metrics.jsonl, ``summary``."""

    path: Path
    stage: str
    rows: list[dict[str, Any]]
    summary: dict[str, Any] | None


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """Rows of a ``metrics.jsonl`` (a row torn by a kill is skipped), sorted by step."""
    rows = []
    for line in Path(path).read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return sorted(rows, key=lambda r: r.get("step", 0))


def _is_run_dir(path: Path) -> bool:
    return (path / "metrics.jsonl").is_file() or (path / "summary.json").is_file()


def find_runs(paths: list[str | Path]) -> list[Run]:
    """Run dirs given directly, or found under a stage dir or a ``run.root`` (``*/*/``)."""
    found: list[Path] = []
    for given in map(Path, paths):
        if not given.is_dir():
            raise FileNotFoundError(f"{given}: no such directory; give a run dir or a run.root")
        if _is_run_dir(given):
            found.append(given)
        else:
            found += sorted(p for p in given.glob("*") if p.is_dir() and _is_run_dir(p))
            found += sorted(p for p in given.glob("*/*") if p.is_dir() and _is_run_dir(p))
    runs = []
    for path in dict.fromkeys(p.resolve() for p in found):
        metrics, summary = path / "metrics.jsonl", path / "summary.json"
        runs.append(
            Run(
                path=path,
                stage=path.parent.name,
                rows=read_metrics(metrics) if metrics.is_file() else [],
                summary=json.loads(summary.read_text()) if summary.is_file() else None,
            )
        )
    if not runs:
        raise FileNotFoundError(
            f"no run dir (with metrics.jsonl or summary.json) in {[str(p) for p in paths]}"
        )
    return runs


def label(run: Run, runs: list[Run]) -> str:
    """The run dir's name, prefixed by its stage when the runs span several stages."""
    stages = {r.stage for r in runs}
    return f"{run.stage}/{run.path.name}" if len(stages) > 1 else run.path.name


def plot(runs: list[Run], out: Path) -> list[str]:
    """Draw every panel some run has data for into the PNG ``out``; return the metric keys drawn."""
    import matplotlib

    matplotlib.use("Agg")  # no display: a compute node or CI
    import matplotlib.pyplot as plt

    panels = [
        (t, ks) for t, ks in PANELS if any(k in r for run in runs for r in run.rows for k in ks)
    ]
    if not panels:
        raise ValueError(f"no metric of {list(KEYS)} in the metrics.jsonl of {len(runs)} run(s)")
    ncols = min(3, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.6 * ncols, 3.2 * nrows), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    drawn = []
    trained = [run for run in runs if run.rows]  # an evaluate run dir has no curve, and no colour
    for ax, (title, keys) in zip(axes.flat, panels):
        for i, run in enumerate(trained):
            for key, style in zip(keys, STYLES):
                points = [(r["step"], r[key]) for r in run.rows if r.get(key) is not None]
                if points:
                    steps, values = zip(*points)
                    line_label = label(run, runs) if style == "-" else None
                    ax.plot(steps, values, style, color=colors[i % len(colors)], label=line_label)
                    drawn.append(key)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    for ax in axes.flat[len(panels) :]:
        ax.axis("off")
    handles, names = axes.flat[0].get_legend_handles_labels()
    for ax in axes.flat[1 : len(panels)]:  # runs without the first panel's metric still get a key
        for h, n in zip(*ax.get_legend_handles_labels()):
            if n not in names:
                handles.append(h)
                names.append(n)
    fig.legend(handles, names, loc="lower center", ncol=min(4, len(names)), fontsize=9)
    legend_inches = 0.2 + 0.3 * math.ceil(len(names) / 4)
    fig.tight_layout(rect=(0, legend_inches / fig.get_figheight(), 1, 1))
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return list(dict.fromkeys(drawn))


def _fmt(value: Any) -> str:
    if isinstance(value, dict) and {"mean", "stderr"} <= set(value):
        return f"{value['mean']:.4g} ± {value['stderr']:.2g} (n={value.get('n', '?')})"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list) and all(isinstance(v, float) for v in value):
        return "[" + ", ".join(f"{v:.4g}" for v in value) + "]"
    return str(value)


def _flat(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and not {"mean", "stderr"} <= set(v):
            out.update(_flat(v, f"{prefix}{k}."))  # an empty dict (no answer files) adds no row
        else:
            out[f"{prefix}{k}"] = v
    return out


def markdown(runs: list[Run], image: str | None = None) -> str:
    """A training table (last logged value of each metric) and an evaluation table (summary.json)."""
    lines = ["# Report", ""]
    if image:
        lines += [f"![training curves]({image})", ""]
    trained = [r for r in runs if r.rows]
    keys = [k for k in KEYS if any(k in row for r in trained for row in r.rows)]
    if trained:
        lines += ["| run | stage | steps | " + " | ".join(f"`{k}`" for k in keys) + " |"]
        lines += ["|---" * (3 + len(keys)) + "|"]
        for r in trained:
            last = {k: next((row[k] for row in reversed(r.rows) if k in row), None) for k in keys}
            cells = [_fmt(last[k]) if last[k] is not None else "—" for k in keys]
            lines += [
                f"| {label(r, runs)} | {r.stage} | {r.rows[-1]['step']} | {' | '.join(cells)} |"
            ]
        lines += [""]
    evaluated = [r for r in runs if r.summary and r.summary.get("eval")]
    if evaluated:
        lines += ["## Evaluation (summary.json)", "", "| run | stage | metric | value |"]
        lines += ["|---|---|---|---|"]
        for r in evaluated:
            for key, value in _flat(r.summary["eval"]).items():
                lines += [f"| {label(r, runs)} | {r.stage} | `{key}` | {_fmt(value)} |"]
        lines += [""]
    return "\n".join(lines)


def write_report(paths: list[str | Path], out_dir: str | Path, name: str = "report") -> dict:
    """``<out_dir>/<name>.png`` and ``<name>.md`` for the runs under ``paths``."""
    runs = find_runs(paths)
    out_dir = Path(out_dir)
    png = out_dir / f"{name}.png"
    drawn = plot(runs, png) if any(r.rows for r in runs) else []
    md = out_dir / f"{name}.md"
    md.write_text(markdown(runs, png.name if drawn else None))
    return {"png": str(png) if drawn else None, "md": str(md), "runs": len(runs), "metrics": drawn}
