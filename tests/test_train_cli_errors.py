"""User-facing robustness of the training CLIs: every bad input ends in one line `opt_fast.train: error: ...`
(never a traceback), saved files are never lost, Ctrl-C says how to resume. Tiny synthetic / bytes runs."""
import json
import os
import subprocess
import sys

import pytest
import torch

from opt_fast.train import checkpoint as ckpt
from opt_fast.train import core
from opt_fast.train.cli import main

PY = sys.executable
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--dataset", "synthetic", "--model", "small", "--epochs", "2", "--batch-size", "128", "--no-progress",
        "--threads", "1"]


def _error(argv, main_=None):
    """The one-line error message main(argv) exits with."""
    with pytest.raises(SystemExit) as e:
        (main_ or main)(argv)
    msg = str(e.value.code)
    assert msg.startswith("opt_fast.train: error:") and "\n" not in msg, msg
    return msg


def _fake_checkpoint(path, fmt, **config):
    torch.save({"format": fmt, "config": config}, path)
    return str(path)


# ---- 1: a fresh run never overwrites a saved checkpoint -------------------------------------------------------
def test_fresh_run_refuses_existing_checkpoint(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    path = out / "checkpoint.pt"
    path.write_bytes(b"an earlier run")
    msg = _error(TINY + ["--out", str(out)])
    assert f"--resume {path}" in msg and "another --out" in msg
    assert path.read_bytes() == b"an earlier run"
    msg = _error(["--dataset", "stdlib", "--model", "llama-tiny", "--out", str(out)])  # the LM CLI too
    assert f"--resume {path}" in msg and path.read_bytes() == b"an earlier run"


# ---- 2: bad values end in one line before anything trains -----------------------------------------------------
@pytest.mark.parametrize("args,expect", [
    (["--momentum", "-1"], "--momentum must be in [0, 1)"),
    (["--weight-decay", "-1"], "--weight-decay must be >= 0"),
    (["--label-smoothing", "2"], "--label-smoothing must be in [0, 1)"),
    (["--threads", "-1"], "--threads must be >= 1"),
    (["--device", "foo"], "--device 'foo' is not a torch device"),
    (["--lr-milestones", "0.5,2"], "fractions of training"),
    (["--warmup-epochs", "3"], "--warmup-epochs 3 is longer than the run"),
    (["--out", "/proc/opt_fast_no/run"], "is not a writable folder"),
    (["--export", "/proc/opt_fast_no/plain.pt"], "--export /proc/opt_fast_no/plain.pt: its folder"),
])
def test_bad_values_one_line(args, expect):
    assert expect in _error(TINY + args)


def test_out_is_a_file_and_lm_bad_values(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    assert "is an existing file" in _error(TINY + ["--out", str(f)])
    pytest.importorskip("transformers")
    lm = ["--dataset", "stdlib", "--model", "llama-tiny", "--steps", "2"]
    assert "--clip must be >= 0" in _error(lm + ["--clip", "-1"])
    assert "--threads must be >= 1" in _error(lm + ["--threads", "-1"])
    assert "not a torch device" in _error(lm + ["--device", "foo"])
    assert "is an existing file" in _error(lm + ["--out", str(f)])


def test_cli_subprocess_no_traceback():
    r = subprocess.run([PY, "-m", "opt_fast.train", *TINY, "--momentum", "-1"], cwd=ROOT, capture_output=True,
                       text=True, env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=120)
    assert r.returncode == 1 and r.stderr.strip().splitlines() == [
        "opt_fast.train: error: --momentum must be in [0, 1), got -1.0"], r.stderr


# ---- 3: an op failing mid-training, and Ctrl-C ------------------------------------------------------------------
def test_op_failure_is_one_line_and_keeps_checkpoint(tmp_path, monkeypatch):
    out = tmp_path / "run"
    real_eval, evaluated = core.evaluate, []

    def evaluate(*a, **k):  # the end of epoch 1
        evaluated.append(1)
        return real_eval(*a, **k)

    def loss(logits, y):  # as gram_schmidt's backward on a rank-deficient P (lr 1000, no warm-up)
        if evaluated:
            raise RuntimeError("opt_fast.gram_schmidt_backward: P is rank deficient\nmore detail")
        return torch.nn.functional.cross_entropy(logits, y)

    monkeypatch.setattr(core, "evaluate", evaluate)
    monkeypatch.setattr(core, "_loss_fn", lambda cfg, n: loss)
    msg = _error(TINY + ["--out", str(out), "--save-every", "1"])
    assert "P is rank deficient" in msg and "epoch 2 step 1" in msg and "is kept" in msg
    assert ckpt.load(str(out / "checkpoint.pt"))["epoch"] == 1  # the last good checkpoint


def test_keyboard_interrupt_says_how_to_resume(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    real, calls = core.evaluate, {"n": 0}

    def evaluate(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(core, "evaluate", evaluate)
    assert main(TINY + ["--out", str(out), "--save-every", "1"]) == 130
    lines = capsys.readouterr().err.strip().splitlines()
    path = str(out / "checkpoint.pt")
    assert lines[-1].startswith("opt_fast.train: interrupted:") and f"--resume {path}" in lines[-1], lines
    assert ckpt.load(path)["epoch"] == 1


# ---- 5: resume refuses changed optimizer settings; 7: a checkpoint of the other workflow -------------------------
def test_resume_refuses_changed_settings_and_lm_checkpoint(tmp_path):
    out = tmp_path / "run"
    assert main(TINY + ["--out", str(out), "--stop-after", "1"]) == 0
    path = str(out / "checkpoint.pt")
    for flag, value in (("--lr", "0.3"), ("--weight-decay", "0.01"), ("--bn-momentum", "0.5"), ("--momentum", "0.5")):
        msg = _error(TINY + ["--out", str(out), "--resume", path, flag, value])
        assert f"was written with {flag} " in msg, msg
    lm = _fake_checkpoint(tmp_path / "lm.pt", ckpt.LM_FORMAT, model="llama-tiny", dataset="stdlib")
    msg = _error(TINY + ["--resume", lm])
    assert "is an LM checkpoint" in msg and "--dataset stdlib --model llama-tiny" in msg
    torch.save({"w": torch.ones(2)}, tmp_path / "plain.pt")  # an --export state_dict
    assert "not a training checkpoint" in _error(TINY + ["--resume", str(tmp_path / "plain.pt")])


def test_lm_cli_refuses_cnn_checkpoint(tmp_path):
    pytest.importorskip("transformers")
    cnn = _fake_checkpoint(tmp_path / "cnn.pt", ckpt.CNN_FORMAT, model="small", dataset="digits")
    msg = _error(["--dataset", "stdlib", "--model", "llama-tiny", "--steps", "2", "--resume", cnn])
    assert "is a CNN checkpoint" in msg and "not an LM one" in msg


# ---- 6: --compare records a method that raised and goes on --------------------------------------------------------
def test_compare_records_unexpected_failure(tmp_path, monkeypatch):
    from opt_fast.train import compare
    real = compare.train

    def train(cfg):
        if cfg.method == "cayley":
            raise ValueError("something odd\nsecond line")
        return real(cfg)

    monkeypatch.setattr(compare, "train", train)
    assert main(TINY + ["--epochs", "1", "--compare", "none,cayley", "--out", str(tmp_path)]) == 0
    text = (tmp_path / "compare.md").read_text()
    assert "| none |" in text and "| cayley | failed: cayley failed with ValueError: something odd |" in text
    assert "cayley" in json.loads((tmp_path / "compare.json").read_text())["failed"]


def test_compare_every_method_failing_is_one_error_line(tmp_path, monkeypatch):
    from opt_fast.train import compare

    def train(cfg):
        raise ValueError(f"{cfg.method} broke")

    monkeypatch.setattr(compare, "train", train)
    with pytest.raises(SystemExit) as e:
        main(TINY + ["--epochs", "1", "--compare", "none,cayley", "--out", str(tmp_path)])
    assert str(e.value.code).count("opt_fast.train: error:") == 1, e.value.code
    assert "none: none failed with ValueError: none broke; cayley: cayley failed with" in str(e.value.code)


def test_lm_compare_checks_every_name_first(tmp_path, monkeypatch):
    pytest.importorskip("transformers")
    from opt_fast.train.lm import compare
    monkeypatch.setattr(compare, "train_lm", lambda cfg: pytest.fail("trained before checking the names"))
    msg = _error(["--dataset", "stdlib", "--model", "llama-tiny", "--compare", "none,bogus", "--out", str(tmp_path)])
    assert "unknown run 'bogus'" in msg
    msg = _error(["--dataset", "stdlib", "--model", "llama-tiny", "--compare", "none,peft-lora", "--out",
                  str(tmp_path)])
    assert "needs --from-checkpoint" in msg


# ---- 4: --from-checkpoint of a run folder without model/ (a --stop-after run) ------------------------------------
def test_finetune_from_stopped_run_folder(tmp_path):
    pytest.importorskip("transformers")
    from opt_fast.train.lm.config import LMConfig
    from opt_fast.train.lm.loop import train_lm
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(400):  # ~1 % of the files land in finetune_validation
        (corpus / f"{i}.py").write_text(f"def f{i}(x):\n    return x + {i}\n" * 4)
    kw = dict(dataset="text", corpus=str(corpus), tokenizer="bytes", model="llama-tiny", seq_len=16, batch_size=2,
              val_tokens=32, eval_every=1, cache_dir=str(tmp_path / "cache"), progress=False, threads=1)
    pre = tmp_path / "pre"
    train_lm(LMConfig(steps=3, stop_after=1, out=str(pre), **kw))
    assert (pre / "config.json").is_file() and not (pre / "model").exists()
    m = train_lm(LMConfig(steps=1, from_checkpoint=str(pre), **kw))
    assert m["finetune"] and m["steps_done"] == 1
    lm = ["--dataset", "text", "--corpus", str(corpus), "--tokenizer", "bytes", "--steps", "1"]
    msg = _error(lm + ["--from-checkpoint", str(tmp_path / "nonexistent")])
    assert msg.startswith("opt_fast.train: error: --from-checkpoint ") and "--resume" not in msg
    (tmp_path / "junk.pt").write_bytes(b"junk")
    msg = _error(lm + ["--from-checkpoint", str(tmp_path / "junk.pt")])
    assert "--from-checkpoint" in msg and "--resume" not in msg and "not a readable checkpoint" in msg


# ---- 8: --help -----------------------------------------------------------------------------------------------------
def test_help_mentions_lm_cli_and_lm_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "--dataset stdlib --help" in " ".join(capsys.readouterr().out.split())
    pytest.importorskip("transformers")
    from opt_fast.train.lm.cli import parser
    text = " ".join(parser().format_help().split())
    for default in ("(default: 200)", "(default: 32)", "(default: 8)", "(default: 256)", "(default: 50)"):
        assert default in text, default
