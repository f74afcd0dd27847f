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
    (["--weight-decay", "-1"], "--weight-decay must be finite and >= 0"),
    (["--label-smoothing", "2"], "--label-smoothing must be in [0, 1)"),
    (["--threads", "-1"], "--threads must be in 1..1024"),
    (["--threads", "100000"], "--threads must be in 1..1024"),
    (["--seed", "-1"], "--seed must be in 0..4294967295"),
    (["--seed", "99999999999999999999"], "--seed must be in 0..4294967295"),
    (["--lr", "nan"], "--lr and --ogd-lr must be finite and > 0"),
    (["--lr", "inf"], "--lr and --ogd-lr must be finite and > 0"),
    (["--ogd-lr", "nan"], "--lr and --ogd-lr must be finite and > 0"),
    (["--warmup-epochs", "nan"], "--warmup-epochs and --orth-reg-weight must be finite"),
    (["--orth-reg-weight", "nan"], "--warmup-epochs and --orth-reg-weight must be finite"),
    (["--weight-decay", "nan"], "--weight-decay must be finite"),
    (["--lr-gamma", "nan"], "--lr-gamma and --bn-eps must be finite"),
    (["--bn-eps", "inf"], "--lr-gamma and --bn-eps must be finite"),
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
    assert "--clip must be finite and >= 0" in _error(lm + ["--clip", "-1"])
    assert "--clip must be finite and >= 0" in _error(lm + ["--clip", "nan"])
    assert "--threads must be in 1..1024" in _error(lm + ["--threads", "-1"])
    assert "--seed must be in 0..4294967295" in _error(lm + ["--seed", "-1"])
    for flag in ("--lr", "--opt-lr", "--weight-decay"):
        assert "must be finite" in _error(lm + [flag, "nan"])
    assert "--lr and --opt-lr must be finite" in _error(lm + ["--lr", "inf"])
    assert "--corpus-mb must be finite and > 0" in _error(lm + ["--corpus-mb", "nan"])
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


# ---- audit: saved runs are not overwritten by a resume into another folder or by --export ------------------------
def test_resume_into_another_runs_folder_and_export_onto_a_file_are_refused(tmp_path):
    a, b = tmp_path / "A", tmp_path / "B"
    assert main(TINY + ["--out", str(a), "--stop-after", "1"]) == 0
    assert main(TINY + ["--out", str(b), "--seed", "5", "--stop-after", "1"]) == 0
    saved = {p: p.read_bytes() for p in (a / "checkpoint.pt", b / "checkpoint.pt")}
    msg = _error(TINY + ["--resume", str(a / "checkpoint.pt"), "--out", str(b)])
    assert "holds another run" in msg and "would overwrite" in msg
    msg = _error(TINY + ["--export", str(a / "checkpoint.pt")])
    assert "already exists" in msg
    assert all(p.read_bytes() == data for p, data in saved.items())
    (b / "checkpoint.pt").unlink()   # a finished run whose checkpoint was deleted keeps its results too
    (b / "metrics.json").write_text("{}")
    assert "already holds a finished run's results" in _error(TINY + ["--out", str(b)])
    assert "holds another run (metrics.json)" in _error(TINY + ["--resume", str(a / "checkpoint.pt"),
                                                                "--out", str(b)])
    # its own folder, or a fresh one, are fine
    assert main(TINY + ["--resume", str(a / "checkpoint.pt"), "--out", str(tmp_path / "C")]) == 0
    assert main(TINY + ["--resume", str(a / "checkpoint.pt"), "--out", str(a)]) == 0


def test_corrupt_archive_is_one_line(tmp_path):
    import io
    import tarfile
    import zlib
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name in ("train", "test"):
            data = b"abc" * 100_000
            info = tarfile.TarInfo("cifar-100-python/" + name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    raw = buf.getvalue()
    gz = zlib.compressobj(9, zlib.DEFLATED, 31)
    head = gz.compress(raw[:200_000]) + gz.flush(zlib.Z_FULL_FLUSH)   # a block boundary past the headers
    corrupt = bytearray(head + gz.compress(raw[200_000:]) + gz.flush())
    corrupt[len(head)] |= 0x06   # the next block's type 11: zlib.error while reading, not a TarError at open
    path = tmp_path / "c100.tar.gz"
    path.write_bytes(bytes(corrupt))
    msg = _error(["--dataset", "cifar100", "--model", "cnn6", "--data-dir", str(path), "--epochs", "1"])
    assert "is not a readable .tar.gz (error: Error -3" in msg
    not_tar = tmp_path / "notes.txt"   # tarfile's ReadError spans several lines: quoted on one
    not_tar.write_text("not an archive\n")
    assert "is not a readable .tar.gz" in _error(["--dataset", "cifar100", "--model", "cnn6", "--data-dir",
                                                  str(not_tar), "--epochs", "1"])


def test_abbreviated_flags_pick_the_lm_workflow_as_argparse_reads_them():
    from opt_fast.train.lm.cli import wants_lm
    assert wants_lm(["--datas", "stdlib"]) and wants_lm(["--mod=llama-tiny"]) and wants_lm(["--dataset=text"])
    assert not wants_lm(["--dataset", "digits", "--momentum", "0.9"]) and not wants_lm(["--model", "small"])


def test_from_checkpoint_of_a_peft_run_points_to_its_model_folder(tmp_path):
    pytest.importorskip("transformers")
    from opt_fast.train.lm.finetune import load_base
    run = tmp_path / "lora"
    run.mkdir()
    path = _fake_checkpoint(run / "checkpoint.pt", ckpt.LM_FORMAT, method="peft-lora", model="llama-tiny")
    with pytest.raises(SystemExit, match=r"peft-lora fine-tuning run's checkpoint .*merged model/ folder \(.*lora/model\)"):
        load_base(path)
