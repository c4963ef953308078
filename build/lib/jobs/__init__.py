"""Entry points: the only package that knows Hydra (and, later, submitit and Slurm)."""
