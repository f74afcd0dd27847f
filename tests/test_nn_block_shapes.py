"""Block layers on degenerate widths (sides of width 0, which nn.Linear accepts, and of width 1), and a
converted model converted again."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from opt_fast.nn import OPTBlockLinear, convert, merge, merge_and_reset

METHODS = ["cayley_neumann", "cayley", "gram_schmidt", "householder", "lowdin"]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("sides", ["in", "out", "both"])
@pytest.mark.parametrize("shape", [(0, 3), (3, 0), (0, 0), (1, 1), (5, 1)], ids=str)
def test_zero_and_one_wide_sides(method, sides, shape):
    """A side of width 0 has no blocks (nb = 0), one of width 1 a single 1 × 1 block: forward, backward,
    merge and the effective weight agree with F.linear."""
    torch.manual_seed(0)
    layer = OPTBlockLinear(*shape, method=method, block_size=4, sides=sides, dtype=torch.float64)
    x = torch.randn(2, shape[0], dtype=torch.float64, requires_grad=True)
    layer(x).sum().backward()
    merge_and_reset(layer)
    torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias))


def test_convert_a_model_with_a_zero_wide_layer():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(0, 6), nn.Tanh(), nn.Linear(6, 6), nn.Linear(6, 0))
    model = convert(net, method="cayley_neumann", block_size=4, sides="both")
    x = torch.randn(3, 0)
    model[2](model[1](model[0](x))).sum().backward()
    assert model(x).shape == (3, 0)
    torch.testing.assert_close(merge(model)[:3](x), model[:3](x))


def test_converting_a_converted_model_says_it_keeps_its_opt_layers():
    model = convert(nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 8)), method="cayley_neumann", block_size=4)
    with pytest.warns(UserWarning, match=r"left 2 layer\(s\) unconverted: 0: already an OPT layer"):
        again = convert(model, method="cayley", block_size=4)
    assert [m.method.name for m in again.modules() if isinstance(m, OPTBlockLinear)] == ["cayley_neumann"] * 2


def test_converting_a_converted_attention_names_the_attention_only():
    """The warning names an OPTMultiheadAttention once, not also its own OPT projections."""
    model = convert(nn.Sequential(nn.MultiheadAttention(8, 2)), method="cayley")
    with pytest.warns(UserWarning, match=r"left 1 layer\(s\) unconverted: 0: already an OPT layer \(OPTMulti"):
        convert(model, method="cayley")
