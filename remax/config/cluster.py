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
    """torch intra-op threads. 0: in a Slurm job step, the task's CPUs (``SLURM_CPUS_PER_TASK``,
    i.e. ``cpus_per_task``); elsewhere torch's default. torch's default is every core it can see,
    and where Slurm does not bind tasks to CPUs (``TaskPlugin=task/none``) each of a node's ranks
    then spins that many threads: four ranks on two cores took 3 s a tiny step instead of 0.2 s."""
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
    node_mem_gb: int | None = None
    """Memory of one node in GB (what ``mem_gb=0`` stands for). A stage that runs on one of the
    node's GPUs (evaluate) asks for its per-GPU share of it instead of the whole node; needed
    when ``mem_gb=0`` and ``gpus_per_node > 1`` (``sinfo -o %m`` prints it in MB)."""
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
    watchdog_s: int = 900
    """Hang watchdog: floor of every phase's budget (startup: twice this), seconds; 0 disables.
    A phase's budget is max(this, ``watchdog_factor`` × the longest that phase took so far)."""
    watchdog_factor: float = 4.0
    """Multiple of a phase's longest measured time that still counts as progress."""
    max_failure_requeues: int = 2
    """Requeues after a hang or a lost node before the job stops (each away from that node)."""
    exclude_failed_node: bool = True
    """Requeue a hung or failed job with the node in ``--exclude`` (off on one-node clusters)."""
    no_progress_segments: int = 3
    """Stop when this many segments in a row published no new checkpoint; 0 disables."""
    array_parallelism: int = 16
    """Array elements running at once (``%K`` of ``--array``)."""
    exclude: str | None = None
    """Nodes never to run on (``--exclude``, a Slurm node list such as ``gpu[03,07]``)."""
    constraint: str | None = None
    """Node features required (``--constraint``, e.g. ``a800&ib``)."""
    reservation: str | None = None
    """Slurm reservation to run in (``--reservation``)."""
    mail_type: str | None = None
    """When Slurm mails ``mail_user`` (``--mail-type``, e.g. ``END,FAIL,REQUEUE``)."""
    mail_user: str | None = None
    """Address for ``mail_type`` mails (``--mail-user``)."""
    sbatch_extra: dict[str, str] = field(default_factory=dict)
    """Free-form sbatch parameters, ``{option_with_underscores: value}``, e.g. ``{gpu_bind: closest}``."""
    gres: bool = False
    """Request GPUs as ``--gres=gpu:N`` instead of ``--gpus-per-node`` (some sites accept only that)."""
    setup: list[str] = field(default_factory=list)
    """Shell lines run before the job step (``module load ...``, ``source venv/bin/activate``)."""
    gpu_hour_rate: float = 0.0
    """Price of one GPU-hour, for cost estimates and the status table."""
    billing_granularity_s: int = 1
    """Each job segment is billed in whole units of this many seconds (a site billing per started
    hour uses 3600): the status table and the budget caps round every segment up to it."""
    currency: str = "CNY"
    """Currency of ``gpu_hour_rate``."""
    budget: float | None = None
    """Cost cap, None: no cap. Bounds one run across all its requeues and resubmissions, and a
    pipeline's stages (the first stage's value) or a sweep's elements all together: checked at
    submission (estimates, and what was spent) and again when each segment starts, which ends
    the job instead of running a segment that could cross it (``jobs._budget``)."""
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
        for key in (
            "nodes",
            "tasks_per_node",
            "cpus_per_task",
            "time_min",
            "array_parallelism",
            "billing_granularity_s",
        ):
            value = getattr(self, key)
            _require(value > 0, f"cluster.{key}", value, "use a positive integer")
        for key in (
            "gpus_per_node",
            "signal_delay_s",
            "deadline_margin_s",
            "max_num_timeout",
            "max_restarts",
            "watchdog_s",
            "max_failure_requeues",
            "no_progress_segments",
        ):
            value = getattr(self, key)
            _require(value >= 0, f"cluster.{key}", value, "use an integer >= 0")
        _require(
            not self.gpus_per_node or self.tasks_per_node <= self.gpus_per_node,
            "cluster.tasks_per_node",
            self.tasks_per_node,
            f"use at most one task per GPU (cluster.gpus_per_node={self.gpus_per_node})",
        )
        _require(
            self.watchdog_factor >= 1,
            "cluster.watchdog_factor",
            self.watchdog_factor,
            "use >= 1 (a phase may take as long as it took before)",
        )
        _require(
            self.mail_user is None or bool(self.mail_type),
            "cluster.mail_type",
            self.mail_type,
            "set cluster.mail_type (e.g. END,FAIL) with cluster.mail_user, or drop mail_user",
        )
        _require(self.gpu_hour_rate >= 0, "cluster.gpu_hour_rate", self.gpu_hour_rate, "use >= 0")
        for key in ("budget", "mem_gb"):
            value = getattr(self, key)
            _require(value is None or value >= 0, f"cluster.{key}", value, "use >= 0 or null")
        _require(
            self.node_mem_gb is None or self.node_mem_gb > 0,
            "cluster.node_mem_gb",
            self.node_mem_gb,
            "use a positive number of GB or null",
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
