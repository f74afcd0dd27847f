"""The opt_fast benchmark report: time every op against torch built-ins and peers, then the OPT training
step and a whole network's R computation, and write JSON, markdown and PNG plots.

    python bench/report.py                      # default sizes: ~3 min on a 2-core CPU
    python bench/report.py --full --device cuda # the whole sweep of perf_targets §3.2
    python bench/report.py --out DIR            # where results go (default bench/results)

It does not go through pytest: it has its own timing loop (bench/timers.py: warm-up, then the median over
rounds, CUDA-synchronised), over the same cases as the pytest suites (bench/cases.py). See bench/README.md.
"""
import argparse
import datetime
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from bench import cases as C  # noqa: E402
from bench import e2e, machine, plots, runner, tables, targets  # noqa: E402
from bench.progress import Progress, fmt_duration  # noqa: E402
from bench.shapes import E2E_BATCH, LAYER_SETS, SIZES  # noqa: E402
from bench.timers import Budget  # noqa: E402

# Per size: the per-case timing budget, the timed steps of the end-to-end sections, and (default size) caps
# on wall time so the whole run stays within a few minutes on a loaded 2-core machine. The end-to-end
# sections run first, each capped (train_s, layers_s); the op cases then get what is left of total_s. Cases
# left when time is up are reported as "skipped: time budget" (smallest shapes of every op run first).
BUDGETS = {
    "smoke": dict(case=Budget(case_s=0.02, min_rounds=2, max_rounds=5), total_s=None, train_s=None,
                  layers_s=None, train_steps=1, layer_steps=1, target_s=0.0, targets_s=0.0),
    "default": dict(case=Budget(case_s=0.08, min_rounds=5, max_rounds=30, max_case_s=1.0, slow_call_s=2.0),
                    total_s=150.0, train_s=90.0, layers_s=15.0, train_steps=5, layer_steps=2,
                    target_s=2.0, targets_s=40.0),
    "full": dict(case=Budget(case_s=0.2, min_rounds=10, max_rounds=100, max_case_s=3.0, slow_call_s=10.0),
                 total_s=None, train_s=None, layers_s=None, train_steps=5, layer_steps=5,
                 target_s=10.0, targets_s=None),
}
CUDA_MIN_ROUNDS = 50   # perf_targets §3.1: median of ≥ 50 runs on a GPU


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--full", action="store_true", help="the whole sweep of perf_targets §3.2 (meant for a GPU)")
    p.add_argument("--size", choices=SIZES, help="shape set (overrides --full): smoke, default or full")
    p.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda if available, else cpu")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"),
                   help="output folder (default: bench/results)")
    p.add_argument("--ops", nargs="+", choices=C.OPS, default=list(C.OPS), help="ops to benchmark")
    p.add_argument("--no-e2e", action="store_true", help="skip the training-step and layer-set sections")
    p.add_argument("--no-targets", action="store_true", help="skip the issues' acceptance ratios")
    p.add_argument("--budget", type=float, help="wall-time cap in seconds for the whole run (cases left "
                   "when it runs out are marked skipped); default: none, or ~4 min for the default size")
    p.add_argument("--threads", type=int, help="torch.set_num_threads. Default on CPU: torch's choice, or 1 "
                   "when the load average is at least the number of cores (a busy shared machine: torch's "
                   "OpenMP regions then cost a scheduler tick each)")
    p.add_argument("--matmul-precision", choices=("highest", "high", "medium"),
                   help="torch.set_float32_matmul_precision (default: highest, i.e. no TF32)")
    return p.parse_args(argv)


def resolve_device(name):
    if name == "cuda" and not torch.cuda.is_available():
        sys.exit("report.py: --device cuda, but torch.cuda.is_available() is False")
    return torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))


def pick_threads(requested, device) -> str:
    if requested:
        torch.set_num_threads(requested)
        return "set by --threads"
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    cores = os.cpu_count() or 1
    if device.type == "cpu" and load >= cores and torch.get_num_threads() > 1:
        torch.set_num_threads(1)
        return f"auto: 1 thread, the machine is busy (load average {load:.1f} on {cores} cores; --threads N overrides)"
    return "torch default"


def run(args) -> dict:
    size = args.size or ("full" if args.full else "default")
    device = resolve_device(args.device)
    threads_note = pick_threads(args.threads, device)
    if args.matmul_precision:
        torch.set_float32_matmul_precision(args.matmul_precision)
    cfg = dict(BUDGETS[size])
    budget = cfg["case"]
    if device.type == "cuda":
        budget = Budget(**{**budget.__dict__, "min_rounds": max(budget.min_rounds, CUDA_MIN_ROUNDS),
                           "max_rounds": max(budget.max_rounds, CUDA_MIN_ROUNDS)})
    total_s, train_s, layers_s = cfg["total_s"], cfg["train_s"], cfg["layers_s"]
    if args.budget:   # a user budget: the end-to-end sections may use up to 35% and 15% of it
        total_s, train_s, layers_s = args.budget, 0.35 * args.budget, 0.15 * args.budget

    case_list = C.cases(size, args.ops)
    e2e_items = 0 if args.no_e2e else len(e2e.METHODS) + 2 + len(e2e.LAYER_MAPS)
    n_targets = 0 if args.no_targets or cfg["targets_s"] == 0 else targets.count(device)
    progress = Progress(len(case_list) + e2e_items + n_targets)
    started = datetime.datetime.now()
    t0 = time.perf_counter()
    info = machine.info(device)
    info["threads_note"] = threads_note
    res = {"schema": 1, "date": started.strftime("%Y-%m-%d %H:%M"), "size": size, "device": str(device),
           "machine": info,
           "budget": {"case": budget.__dict__, "total_s": total_s, "train_s": train_s, "layers_s": layers_s}}

    def deadline(seconds):
        return None if seconds is None else time.perf_counter() + seconds
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
                                      deadline=None if total_s is None else t0 + total_s)
    progress.close()
    res["wall_s"] = time.perf_counter() - t0
    res["machine"]["load_average_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    return res


# ---- output -----------------------------------------------------------------------------------------

def print_report(res: dict, paths: dict) -> None:
    m = res["machine"]
    print(f"\nopt_fast benchmark report ({res['size']}) on {m['device_slug']}: {m['gpu'] or m['cpu']}, "
          f"{m['torch_threads']} thread(s) ({m['threads_note']}), torch {m['torch']}, triton {m['triton']}, "
          f"git {str(m['git_sha'])[:10]}")
    print("Measured on this machine, in this run. t/t_bmm = time / one same-size torch.bmm; speed-up = time of "
          "the best torch built-in that meets the accuracy gate / opt_fast's time.\n")
    print(tables.text_table(tables.SUMMARY_HEADER, tables.summary_rows(res["records"]), "lllrrrlrrrl"))
    print(f"\n{tables.ACCURACY_NOTE}")
    if res.get("targets"):
        print(f"\nIssue targets on {res['device']} (interleaved medians, one run):")
        print(tables.text_table(targets.HEADER, targets.rows(res["targets"]), "lllrrlrr"))
    if "e2e" in res:
        e = res["e2e"]
        print(f"\nCNN-6 training step (fwd+bwd+optimizer), batch {e['batch']}: "
              + ("" if e["status"] == "ok" else e["status"]))
        if e["status"] == "ok":
            print(tables.text_table(tables.E2E_HEADER, tables.e2e_rows(e), "lrrrrl"))
        ls = res["layer_set"]
        print(f"\n{ls['name']} {ls['layer_set']}: R = map(P) fwd+bwd, {ls['dtype']}, "
              f"Σ t_bmm = {ls['t_bmm_s'] * 1e3:.2f} ms")
        print(tables.text_table(tables.LAYER_HEADER, tables.layer_rows(ls), "lrr"))
    print(f"\nwall time {fmt_duration(res['wall_s'])}; wrote:")
    for p in paths.values():
        print(f"  {p}")


def _load(v) -> str:
    return " / ".join(f"{x:.1f}" for x in v) if v else "?"


def markdown(res: dict, plot_paths: dict, out_dir: str) -> str:
    m = res["machine"]
    L = [f"# opt_fast benchmark report: {m['device_slug']}, {res['date']}", "",
         "**These numbers were measured on this machine, in this run** "
         f"({'GPU ' + m['gpu'] if m['gpu'] else 'CPU ' + m['cpu']}, {m['torch_threads']} torch thread(s), "
         f"load average (1/5/15 min) {_load(m.get('load_average'))} at start, {_load(m.get('load_average_end'))} "
         "at end). "
         "Absolute times from a shared CPU are noisy; the ratios to a same-size `torch.bmm` measured in the "
         "same run (t/t_bmm) and to the best torch built-in are the portable numbers.", "",
         tables.md_table(["item", "value"], [
             ["size", res["size"]], ["device", res["device"]], ["cpu", m["cpu"]], ["gpu", m["gpu"] or "–"],
             ["cpu count / torch threads", f"{m['cpu_count']} / {m['torch_threads']} ({m['threads_note']})"],
             ["python / torch / triton", f"{m['python']} / {m['torch']} / {m['triton']}"],
             ["git", f"{m['git_sha']}{' (uncommitted changes)' if m['git_dirty'] else ''}"],
             ["float32 matmul precision", m["float32_matmul_precision"]],
             ["Triton float32 dot precision", {"ieee": "ieee (plain float32 FMA, no tensor cores)",
                                              "tf32x3": "tf32x3 (three TF32 tensor-core passes)"}.get(
                 m.get("triton_f32_precision"), m.get("triton_f32_precision") or "–")],
             ["kernels", ", ".join(f"{k}: {v}" for k, v in m["kernels"][res['device'].split(':')[0]].items()
                                   if not k.endswith("_backward"))],
             ["wall time", f"{res['wall_s']:.0f} s"]]), "",
         "## Summary: opt_fast against the best torch built-in", "",
         "t/t_bmm: time / one same-size `torch.bmm` (b×d×d @ b×d×d, same dtype). Speed-up: time of the "
         "fastest torch built-in whose accuracy meets the gate (‖RᵀR−I‖_F/√d ≤ 1e-5 in float32, 1e-12 in "
         "float64; if none does, the fastest that ran, flagged) / opt_fast's time. " + tables.ACCURACY_NOTE
         + ".", "",
         tables.md_table(tables.SUMMARY_HEADER, tables.summary_rows(res["records"])), ""]
    if res.get("targets"):
        L += ["## Issue targets", "",
              "The ratios the issues state, at their exact shapes, each timed in this run with both sides "
              "interleaved (one call of each per round, medians). Accuracy where the issue states one.", "",
              tables.md_table(targets.HEADER, targets.rows(res["targets"])), ""]
    if "e2e" in res:
        e = res["e2e"]
        L += ["## End to end", "", f"### CNN-6 training step (forward + backward + optimizer step), batch {e['batch']}",
              "", "OPT layers from `opt_fast.nn.convert(model, method=m)` (`score` left plain); ogd trains R with "
              "`opt_fast.optim.CayleySGD`. Ratio = OPT step / plain step of the same network, both measured in "
              "this run on this machine (every network warmed up, then interleaved rounds of one step each; medians). Targets: ≤ 1.3× "
              "for gram_schmidt, householder, cayley; ≤ 1.6× for lowdin.", ""]
        L += [tables.md_table(tables.E2E_HEADER, tables.e2e_rows(e)) if e["status"] == "ok" else f"*{e['status']}*", ""]
        ls = res["layer_set"]
        L += [f"### {ls['name']}: R computation", "",
              f"Layer set {ls['layer_set']} ({{d: layers}}), {ls['dtype']}: R = map(P) forward + backward, one "
              f"batched op call per d-group; Σ t_bmm = {ls['t_bmm_s'] * 1e3:.2f} ms (one bmm per d-group).", "",
              tables.md_table(tables.LAYER_HEADER, tables.layer_rows(ls)), ""]
    imgs = [p for p in plot_paths.values() if p and p.endswith(".png")]
    if imgs:
        L += ["## Plots", ""] + [f"![{os.path.basename(p)}]({os.path.relpath(p, out_dir)})" for p in imgs] + [""]
    L += ["## Every implementation, per benchmark group", "",
          "kind: opt_fast = `torch.ops.opt_fast` (fwd+bwd through its registered backward op); reference = "
          "`opt_fast.reference.<op>_ref` called directly (fwd+bwd = autograd through its torch ops); compiled = "
          "that reference under `torch.compile`; torch = built-ins; peer = third-party packages; context = a "
          "different map. µs: median (20th–80th percentile) per call. err vs fp64 ref: ‖out − ref‖_F/‖ref‖_F "
          "against opt_fast's reference run in float64 (only for impls computing the same map).", ""]
    for group, recs in tables.groups(res["records"]).items():
        L += [f"### {group}", "", tables.md_table(tables.DETAIL_HEADER, tables.detail_rows(recs)), ""]
    return "\n".join(L)


def write(res: dict, out_dir: str) -> dict:
    os.makedirs(out_dir, exist_ok=True)
    stem = f"{res['machine']['device_slug']}-{res['date'].replace(' ', '_').replace(':', '')}"
    paths = {"json": os.path.join(out_dir, stem + ".json"), "md": os.path.join(out_dir, stem + ".md")}
    plot_paths = plots.make_plots(res, out_dir, stem)
    res["plots"] = plot_paths
    with open(paths["json"], "w") as f:
        json.dump(res, f, indent=1, default=str)
    with open(paths["md"], "w") as f:
        f.write(markdown(res, plot_paths, out_dir))
    paths.update({k: v for k, v in plot_paths.items() if v and v.endswith(".png")})
    return paths


def main(argv=None) -> int:
    args = parse_args(argv)
    res = run(args)
    paths = write(res, args.out)
    print_report(res, paths)
    return 0


if __name__ == "__main__":
    sys.exit(main())
