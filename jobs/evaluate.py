"""`python -m jobs.evaluate policies=[A,B] [key=value ...]`: answers of A and B on held-out prompts
(or an AlpacaEval / MT-bench set), their reward-model win rate, mean reward, KL and length.

Writes ``summary.json``, ``answers.jsonl`` and, with ``answer_format=``, the judges' answer files
into ``runs/evaluate/<name>-<signature>/`` (``remax.evaluation``).
"""

from jobs._main import stage_main


def main() -> None:
    stage_main("evaluate")


if __name__ == "__main__":
    main()
