"""Block-orthogonal layers against nn.Linear, the same layer in plain torch ops, and PEFT's OFT: forward +
backward of one layer inside a network (gradients of its trainable parameters and of its input), float32,
interleaved medians.

    | layer | in = out, tokens | block | fwd+bwd | / nn.Linear | ours faster by |

Rows per shape: ``nn.Linear`` (W trainable: the baseline); opt_fast's ``OPTBlockLinear`` one-sided (R_in
only, the OFT form) and two-sided (POET), Cayley–Neumann with POET's 5 terms; the same two layers written in
plain torch ops (``TorchOpsBlockLinear``: x[..., perm], einsum over blocks, the series by repeated bmm, as a
user would write it); at block size 32 also PEFT's OFT at its defaults (``bench.peers.peft_oft_linear``:
Cayley–Neumann with ``num_cayley_neumann_terms=5`` = our terms 3, and exact), with opt_fast at the same
series length and exact. "ours faster by" = the comparison row's time / opt_fast's (plain torch ops for the
opt_fast rows of the same sides, PEFT for the PEFT-like rows). Ratios are medians of the per-pass ratios of
the interleaved rounds (``timers.paired_ratio``): a slow spell of a shared machine hits both sides alike.
"""
import math
from typing import Callable, Dict, List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import peers as PE
from .timers import Budget, measure_interleaved, paired_ratio

# (in = out features, tokens, block size) per size: d ∈ {1024, 2048} × b ∈ {32, 128, 256} at 2048 tokens;
# the targets are read at d = 2048, b = 256 (one- and two-sided against nn.Linear and plain torch ops) and
# b = 32 (against PEFT's OFT)
SWEEP = [(d, 2048, b) for d in (2048, 1024) for b in (256, 32, 128)]
SHAPES = {"smoke": [(64, 16, 8)],
          "default": SWEEP,
          "full": SWEEP + [(4096, 4096, 256)]}
BUDGET = {"smoke": Budget(case_s=0.0, min_rounds=1, max_rounds=1),
          "default": Budget(case_s=1.0, min_rounds=5, max_rounds=7, min_round_s=0.02, max_case_s=4.0),
          "full": Budget(case_s=2.0, min_rounds=10, max_rounds=30, min_round_s=0.02, max_case_s=8.0)}
POET_TERMS = 5
PEFT_BLOCK = 32


# ---- the plain torch-ops layer --------------------------------------------------------------------------

def torch_series(S: torch.Tensor, terms: int) -> torch.Tensor:
    """(I + S) Σ_{i=0..terms} Sⁱ = I + 2S + … + 2Sᵏ + Sᵏ⁺¹ for skew S by repeated bmm (k products), the way
    PEFT's OFT computes its Cayley–Neumann map: the plain torch-ops baseline of the fused op."""
    eye = torch.eye(S.shape[-1], dtype=S.dtype, device=S.device)
    if terms == 0:
        return eye + S
    R, power = eye + 2 * S, S
    for _ in range(terms - 1):
        power = power @ S
        R = R + 2 * power
    return R + power @ S


def skew_packed(U: torch.Tensor, b: int) -> torch.Tensor:
    rows, cols = torch.triu_indices(b, b, 1, device=U.device)
    S = U.new_zeros(U.shape[0], b, b)
    S[:, rows, cols] = U
    return S - S.mT


class TorchOpsBlockLinear(nn.Module):
    """OPTBlockLinear's math (Cayley–Neumann blocks, permuted, input-centric) in plain torch ops."""

    def __init__(self, d_in: int, d_out: int, b: int, sides: str, terms: int = POET_TERMS, device=None):
        super().__init__()
        self.b, self.terms = b, terms
        gen = torch.Generator().manual_seed(0)
        self.register_buffer("W0", (torch.randn(d_out, d_in, generator=gen) / math.sqrt(d_in)).to(device))
        self.bias = nn.Parameter(torch.zeros(d_out, device=device))
        for side, n in (("in", d_in), ("out", d_out)):
            used = sides in (side, "both")
            U = torch.randn(n // b, b * (b - 1) // 2, generator=gen) * 1e-3   # a rotation after some training
            self.register_parameter(f"{side}_blocks", nn.Parameter(U.to(device)) if used else None)
            self.register_buffer(f"{side}_perm", torch.randperm(n, generator=gen).to(device) if used else None)

    def _rotate(self, x, U, perm, transpose: bool):
        R = torch_series(skew_packed(U, self.b), self.terms)
        R = R.mT if transpose else R
        y = torch.einsum("jkl,...jl->...jk", R, x[..., perm].unflatten(-1, (R.shape[0], self.b))).flatten(-2)
        return torch.empty_like(y).index_copy_(-1, perm, y)

    def forward(self, x):
        if self.in_blocks is not None:
            x = self._rotate(x, self.in_blocks, self.in_perm, transpose=True)
        y = F.linear(x, self.W0)
        if self.out_blocks is not None:
            y = self._rotate(y, self.out_blocks, self.out_perm, transpose=False)
        return y + self.bias


# ---- the layers of the table ------------------------------------------------------------------------------

def ours(d: int, b: int, device="cpu", **kwargs) -> nn.Module:
    from opt_fast.nn import OPTBlockLinear
    layer = OPTBlockLinear(d, d, bias=True, block_size=b, device=device, **kwargs)
    with torch.no_grad():   # a rotation after some training, not the identity
        gen = torch.Generator().manual_seed(0)
        for side in layer.sides_used():
            P = getattr(layer, f"{side}_blocks")
            P.add_(torch.randn(P.shape, generator=gen).to(P) * 1e-3)
    return layer


def _ours_missing() -> Optional[str]:
    try:
        from opt_fast.nn import OPTBlockLinear  # noqa: F401
    except ImportError:
        return "opt_fast.nn.OPTBlockLinear is not in this build"
    return None


LINEAR = "nn.Linear (W trainable)"
OURS_IN, OURS_BOTH = "opt_fast one-sided (cayley_neumann, 5 terms)", "opt_fast two-sided (cayley_neumann, 5 terms)"
TORCH_IN, TORCH_BOTH = "plain torch ops, one-sided", "plain torch ops, two-sided"
PEFT_NEU, PEFT_EXACT = f"PEFT OFT (Cayley–Neumann n={PE.PEFT_NEUMANN_TERMS})", "PEFT OFT (exact Cayley)"
OURS_PEFT_NEU = f"opt_fast one-sided (cayley_neumann, {PE.NEUMANN_TERMS} terms = PEFT's), no permutation"
OURS_PEFT_EXACT = "opt_fast one-sided (exact cayley), no permutation"
# row -> the row it is compared with ("ours faster by")
VERSUS = {OURS_IN: TORCH_IN, OURS_BOTH: TORCH_BOTH, OURS_PEFT_NEU: PEFT_NEU, OURS_PEFT_EXACT: PEFT_EXACT}


def layers() -> List[tuple]:
    """(name, builder(d, block, device), why it cannot run or None, PEFT block size only)."""
    peft = None if PE.module_found("peft") else "peft not installed"
    missing = _ours_missing()
    return [
        (LINEAR, lambda d, b, dev: nn.Linear(d, d, device=dev), None, False),
        (OURS_IN, lambda d, b, dev: ours(d, b, dev, sides="in", terms=POET_TERMS), missing, False),
        (TORCH_IN, lambda d, b, dev: TorchOpsBlockLinear(d, d, b, "in", device=dev), None, False),
        (OURS_BOTH, lambda d, b, dev: ours(d, b, dev, sides="both", terms=POET_TERMS), missing, False),
        (TORCH_BOTH, lambda d, b, dev: TorchOpsBlockLinear(d, d, b, "both", device=dev), None, False),
        (PEFT_NEU, lambda d, b, dev: PE.peft_oft_linear(d, d, b, neumann=True, device=dev), peft, True),
        (PEFT_EXACT, lambda d, b, dev: PE.peft_oft_linear(d, d, b, neumann=False, device=dev), peft, True),
        (OURS_PEFT_NEU, lambda d, b, dev: ours(d, b, dev, sides="in", permute=False, terms=PE.NEUMANN_TERMS),
         missing, True),
        (OURS_PEFT_EXACT, lambda d, b, dev: ours(d, b, dev, sides="in", permute=False, method="cayley"),
         missing, True),
    ]


def count(size: str) -> int:
    """Rows of the table (for the progress bar)."""
    return sum(sum(1 for *_, peft_only in layers() if not peft_only or b == PEFT_BLOCK or size == "smoke")
               for _, _, b in SHAPES[size])


def _err(e: BaseException) -> str:
    msg = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
    return f"error: {type(e).__name__}: {msg}"


def block_layer_times(size: str, device, progress: Optional[Callable[[str], None]] = None) -> List[Dict]:
    """One record per (shape, layer): median fwd+bwd time over interleaved rounds, ratio to nn.Linear and
    to the row it is compared with."""
    out = []
    for d, tokens, block in SHAPES[size]:
        gen = torch.Generator(device=device).manual_seed(0)
        x = torch.randn(tokens, d, generator=gen, device=device)
        ready, recs = [], []
        for name, build, why, peft_only in layers():
            if peft_only and block != PEFT_BLOCK and size != "smoke":
                continue
            if progress:
                progress(f"block layers {name[:40]}")
            rec = {"layer": name, "d": d, "tokens": tokens, "block": block, "status": why or "ok"}
            recs.append(rec)
            if why is None:
                try:
                    ready.append((rec, PE.layer_fwd_bwd(build(d, block, device), x)))
                except Exception as e:   # a peer or a layer that fails is a row with its error
                    rec["status"] = _err(e)
        timing = {}
        for (rec, _), t in zip(ready, measure_interleaved([fn for _, fn in ready], device, BUDGET[size])):
            if isinstance(t, Exception):
                rec["status"] = _err(t)
            else:
                rec["t_s"], timing[rec["layer"]] = t.median_s, t
        by_name = {r["layer"]: r for r in recs}
        for rec in recs:
            mine, base = timing.get(rec["layer"]), timing.get(LINEAR)
            if mine and base:
                rec["ratio_linear"] = paired_ratio(mine, base)
            other = timing.get(VERSUS.get(rec["layer"], ""))
            if mine and other:
                rec["versus"], rec["speedup"] = by_name[VERSUS[rec["layer"]]]["layer"], paired_ratio(other, mine)
        out += recs
    return out


HEADER = ["layer", "in = out, tokens", "block", "fwd+bwd", "/ nn.Linear", "ours faster by"]


def table_rows(records: List[Dict]) -> List[List[str]]:
    from .headline import fmt_time
    return [[r["layer"], f"{r['d']}, {r['tokens']}", str(r["block"]),
             fmt_time(r.get("t_s")) if r.get("t_s") is not None else r["status"],
             f"{r['ratio_linear']:.2f}×" if r.get("ratio_linear") else "–",
             f"{r['speedup']:.2f}× (vs {r['versus']})" if r.get("speedup") else ""] for r in records]
