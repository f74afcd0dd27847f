"""OPT layers, grouping, convert/merge, stochastic OPT (opt_fast.nn). Over 400 lines: the dense layers' shared
fixtures and the convert/merge round trips of every method live together."""
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import opt_fast
from _refs import OpCounter
from opt_fast.nn import OPTConv1d, OPTConv2d, OPTLayer, OPTLinear, convert, group_layers, merge

ORTHOGONAL = ["cayley", "gram_schmidt", "householder", "householder_qr", "lowdin", "ogd"]
MAPS = ["cayley", "gram_schmidt", "householder", "householder_qr", "lowdin"]  # R through an op
ALL = MAPS + ["ogd", "orth_reg", "none"]
F64 = torch.float64


def _lowdin_has_backward():
    P = torch.randn(3, 3, dtype=F64, requires_grad=True)
    try:
        torch.ops.opt_fast.lowdin(P, 0, None).sum().backward()
    except NotImplementedError:
        return False
    return True


def needs_backward(method):
    if method == "lowdin" and not _lowdin_has_backward():
        pytest.skip("opt_fast.lowdin has no backward yet (its reference is an SVD stand-in)")


def small_cnn(dtype=torch.float32):
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),     # d = 27
        nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.ReLU(),                        # d = 72
        nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.ReLU(),                          # d = 72
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5),                      # d = 8
    ).to(dtype)


def quiet_convert(model, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return convert(model, **kw)


def orth_err(R):
    return torch.linalg.matrix_norm(R.mT @ R - torch.eye(R.shape[-1], dtype=R.dtype)).item()


# ---- orthogonality and the maps ---------------------------------------------------------------------------

@pytest.mark.parametrize("method", ORTHOGONAL)
@pytest.mark.parametrize("d", [27, 36])
def test_rotation_is_orthogonal(method, d):
    torch.manual_seed(d)
    R = OPTLinear(d, 10, method=method, dtype=F64).rotation()
    assert orth_err(R) <= 1e-10
    # float32: the design's precision rule, ‖RᵀR − I‖_F / √d ≤ 1e-5
    R = OPTLinear(d, 10, method=method).rotation()
    assert orth_err(R) / d ** 0.5 <= 1e-5


def test_stochastic_rotation_is_orthogonal():
    torch.manual_seed(0)
    layer = OPTConv2d(8, 4, 3, method="gram_schmidt", stochastic=0.25, dtype=F64)
    with torch.no_grad():
        layer.P.add_(0.3 * torch.randn_like(layer.P))
    assert orth_err(layer.rotation()) <= 1e-10


def _classical_gs_rows(P):
    rows = []
    for i in range(P.shape[0]):
        v = P[i] - sum(((P[i] @ q) * q for q in rows), torch.zeros_like(P[i]))
        rows.append(v / v.norm())
    return torch.stack(rows)


def _textbook_householder_qr(P):
    """docs/methods.md#householder_qr: d-1 reflectors with u = x - ||x|| e1, Q <- Q H_c."""
    d = P.shape[0]
    A, Q = P.clone(), torch.eye(d, dtype=P.dtype)
    for c in range(d - 1):
        x = A[c:, c]
        u = x.clone()
        u[0] -= x.norm()
        v = u / u.norm()
        H = torch.eye(d, dtype=P.dtype)
        H[c:, c:] -= 2 * torch.outer(v, v)
        A, Q = H @ A, Q @ H.T
    return Q


@pytest.mark.parametrize("d", [5, 6])
def test_maps_match_released_constructions(d):
    torch.manual_seed(d)
    gs = OPTLinear(d, 3, method="gram_schmidt", dtype=F64)
    assert torch.allclose(gs.rotation(), _classical_gs_rows(gs.P), atol=1e-12)
    hr = OPTLinear(d, 3, method="householder_qr", dtype=F64)
    R = hr.rotation()
    assert torch.allclose(R, _textbook_householder_qr(hr.P), atol=1e-12)
    assert torch.linalg.det(R).item() == pytest.approx((-1) ** (d - 1))
    cp = OPTLinear(d, 3, method="cayley", dtype=F64)
    S = cp.P.triu() - cp.P.triu().T
    eye = torch.eye(d, dtype=F64)
    assert torch.allclose(cp.rotation(), (eye + S) @ torch.linalg.inv(eye - S), atol=1e-12)


@pytest.mark.parametrize("method", MAPS + ["ogd", "orth_reg"])
def test_identity_init(method):
    layer = OPTLinear(7, 3, method=method, init="identity", dtype=F64)
    R = layer.rotation()
    if method == "householder_qr":  # d - 1 = 6 reflectors: det = +1, R = I exactly for odd d
        assert torch.linalg.det(R).item() == pytest.approx(1.0)
    assert torch.allclose(R, torch.eye(7, dtype=F64), atol=1e-12)


# ---- layers ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", ALL)
def test_layers_equal_functional_with_merged_weight(method):
    torch.manual_seed(0)
    conv = OPTConv2d(3, 5, (3, 2), stride=2, padding=1, dilation=(1, 2), method=method, dtype=F64)
    x = torch.randn(2, 3, 9, 8, dtype=F64)
    W = conv.effective_weight()
    assert W.shape == conv.W0.shape == (5, 3, 3, 2)
    ref = F.conv2d(x, W, conv.bias, stride=2, padding=1, dilation=(1, 2))
    assert torch.allclose(conv(x), ref, atol=1e-12)
    if method not in ("none", "orth_reg"):  # W = R W0: PyTorch layout V = V0 Rᵀ
        V0 = conv.W0.reshape(5, -1)
        assert torch.allclose(W.reshape(5, -1), V0 @ conv.rotation().mT, atol=1e-12)
    c1 = OPTConv1d(4, 6, 3, padding="same", bias=False, method=method, dtype=F64)
    x1 = torch.randn(2, 4, 10, dtype=F64)
    assert torch.allclose(c1(x1), F.conv1d(x1, c1.effective_weight(), padding="same"), atol=1e-12)
    lin = OPTLinear(6, 4, method=method, dtype=F64)
    x2 = torch.randn(3, 6, dtype=F64)
    assert torch.allclose(lin(x2), F.linear(x2, lin.effective_weight(), lin.bias), atol=1e-12)


def test_w0_init_and_state_dict_keys():
    torch.manual_seed(0)
    layer = OPTConv2d(64, 64, 3, bias=False, method="gram_schmidt")
    assert abs(layer.W0.std().item() - (2 / 576) ** 0.5) < 2e-3  # He-normal, not normalised
    assert set(layer.state_dict()) == {"W0", "P", "_extra_state"}
    assert [n for n, _ in layer.named_parameters()] == ["P"]
    assert set(OPTLinear(4, 3, method="householder").state_dict()) == {"W0", "V", "bias", "_extra_state"}
    assert "R0" not in OPTLinear(4, 3, method="lowdin").state_dict()  # warm start: non-persistent


@pytest.mark.parametrize("method,d,n", [(m, 27, 16) for m in MAPS] + [(m, 36, 48) for m in MAPS])
def test_energy_unchanged_by_training(method, d, n):
    needs_backward(method)
    torch.manual_seed(1)
    layer = OPTConv2d(d // 9, n, 3, padding=1, bias=False, method=method, dtype=F64)
    if method == "householder":
        assert layer.direct == (n < d)  # both householder paths are exercised
    e0 = opt_fast.hyperspherical_energy(layer.W0)
    V_before = layer.effective_weight().detach().clone()
    opt = torch.optim.SGD(layer.parameters(), lr=0.1, momentum=0.9)
    x, y = torch.randn(4, d // 9, 6, 6, dtype=F64), torch.randn(4, n, 6, 6, dtype=F64)
    for _ in range(3):
        opt.zero_grad()
        F.mse_loss(layer(x), y).backward()
        opt.step()
    V = layer.effective_weight().detach()
    assert (V - V_before).norm() > 1e-8 * V.norm()  # it trained
    for s in (0, 1, 2):
        e0, e = opt_fast.hyperspherical_energy(layer.W0, s), opt_fast.hyperspherical_energy(V, s)
        assert abs(e - e0) <= 1e-5 * abs(e0)


def test_none_and_orth_reg_change_the_energy():
    torch.manual_seed(0)
    for method in ("none", "orth_reg"):
        layer = OPTLinear(12, 8, bias=False, method=method, dtype=F64)
        opt = torch.optim.SGD(layer.parameters(), lr=0.5)
        x = torch.randn(16, 12, dtype=F64)
        for _ in range(3):
            opt.zero_grad()
            (layer(x) ** 2).mean().backward()
            opt.step()
        e0 = opt_fast.hyperspherical_energy(layer.W0)
        assert abs(opt_fast.hyperspherical_energy(layer) - e0) > 1e-6 * e0


# ---- grouping ------------------------------------------------------------------------------------------------

def _mlp(method, dtype=F64):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(36, 36), nn.Tanh(), nn.Linear(36, 36), nn.Tanh(), nn.Linear(36, 27),
                         nn.Tanh(), nn.Linear(27, 36), nn.Tanh(), nn.Linear(36, 4)).to(dtype)


@pytest.mark.parametrize("method", MAPS)
def test_one_batched_op_call_per_group(method):
    ref_model = quiet_convert(_mlp(method), method=method, group=False)
    model = quiet_convert(_mlp(method), method=method)
    # d = 36: four layers, d = 27: one. householder applies its reflectors to W0 directly when
    # n < d (the 36->27 and 36->4 layers), which also groups by W0's shape: 4 groups.
    n_groups = len(model._opt_grouping.groups)
    assert n_groups == (4 if method == "householder" else 2)
    x = torch.randn(5, 36, dtype=F64)
    for _ in range(2):  # every forward recomputes, once per group
        with OpCounter() as count:
            out = model(x)
        assert count.forward_calls == n_groups, count.calls
    with OpCounter() as count:
        ref = ref_model(x)
    assert count.forward_calls == 5  # ungrouped: one call per layer
    assert torch.allclose(out, ref, atol=1e-12)
    layers = [m for m in model.modules() if isinstance(m, OPTLayer)]
    ref_layers = [m for m in ref_model.modules() if isinstance(m, OPTLayer)]
    # a grouped layer called on its own still works (its own call), and the cache is not left behind
    with OpCounter() as count:
        alone = layers[0](x)
    assert count.forward_calls == 1
    assert torch.allclose(alone, ref_layers[0](x), atol=1e-12)
    needs_backward(method)
    # the backward reaches every layer's own parameter, with the per-layer result
    out.square().sum().backward()
    ref.square().sum().backward()
    for a, b in zip(layers, ref_layers):
        assert a.learnable.grad is not None
        assert torch.allclose(a.learnable.grad, b.learnable.grad, atol=1e-10)


def test_group_survives_two_forwards_before_backward():
    model = quiet_convert(_mlp("gram_schmidt"), method="gram_schmidt")
    x = torch.randn(5, 36, dtype=F64)
    loss = model(x).sum()
    loss.backward()
    (model(x).sum() + model(2 * x).sum()).backward()  # a fresh graph each forward


def test_group_layers_keys_and_regroup():
    model = quiet_convert(small_cnn(), method="cayley", group=False)
    assert getattr(model, "_opt_grouping", None) is None
    grouping = group_layers(model)
    sizes = sorted(len(g.layers) for g in grouping.groups.values())
    assert sizes == [1, 1, 2]  # d = 27, 8 and the two d = 72 convs
    group_layers(model)  # regrouping replaces the hooks, it does not stack them
    assert len(model._forward_pre_hooks) == 1 and len(model._forward_hooks) == 1


# ---- convert / merge / state_dict -----------------------------------------------------------------------

@pytest.mark.parametrize("method", ALL)
def test_merge_equals_opt_model(method):
    model = quiet_convert(small_cnn(F64), method=method).eval()
    assert sum(isinstance(m, OPTLayer) for m in model.modules()) == 4
    x = torch.randn(2, 3, 8, 8, dtype=F64)
    merged = merge(model)
    assert not any(isinstance(m, OPTLayer) for m in merged.modules())
    assert type(merged[0]) is nn.Conv2d and type(merged[-1]) is nn.Linear
    assert torch.allclose(merged(x), model(x), atol=1e-12)
    assert isinstance(model[0], OPTLayer)  # the original is untouched


@pytest.mark.parametrize("method,stochastic", [(m, None) for m in ALL] +
                         [(m, 0.5) for m in ("gram_schmidt", "cayley", "lowdin")])
def test_keep_weights_preserves_outputs(method, stochastic):
    base = small_cnn(F64).eval()
    x = torch.randn(2, 3, 8, 8, dtype=F64)
    ref = base(x)
    model = quiet_convert(small_cnn(F64).eval(), method=method, keep_weights=True, stochastic=stochastic)
    assert torch.allclose(model(x), ref, atol=1e-10)
    base_lin = nn.Linear(9, 3).double()
    lin = convert(base_lin, method=method, keep_weights=True, stochastic=stochastic)
    assert isinstance(lin, OPTLinear)
    z = torch.randn(4, 9, dtype=F64)
    assert torch.allclose(lin(z), base_lin(z), atol=1e-10)


def test_keep_weights_householder_qr_even_d():
    torch.manual_seed(0)
    base = nn.Linear(8, 3).double()
    z = torch.randn(4, 8, dtype=F64)
    lin = convert(base, method="householder_qr", keep_weights=True)
    assert not torch.allclose(lin.rotation(), torch.eye(8, dtype=F64))  # det must be (-1)^7
    assert torch.allclose(lin(z), base(z), atol=1e-12)


@pytest.mark.parametrize("method,stochastic", [("gram_schmidt", None), ("lowdin", None), ("householder", None),
                                                ("gram_schmidt", 0.3)])
def test_state_dict_round_trip(method, stochastic):
    def build(seed):
        torch.manual_seed(seed)
        return quiet_convert(small_cnn(F64), method=method, stochastic=stochastic).eval()

    a, b = build(0), build(1)
    with torch.no_grad():  # make the state non-trivial
        for p in a.parameters():
            p.add_(0.01 * torch.randn_like(p))
    x = torch.randn(2, 3, 8, 8, dtype=F64)
    assert not torch.allclose(a(x), b(x))
    b.load_state_dict(a.state_dict())
    assert torch.equal(a[0].W0, b[0].W0)
    assert torch.allclose(a(x), b(x), atol=1e-12)
    if stochastic:
        assert torch.equal(a[0].idx, b[0].idx)


# ---- stochastic OPT ----------------------------------------------------------------------------------------

def test_stochastic_sizes_and_sampling():
    torch.manual_seed(0)
    layer = OPTConv2d(64, 16, 3, bias=False, stochastic=0.25)  # the released code's 144 of 576
    assert layer.P.shape == (144, 144) and layer.idx.shape == (144,)
    assert len(set(layer.idx.tolist())) == 144
    ch = OPTConv2d(64, 16, 3, bias=False, stochastic=10 / 64, sample="channel")
    assert ch.P.shape == (90, 90)  # 10 whole channels × 9 kernel positions
    assert (ch.idx.view(10, 9) % 9 == torch.arange(9)).all()
    assert torch.allclose(layer.rotation(), torch.eye(576))  # identity init


@pytest.mark.parametrize("sample", ["coordinate", "channel"])
def test_resample_keeps_function(sample):
    torch.manual_seed(0)
    model = nn.Sequential(OPTConv2d(4, 6, 3, padding=1, stochastic=0.5, sample=sample, dtype=F64),
                          nn.BatchNorm2d(6, dtype=F64), nn.ReLU(),
                          OPTConv2d(6, 5, 3, stochastic=0.5, sample=sample, dtype=F64))
    group_layers(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    x = torch.randn(3, 4, 7, 7, dtype=F64)
    for _ in range(3):
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
    model.eval()
    before, idx_before = model(x), model[0].idx.clone()
    e_before = opt_fast.hyperspherical_energy(model[0].W0)
    assert not torch.allclose(model[0].P, torch.eye(model[0].P.shape[0], dtype=F64))
    assert opt_fast.nn.resample(model, optimizer=opt) == 2
    assert torch.allclose(model(x), before, atol=1e-12)
    assert not torch.equal(model[0].idx, idx_before)
    assert torch.equal(model[0].P, torch.eye(model[0].P.shape[0], dtype=F64))
    assert model[0].P not in opt.state  # momentum cleared on request
    assert abs(opt_fast.hyperspherical_energy(model[0].W0) - e_before) <= 1e-10 * e_before


def test_resample_reset_bn_flag():
    model = nn.Sequential(OPTConv2d(2, 3, 1, stochastic=0.5), nn.BatchNorm2d(3))
    with torch.no_grad():
        model[1].weight.fill_(2.0)
    opt_fast.nn.resample(model)
    assert (model[1].weight == 2).all()
    opt_fast.nn.resample(model, reset_bn=True)  # the released code's side effect, on request
    assert (model[1].weight == 1).all() and (model[1].bias == 0).all()


# ---- torch.compile ---------------------------------------------------------------------------------------

def test_compile_fullgraph_matches_eager():
    model = quiet_convert(small_cnn(), method="gram_schmidt")
    compiled = torch.compile(model, fullgraph=True)
    x = torch.randn(2, 3, 8, 8)
    out = compiled(x)
    out.square().sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    ref = model(x)
    ref.square().sum().backward()
    assert torch.allclose(out, ref, atol=1e-5, rtol=1e-5)
    for g, p in zip(grads, model.parameters()):
        assert torch.allclose(g, p.grad, atol=1e-4, rtol=1e-4)
    assert not any(g.active for g in model._opt_grouping.groups.values())  # session closed


# ---- bad input -----------------------------------------------------------------------------------------------

def test_unknown_method_and_init():
    with pytest.raises(ValueError, match="unknown method 'qr'.*cayley.*gram_schmidt"):
        OPTLinear(4, 4, method="qr")
    with pytest.raises(ValueError, match="unknown method"):
        convert(nn.Linear(3, 3), method="svd")
    with pytest.raises(ValueError, match="unknown init"):
        OPTLinear(4, 4, init="orthogonal")
    with pytest.raises(ValueError, match="stochastic OPT needs"):
        OPTLinear(4, 4, method="householder", stochastic=0.5)
    with pytest.raises(ValueError, match="fraction"):
        OPTLinear(4, 4, stochastic=1.5)
    with pytest.raises(ValueError, match="groups=1"):
        OPTConv2d(4, 4, 3, groups=2)


def test_unconvertible_layers():
    model = nn.Sequential(nn.Conv2d(4, 4, 3, groups=2), nn.Conv2d(4, 4, 3), nn.Conv3d(4, 4, 1))
    with pytest.raises(ValueError, match="cannot convert '0': groups=2"):
        convert(model, include=["0"])
    with pytest.raises(ValueError, match="no module named 'nope'"):
        convert(model, include=["nope"])
    with pytest.raises(ValueError, match="groups=2"):
        convert(model, strict=True)
    with pytest.warns(UserWarning, match="0: groups=2.*2: Conv3d is not supported"):
        convert(model)
    assert isinstance(model[1], OPTConv2d) and type(model[0]) is nn.Conv2d
    class MyLinear(nn.Linear):  # a subclass may override forward: not converted (attention: test_nn_attention.py)
        pass

    with pytest.warns(UserWarning, match="subclass of nn.Linear"):
        convert(nn.Sequential(MyLinear(8, 2)))


def test_mismatched_state_dicts():
    layer = OPTLinear(6, 4, method="gram_schmidt")
    sd = layer.state_dict()
    with pytest.raises(RuntimeError, match="frozen neurons 'W0'"):
        layer.load_state_dict({k: v for k, v in sd.items() if k != "W0"})
    with pytest.raises(RuntimeError, match="plain layer's state_dict"):
        layer.load_state_dict(nn.Linear(6, 4).state_dict())
    with pytest.raises(RuntimeError, match="size mismatch for P"):
        layer.load_state_dict(OPTLinear(5, 4, method="gram_schmidt").state_dict())
    with pytest.raises(ValueError, match="method 'cayley'"):
        layer.load_state_dict(OPTLinear(6, 4, method="cayley").state_dict())


def test_compiled_graph_has_one_op_call_per_group():
    model = quiet_convert(small_cnn(), method="cayley")
    calls = []

    def counting_backend(gm, example_inputs):
        calls.extend(n.target for n in gm.graph.nodes
                     if n.op == "call_function" and "opt_fast" in str(n.target))
        return gm.forward

    torch.compile(model, fullgraph=True, backend=counting_backend)(torch.randn(2, 3, 8, 8))
    assert len(calls) == len(model._opt_grouping.groups) == 3, calls


def test_lowdin_warm_start_does_not_change_the_result():
    torch.manual_seed(0)
    layer = OPTLinear(12, 5, method="lowdin", dtype=F64)
    U, _, Vh = torch.linalg.svd(layer.P)
    with torch.no_grad():  # a stale, unrelated warm start (e.g. after an external edit of P)
        layer.R0.copy_(torch.linalg.qr(torch.randn(12, 12, dtype=F64))[0])
    assert torch.allclose(layer.weight_matrix(), layer._V0() @ (U @ Vh).mT, atol=1e-10)
    assert torch.allclose(layer.R0, U @ Vh, atol=1e-10)  # and it now holds this step's R
