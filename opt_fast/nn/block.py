"""Block-orthogonal equivalence layers (POET / OFT family): OPT at transformer scale.

``OPTBlockLinear`` keeps a frozen weight W0 [out, in] and learns block-diagonal rotations on one or both
sides of it, each conjugated by a random permutation Π:

    W = R_out W0 R_inᵀ,     R = Πᵀ blockdiag(R_1, …, R_nb) Π,   R_j = map(parameters_j) ∈ O(b)

computed input-centric: y = R_out (W0 (R_inᵀ x)) + bias by two ``block_apply`` calls around the frozen
GEMM, never forming an out × in product. Because W0 is frozen its backward needs no weight-gradient GEMM,
so a one-sided layer costs about 2 GEMMs + small block products against nn.Linear's 3 GEMMs.

* sides: "in" (R_out = I: PEFT OFT's input rotation; with keep_weights it is orthogonal fine-tuning of a
  pretrained weight), "out" (R_in = I) or "both" (POET-style pretraining from a random W0).
* Orthogonal R_in, R_out leave the singular values of W0 unchanged (exactly, for the exact maps).
* A side of width n uses blocks of b = min(block_size, n) (none if n = 0); nb = n // b blocks cover nb·b
  coordinates and the other n − nb·b (perm[nb·b:]) are left as they are until the next merge draws a new
  permutation.
* ``merge_and_reset`` (merging.py) folds the rotations into W0, resets them to I and draws new
  permutations; the output does not change.
* Parameters: ``in_blocks`` / ``out_blocks`` (layout per method, block_methods.py), always starting at
  R = I. They stay float32 (become float32, from float64) when the model is cast to float16/bfloat16
  (``model.to(torch.bfloat16)`` casts W0, the bias and the activations; the maps need float32 to stay
  orthogonal).
* W0 is a buffer; ``frozen_weight_as_parameter()`` (``prepare_fsdp`` below, for a model) makes it a
  parameter with requires_grad=False, so that FSDP2, which shards parameters and not buffers, shards it.
* recompute=True saves only the input for backward and recomputes the rest there (the maps, and the inner
  activation W0 R_inᵀ x: one more frozen GEMM per backward), the memory of a plain nn.Linear. Its maps
  are computed per layer, not in the group's batched call.
"""
import math
import sys
import warnings
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from .. import functional
from . import extra_state
from .block_methods import BlockMap, get_block_method
from .checkpointing import maps_saved_as_they_are
from .layers import _HALF, apply_keeping_float32
from .optimizer_state import clear_state
from .torchscript import RefuseScripting, refuse_tracing

SIDES = ("in", "out", "both")



def is_sharded(t) -> bool:
    """A DTensor parameter: FSDP2's shard of it, outside the forward of its unit. torch.distributed.tensor is
    not imported here (it is 40% of `import opt_fast`'s time): no tensor is a DTensor before it is."""
    dtensor = sys.modules.get("torch.distributed.tensor")
    return dtensor is not None and isinstance(t, getattr(dtensor, "DTensor", ()))


def _full(P: Tensor) -> Tensor:
    """The whole parameter: a DTensor is gathered (a collective: every rank must make the same call)."""
    return P.full_tensor() if is_sharded(P) else P


def _assign(P: Tensor, value: Tensor) -> None:
    """P <- value (the whole tensor, identical on every rank); an FSDP2 shard takes its part of it."""
    if is_sharded(P):
        from torch.distributed.tensor import distribute_tensor
        value = distribute_tensor(value.to(P.device), P.device_mesh, P.placements)
    P.copy_(value)


def _redraw(P: Tensor, fill) -> None:
    """fill(P) in place; an FSDP2 shard is drawn whole on every rank (the values of the unsharded layer
    under the same seed), then takes its part."""
    if is_sharded(P):
        _assign(P, fill(torch.empty(P.shape, dtype=P.dtype, device=P.device)))
    else:
        fill(P)


def _uses(sides: str, side: str) -> bool:
    return sides == "both" or sides == side


class OPTBlockLinear(RefuseScripting, nn.Module):
    """nn.Linear's signature plus the block options: y = x Wᵀ + b with W = R_out W0 R_inᵀ (module docstring).

    method: "cayley_neumann" (default), "cayley", "gram_schmidt", "householder" or "lowdin".
    block_size: b (required). sides: "in", "out" or "both". permute: conjugate the blocks by a random
    permutation (redrawn at every merge). terms: Neumann terms of "cayley_neumann" (POET's k; PEFT's
    num_cayley_neumann_terms = terms + 2, for terms >= 2). recompute: save only x for backward (see module
    docstring).
    W0 is drawn N(0, 1/in) (variance-preserving); convert(..., keep_weights=True) sets it to a pretrained
    weight instead.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, method="cayley_neumann", *,
                 block_size: int, sides: str = "both", permute: bool = True, terms: int = 5,
                 recompute: bool = False, device=None, dtype=None):
        super().__init__()
        if sides not in SIDES:
            raise ValueError(f"opt_fast.nn: sides must be one of {SIDES}, got {sides!r}")
        if not isinstance(block_size, int) or isinstance(block_size, bool) or block_size < 1:
            raise ValueError(f"opt_fast.nn: block_size must be a positive int, got {block_size!r}")
        if not isinstance(terms, int) or isinstance(terms, bool) or terms < 0:
            raise ValueError(f"opt_fast.nn: terms must be an int >= 0, got {terms!r}")
        factory = {"device": device, "dtype": dtype}
        self.method: BlockMap = get_block_method(method)
        self.in_features, self.out_features = in_features, out_features
        self.block_size, self.sides, self.permute, self.terms = block_size, sides, permute, terms
        self.recompute = recompute
        W0 = torch.empty(out_features, in_features, **factory)
        self.register_buffer("W0", W0)
        # per-layer seed of the permutations (drawn from the global RNG, so seeded runs and DDP ranks agree)
        self.register_buffer("perm_seed", torch.zeros(1, dtype=torch.int64, device=W0.device))
        self.register_buffer("merges", torch.zeros((), dtype=torch.int64, device=W0.device))
        param_dtype = torch.float32 if W0.dtype in _HALF else W0.dtype
        for side, n in (("in", in_features), ("out", out_features)):
            if not _uses(sides, side):
                self.register_parameter(f"{side}_blocks", None)
                self.register_buffer(f"{side}_perm", None)
                continue
            shape = self.method.shape(n // self.side_block(side), self.side_block(side))
            self.register_parameter(f"{side}_blocks", nn.Parameter(torch.empty(shape, dtype=param_dtype,
                                                                               device=W0.device)))
            self.register_buffer(f"{side}_perm", torch.empty(n, dtype=torch.int64, device=W0.device)
                                 if permute else None)
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, **factory))
        else:
            self.register_parameter("bias", None)
        self._opt_block_slots = {}  # side -> (BlockGroup, index), set by group.group_layers
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Draw what construction draws: W0 ~ N(0, 1/in), the bias as nn.Linear's, a new permutation seed
        (from the global RNG), R = I, no merges and the permutations of that seed. On a meta device only
        the shapes exist: after ``to_empty`` (FSDP2's recipe for models built on the meta device) call this
        to initialise. It replaces a W0 taken from a pretrained weight (convert(keep_weights=True))."""
        in_features = self.in_features
        std = 1.0 / math.sqrt(max(in_features, 1))
        _redraw(self.W0, lambda t: t.normal_(0.0, std))
        seed = torch.randint(0, 2**62, (1,), device="cpu")   # its value is needed now, whatever the device
        self.perm_seed.copy_(seed)
        self.merges.zero_()
        for side in self.sides_used():
            P = getattr(self, f"{side}_blocks")
            b = self.side_block(side)
            _assign(P, self.method.identity(P.shape[0], b, dtype=P.dtype, device="cpu",   # (a DTensor's shape
                                            generator=self._generator(side, seed=int(seed))))   # is the whole)
            if self.permute:
                getattr(self, f"{side}_perm").copy_(self._draw_perm(side, seed=int(seed)))
        if self.bias is not None:
            bound = 1.0 / math.sqrt(in_features) if in_features > 0 else 0.0
            _redraw(self.bias, lambda t: t.uniform_(-bound, bound))

    # ---- structure --------------------------------------------------------------------------------------
    def side_block(self, side: str) -> int:
        """b of one side (the block size, or the side's width if that is smaller)."""
        n = self.in_features if side == "in" else self.out_features
        return max(1, min(self.block_size, n))   # (a side of width 0 has no blocks: nb = 0)

    def _generator(self, side: str, stream: int = 0, seed: Optional[int] = None) -> torch.Generator:
        """A CPU generator determined by the layer's seed, its merge count and the side: what every random
        draw of a reset uses (permutations, Householder's reflector pairs), identical on every DDP rank.
        (``seed``: the seed's value, given where the buffer cannot be read: on the meta device.)"""
        seed = int(self.perm_seed) if seed is None else seed
        merges = 0 if self.merges.is_meta else int(self.merges)
        return torch.Generator().manual_seed((seed * 1_000_003 + 4 * merges + 2 * (side == "out") + stream)
                                             % (2**63 - 1))

    def _draw_perm(self, side: str, seed: Optional[int] = None) -> Tensor:
        n = self.in_features if side == "in" else self.out_features
        return torch.randperm(n, generator=self._generator(side, stream=1, seed=seed), device="cpu").to(self.W0.device)

    def sides_used(self) -> Tuple[str, ...]:
        return tuple(s for s in ("in", "out") if _uses(self.sides, s))

    # ---- the rotations ------------------------------------------------------------------------------------
    def block_rotation(self, side: str) -> Tensor:
        """R_side's blocks [nb, b, b] (from the group's one call during a grouped forward). Outside a
        forward under FSDP2 the parameter is a shard, gathered first (every rank must call this)."""
        slot = self._opt_block_slots.get(side)
        if slot is not None and slot[0].usable():
            return slot[0].result(slot[1])
        P = _full(getattr(self, f"{side}_blocks"))
        with maps_saved_as_they_are():   # (a checkpoint recomputing this layer: checkpointing.py)
            return self.method.rotation(P, self.side_block(side), self.terms)

    def _rotations(self) -> Tuple[Optional[Tensor], Optional[Tensor]]:
        return tuple(self.block_rotation(s) if _uses(self.sides, s) else None for s in ("in", "out"))

    def _forward_impl(self, x: Tensor, R_in: Optional[Tensor], R_out: Optional[Tensor]) -> Tensor:
        if R_in is not None:  # R_inᵀ x: the blocks transposed
            x = functional.block_apply(R_in.mT, x, self.in_perm)
        if R_out is None:
            return F.linear(x, self.W0, self.bias)
        y = functional.block_apply(R_out, F.linear(x, self.W0), self.out_perm)
        # in y's dtype, as F.linear adds it (under autocast y is the half GEMM's dtype, the bias float32)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def _recomputed(self, x: Tensor, P_in: Optional[Tensor], P_out: Optional[Tensor]) -> Tensor:
        def rotation(side, P):
            return None if P is None else self.method.rotation(P, self.side_block(side), self.terms)
        return self._forward_impl(x, rotation("in", P_in), rotation("out", P_out))

    def forward(self, x: Tensor) -> Tensor:
        refuse_tracing(self)
        if self.recompute and torch.is_grad_enabled() and not torch._C._are_functorch_transforms_active():
            # the maps and the inner activation are recomputed in backward: only x (and the parameters) are
            # kept, and this layer's maps are its own calls, outside the group's batched call. (Not under
            # torch.func's transforms, which refuse the saved-tensor hooks this takes: computed as without.)
            return checkpoint(self._recomputed, x, self.in_blocks, self.out_blocks, use_reentrant=False)
        return self._forward_impl(x, *self._rotations())

    def effective_weight(self, W0: Optional[Tensor] = None) -> Tensor:
        """W = R_out W0 R_inᵀ ([out, in], in W0's dtype), for merging and inspection."""
        R_in, R_out = self._rotations()
        W = _full(self.W0) if W0 is None else W0
        if R_in is not None:   # rows of W0 rotated: (W0 R_inᵀ)_i = (R_in w_i)ᵀ
            W = functional.block_apply(R_in, W, self.in_perm)
        if R_out is not None:  # columns rotated
            W = functional.block_apply(R_out, W.mT, self.out_perm).mT
        return W

    @property
    def weight(self) -> Tensor:
        """The effective weight R_out W0 R_inᵀ, computed on access (read-only; for code that reads
        ``.weight``). Train through the layer's parameters, or merge()."""
        return self.effective_weight()

    @weight.setter
    def weight(self, value):
        raise AttributeError("opt_fast.nn: OPTBlockLinear.weight is the computed effective weight and cannot be "
                             "set; set .W0 (the frozen weight) or use opt_fast.nn.merge() for a plain nn.Linear")

    def frozen_weight_as_parameter(self) -> None:
        """Hold W0 as an nn.Parameter with requires_grad=False instead of a buffer (the same tensor, the same
        state_dict key): FSDP2's fully_shard then shards it like a frozen base weight. Idempotent."""
        if "W0" in self._buffers:
            self.W0 = nn.Parameter(self._buffers.pop("W0"), requires_grad=False)

    # ---- merge ----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def merge_and_reset(self, optimizer=None) -> None:
        """W0 <- R_out W0 R_inᵀ (computed in at least float32), rotations <- I, fresh permutations, and the
        optimizer state of the reset parameters cleared. The layer's output is unchanged up to rounding."""
        self._warn_if_not_orthogonal()
        W0 = _full(self.W0)   # a sharded W0 (frozen_weight_as_parameter under FSDP2) is gathered, then re-sharded
        W = self.effective_weight(W0.float() if W0.dtype in _HALF else W0).to(W0.dtype)
        _assign(self.W0, W)
        self.merges += 1
        for side in self.sides_used():
            P = getattr(self, f"{side}_blocks")
            b = self.side_block(side)
            eye = self.method.identity(P.shape[0], b, dtype=P.dtype, device=P.device, generator=self._generator(side))
            _assign(P, eye)   # (an FSDP2 shard takes its part of the reset value, identical on every rank)
            clear_state(optimizer, P)
            if self.permute:
                getattr(self, f"{side}_perm").copy_(self._draw_perm(side))

    def _warn_if_not_orthogonal(self, tol: float = 0.1) -> None:
        """A merge bakes R into W0 for good: say so when R is far from orthogonal (the Cayley–Neumann series
        diverges as ‖S‖ nears 1, e.g. after a learning rate too large for it), when it can still be undone."""
        for side in self.sides_used():
            b = self.side_block(side)
            R = self.method.rotation(_full(getattr(self, f"{side}_blocks")), b, self.terms)
            if R.numel() == 0:
                continue
            eye = torch.eye(b, dtype=R.dtype, device=R.device)
            err = (torch.linalg.matrix_norm(R.mT @ R - eye) / math.sqrt(b)).max()
            if not bool(err <= tol):
                warnings.warn(
                    f"opt_fast.nn: merging an OPTBlockLinear whose {side} rotation is not orthogonal "
                    f"(‖RᵀR − I‖_F/√b = {float(err):.3g} > {tol}, method {self.method.name!r}): the merge keeps "
                    f"it in W0 (its singular values change). Lower the learning rate or merge more often; "
                    f"an exact method (e.g. 'cayley') stays orthogonal at any step size.", stacklevel=3)

    # ---- dtype casts keep the orthogonal parameters float32 --------------------------------------------------
    def _apply(self, fn, recurse=True):
        return apply_keeping_float32(self, fn, recurse, [n for n in self._parameters if n.endswith("_blocks")])

    # ---- state_dict ---------------------------------------------------------------------------------------------
    def _settings(self):
        return {"method": self.method.name, "block_size": self.block_size, "sides": self.sides,
                "terms": self.terms, "permute": self.permute}

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        # as OPTLayer's: a state_dict that sets this layer's rotations, or a plain layer's weight, without W0
        # would leave a random W0 under them (torch passes strict=True here even for strict=False loads)
        sets_weight = any(prefix + k in state_dict for k in ("in_blocks", "out_blocks", "weight"))
        if strict and sets_weight and prefix + "W0" not in state_dict:
            hint = (" (it looks like a plain layer's state_dict: use opt_fast.nn.convert(model, block_size=b, "
                    "keep_weights=True) to start from pretrained weights)" if prefix + "weight" in state_dict else "")
            error_msgs.append(f"opt_fast.nn: OPTBlockLinear at {prefix or '<root>'!r} needs its frozen weight "
                              f"{prefix + 'W0'!r} in the state_dict{hint}")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def get_extra_state(self):
        return extra_state.encode(self._settings())

    def set_extra_state(self, state):
        state, mine = extra_state.decode(state), self._settings()
        diff = {k: (state.get(k), v) for k, v in mine.items() if k != "terms" and state.get(k) != v}
        if diff:
            raise ValueError("opt_fast.nn: state_dict was saved from an OPTBlockLinear with other settings: "
                             + ", ".join(f"{k}={a!r} (this layer: {b!r})" for k, (a, b) in diff.items()))
        saved = state.get("terms")
        if self.method.name == "cayley_neumann" and saved is not None and saved != self.terms:
            # allowed (the parameters are the same; e.g. more terms for evaluation), but the map differs
            warnings.warn(f"opt_fast.nn: loading an OPTBlockLinear state_dict saved with terms={saved} into a "
                          f"layer with terms={self.terms}: the layer keeps terms={self.terms}, so its R differs "
                          f"from the saved model's by the series' truncation", stacklevel=2)

    def extra_repr(self):
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"method={self.method.name!r}, block_size={self.block_size}, sides={self.sides!r}, "
                f"permute={self.permute}" + (f", terms={self.terms}" if self.method.name == "cayley_neumann" else "")
                + (", recompute=True" if self.recompute else ""))


def prepare_fsdp(model: nn.Module) -> int:
    """Make the frozen weight W0 of every OPTBlockLinear of ``model`` a parameter with requires_grad=False
    (``frozen_weight_as_parameter``), so that FSDP2's ``fully_shard``, called after this, shards it as it
    shards the rotations; returns how many layers. Without it W0 is a buffer, which FSDP2 keeps whole on
    every rank. Call it before creating the optimizer (W0 is skipped by it either way: it has no gradient).
    The state_dict is unchanged (same keys), so checkpoints load into either form."""
    layers = [m for m in model.modules() if isinstance(m, OPTBlockLinear)]
    for m in layers:
        m.frozen_weight_as_parameter()
    return len(layers)
