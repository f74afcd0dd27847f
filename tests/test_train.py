"""Tests of opt_fast.train: CIFAR loading, DDP, resume, atomic checkpoints, CLI. Tiny models/data only."""
import io
import json
import os
import pickle
import socket
import subprocess
import sys
import tarfile

import numpy as np
import pytest
import torch

from opt_fast.nn import merge
from opt_fast.train import TrainConfig, train
from opt_fast.train import checkpoint as ckpt
from opt_fast.train import data as D

PY = sys.executable
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tiny(**kw):
    base = dict(dataset="synthetic", model="small", epochs=2, batch_size=128, method="gram_schmidt",
                progress=False, bn_momentum=0.1, threads=1)
    base.update(kw)
    return TrainConfig(**base)


# ---- CIFAR python format ----------------------------------------------------------------------------------
def _batch(n, key, classes, rng):
    return pickle.dumps({b"batch_label": b"x", b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                         key: rng.integers(0, classes, n).tolist()})


def _write_cifar(root, name):
    rng = np.random.default_rng(0)
    if name == "cifar10":
        folder, files, key, c = "cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"], b"labels", 10
    else:
        folder, files, key, c = "cifar-100-python", ["train", "test"], b"fine_labels", 100
    os.makedirs(os.path.join(root, folder))
    for f in files:
        with open(os.path.join(root, folder, f), "wb") as fh:
            fh.write(_batch(3, key, c, rng))
    return os.path.join(root, folder)


@pytest.mark.parametrize("name,n_train", [("cifar10", 15), ("cifar100", 3)])
def test_cifar_folder_and_targz(tmp_path, name, n_train):
    folder = _write_cifar(str(tmp_path / "x"), name)
    for where in (folder, os.path.dirname(folder)):
        d = D.load(name, where)
        assert d.x_train.shape == (n_train, 3, 32, 32) and d.x_train.dtype == torch.uint8
        assert d.x_test.shape == (3, 3, 32, 32) and d.num_classes == (10 if name == "cifar10" else 100)
    tgz = str(tmp_path / "a.tar.gz")
    with tarfile.open(tgz, "w:gz") as tar:
        tar.add(folder, arcname=os.path.basename(folder))
    d2 = D.load(name, tgz)
    assert torch.equal(d2.x_train, d.x_train) and torch.equal(d2.y_test, d.y_test)
    # the data layout is the official one: row = 1024 R, 1024 G, 1024 B, each row-major 32x32
    with open(os.path.join(folder, "test_batch" if name == "cifar10" else "test"), "rb") as f:
        raw = pickle.load(f, encoding="bytes")[b"data"]
    assert torch.equal(d.x_test[1, 2, 0], torch.from_numpy(raw[1, 2048:2080]))


def test_cifar_bad_inputs(tmp_path):
    folder = _write_cifar(str(tmp_path / "x"), "cifar10")
    with open(os.path.join(folder, "data_batch_3"), "wb") as f:
        f.write(b"not a pickle at all")
    with pytest.raises(SystemExit, match="data_batch_3 is not a readable CIFAR"):
        D.load("cifar10", folder)
    with open(os.path.join(folder, "data_batch_3"), "wb") as f:
        f.write(pickle.dumps({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}))
    with pytest.raises(SystemExit, match=r"uint8 array \[N, 3072\]"):
        D.load("cifar10", folder)
    os.remove(os.path.join(folder, "data_batch_3"))
    with pytest.raises(SystemExit, match="data_batch_3 not found"):
        D.load("cifar10", folder)
    with pytest.raises(SystemExit, match="does not exist"):
        D.load("cifar10", str(tmp_path / "nope"))
    with pytest.raises(SystemExit, match="needs --data-dir"):
        D.load("cifar100", None)
    with pytest.raises(SystemExit, match="train not found"):  # a CIFAR-10 folder is not CIFAR-100: no fallback
        D.load("cifar100", folder)
    bad = tmp_path / "bad.tar.gz"
    bad.write_bytes(b"\x1f\x8b garbage")
    with pytest.raises(SystemExit, match="not a readable .tar.gz"):
        D.load("cifar10", str(bad))


def test_augment_is_mirror_pad_crop_flip():
    x = torch.arange(2 * 3 * 32 * 32).reshape(2, 3, 32, 32) % 251
    x = x.to(torch.uint8)
    y = D.augment(x, torch.Generator().manual_seed(0))
    padded = torch.from_numpy(np.pad(x.numpy(), ((0, 0), (0, 0), (4, 4), (4, 4)), mode="symmetric"))
    for n in range(2):  # every output is some crop of the symmetric padding, maybe flipped
        ok = any(torch.equal(y[n], c) or torch.equal(y[n], c.flip(-1))
                 for i in range(9) for j in range(9) for c in [padded[n, :, i:i + 32, j:j + 32]])
        assert ok


# ---- resume, checkpoints, export ---------------------------------------------------------------------------
def _same(a, b):
    return torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b


def _strip(hist):
    return [{k: v for k, v in h.items() if k != "time_per_step"} for h in hist]


def test_resume_equals_uninterrupted(tmp_path):
    full, m_full = train(_tiny(out=str(tmp_path / "full")), return_model=True)
    part = train(_tiny(out=str(tmp_path / "part"), stop_after=1))
    assert part["epochs_done"] == 1
    res, m_res = train(_tiny(out=str(tmp_path / "res"), resume=str(tmp_path / "part" / "checkpoint.pt")),
                       return_model=True)
    assert _strip(res["history"]) == _strip(full["history"])
    sd1, sd2 = m_full.state_dict(), m_res.state_dict()
    assert sd1.keys() == sd2.keys() and all(_same(sd1[k], sd2[k]) for k in sd1)
    state = torch.load(tmp_path / "res" / "checkpoint.pt", weights_only=False)
    assert state["epoch"] == 2 and {"torch", "numpy", "python"} <= state["rng"].keys()
    assert any(k.endswith("W0") for k in state["model"])
    # resuming a checkpoint of another method is refused with a one-line message
    with pytest.raises(SystemExit, match="--method 'gram_schmidt'.*start a fresh run"):
        train(_tiny(method="cayley", resume=str(tmp_path / "part" / "checkpoint.pt")))


def test_interrupted_checkpoint_write_keeps_previous(tmp_path, monkeypatch):
    path = str(tmp_path / "checkpoint.pt")
    ckpt.atomic_save({"epoch": 1, "w": torch.ones(3)}, path)
    real_save = torch.save

    def broken(obj, f, *a, **k):
        f.write(b"half a checkpoint")
        raise OSError("disk died mid-write")

    monkeypatch.setattr(torch, "save", broken)
    with pytest.raises(OSError, match="mid-write"):
        ckpt.atomic_save({"epoch": 2, "w": torch.zeros(3)}, path)
    monkeypatch.setattr(torch, "save", real_save)
    state = ckpt.load(path)
    assert state["epoch"] == 1 and torch.equal(state["w"], torch.ones(3))
    assert os.listdir(tmp_path) == ["checkpoint.pt"]  # no temp file left behind
    (tmp_path / "junk.pt").write_bytes(b"garbage")
    with pytest.raises(SystemExit, match="not a readable checkpoint"):
        ckpt.load(str(tmp_path / "junk.pt"))


def test_export_merged_model_and_stochastic(tmp_path):
    exp = str(tmp_path / "plain.pt")
    cfg = _tiny(method="cayley", epochs=2, stochastic=0.5, episode_epochs=1, export=exp, out=str(tmp_path / "r"))
    met, model = train(cfg, return_model=True)
    drift = max(met["max_energy_drift"].values())
    assert drift < 1e-4  # resample keeps the function and the neurons' energy
    plain = merge(model)
    sd = torch.load(exp)
    plain.load_state_dict(sd)
    assert not any(k.endswith("W0") for k in sd)
    x = D.normalize(D.load_synthetic((1, 8, 8)).x_test[:8])
    model.eval(), plain.eval()
    with torch.no_grad():
        torch.testing.assert_close(plain(x), model(x), rtol=1e-4, atol=1e-4)
    for f in ("metrics.json", "accuracy.png", "energy.png", "checkpoint.pt"):
        assert os.path.isfile(tmp_path / "r" / f)


def test_bad_options():
    with pytest.raises(SystemExit, match="--stochastic needs a method"):
        train(_tiny(method="householder", stochastic=0.25))
    with pytest.raises(SystemExit, match="unknown --model 'vgg99'"):
        train(_tiny(model="vgg99"))
    with pytest.raises(SystemExit, match="needs 32x32 inputs"):
        train(_tiny(model="cnn6", dataset="digits"))


# ---- DDP ---------------------------------------------------------------------------------------------------
def _ddp_worker(rank, world, port, tmp):
    import torch.distributed as dist
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    dist.init_process_group("gloo")  # one group for both runs (train() reuses an initialised group)
    try:
        for method in ("gram_schmidt", "ogd"):  # grouped op calls; CayleySGD on DDP-averaged gradients
            out = os.path.join(tmp, method)
            met, model = train(_tiny(method=method, epochs=1, batch_size=64, out=out), return_model=True)
            torch.save(model.state_dict(), os.path.join(tmp, f"{method}_p{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_two_process_gloo(tmp_path):
    torch.multiprocessing.spawn(_ddp_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    for method in ("gram_schmidt", "ogd"):
        p0, p1 = (torch.load(tmp_path / f"{method}_p{r}.pt", weights_only=False) for r in (0, 1))
        assert all(_same(p0[k], p1[k]) for k in p0), method  # replicas identical after training
        start = train(_tiny(method=method, epochs=1, stop_after=1, lr=1e-9, ogd_lr=1e-9), return_model=True)[1]
        sd = start.state_dict()
        moved = [k for k in p0 if k.endswith((".P", ".R")) and not torch.allclose(p0[k], sd[k], atol=1e-6)]
        assert moved, method  # the OPT parameters trained
        met = json.load(open(tmp_path / method / "metrics.json"))
        assert met["world_size"] == 2 and met["epochs_done"] == 1
    assert not (tmp_path / "gram_schmidt" / "rank1").exists()


# ---- CLI ---------------------------------------------------------------------------------------------------
def _cli(*args, cwd=ROOT):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([PY, "-m", "opt_fast.train", *args], cwd=cwd, capture_output=True, text=True, env=env,
                          timeout=120)


def test_cli_smoke_and_errors(tmp_path):
    r = _cli("--dataset", "synthetic", "--epochs", "1", "--batch-size", "64", "--out", str(tmp_path / "o"),
             "--method", "householder", "--no-progress")
    assert r.returncode == 0, r.stderr
    met = json.load(open(tmp_path / "o" / "metrics.json"))
    assert met["method"] == "householder" and len(met["history"]) == 1
    assert "epoch 1/1" in r.stdout and "energy drift" in r.stdout
    r = _cli("--method", "bogus")
    lines = r.stderr.strip().splitlines()
    assert r.returncode != 0 and len(lines) == 1, r.stderr
    assert lines[0].startswith("opt_fast.train: error: unknown --method 'bogus'; choose one of cayley")
    from opt_fast.train.cli import main
    for args, msg in [(["--dataset", "cifar10", "--data-dir", str(tmp_path / "none")], "does not exist"),
                      (["--epochs", "x"], "invalid int value"),
                      (["--dataset", "synthetic", "--method", "ogd", "--stochastic", "0.5"], "--stochastic needs")]:
        with pytest.raises(SystemExit) as e:
            main(args)
        assert str(e.value).startswith("opt_fast.train: error:") and msg in str(e.value)
        assert "\n" not in str(e.value)


def test_compare_writes_table_and_plot(tmp_path):
    from opt_fast.train.compare import run_compare
    run_compare(_tiny(epochs=1, out=str(tmp_path)), ["none", "cayley"], argv=["--compare", "none,cayley"])
    text = (tmp_path / "compare.md").read_text()
    assert "| cayley |" in text and "| none |" in text and "Drift bound verdict: cayley:" in text
    assert (tmp_path / "compare.png").is_file()
