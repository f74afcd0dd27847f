"""End-to-end costs: one OPT training step of CNN-6 against plain training, and the R computation of a
whole network's layer set.

* ``train_step_times``: forward + backward + optimizer step of the OPT reference CNN-6 (docs/training.md:
  64-wide, three stages of two 3×3 conv + BN + ReLU and a 2×2 max-pool, fc6 as a 4×4 conv, score as a
  1×1 conv to 100 classes, no biases; 32×32×3 input) converted with ``opt_fast.nn.convert(model,
  method=m)`` (``score`` stays a plain conv, as in the reference), against the same network trained
  plainly. Ratio = OPT step / plain step, both measured in this run.
* ``layer_set_times``: R = map(P) forward + backward for a layer set such as ResNet-18's
  {27:1, 576:5, 1152:4, 2304:4, 4608:3}, one batched op call per d-group, through the public ops.
"""
import importlib
import statistics
import time
from typing import Callable, Dict, List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .timers import sync

# Methods with a target first: a run cut short by its time budget skips the others
METHODS = ("cayley", "gram_schmidt", "householder", "lowdin", "householder_qr", "ogd", "orth_reg")
# Targets for OPT step / plain step (docs/performance.md; measured on whatever machine runs the report)
TARGETS = {"gram_schmidt": 1.3, "householder": 1.3, "cayley": 1.3, "lowdin": 1.6}


class CNN6(nn.Module):
    def __init__(self, width: int = 64, classes: int = 100):
        super().__init__()
        chans = [3] + [width] * 6
        for i in range(6):
            name = f"conv{i // 2 + 1}_{i % 2}"
            setattr(self, name, nn.Conv2d(chans[i], chans[i + 1], 3, padding=1, bias=False))
            setattr(self, name + "_bn", nn.BatchNorm2d(chans[i + 1], eps=1e-3))
        self.fc6 = nn.Conv2d(width, width, 4, bias=False)        # 4×4 VALID on the 4×4 map; no BN, no ReLU
        self.score = nn.Conv2d(width, classes, 1, bias=False)    # ordinary (non-OPT) layer

    def forward(self, x):
        for stage in (1, 2, 3):
            for j in (0, 1):
                conv = getattr(self, f"conv{stage}_{j}")
                x = F.relu(getattr(self, f"conv{stage}_{j}_bn")(conv(x)))
            x = F.max_pool2d(x, 2)
        return self.score(self.fc6(x)).flatten(1)


def nn_unavailable() -> Optional[str]:
    """None if opt_fast.nn (convert) and opt_fast.optim (CayleySGD) import, else why not."""
    try:
        mod = importlib.import_module("opt_fast.nn")
        getattr(mod, "convert")
        getattr(importlib.import_module("opt_fast.optim"), "CayleySGD")
    except Exception as e:   # not written yet, or broken mid-edit
        return f"opt_fast.nn not available ({type(e).__name__}: {e})"
    return None


def make_step(method: str, batch: int, device) -> Callable[[], None]:
    """One training step (forward, loss, backward, optimizer step) of CNN-6; method "plain" = no OPT."""
    torch.manual_seed(0)
    model = CNN6()
    loss_extra = None
    if method == "plain":
        opts = [torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)]
    else:
        from opt_fast.nn import convert
        model = convert(model, method=method, exclude=("score",))
        if method == "ogd":   # R on the orthogonal group by Cayley SGD, everything else by momentum SGD
            from opt_fast.optim import CayleySGD
            named = list(model.named_parameters())
            rs = [p for n, p in named if n.endswith(".R")]
            others = [p for n, p in named if not n.endswith(".R")]
            opts = [CayleySGD(rs, lr=0.02), torch.optim.SGD(others, lr=0.1, momentum=0.9, weight_decay=5e-4)]
        else:
            opts = [torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)]
        if method == "orth_reg":
            from opt_fast.nn import orth_reg_loss
            loss_extra = lambda: orth_reg_loss(model, 0.1)  # noqa: E731
    model = model.to(device).train()
    gen = torch.Generator(device="cpu").manual_seed(0)
    x = (torch.rand(batch, 3, 32, 32, generator=gen) * 2 - 1).to(device)
    y = torch.randint(0, 100, (batch,), generator=gen).to(device)

    def step():
        for o in opts:
            o.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y, label_smoothing=0.01)
        if loss_extra is not None:
            loss = loss + loss_extra()
        loss.backward()
        for o in opts:
            o.step()
    return step


def time_steps(step: Callable[[], None], device, warmup: int = 1, steps: int = 3,
               deadline: Optional[float] = None) -> List[float]:
    """Per-step wall times after ``warmup`` steps; stops early (after one timed step) past ``deadline``."""
    for _ in range(warmup):
        step()
    out: List[float] = []
    for _ in range(steps):
        sync(device)
        t0 = time.perf_counter()
        step()
        sync(device)
        out.append(time.perf_counter() - t0)
        if _over(deadline):
            break
    return out


def _over(deadline: Optional[float]) -> bool:
    return deadline is not None and time.perf_counter() > deadline


def _err(e: BaseException) -> str:
    msg = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
    return f"error: {type(e).__name__}: {msg}"


def train_step_times(batch: int, device, methods=METHODS, steps: int = 3,
                     progress: Optional[Callable[[str], None]] = None, deadline: Optional[float] = None) -> dict:
    """{"plain_s", "methods": {m: {"step_s", "ratio", "target", "met", "status"}}}.

    Every network is built and warmed up first; then ``steps`` interleaved rounds time one step of each
    (plain included) per round, so a load change on a shared machine hits every method alike, and each
    ratio is median(method) / median(plain). Methods not built by ``deadline`` (a perf_counter value) are
    marked skipped; past the deadline no new round starts (at least one runs)."""
    note = progress or (lambda s: None)
    reason = nn_unavailable()
    res: dict = {"batch": batch, "steps": steps, "status": reason or "ok", "methods": {}}
    if reason:
        for label in ["plain"] + list(methods) + ["plain (again)"]:
            note(f"e2e {label}")
        return res
    note("e2e plain")
    fns: Dict[str, Callable[[], None]] = {"plain": make_step("plain", batch, device)}
    fns["plain"]()
    for m in methods:
        note(f"e2e {m}")
        entry: Dict[str, object] = {"target": TARGETS.get(m)}
        res["methods"][m] = entry
        if _over(deadline):
            entry["status"] = "skipped: time budget"
            continue
        try:
            fn = make_step(m, batch, device)
            fn()   # warm-up
            fns[m] = fn
            entry["status"], entry["samples_s"] = "ok", []
        except Exception as e:
            entry["status"] = _err(e)
    plain: List[float] = []
    for r in range(steps):
        if r > 0 and _over(deadline):
            break
        for name, fn in list(fns.items()):
            try:
                t = time_steps(fn, device, warmup=0, steps=1)[0]
            except Exception as e:
                res["methods"][name]["status"] = _err(e)
                del fns[name]
                continue
            (plain if name == "plain" else res["methods"][name]["samples_s"]).append(t)
    note("e2e plain (again)")
    res["plain_s"] = statistics.median(plain)
    res["plain_samples_s"] = plain
    for m, e in res["methods"].items():
        if e.get("status") == "ok" and e.get("samples_s"):
            e["step_s"] = statistics.median(e["samples_s"])
            e["ratio"] = e["step_s"] / res["plain_s"]
            e["met"] = None if e["target"] is None else e["ratio"] <= e["target"]
    return res


# ---- the R computation of a layer set ---------------------------------------------------------------

def _skew(P):
    U = P.triu()
    return U - U.mT


LAYER_MAPS = {   # method -> R = map(P), through the public ops
    "cayley": lambda P: torch.ops.opt_fast.cayley(_skew(P)),
    "gram_schmidt": lambda P: torch.ops.opt_fast.gram_schmidt(P.mT).mT,   # rows of P, as OPT-GS
    "householder": lambda P: torch.ops.opt_fast.householder_orthogonal(P),  # k = d dense reflectors
    "householder_qr": lambda P: torch.ops.opt_fast.gram_schmidt(P),        # columns (det fix left out)
    # as the OPT layers: lowdin, or lowdin_svd on the CPU with a gradient
    "lowdin": lambda P: importlib.import_module("opt_fast.functional").lowdin(P),
}


def layer_set_times(layer_set: Dict[int, int], device, dtype=torch.float32, steps: int = 3,
                    progress: Optional[Callable[[str], None]] = None, deadline: Optional[float] = None) -> dict:
    """Forward + backward of R for every layer of the set (one call per d-group) per method, and the
    yardstick: one b×d×d bmm per d-group."""
    from .cases import bmm_time
    note = progress or (lambda s: None)
    gen = torch.Generator(device=device).manual_seed(0)
    Ps = {d: torch.randn((b, d, d), generator=gen, dtype=dtype, device=device).requires_grad_()
          for d, b in layer_set.items()}
    Gs = {d: torch.randn((b, d, d), generator=gen, dtype=dtype, device=device) for d, b in layer_set.items()}
    t_bmm = sum(bmm_time(b, d, dtype, str(device)) for d, b in layer_set.items())
    res = {"layer_set": {str(d): b for d, b in layer_set.items()}, "dtype": str(dtype).replace("torch.", ""),
           "t_bmm_s": t_bmm, "methods": {}}
    for m, f in LAYER_MAPS.items():
        note(f"layer set {m}")
        if _over(deadline):
            res["methods"][m] = {"status": "skipped: time budget"}
            continue

        def run():
            outs = [f(Ps[d]) for d in Ps]
            torch.autograd.grad(outs, list(Ps.values()), [Gs[d] for d in Ps])
        try:
            samples = time_steps(run, device, steps=steps, deadline=deadline)
            t = statistics.median(samples)
            res["methods"][m] = {"status": "ok", "t_s": t, "samples_s": samples, "ratio_bmm": t / t_bmm}
        except Exception as e:
            res["methods"][m] = {"status": _err(e)}
    return res
