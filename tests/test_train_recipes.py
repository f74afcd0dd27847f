"""What the README promises about training: the default recipe trains every method on digits, the README's
numbers are the CLI's own report (docs/results/digits/compare.md) and its commands reproduce them; the
released recipe stays reachable (--recipe reference); a large train/test gap is explained; missing
training extras are named at start; --help shows every default."""
import json
import os
import re
import shlex
import subprocess
import sys

import pytest
import torch
from torch import nn

from opt_fast.train import TrainConfig, train
from opt_fast.train import cli, diagnostics
from opt_fast.train.compare import budget_line
from opt_fast.train.recipes import RECIPES, resolve

PY = sys.executable
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))
import publish_compare  # noqa: E402

REPORT = os.path.join(ROOT, "docs", "results", "digits", "compare.md")
EXACT = ("cayley", "gram_schmidt", "householder", "householder_qr", "lowdin")
# Reruns on another CPU (another BLAS code path) may differ by a few of the 359 test images.
TOL = 0.015


def _read(path):
    with open(path, encoding="utf-8") as f:
        return f.read()


def readme_commands():
    """The `python -m opt_fast.train` lines of the README's Training section, as argument lists."""
    section = _read(os.path.join(ROOT, "README.md")).split("## Training", 1)[1].split("\n## ", 1)[0]
    return [shlex.split(line.split("#", 1)[0])[3:] for line in section.splitlines()
            if line.startswith("python -m opt_fast.train")]


def _with_out(args, out):
    args = list(args)
    args[args.index("--out") + 1] = str(out)
    return args


def table(text):
    """{method: final test accuracy} from a report's test-accuracy table."""
    rows = publish_compare.accuracy_table(text).splitlines()[2:]
    return {r.split("|")[1].strip(): float(r.split("|")[2]) for r in rows}


def _cli(args, timeout=900):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([PY, "-m", "opt_fast.train", *args], cwd=ROOT, capture_output=True, text=True, env=env,
                          timeout=timeout)


# ---- the README and its report ------------------------------------------------------------------------------
def test_readme_table_is_the_committed_cli_report():
    report = _read(REPORT)
    readme = _read(os.path.join(ROOT, "README.md"))
    assert publish_compare.readme_table(readme) == publish_compare.accuracy_table(report)
    single, compare = readme_commands()[:2]
    assert "--compare" in compare and "--compare" not in single
    # the report was made by the README's command, with the current defaults
    cmd = re.search(r"^\* command: `python -m opt_fast\.train (.*)`$", report, re.M).group(1)
    assert shlex.split(cmd) == compare
    args = vars(cli.parser().parse_args(compare))
    args.pop("compare")
    args["lr_milestones"] = tuple(float(x) for x in args["lr_milestones"].split(","))
    assert budget_line(resolve(TrainConfig(**args))) in report.splitlines()
    accs = table(report)
    assert set(accs) == {"cayley", "gram_schmidt", "householder", "householder_qr", "lowdin", "ogd", "orth_reg",
                         "none"}
    assert min(accs.values()) >= 0.95, accs  # every method trains with the defaults
    for m in EXACT:  # the soft constraint is a usable baseline: within 3 pp of every exact method
        assert abs(accs["orth_reg"] - accs[m]) <= 0.03, (m, accs)


def test_readme_single_run_reproduces_its_row(tmp_path):
    single = readme_commands()[0]
    method = vars(cli.parser().parse_args(single))["method"]
    r = _cli(_with_out(single, tmp_path / "run"))
    assert r.returncode == 0, r.stderr
    acc = float(re.search(r"final test accuracy ([0-9.]+)", r.stdout).group(1))
    assert acc == pytest.approx(table(_read(REPORT))[method], abs=TOL)
    assert acc >= 0.95 and "warning" not in r.stderr
    assert json.load(open(tmp_path / "run" / "metrics.json"))["warnings"] == []


def test_readme_compare_reproduces_cheap_rows(tmp_path):
    """The README's --compare command, restricted to the two methods without an op (seconds each)."""
    compare = _with_out(readme_commands()[1], tmp_path)
    compare[compare.index("--compare") + 1] = "none,orth_reg"
    r = _cli(compare)
    assert r.returncode == 0, r.stderr
    fresh = table(_read(tmp_path / "compare.md"))
    committed = table(_read(REPORT))
    for m in ("none", "orth_reg"):
        assert fresh[m] == pytest.approx(committed[m], abs=TOL), (m, fresh, committed)


# ---- recipes --------------------------------------------------------------------------------------------------
def test_recipes_resolve_and_explicit_values_win():
    ref = resolve(TrainConfig(recipe="reference"))
    assert (ref.epochs, ref.lr, ref.warmup_epochs, ref.bn_momentum) == (192, 0.1, 0.0, 1e-3)
    assert (ref.init, ref.orth_reg_weight, ref.orth_reg_penalty, ref.reference_loss) == ("reference", 0.1, "norm", True)
    d = resolve(TrainConfig())
    assert {k: getattr(d, k) for k in RECIPES["default"]} == RECIPES["default"]
    assert resolve(TrainConfig(recipe="reference", bn_momentum=0.2)).bn_momentum == 0.2
    with pytest.raises(SystemExit, match="unknown --recipe 'fast'; choose one of default, reference"):
        train(TrainConfig(recipe="fast"))


def test_reference_recipe_runs_the_released_orth_reg(tmp_path):
    cfg = TrainConfig(recipe="reference", method="orth_reg", dataset="synthetic", epochs=1, progress=False,
                      out=str(tmp_path))
    met, model = train(cfg, return_model=True)
    saved = json.load(open(tmp_path / "config.json"))
    assert saved["recipe"] == "reference" and saved["bn_momentum"] == 1e-3 and saved["reference_loss"] is True
    assert all(m.momentum == 1e-3 for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    R = model.fc6.R.detach()  # the released N(0, 1) R, far from orthogonal; the default starts orthogonal
    assert abs(R.square().mean().item() - 1) < 0.2
    assert met["orthogonality_error"] > 10
    default = train(TrainConfig(method="orth_reg", dataset="synthetic", epochs=1, progress=False, lr=1e-9),
                    return_model=True)[1]
    R = default.fc6.R.detach()
    torch.testing.assert_close(R @ R.T, torch.eye(R.shape[0]), atol=1e-4, rtol=0)


# ---- the end-of-run gap warning ---------------------------------------------------------------------------
def test_gap_warning_blames_bn_running_stats():
    met = train(TrainConfig(method="none", bn_momentum=1e-3, epochs=2, progress=False))
    assert len(met["warnings"]) == 1
    w = met["warnings"][0]
    assert "batch statistics" in w and "--bn-momentum 0.001 over 22 steps" in w and "--bn-momentum" in w


def test_gap_warning_without_bn_says_overfitting():
    def evaluate(*args, batch_stats=False):
        raise AssertionError("no BatchNorm: nothing to re-evaluate")

    cfg = TrainConfig(bn_momentum=0.1)
    hist = [{"train_acc": 1.0, "test_acc": 0.5}]
    w = diagnostics.gap_warning(nn.Linear(3, 3), cfg, hist, 100, evaluate)
    assert "overfitting" in w and "50 pp" in w
    assert diagnostics.gap_warning(nn.Linear(3, 3), cfg, [{"train_acc": 1.0, "test_acc": 0.95}], 100, evaluate) is None


# ---- extras and --help --------------------------------------------------------------------------------------
def test_missing_extras_named_at_start(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn", None)      # import raises ImportError
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(SystemExit) as e:
        cli.main(["--out", str(tmp_path / "run"), "--no-progress"])
    msg = str(e.value)
    assert "\n" not in msg and "pip install 'opt-fast[train]'" in msg
    assert "scikit-learn (for --dataset digits)" in msg and "matplotlib (for the plots in --out)" in msg
    assert not (tmp_path / "run").exists()  # refused before anything ran or was written
    with pytest.raises(SystemExit, match=r"matplotlib .*opt-fast\[train\]"):
        cli.main(["--compare", "none", "--dataset", "synthetic", "--out", str(tmp_path / "cmp")])


def test_help_shows_every_default():
    text = cli.parser().format_help()
    options = text.split("options:", 1)[1]
    blocks = re.split(r"\n  (?=-)", options)[1:]
    missing = [b.split()[0] for b in blocks if "default" not in b and not b.startswith("-h")]
    assert not missing, missing
    assert "(default: 10; 192 with --recipe reference)" in " ".join(text.split())


def test_diverged_parameters_fail_with_a_message(monkeypatch):
    """Seen in a sweep (lowdin from R = I): the forward's SVD failed to converge. That ends in a one-line
    error saying what happened and what to change, not a LinAlgError traceback; a NaN loss likewise."""
    from opt_fast.nn import methods
    lowdin = methods.functional.lowdin

    def no_convergence(P, iters=0, R0=None):  # the training forward fails; no-grad diagnostics still work
        if torch.is_grad_enabled():
            raise torch.linalg.LinAlgError("linalg.svd: (Batch element 0): The algorithm failed to converge "
                                           "because the input matrix is ill-conditioned or has too many repeated "
                                           "singular values (error code: 1).")
        return lowdin(P, iters, R0)

    with monkeypatch.context() as m:
        m.setattr(methods.functional, "lowdin", no_convergence)
        with pytest.raises(SystemExit, match=r"forward failed at epoch 1 step 1 \(method lowdin\): linalg.svd.*"
                                             r"The parameters are finite: the op failed") as e:
            train(TrainConfig(method="lowdin", dataset="synthetic", epochs=1, progress=False))
    assert "\n" not in str(e.value)
    with pytest.raises(SystemExit, match=r"loss became nan at epoch 1 step 2 \(method none\); lower --lr"):
        train(TrainConfig(method="none", dataset="synthetic", epochs=1, progress=False, lr=1e38))   # (NaN: refused)


def test_lowdin_float32_svd_failure_falls_back_to_float64(monkeypatch):
    """MKL's float32 SVD failed to converge on a finite near-orthogonal P produced by lowdin training from
    R = I (the default recipe's start); functional.lowdin then redoes the polar factor in float64."""
    from types import SimpleNamespace

    from opt_fast import functional
    real = torch.ops.opt_fast

    def flaky(op):
        def call(P, *args):
            if P.dtype == torch.float32:
                raise torch.linalg.LinAlgError("linalg.svd: The algorithm failed to converge (error code: 1).")
            return getattr(real, op)(P, *args)
        return call

    monkeypatch.setattr(functional, "_ops", SimpleNamespace(lowdin=flaky("lowdin"), lowdin_svd=flaky("lowdin_svd")))
    torch.manual_seed(0)
    P = (torch.eye(8) + 0.1 * torch.randn(8, 8)).requires_grad_()
    R = functional.lowdin(P)
    U, _, Vh = torch.linalg.svd(P.detach().double())
    assert R.dtype == torch.float32
    torch.testing.assert_close(R.double(), U @ Vh, atol=1e-6, rtol=0)
    R.sum().backward()
    assert P.grad is not None and torch.isfinite(P.grad).all()
    with torch.no_grad():
        torch.testing.assert_close(functional.lowdin(P, 0, R).double(), U @ Vh, atol=1e-6, rtol=0)
    with pytest.raises(torch.linalg.LinAlgError):  # float64 failures are not hidden
        monkeypatch.setattr(functional, "_ops", SimpleNamespace(lowdin_svd=lambda P: flaky("x")(P.float())))
        functional.lowdin(P.double().detach().requires_grad_())
