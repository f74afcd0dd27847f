"""Atomic checkpoint writes: temp file in the target folder, fsync, os.replace (a crash mid-write leaves
the previous file intact)."""
import os
import tempfile

import torch


def atomic_save(obj, path: str) -> None:
    """torch.save(obj) to path, atomically."""
    atomic_write(path, lambda f: torch.save(obj, f))


def atomic_write(path: str, write) -> None:
    """write(f) into a temp file beside path (binary), then rename it to path."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    try:  # make the rename itself durable
        dfd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass


def load(path: str):
    if not os.path.isfile(path):
        raise SystemExit(f"opt_fast.train: error: --resume {path}: no such checkpoint file")
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise SystemExit(f"opt_fast.train: error: --resume {path} is not a readable checkpoint "
                         f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                         f"use an earlier one") from None
