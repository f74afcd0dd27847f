"""pytest-benchmark suite for cayley ((I+S)(I−S)⁻¹) against torch solve / inv / LU, Cayley–Neumann and
matrix_exp, at OPT-CP init (‖S‖ ~ 2√d) and in the PEFT regime (‖S‖ < 1).

Cases (impl × shape × dtype × fwd / fwd+bwd) come from bench/cases.py; see bench/README.md.
"""

OPS = ("cayley",)


def test_cayley(case, run_case):
    run_case(case)
