"""Smoke tests of the block-layer table (bench/blocks.py) and of how bench/peers.py reads PEFT's OFT: every
layer runs forward + backward once at a tiny size, and PEFT's OFT-wrapped nn.Linear computes what its
docstring says in our terms (x chunks as row vectors times R_j = cayley_neumann(S_j, n − 2), then the base)."""
import pytest
import torch

from bench import blocks, compositions, peers


@pytest.mark.parametrize("index", range(len(blocks.layers())))
def test_block_layer_runs(index):
    name, build, why, _ = blocks.layers()[index]
    if why:
        pytest.skip(f"{name}: {why}")
    d, tokens, block = blocks.SHAPES["smoke"][0]
    x = torch.randn(tokens, d)
    out = peers.layer_fwd_bwd(build(d, block, "cpu"), x)()
    assert out.shape == (tokens, d) and torch.isfinite(out).all()


@pytest.mark.parametrize("neumann", (True, False))
def test_peft_oft_linear_is_the_map_we_say(neumann):
    pytest.importorskip("peft")
    d_in, d_out, b = 48, 40, 16
    model = peers.peft_oft_linear(d_in, d_out, b, neumann=neumann, scale=0.05)
    layer = model.base_model.model.linear
    q = layer.oft_R["default"].weight.detach()                 # [blocks, b(b−1)/2]
    rows, cols = torch.triu_indices(b, b, 1)
    S = torch.zeros(q.shape[0], b, b)
    S[:, rows, cols] = q
    S = S - S.mT
    eye = torch.eye(b)
    R = (compositions.neumann_series(S, peers.NEUMANN_TERMS) if neumann
         else torch.linalg.solve(eye - S, eye + S).mT)       # PEFT's exact path: our Cayley's transpose
    x = torch.randn(7, d_in)
    rotated = torch.einsum("trk,rkc->trc", x.reshape(7, -1, b), R).reshape(7, d_in)
    with torch.no_grad():
        torch.testing.assert_close(model(x), layer.base_layer(rotated), rtol=1e-5, atol=1e-5)
