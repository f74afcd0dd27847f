"""Atomic checkpoint writes: temp file in the target folder, fsync, os.replace (a crash mid-write leaves
the previous file intact)."""
import os
import shlex
import sys
import tempfile

import torch

from .guards import PREFIX, fail


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


def load(path: str, flag: str = "--resume"):
    """The object in checkpoint ``path``; a one-line error naming ``flag`` if it is missing or unreadable."""
    if not os.path.isfile(path):
        fail(f"{flag} {path}: " + ("a folder, not a checkpoint file (pass its checkpoint.pt)" if os.path.isdir(path)
                                   else "no such checkpoint file"))
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise SystemExit(f"{PREFIX}{flag} {path} is not a readable checkpoint "
                         f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                         f"use an earlier one") from None


CNN_FORMAT = "opt_fast.train/1"
LM_FORMAT = "opt_fast.train.lm/1"


def check_format(state, path: str, want: str, flag: str = "--resume") -> None:
    """Refuse (one line) a checkpoint that is not a training checkpoint of the workflow ``want`` (CNN_FORMAT
    or LM_FORMAT), saying what it is and which command takes it."""
    fmt = state.get("format") if isinstance(state, dict) else None
    if fmt == want:
        return
    saved = state.get("config", {}) if isinstance(state, dict) else {}
    if fmt == LM_FORMAT:
        fail(f"{flag} {path} is an LM checkpoint (--model {saved.get('model', 'llama-*')}); use the LM workflow: "
             f"python -m opt_fast.train --dataset {saved.get('dataset', 'stdlib')} --model "
             f"{saved.get('model', 'llama-tiny')} ... {flag} {path}")
    if fmt == CNN_FORMAT:
        fail(f"{flag} {path} is a CNN checkpoint of opt_fast.train (--model {saved.get('model')}, --dataset "
             f"{saved.get('dataset')}), not an LM one; resume it without --dataset stdlib/text and --model llama-*: "
             f"python -m opt_fast.train --model {saved.get('model')} --dataset {saved.get('dataset')} ... "
             f"--resume {path}")
    fail(f"{flag} {path} is not a training checkpoint of opt_fast.train (no 'format' {want!r}; an --export "
         f"state_dict or another file?); pass the checkpoint.pt of a run folder")


def check_out(out, export=None) -> None:
    """At start, before any training: --out must be a folder we can create and write in, --export a file
    path whose folder we can write in (one-line errors, never a traceback at the end of training)."""
    if out:
        if os.path.exists(out) and not os.path.isdir(out):
            fail(f"--out {out} is an existing file, not a folder; pick another --out")
        why = _unwritable(out)
        if why:
            fail(f"--out {out} is not a writable folder ({why}); pick another --out")
    if export:
        if os.path.isdir(export):
            fail(f"--export {export} is a folder; give a file path (e.g. {os.path.join(export, 'plain.pt')})")
        if os.path.exists(export):   # e.g. a run's resumable checkpoint.pt: never replaced without asking
            fail(f"--export {export} already exists; pick another path (or delete that file)")
        folder = os.path.dirname(os.path.abspath(export))
        why = _unwritable(folder)
        if why:
            fail(f"--export {export}: its folder {folder} is not writable ({why}); pick another --export path")


def _unwritable(folder: str):
    """None if ``folder`` can be created and written in, else why not."""
    try:
        os.makedirs(folder, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        return e.strerror or type(e).__name__
    return None


def refuse_overwrite(out, resume, extra: str = "") -> None:
    """A run must not silently overwrite an earlier run in --out (its checkpoint.pt, or the metrics.json of a
    finished run whose checkpoint was deleted): a fresh run refuses such a folder, and so does a resumed one
    unless it is the folder of the checkpoint it resumes."""
    if not out:
        return
    path = os.path.join(out, "checkpoint.pt")
    if resume:
        own = os.path.realpath(os.path.dirname(os.path.abspath(resume))) == os.path.realpath(out)
        held = [f for f in ("checkpoint.pt", "metrics.json") if os.path.isfile(os.path.join(out, f))]
        if held and not own:
            fail(f"--out {out} holds another run ({', '.join(held)}) than the checkpoint resumed ({resume}): "
                 f"resuming into it would overwrite that run; pick a fresh --out (or the resumed run's own "
                 f"folder, {os.path.dirname(os.path.abspath(resume))})")
        return
    if os.path.isfile(path):
        fail(f"--out {out} already holds a run's checkpoint ({path}); pass --resume {path} to continue it, "
             f"or pick another --out (or delete that folder) for a fresh run{extra}")
    if os.path.isfile(os.path.join(out, "metrics.json")):
        fail(f"--out {out} already holds a finished run's results ({os.path.join(out, 'metrics.json')}); pick "
             f"another --out (or delete that folder) for a fresh run{extra}")


def interrupted(out, resume, argv, compare=False) -> int:
    """Ctrl-C: one line saying where the last checkpoint is and how to continue; exit status 130."""
    sys.stderr.write("\n")
    if compare:
        sys.stderr.write(f"opt_fast.train: interrupted: --compare stopped; the runs so far are in {out}\n")
        return 130
    path = os.path.join(out, "checkpoint.pt") if out and os.path.isfile(os.path.join(out, "checkpoint.pt")) else resume
    if not path:
        sys.stderr.write("opt_fast.train: interrupted: no checkpoint was written" + (
            " (--save-every N writes one every N epochs/steps)" if out else " (without --out nothing is saved)") + "\n")
        return 130
    rest, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--resume":
            skip = True
        elif not a.startswith("--resume="):
            rest.append(a)
    cmd = "python -m opt_fast.train " + " ".join(shlex.quote(a) for a in rest + ["--resume", path])
    sys.stderr.write(f"opt_fast.train: interrupted: the last checkpoint is {path}; continue with: {cmd}\n")
    return 130
