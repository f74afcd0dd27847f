"""Block-orthogonal layers against nn.Linear and PEFT's OFT: forward + backward of one layer inside a network
(gradients of its trainable parameters and of its input), float32, interleaved medians.

    | layer | in × out, tokens | block | ms | / nn.Linear |

Rows: ``nn.Linear`` (W trainable: the baseline), PEFT OFT (``bench.peers.peft_oft_linear``: W0 frozen, one-sided
input rotation by blocks, Cayley–Neumann and exact), and opt_fast's block layer. The opt_fast rows are the
hook where the block-orthogonal layers (issue 14, ``opt_fast.nn.OPTBlockLinear``) join: ``OURS`` lists the
configurations; in a build without the class their rows say so.
"""
from typing import Callable, Dict, List, Optional

import torch
import torch.nn as nn

from . import peers as PE
from .timers import Budget, measure_interleaved

# (in = out features, tokens, block size) per size: a 1024-wide projection at 4 × 256 tokens
SHAPES = {"smoke": [(64, 16, 8)], "default": [(1024, 1024, 32)], "full": [(1024, 1024, 32), (4096, 2048, 256)]}
BUDGET = {"smoke": Budget(case_s=0.0, min_rounds=1, max_rounds=1),
          "default": Budget(case_s=1.0, min_rounds=5, max_rounds=10, min_round_s=0.02, max_case_s=2.0),
          "full": Budget(case_s=2.0, min_rounds=10, max_rounds=30, min_round_s=0.02, max_case_s=5.0)}


def _linear(d, block, device):
    return nn.Linear(d, d).to(device)


def _peft(neumann: bool):
    def build(d, block, device):
        return PE.peft_oft_linear(d, d, block, neumann=neumann, device=device)
    return build


# ---- HOOK: opt_fast's block-orthogonal layers (issue 14) join here ------------------------------------
# (name, OPTBlockLinear keyword arguments): the one-sided PEFT-like layer at the same series length, and its
# exact-Cayley variant; the lead extends this list (two-sided POET layers, other maps) once the layers land.
OURS = [
    ("opt_fast OPTBlockLinear, cayley_neumann, one-sided",
     dict(method="cayley_neumann", sides="in", terms=PE.NEUMANN_TERMS)),
    ("opt_fast OPTBlockLinear, cayley (exact), one-sided", dict(method="cayley", sides="in")),
]


def _ours(kwargs):
    def build(d, block, device):
        from opt_fast.nn import OPTBlockLinear
        return OPTBlockLinear(d, d, bias=True, block_size=block, **kwargs).to(device)
    return build


def _ours_missing() -> Optional[str]:
    try:
        from opt_fast.nn import OPTBlockLinear  # noqa: F401
    except ImportError:
        return "opt_fast.nn.OPTBlockLinear is not in this build"
    return None
# ---- end of hook ----------------------------------------------------------------------------------------


LINEAR = "nn.Linear (W trainable)"


def layers() -> List[tuple]:
    """(name, builder, why it cannot run or None)."""
    peft = None if PE.module_found("peft") else "peft not installed"
    out = [(LINEAR, _linear, None),
           (f"PEFT OFT, Cayley–Neumann n={PE.PEFT_NEUMANN_TERMS}", _peft(True), peft),
           ("PEFT OFT, exact Cayley", _peft(False), peft)]
    missing = _ours_missing()
    return out + [(name, _ours(kw), missing) for name, kw in OURS]


def _err(e: BaseException) -> str:
    msg = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
    return f"error: {type(e).__name__}: {msg}"


def block_layer_times(size: str, device, progress: Optional[Callable[[str], None]] = None) -> List[Dict]:
    """One record per (shape, layer): median fwd+bwd time over interleaved rounds, ratio to nn.Linear."""
    out = []
    for d, tokens, block in SHAPES[size]:
        gen = torch.Generator(device=device).manual_seed(0)
        x = torch.randn(tokens, d, generator=gen, device=device)
        ready = []
        for name, build, why in layers():
            if progress:
                progress(f"block layers {name[:40]}")
            rec = {"layer": name, "d": d, "tokens": tokens, "block": block, "status": why or "ok"}
            out.append(rec)
            if why is None:
                try:
                    ready.append((rec, PE.layer_fwd_bwd(build(d, block, device), x)))
                except Exception as e:
                    rec["status"] = _err(e)
        for (rec, _), t in zip(ready, measure_interleaved([fn for _, fn in ready], device, BUDGET[size])):
            if isinstance(t, Exception):
                rec["status"] = _err(t)
            else:
                rec["t_s"] = t.median_s
        base = next((r["t_s"] for r, _ in ready if r["layer"] == LINEAR and "t_s" in r), None)
        for rec, _ in ready:
            if base and "t_s" in rec:
                rec["ratio_linear"] = rec["t_s"] / base
    return out


HEADER = ["layer", "in = out, tokens", "block", "fwd+bwd", "/ nn.Linear"]


def table_rows(records: List[Dict]) -> List[List[str]]:
    from .headline import fmt_time
    return [[r["layer"], f"{r['d']}, {r['tokens']}", str(r["block"]),
             fmt_time(r.get("t_s")) if r.get("t_s") is not None else r["status"],
             f"{r['ratio_linear']:.2f}×" if r.get("ratio_linear") else "–"] for r in records]
