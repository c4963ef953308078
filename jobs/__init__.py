"""Entry points: the only package that knows Hydra (and, later, submitit and Slurm)."""

import os

if os.environ.get("SLURM_JOB_ID") and os.environ.get("SLURM_STEP_ID"):
    # A task of a job step: the first import of ours (submitit unpickles the job, the templates
    # run ``python -m jobs.<stage>``). From here USR2 and SIGTERM are noted, not fatal, until the
    # stage installs its stop path (remax.preemption.install).
    from remax import preemption

    preemption.note_early_signals()
