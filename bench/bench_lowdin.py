"""pytest-benchmark suite for lowdin (orthogonal polar factor) against SVD, eigh and Muon-style NS.

Cases (impl × shape × dtype × fwd / fwd+bwd) come from bench/cases.py; see bench/README.md.
"""

OPS = ("lowdin",)


def test_lowdin(case, run_case):
    run_case(case)
