"""OPT layers' read-only ``.weight``, nn.MultiheadAttention conversion (OPTMultiheadAttention), and
nn.TransformerEncoder after convert: train and eval mode (torch's fast path reads ``.weight`` and
``in_proj_weight``), merge back to plain modules."""
import copy
import warnings

import pytest
import torch
from torch import nn

from _refs import OpCounter
from opt_fast.nn import (METHODS, OPTConv2d, OPTLayer, OPTLinear, OPTMultiheadAttention, convert, group_layers,
                         merge)

F64 = torch.float64


def _quiet(fn, *args, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # convert must not skip anything in these models
        return fn(*args, **kw)


# ---- .weight --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", list(METHODS))
def test_weight_is_the_effective_weight(method):
    torch.manual_seed(0)
    for layer in (OPTLinear(6, 4, method=method, dtype=F64), OPTConv2d(2, 3, 3, method=method, dtype=F64),
                  OPTLinear(6, 9, method=method, dtype=F64)):  # n < d and n > d (householder: direct or not)
        w = layer.weight
        assert w.shape == layer.W0.shape
        torch.testing.assert_close(w, layer.effective_weight(), rtol=0, atol=0)
        x = torch.randn(2, *((6,) if isinstance(layer, OPTLinear) else (2, 5, 5)), dtype=F64)
        plain = layer._conv(x, w, layer.bias, layer.stride, layer.padding, layer.dilation, 1) \
            if isinstance(layer, OPTConv2d) else nn.functional.linear(x, w, layer.bias)
        torch.testing.assert_close(layer(x), plain, rtol=1e-12, atol=1e-12)
        w.sum().backward()  # differentiable: the gradient reaches the learnable tensor
        assert layer.learnable.grad is not None and layer.learnable.grad.abs().sum() > 0


def test_weight_is_read_only():
    layer = OPTLinear(5, 3, method="gram_schmidt")
    for value in (torch.randn(3, 5), nn.Parameter(torch.randn(3, 5))):
        with pytest.raises(AttributeError, match=r"OPTLinear\.weight is the effective weight.*load_weight"):
            layer.weight = value
    assert "weight" not in dict(layer.named_parameters()) and "weight" not in layer.state_dict()


def test_weight_of_method_none_is_its_parameter():
    """method "none" keeps its learnable Parameter under the state_dict key ``weight`` (compatible with
    checkpoints saved before ``.weight`` existed); ``.weight`` is that Parameter (a view for conv layers)."""
    layer = OPTLinear(5, 3, method="none")
    assert isinstance(layer.weight, nn.Parameter) and layer.weight is layer.learnable
    assert list(layer.state_dict()) == ["weight", "bias", "W0", "_extra_state"]
    saved = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in layer.state_dict().items()}
    fresh = OPTLinear(5, 3, method="none")
    fresh.load_state_dict(saved)
    assert torch.equal(fresh.weight, saved["weight"])
    conv = OPTConv2d(2, 3, 3, method="none")
    assert conv.weight.shape == (3, 2, 3, 3) and conv.weight.data_ptr() == conv.learnable.data_ptr()


def test_weight_inside_a_grouped_forward_uses_the_groups_result():
    model = nn.Sequential(OPTLinear(6, 6, method="cayley"), OPTLinear(6, 6, method="cayley"))
    group_layers(model)
    seen = []
    model[1].register_forward_pre_hook(lambda m, a: seen.append(m.weight))
    with OpCounter() as counter:
        model(torch.randn(2, 6))
    assert counter.calls["cayley"] == 1  # the hook's read came from the group's one call
    torch.testing.assert_close(seen[0], model[1].effective_weight())


# ---- nn.TransformerEncoder --------------------------------------------------------------------------------------

def _encoder(batch_first, nested=False):
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 4, dim_feedforward=24, dropout=0.0, batch_first=batch_first)
    return nn.TransformerEncoder(layer, 2, enable_nested_tensor=nested)


def _fast_path_calls(fn):
    """How often torch's fused encoder-layer kernel ran inside fn (its eval-mode fast path)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        out = fn()
    return out, sum(e.name == "aten::_transformer_encoder_layer_fwd" for e in prof.events())


@pytest.mark.parametrize("method", ["gram_schmidt", "cayley", "lowdin", "householder", "none"])
@pytest.mark.parametrize("batch_first", [True, False], ids=["batch_first", "seq_first"])
def test_transformer_encoder_after_convert(batch_first, method):
    plain = _encoder(batch_first)
    model = _quiet(convert, copy.deepcopy(plain), method, keep_weights=True)
    attn = model.layers[0].self_attn
    assert isinstance(attn, OPTMultiheadAttention) and isinstance(attn.out_proj, OPTLinear)
    assert all(isinstance(m, OPTLinear) for m in (attn.q_proj, attn.k_proj, attn.v_proj, model.layers[1].linear1))
    x = torch.randn(5, 7, 16) if batch_first else torch.randn(7, 5, 16)
    for train in (True, False):
        model.train(train)
        plain.train(train)
        out = model(x)  # grad enabled: torch's slow path even in eval
        torch.testing.assert_close(out, plain(x), rtol=1e-5, atol=1e-5)
        out.square().sum().backward()
        assert all(p.grad is not None for p in model.parameters())
        model.zero_grad()
    with torch.no_grad():  # eval + no_grad: the fused fast path, which reads .weight / in_proj_weight
        out, fast = _fast_path_calls(lambda: model(x))
        want, fast_plain = _fast_path_calls(lambda: plain(x))
    assert fast == fast_plain == (2 if batch_first else 0), (fast, fast_plain)  # torch needs batch_first
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("batch_first", [True, False], ids=["batch_first", "seq_first"])
def test_transformer_encoder_merge_gives_plain_modules(batch_first):
    model = _quiet(convert, _encoder(batch_first), "gram_schmidt")  # random R: W differs from W0
    model.train()
    x = torch.randn(5, 7, 16) if batch_first else torch.randn(7, 5, 16)
    plain = merge(model)
    assert not any(isinstance(m, (OPTLayer, OPTMultiheadAttention)) for m in plain.modules())
    assert type(plain.layers[0].self_attn) is nn.MultiheadAttention
    assert type(plain.layers[0].linear1) is nn.Linear
    for train in (True, False):
        model.train(train)
        plain.train(train)
        with torch.no_grad():
            torch.testing.assert_close(plain(x), model(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(plain(x), model(x), rtol=1e-5, atol=1e-5)


def test_transformer_encoder_nested_tensor_fast_path():
    """enable_nested_tensor with a padding mask in eval: torch packs the batch into a nested tensor."""
    plain = _encoder(True, nested=True)
    model = _quiet(convert, copy.deepcopy(plain), "cayley", keep_weights=True).eval()
    plain.eval()
    x = torch.randn(3, 6, 16)
    mask = torch.zeros(3, 6, dtype=torch.bool)
    mask[0, 4:] = mask[2, 1:] = True
    with torch.no_grad():
        out, want = model(x, src_key_padding_mask=mask), plain(x, src_key_padding_mask=mask)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)


# ---- nn.MultiheadAttention ----------------------------------------------------------------------------------------

MHA_CONFIGS = {
    "packed": dict(),
    "kdim-vdim": dict(kdim=5, vdim=7),
    "bias_kv-zero_attn": dict(add_bias_kv=True, add_zero_attn=True),
    "no-bias": dict(bias=False),
}


@pytest.mark.parametrize("config", list(MHA_CONFIGS))
def test_multihead_attention_roundtrip(config):
    kw = MHA_CONFIGS[config]
    torch.manual_seed(1)
    mha = nn.MultiheadAttention(8, 2, batch_first=True, dtype=F64, **kw)
    q = torch.randn(3, 4, 8, dtype=F64)
    k = torch.randn(3, 6, kw.get("kdim", 8), dtype=F64)
    v = torch.randn(3, 6, kw.get("vdim", 8), dtype=F64)
    pad = torch.zeros(3, 6, dtype=torch.bool)
    pad[1, 3:] = True
    want, want_w = mha(q, k, v, key_padding_mask=pad)
    opt = _quiet(convert, copy.deepcopy(mha), "cayley", keep_weights=True)  # the module itself is the root
    assert isinstance(opt, OPTMultiheadAttention)
    got, got_w = opt(q, k, v, key_padding_mask=pad)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got_w, want_w, rtol=1e-12, atol=1e-12)
    if "kdim" in kw:
        assert opt.in_proj_weight is None and opt.k_proj_weight.shape == (8, 5)
    # train R away from I, then merge back
    with torch.no_grad():
        for layer in opt.modules():
            if isinstance(layer, OPTLayer):
                layer.learnable.normal_()
    got, _ = opt(q, k, v, key_padding_mask=pad)
    assert not torch.allclose(got, want)
    plain = merge(opt)
    assert type(plain) is nn.MultiheadAttention and plain.kdim == mha.kdim and plain.batch_first
    torch.testing.assert_close(plain(q, k, v, key_padding_mask=pad)[0], got, rtol=1e-12, atol=1e-12)


def test_multihead_attention_projections_share_one_op_call():
    mha = _quiet(convert, nn.MultiheadAttention(8, 2), "gram_schmidt")
    x = torch.randn(5, 3, 8)
    with OpCounter() as counter:
        out, _ = mha(x, x, x)
    assert counter.forward_calls == 1  # q, k, v and out_proj: four 8x8 R in one batched call
    out.sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in mha.parameters())


def test_multihead_attention_fast_path():
    """nn.MultiheadAttention's own eval fast path (self-attention, batch_first, no grad) on the OPT weights."""
    torch.manual_seed(2)
    plain = nn.MultiheadAttention(8, 2, batch_first=True).eval()
    opt = _quiet(convert, copy.deepcopy(plain), "householder", keep_weights=True).eval()
    x = torch.randn(3, 5, 8)
    with torch.no_grad(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        got, want = opt(x, x, x, need_weights=False)[0], plain(x, x, x, need_weights=False)[0]
    assert sum(e.name == "aten::_native_multi_head_attention" for e in prof.events()) == 2
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_multihead_attention_state_dict_roundtrip():
    a = _quiet(convert, nn.MultiheadAttention(8, 2, add_bias_kv=True), "lowdin")
    b = _quiet(convert, nn.MultiheadAttention(8, 2, add_bias_kv=True), "lowdin")
    b.load_state_dict(a.state_dict())
    x = torch.randn(5, 3, 8)
    torch.testing.assert_close(b(x, x, x)[0], a(x, x, x)[0], rtol=0, atol=0)
    assert any(k.startswith("q_proj.") for k in a.state_dict()) and "in_proj_weight" not in a.state_dict()


def test_multihead_attention_derived_weights_are_read_only():
    mha = OPTMultiheadAttention(8, 2)
    for name in ("in_proj_weight", "in_proj_bias", "q_proj_weight"):
        with pytest.raises(AttributeError, match=f"OPTMultiheadAttention.{name} is computed"):
            setattr(mha, name, nn.Parameter(torch.zeros(24, 8)))
    with pytest.raises(ValueError, match="divisible by num_heads"):
        OPTMultiheadAttention(10, 3)


def test_convert_include_exclude_attention():
    model = nn.Sequential(nn.Linear(8, 8), nn.TransformerEncoderLayer(8, 2, dim_feedforward=8))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # excluding the attention leaves its out_proj alone silently
        convert(copy.deepcopy(model), exclude=["1.self_attn"])
    with pytest.raises(ValueError, match=r"cannot convert '1.self_attn.out_proj'.*converted with it"):
        convert(copy.deepcopy(model), include=["1.self_attn.out_proj"])
    converted = _quiet(convert, copy.deepcopy(model), include=["1.self_attn"])
    assert isinstance(converted[1].self_attn, OPTMultiheadAttention) and type(converted[0]) is nn.Linear


def test_compile_fullgraph_multihead_attention():
    mha = _quiet(convert, nn.MultiheadAttention(8, 2, batch_first=True), "cayley")
    calls = []

    def counting_backend(gm, example_inputs):
        calls.extend(n.target for n in gm.graph.nodes if n.op == "call_function" and "opt_fast" in str(n.target))
        return gm.forward

    x = torch.randn(3, 5, 8)
    out = torch.compile(mha, fullgraph=True, backend=counting_backend)(x, x, x)[0]
    torch.testing.assert_close(out, mha(x, x, x)[0])
    assert len(calls) == 1, calls


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_transformer_encoder_on_cuda():
    plain = _encoder(True).cuda()
    model = _quiet(convert, copy.deepcopy(plain), "lowdin", keep_weights=True)
    x = torch.randn(5, 7, 16, device="cuda")
    out = model(x)
    out.sum().backward()
    torch.testing.assert_close(out, plain(x), rtol=1e-4, atol=1e-4)
    model.eval()
    plain.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), plain(x), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(merge(model)(x), model(x), rtol=1e-5, atol=1e-5)
