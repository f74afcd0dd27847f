"""pytest-benchmark suite for lowdin (orthogonal polar factor) against SVD and eigh routes and torch.optim.Muon's
Newton–Schulz, and for the approximate orthogonalize_approx (Muon-style quintic) against Muon's own.

Cases (impl × shape × dtype × fwd / fwd+bwd) come from bench/cases.py; see bench/README.md.
"""

OPS = ("lowdin", "orthogonalize_approx")


def test_lowdin(case, run_case):
    run_case(case)
