"""Block layers as a user drives them: fused optimizers across merges, meta default devices, recompute under
torch.func, dtype casts with gradients present, partial state_dicts, tied biases, hooks through merge(), and
options a block layer must not silently ignore."""
import warnings

import pytest
import torch
from torch import nn
from torch.func import functional_call

from opt_fast.nn import OPTBlockLinear, convert, merge, merge_and_reset


def _block_mlp(**kw):
    torch.manual_seed(0)
    return convert(nn.Sequential(nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 12)), block_size=4, **kw)


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("dampening", [0.0, 0.5])
def test_sgd_momentum_steps_on_after_merge(fused, dampening):
    # fused SGD steps a group only when all or none of its parameters have a momentum buffer; the biases keep
    # theirs across a merge, so the reset blocks' buffers are zeroed there, not dropped
    x = torch.randn(5, 16)
    m = _block_mlp()
    opt = torch.optim.SGD(m.parameters(), lr=1e-2, momentum=0.9, dampening=dampening, fused=fused)
    for _ in range(2):
        m(x).square().sum().backward()
        opt.step()
        opt.zero_grad()
    assert merge_and_reset(m, opt) == 2
    block = m[0].in_blocks
    assert block not in opt.state or not opt.state[block]["momentum_buffer"].any()
    assert opt.state[m[0].bias]["momentum_buffer"].any()   # not reset: the bias is not a rotation
    before = block.detach().clone()
    m(x).square().sum().backward()
    g = block.grad.clone()
    opt.step()
    # the first step after the merge moves the block by lr·grad (a fresh buffer), (1 − dampening)·lr·grad
    # with fused SGD's zeroed buffer
    scale = 1 - dampening if fused else 1.0
    torch.testing.assert_close(block.detach(), before - 1e-2 * scale * g)


@pytest.mark.parametrize("kw", [dict(block_size=8), dict(block_size=8, sides="in", method="cayley"), dict(),
                                dict(stochastic=0.5)])
def test_convert_under_a_meta_default_device(kw):
    # what `with torch.device("meta")` / set_default_device("meta") builders do (large models, FSDP2): the
    # permutation seed and subset draws are CPU values, whatever the default device
    with torch.device("meta"):
        m = convert(nn.Sequential(nn.Linear(32, 32)), **kw)
    assert m[0].W0.is_meta
    m.to_empty(device="cpu")
    m[0].reset_parameters()
    assert torch.isfinite(m(torch.randn(2, 32))).all()


def test_recompute_under_torch_func_gives_the_plain_gradients():
    x = torch.randn(3, 16)
    grads = []
    for recompute in (True, False):
        m = _block_mlp(recompute=recompute)
        params = {n: p.detach() for n, p in m.named_parameters()}
        grads.append(torch.func.grad(lambda p: functional_call(m, p, (x,)).square().sum())(params))
    for k in grads[1]:
        torch.testing.assert_close(grads[0][k], grads[1][k])


@pytest.mark.parametrize("foreach", [False, True])
def test_half_cast_with_gradients_keeps_them_float32(foreach):
    m = _block_mlp()
    opt = torch.optim.AdamW(m.parameters(), foreach=foreach)
    m(torch.randn(3, 16)).sum().backward()
    g = m[0].in_blocks.grad.clone()
    m.to(torch.bfloat16)
    assert m[0].in_blocks.dtype == m[0].in_blocks.grad.dtype == torch.float32
    assert torch.equal(m[0].in_blocks.grad, g)   # restored from before the cast, not round-tripped via bfloat16
    assert m[0].bias.grad.dtype == torch.bfloat16
    opt.step()


def test_state_dict_without_the_frozen_weight_is_refused():
    plain = nn.Sequential(nn.Linear(16, 16))
    m = convert(nn.Sequential(nn.Linear(16, 16)), block_size=4)
    with pytest.raises(RuntimeError, match=r"needs its frozen weight '0.W0'.*keep_weights=True"):
        m.load_state_dict(plain.state_dict(), strict=False)
    rotations_only = {k: v for k, v in m.state_dict().items() if k != "0.W0"}
    with pytest.raises(RuntimeError, match="needs its frozen weight '0.W0'"):
        m.load_state_dict(rotations_only, strict=False)
    W0 = m[0].W0.clone()
    m.load_state_dict({"0.W0": 2 * W0}, strict=False)    # a partial one that leaves the rotations out: fine
    assert torch.equal(m[0].W0, 2 * W0)


@pytest.mark.parametrize("kw", [dict(block_size=4), dict()])
def test_a_shared_bias_stays_shared(kw):
    a, b = nn.Linear(16, 16), nn.Linear(16, 16)
    b.bias = a.bias
    m = convert(nn.Sequential(a, b), **kw)
    assert m[0].bias is m[1].bias is a.bias


def test_merge_says_hooks_do_not_carry_over():
    m = convert(nn.Sequential(nn.Linear(16, 16)), block_size=4)
    single = convert(nn.Linear(8, 8), block_size=4)   # the grouping's own hooks are not the user's
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        merge(m), merge(single)
    m[0].register_forward_hook(lambda *args: None)
    with pytest.warns(UserWarning, match=r"hooks registered on \['0'\] are not carried"):
        merge(m)
    with pytest.warns(UserWarning, match="are not carried"):
        merge(m[0])


@pytest.mark.parametrize("kw, match", [
    (dict(block_size=4, sample="channel"), "sample"),
    (dict(block_size=4, terms=True), "terms must be an int"),
    (dict(method="cayley_neumann"), "pass block_size"),
])
def test_options_a_block_layer_does_not_take_are_refused(kw, match):
    with pytest.raises(ValueError, match=match):
        convert(nn.Sequential(nn.Linear(8, 8)), **kw)
    if "terms" in kw:
        with pytest.raises(ValueError, match=match):
            OPTBlockLinear(8, 8, block_size=4, terms=True)
