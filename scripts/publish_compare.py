"""Publish a ``python -m opt_fast.train --compare ... --out RUN`` report as the repository's digits results.

    python -m opt_fast.train --compare all --dataset digits --model small --out runs/cmp
    python scripts/publish_compare.py runs/cmp

copies RUN/compare.{md,json,png} to docs/results/digits/ and replaces the README's table between the
``digits-compare`` markers with the report's test-accuracy table, so the README quotes the CLI's output and
never a typed number (tests/test_train_recipes.py checks that they agree).
"""
import os
import shutil
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEST = os.path.join(ROOT, "docs", "results", "digits")
README = os.path.join(ROOT, "README.md")
BEGIN, END = "<!-- digits-compare:begin -->", "<!-- digits-compare:end -->"


def accuracy_table(report: str) -> str:
    """The markdown table under the report's '## Test accuracy' heading."""
    lines = report.split("## Test accuracy", 1)[1].strip().splitlines()
    table = []
    for line in lines:
        if not line.startswith("|"):
            break
        table.append(line)
    return "\n".join(table)


def readme_table(readme: str) -> str:
    return readme.split(BEGIN, 1)[1].split(END, 1)[0].strip()


def main(run: str) -> None:
    os.makedirs(DEST, exist_ok=True)
    for name in ("compare.md", "compare.json", "compare.png"):
        shutil.copyfile(os.path.join(run, name), os.path.join(DEST, name))
    with open(os.path.join(DEST, "compare.md"), encoding="utf-8") as f:
        table = accuracy_table(f.read())
    with open(README, encoding="utf-8") as f:
        text = f.read()
    head, rest = text.split(BEGIN, 1)
    tail = rest.split(END, 1)[1]
    with open(README, "w", encoding="utf-8") as f:
        f.write(f"{head}{BEGIN}\n{table}\n{END}{tail}")
    print(f"docs/results/digits/ and README.md updated from {run}")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit("usage: python scripts/publish_compare.py RUN_FOLDER (the --out of a --compare run)")
    main(sys.argv[1])
