"""`python -m jobs.reward_model [key=value ...]`: the reward_model stage (defaults: model=tiny data=synthetic cluster=local)."""

from jobs._main import stage_main


def main() -> None:
    stage_main("reward_model")


if __name__ == "__main__":
    main()
