"""The opt_fast benchmark report: every op against torch built-ins and the peer packages (geotorch, torch's
parametrizations and Muon, PEFT's OFT, torch-householder), the block-orthogonal layers, the OPT training step
and the issues' targets; JSON, markdown (with a headline snippet for README) and PNG plots.

    make bench                                  # installs the peers, then this, default sizes (~5 min, 2 cores)
    python bench/report.py --full --device cuda # the whole sweep of docs/performance.md
    python bench/report.py --out DIR            # where results go (default bench/results)

The headline (bench/headline.py: one line per op and shape that OPT or POET uses) runs first with no time cap;
then the block layers, the end-to-end sections and the targets, each capped; then every other case with the
time left. It does not go through pytest: it has its own timing loop (bench/timers.py: warm-up, then the
median over rounds, CUDA-synchronised), over the same cases as the pytest suites (bench/cases.py). See
bench/README.md.
"""
import argparse
import datetime
import glob
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from bench import block_maps, blocks, e2e, headline, machine, markdown, peers, plots, runner, tables, targets  # noqa: E402
from bench import cases as C  # noqa: E402
from bench.progress import Progress, fmt_duration  # noqa: E402
from bench.shapes import E2E_BATCH, LAYER_SETS, SIZES  # noqa: E402
from bench.timers import Budget  # noqa: E402

# Per size: the per-case timing budget of the cases after the headline, the timed steps of the end-to-end
# sections, and (default size) caps on wall time so that the whole `make bench` stays within 10 minutes on a
# 2-core machine. The headline runs first, uncapped (headline.HEADLINE_BUDGET); the end-to-end sections and
# the targets are capped (train_s, layers_s, targets_s); the other cases get what is left of total_s, counted
# from the start. Cases left when time is up are reported as "skipped: time budget" (never a headline case).
BUDGETS = {
    "smoke": dict(case=Budget(case_s=0.02, min_rounds=2, max_rounds=5), total_s=None, train_s=None,
                  layers_s=None, train_steps=1, layer_steps=1, target_s=0.0, targets_s=0.0),
    "default": dict(case=Budget(case_s=0.08, min_rounds=5, max_rounds=30, min_round_s=0.01, max_case_s=1.0,
                                slow_call_s=2.0),
                    total_s=300.0, train_s=75.0, layers_s=15.0, train_steps=5, layer_steps=2,
                    target_s=2.0, targets_s=40.0),
    "full": dict(case=Budget(case_s=0.2, min_rounds=10, max_rounds=100, max_case_s=3.0, slow_call_s=10.0),
                 total_s=None, train_s=None, layers_s=None, train_steps=5, layer_steps=5,
                 target_s=10.0, targets_s=None),
}
CUDA_MIN_ROUNDS = 50   # docs/performance.md: median of ≥ 50 runs on a GPU


def _positive_int(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _seconds(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not value >= 0:   # also NaN
        raise argparse.ArgumentTypeError(f"must be >= 0 seconds, got {text}")
    return value


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--full", action="store_true", help="the whole sweep of docs/performance.md (meant for a GPU)")
    p.add_argument("--size", choices=SIZES, help="shape set (overrides --full): smoke, default or full")
    p.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda if available, else cpu")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"),
                   help="output folder (default: bench/results)")
    p.add_argument("--ops", nargs="+", choices=C.OPS, default=list(C.OPS), help="ops to benchmark")
    p.add_argument("--no-e2e", action="store_true", help="skip the training-step and layer-set sections")
    p.add_argument("--no-targets", action="store_true", help="skip the issues' acceptance ratios")
    p.add_argument("--no-blocks", action="store_true", help="skip the block-orthogonal layer table")
    p.add_argument("--headline-only", action="store_true", help="the headline alone (no block layers, end to "
                   "end, targets or other cases)")
    p.add_argument("--budget", type=_seconds, help="wall-time cap in seconds for the cases after the headline "
                   "(those left when it runs out are marked skipped; 0: none of them); default: none, or 5 min "
                   "for the default size. The headline is never cut")
    p.add_argument("--threads", type=_positive_int, help="torch.set_num_threads. Default on CPU: torch's "
                   "choice, or 1 when other work keeps all but half a core busy as the run starts (a busy shared "
                   "machine: torch's OpenMP regions then cost a scheduler tick each)")
    p.add_argument("--matmul-precision", choices=("highest", "high", "medium"),
                   help="torch.set_float32_matmul_precision (default: highest, i.e. no TF32)")
    args = p.parse_args(argv)
    args.ops = list(dict.fromkeys(args.ops))   # `--ops cayley cayley` would time every case twice
    return args


def resolve_device(name):
    if name == "cuda" and not torch.cuda.is_available():
        sys.exit("report.py: --device cuda, but torch.cuda.is_available() is False")
    return torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))


def busy_cores(window_s: float = 1.0) -> float:
    """Cores busy right now (/proc/stat over window_s), or the 1-minute load average where /proc is absent.
    Not the load average on Linux: right after `make bench`'s own build it still counts the compiler."""
    def sample():
        with open("/proc/stat") as f:
            ticks = [int(v) for v in f.readline().split()[1:]]
        return sum(ticks), ticks[3] + ticks[4]   # total, idle + iowait
    try:
        total0, idle0 = sample()
        time.sleep(window_s)
        total1, idle1 = sample()
    except (OSError, ValueError, IndexError):
        return os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    return (os.cpu_count() or 1) * (1.0 - (idle1 - idle0) / max(total1 - total0, 1))


def pick_threads(requested, device) -> str:
    if requested:
        torch.set_num_threads(requested)
        return "set by --threads"
    cores = os.cpu_count() or 1
    if device.type != "cpu" or torch.get_num_threads() <= 1:
        return "torch default"
    busy = busy_cores()
    if busy >= cores - 0.5:
        torch.set_num_threads(1)
        return (f"auto: 1 thread, the machine is busy ({busy:.1f} of {cores} cores busy before the run; "
                "--threads N overrides)")
    return "torch default"


def run(args) -> dict:
    size = args.size or ("full" if args.full else "default")
    if args.headline_only:
        args.no_blocks = args.no_e2e = args.no_targets = True
    device = resolve_device(args.device)
    threads_note = pick_threads(args.threads, device)
    if args.matmul_precision:
        torch.set_float32_matmul_precision(args.matmul_precision)
    cfg = dict(BUDGETS[size])
    budget, head_budget = cfg["case"], headline.HEADLINE_BUDGET
    if device.type == "cuda":
        budget, head_budget = (Budget(**{**b.__dict__, "min_rounds": max(b.min_rounds, CUDA_MIN_ROUNDS),
                                         "max_rounds": max(b.max_rounds, CUDA_MIN_ROUNDS)})
                               for b in (budget, head_budget))
    total_s, train_s, layers_s = cfg["total_s"], cfg["train_s"], cfg["layers_s"]
    if args.budget is not None:   # a user budget: the end-to-end sections may use up to 35% and 15% of it
        total_s, train_s, layers_s = args.budget, 0.35 * args.budget, 0.15 * args.budget

    head_cases = headline.cases(size, args.ops)
    head_ids = {c.id for c in head_cases}
    size_cases = [] if args.headline_only else C.cases(size, args.ops)
    known = {c.id for c in size_cases}
    case_list = C.ordered(size_cases + [c for c in head_cases if c.id not in known])
    n_blocks = 0 if args.no_blocks else blocks.count(size) + 1
    e2e_items = 0 if args.no_e2e else len(e2e.METHODS) + 2 + len(e2e.LAYER_MAPS)
    n_targets = 0 if args.no_targets or cfg["targets_s"] == 0 else targets.count(device)
    progress = Progress(len(case_list) + n_blocks + e2e_items + n_targets)
    started = datetime.datetime.now()
    t0 = time.perf_counter()
    info = machine.info(device)
    info["threads_note"] = threads_note
    res = {"schema": 2, "date": started.strftime("%Y-%m-%d %H:%M"), "size": size, "device": str(device),
           "ops": list(args.ops), "machine": info, "peers": peers.install_status(),
           "command": os.environ.get("OPT_FAST_BENCH_COMMAND") or " ".join(["python bench/report.py"] + sys.argv[1:]),
           # a report bench/readme.py may publish: every op, every section, not the smoke size
           "complete": (size != "smoke" and set(args.ops) == set(C.OPS)
                        and not (args.no_blocks or args.no_e2e or args.no_targets)),
           "budget": {"case": budget.__dict__, "headline": head_budget.__dict__, "total_s": total_s,
                      "train_s": train_s, "layers_s": layers_s}}

    def deadline(seconds):
        return None if seconds is None else time.perf_counter() + seconds
    head = runner.run_cases(head_cases, device, head_budget, progress)
    res["headline_s"] = time.perf_counter() - t0
    if not args.no_blocks:
        res["blocks"] = blocks.block_layer_times(size, device, progress=progress.step)
        progress.step("block maps and memory")
        res["block_maps"] = block_maps.map_times(size, device)
        res["block_memory"] = block_maps.memory(size, device)
    if not args.no_e2e:
        res["e2e"] = e2e.train_step_times(E2E_BATCH[size], device, steps=cfg["train_steps"],
                                          progress=progress.step, deadline=deadline(train_s))
        name, layer_set = LAYER_SETS[size]
        res["layer_set"] = e2e.layer_set_times(layer_set, device, steps=cfg["layer_steps"],
                                               progress=progress.step, deadline=deadline(layers_s))
        res["layer_set"]["name"] = name
    if n_targets:
        res["targets"] = targets.run_targets(device, progress=progress.step, seconds=cfg["target_s"],
                                             deadline=deadline(cfg["targets_s"]))
    res["records"] = runner.run_cases(case_list, device, budget, progress,
                                      deadline=None if total_s is None else t0 + total_s,
                                      done={r["id"]: r for r in head if r["id"] in head_ids})
    progress.close()
    res["wall_s"] = time.perf_counter() - t0
    res["machine"]["load_average_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    res["headline_unmeasured"] = headline.unmeasured(res["records"], size, args.ops)
    return res


# ---- output -----------------------------------------------------------------------------------------

def print_report(res: dict, paths: dict) -> None:
    m = res["machine"]
    print(f"\nopt_fast benchmark report ({res['size']}) on {m['device_slug']}: {m['gpu'] or m['cpu']}, "
          f"{m['torch_threads']} thread(s) ({m['threads_note']}), torch {m['torch']}, git {str(m['git_sha'])[:10]}")
    print(f"peers: {peers.versions_line(res['peers'])}")
    print("Measured on this machine, in this run. Speed-up = the alternative's time / opt_fast's.\n")
    print(tables.text_table(headline.HEADER, [[c.replace("**", "") for c in r] for r in
                                              headline.table_rows(res["records"], res["size"], res["ops"])],
                            "lllllllll"))
    if res.get("blocks"):
        print("\nBlock-orthogonal layers (fwd+bwd of one layer):")
        print(tables.text_table(blocks.HEADER, blocks.table_rows(res["blocks"]), "llrrrl"))
        print(tables.text_table(block_maps.MAP_HEADER, block_maps.map_rows(res["block_maps"]), "lrrrr"))
        if res.get("block_memory"):
            print(tables.text_table(block_maps.MEM_HEADER, block_maps.memory_rows(res["block_memory"]), "llrrr"))
        print(tables.text_table(block_maps.TARGET_HEADER, block_maps.targets(res), "lrl"))
    if res.get("targets"):
        print(f"\nIssue targets on {res['device']} (interleaved medians, one run):")
        print(tables.text_table(targets.HEADER, targets.rows(res["targets"]), "lllrrlrr"))
    if "e2e" in res:
        e = res["e2e"]
        print(f"\nCNN-6 training step (fwd+bwd+optimizer), batch {e['batch']}: "
              + ("" if e["status"] == "ok" else e["status"]))
        if e["status"] == "ok":
            print(tables.text_table(tables.E2E_HEADER, tables.e2e_rows(e), "lrrrrl"))
    print(f"\nwall time {fmt_duration(res['wall_s'])} (headline {fmt_duration(res['headline_s'])}); wrote:")
    for p in paths.values():
        print(f"  {p}")
    for line in res["headline_unmeasured"]:
        print(f"headline cell not measured: {line}")


def write(res: dict, out_dir: str) -> dict:
    os.makedirs(out_dir, exist_ok=True)
    stem = f"{res['machine']['device_slug']}-{res['date'].replace(' ', '_').replace(':', '')}"
    paths = {"json": os.path.join(out_dir, stem + ".json"), "md": os.path.join(out_dir, stem + ".md"),
             "headline": os.path.join(out_dir, stem + "-headline.md")}
    plot_paths = plots.make_plots(res, out_dir, stem)
    res["plots"] = plot_paths
    with open(paths["json"], "w") as f:
        json.dump(res, f, indent=1, default=str)
    with open(paths["md"], "w") as f:
        f.write(markdown.report(res, plot_paths, out_dir))
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(paths["headline"], "w") as f:   # links relative to the repository root, where README is
        f.write(markdown.headline_snippet(res, os.path.relpath(os.path.abspath(paths["md"]), root)))
    paths.update({k: v for k, v in plot_paths.items() if v and v.endswith(".png")})
    return paths


def extension_problem():
    """Why this run would time opt_fast's reference kernels instead of its C++ extension, or None. report.py
    imports the opt_fast of this checkout (not an installed copy), so after a non-editable `pip install .` the
    checkout has no opt_fast/_C*.so and every opt_fast row would time the pure-PyTorch fallback."""
    import opt_fast
    from opt_fast import _backends
    if _backends.ext_error is None or any(map(_backends.env_flag, ("OPT_FAST_DISABLE_EXT", "OPT_FAST_NO_EXT"))):
        return None   # loaded, or the references asked for (`make bench OPT_FAST_NO_EXT=1` builds none)
    where = os.path.dirname(opt_fast.__file__)
    why = (f"it has no {os.path.join(where, '_C*.so')}" if not glob.glob(os.path.join(where, "_C*.so"))
           else f"its opt_fast._C did not load: {_backends.ext_error}")
    return (f"report.py: the opt_fast it imports ({where}) runs without its C++ extension ({why}), so its rows "
            f"would time the reference kernels. Build the extension in this checkout: `make build` (or `pip "
            f"install --no-build-isolation -e .`); or set OPT_FAST_DISABLE_EXT=1 to benchmark the references")


def main(argv=None) -> int:
    args = parse_args(argv)
    problem = extension_problem()
    if problem:
        sys.exit(problem)
    res = run(args)
    paths = write(res, args.out)
    print_report(res, paths)
    return 1 if res["headline_unmeasured"] else 0


if __name__ == "__main__":
    sys.exit(main())
