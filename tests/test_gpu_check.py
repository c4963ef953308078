"""``benchmarks.gpu_check`` cannot rot: its CPU dry run writes every part, none left out silently."""

from __future__ import annotations

import importlib.util
import json

import pytest
from conftest import run_job

VLLM = importlib.util.find_spec("vllm") is not None
SUMMARY_KEYS = {
    "decode",
    "step_ratio_first",
    "step_ratio_largest",
    "samples_per_s_per_gpu",
    "push_s",
    "zero2_step_s",
    "goals",
}


def test_cpu_tiny_dry_run_writes_every_part(tmp_path):
    run_job("benchmarks.gpu_check", "--device", "cpu", "--tiny", f"--out={tmp_path}")
    report = json.loads((tmp_path / "gpu_check_cpu.json").read_text())
    table = (tmp_path / "gpu_check_cpu.md").read_text()
    assert table.startswith("# GPU check (CPU)")
    assert set(report) == {"meta", "sizes", "push", "zero2", "summary"}
    summary = report["summary"]
    assert set(summary) == SUMMARY_KEYS
    (size,) = report["sizes"]
    assert size["size"] == "tiny32" and size["status"] == "ok" and report["zero2"]["status"] == "ok"
    hf = [
        summary["decode"]["hf_tokens_per_s"],
        summary["step_ratio_first"]["hf"],
        summary["step_ratio_largest"]["hf"],
        summary["samples_per_s_per_gpu"]["hf"],
        summary["zero2_step_s"],
    ]
    assert all(isinstance(v, float) and v > 0 for v in hf), hf
    vllm = [
        summary["decode"]["vllm_tokens_per_s"],
        summary["step_ratio_first"]["vllm"],
        summary["samples_per_s_per_gpu"]["vllm"],
        summary["push_s"],
    ]
    if VLLM:
        assert all(isinstance(v, float) for v in vllm), vllm
    else:  # recorded, never silently left out
        assert vllm == ["skipped: vllm not installed"] * 4
        assert table.count("skipped: vllm not installed") >= 4
    # the release's number sits beside ours; the 2× goal is only judged at equal size (7B)
    assert summary["samples_per_s_per_gpu"]["release_7b"] == 1.3
    assert summary["goals"]["samples_over_2x_release_at_7b"] == {"hf": None, "vllm": None}


def test_a_size_that_does_not_fit_ends_the_ladder_with_its_reason():
    from benchmarks.gpu_check import markdown, summarize

    def arm(step):
        return {"step_s_median": step, "samples_per_s": 8 / step}

    ok = {"status": "ok", "remax": arm(2.0), "ppo": arm(4.0), "ratios": {}}
    ok["ratios"]["step_time_remax_over_ppo"] = 0.5
    ok["decode"] = {
        "rows": 8,
        "decode_steps": {"one_batched_decode": 256, "vllm_decode": 256},
        "median_s": {"one_batched_decode": 4.0, "vllm_decode": 1.0},
        "vllm_over_hf_batched": 4.0,
    }
    oom = {"status": "oom", "reason": "OutOfMemoryError: CUDA out of memory"}
    params = {"policy": 1_100_048_384, "reward_model": 1_034_512_384}
    report = {
        "meta": {
            "device_name": "GPU",
            "tiny": False,
            "batch": 8,
            "prompt_len": 256,
            "response_len": 256,
            "dtype": "bfloat16",
            "steps": 2,
            "vllm": "0.x",
            "wall_s": 1.0,
        },
        "sizes": [
            {"size": "1.1b", "status": "ok", "num_params": params, "hf": ok, "vllm": ok},
            {"size": "1.8b", "status": "oom", "reason": "vllm: " + oom["reason"]}
            | {"num_params": params, "hf": ok, "vllm": oom},
            {"size": "3b", "status": "skipped", "reason": "1.8b did not fit"},
        ],
        "push": {"status": "ok", "push_s": 0.25},
        "zero2": {"status": "failed", "reason": "exit 1: boom"},
    }
    s = summarize(report)
    assert s["step_ratio_largest"] == {"size": "1.1b", "hf": 0.5, "vllm": 0.5}
    # 16 rows × 256 steps over the median decode time, both engines from the vllm run
    assert s["decode"]["hf_run"] == "vllm"
    assert s["decode"]["hf_tokens_per_s"] == 16 * 256 / 4.0
    assert s["decode"]["vllm_tokens_per_s"] == 16 * 256 / 1.0
    assert s["goals"]["step_ratio_le_0.6"] == {"hf": True, "vllm": True}
    assert s["push_s"] == 0.25 and s["zero2_step_s"] == "failed: exit 1: boom"
    report["summary"] = s
    table = markdown(report)
    assert "vllm oom: OutOfMemoryError: CUDA out of memory" in table
    assert "- 3b: skipped: 1.8b did not fit" in table


def test_an_unknown_size_fails_in_one_line(tmp_path, capsys):
    from benchmarks.gpu_check import main

    with pytest.raises(SystemExit) as exc:
        main(["--device", "cpu", "--sizes", "13b", f"--out={tmp_path}"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.startswith("error: --sizes 13b") and err.count("\n") == 1
    assert not any(tmp_path.iterdir())


def test_only_a_size_limit_ends_the_ladder():
    """Out of memory (or skipped for the device or the time) ends it; vLLM not installed, or
    broken for another reason, leaves the hf ladder going."""
    from benchmarks.gpu_check import size_status, skipped

    ok = {"status": "ok"}
    failed = {"status": "failed", "reason": "ValueError: Free memory", "decides": False}
    oom = {"status": "oom", "reason": "OutOfMemoryError", "decides": True}
    assert size_status({"hf": ok, "vllm": skipped("vllm not installed", decides=False)}) == (
        "ok",
        None,
    )
    assert size_status({"hf": ok, "vllm": failed}) == ("ok", None)
    assert size_status({"hf": ok, "vllm": oom}) == ("oom", "vllm: OutOfMemoryError")
    assert size_status({"hf": skipped("time budget: 300 s predicted"), "vllm": ok})[0] == "skipped"
    assert size_status({"hf": failed, "vllm": failed})[0] == "failed"
