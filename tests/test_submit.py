"""Submission logic that needs no cluster: deadline stops, sbatch parameters, sweep ids."""

from __future__ import annotations

import time

from jobs._config import compose_stage
from jobs._main import sweep_id
from jobs._submit import sbatch_params
from remax.preemption import StopRequest


def test_deadline_stop_fires_when_one_more_step_would_not_fit():
    stop = StopRequest(end_time=time.time() + 10, margin_s=2)
    stop.observe(3.0)
    assert not stop.requested  # now + 3 + 2 < end
    stop.observe(9.0)
    assert stop.requested  # now + 9 + 2 >= end: checkpoint now, before the limit kills the job


def test_signal_stop_and_no_deadline():
    stop = StopRequest(end_time=None, margin_s=60)
    stop.observe(1e6)
    assert not stop.requested
    stop.on_signal()
    assert stop.requested


def test_slurm_a800_parameters():
    cfg = compose_stage(
        "remax", ["cluster=slurm_a800", "cluster.partition=gpu", "cluster.account=lab"]
    )
    p = sbatch_params("remax", cfg.cluster)
    assert (
        p["gpus_per_node"] == 4
        and p["nodes"] == 1
        and p["partition"] == "gpu"
        and p["account"] == "lab"
    )
    assert p["additional_parameters"]["requeue"] is True
    assert p["mem"] == "0GB" and p["signal_delay_s"] == 300
    two = compose_stage("remax", ["cluster=slurm_a800", "cluster.nodes=2"]).cluster
    assert two.gpus == 8 and two.estimate()["gpu_hours"] == 8 * 24
    gres = sbatch_params(
        "remax", compose_stage("remax", ["cluster=slurm_a800", "cluster.gres=true"]).cluster
    )
    assert gres["gres"] == "gpu:4" and "gpus_per_node" not in gres


def test_sweep_id_is_stable_and_order_free():
    a = sweep_id("remax", ["-m", "optim.lr=1e-4,5e-5", "algo.kl_coef=0.1,0.2"])
    b = sweep_id("remax", ["algo.kl_coef=0.1,0.2", "optim.lr=1e-4,5e-5", "-m"])
    assert a == b and a.startswith("remax-sweep-")
