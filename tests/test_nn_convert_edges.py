"""convert / merge on models as users write them: shared and tied modules, frozen layers, hooks, loose
arguments, zero-width layers, an inference_mode forward before training, meta-built lowdin layers."""
import warnings

import pytest
import torch
from torch import nn

from opt_fast.nn import convert, merge


class _Shared(nn.Module):
    def __init__(self):
        super().__init__()
        self.l = nn.Linear(8, 8)
        self.alias = self.l

    def forward(self, x):
        return self.alias(self.l(x))


@pytest.mark.parametrize("kw", [dict(method="cayley"), dict(block_size=4)])
def test_a_shared_module_is_converted_and_merged_under_each_name(kw):
    m = convert(_Shared(), **kw)
    assert m.l is m.alias and type(m.l).__name__ != "Linear"
    x = torch.randn(3, 8)
    torch.optim.SGD(m.parameters(), lr=0.1).zero_grad()
    m(x).square().sum().backward()
    mg = merge(m)
    assert mg.l is mg.alias and type(mg.l) is nn.Linear
    torch.testing.assert_close(mg(x), m(x), rtol=1e-5, atol=1e-5)


class _Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb, self.mid, self.head = nn.Embedding(10, 8), nn.Linear(8, 8), nn.Linear(8, 10, bias=False)
        self.head.weight = self.emb.weight


@pytest.mark.parametrize("kw", [dict(method="cayley"), dict(block_size=4)])
def test_a_tied_weight_is_left_tied_with_a_warning(kw):
    with pytest.warns(UserWarning, match=r"head: its weight is tied to the weight of 'emb'"):
        m = convert(_Tied(), **kw)
    assert type(m.head) is nn.Linear and m.head.weight is m.emb.weight and type(m.mid) is not nn.Linear
    with pytest.raises(ValueError, match="tied"):
        convert(_Tied(), strict=True, **kw)
    with pytest.raises(ValueError, match="tied"):
        convert(_Tied(), include=["head"], **kw)


@pytest.mark.parametrize("kw", [dict(method="cayley"), dict(block_size=2), dict(block_size=2, sides="in")])
def test_frozen_weights_and_biases_stay_frozen(kw):
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4))
    model[0].requires_grad_(False)
    model[1].bias.requires_grad_(False)
    c = convert(model, **kw)
    grads = {n: p.requires_grad for n, p in c.named_parameters()}
    assert not any(v for n, v in grads.items() if n.startswith("0."))
    assert not grads["1.bias"] and all(v for n, v in grads.items() if n.startswith("1.") and n != "1.bias")
    assert all(v for n, v in grads.items() if n.startswith("2."))


def test_hooks_on_a_converted_module_are_reported():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    model[1].register_forward_hook(lambda *a: None)
    with pytest.warns(UserWarning, match=r"hooks registered on \['1'\]"):
        convert(model, method="cayley")


@pytest.mark.parametrize("kw, match", [
    (dict(sides="in"), "sides='in' set without block_size"),
    (dict(terms=3, recompute=True), "terms=3, recompute=True set without block_size"),
    (dict(method="cayley", num_reflectors=2), "num_reflectors is an option of method 'householder'"),
    (dict(block_size=True), "block_size must be a positive int, got True"),
])
def test_loose_arguments_raise(kw, match):
    with pytest.raises(ValueError, match=match):
        convert(nn.Sequential(nn.Linear(4, 4)), **kw)


class _EncDec(nn.Module):
    def __init__(self):
        super().__init__()
        self.enc, self.dec = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4)), nn.Linear(4, 4)


def test_include_exclude_take_a_string_and_exclude_a_parent_excludes_its_children():
    c = convert(_EncDec(), method="cayley", exclude="enc")
    assert [type(m) for m in c.enc] == [nn.Linear, nn.Linear] and type(c.dec) is not nn.Linear
    c = convert(_EncDec(), method="cayley", include="dec")
    assert type(c.enc[0]) is nn.Linear and type(c.dec) is not nn.Linear
    with pytest.warns(UserWarning, match=r"exclude names no module of the model: \['nope'\]"):
        convert(_EncDec(), method="cayley", exclude=["nope"])


@pytest.mark.parametrize("method", ["cayley", "gram_schmidt", "householder", "lowdin", "ogd", "orth_reg", "none"])
def test_dense_layer_without_inputs(method):
    m = convert(nn.Sequential(nn.Linear(0, 4)), method=method)
    y = m(torch.randn(3, 0))
    y.sum().backward()
    assert y.shape == (3, 4) and torch.equal(y, m[0].bias.expand(3, 4))


def test_inference_mode_forward_then_training_block_cayley():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        a = convert(nn.Linear(8, 8), method="cayley", block_size=3)   # b = 3: a size no other test caches first
        with torch.inference_mode():
            a(torch.randn(2, 8))
        b = convert(nn.Linear(8, 8), method="cayley", block_size=3)
        b(torch.randn(2, 8)).sum().backward()
        assert b.in_blocks.grad is not None


def test_meta_built_lowdin_layer_loaded_with_assign():
    src = convert(nn.Sequential(nn.Linear(6, 6)), method="lowdin")
    with torch.device("meta"):
        m = convert(nn.Sequential(nn.Linear(6, 6)), method="lowdin")
    m.load_state_dict(src.state_dict(), assign=True)
    x = torch.randn(2, 6)
    assert m[0].R0.device.type == "cpu"
    torch.testing.assert_close(m.eval()(x), src.eval()(x))
    torch.testing.assert_close(merge(m)(x), src(x), rtol=1e-5, atol=1e-5)


class _Branches(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x, which):
        self.c(x)   # computed, never reaches the loss
        return getattr(self, which)(x)


@pytest.mark.parametrize("kw", [dict(method="cayley"), dict(method="householder"), dict(block_size=4),
                                dict(block_size=4, method="cayley")])
def test_grouped_layers_a_forward_does_not_use_get_no_gradient(kw):
    """As without grouping: None, not zeros, so AdamW's decay and momentum leave them alone."""
    torch.manual_seed(0)
    m = convert(_Branches(), **kw)
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    opt = torch.optim.AdamW(m.parameters(), lr=0.1, weight_decay=0.1)
    x = torch.randn(3, 8)
    m(x, "a").square().sum().backward()
    assert all(p.grad is not None for p in m.a.parameters())
    assert all(p.grad is None for p in m.b.parameters()) and all(p.grad is None for p in m.c.parameters())
    opt.step()
    assert all(torch.equal(p, before[n]) for n, p in m.named_parameters() if not n.startswith("a."))
    ref = convert(_Branches(), group=False, **kw)
    opt.zero_grad()
    m(x, "b").square().sum().backward()   # the other branch: its gradients equal the ungrouped layer's
    ref.load_state_dict(m.state_dict())
    ref(x, "b").square().sum().backward()
    for (n, p), q in zip(m.b.named_parameters(), ref.b.parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=n)


def test_merge_and_reset_warns_when_the_series_left_orthogonality():
    from opt_fast.nn import merge_and_reset
    m = convert(nn.Sequential(nn.Linear(8, 8)), block_size=4)
    with torch.no_grad():
        m[0].in_blocks.fill_(2.0)   # ‖S‖ >> 1: the truncated Neumann series is far from orthogonal
    with pytest.warns(UserWarning, match=r"in rotation is not orthogonal"):
        merge_and_reset(m)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        merge_and_reset(convert(nn.Sequential(nn.Linear(8, 8)), block_size=4))   # R = I: silent


def test_loads_and_merges_that_change_nothing_or_something_say_so():
    from opt_fast.nn import MergeSchedule, merge_and_reset
    a = convert(nn.Sequential(nn.Linear(8, 8)), block_size=4)
    b = convert(nn.Sequential(nn.Linear(8, 8)), block_size=4, terms=3)
    with pytest.warns(UserWarning, match="saved with terms=5 into a layer with terms=3"):
        b.load_state_dict(a.state_dict())
    assert b[0].terms == 3
    with pytest.warns(UserWarning, match="no OPTBlockLinear"):
        assert merge_and_reset(convert(nn.Sequential(nn.Linear(8, 8)), method="cayley")) == 0
    with pytest.warns(UserWarning, match="merged every 10 steps, this schedule every 20"):
        MergeSchedule(a, every=20).load_state_dict(MergeSchedule(a, every=10).state_dict())


@pytest.mark.parametrize("kw", [dict(method="gram_schmidt"), dict(method="cayley", block_size=16, sides="both"),
                                dict(method="cayley_neumann", block_size=16, sides="in")])
def test_gpt2_conv1d_layers_are_converted_trained_and_merged_back_into_conv1d(kw):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50, n_positions=16,
                                  bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    ids = torch.randint(0, 50, (2, 7))
    before, conv1d = model(ids).logits, type(model.transformer.h[0].attn.c_attn)
    with pytest.warns(UserWarning, match="lm_head"):   # tied to the embedding; every Conv1D converted
        m = convert(model, keep_weights=True, **kw)
    blocks = m.transformer.h[0]
    assert all("OPT" in type(x).__name__ for x in (blocks.attn.c_attn, blocks.attn.c_proj, blocks.mlp.c_fc,
                                                   blocks.mlp.c_proj))
    torch.testing.assert_close(m(ids).logits, before, atol=1e-5, rtol=1e-5)   # R = I: the same model
    m.train()
    opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.5)
    for _ in range(2):
        m(ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    m.eval()
    trained = m(ids).logits
    assert not torch.allclose(trained, before, atol=1e-4)
    merged = merge(m)
    assert type(merged.transformer.h[0].attn.c_attn) is conv1d
    plain = transformers.GPT2LMHeadModel(cfg).eval()
    plain.load_state_dict(merged.state_dict())       # the checkpoint layout of the original model
    torch.testing.assert_close(plain(ids).logits, trained, atol=1e-5, rtol=1e-5)


def test_converting_nothing_says_so():
    with pytest.warns(UserWarning, match="no layer was converted"):
        convert(nn.Sequential(nn.ReLU(), nn.Embedding(4, 4)))
    with pytest.warns(UserWarning, match="nn.Linear only with block_size"):
        convert(nn.Sequential(nn.Conv2d(2, 2, 3)), block_size=2)


def test_energy_of_a_gpt2_conv1d_is_that_of_its_neurons():
    transformers = pytest.importorskip("transformers")
    from opt_fast import hyperspherical_energy
    layer = transformers.pytorch_utils.Conv1D(6, 4)      # 6 neurons of fan-in 4, stored [4, 6]
    torch.testing.assert_close(hyperspherical_energy(layer), hyperspherical_energy(layer.weight.detach().T))


@pytest.mark.parametrize("kw", [dict(method="cayley"), dict(block_size=4), dict(method="lowdin")])
def test_torchscript_is_refused_with_what_works_and_merged_models_trace(kw):
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    if "block_size" not in kw:
        model.append(nn.Unflatten(1, (1, 4)))
        model.append(nn.Conv1d(1, 2, 3))
    m = convert(model, **kw).eval()
    x = torch.randn(3, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)   # torch deprecates both
        with pytest.raises(RuntimeError, match="torch.jit.trace cannot record OPT.*torch.export.*merge"):
            torch.jit.trace(m, x)
        with pytest.raises(RuntimeError, match="torch.jit.script cannot compile OPT.*merge"):
            torch.jit.script(m)
        traced = torch.jit.trace(merge(m), x)
    torch.testing.assert_close(traced(x), m(x))
    exported = torch.export.export(m, (x,)).module()
    torch.testing.assert_close(exported(x), m(x))
