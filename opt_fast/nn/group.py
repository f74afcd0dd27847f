"""Grouped batching: the OPT layers of a model that share (method, parameter shape, dtype, device) get
their R from ONE batched ``torch.ops.opt_fast`` call per forward of the model, not one call per layer.

How the single call is guaranteed:
* ``group_layers(model)`` builds a ``LayerGroup`` per key and a ``Grouping`` that owns them, and registers
  two hooks on ``model``: a forward pre-hook that opens a *session* (clears every group's cache and marks
  it active) and a forward hook (``always_call=True``) that closes it.
* Inside a session the first layer of a group that runs calls ``LayerGroup.result``: it stacks the
  group's parameters (``torch.stack`` of each layer's own nn.Parameter, so each keeps its state_dict key
  and gets its gradient through the stack), makes the one op call, and caches the result unbound into
  one view per layer; the other layers take theirs from the cache. Each forward of the model therefore
  recomputes exactly once, and the graph of one forward is never reused by another.
* Outside a session (a layer or a submodule called on its own, checkpoint recomputation) a layer
  computes its R with a call of its own, so results never go stale. The maps' saved tensors bypass any
  enclosing saved-tensor hooks, so that a non-reentrant checkpoint's recomputation (one call per layer)
  saves what its forward (the group's call, or none) did: checkpointing.py.

All state is plain Python attributes mutated in the hooks, which torch.compile(fullgraph=True) traces
as side effects; the groups are not nn.Modules, so the state_dict is unchanged.
"""
from collections import OrderedDict
from typing import Dict, List, Tuple

import torch
from torch import Tensor, nn

from .block import OPTBlockLinear, is_sharded
from .checkpointing import maps_saved_as_they_are
from .layers import OPTLayer, keep_warm_start


def _stale(group) -> bool:
    """No cached result, or one computed without autograd while a gradient is now needed (a reentrant
    checkpoint runs its forward under no_grad: a layer after it must not take that result)."""
    return group._cache is None or (torch.is_grad_enabled() and not group._cache_grad)


class _Got:
    """Which members' results got a gradient in the backward under way (None: not known, all did)."""
    __slots__ = ("flags",)

    def __init__(self):
        self.flags = None


class _Join(torch.autograd.Function):
    """torch.stack (sizes None) or torch.cat of the members' parameters; a member whose result got no
    gradient gets None, as a parameter a plain forward does not use, instead of zeros: optimizers then skip
    it (AdamW's weight decay, momentum), as they would without grouping."""

    @staticmethod
    def forward(ctx, got, sizes, *params):
        ctx.got, ctx.sizes = got, sizes
        return torch.stack(params) if sizes is None else torch.cat(params)

    @staticmethod
    def backward(ctx, grad):
        parts = grad.unbind(0) if ctx.sizes is None else grad.split(ctx.sizes, 0)
        flags = ctx.got.flags or [True] * len(parts)
        return (None, None, *(part if f else None for part, f in zip(parts, flags)))


class _Split(torch.autograd.Function):
    """unbind (sizes None) or split of the group's result into the members' results; its backward notes
    which of them got a gradient, for _Join's."""

    @staticmethod
    def forward(ctx, got, sizes, X):
        ctx.got, ctx.sizes = got, sizes
        ctx.set_materialize_grads(False)
        parts = X.unbind(0) if sizes is None else X.split(sizes, 0)
        ctx.shapes = [p.shape for p in parts]
        return tuple(parts)

    @staticmethod
    def backward(ctx, *grads):
        ctx.got.flags = [g is not None for g in grads]
        some = next((g for g in grads if g is not None), None)
        if some is None:
            return None, None, None
        full = [some.new_zeros(shape) if g is None else g for g, shape in zip(grads, ctx.shapes)]
        return None, None, torch.stack(full) if ctx.sizes is None else torch.cat(full)


def _plain_autograd() -> bool:
    """The custom join/split above only in eager autograd: not traced by torch.compile (their backward
    depends on which results got gradients) nor under torch.func's transforms."""
    return not (torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active())


def _join(params, sizes, got):
    if got is not None and torch.is_grad_enabled() and _plain_autograd():
        return _Join.apply(got, sizes, *params)
    return torch.stack(params) if sizes is None else torch.cat(params)


def _split(X, sizes, got):
    if got is not None and X.requires_grad and _plain_autograd():
        return _Split.apply(got, sizes, X)
    return X.unbind(0) if sizes is None else X.split(sizes, 0)


def _group_key(layer: OPTLayer) -> Tuple:
    P = layer.learnable
    key = (layer.method.name, tuple(P.shape), P.dtype, P.device)
    return key + ((tuple(layer.W0.shape),) if layer.direct else ())  # direct maps stack V0 too


class LayerGroup:
    """Same-keyed OPT layers whose R (or direct weight) is computed by one batched op call."""

    def __init__(self, layers: List[OPTLayer]):
        self.layers = list(layers)
        self.method = layers[0].method
        self.direct = layers[0].direct
        self.active = False
        self._cache, self._cache_grad = None, False
        self.grouping = None  # the Grouping that owns this group

    def result(self, index: int) -> Tensor:
        if _stale(self):
            # unbind, not indexing per layer: one UnbindBackward stacks the layers' gradients, where B
            # SelectBackwards would each zero-fill a [B, d, d] tensor and autograd would then sum B of them
            # (this backward at [5, 576, 576], measured: 11.6 ms indexed, 7.0 ms unbound)
            with maps_saved_as_they_are():
                got = _Got()
                self._cache, self._cache_grad = _split(self.compute(got), None, got), torch.is_grad_enabled()
        return self._cache[index]

    def compute(self, got=None) -> Tensor:
        """The stacked R (or weights) of every layer of the group: one op call."""
        P = _join([layer.learnable for layer in self.layers], None, got)
        if self.direct:
            return self.method.apply(P, torch.stack([layer._V0().to(P.dtype) for layer in self.layers]))
        if not self.method.warm_start:
            return self.method.rotation(P)
        R = self.method.rotation(P, torch.stack([layer.R0 for layer in self.layers]))
        for layer, R_i in zip(self.layers, R.unbind(0)):
            keep_warm_start(layer.R0, R_i)
        return R

    def attach(self):
        for i, layer in enumerate(self.layers):
            layer._opt_group, layer._opt_group_index = self, i

    def detach(self):
        for layer in self.layers:
            if layer._opt_group is self:
                layer._opt_group = None

    def __repr__(self):
        return f"LayerGroup(method={self.method.name!r}, layers={len(self.layers)})"


class BlockGroup:
    """The rotation blocks of every block-layer side with the same (method, b, dtype, device): their
    parameters are concatenated along the block dim and mapped by ONE op call per forward of the model."""

    def __init__(self, slots: List[Tuple[OPTBlockLinear, str]]):
        self.slots = list(slots)
        self.layers = list(dict.fromkeys(layer for layer, _ in slots))
        layer, side = slots[0]
        self.method, self.b = layer.method, layer.side_block(side)
        self.active = False
        self._cache, self._cache_grad = None, False
        self._usable = None
        self.grouping = None

    def usable(self) -> bool:
        """In a forward session, with every member's parameters whole. Under FSDP2 sharding per submodule,
        only the running unit's parameters are gathered (the others are DTensor shards): the layers then
        compute their own blocks, one call each. Decided once per session."""
        if not self.active:
            return False
        if self._usable is None:
            self._usable = not any(is_sharded(getattr(layer, f"{side}_blocks")) for layer, side in self.slots)
        return self._usable

    def result(self, index: int) -> Tensor:
        if _stale(self):
            with maps_saved_as_they_are():
                got = _Got()
                R = self.compute(got)
                self._cache, self._cache_grad = _split(R, self._sizes, got), torch.is_grad_enabled()
        return self._cache[index]

    def compute(self, got=None) -> Tensor:
        params = [getattr(layer, f"{side}_blocks") for layer, side in self.slots]
        self._sizes = [p.shape[0] for p in params]
        terms = {layer.terms for layer, _ in self.slots}   # read now: a layer's terms may have been changed
        if len(terms) > 1:   # the layers no longer agree: one call per side, still correct
            return torch.cat([layer.method.rotation(p, self.b, layer.terms)
                              for (layer, _), p in zip(self.slots, params)])
        P = params[0] if len(params) == 1 else _join(params, self._sizes, got)
        return self.method.rotation(P, self.b, terms.pop())

    def attach(self):
        for i, (layer, side) in enumerate(self.slots):
            layer._opt_block_slots[side] = (self, i)

    def detach(self):
        for layer, side in self.slots:
            if layer._opt_block_slots.get(side, (None,))[0] is self:
                del layer._opt_block_slots[side]

    def __repr__(self):
        return f"BlockGroup(method={self.method.name!r}, b={self.b}, sides={len(self.slots)})"


class Grouping:
    """The groups of one root module and the hooks that open and close a forward session."""

    def __init__(self, root: nn.Module, groups: Dict[Tuple, LayerGroup]):
        self.root = root
        self.groups = groups
        for group in groups.values():
            group.grouping = self
            group.attach()
        root.register_forward_pre_hook(self._open)
        root.register_forward_hook(self._close, always_call=True)
        root._opt_grouping = self

    def _open(self, module, args):
        for group in self.groups.values():
            group.active, group._cache, group._usable = True, None, None

    def _close(self, module, args, output):
        for group in self.groups.values():
            group.active, group._cache, group._usable = False, None, None

    def remove(self):
        """Detach the hooks and the layers (found by identity, so this also works on a deepcopy)."""
        for hooks in (self.root._forward_pre_hooks, self.root._forward_hooks):
            for hook_id in [k for k, h in hooks.items() if getattr(h, "__self__", None) is self]:
                del hooks[hook_id]
                self.root._forward_hooks_always_called.pop(hook_id, None)
        for group in self.groups.values():
            group.detach()
        if getattr(self.root, "_opt_grouping", None) is self:
            del self.root._opt_grouping

    def __repr__(self):
        return f"Grouping({list(self.groups.values())})"


def ungroup(model: nn.Module) -> None:
    """Remove every grouping that touches ``model`` or its OPT layers (they then compute R one by one)."""
    for module in model.modules():
        grouping = getattr(module, "_opt_grouping", None)
        if grouping is not None:
            grouping.remove()
        if isinstance(module, OPTLayer) and module._opt_group is not None:
            module._opt_group.grouping.remove()  # may be installed on an ancestor of ``model``
        if isinstance(module, OPTBlockLinear):
            for group, _ in list(module._opt_block_slots.values()):
                group.grouping.remove()


def group_layers(model: nn.Module) -> Grouping:
    """Group ``model``'s OPT layers that use an op-based method by (method, parameter shape, dtype,
    device), and the sides of its block layers by (method, block size, terms, dtype, device), and install
    the session hooks on ``model`` (replacing any earlier grouping of its layers). Call it again after
    changing a subset of layers' dtype or device."""
    ungroup(model)
    buckets: Dict[Tuple, list] = OrderedDict()
    for module in model.modules():  # modules() yields each shared layer once
        if isinstance(module, OPTLayer) and module.method.uses_op:
            buckets.setdefault(("dense",) + _group_key(module), []).append(module)
        elif isinstance(module, OPTBlockLinear):
            for side in module.sides_used():
                P = getattr(module, f"{side}_blocks")
                key = ("block", module.method.name, module.side_block(side), P.dtype, P.device)
                buckets.setdefault(key, []).append((module, side))
    return Grouping(model, OrderedDict(
        (k, LayerGroup(v) if k[0] == "dense" else BlockGroup(v)) for k, v in buckets.items()))
