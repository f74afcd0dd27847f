"""Block-orthogonal layers (OPTBlockLinear, convert(block_size=...), merge_and_reset, MergeSchedule, merge,
grouping, recompute, bfloat16): function, spectrum, merges, state_dict, torch.compile. Just over 400 lines:
one layer class and its helpers, kept in one file."""
import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from _refs import OpCounter, permuted_block_matrix
from opt_fast import functional
from opt_fast.nn import MergeSchedule, OPTBlockLinear, convert, merge, merge_and_reset
from opt_fast.nn.block_methods import skew_from_packed

METHODS = ["cayley_neumann", "cayley", "gram_schmidt", "householder", "lowdin"]
EXACT = ["cayley", "gram_schmidt", "householder", "lowdin"]
SIDES = ["in", "out", "both"]
F64 = torch.float64


def mlp(dtype=torch.float32, widths=(20, 24, 12), seed=0):
    """Linear layers of the given widths with tanh between them (block size 5 below: 20 = 4·5, while 24
    and 12 leave a remainder)."""
    torch.manual_seed(seed)
    layers = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        layers += ([nn.Tanh()] if i else []) + [nn.Linear(a, b)]
    return nn.Sequential(*layers).to(dtype)


def block_model(method="cayley_neumann", sides="both", dtype=F64, seed=0, **kw):
    kw.setdefault("block_size", 5)
    return convert(mlp(dtype, seed=seed), method=method, sides=sides, **kw)


def block_layers(model):
    return [m for m in model.modules() if isinstance(m, OPTBlockLinear)]


def train(model, steps=3, lr=0.01, seed=1, opt=None):
    """A few Adam steps on a random regression (moves every block parameter away from the identity)."""
    g = torch.Generator().manual_seed(seed)
    dtype = next(model.parameters()).dtype
    first, last = block_layers(model)[0], block_layers(model)[-1]
    x = torch.randn(16, first.in_features, generator=g).to(dtype)
    y = torch.randn(16, last.out_features, generator=g).to(dtype)
    opt = opt or torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        F.mse_loss(model(x), y).backward()
        opt.step()
    return opt


def dense_rotation(layer, side):
    """R_side as a dense n × n matrix, built independently of the op from the layer's blocks and perm."""
    n = layer.in_features if side == "in" else layer.out_features
    if side not in layer.sides_used():
        return torch.eye(n, dtype=layer.W0.dtype)
    R = layer.block_rotation(side).detach().to(layer.W0.dtype)
    return permuted_block_matrix(R, n, getattr(layer, f"{side}_perm"))


def svd_drift(layer):
    """max |svdvals(W) − svdvals(W0)| / ‖W0‖₂."""
    s0 = torch.linalg.svdvals(layer.W0.double())
    return ((torch.linalg.svdvals(layer.weight.detach().double()) - s0).abs().max() / s0[0]).item()


# ---- function -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("sides", SIDES)
@pytest.mark.parametrize("method", METHODS)
def test_identity_at_init_keep_weights(method, sides):
    """convert(keep_weights=True) computes what the nn.Linear model did, to rounding (float32)."""
    base = mlp()
    x = torch.randn(7, 20)
    model = convert(copy.deepcopy(base), method=method, block_size=5, sides=sides, keep_weights=True)
    assert len(block_layers(model)) == 2
    torch.testing.assert_close(model(x), base(x), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("sides", SIDES)
@pytest.mark.parametrize("method", ["cayley_neumann", "gram_schmidt"])
def test_weight_is_the_permuted_block_product(method, sides):
    """After training, .weight = effective_weight() = R_out W0 R_inᵀ with R = Πᵀ blockdiag(R_j, I) Π built
    densely, and the layer computes x Wᵀ + b with it (float64); .weight cannot be set."""
    model = block_model(method, sides)
    train(model)
    x = torch.randn(6, 20, dtype=F64)
    for layer in block_layers(model):
        W = layer.weight
        assert W.shape == (layer.out_features, layer.in_features)
        torch.testing.assert_close(W, layer.effective_weight(), rtol=0, atol=0)
        want = dense_rotation(layer, "out") @ layer.W0 @ dense_rotation(layer, "in").mT
        torch.testing.assert_close(W, want, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(layer(x), F.linear(x, W, layer.bias), rtol=1e-12, atol=1e-12)
        x = torch.tanh(layer(x))
        with pytest.raises(AttributeError, match="cannot be set"):
            layer.weight = torch.zeros_like(W)


def test_block_size_and_remainders():
    """block_size above a side's width uses that width; widths not divisible by b keep an identity
    remainder: with sides="in" the columns perm[nb·b:] of W are those of W0 (float64, after training)."""
    layer = OPTBlockLinear(6, 23, method="cayley", block_size=8, sides="both", dtype=F64)
    assert layer.side_block("in") == 6 and layer.in_blocks.shape == (1, 15)
    assert layer.side_block("out") == 8 and layer.out_blocks.shape == (2, 28)
    train(nn.Sequential(layer), steps=2, lr=0.05)
    assert svd_drift(layer) <= 1e-12
    one_side = OPTBlockLinear(23, 4, method="cayley", block_size=5, sides="in", dtype=F64)
    train(nn.Sequential(one_side), steps=2, lr=0.05)
    rest = one_side.in_perm[4 * 5:]
    W = one_side.weight.detach()
    assert torch.equal(W[:, rest], one_side.W0[:, rest])
    assert not torch.allclose(W, one_side.W0)


def test_permute_false():
    """permute=False: no perm buffers, W = W0 blockdiag(R_j)ᵀ, and a merge keeps it so."""
    model = block_model("cayley", "in", permute=False)
    train(model)
    layer = block_layers(model)[0]
    assert layer.in_perm is None and "in_perm" not in layer.state_dict()
    B = torch.block_diag(*layer.block_rotation("in").detach())
    torch.testing.assert_close(layer.weight, layer.W0 @ B.mT, rtol=1e-12, atol=1e-12)
    merge_and_reset(model)
    assert layer.in_perm is None


def test_bad_layer_arguments():
    with pytest.raises(ValueError, match="sides must be one of"):
        OPTBlockLinear(4, 4, block_size=2, sides="left")
    with pytest.raises(ValueError, match="block_size must be a positive int"):
        OPTBlockLinear(4, 4, block_size=0)
    with pytest.raises(ValueError, match="terms must be an int >= 0"):
        OPTBlockLinear(4, 4, block_size=2, terms=-1)
    with pytest.raises(ValueError, match="unknown method 'householder_qr' for block layers"):
        convert(mlp(), method="householder_qr", block_size=4)
    with pytest.raises(ValueError, match="take no init"):
        convert(mlp(), block_size=4, init="reference")


# ---- spectrum --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", METHODS)
def test_spectrum_after_training(method):
    """Exact maps keep svdvals(W) = svdvals(W0) to float64 rounding after optimizer steps on both sides;
    the Neumann series drifts, by little (‖S‖ stays small), but visibly."""
    model = block_model(method, "both", block_size=6)
    start = [layer.weight.detach().clone() for layer in block_layers(model)]
    train(model, steps=5, lr=0.01)
    for layer, W in zip(block_layers(model), start):
        assert (layer.weight - W).norm() > 1e-2 * W.norm(), "the rotations did not move"
        drift = svd_drift(layer)
        if method in EXACT:
            assert drift <= 1e-12, f"{method}: svdvals drift {drift:.2e}"
        else:
            assert 1e-12 < drift <= 1e-3, f"Neumann svdvals drift {drift:.2e}"


# ---- merging ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("sides", SIDES)
@pytest.mark.parametrize("method", METHODS)
def test_merge_and_reset(method, sides):
    """Outputs unchanged to rounding; block parameters back at the identity, their optimizer state cleared
    (the bias's kept); fresh permutations; merges counted; training goes on."""
    model = block_model(method, sides)
    opt = train(model)
    x = torch.randn(9, 20, dtype=F64)
    before = model(x).detach()
    layers = block_layers(model)
    blocks = [p for layer in layers for p in (layer.in_blocks, layer.out_blocks) if p is not None]
    perms = [layer.in_perm if sides != "out" else layer.out_perm for layer in layers]
    perms = [p.clone() for p in perms]
    assert all(p in opt.state for p in blocks)
    assert merge_and_reset(model, opt) == 2
    torch.testing.assert_close(model(x), before, rtol=1e-12, atol=1e-12)
    for layer, old in zip(layers, perms):
        assert int(layer.merges) == 1
        for side in layer.sides_used():
            P, perm = getattr(layer, f"{side}_blocks"), getattr(layer, f"{side}_perm")
            R = layer.block_rotation(side)
            torch.testing.assert_close(R, torch.eye(R.shape[-1], dtype=F64).expand_as(R), rtol=0, atol=1e-12)
            assert sorted(perm.tolist()) == list(range(perm.numel()))
            assert P not in opt.state
        new = layer.in_perm if sides != "out" else layer.out_perm
        assert not torch.equal(new, old)
    assert layers[0].bias in opt.state
    train(model, opt=opt)  # the optimizer goes on with fresh state for the reset parameters
    assert all(p in opt.state for p in blocks)


def test_merge_and_reset_float32_and_bfloat16():
    """float32: outputs kept to float32 rounding; a bfloat16 model merges in float32 (W0 stays bfloat16)."""
    model = block_model("cayley_neumann", dtype=torch.float32)
    train(model)
    x = torch.randn(9, 20)
    before = model(x).detach()
    merge_and_reset(model)
    torch.testing.assert_close(model(x), before, rtol=1e-5, atol=1e-5)
    train(model)
    half = copy.deepcopy(model).to(torch.bfloat16)
    before = half(x.bfloat16()).detach().float()
    merge_and_reset(half)
    assert block_layers(half)[0].W0.dtype == torch.bfloat16
    torch.testing.assert_close(half(x.bfloat16()).float(), before, rtol=3e-2, atol=3e-2)


def test_merge_schedule():
    """MergeSchedule(every=3) merges at steps 3, 6, …; its state_dict resumes the count."""
    model = block_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    schedule = MergeSchedule(model, every=3, optimizer=opt)
    merged = []
    for _ in range(7):
        train(model, steps=1, opt=opt)
        merged.append(schedule.step())
    assert merged == [False, False, True, False, False, True, False]
    assert all(int(layer.merges) == 2 for layer in block_layers(model))
    state = schedule.state_dict()
    assert state == {"steps": 7, "every": 3}
    resumed = MergeSchedule(model, every=3, optimizer=opt)
    resumed.load_state_dict(state)
    assert [resumed.step(), resumed.step()] == [False, True]
    assert all(int(layer.merges) == 3 for layer in block_layers(model))
    with pytest.raises(ValueError, match="every must be a positive int"):
        MergeSchedule(model, every=0)


@pytest.mark.parametrize("sides", SIDES)
@pytest.mark.parametrize("method", METHODS)
def test_merge_to_plain_linear(method, sides):
    """merge() gives a copy with plain nn.Linear layers holding W: the same outputs; the model is untouched."""
    model = block_model(method, sides)
    train(model)
    x = torch.randn(5, 20, dtype=F64)
    plain = merge(model)
    assert not block_layers(plain) and [type(m) for m in plain] == [nn.Linear, nn.Tanh, nn.Linear]
    torch.testing.assert_close(plain(x), model(x), rtol=1e-12, atol=1e-12)
    assert len(block_layers(model)) == 2


# ---- state_dict -------------------------------------------------------------------------------------------

def test_state_dict_round_trip():
    """A trained and merged model loads into a freshly converted one (another seed): same outputs, same
    permutations, and both draw the same permutations at the next merge."""
    a, b = block_model(seed=0), block_model(seed=1)
    train(a)
    merge_and_reset(a)
    train(a)
    x = torch.randn(4, 20, dtype=F64)
    assert not torch.allclose(a(x), b(x))
    b.load_state_dict(a.state_dict())
    torch.testing.assert_close(b(x), a(x), rtol=0, atol=0)
    merge_and_reset(a)
    merge_and_reset(b)
    for la, lb in zip(block_layers(a), block_layers(b)):
        assert int(lb.merges) == 2
        assert torch.equal(la.in_perm, lb.in_perm) and torch.equal(la.out_perm, lb.out_perm)
    torch.testing.assert_close(b(x), a(x), rtol=0, atol=0)


@pytest.mark.parametrize("other,match", [
    (dict(method="cayley"), r"method='cayley_neumann' \(this layer: 'cayley'\)"),
    (dict(block_size=4), r"block_size=5 \(this layer: 4\)"),
    (dict(sides="in"), r"sides='both' \(this layer: 'in'\)"),
    (dict(permute=False), r"permute=True \(this layer: False\)"),
], ids=["method", "block_size", "sides", "permute"])
def test_state_dict_other_settings_raise(other, match):
    """Loading a state_dict into a layer with other settings says which setting differs."""
    state = block_model().state_dict()
    with pytest.raises(ValueError, match=match):
        block_model(**other).load_state_dict(state)


def test_same_seed_same_permutations():
    """DDP ranks build with the same seed: the same permutations, and after merge_and_reset again the same
    ones (drawn from the layer's seed and merge count, not from the global RNG, which data loading on each
    rank moves differently)."""
    a, b = block_model(seed=3), block_model(seed=3)
    for la, lb in zip(block_layers(a), block_layers(b)):
        assert torch.equal(la.in_perm, lb.in_perm) and torch.equal(la.out_perm, lb.out_perm)
    old = block_layers(a)[0].in_perm.clone()
    torch.randn(100)  # rank b's data loader drew random numbers
    merge_and_reset(a)
    merge_and_reset(b)
    assert not torch.equal(block_layers(a)[0].in_perm, old)
    for sa, sb in zip(a.state_dict().items(), b.state_dict().items()):
        assert sa[0] == sb[0] and (not torch.is_tensor(sa[1]) or torch.equal(sa[1], sb[1])), sa[0]


def test_same_seed_householder_merge():
    a, b = block_model("householder", seed=3), block_model("householder", seed=3)
    torch.randn(100)
    merge_and_reset(a)
    merge_and_reset(b)
    for la, lb in zip(block_layers(a), block_layers(b)):
        assert torch.equal(la.in_blocks, lb.in_blocks)


# ---- grouping, recompute ------------------------------------------------------------------------------------

@pytest.mark.parametrize("method,map_op", [("cayley_neumann", "cayley_neumann"), ("cayley", "cayley"),
                                           ("gram_schmidt", "gram_schmidt")])
def test_one_map_call_per_block_group(method, map_op):
    """Several same-b layers, both sides: one map call per (method, b) group per forward (and the plain op
    without grad), two block_apply calls per layer; results and gradients equal the ungrouped model's."""
    kw = dict(method=method, block_size=8, sides="both")
    grouped = convert(mlp(F64, (24, 24, 24, 24, 6)), **kw)
    ungrouped = convert(mlp(F64, (24, 24, 24, 24, 6)), group=False, **kw)
    # b = 8 for every side except the last layer's 6-wide out side (b = 6): two groups
    assert len(grouped._opt_grouping.groups) == 2
    x = torch.randn(5, 24, dtype=F64)
    for _ in range(2):
        with OpCounter() as count:
            out = grouped(x)
        assert count.calls[map_op] == 2 and count.calls["block_apply"] == 8, count.calls
    with torch.no_grad(), OpCounter() as count:
        grouped(x)
    assert count.calls[map_op] == 2, count.calls
    with OpCounter() as count:
        ref = ungrouped(x)
    assert count.calls[map_op] == 8, count.calls
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    out.square().sum().backward()
    ref.square().sum().backward()
    for a, b in zip(grouped.parameters(), ungrouped.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-10, atol=1e-12)


def test_changed_terms_reach_the_grouped_forward():
    model = block_model("cayley_neumann", "in", terms=1)
    train(model, lr=0.05)
    for layer in block_layers(model):
        layer.terms = 3
    x = torch.randn(4, 20, dtype=F64)
    first, second = block_layers(model)
    want = F.linear(torch.tanh(F.linear(x, first.effective_weight(), first.bias)), second.effective_weight(),
                    second.bias)
    torch.testing.assert_close(model(x), want)  # model(x): the grouped forward


def _saved_bytes(fn, exclude=()):
    """Bytes of the distinct storages autograd saves for backward while fn() runs, not counting those of the
    tensors in ``exclude``."""
    own = {t.untyped_storage().data_ptr() for t in exclude}
    seen = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in own:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(seen.values())


def test_default_saves_activations_and_rotations_only():
    """A two-sided cayley_neumann layer saves x, the inner activation and each side's R, nothing else (not
    the skew blocks or their powers: the map keeps only its packed parameters, which are not counted);
    its parameter gradients equal those of the map through plain autograd."""
    layer = OPTBlockLinear(40, 24, block_size=8, sides="both", dtype=F64)
    train(nn.Sequential(layer))
    x = torch.randn(16, 40, dtype=F64, requires_grad=True)
    out, nbytes = _saved_bytes(lambda: layer(x), exclude=list(layer.parameters()) + list(layer.buffers()))
    n_in, n_out = 40 // 8, 24 // 8
    assert nbytes == 8 * (16 * 40 + 16 * 24 + (n_in + n_out) * 8 * 8)
    grads = torch.autograd.grad(out.square().sum(), [layer.in_blocks, layer.out_blocks])
    S_in, S_out = (skew_from_packed(P, 8) for P in (layer.in_blocks, layer.out_blocks))
    ref = functional.block_apply(functional.cayley_neumann(S_out, layer.terms),
                                 F.linear(functional.block_apply(functional.cayley_neumann(S_in, layer.terms).mT, x,
                                                                 layer.in_perm), layer.W0), layer.out_perm)
    want = torch.autograd.grad((ref + layer.bias).square().sum(), [layer.in_blocks, layer.out_blocks])
    for g, w in zip(grads, want):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)


def test_forward_mode_ad_through_a_layer():
    """torch.func.jvp through a cayley_neumann layer's parameters matches central differences (the map's
    memory-lean backward has no forward rule of its own: a tangent takes the op's)."""
    layer = OPTBlockLinear(12, 12, block_size=4, sides="both", dtype=F64)
    x = torch.randn(3, 12, dtype=F64)
    P = layer.in_blocks.detach() + 0.1 * torch.randn_like(layer.in_blocks)
    T = torch.randn_like(P)

    def f(p):
        return torch.func.functional_call(layer, {"in_blocks": p}, (x,))
    _, tangent = torch.func.jvp(f, (P,), (T,))
    eps = 1e-6
    torch.testing.assert_close(tangent, (f(P + eps * T) - f(P - eps * T)) / (2 * eps), rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("sides", ["in", "both"])
def test_recompute_same_gradients_fewer_bytes(sides):
    """recompute=True: the same output and gradients (input and parameters) as recompute=False, and fewer
    bytes saved for backward."""
    plain = OPTBlockLinear(64, 48, block_size=16, sides=sides, dtype=F64)
    train(nn.Sequential(plain))
    lean = copy.deepcopy(plain)
    lean.recompute = True
    x = torch.randn(32, 64, dtype=F64, requires_grad=True)
    results = []
    for layer in (plain, lean):
        out, nbytes = _saved_bytes(lambda: layer(x))
        grads = torch.autograd.grad(out.square().sum(), [x] + list(layer.parameters()))
        results.append((out.detach(), grads, nbytes))
    (out_a, grads_a, bytes_a), (out_b, grads_b, bytes_b) = results
    torch.testing.assert_close(out_b, out_a, rtol=0, atol=0)
    for ga, gb in zip(grads_a, grads_b):
        torch.testing.assert_close(gb, ga, rtol=1e-12, atol=1e-12)
    assert bytes_b < bytes_a, (bytes_b, bytes_a)


# ---- bfloat16 ------------------------------------------------------------------------------------------------

def test_bfloat16_model():
    """model.to(torch.bfloat16) of a converted model: block parameters stay float32, W0 and bias become
    bfloat16, the output is close to the float32 model's and the block parameters get float32 gradients."""
    model = block_model(dtype=torch.float32)
    train(model)
    half = copy.deepcopy(model).to(torch.bfloat16)
    for layer in block_layers(half):
        assert layer.in_blocks.dtype == layer.out_blocks.dtype == torch.float32
        assert layer.W0.dtype == layer.bias.dtype == torch.bfloat16
    x = torch.randn(8, 20)
    out = half(x.bfloat16())
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), model(x), rtol=3e-2, atol=3e-2)
    out.float().square().sum().backward()
    for layer in block_layers(half):
        assert layer.in_blocks.grad.dtype == torch.float32 and layer.in_blocks.grad.abs().sum() > 0


# ---- torch.compile -------------------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("recompute", [False, True], ids=["saved", "recompute"])
def test_compile_fullgraph_two_layer_mlp(recompute):
    """torch.compile(fullgraph=True) of a converted two-layer MLP: forward and gradients equal eager."""
    model = block_model(dtype=torch.float32, recompute=recompute)
    train(model, steps=1)
    model.zero_grad()
    x = torch.randn(6, 20)
    torch._dynamo.reset()
    with torch._inductor.config.patch(compile_threads=1), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # checkpoint's and dynamo's notes
        out = torch.compile(model, fullgraph=True)(x)
        out.square().sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    ref = model(x)
    ref.square().sum().backward()
    torch._dynamo.reset()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    for g, p in zip(grads, model.parameters()):
        torch.testing.assert_close(g, p.grad, rtol=1e-4, atol=1e-5)
    assert not any(g.active for g in model._opt_grouping.groups.values())  # the session was closed
