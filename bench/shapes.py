"""Benchmark shapes (docs/performance.md), in three sizes.

* ``smoke``   tiny shapes: ``pytest bench --benchmark-disable`` (the CI smoke test) runs each case once.
* ``default`` small shapes that finish in minutes on a 2-core CPU: a plain ``pytest bench`` and
              ``python bench/report.py``.
* ``full``    the whole sweep of docs/performance.md (``report.py --full``; meant for a GPU).

d = fan-in (9·C_in for a 3×3 conv), b = number of same-d matrices in one batched call, k = number of
Householder reflectors (default d), n = columns of X for ``householder_apply`` (C_out), ``norm`` = target
spectral norm of the Cayley input (None: OPT-CP init, N(0,1) entries, ‖S‖ ~ 2√d). ``prio`` orders the
sweep, so a run cut short by its time budget has covered the most important shapes first. The headline's
shapes (``HEADLINE_SHAPES``) are in every size's sets.
"""
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch

SIZES = ("smoke", "default", "full")


@dataclass(frozen=True)
class Shape:
    d: int
    b: int = 1
    tag: str = ""
    k: Optional[int] = None
    n: Optional[int] = None
    norm: Optional[float] = None
    prio: int = 0

    @property
    def kk(self) -> int:
        return self.d if self.k is None else self.k

    @property
    def label(self) -> str:
        s = f"d={self.d} b={self.b}"
        if self.k is not None and self.k != self.d:
            s += f" k={self.k}"
        if self.n is not None:
            s += f" n={self.n}"
        if self.norm is not None:
            s += f" ‖S‖={self.norm:g}"
        return s

    def key(self) -> Tuple:
        return (self.d, self.b, self.k, self.n, self.norm)


F32, F64 = torch.float32, torch.float64

# (shape, dtypes) per family and size. Families: "square" (d×d inputs: lowdin, orthogonalize_approx and cayley
# where they have no family of their own), "householder" (+ "householder_k", the k sweep), "apply" (n),
# "gram_schmidt", "lowdin" (full only) and "blocks" (the block layers' regime: cayley and cayley_neumann).


# The headline's shapes (bench/headline.py), per size: the ones OPT and POET run. OPT's reference CNN-6
# (64-wide): its first conv (d = 27) and its five 3×3 convs at d = 576 as one batched call (how opt_fast.nn
# groups same-shape layers); the block layers at 4096 wide: PEFT OFT's default blocks of 32 and POET's of 256,
# at ‖S‖ = 0.5 (small skew blocks, as between POET's merges; Cayley–Neumann is only valid for ‖S‖ < 1).
HEADLINE_SHAPES = {
    "smoke": dict(first=Shape(27, 1, "CNN-6 conv1_0"), group=Shape(8, 3, "tiny batch"),
                  apply_first=Shape(27, 1, "CNN-6 conv1_0", n=16), apply_group=Shape(8, 3, "tiny batch", n=4),
                  blocks=(Shape(8, 8, "OFT blocks", norm=0.5),)),
    "default": dict(first=Shape(27, 1, "CNN-6 conv1_0"), group=Shape(576, 5, "CNN-6 3×3 convs, one call"),
                    apply_first=Shape(27, 1, "CNN-6 conv1_0", n=64),
                    apply_group=Shape(576, 5, "CNN-6 3×3 convs, one call", n=64),
                    blocks=(Shape(32, 128, "PEFT OFT: 128 blocks of 32 (4096 wide)", norm=0.5),
                            Shape(256, 16, "POET: 16 blocks of 256 (4096 wide)", norm=0.5))),
}
HEADLINE_SHAPES["full"] = HEADLINE_SHAPES["default"]


def _smoke() -> Dict[str, List[Tuple[Shape, Tuple]]]:
    h = HEADLINE_SHAPES["smoke"]
    sq = [(h["group"], (F32, F64)), (h["first"], (F32,))]
    return {
        "square": sq,
        "householder_k": [(Shape(27, 1, "k sweep", k=8), (F32,))],
        "apply": [(h["apply_group"], (F32,)), (h["apply_first"], (F32,))],
        "blocks": [(s, (F32,)) for s in h["blocks"]],
        "gram_schmidt": sq,
        "householder": sq,
    }


def _default() -> Dict[str, List[Tuple[Shape, Tuple]]]:
    """The headline's shapes first (prio 0), then S-OPT blocks (also float64), a Householder k sweep and
    more of the Gram–Schmidt grid: what the time left after the headline covers on a 2-core CPU."""
    h = HEADLINE_SHAPES["default"]
    sopt = Shape(144, 6, "S-OPT m=144, 6 layers", prio=1)
    sq = [(h["first"], (F32,)), (h["group"], (F32,)), (sopt, (F32, F64))]
    return {
        "square": sq,
        "householder_k": [(Shape(576, 1, "k sweep: k=d/4", k=144, prio=2), (F32,))],
        "apply": [(h["apply_first"], (F32,)), (h["apply_group"], (F32,)),
                  (Shape(144, 6, "S-OPT m=144, 6 layers", n=64, prio=1), (F32,))],
        "blocks": [(s, (F32,)) for s in h["blocks"]],
        "gram_schmidt": sq[:2] + [(s, dt) for s, dt in _gram_schmidt_grid() if (s.d, s.b) in GS_DEFAULT],
        "householder": sq,
    }


HH_D, HH_B = (27, 64, 288, 576, 1024, 2304), (1, 5, 64)   # issue 4's grid (--full)


# gram_schmidt's own grid (issue 5): d ∈ {27, 144, 576, 1024, 2304} × b ∈ {1, 5, 64}. Priority: CNN-6's
# d-groups (27×1, 576×5, 1024×1) first, then one matrix per d, then b = 5, then b = 64. The default size
# keeps the subset below (a few minutes on 2 CPU cores); --full runs all 15.
GS_D, GS_B = (27, 144, 576, 1024, 2304), (1, 5, 64)
GS_DEFAULT = {(27, 64), (144, 5), (576, 1)}   # besides the headline's (27, 1) and (576, 5)


def _gram_schmidt_grid() -> List[Tuple[Shape, Tuple]]:
    out = []
    for d in GS_D:
        for b in GS_B:
            cnn6 = (d, b) in ((27, 1), (576, 5), (1024, 1))
            prio = 0 if cnn6 else {1: 1, 5: 2, 64: 3}[b]
            tag = "CNN-6 (64-wide) d-group" if cnn6 else "gram_schmidt grid"
            out.append((Shape(d, b, tag, prio=prio), (F32, F64) if (d, b) == (144, 5) else (F32,)))
    return out


def _full() -> Dict[str, List[Tuple[Shape, Tuple]]]:
    sq: List[Tuple[Shape, Tuple]] = []
    seen = set()

    def add(shape: Shape, dtypes=(F32,)):
        if (shape.d, shape.b) not in seen:
            seen.add((shape.d, shape.b))
            sq.append((shape, dtypes))

    # 0: the OPT reference nets (docs/training.md): 64-wide CNN-6 and the CP net, one batched call per d-group
    for d, b in ((27, 1), (576, 5), (1024, 1)):
        add(Shape(d, b, "CNN-6 (64-wide) d-group", prio=0), (F32, F64) if b == 1 and d <= 1024 else (F32,))
    for d, b in ((288, 2), (576, 2), (1152, 1), (2048, 1)):
        add(Shape(d, b, "CP net d-group", prio=0))
    # 1: the size ladder, one matrix
    for d in (27, 576, 1152, 2304, 4608):
        add(Shape(d, 1, "size ladder", prio=1), (F32, F64) if d <= 1152 else (F32,))
    # 2: whole-network d-groups (ResNet-18 CIFAR, VGG-16), 1×1 shortcuts, S-OPT sub-blocks (b = layers)
    for d, b in ((1152, 4), (2304, 4), (4608, 3)):
        add(Shape(d, b, "ResNet-18 d-group", prio=2))
    for d, b in ((576, 2), (1152, 2), (2304, 3), (4608, 5)):
        add(Shape(d, b, "VGG-16 d-group", prio=2))
    for d in (64, 128, 256):
        add(Shape(d, 1, "ResNet 1×1 shortcut", prio=2))
    for m in (90, 144, 160, 256):
        add(Shape(m, 6, "S-OPT sub-block, 6 layers", prio=2))
    # 3: batch sweep
    for d in (27, 576, 1152, 2304):
        for b in (4, 8, 16, 64):
            if d == 2304 and b > 16:
                continue
            add(Shape(d, b, "batch sweep", prio=3))
    hk = [(Shape(d, 1, "k sweep", k=k, prio=4), (F32,))
          for d in (576, 1152) for k in (1, 8, 32, d // 4)]
    apply = [(Shape(d, 1, "apply to W0 (n = C_out)", n=n, prio=1 if n == n0 else 4), (F32,))
             for d, n0, ns in ((27, 64, (64,)), (576, 64, (64, 128)), (1152, 128, (128, 256)),
                               (2304, 256, (256,)), (4608, 512, (512,)))
             for n in ns]
    blocks = [(s, (F32,)) for s in HEADLINE_SHAPES["full"]["blocks"]]
    blocks += [(Shape(bs, 4096 // bs, f"OFT block {bs} ({4096 // bs} blocks)", norm=nrm, prio=4), (F32,))
               for bs in (8, 16, 32, 64) for nrm in (1e-2, 1.0)]
    # lowdin's own grid (issue 6): d × batch, float32 (d <= 1024 at b = 1 also float64)
    low = [(Shape(d, b, "lowdin grid", prio=0 if b == 1 else (1 if b == 5 else 3)),
            (F32, F64) if b == 1 and d <= 1024 else (F32,))
           for d in (27, 144, 576, 1024, 2304) for b in (1, 5, 64)]
    # the Householder ops' grid (issue 4): d × batch, after the OPT nets' shapes; apply with n = 64
    seen_hh = {(s.d, s.b) for s, _ in sq}
    hh = sq + [(Shape(d, b, "Householder grid", prio=2 if b < 64 else 3), (F32,))
               for d in HH_D for b in HH_B if (d, b) not in seen_hh]
    seen_apply = {(s.d, s.b, s.n) for s, _ in apply}
    apply = apply + [(Shape(d, b, "Householder grid", n=64, prio=2 if b < 64 else 3), (F32,))
                     for d in HH_D for b in HH_B if (d, b, 64) not in seen_apply]
    return {"square": sq, "householder_k": hk, "apply": apply, "blocks": blocks, "lowdin": low,
            "gram_schmidt": _gram_schmidt_grid(), "householder": hh}


def shape_sets(size: str) -> Dict[str, List[Tuple[Shape, Tuple]]]:
    if size not in SIZES:
        raise ValueError(f"size must be one of {SIZES}, got {size!r}")
    return {"smoke": _smoke, "default": _default, "full": _full}[size]()


# Layer sets for the end-to-end section: {d: number of layers}
RESNET18 = {27: 1, 576: 5, 1152: 4, 2304: 4, 4608: 3}
LAYER_SETS = {
    "smoke": ("tiny layer set", {27: 1, 64: 2}),
    # the same five d-groups and layer counts at 1/8 of the channel widths (d = 9·C_in/8; the input layer kept)
    "default": ("ResNet-18 layer set at 1/8 width", {27: 1, 72: 5, 144: 4, 288: 4, 576: 3}),
    "full": ("ResNet-18 layer set", RESNET18),
}
# CNN-6 train step: batch size per size (the OPT reference trains with batch 128; the issue states its
# step-ratio targets at 128)
E2E_BATCH = {"smoke": 4, "default": 128, "full": 128}
