"""The tests' job processes (``conftest.run_job``): one forked from the preloaded server behaves as
a fresh interpreter would, so the suite's speed-up changes nothing a test sees."""

from __future__ import annotations

import conftest
import pytest
from conftest import run_job

pytestmark = pytest.mark.skipif(not conftest.FORKSERVER, reason="REMAX_TEST_FORKSERVER=0")


def test_forked_job_sees_the_path_and_environment_of_a_fresh_interpreter(tmp_path):
    env = {"PYTHONPATH": str(tmp_path), "HOME": str(tmp_path), "HF_HUB_OFFLINE": None}
    forked, fresh = (run_job("site", env=env, fresh=f) for f in (False, True))
    assert forked.returncode == fresh.returncode == 0
    assert forked.stdout == fresh.stdout  # sys.path, in order; the user site from HOME
    assert str(tmp_path) in forked.stdout
    code = "import os, sys; print(os.getcwd(), os.environ.get('HF_HUB_OFFLINE'), sys.argv[1:])"
    (tmp_path / "probe.py").write_text(code)
    forked, fresh = (run_job("probe", "a=1", env=env, fresh=f) for f in (False, True))
    assert forked.stdout == fresh.stdout and forked.stdout.split() == [
        str(conftest.REPO),
        "None",
        "['a=1']",
    ]


def test_forked_job_ends_with_the_same_status_and_last_line(tmp_path):
    bad = ("train.max_steps=-1", f"run.root={tmp_path}")
    forked, fresh = (run_job("jobs.sft", *bad, check=False, fresh=f) for f in (False, True))
    assert forked.returncode == fresh.returncode == 2
    assert forked.stderr.strip().splitlines()[-1] == fresh.stderr.strip().splitlines()[-1]
    (tmp_path / "boom.py").write_text("raise ValueError('boom')\n")
    env = {"PYTHONPATH": str(tmp_path)}
    forked, fresh = (run_job("boom", env=env, check=False, fresh=f) for f in (False, True))
    assert forked.returncode == fresh.returncode == 1
    assert forked.stderr.strip().splitlines()[-1] == "ValueError: boom"
