"""Dense OPT layers in half precision (model.to(torch.bfloat16), or converting a bfloat16 model): the
op-based methods keep their parameter in float32 (the maps need it), form the weight in float32 and cast
it to the activations' dtype; the outputs are those of the float32 layer to half-precision rounding."""
import copy

import pytest
import torch
from torch import nn

from opt_fast.nn import convert, merge

OP_METHODS = ["cayley", "gram_schmidt", "householder", "householder_qr", "lowdin"]


def _base():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 12), nn.ReLU(), nn.Conv1d(12, 6, 3, padding=1))


def _run(m, x):
    return m[2](m[1](m[0](x)).mT)   # the Conv1d on an unbatched [channels, length] input


@pytest.mark.parametrize("half", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("method, how", [(m, h) for m in OP_METHODS for h in ("cast-after", "convert-a-half-model")]
                         + [("cayley", "stochastic"), ("gram_schmidt", "stochastic")])
def test_half_precision_dense_layers(method, how, half):
    kw = dict(method=method, init="identity") | ({"stochastic": 0.5} if how == "stochastic" else {})
    m32 = convert(_base(), **kw)
    with torch.no_grad():
        for p in m32.parameters():
            p.add_(0.05 * torch.randn_like(p))
    if how == "convert-a-half-model":
        m16 = convert(_base().to(half), **kw)
        m16.load_state_dict(m32.state_dict())
    else:
        m16 = copy.deepcopy(m32).to(half)
    for layer in (m16[0], m16[2]):
        assert layer.learnable.dtype == torch.float32 and layer.W0.dtype == half
    x = torch.randn(5, 16)
    y32, y16 = _run(m32, x), _run(m16, x.to(half))
    assert y16.dtype == half
    torch.testing.assert_close(y16.float(), y32, rtol=0.05, atol=0.05)
    y16.float().square().sum().backward()
    assert m16[0].learnable.grad.dtype == torch.float32 and torch.isfinite(m16[0].learnable.grad).all()
    torch.optim.SGD(m16.parameters(), lr=1e-3).step()
    torch.testing.assert_close(_run(merge(m16), x.to(half)).float(), _run(m16, x.to(half)).float(),
                               rtol=0.02, atol=0.02)
    # the float32 parameters survive a round trip through a float32 model's state_dict
    back = convert(_base(), **kw)
    back.load_state_dict(m16.state_dict())
    assert torch.equal(back[0].learnable, m16[0].learnable)
