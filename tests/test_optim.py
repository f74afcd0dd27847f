"""CayleySGD (docs/methods.md#ogd) and the orth_reg penalty and inits (docs/methods.md#orth_reg)."""
import pytest
import torch
from torch import nn

import opt_fast
from opt_fast.nn import OPTLinear, convert
from opt_fast.optim import CayleySGD

F64 = torch.float64


def orth_err(R):
    return torch.linalg.matrix_norm(R.mT @ R - torch.eye(R.shape[-1], dtype=R.dtype)).item()


def _spec_step(X, G, M, lr):
    """The update of docs/methods.md#ogd, written out literally."""
    M = 0.9 * M - G
    A = M @ X.T - 0.5 * X @ (X.T @ M @ X.T)
    Omega = A - A.T
    M = Omega @ X
    alpha = min(lr, 1.0 / (torch.linalg.matrix_norm(Omega).item() + 1e-8))
    Y0 = X + alpha * M
    Y1 = X + (alpha / 2) * Omega @ (X + Y0)
    return X + (alpha / 2) * Omega @ (X + Y1), M


@pytest.mark.parametrize("scale", [0.1, 100.0])  # alpha = lr, and alpha = 1/‖Ω‖
def test_step_matches_spec(scale):
    torch.manual_seed(0)
    X0 = torch.linalg.qr(torch.randn(6, 6, dtype=F64))[0]
    X = nn.Parameter(X0.clone())
    opt = CayleySGD([X], lr=0.02)
    Xr, M = X0.clone(), torch.zeros_like(X0)
    for _ in range(3):
        G = scale * torch.randn(6, 6, dtype=F64)
        X.grad = G.clone()
        opt.step()
        Xr, M = _spec_step(Xr, G, M, 0.02)
        assert torch.allclose(X.detach(), Xr, atol=1e-13)
        assert torch.allclose(opt.state[X]["momentum_buffer"], M, atol=1e-13)


def _ogd_model():
    torch.manual_seed(0)
    return nn.Sequential(OPTLinear(32, 32, bias=False, method="ogd"), nn.Tanh(),
                         OPTLinear(32, 8, bias=False, method="ogd"))


def _train(model, opt, steps, scale=1.0):
    for _ in range(steps):
        x, y = torch.randn(16, 32), torch.randn(16, 8)
        opt.zero_grad()
        (scale * (model(x) - y).square().mean()).backward()
        opt.step()


def test_ogd_stays_orthogonal_without_reorthonormalisation():
    model = _ogd_model()
    opt = CayleySGD(model.parameters(), lr=0.02)  # reorth_every=0: the reference
    _train(model, opt, 200)
    for layer in (model[0], model[2]):
        assert (layer.R - torch.eye(32)).norm() > 0.1  # it moved
        assert orth_err(layer.R) <= 1e-4


def test_reorth_every_removes_the_drift():
    model, ref = _ogd_model(), _ogd_model()
    _train(ref, CayleySGD(ref.parameters(), lr=0.02), 20, scale=30.0)  # large steps: visible drift
    torch.manual_seed(1)
    _train(model, CayleySGD(model.parameters(), lr=0.02, reorth_every=5), 20, scale=30.0)
    assert orth_err(ref[0].R) > 1e-3
    assert orth_err(model[0].R) <= 1e-5


def test_ogd_gradient_is_dW_W0T():
    torch.manual_seed(0)
    layer = OPTLinear(5, 3, bias=False, method="ogd", dtype=F64)
    x = torch.randn(4, 5, dtype=F64)
    W = (layer.R @ layer.W0.T).T.detach().requires_grad_()  # PyTorch layout V = V0 Rᵀ
    (x @ W.T).sum().backward()
    layer(x).sum().backward()
    assert torch.allclose(layer.R.grad, W.grad.T @ layer.W0, atol=1e-12)  # (dL/dW_tf) W0_tfᵀ


def test_cayley_sgd_rejects_non_square():
    p = nn.Parameter(torch.randn(3, 4))
    p.grad = torch.randn(3, 4)
    with pytest.raises(ValueError, match="square"):
        CayleySGD([p]).step()
    with pytest.raises(ValueError, match="lr"):
        CayleySGD([p], lr=0)


def test_orth_reg_loss():
    torch.manual_seed(0)
    model = convert(nn.Sequential(nn.Linear(6, 5), nn.Linear(5, 4)).double(), method="orth_reg")
    for m in (model[0], model[1]):  # the default init is a random orthogonal R: the penalty starts at 0
        eye = torch.eye(m.R.shape[0], dtype=F64)
        torch.testing.assert_close(m.R @ m.R.T, eye)
        assert not torch.allclose(m.R, eye)
    assert opt_fast.orth_reg_loss(model).item() < 1e-24
    with torch.no_grad():
        model[0].R.add_(0.1 * torch.randn(6, 6, dtype=F64))
        model[1].R.mul_(1.5)
    gaps = [m.R @ m.R.T - torch.eye(m.R.shape[0], dtype=F64) for m in (model[0], model[1])]
    loss = opt_fast.orth_reg_loss(model, weight=0.1)  # squared Frobenius norm by default
    torch.testing.assert_close(loss, 0.1 * sum((g ** 2).sum() for g in gaps))
    released = opt_fast.orth_reg_loss(model, weight=0.1, squared=False)
    torch.testing.assert_close(released, 0.1 * sum(torch.linalg.matrix_norm(g) for g in gaps))
    loss.backward()
    assert model[0].R.grad is not None
    assert opt_fast.orth_reg_loss(convert(nn.Linear(3, 3), method="cayley")).item() == 0.0


def test_orth_reg_inits():
    torch.manual_seed(0)
    d = 64
    ref = convert(nn.Linear(d, 8, bias=False), method="orth_reg", init="reference").R.detach()
    # the released N(0, 1) R: R Rᵀ ≈ d·I, the effective weights √d too large
    assert abs(torch.linalg.matrix_norm(ref) / d - 1) < 0.1
    eye = convert(nn.Linear(d, 8), method="orth_reg", init="identity").R.detach()
    assert torch.equal(eye, torch.eye(d))
    # the default: Haar-distributed (sign-fixed QR of a Gaussian), so not biased towards ±I
    Rs = torch.stack([convert(nn.Linear(d, 8), method="orth_reg").R.detach() for _ in range(20)])
    torch.testing.assert_close(Rs @ Rs.mT, torch.eye(d).expand(20, d, d), atol=1e-5, rtol=0)
    assert Rs.diagonal(dim1=-2, dim2=-1).mean().abs() < 0.05
