"""`python -m jobs.sft [key=value ...]`: the sft stage (defaults: model=tiny data=synthetic cluster=local)."""

from jobs._main import stage_main


def main() -> None:
    stage_main("sft")


if __name__ == "__main__":
    main()
