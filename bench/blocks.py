"""Block-orthogonal layers (POET / OFT family) and their maps, against what a user would use instead.

Rows (float32, fwd+bwd, ratios measured in one run, interleaved):
* layer: ``OPTBlockLinear`` (one- and two-sided, several b) against a trainable nn.Linear of the same
  shape, against the same layer written in plain torch ops (``TorchOpsBlockLinear``: x[..., perm], einsum
  over blocks, the Neumann series by repeated bmm, as a user would write it) and against PEFT's OFT layer
  at its defaults (b = 32, ``num_cayley_neumann_terms=5`` = our terms 3), input gradient included (a
  layer in the middle of a network);
* map: ``cayley_neumann`` (fused) against the same series in torch ops (PEFT's loop of bmm, autograd)
  and against the exact ``cayley`` on the same blocks, with each one's orthogonality error;
* memory: bytes of the distinct tensors saved for backward by one layer (saved_tensors_hooks), against
  nn.Linear's, with and without ``recompute``.
"""
import math
import statistics
import time
from typing import Callable, Dict, List

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .timers import sync

# ---- the plain torch-ops equivalents ------------------------------------------------------------------


def torch_series(A: Tensor, terms: int) -> Tensor:
    """(I + A) Σ_{i=0..terms} Aⁱ = I + 2A + … + 2Aᵏ + Aᵏ⁺¹ by repeated bmm, as PEFT's OFT computes it."""
    eye = torch.eye(A.shape[-1], dtype=A.dtype, device=A.device)
    R = eye + 2 * A
    power = A
    for _ in range(terms - 1):
        power = torch.bmm(power, A)
        R = R + 2 * power
    return R + torch.bmm(power, A) if terms >= 1 else eye + A


def skew_packed(U: Tensor, b: int) -> Tensor:
    rows, cols = torch.triu_indices(b, b, 1, device=U.device)
    S = U.new_zeros(U.shape[0], b, b)
    S[:, rows, cols] = U
    return S - S.mT


class TorchOpsBlockLinear(nn.Module):
    """OPTBlockLinear's math (Cayley–Neumann blocks, permuted, input-centric) in plain torch ops."""

    def __init__(self, d_in: int, d_out: int, b: int, sides: str, terms: int = 5, device=None):
        super().__init__()
        self.b, self.sides, self.terms = b, sides, terms
        self.register_buffer("W0", torch.randn(d_out, d_in, device=device) / math.sqrt(d_in))
        self.bias = nn.Parameter(torch.zeros(d_out, device=device))
        n_par = b * (b - 1) // 2
        for side, n in (("in", d_in), ("out", d_out)):
            used = sides in (side, "both")
            self.register_parameter(f"{side}_blocks", nn.Parameter(torch.zeros(n // b, n_par, device=device))
                                    if used else None)
            self.register_buffer(f"{side}_perm", torch.randperm(n, device=device) if used else None)

    def _rotate(self, x: Tensor, U: Tensor, perm: Tensor, transpose: bool) -> Tensor:
        R = torch_series(skew_packed(U, self.b), self.terms)
        R = R.mT if transpose else R
        xb = x[..., perm].unflatten(-1, (R.shape[0], self.b))
        y = torch.einsum("jkl,...jl->...jk", R, xb).flatten(-2)
        return torch.empty_like(y).index_copy_(-1, perm, y)

    def forward(self, x):
        if self.in_blocks is not None:
            x = self._rotate(x, self.in_blocks, self.in_perm, transpose=True)
        y = F.linear(x, self.W0)
        if self.out_blocks is not None:
            y = self._rotate(y, self.out_blocks, self.out_perm, transpose=False)
        return y + self.bias


def peft_oft_linear(d_in: int, d_out: int, b: int = 32, device="cpu"):
    """A PEFT OFT-wrapped nn.Linear at PEFT's defaults (Cayley–Neumann, 5 terms), or the reason it cannot be
    built (peft not installed, or its error)."""
    try:
        import peft
        from peft import OFTConfig, get_peft_model
    except Exception as e:   # noqa: BLE001  (any import failure is a row with its reason)
        return f"peft not installed ({type(e).__name__})"

    class One(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(d_in, d_out, device=device)

        def forward(self, x):
            return self.proj(x)

    try:
        model = get_peft_model(One(), OFTConfig(oft_block_size=b, r=0, target_modules=["proj"]))
        with torch.no_grad():   # a non-identity rotation, as after some training
            for name, p in model.named_parameters():
                if "oft_R" in name:
                    p.normal_(0, 1e-3)
    except Exception as e:   # noqa: BLE001
        return f"peft {peft.__version__} OFT failed: {type(e).__name__}: {e}"
    return model


def ours(d_in: int, d_out: int, b: int, sides: str, terms: int = 5, method: str = "cayley_neumann",
         recompute: bool = False, permute: bool = True, device="cpu"):
    from opt_fast.nn import OPTBlockLinear

    layer = OPTBlockLinear(d_in, d_out, method=method, block_size=b, sides=sides, terms=terms,
                           permute=permute, recompute=recompute, device=device)
    with torch.no_grad():   # a non-identity rotation, as after some training
        for side in layer.sides_used():
            P = getattr(layer, f"{side}_blocks")
            P.add_(torch.randn_like(P), alpha=1e-3)
    return layer


# ---- measurements ----------------------------------------------------------------------------------------


def fwd_bwd(layer: nn.Module, tokens: int, d_in: int, d_out: int, device="cpu") -> Callable[[], None]:
    """One forward + backward with the input gradient (a layer in the middle of a network)."""
    x = torch.randn(tokens, d_in, device=device, requires_grad=True)
    g = torch.randn(tokens, d_out, device=device)

    def step():
        layer(x).backward(g)
        x.grad = None
        for p in layer.parameters():
            p.grad = None
    return step


def interleaved(fns: Dict[str, Callable[[], None]], rounds: int, device="cpu") -> Dict[str, float]:
    """Median seconds per call of each fn, the fns taking turns round by round (machine load hits all)."""
    for fn in fns.values():
        fn()
    times: Dict[str, List[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            sync(device)
            t = time.perf_counter()
            fn()
            sync(device)
            times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def saved_bytes(layer: nn.Module, tokens: int, d_in: int, device="cpu", with_params: bool = False) -> int:
    """Bytes of the distinct storages saved for backward by one forward (the layer's parameters and
    buffers excluded unless ``with_params``: nn.Linear keeps its weight, a block layer its W0)."""
    own = {t.untyped_storage().data_ptr() for t in list(layer.parameters()) + list(layer.buffers())}
    seen: Dict[int, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if with_params or ptr not in own:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    x = torch.randn(tokens, d_in, device=device, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer(x)
    return sum(seen.values())


def orthogonality(R: Tensor) -> float:
    eye = torch.eye(R.shape[-1], dtype=torch.float64, device=R.device)
    R64 = R.detach().double()
    return float(torch.linalg.matrix_norm(R64.mT @ R64 - eye).max() / math.sqrt(R.shape[-1]))


def map_fns(nb: int, b: int, terms: int, scale: float, device="cpu"):
    """fwd+bwd callables of the three maps on the same skew blocks, and their orthogonality errors."""
    from opt_fast import functional

    U = torch.randn(nb, b, b, device=device)
    S0 = U - U.mT
    S0 = S0 * (scale / torch.linalg.matrix_norm(S0, ord=2).clamp_min(1e-30))[:, None, None]   # ‖S_j‖₂ = scale
    S = S0.clone().requires_grad_()
    G = torch.randn(nb, b, b, device=device)

    def run(f):
        def step():
            f(S).backward(G)
            S.grad = None
        return step

    maps = {"fused": lambda s: functional.cayley_neumann(s, terms),
            "torch": lambda s: torch_series(s, terms),
            "exact": lambda s: torch.ops.opt_fast.cayley(s)}
    errs = {k: orthogonality(f(S0)) for k, f in maps.items()}
    return {k: run(f) for k, f in maps.items()}, errs


# ---- the report section ------------------------------------------------------------------------------------

# (d_in = d_out = d, tokens, block sizes) per size; the issue-target shape is d = 2048, tokens 2048, b = 256
LAYER_SHAPES = {
    "smoke": [(64, 32, (16,))],
    "default": [(1024, 2048, (32, 128, 256)), (2048, 2048, (32, 128, 256))],
    "full": [(1024, 2048, (32, 128, 256)), (2048, 2048, (32, 128, 256)), (4096, 4096, (256,))],
}
MAP_BLOCKS = {"smoke": ((16, 4),), "default": ((32, 64), (128, 16), (256, 8)),
              "full": ((32, 64), (128, 16), (256, 8), (256, 16))}
TERMS = 5
MAP_NORM = 0.3   # ‖S‖₂ of the map cases: a rotation after some training, inside the series' convergence region
TARGETS = {"one_sided": 0.9, "two_sided": 1.1, "vs_torch_ops": 1.1, "vs_peft": 1.5, "map_vs_torch": 2.0,
           "exact_vs_fused": 1.5, "bytes_two_sided": 2.1, "bytes_recompute": 1.1, "two_sided_cuda": 1.25}


def layer_rows(size: str, device: str, rounds: int) -> List[dict]:
    rows = []
    for d, tokens, bs in LAYER_SHAPES[size]:
        for b in bs:
            fns = {"linear": fwd_bwd(nn.Linear(d, d, device=device), tokens, d, d, device)}
            for sides in ("in", "both"):
                fns[f"ours {sides}"] = fwd_bwd(ours(d, d, b, sides, device=device), tokens, d, d, device)
                fns[f"torch {sides}"] = fwd_bwd(TorchOpsBlockLinear(d, d, b, sides, device=device), tokens, d, d,
                                                device)
            peft = peft_oft_linear(d, d, b, device) if b == 32 else None
            if isinstance(peft, nn.Module):
                fns["peft in"] = fwd_bwd(peft, tokens, d, d, device)
                # the same map as PEFT's default (num_cayley_neumann_terms=5 is our terms 3)
                fns["ours in k3"] = fwd_bwd(ours(d, d, b, "in", terms=3, device=device), tokens, d, d, device)
            t = interleaved(fns, rounds, device)
            row = {"d": d, "tokens": tokens, "b": b, "linear_ms": 1e3 * t["linear"],
                   "peft": peft if isinstance(peft, str) else None}
            for k, v in t.items():
                row[k.replace(" ", "_") + "_ms"] = 1e3 * v
            rows.append(row)
    return rows


def map_rows(size: str, device: str, rounds: int) -> List[dict]:
    rows = []
    for b, nb in MAP_BLOCKS[size]:
        fns, errs = map_fns(nb, b, TERMS, MAP_NORM, device)
        t = interleaved(fns, rounds, device)
        rows.append({"b": b, "nb": nb, "terms": TERMS, **{f"{k}_ms": 1e3 * v for k, v in t.items()},
                     **{f"{k}_orth": v for k, v in errs.items()}})
    return rows


def memory_rows(size: str, device: str) -> List[dict]:
    rows = []
    d, tokens, bs = LAYER_SHAPES[size][-1]
    b = bs[-1]
    base = saved_bytes(nn.Linear(d, d, device=device), tokens, d, device)
    for sides in ("in", "both"):
        for recompute in (False, True):
            layer = ours(d, d, b, sides, recompute=recompute, device=device)
            rows.append({"d": d, "tokens": tokens, "b": b, "sides": sides, "recompute": recompute,
                         "bytes": saved_bytes(layer, tokens, d, device), "linear_bytes": base})
    return rows


def _fmt(x: float) -> str:
    return f"{x:.2f}×"


def markdown(layers: List[dict], maps: List[dict], memory: List[dict]) -> str:
    out = ["### Block-orthogonal layers (fwd+bwd, float32, input gradient included)", "",
           "time / trainable nn.Linear of the same shape; \"torch ops\" = the same layer in plain torch ops "
           "(x[..., perm], einsum, series by bmm); speed-up = torch ops / ours.", "",
           "| d | tokens | b | one-sided | torch ops | speed-up | two-sided | torch ops | speed-up | PEFT OFT (b=32) |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for r in layers:
        lin = r["linear_ms"]
        peft = "–"
        if r.get("peft_in_ms") is not None:
            peft = (f"{_fmt(r['peft_in_ms'] / lin)} (ours k=3 {_fmt(r['ours_in_k3_ms'] / lin)}: "
                    f"{_fmt(r['peft_in_ms'] / r['ours_in_k3_ms'])} faster)")
        elif r.get("peft"):
            peft = r["peft"]
        out.append(f"| {r['d']} | {r['tokens']} | {r['b']} | {_fmt(r['ours_in_ms'] / lin)} | "
                   f"{_fmt(r['torch_in_ms'] / lin)} | {_fmt(r['torch_in_ms'] / r['ours_in_ms'])} | "
                   f"{_fmt(r['ours_both_ms'] / lin)} | {_fmt(r['torch_both_ms'] / lin)} | "
                   f"{_fmt(r['torch_both_ms'] / r['ours_both_ms'])} | {peft} |")
    out += ["", f"### Block maps (fwd+bwd of nb blocks of b × b, terms {TERMS}, ‖S‖₂ ≈ {MAP_NORM})", "",
            "| b | nb | fused cayley_neumann | torch-ops series | speed-up | exact cayley | exact / fused | "
            "‖RᵀR−I‖/√b fused | exact |", "|---|---|---|---|---|---|---|---|---|"]
    for r in maps:
        out.append(f"| {r['b']} | {r['nb']} | {r['fused_ms']:.2f} ms | {r['torch_ms']:.2f} ms | "
                   f"{_fmt(r['torch_ms'] / r['fused_ms'])} | {r['exact_ms']:.2f} ms | "
                   f"{_fmt(r['exact_ms'] / r['fused_ms'])} | {r['fused_orth']:.1e} | {r['exact_orth']:.1e} |")
    out += ["", "### Bytes saved for backward by one layer (activations: parameters and buffers not counted)", "",
            "| d | tokens | b | sides | recompute | bytes | / nn.Linear |", "|---|---|---|---|---|---|---|"]
    for r in memory:
        out.append(f"| {r['d']} | {r['tokens']} | {r['b']} | {r['sides']} | {r['recompute']} | "
                   f"{r['bytes'] / 2**20:.1f} MiB | {_fmt(r['bytes'] / r['linear_bytes'])} |")
    return "\n".join(out)


def main():
    import argparse

    p = argparse.ArgumentParser(description="block-orthogonal layer benchmarks (a section of bench/report.py)")
    p.add_argument("--size", default="default", choices=tuple(LAYER_SHAPES))
    p.add_argument("--device", default="cpu")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=None)
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    print(markdown(layer_rows(a.size, a.device, a.rounds), map_rows(a.size, a.device, a.rounds),
                   memory_rows(a.size, a.device)))


if __name__ == "__main__":
    main()
