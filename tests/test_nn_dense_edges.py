"""Dense OPT layers, CayleySGD and the energy as a user meets them: defaults, partial checkpoints, options that
must not be ignored, half-precision weights, and conv variants through merge()."""
import math

import pytest
import torch
from torch import nn

import opt_fast
from opt_fast.nn import OPTConv1d, OPTConv2d, OPTLinear, OPTMultiheadAttention, convert, merge
from opt_fast.optim import CayleySGD

F64 = torch.float64


def test_attention_default_init_is_the_layers_default():
    # init=None must mean what it means for OPTLinear: orth_reg starts at an orthogonal R, not the released
    # N(0, 1) R whose R Rᵀ ≈ d·I makes the projections √d too large
    torch.manual_seed(0)
    attn = OPTMultiheadAttention(16, 2, method="orth_reg")
    for layer in (attn.q_proj, attn.k_proj, attn.v_proj, attn.out_proj):
        assert layer.init_mode == OPTLinear(16, 16, method="orth_reg").init_mode
        torch.testing.assert_close(layer.R @ layer.R.T, torch.eye(16), atol=1e-5, rtol=0)


def _paper_step(X, G, M, lr, q):
    """Li, Fuxin & Todorovic (ICLR 2020), Algorithm 1, s = 2: α = min(l, 2q/(‖W‖ + ε)), Y <- X + α/2 W (X + Y)."""
    M = 0.9 * M - G
    A = M @ X.T - 0.5 * X @ (X.T @ M @ X.T)
    W = A - A.T
    M = W @ X
    alpha = min(lr, 2 * q / (torch.linalg.matrix_norm(W).item() + 1e-8))
    Y = X + alpha * M
    for _ in range(2):
        Y = X + (alpha / 2) * W @ (X + Y)
    return Y, M


@pytest.mark.parametrize("q", [0.25, 0.9])
def test_cayley_sgd_q_is_the_papers_contraction_factor(q):
    torch.manual_seed(0)
    X0 = torch.linalg.qr(torch.randn(5, 5, dtype=F64))[0]
    X = nn.Parameter(X0.clone())
    opt = CayleySGD([X], lr=10.0, q=q)  # large lr: α = 2q/‖Ω‖, where q matters
    Xr, M = X0.clone(), torch.zeros_like(X0)
    for _ in range(3):
        G = torch.randn(5, 5, dtype=F64)
        X.grad = G.clone()
        opt.step()
        Xr, M = _paper_step(Xr, G, M, 10.0, q)
        torch.testing.assert_close(X.detach(), Xr, atol=1e-12, rtol=0)
    for bad in (0.0, 1.0, -0.5):
        with pytest.raises(ValueError, match="q must be in"):
            CayleySGD([X], q=bad)


def _net():
    torch.manual_seed(0)
    return convert(nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 3)), method="cayley")


def test_partial_state_dict_loads_non_strict():
    # e.g. a checkpoint of the head only: the layers it leaves out keep their tensors
    net = _net()
    before = net[0].W0.clone()
    result = net.load_state_dict({"2.bias": torch.ones(3)}, strict=False)
    assert torch.equal(net[2].bias.detach(), torch.ones(3)) and torch.equal(net[0].W0, before)
    assert "0.W0" in result.missing_keys and "2.W0" in result.missing_keys
    with pytest.raises(RuntimeError, match="Missing key"):
        net.load_state_dict({"2.bias": torch.ones(3)})
    # a rotation without the neurons it rotates is still refused, strict or not
    sd = {k: v for k, v in net.state_dict().items() if k != "0.W0"}
    with pytest.raises(RuntimeError, match="frozen neurons '0.W0'"):
        net.load_state_dict(sd, strict=False)


def test_options_of_another_method_or_mode_are_refused():
    with pytest.raises(ValueError, match="num_reflectors is an option of method 'householder'"):
        OPTLinear(4, 4, method="cayley", num_reflectors=2)
    assert OPTLinear(4, 4, method="householder", num_reflectors=2).V.shape == (4, 2)
    with pytest.raises(ValueError, match="unknown sample 'chanel'"):
        OPTConv2d(3, 4, 3, sample="chanel")
    with pytest.raises(ValueError, match="stochastic must be a fraction"):
        OPTLinear(4, 4, stochastic=True)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_energy_of_half_precision_weights(dtype):
    torch.manual_seed(0)
    layer = OPTConv2d(3, 6, 3, method="gram_schmidt").to(dtype)
    W = layer.effective_weight()
    assert W.dtype == dtype
    e = opt_fast.hyperspherical_energy(layer)
    torch.testing.assert_close(e, opt_fast.hyperspherical_energy(W.float()))
    assert math.isfinite(e.item())
    with pytest.raises(TypeError, match="must be a tensor"):
        opt_fast.hyperspherical_energy([[1.0, 0.0], [0.0, 1.0]])


@pytest.mark.parametrize("kwargs", [dict(padding="same", dilation=(2, 1)), dict(padding="valid", bias=False),
                                    dict(stride=(2, 1), padding=(1, 0))])
def test_conv_variants_match_the_plain_conv_and_merge(kwargs):
    torch.manual_seed(0)
    layer = OPTConv2d(2, 5, (2, 3), method="cayley", **kwargs)
    x = torch.randn(1, 2, 7, 6).contiguous(memory_format=torch.channels_last)
    y = layer(x)
    plain = merge(layer)
    assert type(plain) is nn.Conv2d and plain.padding == layer.padding
    torch.testing.assert_close(plain(x), y, rtol=0, atol=0)
    conv1 = OPTConv1d(1, 3, 5, padding="same", method="householder_qr")
    torch.testing.assert_close(merge(conv1)(torch.randn(2, 1, 9)).shape, torch.Size([2, 3, 9]))
