"""pytest-benchmark suite for the Householder ops: householder_product (LAPACK V, tau), householder_orthogonal
(dense reflectors -> d×d) and householder_apply (reflectors applied to X without forming the product).

Cases (impl × shape × dtype × fwd / fwd+bwd) come from bench/cases.py; see bench/README.md.
"""

OPS = ("householder_product", "householder_orthogonal", "householder_apply")


def test_householder(case, run_case):
    run_case(case)
