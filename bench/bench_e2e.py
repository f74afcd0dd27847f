"""pytest-benchmark suite for the end-to-end costs (bench/e2e.py):

* one training step of the OPT reference CNN-6 per method (``opt_fast.nn.convert``) and plainly; extra_info
  holds the plain step time measured in this process and the ratio OPT step / plain step;
* R = map(P) forward + backward for a network's layer set (one batched op call per d-group).

Batch size and layer set follow the size (bench/shapes.py: E2E_BATCH, LAYER_SETS).
"""
import functools
import statistics

import pytest
import torch

from bench import e2e
from bench.shapes import E2E_BATCH, LAYER_SETS


@functools.lru_cache(maxsize=None)
def _plain_step_s(batch: int, device: str) -> float:
    return statistics.median(e2e.time_steps(e2e.make_step("plain", batch, device), device, steps=3))


@pytest.mark.parametrize("method", ("plain",) + e2e.METHODS)
def test_train_step(method, benchmark, bench_device, bench_size_name):
    reason = e2e.nn_unavailable()
    if reason and method != "plain":
        pytest.skip(reason)
    batch = E2E_BATCH[bench_size_name]
    step = e2e.make_step(method, batch, bench_device)
    step()   # warm-up
    benchmark.group = f"e2e CNN-6 training step, batch {batch}"
    info = {"method": method, "batch": batch, "target": e2e.TARGETS.get(method)}
    if not benchmark.disabled:
        info["plain_step_s"] = _plain_step_s(batch, bench_device)
        info["ratio"] = statistics.median(e2e.time_steps(step, bench_device, warmup=0)) / info["plain_step_s"]
    benchmark.extra_info.update(info)
    benchmark(step)


@pytest.mark.parametrize("method", tuple(e2e.LAYER_MAPS))
def test_layer_set(method, benchmark, bench_device, bench_size_name):
    name, layer_set = LAYER_SETS[bench_size_name]
    gen = torch.Generator(device=bench_device).manual_seed(0)
    Ps = [torch.randn((b, d, d), generator=gen, device=bench_device).requires_grad_() for d, b in layer_set.items()]
    f = e2e.LAYER_MAPS[method]

    def run():
        outs = [f(P) for P in Ps]
        torch.autograd.grad(outs, Ps, [torch.ones_like(o) for o in outs])
    run()   # warm-up
    benchmark.group = f"e2e {name} {layer_set}: R fwd+bwd"
    benchmark.extra_info.update({"method": method, "layer_set": {str(d): b for d, b in layer_set.items()}})
    benchmark(run)
