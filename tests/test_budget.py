"""Budget caps without a cluster: GPUs that accounting does not track, caps shared by a
pipeline's stages and a sweep's elements, an sacct outage when a segment starts, and the memory
an evaluation asks for.

``sbatch``, ``sacct`` and ``scontrol`` are shims on PATH; costs use ``cluster=local_slurm``
(1 GPU, 20 min segments, 1.0 CNY per GPU-hour: one segment's upper bound is 0.33).
"""

from __future__ import annotations

import pytest

from jobs._config import compose_stage
from jobs._submit import render_template, sbatch_params

EVAL = ["cluster=slurm_a800", "policies=[runs/remax/x/export]"]
SEGMENT = 1 / 3  # 1 GPU × 20 min × 1.0 per GPU-hour


# ------------------------------------------------------------------ evaluation memory
def test_evaluate_on_a800_asks_for_its_gpus_share_of_the_node_memory(tmp_path):
    config = compose_stage("evaluate", [*EVAL, f"run.root={tmp_path}"])
    evaluate = sbatch_params("evaluate", config.cluster)
    # One of the node's 4 GPUs: a quarter of its 500 GB, never --mem=0 (the whole node).
    assert evaluate["mem"] == "125GB"
    assert sbatch_params("remax", config.cluster)["mem"] == "0GB"  # 4 GPUs: the whole node
    script = render_template("single_node", "evaluate", config, [])
    assert "#SBATCH --mem=125GB" in script and "--mem=0" not in script


def test_evaluate_with_whole_node_memory_and_no_node_size_is_refused(tmp_path, capsys):
    config = compose_stage("evaluate", [*EVAL, "cluster.node_mem_gb=null"])
    with pytest.raises(SystemExit) as exit_:
        sbatch_params("evaluate", config.cluster)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: cluster.mem_gb=0") and "cluster.node_mem_gb=" in err
