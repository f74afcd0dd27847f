"""pytest-benchmark suite for cayley_neumann (the truncated Cayley series of the block layers, POET and PEFT's
OFT) against the series in torch ops and PEFT's own, on blocks of 32 and 256 at ‖S‖ < 1.

Cases (impl × shape × dtype × fwd / fwd+bwd) come from bench/cases.py; see bench/README.md.
"""

OPS = ("cayley_neumann",)


def test_cayley_neumann(case, run_case):
    run_case(case)
