"""`python -m jobs.ppo [key=value ...]`: the PPO baseline stage (defaults: model=tiny data=synthetic cluster=local)."""

from jobs._main import stage_main

if __name__ == "__main__":
    stage_main("ppo")
