"""Budget caps without a cluster: GPUs that accounting does not track, caps shared by a
pipeline's stages and a sweep's elements, an sacct outage when a segment starts, and the memory
an evaluation asks for.

``sbatch``, ``sacct`` and ``scontrol`` are shims on PATH; costs use ``cluster=local_slurm``
(1 GPU, 20 min segments, 1.0 CNY per GPU-hour: one segment's upper bound is 0.33).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_login_node import _shim

from jobs._config import compose_stage
from jobs._costs import SacctError, allocated_gpus, over_budget, run_cost, sacct_segments
from jobs._submit import StageJob, render_template, sbatch_params
from remax.preemption import EXIT_REQUEUED

EVAL = ["cluster=slurm_a800", "policies=[runs/remax/x/export]"]
SEGMENT = 1 / 3  # 1 GPU × 20 min × 1.0 per GPU-hour


@pytest.fixture(autouse=True)
def _no_training(monkeypatch):
    """A StageJob whose budget check lets it through fails here instead of training."""
    import jobs._stage

    monkeypatch.setattr(jobs._stage, "run_stage", lambda *a, **k: pytest.fail("segment ran"))


def _sacct(tmp_path, monkeypatch, rows: list[str]) -> None:
    """An sacct that prints ``rows`` (``job|state|elapsed_s|AllocTRES``) whatever it is asked."""
    _shim(tmp_path, monkeypatch, "sacct", "".join(f"echo '{r}'\n" for r in rows))


def _sbatch(tmp_path, monkeypatch) -> None:
    """An sbatch that answers job ids 101, 102, ... as submitit parses them."""
    counter = tmp_path / "next_job"
    counter.write_text("101")
    _shim(
        tmp_path,
        monkeypatch,
        "sbatch",
        f'n=$(cat {counter}); echo $((n + 1)) > {counter}; echo "Submitted batch job $n"',
    )


def _config(tmp_path, stage="remax", *extra):
    return compose_stage(
        stage, ["cluster=local_slurm", f"run.root={tmp_path / 'runs'}", "cluster.budget=2", *extra]
    )


def _record(run_dir: Path, job_id: str, scope: Path | None = None) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    record = {"job_id": job_id, "gpus": 1, "gpu_hour_rate": 1.0, "time_min": 20}
    record["budget_scope"] = str(scope) if scope else None
    with open(run_dir / "submissions.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")


# ------------------------------------------------------------------ GPUs accounting did not see
def test_a_segment_without_gpu_tres_is_billed_for_the_gpus_its_job_asked(tmp_path, monkeypatch):
    # A site whose AccountingStorageTRES lacks gres/gpu: the GPUs are unknown, not 0.
    assert allocated_gpus("billing=4,cpu=32,mem=500G,node=1") is None
    assert allocated_gpus("billing=4,cpu=32,gres/gpu=4,mem=500G,node=1") == 4
    _sacct(tmp_path, monkeypatch, ["7|COMPLETED|3600|billing=4,cpu=32,mem=500G,node=1"])
    segments = sacct_segments(["7"])
    # 1 h on the 4 GPUs the job asked for, at 3.5 per GPU-hour: 4 GPU-h, 14.0.
    assert run_cost([{"job_id": "7", "gpus": 4, "gpu_hour_rate": 3.5}], segments) == (4.0, 14.0)
    # ...so the cap trips: 1 h on 1 GPU at 1.0 = 1.0 spent, + 1.5 > 2.
    run_dir = tmp_path / "run"
    _record(run_dir, "7")
    cluster = _config(tmp_path).cluster
    assert "exceed cluster.budget=2" in over_budget(run_dir, cluster, 1.5)
    assert over_budget(run_dir, cluster, 0.9) is None


# ------------------------------------------------------------------ caps shared by several runs
def test_pipeline_records_one_scope_and_its_cap_is_cumulative_at_segment_start(
    tmp_path, monkeypatch, capsys
):
    from jobs import _budget, pipeline

    _sbatch(tmp_path, monkeypatch)
    _sacct(tmp_path, monkeypatch, [])  # nothing has run yet
    root = tmp_path / "runs"
    summary = pipeline.main(["cluster=local_slurm", f"run.root={root}", "cluster.budget=2"])
    records = summary["jobs"]
    run_dirs = sorted(r["run_dir"] for r in records)
    assert [r["job_id"] for r in records] == ["101", "102", "103", "104"]
    scopes = {r["budget_scope"] for r in records}
    assert len(scopes) == 1
    scope = json.loads(Path(scopes.pop()).read_text())
    assert scope["cap"] == 2 and scope["run_dirs"] == run_dirs
    # ReMax (job 103) starts: SFT ran 60 min (1.0), the reward model 50 min (0.83). Each run
    # alone is under 2, the pipeline is not: 1.83 + one ReMax segment (0.33) = 2.17 > 2.
    _sacct(
        tmp_path,
        monkeypatch,
        ["101|COMPLETED|3600|gres/gpu=1", "102|COMPLETED|3000|gres/gpu=1", "103|RUNNING|5|"],
    )
    remax = next(r for r in records if r["stage"] == "remax")
    cluster = _config(tmp_path).cluster
    decision = _budget.decide(remax["run_dir"], cluster, SEGMENT, job_id="103")
    assert decision.action == "stop"
    assert "has cost 1.83 CNY" in decision.reason and "pipeline-" in decision.reason
    # 40 min of the reward model instead: 1.67 + 0.33 = 2.0 fits.
    _sacct(tmp_path, monkeypatch, ["101|COMPLETED|3600|gres/gpu=1", "102|COMPLETED|2400|"])
    assert _budget.decide(remax["run_dir"], cluster, SEGMENT, job_id="103").action == "run"


def test_stage_job_over_its_scopes_cap_ends_before_running(tmp_path, monkeypatch, capsys):
    """The submitit path: a segment over the shared cap fails at once (no requeue, no training)."""
    from jobs import _budget
    from remax.run_dir import run_dir_for

    config = _config(tmp_path, "sft")
    run_dir = run_dir_for(config, "sft")
    others = [tmp_path / "runs" / "remax" / "a", tmp_path / "runs" / "remax" / "b"]
    scope = tmp_path / "runs" / "budgets" / "pipeline-x.json"
    scope.parent.mkdir(parents=True)
    members = sorted(str(d) for d in [run_dir, *others])
    scope.write_text(json.dumps({"name": "pipeline-x", "cap": 1.7, "run_dirs": members}))
    for d, job in zip([run_dir, *others], ["7", "8", "9"]):
        _record(d, job, scope)
    # 8 ran 60 min (1.0); 9 is running elsewhere: counted for its whole 20 min (0.33), not the
    # 60 s it has run; 7 (this job) is replaced by its own upper bound. 1.33 + 0.33 = 1.67 fits.
    rows = ["7|RUNNING|1|gres/gpu=1", "8|COMPLETED|3600|gres/gpu=1", "9|RUNNING|60|gres/gpu=1"]
    _sacct(tmp_path, monkeypatch, rows)
    monkeypatch.setenv("SLURM_JOB_ID", "7")
    monkeypatch.setenv("SLURM_PROCID", "0")
    assert _budget.decide(run_dir, config.cluster, SEGMENT, job_id="7").action == "run"
    # 7's own earlier segment ran 3 min (0.05): 1.38 + 0.33 = 1.72 > 1.7. (Counting 9 at its 60 s
    # would give 1.07 + 0.33 = 1.4 and run past the cap if 9 runs to its limit.)
    _sacct(tmp_path, monkeypatch, [*rows, "7|REQUEUED|180|gres/gpu=1"])
    with pytest.raises(RuntimeError, match=r"pipeline-x \(3 runs\) has cost 1.38 CNY"):
        StageJob("sft", config)()
    assert "error: pipeline-x (3 runs) has cost 1.38" in capsys.readouterr().err


def test_sweep_elements_share_the_cap_and_a_spent_sweep_is_not_resubmitted(
    tmp_path, monkeypatch, capsys
):
    from jobs import _budget
    from jobs._submit import submit_array
    from jobs._sweep import sweep_configs

    _sbatch(tmp_path, monkeypatch)
    _shim(tmp_path, monkeypatch, "squeue", "exit 0")
    configs = sweep_configs(
        "sft",
        [
            "cluster=local_slurm",
            f"run.root={tmp_path / 'runs'}",
            "cluster.budget=1.5",
            "seed=1,2,3",
        ],
    )
    records = submit_array("sft", configs, sweep_id="sft-sweep-x")
    assert [r["job_id"] for r in records] == ["101_0", "101_1", "101_2"]
    scope = json.loads(Path(records[0]["budget_scope"]).read_text())
    assert scope["cap"] == 1.5 and scope["run_dirs"] == sorted(r["run_dir"] for r in records)
    # Element 0 is requeued: element 2 has run 60 min (1.0), element 1 is running (0.33 for its
    # time limit): 1.33 + 0.33 = 1.67 > 1.5, though element 0 alone has spent nothing.
    rows = ["101_1|RUNNING|30|gres/gpu=1", "101_2|COMPLETED|3600|gres/gpu=1"]
    _sacct(tmp_path, monkeypatch, rows)
    cluster = configs[0].cluster
    decision = _budget.decide(records[0]["run_dir"], cluster, SEGMENT, job_id="101_0")
    assert decision.action == "stop" and "sft-sweep-x (3 runs) has cost 1.33" in decision.reason
    # Resubmitting the sweep (elements 0 and 1 ended): 1.33 spent + 2 × 0.33 > 1.5, refused.
    _sacct(tmp_path, monkeypatch, ["101_1|CANCELLED|30|", "101_2|COMPLETED|3600|"])
    with pytest.raises(SystemExit) as exit_:
        submit_array("sft", configs, sweep_id="sft-sweep-x")
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "error: sft-sweep-x (3 runs) has cost 1.01" in err and "nothing was submitted" in err


# ------------------------------------------------------------------ sacct outage at segment start
def _capped_run(tmp_path) -> Path:
    run_dir = tmp_path / "run"
    _record(run_dir, "7")
    return run_dir


def test_sacct_outage_at_segment_start_retries_then_requeues(tmp_path):
    from jobs import _budget

    run_dir, cluster = _capped_run(tmp_path), _config(tmp_path).cluster
    calls, waits = [], []

    def down(job_ids):
        calls.append(job_ids)
        raise SacctError("sacct failed (rc 1: slurmdbd not responding)")

    decision = _budget.decide(run_dir, cluster, SEGMENT, job_id="7", sacct=down, sleep=waits.append)
    assert decision.action == "requeue" and "slurmdbd not responding" in decision.reason
    assert len(calls) == 3 and waits == [_budget.RETRY_WAIT_S, 2 * _budget.RETRY_WAIT_S]

    def back_on_third_try(job_ids):
        if len(calls) < 5:
            return down(job_ids)
        calls.append(job_ids)
        return {"7": [{"state": "RUNNING", "elapsed_s": 9, "gpus": 1}]}

    decision = _budget.decide(
        run_dir, cluster, SEGMENT, job_id="7", sacct=back_on_third_try, sleep=waits.append
    )
    assert decision.action == "run" and len(calls) == 6


def test_check_segment_requeues_on_an_outage_and_fails_only_if_the_requeue_fails(
    tmp_path, monkeypatch
):
    from jobs import _budget

    run_dir, cluster = _capped_run(tmp_path), _config(tmp_path).cluster

    def down(job_ids):
        raise SacctError("sacct failed (timed out)")

    kw = {"job_id": "7", "sacct": down, "sleep": lambda s: None}
    monkeypatch.setenv("SLURM_PROCID", "0")
    with pytest.raises(SystemExit) as exit_:
        _budget.check_segment(run_dir, cluster, SEGMENT, requeue=lambda: True, **kw)
    assert exit_.value.code == EXIT_REQUEUED
    with pytest.raises(RuntimeError, match="scontrol requeue` failed too"):
        _budget.check_segment(run_dir, cluster, SEGMENT, requeue=lambda: False, **kw)
    # Other ranks leave the decision to rank 0: no sacct query, no requeue of their own.
    monkeypatch.setenv("SLURM_PROCID", "1")
    assert _budget.check_segment(run_dir, cluster, SEGMENT, requeue=pytest.fail, **kw) is None


def test_stage_job_requeues_itself_when_sacct_is_down(tmp_path, monkeypatch):
    from jobs import _budget

    config = _config(tmp_path, "sft")
    from remax.run_dir import run_dir_for

    _record(run_dir_for(config, "sft"), "7")
    _shim(tmp_path, monkeypatch, "sacct", "echo 'slurmdbd: connection refused' >&2; exit 1")
    log = tmp_path / "scontrol.log"
    _shim(tmp_path, monkeypatch, "scontrol", f'echo "$@" >> {log}')
    monkeypatch.setattr(_budget, "RETRY_WAIT_S", 0.0)
    monkeypatch.setenv("SLURM_JOB_ID", "7")
    monkeypatch.setenv("SLURM_PROCID", "0")
    with pytest.raises(SystemExit) as exit_:
        StageJob("sft", config)()
    assert exit_.value.code == EXIT_REQUEUED
    assert log.read_text().splitlines() == ["requeue Incomplete 7"]


# ------------------------------------------------------------------ evaluation memory
def test_evaluate_on_a800_asks_for_its_gpus_share_of_the_node_memory(tmp_path):
    config = compose_stage("evaluate", [*EVAL, f"run.root={tmp_path}"])
    evaluate = sbatch_params("evaluate", config.cluster)
    # One of the node's 4 GPUs: a quarter of its 500 GB, never --mem=0 (the whole node).
    assert evaluate["mem"] == "125GB"
    assert sbatch_params("remax", config.cluster)["mem"] == "0GB"  # 4 GPUs: the whole node
    script = render_template("single_node", "evaluate", config, [])
    assert "#SBATCH --mem=125GB" in script and "--mem=0" not in script


def test_evaluate_with_whole_node_memory_and_no_node_size_is_refused(tmp_path, capsys):
    config = compose_stage("evaluate", [*EVAL, "cluster.node_mem_gb=null"])
    with pytest.raises(SystemExit) as exit_:
        sbatch_params("evaluate", config.cluster)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: cluster.mem_gb=0") and "cluster.node_mem_gb=" in err
