"""``benchmarks.rl_variants``: its equal-samples / equal-time reading, and a tiny run of all four."""

from __future__ import annotations

import json

import pytest
import torch
from tiny_exports import save_tiny_exports


def _run(samples_per_step: int, step_s: float, golds: list[float]) -> dict:
    curve = [
        {"step": i, "samples": i * samples_per_step, "wall_s": i * step_s, "gold": g}
        for i, g in enumerate(golds)
    ]
    state = {"total": 1}
    return {
        "curve": curve,
        "step_s": [step_s],
        "decoded_tokens_per_step": 1.0,
        "prompts_per_step": 4,
        "samples_per_step": samples_per_step,
        "model_state": state,
    }


def test_equal_samples_and_equal_time_read_each_seeds_curve_where_the_shortest_one_ends():
    from benchmarks.rl_variants import summarize

    # "fast": 4 samples per step, 1 s; "group": 16 samples per step, 2 s; two seeds each.
    runs = {
        "fast": [_run(4, 1.0, [0.0, 0.2, 0.4]), _run(4, 1.0, [0.0, 0.4, 0.8])],
        "group": [_run(16, 2.0, [0.0, 0.5, 0.9]), _run(16, 2.0, [0.0, 0.3, 0.7])],
    }
    s = summarize(runs)
    assert s["equal_samples"] == 8 and s["equal_wall_s"] == 2.0  # where "fast" ends
    fast, group = s["algos"]["fast"], s["algos"]["group"]
    # "fast" is read at its end; "group" at half its first step (8 of 16 samples; 2 of 2 s: step 1)
    assert fast["gold_at_equal_samples"]["mean"] == pytest.approx(0.6)
    assert group["gold_at_equal_samples"]["mean"] == pytest.approx((0.25 + 0.15) / 2)
    assert group["gold_at_equal_wall"]["mean"] == pytest.approx(0.4)
    assert group["gold_at_equal_wall"]["se"] == pytest.approx(0.1)  # stdev([.5, .3]) / √2
    assert fast["samples_per_s"] == 4.0 and group["samples_per_s"] == 8.0


def test_all_four_algorithms_run_on_tiny_exports(tmp_path):
    from benchmarks import rl_variants

    sft, rm = save_tiny_exports(tmp_path / "exports")
    n_threads = torch.get_num_threads()
    try:
        report = rl_variants.main(
            [
                f"--sft={sft}",
                f"--rm={rm}",
                "--seeds=0",
                "--steps=1",
                "--eval-every=4",
                f"--out={tmp_path}",
                "--override=train.batch_size=4",
                "--override=train.micro_batch_size=4",
                "--override=eval_prompts=64",
                "--override=data.max_response_len=8",
            ]
        )
    finally:
        torch.set_num_threads(n_threads)
    on_disk = json.loads((tmp_path / "rl_variants.json").read_text())
    assert (tmp_path / "rl_variants.png").stat().st_size > 0
    assert (tmp_path / "rl_variants.md").read_text().startswith("# ReMax, RLOO, GRPO and PPO")
    algos = on_disk["summary"]["algos"]
    assert list(algos) == ["remax", "rloo", "grpo", "ppo"]
    # equal prompts per step; k = 1, 2, 4, 1 sampled answers each
    assert [a["samples_per_step"] for a in algos.values()] == [4, 8, 16, 4]
    # PPO holds a critic and its optimizer state on top of what the critic-free three hold
    assert algos["ppo"]["model_state_bytes"] > algos["remax"]["model_state_bytes"]
    assert algos["remax"]["model_state_bytes"] == algos["grpo"]["model_state_bytes"]
    # every decoded row has 1 to 8 tokens (EOS counts); ReMax's rows: 4 sampled + 4 greedy
    rows = {"remax": 8, "rloo": 8, "grpo": 16, "ppo": 4}
    for name, a in algos.items():
        assert rows[name] <= a["decoded_tokens_per_step"] <= 8 * rows[name], name
    assert all(len(a["curve"]) == 2 and a["gold_at_equal_wall"]["n"] == 1 for a in algos.values())
    assert report["summary"] == on_disk["summary"]
