"""The block layers' maps and memory, and the block-layer targets checked against the report's numbers.

* maps: fwd+bwd of nb skew blocks of b × b (‖S_j‖₂ = 0.3, a rotation after some training) through the fused
  ``opt_fast.functional.cayley_neumann`` (5 terms), the same series in plain torch ops
  (``blocks.torch_series``: repeated bmm as PEFT's OFT computes it, autograd backward) and the exact ``torch.ops.opt_fast.cayley``, with each one's
  orthogonality error ‖RᵀR − I‖_F/√b (float64, worst block); "/ fused" is the median of the per-pass ratios
  of the interleaved rounds (``timers.paired_ratio``);
* memory: bytes of the distinct tensors saved for backward by one layer's forward (saved_tensors_hooks;
  parameters and buffers not counted: nn.Linear keeps its weight, a block layer its W0), default and
  ``recompute=True``, against nn.Linear's.
"""
import math
from typing import Dict, List, Optional

import torch
import torch.nn as nn

from . import blocks
from .timers import Budget, measure_interleaved, paired_ratio

# (b, nb) per size: the block sizes on a 2048-wide side
MAP_BLOCKS = {"smoke": [(8, 4)], "default": [(32, 64), (128, 16), (256, 8)],
              "full": [(32, 64), (128, 16), (256, 8), (256, 16)]}
MAP_NORM = 0.3
TERMS = blocks.POET_TERMS
BUDGET = {"smoke": Budget(case_s=0.0, min_rounds=1, max_rounds=1),
          "default": Budget(case_s=0.5, min_rounds=7, max_rounds=25, min_round_s=0.02, max_case_s=2.0),
          "full": Budget(case_s=1.0, min_rounds=10, max_rounds=50, min_round_s=0.02, max_case_s=4.0)}
MAPS = ("fused cayley_neumann", "torch-ops series", "exact cayley")


def _orthogonality(R: torch.Tensor) -> float:
    R64 = R.detach().double()
    eye = torch.eye(R.shape[-1], dtype=torch.float64, device=R.device)
    return float(torch.linalg.matrix_norm(R64.mT @ R64 - eye).max() / math.sqrt(R.shape[-1]))


def _skew_blocks(nb: int, b: int, device) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    U = torch.randn(nb, b, b, generator=gen)
    S = U - U.mT
    return (S * (MAP_NORM / torch.linalg.matrix_norm(S, ord=2).clamp_min(1e-30))[:, None, None]).to(device)


def map_times(size: str, device) -> List[Dict]:
    from opt_fast import functional

    maps = {MAPS[0]: lambda s: functional.cayley_neumann(s, TERMS),
            MAPS[1]: lambda s: blocks.torch_series(s, TERMS),
            MAPS[2]: lambda s: torch.ops.opt_fast.cayley(s)}
    out = []
    for b, nb in MAP_BLOCKS[size]:
        S0 = _skew_blocks(nb, b, device)
        G = torch.randn(nb, b, b, device=device)
        recs, fns = [], []
        for name, f in maps.items():
            S = S0.clone().requires_grad_()

            def step(f=f, S=S):
                f(S).backward(G)
                S.grad = None
            recs.append({"map": name, "b": b, "nb": nb, "orth": _orthogonality(f(S0))})
            fns.append(step)
        timings = measure_interleaved(fns, device, BUDGET[size])
        for rec, t in zip(recs, timings):
            if isinstance(t, Exception):
                rec["status"] = f"error: {type(t).__name__}: {t}"
            else:
                rec["t_s"] = t.median_s
        fused = timings[0]
        for rec, t in zip(recs, timings):
            if not isinstance(fused, Exception) and not isinstance(t, Exception):
                rec["ratio_fused"] = paired_ratio(t, fused)
        out += recs
    return out


MAP_HEADER = ["map (fwd+bwd)", "blocks", "time", "/ fused", "‖RᵀR − I‖_F/√b"]


def map_rows(records: List[Dict]) -> List[List[str]]:
    from .headline import fmt_time
    return [[r["map"], f"{r['nb']} × {r['b']}", fmt_time(r["t_s"]) if r.get("t_s") else r.get("status", "–"),
             f"{r['ratio_fused']:.2f}×" if r.get("ratio_fused") else "–", f"{r['orth']:.1e}"] for r in records]


def saved_bytes(layer: nn.Module, tokens: int, d_in: int, device="cpu") -> int:
    own = {t.untyped_storage().data_ptr() for t in list(layer.parameters()) + list(layer.buffers())}
    seen: Dict[int, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in own:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    x = torch.randn(tokens, d_in, device=device, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer(x)
    return sum(seen.values())


def memory(size: str, device) -> List[Dict]:
    if blocks._ours_missing():
        return []
    d, tokens, _ = blocks.SHAPES[size][0]   # every block size of the first width (R's share grows with b)
    sizes = [b for dd, t, b in blocks.SHAPES[size] if (dd, t) == (d, tokens)]
    base = saved_bytes(nn.Linear(d, d, device=device), tokens, d, device)
    return [{"d": d, "tokens": tokens, "b": b, "sides": sides, "recompute": rec, "linear_bytes": base,
             "bytes": saved_bytes(blocks.ours(d, b, device, sides=sides, recompute=rec), tokens, d, device)}
            for b in sizes for sides in ("in", "both") for rec in (False, True)]


MEM_HEADER = ["layer", "in = out, tokens", "block", "saved for backward", "/ nn.Linear"]


def memory_rows(records: List[Dict]) -> List[List[str]]:
    return [[f"opt_fast {'one' if r['sides'] == 'in' else 'two'}-sided" + (", recompute=True" if r["recompute"]
                                                                           else ""),
             f"{r['d']}, {r['tokens']}", str(r["b"]), f"{r['bytes'] / 2 ** 20:.1f} MiB",
             f"{r['bytes'] / r['linear_bytes']:.2f}×"] for r in records]


# ---- the targets -----------------------------------------------------------------------------------------------

def _find(records, **match) -> Optional[Dict]:
    return next((r for r in records if all(r.get(k) == v for k, v in match.items())), None)


def targets(res: dict) -> List[List[str]]:
    """[target, measured, met] rows from the report's block records (met: "met" / "not met" / "not measured")."""
    rows = []

    def add(name, value, ok, fmt="{:.2f}×"):
        rows.append([name, "–" if value is None else fmt.format(value),
                     "not measured" if value is None else ("met" if ok(value) else "not met")])

    layers, maps, mem = res.get("blocks") or [], res.get("block_maps") or [], res.get("block_memory") or []
    cuda = str(res.get("device", "cpu")).startswith("cuda")
    d, b = (4096, 256) if cuda else (2048, 256)
    for ours_name, torch_name, bound, label in ((blocks.OURS_IN, blocks.TORCH_IN, 0.9, "one-sided"),
                                                (blocks.OURS_BOTH, blocks.TORCH_BOTH, 1.25 if cuda else 1.1,
                                                 "two-sided")):
        r = _find(layers, layer=ours_name, d=d, block=b)
        add(f"{label} layer / nn.Linear ≤ {bound} (d = {d}, b = {b})", r and r.get("ratio_linear"),
            lambda v, bound=bound: v <= bound)
        add(f"{label}: plain torch ops / ours ≥ 1.1 (d = {d}, b = {b})", r and r.get("speedup"), lambda v: v >= 1.1)
    r = _find(layers, layer=blocks.OURS_PEFT_NEU, block=blocks.PEFT_BLOCK)
    add("PEFT OFT (defaults) / ours at the same series ≥ 1.5 (b = 32)", r and r.get("speedup"), lambda v: v >= 1.5)
    for bb in sorted({m["b"] for m in maps}):
        series = _find(maps, map=MAPS[1], b=bb)
        add(f"cayley_neumann: torch-ops series / fused ≥ 2 (b = {bb})", series and series.get("ratio_fused"),
            lambda v: v >= 2)
        exact = _find(maps, map=MAPS[2], b=bb)
        add(f"exact cayley / fused cayley_neumann ≤ 1.5 (b = {bb})", exact and exact.get("ratio_fused"),
            lambda v: v <= 1.5)
    for bb in dict.fromkeys(m["b"] for m in mem):
        for rec, bound in ((False, 2.1), (True, 1.1)):
            r = _find(mem, sides="both", recompute=rec, b=bb)
            add(f"two-sided saved bytes / nn.Linear ≤ {bound} (b = {bb}" + (", recompute=True)" if rec else ")"),
                r and r["bytes"] / r["linear_bytes"], lambda v, bound=bound: v <= bound)
    return rows


TARGET_HEADER = ["block-layer target", "measured", ""]
