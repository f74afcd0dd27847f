"""Smoke tests of the report: a smoke-size headline of a few ops measures every cell (none "skipped"),
writes the markdown, JSON, headline snippet and plot; bench/readme.py keeps the newest report per device and
puts its headline into README's marked block."""
import json
import os

from bench import headline, readme, report


def test_report_headline_is_complete(tmp_path):
    ops = ["gram_schmidt", "orthogonalize_approx", "cayley", "cayley_neumann"]
    args = report.parse_args(["--size", "smoke", "--ops", *ops, "--headline-only", "--threads", "1",
                              "--out", str(tmp_path)])
    res = report.run(args)
    paths = report.write(res, str(tmp_path))
    assert res["headline_unmeasured"] == []
    snippet = open(paths["headline"]).read()
    assert "skipped" not in snippet
    for row in headline.rows("smoke", ops):
        assert f"| {row.op} | {row.label} |" in snippet
    assert os.path.getsize(paths["speedup"]) > 0
    assert json.load(open(paths["json"]))["peers"].keys() == set(report.peers.PACKAGES)
    assert json.load(open(paths["json"]))["complete"] is False   # a subset: bench/readme.py leaves it out


def test_readme_keeps_newest_per_device(tmp_path):
    results = tmp_path / "results"
    results.mkdir()
    for stem in ("cpu-x-2026-01-01_1000", "cpu-x-2026-01-02_0900", "gpu-y-2026-01-01_1200"):
        for suffix in (".md", ".json", "-headline.md"):
            (results / f"{stem}{suffix}").write_text(f"headline of {stem}\n")
    readme_md = tmp_path / "README.md"
    readme_md.write_text(f"intro\n{readme.START}\nold\n{readme.END}\nrest\n")
    readme.main(["--results", str(results), "--readme", str(readme_md)])
    left = sorted(os.listdir(results))
    assert not any("2026-01-01_1000" in f for f in left) and len(left) == 6
    text = readme_md.read_text()
    assert "headline of cpu-x-2026-01-02_0900" in text and "headline of gpu-y-2026-01-01_1200" in text
    assert "old" not in text and text.startswith("intro\n") and text.endswith("rest\n")


def test_readme_does_not_publish_a_partial_report(tmp_path):
    results = tmp_path / "results"
    results.mkdir()
    for stem, complete in (("cpu-x-2026-01-01_1000", True), ("cpu-x-2026-01-02_0900", False)):
        (results / f"{stem}.json").write_text(json.dumps({"complete": complete}))
        (results / f"{stem}-headline.md").write_text(f"headline of {stem}\n")
    readme_md = tmp_path / "README.md"
    readme_md.write_text(f"{readme.START}\n{readme.END}\n")
    readme.main(["--results", str(results), "--readme", str(readme_md)])
    assert len(os.listdir(results)) == 4      # nothing deleted
    assert "headline of cpu-x-2026-01-01_1000" in readme_md.read_text()


def test_report_options_fail_cleanly():
    """A wrong option is argparse's one-line error (exit 2), not a traceback from torch.set_num_threads or a
    budget silently read as none; --budget 0 is a budget (nothing after the headline), not the default."""
    import pytest
    for bad in (["--threads", "0"], ["--threads", "x"], ["--budget", "-1"], ["--budget", "nan"], ["--ops", "qr"]):
        with pytest.raises(SystemExit) as e:
            report.parse_args(bad)
        assert e.value.code == 2, bad
    assert report.parse_args(["--budget", "0"]).budget == 0.0
    assert report.parse_args(["--ops", "cayley", "lowdin", "cayley"]).ops == ["cayley", "lowdin"]
