"""The OPT methods: how each one initialises its learnable tensor and turns it into the rotation R.

Every function here is batched over leading dimensions, so that a group of same-shaped layers is served
by ONE ``torch.ops.opt_fast`` call (see group.py). A method object is stateless; the layer owns the
tensors. ``init="reference"`` reproduces the released TF code's init, ``init="identity"`` starts at
R = I, and ``init="default"`` (what ``init=None`` means) is the reference init for every method except
``orth_reg``, which starts at a random orthogonal R (docs/methods.md).
"""
from typing import Dict, Optional, Tuple

import torch
from torch import Tensor

from .. import functional

# Looked up at call time (not bound at import) so that tests and profilers can wrap the entry point.
_ops = torch.ops.opt_fast

INITS = ("default", "reference", "identity")
_INIT_ALIASES = {"zero": "identity"}  # "zero" = P = 0 for Cayley, which is R = I for every method


def normalize_init(init: Optional[str]) -> str:
    init = "default" if init is None else _INIT_ALIASES.get(init, init)
    if init not in INITS:
        raise ValueError(f"opt_fast.nn: unknown init {init!r}; valid: {', '.join(INITS + tuple(_INIT_ALIASES))}")
    return init


def _eye(shape, dtype, device) -> Tensor:
    return torch.eye(shape[-1], dtype=dtype, device=device).expand(shape).clone()


def random_orthogonal(shape, dtype, device) -> Tensor:
    """Haar-distributed orthogonal matrices: Q of the QR of a Gaussian matrix, columns signed so that
    diag(R') > 0 (without the sign fix Q is not uniformly distributed)."""
    Q, Rp = torch.linalg.qr(torch.randn(shape, dtype=dtype, device=device))
    return Q * torch.sign(torch.diagonal(Rp, dim1=-2, dim2=-1)).unsqueeze(-2)


class Method:
    """Base class. ``shape(d, n, k)`` is the learnable tensor's shape, ``rotation(P)`` the d×d R."""
    name = ""
    param_name = "P"        # attribute name of the learnable tensor (and its state_dict key)
    uses_op = True          # R comes from an opt_fast op: same-shaped layers are batched into one call
    orthogonal = True       # R is orthogonal by construction (or kept so by the optimizer)
    warm_start = False      # lowdin: the op takes the previous step's R as a starting guess
    stochastic_ok = True    # R(identity init) == I exactly, so S-OPT's merge/reset keeps the function

    def shape(self, d: int, n: int, k: Optional[int]) -> Tuple[int, ...]:
        return (d, d)

    def init(self, shape, init: str, dtype, device) -> Tensor:
        # The released code draws every P (cp, gs, hr, ls, or) i.i.d. N(0, 1) (docs/methods.md).
        if init in ("default", "reference"):
            return torch.randn(shape, dtype=dtype, device=device)
        return _eye(shape, dtype, device)

    def rotation(self, P: Tensor, R0: Optional[Tensor] = None) -> Tensor:
        raise NotImplementedError

    def direct(self, d: int, n: int) -> bool:
        """True if ``apply`` (V0 -> V0 Rᵀ without forming R) is cheaper than forming R for n neurons."""
        return False

    def apply(self, P: Tensor, V0: Tensor) -> Tensor:
        raise NotImplementedError

    def __repr__(self):
        return f"{type(self).__name__}()"


class Cayley(Method):
    """R = cayley(S), S = triu(P) - triu(P)ᵀ (docs/methods.md#cayley: exact transform, no 1/2 on S; the strictly
    lower triangle of P is unused). Identity init is P = 0."""
    name = "cayley"

    def init(self, shape, init, dtype, device):
        if init == "identity":
            return torch.zeros(shape, dtype=dtype, device=device)
        return super().init(shape, init, dtype, device)

    def rotation(self, P, R0=None):
        U = P.triu()
        return _ops.cayley(U - U.mT)


class GramSchmidt(Method):
    """R = Gram-Schmidt of the ROWS of P (docs/methods.md#gram_schmidt) = transpose of the op's column Q."""
    name = "gram_schmidt"

    def rotation(self, P, R0=None):
        return _ops.gram_schmidt(P.mT, 0).mT


class HouseholderQR(Method):
    """The released "HR" code: Q of a Householder QR of P with d-1 reflectors (docs/methods.md#householder_qr). That is
    Q of P = QR' with diag(R') > 0 on the first d-1 columns and the last column's sign set so that
    det R = (-1)^(d-1). Identity init gives I only for odd d (for even d, diag(1, ..., 1, -1))."""
    name = "householder_qr"
    stochastic_ok = False

    def rotation(self, P, R0=None):
        Q = _ops.gram_schmidt(P, 0)
        d = Q.shape[-1]
        # sign(det Q) is piecewise constant: no gradient through it. From slogdet, not det: det's product of
        # LU pivots underflows to -0.0 in float32 from d ~ 500 (sign 0 would zero R's last column).
        flip = torch.linalg.slogdet(Q.detach()).sign * (-1.0) ** (d - 1)
        scale = torch.cat([torch.ones_like(Q[..., 0, :-1]), flip.unsqueeze(-1)], dim=-1)
        return Q * scale.unsqueeze(-2)


def pair_reflectors(V: Tensor) -> Tensor:
    """In place: H(v)H(v) = I, so repeating each column once makes H(v_1)…H(v_k) = I while every reflector
    still has a gradient. With odd k the last one is 0 (the identity reflector; its gradient is 0)."""
    k = V.shape[-1]
    V[..., 1::2] = V[..., 0:k - k % 2:2]
    if k % 2:
        V[..., -1] = 0
    return V


class Householder(Method):
    """Learnable dense reflector vectors V [d, k] (k = d by default): R = H(v1)…H(vk). Not in the released
    code (its "HR" is householder_qr). With fewer neurons than fan-in (n < d) the layer applies the
    reflectors to V0ᵀ directly (householder_apply, O(dkn)) instead of forming R (O(d²k) + O(nd²))."""
    name = "householder"
    param_name = "V"
    stochastic_ok = False

    def shape(self, d, n, k):
        k = d if k is None else k
        if not (1 <= k <= d or k == d == 0):   # (a layer with no inputs has no reflectors)
            raise ValueError(f"opt_fast.nn: householder needs 1 <= num_reflectors <= d = {d}, got {k}")
        return (d, k)

    def init(self, shape, init, dtype, device):
        V = torch.randn(shape, dtype=dtype, device=device)
        return pair_reflectors(V) if init == "identity" else V

    def rotation(self, P, R0=None):
        return _ops.householder_orthogonal(P)

    def direct(self, d, n):
        return n < d

    def apply(self, P, V0):
        return _ops.householder_apply(P, V0.mT).mT


class Lowdin(Method):
    """R = polar factor of P (docs/methods.md#lowdin), warm-started from the previous step's R (a non-persistent
    buffer of the layer). The op iterates to float-grade orthogonality; the warm start changes its cost,
    not its result."""
    name = "lowdin"
    warm_start = True

    def rotation(self, P, R0=None):
        return functional.lowdin(P, 0, R0)  # on the CPU in training: lowdin_svd (factors kept for the backward)


class OGD(Method):
    """R itself is the parameter (identity init in every mode), kept orthogonal by
    opt_fast.optim.CayleySGD (docs/methods.md#ogd). No weight decay on R."""
    name = "ogd"
    param_name = "R"
    uses_op = False
    stochastic_ok = False

    def init(self, shape, init, dtype, device):
        return _eye(shape, dtype, device)

    def rotation(self, P, R0=None):
        return P


class OrthReg(Method):
    """Unconstrained R plus the soft penalty opt_fast.orth_reg_loss (λ‖RRᵀ − I‖²_F); R is NOT orthogonal.

    Default init: a random orthogonal R (Haar), so W = R W0 starts with W0's statistics and the penalty
    at 0. ``init="reference"`` is the released code's i.i.d. N(0, 1) R (R Rᵀ ≈ d·I: weights √d too
    large at the start; use it with the released unsquared penalty, ``orth_reg_loss(squared=False)``).
    """
    name = "orth_reg"
    param_name = "R"
    uses_op = False
    orthogonal = False
    stochastic_ok = False

    def init(self, shape, init, dtype, device):
        if init == "default":
            return random_orthogonal(shape, dtype, device)
        return super().init(shape, init, dtype, device)

    def rotation(self, P, R0=None):
        return P


class Plain(Method):
    """No OPT: a learnable weight [n, d], initialised to a copy of W0, through the same layer code."""
    name = "none"
    param_name = "weight"
    uses_op = False
    orthogonal = False
    stochastic_ok = False

    def shape(self, d, n, k):
        return (n, d)

    def init(self, shape, init, dtype, device):
        return torch.empty(shape, dtype=dtype, device=device)  # the layer copies W0 into it

    def rotation(self, P, R0=None):
        raise TypeError("opt_fast.nn: method 'none' has no rotation R (its weight is learned directly)")

    def direct(self, d, n):
        return True

    def apply(self, P, V0):
        return P


METHODS: Dict[str, Method] = {m.name: m for m in (
    Cayley(), GramSchmidt(), Householder(), HouseholderQR(), Lowdin(), OGD(), OrthReg(), Plain())}


def get_method(name) -> Method:
    if isinstance(name, Method):
        return name
    if name not in METHODS:
        raise ValueError(f"opt_fast.nn: unknown method {name!r}; valid methods: {', '.join(METHODS)}")
    return METHODS[name]
