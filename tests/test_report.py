"""``python -m jobs.report``: curves as a PNG and a markdown table from metrics.jsonl, offline."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, run_job

from remax.report import find_runs, read_metrics

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _run_dir(root: Path, stage: str, name: str, keys: dict, steps: int = 20, summary=None) -> Path:
    """A run dir with a synthetic metrics.jsonl: each key's value is ``start + slope · step``."""
    path = root / stage / name
    path.mkdir(parents=True)
    rows = [
        {
            "step": s,
            **{k: start + slope * s for k, (start, slope) in keys.items()},
            "time/step_s": 0.1,
        }
        for s in range(1, steps + 1)
    ]
    lines = [json.dumps(r) for r in rows] + ['{"step": 21, "reward/me']  # a row torn by a kill
    (path / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    if summary is not None:
        (path / "summary.json").write_text(json.dumps(summary))
    return path


REMAX_KEYS = {
    "reward/mean": (1.0, 0.2),
    "reward/baseline_mean": (1.5, 0.2),
    "kl/mean": (0.0, 0.05),
    "response/length_mean": (6.0, 0.1),
    "loss/policy": (-1.0, 0.01),
}


@pytest.fixture
def sweep(tmp_path):
    """runs/remax/ with two runs of a sweep, plus an SFT run and an evaluate run (summary only)."""
    root = tmp_path / "runs"
    _run_dir(root, "remax", "lr1-aaaa1111", REMAX_KEYS)
    _run_dir(root, "remax", "lr2-bbbb2222", {k: (v[0], 2 * v[1]) for k, v in REMAX_KEYS.items()})
    _run_dir(
        root,
        "sft",
        "default-cccc3333",
        {"loss/sft": (3.0, -0.05)},
        summary={"eval": {"loss_after": 2.0}},
    )
    ev = root / "evaluate" / "default-dddd4444"
    ev.mkdir(parents=True)
    summary = {"eval": {"win_rate": 0.625, "win_rate_ci": [0.51, 0.73], "answer_files": {}}}
    (ev / "summary.json").write_text(json.dumps(summary))
    return root


def _check_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC
    assert len(data) > 20_000, len(data)  # axes, lines and text, not an empty canvas


def test_report_of_one_stage_dir_with_a_sweep(sweep, tmp_path):
    out = tmp_path / "docs"
    proc = run_job("jobs.report", str(sweep / "remax"), "--out", str(out), "--name", "demo_curves")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["runs"] == 2 and result["png"] == str(out / "demo_curves.png")
    assert result["metrics"] == list(REMAX_KEYS)
    _check_png(out / "demo_curves.png")
    md = (out / "demo_curves.md").read_text()
    assert "![training curves](demo_curves.png)" in md
    header = "| run | stage | steps | `reward/mean` | `reward/baseline_mean` | `kl/mean` |"
    assert md.count(header) == 1
    # Final values (step 20): lr1 reward 1 + 0.2·20 = 5; lr2 reward 1 + 0.4·20 = 9.
    assert "| lr1-aaaa1111 | remax | 20 | 5 | 5.5 | 1 | 8 | -0.8 |" in md
    assert "| lr2-bbbb2222 | remax | 20 | 9 | 9.5 | 2 | 10 | -0.6 |" in md


def test_report_of_a_run_root_spans_stages_and_lists_evaluations(sweep):
    result = run_job("jobs.report", str(sweep))
    stdout = json.loads(result.stdout.strip().splitlines()[-1])
    assert stdout["runs"] == 4 and "loss/sft" in stdout["metrics"]
    _check_png(sweep / "report.png")
    md = (sweep / "report.md").read_text()
    assert "| sft/default-cccc3333 | sft | 20 |" in md  # several stages: labels carry the stage
    assert "| evaluate/default-dddd4444 | evaluate | `win_rate` | 0.625 |" in md
    assert "| evaluate/default-dddd4444 | evaluate | `win_rate_ci` | [0.51, 0.73] |" in md
    assert "`answer_files`" not in md
    assert "| sft/default-cccc3333 | sft | `loss_after` | 2 |" in md


def test_report_never_imports_wandb(sweep, tmp_path):
    code = (
        "import sys; from remax.report import write_report; "
        f"write_report([{str(sweep)!r}], {str(tmp_path / 'out')!r}); "
        "print('wandb' in sys.modules)"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True
    )
    assert proc.stdout.strip() == "False"
    _check_png(tmp_path / "out" / "report.png")


def test_torn_rows_are_skipped_and_runs_are_found(sweep):
    rows = read_metrics(sweep / "remax" / "lr1-aaaa1111" / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, 21))
    runs = find_runs([sweep / "remax" / "lr1-aaaa1111", sweep / "remax"])  # duplicates dropped
    assert [r.path.name for r in runs] == ["lr1-aaaa1111", "lr2-bbbb2222"]
    assert {r.stage for r in runs} == {"remax"}


def test_no_run_dir_fails_in_one_line(tmp_path):
    proc = run_job("jobs.report", str(tmp_path), check=False)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: no run dir"), proc.stderr
