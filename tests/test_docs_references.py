"""The repository never points its readers at a document it does not contain.

The project was planned from design notes that were never committed; what users need from them lives in
docs/ (methods.md, performance.md, training.md). This fails naming each file:line that still refers to one
of those notes, and each relative markdown link whose target is missing."""
import os
import re
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Built from pieces so that this file does not match itself.
MISSING = re.compile("|".join(["opt" + "_spec", r"design\." + "md", "perf" + "_targets", "scale" + "_spec",
                               "style" + "_guide"]))
LINK = re.compile(r"\]\(([^)\s#]+)(#[^)\s]*)?\)")


def tracked_text_files():
    out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    for rel in out.decode().split("\0"):
        path = os.path.join(ROOT, rel)
        if not rel or not os.path.isfile(path):
            continue
        with open(path, "rb") as f:
            data = f.read()
        if b"\0" in data[:8192]:  # binary (images, ...)
            continue
        yield rel, data.decode("utf-8", errors="replace")


def test_no_reference_to_documents_outside_the_repository():
    hits = [f"{rel}:{i}: {line.strip()[:100]}"
            for rel, text in tracked_text_files()
            for i, line in enumerate(text.splitlines(), 1) if MISSING.search(line)]
    assert not hits, "references to documents that are not in the repository:\n" + "\n".join(hits)


def test_markdown_links_resolve():
    broken = []
    for rel, text in tracked_text_files():
        if not rel.endswith(".md"):
            continue
        # a report's headline snippet is written for README (bench/readme.py copies it there): its links are
        # relative to the repository root
        base = "" if rel.endswith("-headline.md") else os.path.dirname(rel)
        for i, line in enumerate(text.splitlines(), 1):
            for target, _ in LINK.findall(line):
                if "://" in target or target.startswith("mailto:"):
                    continue
                if not os.path.exists(os.path.join(ROOT, base, target)):
                    broken.append(f"{rel}:{i}: {target}")
    assert not broken, "markdown links to missing files:\n" + "\n".join(broken)
