"""Datasets for opt_fast.train: scikit-learn digits (offline default), CIFAR-10/100 from the official
python-format archive or folder, and synthetic tensors. Images are kept as uint8 [N, C, H, W] and mapped
by (x - 127.5) / 128 per batch (docs/training.md); augmentation (mirror "symmetric" pad 4 + random crop +
left-right flip, §1.5) is done on whole batches with a generator seeded from (seed, epoch, rank)."""
import os
import pickle
import tarfile
import zlib
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from .guards import PREFIX

CIFAR_URL = {"cifar10": "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
             "cifar100": "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"}
_LAYOUT = {  # folder inside the archive, train files, test file, label key
    "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], "test_batch", b"labels", 10),
    "cifar100": ("cifar-100-python", ["train"], "test", b"fine_labels", 100),
}
DATASETS = ("digits", "cifar10", "cifar100", "synthetic")


class DataError(SystemExit):
    """A one-line, actionable data error (exits the CLI with status 1)."""

    def __init__(self, msg):
        super().__init__(PREFIX + " ".join(msg.split()))   # one line, also when it quotes a multi-line error


@dataclass
class Data:
    x_train: Tensor  # uint8 [N, C, H, W]
    y_train: Tensor  # int64 [N]
    x_test: Tensor
    y_test: Tensor
    num_classes: int
    name: str

    @property
    def shape(self):
        return tuple(self.x_train.shape[1:])


def _to_uint8_images(arr, name):
    arr = np.asarray(arr)
    if arr.dtype != np.uint8 or arr.ndim != 2 or arr.shape[1] != 3072:
        raise DataError(f"{name}: b'data' must be a uint8 array [N, 3072], got {arr.dtype} {list(arr.shape)}; "
                        f"the file is not in the CIFAR python format")
    return torch.from_numpy(arr.reshape(-1, 3, 32, 32).copy())


def _parse_batch(raw: bytes, name: str, label_key: bytes):
    try:
        d = pickle.loads(raw, encoding="bytes")
    except Exception as e:  # UnpicklingError, EOFError, ValueError, ...
        raise DataError(f"{name} is not a readable CIFAR python-format pickle ({type(e).__name__}: {e}); "
                        f"re-download the archive") from None
    if not isinstance(d, dict) or b"data" not in d or label_key not in d:
        keys = sorted(k.decode() if isinstance(k, bytes) else str(k) for k in d) if isinstance(d, dict) else type(d).__name__
        raise DataError(f"{name} lacks b'data' or {label_key!r} (found {keys}); wrong dataset for this --dataset?")
    x = _to_uint8_images(d[b"data"], name)
    y = torch.as_tensor(np.asarray(d[label_key], dtype=np.int64))
    if y.shape != (x.shape[0],):
        raise DataError(f"{name}: {len(y)} labels for {x.shape[0]} images")
    return x, y


def load_cifar(name: str, data_dir: str) -> Data:
    folder, train_files, test_file, key, classes = _LAYOUT[name]
    hint = f"download {CIFAR_URL[name]} and pass the .tar.gz or the extracted folder as --data-dir"
    if not data_dir:
        raise DataError(f"--dataset {name} needs --data-dir; {hint}")
    if not os.path.exists(data_dir):
        raise DataError(f"--data-dir {data_dir} does not exist; {hint}")
    wanted = train_files + [test_file]
    raws = {}
    if os.path.isfile(data_dir):
        try:
            with tarfile.open(data_dir, "r:*") as tar:
                members = {m.name: m for m in tar.getmembers() if m.isfile()}
                for f in wanted:
                    m = members.get(f"{folder}/{f}")
                    if m is None:
                        raise DataError(f"{data_dir} has no {folder}/{f}; it is not the {name} python-format "
                                        f"archive ({hint})")
                    raws[f] = tar.extractfile(m).read()
        except (tarfile.TarError, EOFError, OSError, zlib.error) as e:   # zlib: a corrupt compressed block
            raise DataError(f"{data_dir} is not a readable .tar.gz ({type(e).__name__}: {e}); {hint}") from None
    else:
        base = os.path.join(data_dir, folder) if os.path.isdir(os.path.join(data_dir, folder)) else data_dir
        for f in wanted:
            p = os.path.join(base, f)
            if not os.path.isfile(p):
                raise DataError(f"{p} not found: --data-dir must be the {name} python-format folder "
                                f"({folder}/ or its parent); {hint}")
            with open(p, "rb") as fh:
                raws[f] = fh.read()
    parts = [_parse_batch(raws[f], f, key) for f in train_files]
    xt, yt = _parse_batch(raws[test_file], test_file, key)
    x = torch.cat([p[0] for p in parts])
    y = torch.cat([p[1] for p in parts])
    for lab, f in ((y, "train"), (yt, test_file)):
        if lab.numel() and (lab.min() < 0 or lab.max() >= classes):
            raise DataError(f"{name} {f}: labels outside 0..{classes - 1}; wrong dataset for --dataset {name}?")
    return Data(x, y, xt, yt, classes, name)


def load_digits(test_fraction: float = 0.2) -> Data:
    """scikit-learn's bundled 8x8 digits (1797 images, values 0..16 scaled to 0..255), split by a fixed
    permutation (numpy seed 0) independent of the training seed: 1438 train / 359 test."""
    from sklearn.datasets import load_digits as _ld

    d = _ld()
    x = np.round(d.images * (255.0 / 16.0)).astype(np.uint8)[:, None]  # [N, 1, 8, 8]
    y = d.target.astype(np.int64)
    perm = np.random.RandomState(0).permutation(len(y))
    n_test = int(round(test_fraction * len(y)))
    te, tr = perm[:n_test], perm[n_test:]
    return Data(torch.from_numpy(x[tr]), torch.from_numpy(y[tr]), torch.from_numpy(x[te]),
                torch.from_numpy(y[te]), 10, "digits")


def load_synthetic(shape=(3, 32, 32), n_train=256, n_test=128, classes=10) -> Data:
    """Random images with labels tied to the mean of a class-specific pattern (learnable, fixed seed)."""
    g = torch.Generator().manual_seed(1234)
    n = n_train + n_test
    y = torch.randint(classes, (n,), generator=g)
    protos = torch.rand((classes,) + tuple(shape), generator=g) * 255
    x = (0.5 * protos[y] + 0.5 * torch.rand((n,) + tuple(shape), generator=g) * 255).round().to(torch.uint8)
    return Data(x[:n_train], y[:n_train], x[n_train:], y[n_train:], classes, "synthetic")


def load(name: str, data_dir: str = None, synthetic_shape=(3, 32, 32)) -> Data:
    if name == "digits":
        if data_dir:
            raise DataError("--data-dir is not used by --dataset digits (bundled with scikit-learn); drop it "
                            "or choose --dataset cifar10/cifar100")
        return load_digits()
    if name in ("cifar10", "cifar100"):
        return load_cifar(name, data_dir)
    if name == "synthetic":
        return load_synthetic(synthetic_shape)
    raise DataError(f"unknown --dataset {name!r}; choose one of {', '.join(DATASETS)}")


def normalize(x: Tensor) -> Tensor:
    return (x.float() - 127.5) / 128.0


def _symmetric_index(n: int, pad: int) -> Tensor:
    # numpy "symmetric": mirror that includes the edge pixel (3,2,1,0 | 0..n-1 | n-1,n-2,...)
    i = torch.arange(-pad, n + pad)
    i = torch.where(i < 0, -i - 1, i)
    return torch.where(i >= n, 2 * n - 1 - i, i)


def augment(x: Tensor, generator: torch.Generator, pad: int = 4) -> Tensor:
    """Mirror-pad by ``pad``, random crop back (offsets 0..2·pad) and flip left-right with p = 0.5."""
    N, C, H, W = x.shape
    oy = torch.randint(0, 2 * pad + 1, (N,), generator=generator)
    ox = torch.randint(0, 2 * pad + 1, (N,), generator=generator)
    flip = torch.rand(N, generator=generator) < 0.5
    rows = _symmetric_index(H, pad)[oy[:, None] + torch.arange(H)]          # [N, H]
    cols = ox[:, None] + torch.arange(W)
    cols = torch.where(flip[:, None], cols.flip(1), cols)
    cols = _symmetric_index(W, pad)[cols]                                    # [N, W]
    n = torch.arange(N)[:, None, None, None]
    c = torch.arange(C)[None, :, None, None]
    return x[n, c, rows[:, None, :, None], cols[:, None, None, :]]
