"""The peers: packages a user would reach for instead of opt_fast to get an orthogonal weight, map or update.

* geotorch: the ``geotorch.orthogonal`` constraint (``triv="cayley"``) on a batched weight;
* ``torch.nn.utils.parametrizations.orthogonal`` (ships with torch): its cayley, householder and matrix_exp
  maps, ``use_trivialization=False`` (the map runs in every forward, as OPT's does);
* PEFT's OFT: its Cayley map (``OFTRotationModule._cayley_batch``, exact and Cayley–Neumann) and, for the
  block-layer table, an OFT-wrapped ``nn.Linear`` (``peft_oft_linear``);
* ``torch.optim.Muon``'s Newton–Schulz (ships with torch >= 2.9; bfloat16 on every device, one matrix a call);
* torch-householder: ``torch_householder_orgqr``, a C++ extension built against the installed torch.

``make bench`` installs them (requirements-bench.txt); in a venv without them their rows say "not
installed" and ``install_status`` tells why (torch-householder's build log keeps its error).

Conventions mapped to ours (opt_fast's S, skew; our Cayley (I + S)(I − S)⁻¹):
* PEFT builds Q = U − Uᵀ from the b(b−1)/2 upper-triangle entries U of each block, so feeding it the upper
  triangle of S gives Q = S. Its Cayley–Neumann with ``num_cayley_neumann_terms = n`` is I + 2Q + … + 2Q^(n−2)
  + Q^(n−1) = (I + Q)·Σ_{i=0..n−2} Qⁱ: our ``cayley_neumann(S, terms=n − 2)``. Its exact path is
  (I − Q)(I + Q)⁻¹ = our cayley(−S), the transpose of ours: the same family, not the same matrix.
* geotorch's constraint returns base @ cayley(skew(X)) with its own skew and a fixed random base.
"""
import importlib.util
import os
import sys
from importlib import metadata
from typing import Callable, Dict, List, Optional

import torch
import torch.nn as nn

# PEFT's default num_cayley_neumann_terms = 5 is our terms k = 5 − 2 = 3 (see above)
PEFT_NEUMANN_TERMS = 5
NEUMANN_TERMS = PEFT_NEUMANN_TERMS - 2

# name in tables -> (distribution for the version, module to import)
PACKAGES = {
    "geotorch": ("geotorch", "geotorch"),
    "torch parametrizations": ("torch", "torch.nn.utils.parametrizations"),
    "peft": ("peft", "peft"),
    "torch.optim.Muon": ("torch", "torch.optim._muon"),
    "torch-householder": ("torch-householder", "torch_householder"),
}
INSTALL_LOG_DIR = "peer-install"   # under the venv: `make bench` keeps the torch-householder build log there


def _version(dist: str) -> Optional[str]:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _build_error(name: str) -> Optional[str]:
    """The first error line of a failed install's log (written by `make bench`), if there is one."""
    path = os.path.join(sys.prefix, INSTALL_LOG_DIR, f"{name}.log")
    try:
        with open(path, errors="replace") as f:
            lines = [ln.strip() for ln in f if ln.strip()]
    except OSError:
        return None
    errs = [ln for ln in lines if "error" in ln.lower() and "warning" not in ln.lower()]
    return (errs or lines or ["(empty log)"])[0][:300]


def install_status() -> Dict[str, Dict[str, Optional[str]]]:
    """{peer: {"version", "module", "status"}}: status "ok", "not installed", or why it did not build."""
    out = {}
    for name, (dist, module) in PACKAGES.items():
        found = module_found(module)
        status = "ok" if found else "not installed"
        if not found:
            err = _build_error(name)
            if err:
                status = f"did not build against torch {torch.__version__}: {err}"
        out[name] = {"version": _version(dist) if found else None, "module": module, "status": status}
    return out


def module_found(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


def versions_line(status: Dict[str, Dict[str, Optional[str]]]) -> str:
    return "; ".join(f"{n} {s['version']}" if s["status"] == "ok" else f"{n}: {s['status']}"
                     for n, s in status.items())


# ---- the maps, as ``Impl.setup(x, grad) -> (forward, leaves)`` ------------------------------------------

def own_leaf(t: torch.Tensor, grad: bool) -> torch.Tensor:
    return t.detach().clone().requires_grad_(grad)


def _constrained_weight(X: torch.Tensor, register: Callable[[nn.Module], None], grad: bool):
    """A module whose [b, d, d] ``weight`` is constrained by ``register``, its unconstrained parameter set to X;
    times ``module.weight`` (the map runs on every access, as in a training step)."""
    mod = nn.Module()
    mod.weight = nn.Parameter(X.detach().clone())
    register(mod)
    orig = mod.parametrizations.weight.original
    with torch.no_grad():
        orig.copy_(X)
    orig.requires_grad_(grad)
    return (lambda: mod.weight), ([orig] if grad else [])


def parametrization_setup(orth_map: str, source: str = "P", diag_one: bool = False):
    """torch.nn.utils.parametrizations.orthogonal(orthogonal_map=..., use_trivialization=False)."""
    def setup(x, grad):
        from torch.nn.utils import parametrizations
        X = x[source].detach().clone()
        if diag_one:   # the householder map multiplies by diag(X).int(): ±1 there gives an orthogonal Q
            X.diagonal(dim1=-2, dim2=-1).fill_(1.0)
        return _constrained_weight(X, lambda m: parametrizations.orthogonal(
            m, "weight", orthogonal_map=orth_map, use_trivialization=False), grad)
    return setup


def geotorch_setup(triv: str = "cayley"):
    """``geotorch.orthogonal(module, "weight", triv=...)``."""
    def setup(x, grad):
        import geotorch
        return _constrained_weight(x["P"], lambda m: geotorch.orthogonal(m, "weight", triv=triv), grad)
    return setup


def peft_cayley_setup(neumann: bool, terms: int = PEFT_NEUMANN_TERMS):
    """PEFT OFT's ``OFTRotationModule._cayley_batch`` on the upper triangles of the blocks S."""
    def setup(x, grad):
        from peft.tuners.oft.layer import OFTRotationModule
        S = x["S"]
        b, d = S.shape[0], S.shape[-1]
        rows, cols = torch.triu_indices(d, d, 1, device=S.device)
        q = own_leaf(S[:, rows, cols], grad)          # PEFT's packed parameters: Q = S
        mod = OFTRotationModule(b, d * (d - 1) // 2, d, b * d, use_cayley_neumann=neumann,
                                num_cayley_neumann_terms=terms).to(S.device)
        return (lambda: mod._cayley_batch(q, d, use_cayley_neumann=neumann, num_neumann_terms=terms)), \
            ([q] if grad else [])
    return setup


def muon_setup(x, grad):
    """torch.optim.Muon's Newton–Schulz with its defaults, one matrix a call (as Muon steps each parameter)."""
    from torch.optim import _muon
    P = x["P"]
    coefs = (_muon.DEFAULT_A, _muon.DEFAULT_B, _muon.DEFAULT_C)
    mats = P.detach().reshape(-1, *P.shape[-2:]).unbind(0)

    def run():
        out = [_muon._zeropower_via_newtonschulz(m, coefs, _muon.DEFAULT_NS_STEPS, _muon.EPS) for m in mats]
        return torch.stack(out).reshape(P.shape)
    return run, []


def torch_householder_product_setup(x, grad):
    from torch_householder import torch_householder_orgqr
    V, tau = x["V"], x["tau"]
    k = tau.shape[-1]
    eye = torch.eye(V.shape[-2], k, dtype=V.dtype, device=V.device)
    return (lambda: torch_householder_orgqr(V[..., :k].tril(-1) + eye, tau)), \
        [t for t in (V, tau) if t.requires_grad]


def torch_householder_dense_setup(x, grad):
    from torch_householder import torch_householder_orgqr
    V = x["V"]
    return (lambda: torch_householder_orgqr(V)), [V] if V.requires_grad else []


# ---- layers: the block-orthogonal table ---------------------------------------------------------------

class _Holder(nn.Module):
    """The smallest model PEFT can wrap: one nn.Linear named ``linear``."""
    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.linear = linear

    def forward(self, x):
        return self.linear(x)


def peft_oft_linear(in_features: int, out_features: int, block_size: int = 32, *, bias: bool = True,
                    neumann: bool = True, terms: int = PEFT_NEUMANN_TERMS, scale: float = 1e-2, device="cpu",
                    dtype=torch.float32, seed: int = 0) -> nn.Module:
    """An nn.Linear wrapped by PEFT's OFT (``OFTConfig(r=0, oft_block_size=block_size, ...)``): base frozen,
    the skew block parameters trainable and drawn N(0, scale²) so that R is not the identity."""
    from peft import OFTConfig, get_peft_model
    gen = torch.Generator().manual_seed(seed)
    base = nn.Linear(in_features, out_features, bias=bias)
    with torch.no_grad():
        base.weight.copy_(torch.randn(base.weight.shape, generator=gen) / in_features ** 0.5)
    cfg = OFTConfig(r=0, oft_block_size=block_size, target_modules=["linear"], use_cayley_neumann=neumann,
                    num_cayley_neumann_terms=terms)
    model = get_peft_model(_Holder(base), cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=gen) * scale)
    return model.to(device=device, dtype=dtype)


def layer_fwd_bwd(module: nn.Module, x: torch.Tensor) -> Callable[[], torch.Tensor]:
    """forward + backward of a layer inside a network: gradients of its trainable parameters and its input."""
    leaves: List[torch.Tensor] = [p for p in module.parameters() if p.requires_grad]
    x = x.detach().requires_grad_()
    gen = torch.Generator(device=x.device).manual_seed(1)
    with torch.no_grad():
        g = torch.randn(module(x).shape, generator=gen, dtype=x.dtype, device=x.device)

    def run():
        out = module(x)
        torch.autograd.grad(out, leaves + [x], g)
        return out.detach()
    return run
