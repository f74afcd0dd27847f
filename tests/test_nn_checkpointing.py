"""Activation checkpointing around converted layers (torch.utils.checkpoint, reentrant or not, and Hugging
Face's gradient_checkpointing_enable): the gradients are those of the model without checkpointing."""
import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from _refs import block_llama
from opt_fast.nn import convert

F64 = torch.float64
CASES = [("cayley_neumann", 4), ("cayley", 4), ("lowdin", 4), ("gram_schmidt", None), ("cayley", None)]
IDS = ["block-cayley_neumann", "block-cayley", "block-lowdin", "dense-gram_schmidt", "dense-cayley"]


class Net(nn.Module):
    """Four same-shaped linear layers; ``regions`` of them run inside checkpoints, the rest outside."""

    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(12, 12) for _ in range(4))
        self.regions, self.reentrant = (), False

    def forward(self, x):
        for i, layer in enumerate(self.layers):
            if i in self.regions:
                x = checkpoint(lambda t, layer=layer: torch.tanh(layer(t)), x, use_reentrant=self.reentrant)
            else:
                x = torch.tanh(layer(x))
        return x


def grads(model, x):
    model.zero_grad()
    model(x).square().sum().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("method,block_size", CASES, ids=IDS)
@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
@pytest.mark.parametrize("regions", [(0,), (1, 2), (0, 1, 2, 3)], ids=["first", "middle", "all"])
def test_checkpointed_layers_get_the_gradients_of_the_plain_forward(method, block_size, reentrant, regions):
    torch.manual_seed(0)
    kw = {"block_size": block_size, "sides": "both"} if block_size else {}
    plain = convert(Net().to(F64), method=method, **kw)
    with torch.no_grad():   # away from the identity
        for n, p in plain.named_parameters():
            if not n.endswith("bias") and "weight" not in n:
                p.add_(torch.randn_like(p) * 0.05)
    ckpt = copy.deepcopy(plain)
    ckpt.regions, ckpt.reentrant = regions, reentrant
    x = torch.randn(5, 12, dtype=F64, requires_grad=True)
    want, got = grads(plain, x), grads(ckpt, x)
    assert set(got) == set(want)   # every parameter gets a gradient, also those of layers after a region
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=1e-10, atol=1e-12, msg=n)


@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
def test_hugging_face_gradient_checkpointing(reentrant):
    pytest.importorskip("transformers")
    model = block_llama()
    ckpt = copy.deepcopy(model)
    ckpt.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    ids = torch.randint(0, 128, (2, 17), generator=torch.Generator().manual_seed(0))
    out = []
    for m in (model, ckpt):
        m.train()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")   # (transformers' notes on use_cache and checkpointing)
            loss = F.cross_entropy(m(input_ids=ids[:, :-1]).logits.flatten(0, 1), ids[:, 1:].flatten())
        loss.backward()
        out.append({n: p.grad for n, p in m.named_parameters() if p.grad is not None})
    assert set(out[1]) == set(out[0]) and any(n.endswith("_blocks") for n in out[0])
    for n in out[0]:
        torch.testing.assert_close(out[1][n], out[0][n], rtol=1e-5, atol=1e-7, msg=n)
