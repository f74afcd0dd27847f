"""The maps of block-orthogonal layers: how a batch of nb learnable b × b blocks becomes nb rotations.

Every map starts at R = I (block layers always start from the identity, and merge_and_reset returns
there) and is batched over the block dim, so the blocks of every same-sized layer of a model are served
by one op call (group.py). Parameters are float32 (or float64); float16/bfloat16 copies are upcast
before the map, which needs float32 to stay orthogonal.

* ``cayley_neumann`` (default, POET / PEFT OFT): the skew block S = U − Uᵀ from its strictly upper
  triangle U, stored packed as b(b−1)/2 numbers per block in ``torch.triu_indices`` order (PEFT's
  layout), then the truncated series ``opt_fast.functional.cayley_neumann(S, terms)``: orthogonal up to
  about 2‖S‖₂^(terms+1), which merge_and_reset keeps small.
* ``cayley``: the same packed skew block through the exact transform (I + S)(I − S)⁻¹.
* ``gram_schmidt``, ``householder``, ``lowdin``: the dense OPT maps of methods.py on b × b blocks
  (identity init: P = I, or pairs of equal reflectors for Householder). Exact, like ``cayley``: no
  orthogonality error to merge away.
"""
from typing import Dict, Optional, Tuple

import torch
from torch import Tensor

from .. import functional
from .._forward_ad import has_tangent
from .methods import METHODS, pair_reflectors

_ops = torch.ops.opt_fast
_HALF = (torch.float16, torch.bfloat16)


def _compute(P: Tensor) -> Tensor:
    return P.float() if P.dtype in _HALF else P


class BlockMap:
    name = ""

    def shape(self, nb: int, b: int) -> Tuple[int, ...]:
        raise NotImplementedError

    def identity(self, nb: int, b: int, dtype, device, generator: Optional[torch.Generator] = None) -> Tensor:
        """Parameters of R = I. Randomness (Householder's reflector pairs) comes from ``generator`` (a CPU
        generator), so that layers seeded alike, e.g. on every DDP rank, reset alike."""
        raise NotImplementedError

    def rotation(self, P: Tensor, b: int, terms: int) -> Tensor:
        """[nb, ...] parameters -> [nb, b, b] rotations (float32/float64)."""
        raise NotImplementedError

    def __repr__(self):
        return f"{type(self).__name__}({self.name!r})"


_TRIU_CACHE: Dict[Tuple[int, str], Tensor] = {}


def triu_flat_index(b: int, device) -> Tensor:
    """Flat indices (row·b + col) of the strictly upper triangle, in torch.triu_indices order. Cached, but
    not while torch.compile traces: a tensor made inside a traced autograd.Function and kept in a global
    is an error there (a compiled model called before any eager call), nor under inference_mode."""
    key = (b, str(device))
    if key in _TRIU_CACHE:
        return _TRIU_CACHE[key]
    rows, cols = torch.triu_indices(b, b, 1, device=device)
    index = rows * b + cols
    if not torch.compiler.is_compiling() and not torch.is_inference_mode_enabled():
        _TRIU_CACHE[key] = index   # (an inference tensor cached would fail every later training step)
    return index


def _upper_blocks(U: Tensor, b: int) -> Tensor:
    """[nb, b(b−1)/2] strictly-upper entries -> [nb, b, b] blocks holding them, zeros elsewhere."""
    return U.new_zeros(U.shape[0], b * b).index_copy(1, triu_flat_index(b, U.device), U).view(-1, b, b)


def skew_from_packed(U: Tensor, b: int) -> Tensor:
    """[nb, b(b−1)/2] strictly-upper entries -> [nb, b, b] skew blocks S = U − Uᵀ (differentiable)."""
    F = _upper_blocks(U, b)
    return F - F.mT


def _doubled_upper(U: Tensor, b: int) -> Tensor:
    """[nb, b, b] blocks holding 2U on the strict upper triangle and zeros elsewhere: the op's skew part of
    it, (X − Xᵀ)/2, is S = U − Uᵀ itself, so S is never formed (one pass fewer each way)."""
    return _upper_blocks(U * 2, b)


class _PackedNeumann(torch.autograd.Function):
    """U [nb, b(b−1)/2] -> R = cayley_neumann(S, terms), S = U − Uᵀ, keeping only U for backward.

    Through plain autograd the map would hold S, the powers of S and (by block_apply) R: three or four
    b × b stacks per side, 12.5% of a 2048-token activation each at b = 256. Here the backward rebuilds the
    blocks and the powers (⌊terms/2⌋ more block products, at least one: two at terms = 5), so a layer's saved
    memory is its activations and R."""
    generate_vmap_rule = True   # torch.func.vmap of a gradient (per-sample gradients)

    @staticmethod
    def forward(U, b, terms):
        return _ops.cayley_neumann(_doubled_upper(U, b), terms)

    @staticmethod
    def setup_context(ctx, inputs, output):
        U, ctx.b, ctx.terms = inputs
        ctx.save_for_backward(U)

    @staticmethod
    def backward(ctx, grad_R):
        U, = ctx.saved_tensors
        grad_X = _ops.cayley_neumann_backward(grad_R, _doubled_upper(U, ctx.b), ctx.terms)
        flat = grad_X.reshape(grad_X.shape[0], ctx.b * ctx.b)   # X's upper entries are 2U
        return flat.index_select(1, triu_flat_index(ctx.b, U.device)) * 2, None, None


class PackedSkew(BlockMap):
    def __init__(self, name: str, neumann: bool):
        self.name, self.neumann = name, neumann

    def shape(self, nb, b):
        return (nb, b * (b - 1) // 2)

    def identity(self, nb, b, dtype, device, generator=None):
        return torch.zeros(self.shape(nb, b), dtype=dtype, device=device)

    def rotation(self, P, b, terms):
        if self.neumann and not has_tangent(P):   # (forward-mode AD: through the op's own rule below)
            return _PackedNeumann.apply(_compute(P), b, terms)
        S = skew_from_packed(_compute(P), b)
        return functional.cayley_neumann(S, terms) if self.neumann else _ops.cayley(S)


class DenseBlocks(BlockMap):
    """A dense OPT method of methods.py applied to the batch of blocks."""

    def __init__(self, name: str):
        self.name, self.method = name, METHODS[name]

    def shape(self, nb, b):
        return (nb, b, b)

    def identity(self, nb, b, dtype, device, generator=None):
        if self.name == "householder":
            V = torch.randn(self.shape(nb, b), generator=generator, dtype=dtype)
            return pair_reflectors(V).to(device)
        return self.method.init(self.shape(nb, b), "identity", dtype=dtype, device=device)

    def rotation(self, P, b, terms):
        return self.method.rotation(_compute(P))


BLOCK_METHODS: Dict[str, BlockMap] = {m.name: m for m in (
    PackedSkew("cayley_neumann", neumann=True), PackedSkew("cayley", neumann=False),
    DenseBlocks("gram_schmidt"), DenseBlocks("householder"), DenseBlocks("lowdin"))}


def get_block_method(name) -> BlockMap:
    if isinstance(name, BlockMap):
        return name
    if name not in BLOCK_METHODS:
        raise ValueError(f"opt_fast.nn: unknown method {name!r} for block layers; valid: {', '.join(BLOCK_METHODS)}")
    return BLOCK_METHODS[name]
