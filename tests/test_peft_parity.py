"""Parity with PEFT's OFT layer (peft 0.21.2, a test dependency): the same skew parameters give the same
outputs, gradients and merged weights.

Conventions (PEFT -> opt_fast), for an nn.Linear of in_features = r·b:
* PEFT stores the strictly upper triangle of each block's Q as a vector, in torch.triu_indices order, in
  ``oft_R[adapter].weight`` [r, b(b−1)/2]; ``in_blocks`` of an OPTBlockLinear with sides="in" has the
  same layout, and Q = U − Uᵀ is our S.
* use_cayley_neumann=True, num_cayley_neumann_terms=n: I + 2Q + … + 2Q^(n−2) + Q^(n−1), our
  cayley_neumann with terms = n − 2 (n >= 4; n = 3 computes what n = 4 does).
* use_cayley_neumann=False: (I − Q)(I + Q)⁻¹, our exact cayley (I + S)(I − S)⁻¹ at S = −Q.
* PEFT rotates each length-b chunk of x as a row vector, x_chunk @ R_j, before the frozen layer: y =
  x B W0ᵀ with B = blockdiag(R_j), i.e. W = W0 Bᵀ, our W = W0 R_inᵀ with R_in = B (permute=False).
"""
import copy

import pytest
import torch
from torch import nn

from opt_fast.nn import OPTBlockLinear, convert, merge

IN, OUT = 64, 24


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(IN, OUT)

    def forward(self, x):
        return self.proj(x)


def pair(b, num_terms, neumann=True, scale=0.05, terms=None):
    """(PEFT model, opt_fast model, PEFT's rotation module) from one Tiny with the same random skew vectors;
    ours uses terms = num_terms − 2 unless given."""
    # peft is a test dependency (requirements-dev.txt), imported here so that only these tests pay for its
    # import (~10 s of transformers); a missing peft fails them, it does not skip them
    from peft import OFTConfig, get_peft_model

    base = Tiny()
    config = OFTConfig(r=0, oft_block_size=b, use_cayley_neumann=neumann, num_cayley_neumann_terms=num_terms,
                       target_modules=["proj"])
    theirs = get_peft_model(copy.deepcopy(base), config)
    rot = theirs.base_model.model.proj.oft_R["default"]
    assert rot.weight.shape == (IN // b, b * (b - 1) // 2)
    with torch.no_grad():
        rot.weight.normal_(0.0, scale)
    terms = (num_terms - 2 if neumann else 5) if terms is None else terms
    ours = convert(copy.deepcopy(base), method="cayley_neumann" if neumann else "cayley", block_size=b, sides="in",
                   permute=False, keep_weights=True, terms=terms)
    assert isinstance(ours.proj, OPTBlockLinear) and ours.proj.in_blocks.shape == rot.weight.shape
    with torch.no_grad():
        ours.proj.in_blocks.copy_(rot.weight if neumann else -rot.weight)
    return theirs, ours, rot


NEUMANN = [(16, 5), (8, 4), (32, 7), (4, 10)]  # (b, PEFT num_cayley_neumann_terms); (32, 5) is its default b


@pytest.mark.parametrize("b,num_terms", NEUMANN, ids=[f"b{b}-n{n}" for b, n in NEUMANN])
def test_neumann_path_outputs_and_gradients(b, num_terms):
    """Same outputs (1e-5, float32) and the same gradient w.r.t. the skew vectors."""
    theirs, ours, rot = pair(b, num_terms)
    x = torch.randn(3, 5, IN)
    y_theirs, y_ours = theirs(x), ours(x)
    torch.testing.assert_close(y_ours, y_theirs, rtol=1e-5, atol=1e-5)
    G = torch.randn_like(y_ours)
    (g_theirs,) = torch.autograd.grad(y_theirs, rot.weight, G)
    (g_ours,) = torch.autograd.grad(y_ours, ours.proj.in_blocks, G)
    torch.testing.assert_close(g_ours, g_theirs, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("b", [8, 32])
def test_exact_path(b):
    """PEFT's exact Cayley, (I − Q)(I + Q)⁻¹, is our method="cayley" at S = −Q: same outputs, and the
    gradient w.r.t. our vector is minus PEFT's."""
    theirs, ours, rot = pair(b, 5, neumann=False, scale=0.2)
    x = torch.randn(7, IN)
    y_theirs, y_ours = theirs(x), ours(x)
    torch.testing.assert_close(y_ours, y_theirs, rtol=1e-5, atol=1e-5)
    G = torch.randn_like(y_ours)
    (g_theirs,) = torch.autograd.grad(y_theirs, rot.weight, G)
    (g_ours,) = torch.autograd.grad(y_ours, ours.proj.in_blocks, G)
    torch.testing.assert_close(g_ours, -g_theirs, rtol=1e-4, atol=1e-4)


def test_three_terms_is_four():
    """PEFT's n = 3 computes its n = 4 series (terms = 2 here), not terms = 1."""
    x = torch.randn(4, IN)
    torch.manual_seed(1)
    theirs, ours, _ = pair(8, 3)
    assert ours.proj.terms == 1
    assert not torch.allclose(ours(x), theirs(x), rtol=1e-5, atol=1e-5)
    torch.manual_seed(1)
    theirs, ours, _ = pair(8, 3, terms=2)
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-5)


def test_row_vector_convention_and_merge():
    """PEFT's rotation module maps x to x @ blockdiag(R_j) with R_j our block rotations; its merged
    weight equals our merge() (W0 R_inᵀ)."""
    theirs, ours, rot = pair(16, 5, scale=0.1)
    R = ours.proj.block_rotation("in").detach()
    x = torch.randn(6, IN)
    torch.testing.assert_close(rot(x), x @ torch.block_diag(*R), rtol=1e-5, atol=1e-5)
    merged_theirs = theirs.merge_and_unload().proj.weight
    torch.testing.assert_close(merge(ours).proj.weight, merged_theirs, rtol=1e-5, atol=1e-5)
