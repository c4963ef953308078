"""`python -m jobs.ppo [key=value ...]`: the PPO baseline stage (defaults: model=tiny data=synthetic cluster=local)."""

from jobs._main import stage_main


def main() -> None:
    stage_main("ppo")


if __name__ == "__main__":
    main()
