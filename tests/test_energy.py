"""opt_fast.hyperspherical_energy (docs/methods.md)."""
import itertools
import math

import pytest
import torch

import opt_fast

F64 = torch.float64


def _brute(W, s):
    V = [w.flatten() / w.norm() for w in W]
    total = 0.0
    for i, j in itertools.permutations(range(len(V)), 2):  # ordered pairs i != j
        z = (V[i] - V[j]).norm().item()
        total += math.log(1 / z) if s == 0 else z ** (-s)
    return total


@pytest.mark.parametrize("s", [0, 1, 2])
def test_matches_the_definition(s):
    torch.manual_seed(s)
    W = torch.randn(7, 3, 2, 2, dtype=F64)  # conv layout: rows are neurons
    e = opt_fast.hyperspherical_energy(W, s=s)
    assert e.item() == pytest.approx(_brute(W, s), rel=1e-12)
    mean = opt_fast.hyperspherical_energy(W, s=s, reduction="mean")
    assert mean.item() == pytest.approx(_brute(W, s) / (7 * 6), rel=1e-12)


def test_invariant_to_rotation_and_scale_of_neurons():
    torch.manual_seed(0)
    V0 = torch.randn(10, 27, dtype=F64)
    R = torch.linalg.qr(torch.randn(27, 27, dtype=F64))[0]
    scales = torch.rand(10, 1, dtype=F64) + 0.5
    for s in (0, 1, 2):
        e0 = opt_fast.hyperspherical_energy(V0, s)
        assert torch.allclose(opt_fast.hyperspherical_energy(scales * V0 @ R.T, s), e0, rtol=1e-12)


def test_gradient_and_module_input():
    W = torch.randn(5, 4, requires_grad=True)
    opt_fast.hyperspherical_energy(W, s=2).backward()
    assert torch.isfinite(W.grad).all()
    layer = opt_fast.nn.OPTLinear(4, 5, method="cayley", dtype=F64)
    assert torch.allclose(opt_fast.hyperspherical_energy(layer), opt_fast.hyperspherical_energy(layer.W0))


def test_coincident_neurons_are_finite_and_bad_input():
    W = torch.ones(3, 4)
    assert torch.isfinite(opt_fast.hyperspherical_energy(W, s=1))
    with pytest.raises(ValueError, match="reduction"):
        opt_fast.hyperspherical_energy(W, reduction="max")
    with pytest.raises(ValueError, match="at least 2 neurons"):
        opt_fast.hyperspherical_energy(torch.ones(1, 4))
    with pytest.raises(ValueError, match="s must be"):
        opt_fast.hyperspherical_energy(W, s=-1)
