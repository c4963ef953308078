"""Where a stage runs (``cluster``)."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from remax.config.base import _require


class Backend(str, enum.Enum):
    local = "local"  # in this process
    slurm = "slurm"  # a Slurm job through submitit; the command returns at once


@dataclass(kw_only=True)
class ClusterConfig:
    """Where a stage runs. Cluster keys never change a run's result, so they are not part of the
    run-dir signature: the same config moves between a laptop and the cluster and resumes."""

    name: str = "local"
    """Preset name (for records and the status table)."""
    backend: Backend = Backend.local
    """``local``: run in this process. ``slurm``: submit a job (or an array for ``-m``)."""
    device: str = "auto"
    """``auto`` (cuda when available), ``cpu`` or ``cuda``."""
    num_threads: int = 0
    """torch intra-op threads on CPU; 0 keeps torch's default."""
    partition: str | None = None
    """Slurm partition; None uses the site default."""
    account: str | None = None
    """Slurm account to bill."""
    qos: str | None = None
    """Slurm quality of service."""
    nodes: int = 1
    """Nodes per job."""
    gpus_per_node: int = 0
    """GPUs per node (an A800 node has 4)."""
    tasks_per_node: int = 1
    """Processes (ranks) per node: one per GPU (``gpus_per_node``) for data parallel training,
    each started by srun with its own GPU; 1 runs one process that sees every GPU of the node."""
    cpus_per_task: int = 4
    """CPU cores per task."""
    mem_gb: int | None = None
    """Memory per node in GB; 0 = the whole node; None = the site default."""
    time_min: int = 60
    """Time limit of one job segment, minutes."""
    signal_delay_s: int = 120
    """USR2 is sent this long before the time limit: time for one step plus a checkpoint."""
    deadline_margin_s: int = 60
    """Without a signal, checkpoint when now + one step + this margin passes the job's end time."""
    max_num_timeout: int = 10
    """Requeues after hitting the time limit before giving up (submitit's countdown)."""
    max_restarts: int = 50
    """Requeues of any cause (preemptions included) before the job refuses to run again."""
    array_parallelism: int = 16
    """Array elements running at once (``%K`` of ``--array``)."""
    gres: bool = False
    """Request GPUs as ``--gres=gpu:N`` instead of ``--gpus-per-node`` (some sites accept only that)."""
    setup: list[str] = field(default_factory=list)
    """Shell lines run before the job step (``module load ...``, ``source venv/bin/activate``)."""
    gpu_hour_rate: float = 0.0
    """Price of one GPU-hour, for cost estimates and the status table."""
    currency: str = "CNY"
    """Currency of ``gpu_hour_rate``."""
    budget: float | None = None
    """Refuse a submission (or sweep) whose estimated cost exceeds this; None: no cap."""
    dry_run: bool = False
    """Print the sbatch script and the estimate; submit nothing."""
    check_memory: bool = True
    """Refuse to submit an RL stage the memory planner (``jobs.plan``) says cannot fit."""

    def __post_init__(self) -> None:
        _require(
            self.device in ("auto", "cpu", "cuda"),
            "cluster.device",
            self.device,
            "use auto, cpu or cuda",
        )
        for key in ("nodes", "tasks_per_node", "cpus_per_task", "time_min", "array_parallelism"):
            value = getattr(self, key)
            _require(value > 0, f"cluster.{key}", value, "use a positive integer")
        for key in (
            "gpus_per_node",
            "signal_delay_s",
            "deadline_margin_s",
            "max_num_timeout",
            "max_restarts",
        ):
            value = getattr(self, key)
            _require(value >= 0, f"cluster.{key}", value, "use an integer >= 0")
        _require(
            not self.gpus_per_node or self.tasks_per_node <= self.gpus_per_node,
            "cluster.tasks_per_node",
            self.tasks_per_node,
            f"use at most one task per GPU (cluster.gpus_per_node={self.gpus_per_node})",
        )
        _require(self.gpu_hour_rate >= 0, "cluster.gpu_hour_rate", self.gpu_hour_rate, "use >= 0")
        _require(
            self.budget is None or self.budget >= 0,
            "cluster.budget",
            self.budget,
            "use >= 0 or null",
        )
        _require(
            self.mem_gb is None or self.mem_gb >= 0,
            "cluster.mem_gb",
            self.mem_gb,
            "use >= 0 or null",
        )

    @property
    def gpus(self) -> int:
        return self.nodes * self.gpus_per_node

    @property
    def ranks(self) -> int:
        """Processes of a job (the world size): ``nodes`` × ``tasks_per_node``."""
        return self.nodes * self.tasks_per_node

    def estimate(self, jobs: int = 1) -> dict:
        """Upper bound for ``jobs`` job segments: every GPU for the whole time limit."""
        gpu_hours = jobs * self.gpus * self.time_min / 60
        return {
            "gpu_hours": round(gpu_hours, 3),
            "cost": round(gpu_hours * self.gpu_hour_rate, 2),
            "currency": self.currency,
        }
