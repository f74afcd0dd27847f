"""OPT layers built on the meta device (the large-model recipe: build on meta, convert, shard, ``to_empty``,
then ``reset_parameters()``), and reset_parameters itself: block layers and the dense OPT layers."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from opt_fast.nn import OPTBlockLinear, OPTLayer, convert, merge_and_reset
from opt_fast.nn.methods import METHODS as DENSE_METHODS

METHODS = ["cayley_neumann", "cayley", "gram_schmidt", "householder", "lowdin"]


def build(method, device):
    with torch.device(device):
        net = nn.Sequential(nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 10, bias=False))
    return convert(net, method=method, block_size=4, sides="both")


def initialise(model):
    torch.manual_seed(3)
    for m in model.modules():
        if isinstance(m, OPTBlockLinear):
            m.reset_parameters()


@pytest.mark.parametrize("method", METHODS)
def test_meta_build_then_to_empty_and_reset_parameters(method):
    model = build(method, "meta")
    layer = model[0]
    assert layer.W0.is_meta and layer.in_blocks.is_meta and layer.in_perm.is_meta
    model = model.to_empty(device="cpu")
    initialise(model)
    again = build(method, "cpu")
    initialise(again)
    x = torch.randn(5, 12)
    torch.testing.assert_close(model(x), again(x), rtol=0, atol=0)   # the same seeded draws on either path
    for m in (model[0], model[2]):
        for side in ("in", "out"):
            perm = getattr(m, f"{side}_perm")
            assert torch.equal(perm.sort().values, torch.arange(perm.numel()))
        torch.testing.assert_close(m.weight, m.W0)                       # R = I
        assert int(m.merges) == 0 and abs(m.W0.std().item() * m.in_features ** 0.5 - 1) < 0.3
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    F.mse_loss(model(x), torch.randn(5, 10)).backward()
    opt.step()
    before = model(x)
    merge_and_reset(model, opt)
    torch.testing.assert_close(model(x), before, rtol=1e-4, atol=1e-5)


def test_reset_parameters_redraws_and_returns_to_the_identity():
    torch.manual_seed(0)
    layer = OPTBlockLinear(8, 8, block_size=4)
    with torch.no_grad():
        layer.in_blocks.add_(0.1)
    merge_and_reset(layer)
    W0, seed = layer.W0.clone(), layer.perm_seed.clone()
    layer.reset_parameters()
    assert not torch.equal(layer.W0, W0) and not torch.equal(layer.perm_seed, seed) and int(layer.merges) == 0
    assert torch.count_nonzero(layer.in_blocks) == 0 and torch.count_nonzero(layer.out_blocks) == 0


DENSE = ["gram_schmidt", "householder", "cayley", "lowdin", "none", "ogd", "orth_reg", "householder_qr"]
DENSE_CASES = [(m, None) for m in DENSE] + [(m, 0.5) for m in DENSE if DENSE_METHODS[m].stochastic_ok]


@pytest.mark.parametrize("method,stochastic", DENSE_CASES, ids=[f"{m}-{s or 'full'}" for m, s in DENSE_CASES])
def test_dense_layers_on_the_meta_device(method, stochastic):
    """convert on meta, to_empty, reset_parameters: the layers of a model converted directly, reset alike."""
    kw = {"stochastic": stochastic} if stochastic else {}

    def made(device):
        torch.manual_seed(0)
        with torch.device(device):
            net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(36, 5))
        model = convert(net, method=method, **kw)
        if device == "meta":
            assert all(t.is_meta for t in model.parameters())
            model = model.to_empty(device="cpu")
        torch.manual_seed(5)
        for m in model.modules():
            if isinstance(m, OPTLayer):
                m.reset_parameters()
        return model
    a, b = made("meta"), made("cpu")
    x = torch.randn(2, 3, 5, 5)
    torch.testing.assert_close(a(x), b(x), rtol=0, atol=0)
    assert torch.isfinite(a(x)).all()
