"""Shared fixtures: offline environment, tiny models, and a helper to run jobs as users do."""

from __future__ import annotations

import contextlib
import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

# A hub miss otherwise hangs ~48 s before failing (python-stack.md); W&B must never reach out.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("WANDB_SILENT", "true")
# DeepSpeed JIT-builds its shared-memory comm op on CPU (~22 s; DeepSpeedCPUAdam's ~1 min): once per
# cache, kept across runs. One cache per venv: a build's paths name its venv, so two venvs sharing
# one cache (make test, make test-vllm) rebuild each other's ops on every switch.
_VENV = Path(sys.prefix).resolve()
_VENV_KEY = hashlib.sha256(str(_VENV).encode()).hexdigest()[:8]
os.environ.setdefault("TORCH_EXTENSIONS_DIR", f"/tmp/torch_ext/{_VENV.name}-{_VENV_KEY}")

REPO = Path(__file__).resolve().parents[1]

# Every job a test runs is a fresh process, but forked from a server that imported the heavy
# modules once (torch, transformers, DeepSpeed, the stages): ~7 s of CPU saved per process on the
# 2-core CI machine. The server never ran a torch op, so no OpenMP pool is forked. A fresh
# interpreter instead (`REMAX_TEST_FORKSERVER=0`, or `run_job(..., fresh=True)`) runs the same.
_PRELOAD = ["torch", "transformers", "deepspeed", "jobs._stage", "remax.trainers.remax"]
FORKSERVER = os.environ.get("REMAX_TEST_FORKSERVER", "1") == "1"


def start_method() -> str:
    """How test processes start: ``forkserver`` with the heavy modules preloaded (a child still
    gets the caller's environment and ``sys.path``, nothing of its state), or ``spawn``."""
    import multiprocessing

    if not FORKSERVER:
        return "spawn"
    multiprocessing.set_forkserver_preload(_PRELOAD)
    return "forkserver"


@contextlib.contextmanager
def one_thread():
    """torch at one intra-op thread for the block, as each gloo rank runs: the same kernels and
    summation order as the ranks (a 1-rank reference), and tiny models gain nothing from threads
    that spin-wait on a shared machine. The caller's thread count comes back after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture
def tokenizer():
    from remax.models.tiny import build_tokenizer

    return build_tokenizer()


def _tiny(build, tokenizer, seed: int):
    """A tiny random-init Llama of the tests' one shape, seeded so fixtures are reproducible."""
    from remax.models.tiny import llama_config

    torch.manual_seed(seed)
    config = llama_config(
        len(tokenizer),
        hidden_size=32,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        intermediate_size=64,
    )
    return build(config).eval()


@pytest.fixture
def policy(tokenizer):
    from remax.models.tiny import tiny_policy

    return _tiny(tiny_policy, tokenizer, seed=0)


@pytest.fixture
def reward_model(tokenizer):
    from remax.models.tiny import tiny_reward_model

    return _tiny(tiny_reward_model, tokenizer, seed=1)


def run_job(
    module: str,
    *overrides: str,
    check: bool = True,
    timeout: float = 600,
    env: dict | None = None,
    fresh: bool = False,
):
    """Run ``python -m <module> <overrides>`` from the repo root, as a user would: a new process
    with this environment (``None`` removes a variable), its own ``sys.path`` (the repo,
    ``PYTHONPATH``, the interpreter's), exit status and output. Forked from the preloaded server
    (``start_method``) unless ``fresh`` or ``REMAX_TEST_FORKSERVER=0``."""
    full_env = _job_env(env)
    args = [sys.executable, "-m", module, *overrides]
    if fresh or not FORKSERVER:
        proc = subprocess.run(
            args, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=full_env
        )
    else:
        proc = _forked(args, full_env, timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{module} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc


def _job_env(env: dict | None) -> dict:
    """This process's environment with ``env`` over it (``None`` removes a variable)."""
    full = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return {k: v for k, v in full.items() if v is not None}


def _forked(args: list[str], env: dict, timeout: float) -> subprocess.CompletedProcess:
    import shutil

    job = StartedJob(args, env)
    try:
        if not job.wait(timeout):
            job.kill()
            raise subprocess.TimeoutExpired(args, timeout, job.stdout(), job.stderr())
        return subprocess.CompletedProcess(args, job.returncode, job.stdout(), job.stderr())
    finally:
        shutil.rmtree(job._dir, ignore_errors=True)  # noqa: SLF001


def start_job(module: str, *overrides: str, env: dict | None = None) -> StartedJob:
    """``run_job`` without waiting: a handle to poll, signal (``kill -9``) and wait on."""
    full_env = _job_env(env)
    return StartedJob([sys.executable, "-m", module, *overrides], full_env)


class StartedJob:
    """A running ``python -m`` job: forked from the preloaded server, or a fresh interpreter
    (``REMAX_TEST_FORKSERVER=0``); output goes to files read with :meth:`stdout`/:meth:`stderr`."""

    def __init__(self, args: list[str], env: dict) -> None:
        import multiprocessing
        import tempfile

        self.args, self._dir = args, Path(tempfile.mkdtemp(prefix="remax-job-"))
        self._out, self._err = self._dir / "out", self._dir / "err"
        if FORKSERVER:
            ctx = multiprocessing.get_context(start_method())
            target_args = (args[2], args[3:], env, str(self._out), str(self._err), _base_path())
            self._child = ctx.Process(target=_run_module, args=target_args)
            self._child.start()
            self.pid = self._child.pid
        else:
            with open(self._out, "w") as out, open(self._err, "w") as err:
                self._popen = subprocess.Popen(args, cwd=REPO, env=env, stdout=out, stderr=err)
            self.pid = self._popen.pid

    @property
    def returncode(self) -> int | None:
        return self._child.exitcode if FORKSERVER else self._popen.poll()

    def poll(self) -> int | None:
        return self.returncode

    def wait(self, timeout: float | None = None) -> bool:
        """Whether it ended within ``timeout``."""
        if FORKSERVER:
            self._child.join(timeout)
        else:
            try:
                self._popen.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        return self.returncode is not None

    def send_signal(self, signum: int) -> None:
        os.kill(self.pid, signum)

    def kill(self) -> None:
        import signal

        self.send_signal(signal.SIGKILL)
        self.wait()

    def stdout(self) -> str:
        return self._out.read_text(errors="replace")

    def stderr(self) -> str:
        return self._err.read_text(errors="replace")


_BASE_PATH: list[str] = []


def _base_path() -> list[str]:
    """A fresh interpreter's ``sys.path`` after its first entry (the script's or ``-m``'s cwd)."""
    if not _BASE_PATH:
        out = subprocess.run(
            [sys.executable, "-I", "-c", "import sys, json; print(json.dumps(sys.path))"],
            capture_output=True,
            text=True,
            check=True,
        )
        import json

        _BASE_PATH.extend(p for p in json.loads(out.stdout) if p)
    return _BASE_PATH


def _run_module(module: str, argv: list[str], env: dict, out: str, err: str, base: list[str]):
    """The forked child: become ``python -m module argv`` (cwd, environment, path, stdio), run
    it, and end as the interpreter would (non-daemon threads joined, atexit handlers run)."""
    import atexit
    import runpy
    import threading
    import traceback

    os.chdir(REPO)
    os.environ.clear()
    os.environ.update(env)
    extra = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    sys.path[:] = [str(REPO), *extra, *base]
    for fd, path in ((1, out), (2, err)):
        f = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(f, fd)
        os.close(f)
    sys.stdout.reconfigure(line_buffering=True)
    sys.stderr.reconfigure(line_buffering=True)
    sys.argv = [module, *argv]
    code = 0
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    except SystemExit as exc:
        code = _exit_code(exc.code)
    except BaseException:  # noqa: BLE001 - as the interpreter: traceback, status 1
        traceback.print_exc()
        code = 1
    try:
        threading._shutdown()  # noqa: SLF001 - the interpreter joins non-daemon threads first
        atexit._run_exitfuncs()  # noqa: SLF001
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _exit_code(code) -> int:
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)
    return 1


@pytest.fixture(scope="session")
def slurm_reference(tmp_path_factory):
    """``(submission record, inputs)`` of one uninterrupted single-task Slurm ReMax run from tiny
    exports, shared by the requeue tests (USR2, SIGTERM, ``scontrol requeue``): each submits the
    same inputs, interrupts its own job and compares exports once this one is done. Submitted,
    not waited for: it runs beside the first test's job."""
    from test_slurm import _submit, exports_job

    root = tmp_path_factory.mktemp("slurm_reference")
    inputs = exports_job(root / "exports")
    return _submit(root, *inputs), inputs


@pytest.fixture(scope="session")
def family_checkpoint(tmp_path_factory):
    """``name -> path`` of a saved tiny checkpoint of a real tokenizer family (Llama-2, Mistral,
    Llama-3, OPT, GPT-2: tests/tokenizer_families.py), built once per session."""
    from tokenizer_families import save_family

    saved: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in saved:
            saved[name] = save_family(name, tmp_path_factory.mktemp(name))
        return saved[name]

    return get
