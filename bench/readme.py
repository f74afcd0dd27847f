"""Publish the newest benchmark reports: keep only the newest report per device in bench/results/ (older ones
stay in git history) and put each one's headline snippet (``<stem>-headline.md``, written by report.py) into
README.md between the ``bench-headline`` markers.

    python bench/readme.py            # after a `make bench` you want to publish; then commit README and results
    python bench/readme.py --dry-run  # say what it would delete and write

Partial reports (``--ops``, ``--headline-only``, ``--no-*``, ``--size smoke``) are neither published nor
counted as newer: they stay in the folder, and the last complete report stays in README.
"""
import argparse
import json
import os
import re
import sys
from typing import Dict, List

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "bench", "results")
README = os.path.join(ROOT, "README.md")
START, END = "<!-- bench-headline:start -->", "<!-- bench-headline:end -->"
# <device slug>-<YYYY-MM-DD_HHMM><suffix>: e.g. cpu-amd-epyc-2026-12-07_0011-speedup.png
NAME = re.compile(r"^(?P<device>.+)-(?P<stamp>\d{4}-\d{2}-\d{2}_\d{4})(?P<suffix>[-.].*)$")


def partial(results: str, device: str, stamp: str) -> bool:
    """A report of a subset (``--ops``, ``--headline-only``, ``--no-*``, ``--size smoke``): report.py marks the
    JSON ``"complete": false``; reports from before that flag count as complete."""
    try:
        with open(os.path.join(results, f"{device}-{stamp}.json")) as f:
            return json.load(f).get("complete", True) is False
    except (OSError, ValueError):
        return False


def newest_per_device(results: str = RESULTS) -> Dict[str, str]:
    """{device slug: newest stamp} over the complete report files in ``results`` (a quick partial run does
    not replace, nor delete, the last full one)."""
    newest: Dict[str, str] = {}
    for f in os.listdir(results):
        m = NAME.match(f)
        if m and m["stamp"] > newest.get(m["device"], "") and not partial(results, m["device"], m["stamp"]):
            newest[m["device"]] = m["stamp"]
    return newest


def older_files(results: str = RESULTS) -> List[str]:
    newest = newest_per_device(results)
    return sorted(os.path.join(results, f) for f in os.listdir(results)
                  if (m := NAME.match(f)) and m["stamp"] < newest.get(m["device"], ""))


def snippet(results: str = RESULTS) -> str:
    """The newest headline snippet of every device, CPU first."""
    parts = []
    newest = newest_per_device(results)
    for device, stamp in sorted(newest.items(), key=lambda kv: (not kv[0].startswith("cpu"), kv[0])):
        path = os.path.join(results, f"{device}-{stamp}-headline.md")
        if os.path.exists(path):
            with open(path) as f:
                parts.append(f.read().strip())
    return "\n\n".join(parts)


def replace_between(text: str, body: str) -> str:
    if START not in text or END not in text:
        raise SystemExit(f"README has no {START} ... {END} block")
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{START}\n{body}\n{END}{tail}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dry-run", action="store_true")
    p.add_argument("--results", default=RESULTS)
    p.add_argument("--readme", default=README)
    args = p.parse_args(argv)
    if not os.path.isdir(args.results):
        raise SystemExit(f"readme.py: no results folder {args.results}: run `make bench` first (or pass --results DIR)")
    if not os.path.isfile(args.readme):
        raise SystemExit(f"readme.py: no README file {args.readme}")
    old = older_files(args.results)
    body = snippet(args.results)
    if not body:
        raise SystemExit(f"no *-headline.md in {args.results}: run `make bench` first")
    with open(args.readme) as f:
        text = replace_between(f.read(), body)
    for path in old:
        print(f"{'would delete' if args.dry_run else 'deleted'} {os.path.relpath(path, ROOT)}")
        if not args.dry_run:
            os.remove(path)
    if not args.dry_run:
        with open(args.readme, "w") as f:
            f.write(text)
    print(f"{'would write' if args.dry_run else 'wrote'} the headline of {len(newest_per_device(args.results))} "
          f"device(s) into {os.path.relpath(args.readme, ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
