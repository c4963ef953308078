"""`python -m jobs.remax [key=value ...]`: the remax stage (defaults: model=tiny data=synthetic cluster=local)."""

from jobs._main import stage_main


def main() -> None:
    stage_main("remax")


if __name__ == "__main__":
    main()
