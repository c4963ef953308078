"""The local Slurm cluster that the submission, requeue and preemption tests run on.

Started by `LOCAL_SLURM_NODES=2 scripts/local_slurm.sh up` (docs/local-slurm.md). These tests check the properties
the job tests rely on: accounting (sacct) sees finished jobs, fake GPUs set CUDA_VISIBLE_DEVICES, a requeued job
comes back quickly with SLURM_RESTART_COUNT=1, a step spans two nodes with their own hostnames and ranks, and
`node-down` kills exactly one node's tasks. ~20 s in all, most of it the requeue cycle.

Skipped when `sbatch` is not on PATH, except under REMAX_REQUIRE_SLURM=1 (CI, after the setup script), where a
missing Slurm is an error, so the skip cannot silently fire forever.
"""

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slurm


@pytest.fixture(scope="module", autouse=True)
def slurm_cluster():
    if shutil.which("sbatch") is None:
        msg = "sbatch not on PATH; start the cluster with `bash scripts/local_slurm.sh up`"
        if os.environ.get("REMAX_REQUIRE_SLURM") == "1":
            pytest.fail(f"{msg} (REMAX_REQUIRE_SLURM=1: Slurm tests must not be skipped)")
        pytest.skip(msg)


def run(*cmd: str, timeout: float = 60) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, (
        f"{' '.join(cmd)} -> rc={proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    )
    return proc.stdout


def sbatch(*args: str) -> str:
    """Submit and return the job id (`--parsable` prints `id` or `id;cluster`)."""
    return run("sbatch", "--parsable", "--time=2", *args).strip().split(";")[0]


def wait_for(predicate, timeout: float) -> bool:
    """Poll `predicate` every 0.2 s; True as soon as it holds, False after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


def test_sbatch_wait_completes_and_sacct_records_it(tmp_path: Path):
    out = tmp_path / "job.out"
    # --wait returns when the job has ended (it polls every 2 s). The job writes into tmp_path, so it must run as
    # the submitting user (root on the dev VM, whoever runs pytest elsewhere), not as SlurmUser.
    job_id = sbatch("--wait", f"--output={out}", "--wrap", "id -u")
    assert out.read_text().strip() == str(os.getuid())

    # The record reaches slurmdbd asynchronously, a moment after the job ends.
    def state():
        return run("sacct", "-j", job_id, "-X", "--parsable2", "-n", "-o", "State").strip()

    assert wait_for(lambda: state() == "COMPLETED", 10), f"sacct: job {job_id} is {state()!r}"


def test_fake_gpus_set_cuda_visible_devices():
    env = run("srun", "--time=1", "--gres=gpu:2", "env")
    cvd = [
        line.split("=", 1)[1]
        for line in env.splitlines()
        if line.startswith("CUDA_VISIBLE_DEVICES=")
    ]
    assert len(cvd) == 1, f"CUDA_VISIBLE_DEVICES not set; fake GPUs must be char devices:\n{env}"
    ids = cvd[0].split(",")
    assert len(ids) == 2 and len(set(ids)) == 2 and all(i.isdigit() for i in ids), cvd[0]


def test_scontrol_requeue_restarts_the_job(tmp_path: Path):
    out = tmp_path / "requeue.out"
    # --open-mode=append keeps the first run's lines; each run prints its restart count, then sleeps.
    script = 'echo "restart=${SLURM_RESTART_COUNT:-0}"; sleep 120'
    job_id = sbatch("--requeue", "--open-mode=append", f"--output={out}", "--wrap", script)
    try:

        def restarts() -> list[
            str
        ]:  # the job's own lines; slurmstepd adds "CANCELLED ... DUE TO JOB REQUEUE"
            text = out.read_text() if out.exists() else ""
            return [line for line in text.splitlines() if line.startswith("restart=")]

        assert wait_for(lambda: restarts() == ["restart=0"], 30), f"job {job_id} did not start"
        run("scontrol", "requeue", job_id)
        # SIGTERM, then PENDING(BeginTime) for cred_expire+1 = 6 s, then the next scheduler pass (sched_interval=1).
        # With Slurm's defaults this takes ~3 min: cred_expire=120 and sched_interval=60.
        assert wait_for(lambda: len(restarts()) == 2, 30), (
            f"job {job_id} not restarted: {out.read_text()}"
        )
        assert restarts() == ["restart=0", "restart=1"]
    finally:
        subprocess.run(["scancel", job_id], check=False)


def two_nodes() -> list[str]:
    """The cluster's nodes; fails under REMAX_REQUIRE_SLURM=1 (CI starts LOCAL_SLURM_NODES=2) unless there are two."""
    nodes = sorted(set(run("sinfo", "-h", "-N", "-o", "%N").split()))
    if len(nodes) < 2:
        msg = f"needs LOCAL_SLURM_NODES=2 bash scripts/local_slurm.sh up; the cluster has {nodes}"
        if os.environ.get("REMAX_REQUIRE_SLURM") == "1":
            pytest.fail(msg)
        pytest.skip(msg)
    return nodes


def test_a_two_node_step_has_per_node_hostnames_and_ranks():
    assert two_nodes() == ["node1", "node2"]
    fmt = "$(hostname) $SLURMD_NODENAME $SLURM_JOB_NODELIST $SLURM_NODEID $SLURM_LOCALID $SLURM_PROCID"
    out = run("srun", "--time=1", "-N2", "--ntasks-per-node=2", "bash", "-c", f'echo "{fmt}"')
    rows = sorted(tuple(line.split()) for line in out.splitlines())
    assert rows == [
        ("node1", "node1", "node[1-2]", "0", "0", "0"),
        ("node1", "node1", "node[1-2]", "0", "1", "1"),
        ("node2", "node2", "node[1-2]", "1", "0", "2"),
        ("node2", "node2", "node[1-2]", "1", "1", "3"),
    ], out


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/status").read_text().split("State:")[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state != "Z"  # PID 1 here may never reap: a zombie is dead


def node_state(node: str) -> str:
    return run("sinfo", "-h", "-n", node, "-o", "%T").split()[0]


def test_node_down_kills_only_that_nodes_tasks_and_node_up_brings_it_back(tmp_path: Path):
    two_nodes()
    if os.getuid() != 0 and os.environ.get("REMAX_REQUIRE_SLURM") != "1":
        pytest.skip("node-down/node-up need root")
    script = str(Path(__file__).resolve().parents[1] / "scripts" / "local_slurm.sh")
    # Each of the 4 tasks writes its pid into <hostname>.<localid>, then sleeps until killed.
    task = f"echo $$ > {tmp_path}/$(hostname).$SLURM_LOCALID; exec sleep 300"
    job_id = sbatch(
        "-N2", "--ntasks-per-node=2", "--output=/dev/null", "--wrap", f"srun bash -c '{task}'"
    )
    try:
        names = ["node1.0", "node1.1", "node2.0", "node2.1"]
        assert wait_for(lambda: all((tmp_path / n).exists() for n in names), 30), list(
            tmp_path.iterdir()
        )
        pids = {n: int((tmp_path / n).read_text()) for n in names}
        assert all(alive(p) for p in pids.values()), pids
        run("bash", script, "node-down", "node2")
        # node2's tasks are gone at once (SIGKILL); node1's keep running until Slurm notices the loss.
        assert {n: alive(p) for n, p in pids.items()} == {
            "node1.0": True,
            "node1.1": True,
            "node2.0": False,
            "node2.1": False,
        }
    finally:
        subprocess.run(["scancel", job_id], check=False)
        run("bash", script, "node-up", "node2")
    assert wait_for(lambda: node_state("node2") == "idle", 60), node_state("node2")
