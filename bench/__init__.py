"""opt_fast benchmarks: pytest-benchmark suites (``bench_*.py``) and the report runner (``report.py``).

Both time the same cases, defined once in ``bench.cases`` (shapes in ``bench.shapes``, implementations in
``bench.impls``); see ``bench/README.md``.
"""
