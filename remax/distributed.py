"""Rank helpers: one process per GPU (or CPU rank), started by torchrun or by Slurm tasks.

The only module that names nccl or CUDA devices (style.md §2). At world size 1 without launcher
variables every helper is a no-op, so single-process runs never touch ``torch.distributed`` and stay
bit-identical to a run without this module.

Launchers, first match wins:
- torchrun (and ``deepspeed``): ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``/``PORT``,
  trusted because ``TORCHELASTIC_RUN_ID`` (``CROSS_RANK``) says the launcher set them for this
  process (also under srun).
- Slurm job-step tasks (srun, submitit): ``SLURM_PROCID``, ``SLURM_NTASKS``, ``SLURM_LOCALID``;
  the master is the first host of ``SLURM_STEP_NODELIST`` and the port is derived from the job id,
  so every task computes the same address without talking to the others (submitit's
  ``TorchDistributedEnvironment`` does the same). Torchrun-style variables inherited from the
  submitting shell are ignored here. The values are exported as torchrun's variables, so
  DeepSpeed and ``LOCAL_RANK`` readers see one convention.
- Outside a Slurm job step, ``RANK``/``WORLD_SIZE`` set by hand.
"""

from __future__ import annotations

import os
import re
import subprocess
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int


def first_host(nodelist: str) -> str:
    """First hostname of a Slurm node list: ``gpu[03-05,09],cpu1`` → ``gpu03``.

    Slurm expands the list itself (``scontrol show hostnames``): names such as ``gpu[01-02]-ib``
    defeat hand-written patterns. Without scontrol (tests, a laptop) a parser that keeps what
    follows a bracket range answers.
    """
    try:
        out = subprocess.run(
            ["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, timeout=30
        )
        if out.returncode == 0 and out.stdout.split():
            return out.stdout.split()[0]
    except (OSError, subprocess.TimeoutExpired):
        pass
    return _first_host_fallback(nodelist)


def _first_host_fallback(nodelist: str) -> str:
    depth, first = 0, ""
    for ch in nodelist.strip():  # the first top-level item: commas inside [] belong to ranges
        depth += {"[": 1, "]": -1}.get(ch, 0)
        if ch == "," and depth == 0:
            break
        first += ch
    if not first:
        raise ValueError(f"cannot parse the Slurm node list {nodelist!r}")
    # Each bracket group becomes its first value, zero padding kept: "gpu[03-05]-ib" → "gpu03-ib".
    return re.sub(r"\[([^\]]+)\]", lambda m: m.group(1).split(",")[0].split("-")[0], first)


LAUNCHER_MARKERS = ("TORCHELASTIC_RUN_ID", "CROSS_RANK")
"""Set in every worker by torchrun (any torchelastic agent) and by DeepSpeed's launcher: their RANK,
WORLD_SIZE and MASTER_ADDR/PORT describe this very process, not a value inherited from a shell."""


def env_from_environ(environ=None) -> DistEnv | None:
    """The launcher's view of this process, or None when no launcher set one up."""
    env = os.environ if environ is None else environ
    torchrun = any(k in env for k in LAUNCHER_MARKERS)
    # Only inside a job step (srun): the batch script itself sees the allocation's SLURM_NTASKS
    # with SLURM_PROCID=0 and would wait forever for ranks that were never started.
    if not torchrun and all(k in env for k in ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_STEP_ID")):
        return _slurm_env(env)
    if "RANK" in env and "WORLD_SIZE" in env:
        return DistEnv(
            rank=int(env["RANK"]),
            world_size=int(env["WORLD_SIZE"]),
            local_rank=int(env.get("LOCAL_RANK", 0)),
            master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
            master_port=int(env.get("MASTER_PORT", 29500)),
        )
    return None


def _slurm_env(env) -> DistEnv:
    """A Slurm task's rank and rendezvous, from Slurm's variables only.

    MASTER_ADDR/PORT (and RANK/WORLD_SIZE) in the environment are ignored: sbatch exports the
    submitting shell's environment, so a value left over from an earlier torchrun on the login
    node would send every node to the wrong host (a rendezvous that hangs until the timeout) or
    two jobs on one node to one port.
    """
    job = int(env.get("SLURM_JOB_ID", "0").split("_")[0] or 0)
    # The step's node list: task 0 runs on its first node (a step may use part of the allocation).
    nodes = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or "127.0.0.1"
    return DistEnv(
        rank=int(env["SLURM_PROCID"]),
        world_size=int(env["SLURM_NTASKS"]),
        local_rank=int(env.get("SLURM_LOCALID", 0)),
        master_addr=first_host(nodes),
        # Unprivileged, and different for two jobs sharing a node (same rule on every task).
        master_port=20000 + job % 40000,
    )


def init_distributed(timeout_s: float = 1800) -> DistEnv:
    """Join the process group the launcher describes; a no-op at world size 1.

    Backend: nccl when CUDA is available (and this rank's GPU is selected), gloo on CPU.
    """
    env = env_from_environ() or DistEnv(0, 1, 0, "127.0.0.1", 29500)
    if env.world_size <= 1 or dist.is_initialized():
        return env
    for key, value in (
        ("RANK", env.rank),
        ("WORLD_SIZE", env.world_size),
        ("LOCAL_RANK", env.local_rank),
        ("MASTER_ADDR", env.master_addr),
        ("MASTER_PORT", env.master_port),
    ):
        os.environ[key] = str(value)
    if torch.cuda.is_available():
        torch.cuda.set_device(env.local_rank)
    dist.init_process_group(
        backend(), rank=env.rank, world_size=env.world_size, timeout=timedelta(seconds=timeout_s)
    )
    return env


def backend() -> str:
    """The collective backend of this machine: nccl with CUDA, gloo on CPU."""
    return "nccl" if torch.cuda.is_available() else "gloo"


def select_device(name: str) -> torch.device:
    """``cluster.device`` (auto, cpu, cuda) as this rank's device (``LOCAL_RANK`` picks the GPU)."""
    if name == "cuda" or (name == "auto" and torch.cuda.is_available()):
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def ensure_process_group() -> None:
    """A process group even at world size 1 (DeepSpeed needs one): one rank on a free port."""
    if dist.is_initialized():
        return
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # DeepSpeed reads the launcher's variables (LOCAL_RANK picks the GPU): set torchrun's.
    for key, value in (("RANK", 0), ("WORLD_SIZE", 1), ("LOCAL_RANK", 0)):
        os.environ.setdefault(key, str(value))
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(port))
    dist.init_process_group(backend(), init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def _active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if _active() else 0


def world_size() -> int:
    return dist.get_world_size() if _active() else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if _active():
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over ranks, in place; returns ``tensor`` (unchanged at world size 1)."""
    if _active():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_gather_cat(tensor: torch.Tensor) -> torch.Tensor:
    """Every rank's ``tensor`` (equal shapes) concatenated along dim 0 in rank order."""
    if not _active():
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts)


def block(items: list, pad: bool = False) -> list:
    """This rank's contiguous block of ``items`` (all of them at world size 1).

    ``pad=False``: ``len(items)`` must divide evenly (a training batch). ``pad=True``: blocks of
    ``ceil(n / N)``, the last ones filled with copies of the last item, so every rank runs the same
    number of (possibly collective) forwards; drop the padding after :func:`all_gather_cat`.
    """
    n, world = len(items), world_size()
    size = -(-n // world) if pad else n // world
    if pad:
        items = items + items[-1:] * (size * world - n)
    return items[rank() * size : (rank() + 1) * size]


def any_rank(flag: bool) -> bool:
    """True on every rank when it is true on any: collective decisions (stop, requeue)."""
    if not _active():
        return flag
    t = torch.tensor([int(flag)], device=_comm_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def agree(main_says: bool, any_says: bool) -> tuple[bool, bool]:
    """Two decisions every rank takes alike, in one collective: ``main_says`` as rank 0 decided
    it (its clock, its files), ``any_says`` true where any rank said so (a signal one rank saw)."""
    if not _active():
        return main_says, any_says
    t = torch.tensor([int(main_says and rank() == 0), int(any_says)], device=_comm_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t[0].item()), bool(t[1].item())


def all_reduce_grads(params) -> None:
    """Sum the gradients of ``params`` over ranks in one flat buffer (one collective per step).

    Summing, not averaging: each rank's loss already carries the global normaliser (the global token
    or row count), so the sum is exactly the whole batch's gradient.
    """
    if not _active():
        return
    params = [p for p in params if p.requires_grad]
    for p in params:  # a rank whose batch left a parameter unused still joins the collective
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    grads = [p.grad for p in params]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


def broadcast_params(module: torch.nn.Module) -> None:
    """Rank 0's weights on every rank: one source of truth even if initialisation differed."""
    if not _active():
        return
    with torch.no_grad():
        for t in list(module.parameters()) + list(module.buffers()):
            dist.broadcast(t.data, src=0)


def _comm_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def rank_seed(seed: int) -> int:
    """Per-rank sampling seed: ranks draw different responses, each reproducibly."""
    return seed + 1_000_003 * rank()


def micro_batch_parts(batch_size: int, micro_batch_size: int) -> list[tuple[int, slice]]:
    """This rank's parts of a global batch's micro-batches, as ``(k, rows)`` pairs.

    The global batch (``batch_size`` rows, the same on every rank) is cut into micro-batches of
    ``micro_batch_size`` rows exactly as at world size 1. Rank r owns the contiguous rows
    r·B/N … (r+1)·B/N − 1 and gets the part of every micro-batch k that falls there; a micro-batch
    larger than B/N is split over ranks. ``rows`` indexes the global batch. At world size 1 this is
    every micro-batch, whole, in order.
    """
    per_rank = batch_size // world_size()  # divisibility: TrainConfig.per_rank, at setup
    lo = rank() * per_rank
    hi = lo + per_rank
    parts = []
    for k, start in enumerate(range(0, batch_size, micro_batch_size)):
        rows = slice(max(start, lo), min(start + micro_batch_size, hi))
        if rows.start < rows.stop:
            parts.append((k, rows))
    return parts


def sum_over_ranks(values: dict[str, float]) -> dict[str, float]:
    """Each value summed over ranks in one float64 collective; ``values`` itself at world size 1.

    For metrics kept as each rank's share of a global mean, so rank 0 logs the global value.
    """
    if not _active():
        return values
    keys = list(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=_comm_device())
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return dict(zip(keys, t.tolist()))
