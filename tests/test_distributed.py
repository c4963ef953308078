"""Data parallelism (spec test 20): 2 ranks × B/2 make the same update as 1 rank × B.

Ranks are real processes (``torch.multiprocessing`` spawn, gloo on CPU). The equivalence needs the
same responses on both sides, so the rollout is decoded once, here, and each rank is handed its
block of it; what is under test is everything after decoding: the global token normaliser, the
gradient all-reduce, and the step. A variant that normalises per rank is run too and must differ,
so the test would catch a per-rank ``mask.sum()``.
"""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
from conftest import one_thread

from remax import distributed
from remax.config import (
    Aggregation,
    DataConfig,
    LogConfig,
    ModelConfig,
    OptimConfig,
    RemaxAlgoConfig,
    RemaxJobConfig,
    TrainConfig,
    WandbMode,
)
from remax.preemption import StopRequest

B = 8


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(fn, world: int, *args) -> None:
    """Run ``fn(rank, world, port, *args)`` on ``world`` gloo ranks; raises if any rank fails.

    The ranks are fresh processes forked by a fork server that imported the heavy modules once
    (``conftest.start_method``): each rank starts in milliseconds instead of re-importing torch,
    transformers and DeepSpeed (seconds of CPU each on the 2-core CI machine)."""
    from conftest import start_method

    env = dict(os.environ)  # as a spawned child would inherit it, not the server's
    mp.start_processes(
        _entry, args=(fn, world, free_port(), args, env), nprocs=world, start_method=start_method()
    )


def in_turn(rank: int, world: int, fn, runs: list[tuple]) -> None:
    """``fn(rank, world, *args)`` for each ``args`` of ``runs`` in the same ranks: one process
    start (imports, rendezvous) for a reference run and the run stopped beside it."""
    for args in runs:
        fn(rank, world, *args)


def _entry(rank: int, fn, world: int, port: int, args, env: dict) -> None:
    os.environ.clear()
    os.environ.update(env)
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_VERBOSITY="error",
    )
    torch.set_num_threads(1)  # same kernels, same summation order as the 1-rank side
    distributed.init_distributed(timeout_s=300)
    try:
        fn(rank, world, *args)
    finally:
        from remax.engines import close_all

        close_all()  # as jobs._stage does: a ZeRO-3 engine alive at exit can abort the process
        distributed.shutdown()


def config(aggregation: Aggregation, micro: int = B // 2) -> RemaxJobConfig:
    return RemaxJobConfig(
        model=ModelConfig(hidden_size=32, intermediate_size=64),
        data=DataConfig(num_train=64, num_eval=64, max_response_len=8),
        # micro = B/2: the 1-rank side accumulates the same two halves the two ranks compute.
        train=TrainConfig(batch_size=B, micro_batch_size=micro, max_steps=4),
        # No clipping, so Adam's first moment is exactly 0.1 × the gradient and can be compared.
        optim=OptimConfig(lr=1e-3, grad_clip=0.0),
        log=LogConfig(wandb_mode=WandbMode.disabled, progress=False),
        algo=RemaxAlgoConfig(aggregation=aggregation, kl_coef=0.05),
        eval_prompts=64,
    )


def shorten(rollout, tokenizer, lengths: dict[int, int]):
    """End row i with EOS after ``lengths[i]`` tokens: an untrained tiny model rarely stops, and
    blocks of equal token counts could not tell per-rank from global normalisation."""
    response, mask = rollout.response.clone(), rollout.response_mask.clone()
    for i, n in lengths.items():
        response[i, n - 1] = tokenizer.eos_token_id
        response[i, n:] = tokenizer.pad_token_id
        mask[i, n:] = False
    return rollout._replace(response=response, response_mask=mask)


def one_step(cfg, sampled, greedy, per_rank_norm: bool = False) -> dict:
    """This rank's block of a given rollout through ``RemaxTrainer.update``; weights and grads."""
    from remax.trainers.remax import RemaxTrainer

    trainer = RemaxTrainer(cfg)
    rows = trainer.shard(list(range(sampled.response.shape[0])))
    block = slice(rows[0], rows[-1] + 1)
    if per_rank_norm:  # the bug the global normaliser prevents: each rank divides by its own count
        token_mean = cfg.algo.aggregation == Aggregation.token_mean
        trainer.denominator = lambda mask: mask.sum() if token_mean else mask.shape[0]
    metrics = trainer.update(sampled.select(block), greedy.select(block))
    state = trainer.optimizer.state
    return {
        "params": {n: p.detach().clone() for n, p in trainer.model.named_parameters()},
        "grads": {
            n: state[p]["exp_avg"].clone() / 0.1 for n, p in trainer.model.named_parameters()
        },
        "metrics": metrics,
        "tokens": int(trainer.setup.train_mask(sampled.select(block)).sum()),
    }


def single_rank_side(cfg, step=None):
    """The one-rank side of a ranks-against-one check, at 1 thread (the ranks' setting: same
    kernels, same summation order): a fixed rollout of the first batch (seed 123; rows 0–2 cut to
    2, 3 and 5 tokens, so rank blocks hold unequal token counts) and ``step`` (default
    :func:`one_step`) on it. Returns ``(probe trainer, sampled, greedy, step's result)``."""
    from remax.trainers.remax import RemaxTrainer

    with one_thread():
        probe = RemaxTrainer(cfg)
        prompts = [probe.setup.prompts.train[i] for i in probe.sampler.next_indices()]
        with torch.random.fork_rng():
            torch.manual_seed(123)
            sampled, greedy = probe.rollout(prompts)
        sampled = shorten(sampled, probe.tokenizer, {0: 2, 1: 3, 2: 5})
        return probe, sampled, greedy, (step or one_step)(cfg, sampled, greedy)


def _two_rank_step(rank, world, cfg, sampled, greedy, out_dir) -> None:
    for per_rank in (False, True):
        result = one_step(cfg, sampled, greedy, per_rank_norm=per_rank)
        torch.save(result, f"{out_dir}/rank{rank}_{'per_rank' if per_rank else 'global'}.pt")


def _max_diff(a: dict, b: dict) -> float:
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.mark.parametrize("aggregation", [Aggregation.token_mean, Aggregation.seq_sum])
def test_two_ranks_match_one_rank(tmp_path, aggregation):

    cfg = config(aggregation)
    probe, sampled, greedy, single = single_rank_side(cfg)
    advantages = probe.setup.rewards(sampled) - probe.setup.rewards(greedy)
    assert advantages.abs().sum() > 0, "a zero-advantage rollout would make the check vacuous"

    spawn(_two_rank_step, 2, cfg, sampled, greedy, str(tmp_path))
    ranks = [torch.load(tmp_path / f"rank{r}_global.pt", weights_only=True) for r in (0, 1)]
    per_rank = [torch.load(tmp_path / f"rank{r}_per_rank.pt", weights_only=True) for r in (0, 1)]

    # The two blocks hold different token counts, so per-rank and global normalisation disagree.
    assert ranks[0]["tokens"] != ranks[1]["tokens"]
    assert ranks[0]["tokens"] + ranks[1]["tokens"] == single["tokens"]
    # All ranks keep identical weights (bit-for-bit: they stepped on the same all-reduced gradient).
    assert _max_diff(ranks[0]["params"], ranks[1]["params"]) == 0.0
    # 2 ranks × B/2 == 1 rank × B. Both sides add the same two fp32 half-batch gradients (a + b is
    # commutative, so the all-reduce order cannot matter); we allow 1e-6 absolute (weights are
    # O(0.1), one Adam step moves them by ~lr = 1e-3) for a summation-order change in gloo.
    assert _max_diff(ranks[0]["grads"], single["grads"]) <= 1e-6
    assert _max_diff(ranks[0]["params"], single["params"]) <= 1e-6
    print(
        f"{aggregation.value}: max |Δgrad| {_max_diff(ranks[0]['grads'], single['grads']):.3g}, "
        f"max |Δparam| {_max_diff(ranks[0]['params'], single['params']):.3g}, per-rank-normalised "
        f"max |Δgrad| {_max_diff(per_rank[0]['grads'], single['grads']):.3g}"
    )
    for key in ("reward/mean", "loss/policy", "optim/grad_norm"):
        assert ranks[0]["metrics"][key] == pytest.approx(single["metrics"][key], rel=1e-6)
    # Per-rank normalisation gives another gradient: the check above has teeth.
    wrong = _max_diff(per_rank[0]["grads"], single["grads"])
    scale = max(float(g.abs().max()) for g in single["grads"].values())
    if aggregation == Aggregation.token_mean:
        assert wrong > 1e-2 * scale
    else:  # per-rank row count B/2 instead of B: exactly twice the gradient
        for k, g in single["grads"].items():
            torch.testing.assert_close(per_rank[0]["grads"][k], 2 * g, rtol=1e-5, atol=1e-8)


def test_world_size_must_divide_the_batch(monkeypatch):
    from remax.trainers.remax import RemaxTrainer

    monkeypatch.setattr(distributed, "world_size", lambda: 3)
    with pytest.raises(ValueError, match=r"train.batch_size=8.* world size 3"):
        RemaxTrainer(config(Aggregation.token_mean))


def test_launcher_environment():
    torchrun = {
        "RANK": "3",
        "WORLD_SIZE": "4",
        "LOCAL_RANK": "1",
        "MASTER_ADDR": "n1",
        "MASTER_PORT": "1234",
        "TORCHELASTIC_RUN_ID": "none",
    }
    assert distributed.env_from_environ(torchrun) == distributed.DistEnv(3, 4, 1, "n1", 1234)
    slurm = {
        "SLURM_PROCID": "5",
        "SLURM_NTASKS": "8",
        "SLURM_LOCALID": "1",
        "SLURM_JOB_NODELIST": "gpu[03-05,09],cpu1",
        "SLURM_JOB_ID": "4242",
        "SLURM_STEP_ID": "0",
    }
    env = distributed.env_from_environ(slurm)
    assert (env.rank, env.world_size, env.local_rank, env.master_addr) == (5, 8, 1, "gpu03")
    assert env.master_port == 20000 + 4242
    assert distributed.env_from_environ({**slurm, **torchrun}).rank == 3  # torchrun (under srun)
    assert distributed.env_from_environ({}) is None
    batch_script = {k: v for k, v in slurm.items() if k != "SLURM_STEP_ID"}
    assert distributed.env_from_environ(batch_script) is None  # not a task of a job step
    assert distributed.first_host("node7") == "node7"
    # No launcher: world size 1, nothing initialised.
    assert distributed.world_size() == 1 and distributed.rank() == 0 and distributed.is_main()


def test_slurm_ignores_a_rendezvous_inherited_from_the_login_shell():
    # sbatch exports the submitting shell: a stale torchrun setup there must not steer the ranks.
    stale = {"MASTER_ADDR": "login3", "MASTER_PORT": "29500", "RANK": "0", "WORLD_SIZE": "1"}
    slurm = {
        "SLURM_PROCID": "2",
        "SLURM_NTASKS": "4",
        "SLURM_LOCALID": "0",
        "SLURM_STEP_ID": "0",
        "SLURM_JOB_ID": "61234",
        "SLURM_JOB_NODELIST": "node[01-03,07],gpu5",
        "SLURM_STEP_NODELIST": "node[02-03,07],gpu5",  # the step runs on part of the allocation
    }
    env = distributed.env_from_environ({**stale, **slurm})
    assert (env.rank, env.world_size) == (2, 4)
    assert env.master_addr == "node02"  # the step's first node, not login3 nor node01
    assert env.master_port == 20000 + 61234 % 40000  # 41234: the job's own, not 29500
    other = distributed.env_from_environ({**stale, **slurm, "SLURM_JOB_ID": "61235"})
    assert other.master_port == env.master_port + 1  # two jobs on one node: two ports
    no_step_list = {k: v for k, v in slurm.items() if k != "SLURM_STEP_NODELIST"}
    assert distributed.env_from_environ(no_step_list).master_addr == "node01"


class StopAfter(StopRequest):
    """A stop request that turns true at the ``k``-th step boundary (what USR2 does at scale)."""

    def __init__(self, k: int) -> None:
        super().__init__()
        self.k, self.seen = k, 0

    @property
    def requested(self) -> bool:
        self.seen += 1
        return self.seen >= self.k


class CrashAfter(StopAfter):
    """Rank 1 dies at the ``k``-th step boundary, with no checkpoint (rank 0 is then killed by
    the launcher while it waits in the next collective)."""

    @property
    def requested(self) -> bool:
        self.seen += 1
        if self.seen >= self.k and distributed.rank() == 1:
            raise RuntimeError("simulated crash of rank 1")
        return False


def _run_stage(rank, world, cfg, stop_after, crash=False) -> None:
    from jobs._stage import run_stage

    stop = (CrashAfter if crash else StopAfter)(stop_after) if stop_after else None
    run_stage("remax", cfg, stop=stop)


def _resume_config(root) -> RemaxJobConfig:
    from remax.config import CheckpointConfig, RunConfig

    cfg = config(Aggregation.token_mean, micro=2)
    cfg.run = RunConfig(root=str(root))
    cfg.train = TrainConfig(batch_size=B, micro_batch_size=2, max_steps=5, log_every=1)
    cfg.checkpoint = CheckpointConfig(every_steps=2, keep_last=2)
    cfg.optim = OptimConfig(lr=1e-2)
    return cfg


def test_two_rank_stop_and_resume_is_bit_identical(tmp_path):
    import json

    from safetensors.torch import load_file

    from remax.checkpoint import CheckpointManager
    from remax.run_dir import run_dir_for

    ref_cfg, cfg = _resume_config(tmp_path / "a"), _resume_config(tmp_path / "b")
    # The reference, then the run stopped at the boundary after step 3 (checkpointed).
    spawn(in_turn, 2, _run_stage, [(ref_cfg, 0), (cfg, 3)])
    ref_dir, run_dir = run_dir_for(ref_cfg, "remax"), run_dir_for(cfg, "remax")
    step3 = run_dir / "checkpoints" / "step_3"
    assert (step3 / "COMPLETE").is_file() and not (run_dir / "summary.json").exists()
    state = torch.load(step3 / "state.pt", weights_only=True)
    own = torch.load(step3 / "state_rank1.pt", weights_only=True)
    assert state["world_size"] == 2 and set(own) == {"rng"}
    assert not torch.equal(state["rng"]["torch"], own["rng"]["torch"]), "ranks share one stream"
    assert not list((run_dir / "checkpoints").glob(".tmp_*"))
    spawn(_run_stage, 2, cfg, 0)  # resumed

    # A crash of one rank after step 3: the run restarts from the periodic step_2 checkpoint.
    crash_cfg = _resume_config(tmp_path / "c")
    with pytest.raises(Exception, match="simulated crash"):
        spawn(_run_stage, 2, crash_cfg, 3, True)
    crash_dir = run_dir_for(crash_cfg, "remax")
    assert CheckpointManager(crash_dir / "checkpoints").complete_steps() == [2]
    # One event, one record, naming the rank that raised (not rank 0's "connection closed").
    records = [json.loads(x) for x in (crash_dir / "failures.jsonl").read_text().splitlines()]
    assert [(r["class"], r["rank"]) for r in records] == [("exception", 1)]
    assert "simulated crash" in records[0]["reason"]
    spawn(_run_stage, 2, crash_cfg, 0)

    for other in (run_dir, crash_dir):
        wa, wb = (load_file(d / "export" / "model.safetensors") for d in (ref_dir, other))
        assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    sa, sb = (json.loads((d / "summary.json").read_text()) for d in (ref_dir, run_dir))
    assert sa["eval"] == sb["eval"] and sa["world_size"] == sb["world_size"] == 2
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]  # one writer (rank 0), no duplicates
    ref_rows = [json.loads(x) for x in (ref_dir / "metrics.jsonl").read_text().splitlines()]
    drop = ("time/step_s",)
    assert [{k: v for k, v in r.items() if k not in drop} for r in rows] == [
        {k: v for k, v in r.items() if k not in drop} for r in ref_rows
    ]


def test_resume_refuses_another_world_size(tmp_path):
    cfg = _resume_config(tmp_path)
    spawn(_run_stage, 2, cfg, 2)
    from jobs._stage import _trainer
    from remax.run_dir import run_dir_for
    from remax.trainers import loop

    with pytest.raises(ValueError, match="written by 2 ranks, this run has 1"):
        loop.run(_trainer("remax", cfg), cfg, run_dir_for(cfg, "remax"), "remax")
