"""opt_fast.nn.prepare_fsdp on one process: W0 becomes a frozen parameter and nothing else changes (the
sharded runs, 2 gloo processes, are in tests/test_lm.py through scripts/lm_fsdp_probe.py)."""
import copy

import torch
from torch import nn

from opt_fast.nn import MergeSchedule, OPTBlockLinear, convert, merge, prepare_fsdp

F64 = torch.float64


def model(seed=0):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(20, 24), nn.Tanh(), nn.Linear(24, 12)).to(F64)
    return convert(net, method="cayley_neumann", block_size=5, sides="both")


def layers(net):
    return [m for m in net.modules() if isinstance(m, OPTBlockLinear)]


def run(net, steps=4, every=2):
    """Adam on every parameter of the model (W0 included where it is one) with merges: outputs per step."""
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(16, 20, generator=g, dtype=F64), torch.randn(16, 12, generator=g, dtype=F64)
    opt = torch.optim.Adam(net.parameters(), lr=0.01)
    sched = MergeSchedule(net, every=every, optimizer=opt)
    outs = []
    for _ in range(steps):
        opt.zero_grad()
        out = net(x)
        ((out - y) ** 2).mean().backward()
        opt.step()
        sched.step()
        outs.append(out.detach())
    return outs


def test_prepare_fsdp_makes_w0_a_frozen_parameter_and_keeps_the_state_dict():
    net = model()
    keys = list(net.state_dict())
    W0s = [m.W0 for m in layers(net)]
    assert prepare_fsdp(net) == 2 and prepare_fsdp(net) == 2   # idempotent
    for m, W0 in zip(layers(net), W0s):
        assert isinstance(m.W0, nn.Parameter) and not m.W0.requires_grad
        assert m.W0.data_ptr() == W0.data_ptr()                # the same tensor, not a copy
        assert "W0" not in dict(m.named_buffers())
    assert list(net.state_dict()) == keys
    plain = model(seed=1)                                      # checkpoints load into either form
    plain.load_state_dict(net.state_dict())
    net.load_state_dict(plain.state_dict())
    x = torch.randn(3, 20, dtype=F64)
    torch.testing.assert_close(net(x), plain(x), rtol=0, atol=0)


def test_prepared_model_trains_and_merges_as_the_buffer_form():
    """An optimizer over model.parameters() leaves the frozen W0 alone; the merges write it."""
    a = model()
    b = copy.deepcopy(a)
    prepare_fsdp(b)
    for oa, ob in zip(run(a), run(b)):
        torch.testing.assert_close(ob, oa, rtol=0, atol=0)
    for la, lb in zip(layers(a), layers(b)):
        assert int(lb.merges) == 2 and lb.W0.grad is None
        torch.testing.assert_close(lb.W0, la.W0, rtol=0, atol=0)
    x = torch.randn(3, 20, dtype=F64)
    torch.testing.assert_close(merge(b)(x), b(x))


def test_prepared_model_casts_and_compiles():
    net = model()
    prepare_fsdp(net)
    half = copy.deepcopy(net).to(torch.bfloat16)   # (a float64 model: its blocks become float32, not bfloat16)
    for m in layers(half):
        assert isinstance(m.W0, nn.Parameter) and m.W0.dtype == torch.bfloat16
        assert m.in_blocks.dtype == m.out_blocks.dtype == torch.float32
    half(torch.randn(3, 20, dtype=torch.bfloat16)).float().sum().backward()
    x = torch.randn(3, 20, dtype=F64)
    compiled = torch.compile(net, fullgraph=True)
    torch.testing.assert_close(compiled(x), net(x))
