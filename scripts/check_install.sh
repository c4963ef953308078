#!/usr/bin/env bash
# A non-editable install runs a stage and renders a template (issue 13): the wheel must carry
# hydra_conf/ and slurm_templates/ and declare every dependency it imports.
#   bash scripts/check_install.sh [VENV]     (default: a fresh venv under /tmp)
# Pins torch==2.13.0 in the same pip call where there is no GPU, so no multi-GB CUDA build is pulled.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
VENV=${1:-$(mktemp -d /tmp/remax-install.XXXX)/venv}
TORCH=$(nvidia-smi -L >/dev/null 2>&1 && echo torch || echo "torch==2.13.0")
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
SRC=$(mktemp -d)  # build from a copy: pip's build/ must not land in the checkout
tar -C "$REPO" --exclude=.git --exclude=build --exclude=.venv --exclude=".venv-*" --exclude=runs -cf - . | tar -C "$SRC" -xf -
"$VENV/bin/pip" install --quiet "$TORCH" "$SRC"
WORK=$(mktemp -d)
cd "$WORK"  # outside the checkout: nothing may come from the working tree
env -u PYTHONPATH HF_HUB_OFFLINE=1 WANDB_MODE=disabled "$VENV/bin/remax-remax" \
  run.root="$WORK/runs" train.max_steps=2 data.num_train=64 data.num_eval=64 eval_prompts=64 \
  log.progress=false log.wandb_mode=disabled
test -f "$WORK"/runs/remax/*/summary.json
env -u PYTHONPATH "$VENV/bin/python" - "$WORK" <<'PY'
import sys
from jobs._config import compose_stage
from jobs._submit import render_template
import jobs
assert "site-packages" in jobs.__file__, jobs.__file__
config = compose_stage("remax", ["cluster=local_slurm", f"run.root={sys.argv[1]}/runs"])
script = render_template("single_node", "remax", config, ["train.max_steps=4"])
assert "#SBATCH --requeue" in script and "${COMMAND}" not in script
print("rendered", len(script.splitlines()), "lines from", jobs.__file__)
PY
env -u PYTHONPATH "$VENV/bin/remax-plan" --help > "$WORK/plan_help.txt" && head -n 1 "$WORK/plan_help.txt"
echo "install check passed: $VENV"
