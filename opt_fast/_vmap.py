"""Batching rules for ``torch.func.vmap`` over every opt_fast op.

Every op already takes leading batch dims on its matrix arguments (``[..., d, k]``, ``tau [..., k]``,
``S [..., b, b]`` ...), so the rule moves the vmapped dim to the front of each batched tensor, gives an
unbatched one the same leading dim (a stride-0 expand, no copy) and makes ONE op call: vmap of a gradient
(per-sample gradients) runs the batched kernels instead of torch's fallback, which calls the op once per
sample and warns about it.

``block_apply`` and its backward are the exception: its blocks ``R [nb, b, b]`` and ``perm [n]`` are
shared by all rows of ``X [..., n]``, and its backward sums ``grad_R`` over those rows. vmap over X (or the
incoming gradient) alone is still one call of the forward; per-sample blocks, a per-sample perm, or the
backward's per-sample ``grad_R``, are computed sample by sample.
"""
import torch
from torch import Tensor

from ._ops import SCHEMAS, lib

def _front(a, d, batch):
    if not isinstance(a, Tensor):
        return a
    if d is None:
        return a.expand(batch, *a.shape)
    return a.movedim(d, 0)


def _out_dims(out):
    return tuple(0 for _ in out) if isinstance(out, tuple) else 0


def _per_sample(op, info, in_dims, args):
    outs = [op(*(a.select(d, i) if d is not None else a for a, d in zip(args, in_dims)))
            for i in range(info.batch_size)]
    if isinstance(outs[0], tuple):
        return tuple(torch.stack(o) for o in zip(*outs)), tuple(0 for _ in outs[0])
    return torch.stack(outs), 0


def _rule(name):
    op = getattr(torch.ops.opt_fast, name).default

    def rule(info, in_dims, *args):
        if name == "block_apply":
            if all(d is None for i, d in enumerate(in_dims) if i != 1):  # only X: its batch is X's leading dim
                return op(args[0], args[1].movedim(in_dims[1], 0), *args[2:]), 0
            return _per_sample(op, info, in_dims, args)
        if name == "block_apply_backward":
            return _per_sample(op, info, in_dims, args)
        out = op(*(_front(a, d, info.batch_size) for a, d in zip(args, in_dims)))
        return out, _out_dims(out)
    return rule


def register() -> None:
    for name in SCHEMAS:
        torch.library.register_vmap(f"opt_fast::{name}", _rule(name), lib=lib)
