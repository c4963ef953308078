"""The ReMax-vs-PPO report: ``remax_vs_ppo.json`` and its Markdown table, written after each size."""

from __future__ import annotations

import json
import resource
from pathlib import Path


def _mib(b: float) -> str:
    return f"{b / 2**20:,.1f}"


def _row(label: str, x, y, fmt: str) -> str:
    cell = lambda v: "—" if v is None else fmt.format(v)  # noqa: E731
    rel = f"{x / y:.3f}" if x is not None and y else "—"
    return f"| {label} | {cell(x)} | {cell(y)} | {rel} |"


def _metric_rows(a: dict, b: dict) -> list[str]:
    """The ReMax (``a``) vs PPO (``b``) table: timings, model state per part, CUDA peaks."""
    lines = [
        "| metric | ReMax | PPO | ReMax/PPO |",
        "|---|---:|---:|---:|",
        _row("step time median (s)", a["step_s_median"], b["step_s_median"], "{:.4f}"),
        _row("step time IQR (s)", a["step_s_iqr"], b["step_s_iqr"], "{:.4f}"),
        _row("samples/s", a["samples_per_s"], b["samples_per_s"], "{:.2f}"),
        _row("tokens/s (sampled)", a["tokens_per_s"], b["tokens_per_s"], "{:.1f}"),
    ]
    for part in ("actor", "reference", "reward_model", "critic", None):
        x, y = (
            (arm["model_state"]["models"].get(part) or {}).get("total")
            if part
            else arm["model_state"]["total"]
            for arm in (a, b)
        )
        label = f"model state {part or 'total'} (MiB)"
        lines.append(_row(label, x and x / 2**20, y and y / 2**20, "{:,.1f}"))
    if "cuda_peak_own_bytes" in a:
        for key, label in (
            ("cuda_peak_own_bytes", "CUDA peak, own (GiB)"),
            ("cuda_peak_allocated_bytes", "CUDA peak, both arms resident (GiB)"),
        ):
            lines.append(_row(label, a[key] / 2**30, b[key] / 2**30, "{:.2f}"))
    return lines


def _decode_and_ratio(d: dict, ratio: dict) -> list[str]:
    """The sentences under the table: the decode benchmark and the model-state ratio."""
    return [
        f"Decode of {d['rows']} prompts: one batched decode of {2 * d['rows']} rows "
        f"(sampled + greedy flags) {d['median_s']['one_batched_decode']:.4f} s vs two "
        f"generate calls of {d['rows']} {d['median_s']['two_generate_calls']:.4f} s: "
        f"speed-up {d['speedup']:.2f}x."
        + (
            f" vLLM engine, the same {2 * d['rows']} rows: {d['median_s']['vllm_decode']:.4f} s "
            f"({d['vllm_over_hf_batched']:.2f}x the batched hf decode's speed)."
            if "vllm_decode" in d["median_s"]
            else ""
        ),
        f"Model-state ratio ReMax/PPO {ratio['model_state_remax_over_ppo']:.3f} measured"
        + (
            f"; {ratio['model_state_remax_over_ppo_mixed_precision_analytic']:.3f} analytic for "
            "DeepSpeed-style mixed precision (16 B per trained, 2 B per frozen parameter)."
            if "model_state_remax_over_ppo_mixed_precision_analytic" in ratio
            else " (LoRA actors: the reference is the actor with its adapters off)."
        ),
    ]


def breakdown_rows(engines: dict[str, dict]) -> list[str]:
    """Median seconds per part of the step (``benchmarks._breakdown``), one column per engine and
    trainer, side by side: ``engines`` maps an engine name to its ``{"remax": arm, "ppo": arm}``."""
    cols = [(e, a, res[a]) for e, res in engines.items() for a in ("remax", "ppo") if a in res]
    cols = [c for c in cols if "breakdown" in c[2]]
    if not cols:
        return []
    head = " | ".join(f"{'ReMax' if a == 'remax' else 'PPO'} {e}" for e, a, _ in cols)
    lines = [f"| part (median s) | {head} |", "|---|" + "---:|" * len(cols)]
    for part in cols[0][2]["breakdown"]:
        cells = " | ".join(f"{arm['breakdown'][part]:.4f}" for _, _, arm in cols)
        lines.append(f"| {part} | {cells} |")
    cells = " | ".join(f"{arm['step_s_median']:.4f}" for _, _, arm in cols)
    return [*lines, f"| **step** | {cells} |"]


def _size_section(r: dict) -> list[str]:
    """One size's section: a heading line, or the table and sentences of a size that ran."""
    if r["status"] != "ok":
        return [f"## {r['size']}: {r['status']} ({r.get('reason', '')})", ""]
    params = r["num_params"]
    return [
        f"## {r['size']} (policy {params['policy'] / 1e6:,.2f}M, RM/critic "
        f"{r.get('rm_size', r['size'])} {params['reward_model'] / 1e6:,.2f}M parameters)",
        "",
        *_metric_rows(r["remax"], r["ppo"]),
        "",
        *breakdown_rows(r.get("engines") or {r.get("rollout_engine", "hf"): r}),
        "",
        *_decode_and_ratio(r["decode"], r["ratios"]),
        "",
    ]


def markdown(report: dict) -> str:
    m = report["meta"]
    lines = [
        f"# ReMax vs PPO ({m['device_name']})",
        "",
        f"batch {m['batch']} prompts, prompt {m['prompt_len']} + response {m['response_len']} "
        f"tokens, {m['dtype']}, {m['steps']} timed steps per arm (+1 warm-up), alternated; "
        f"ReMax {m['remax_algo']}, PPO {m['ppo_algo']}; rollout.engine={m.get('engine', 'hf')}.",
        "",
    ]
    for r in report["results"]:
        lines += _size_section(r)
    lines.append(f"Process peak RSS: {report['process_peak_rss_bytes'] / 2**20:,.1f} MiB.")
    if report.get("largest_fitting_size"):
        lines.append(f"Largest size that fits (both arms): {report['largest_fitting_size']}.")
    return "\n".join(lines) + "\n"


def _write(report: dict, out: Path) -> str:
    ok = [r for r in report["results"] if r["status"] == "ok"]
    report["process_peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    report["largest_fitting_size"] = ok[-1]["size"] if ok else None
    if ok:  # the headline: the largest size that ran
        report.update({k: ok[-1][k] for k in ("remax", "ppo", "ratios", "decode")})
    stem = "remax_vs_ppo" + ("_vllm" if "vllm" in report["meta"]["engine"] else "")
    (out / f"{stem}.json").write_text(json.dumps(report, indent=2, default=str))
    table = markdown(report)
    (out / f"{stem}.md").write_text(table)
    return table
