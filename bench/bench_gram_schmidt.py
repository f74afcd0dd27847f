"""pytest-benchmark suite for gram_schmidt (Q of QR with positive diag R) against torch QR and CholQR2.

Cases (impl × shape × dtype × fwd / fwd+bwd) come from bench/cases.py; see bench/README.md.
"""

OPS = ("gram_schmidt",)


def test_gram_schmidt(case, run_case):
    run_case(case)
