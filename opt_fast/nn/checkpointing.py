"""The maps' saved tensors and activation checkpointing around the layers.

A model's OPT layers get their rotations from one batched call per forward (group.py), made by the first
layer that runs; a layer recomputed by an activation checkpoint (``torch.utils.checkpoint``, Hugging Face's
``gradient_checkpointing_enable()``) runs outside that forward and maps its own blocks. The non-reentrant
checkpoint requires its recomputation to save the same tensors, in the same order, as the forward did, so
the maps' own saved tensors (parameter-sized: the blocks, their factors) are kept out of any enclosing
saved-tensor hooks: stored as they are, neither recomputed nor seen by such hooks. What the layers save
around the maps (activations, R) is handed to the hooks as usual.
"""
import contextlib

import torch


def _keep(t):
    return t


@contextlib.contextmanager
def maps_saved_as_they_are():
    """Saved tensors of the ops inside are stored as they are, whatever saved-tensor hooks enclose them.
    (Not while torch.compile traces: it does not trace these hooks, and needs none of this; nor under
    torch.func's transforms, which refuse saved-tensor hooks and cannot be inside a checkpoint's.)"""
    if torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active():
        yield
        return
    with torch.autograd.graph.saved_tensors_hooks(_keep, _keep):
        yield
