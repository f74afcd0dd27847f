"""--compare for the LM workflow: the runs one after another with the same seed, data and budget, then
compare.md / compare.json and compare.png (validation loss vs step and vs training wall time).

A run is named ``method`` or ``method+optimizer`` (``none+muon``); tokens/s is relative to the
``none+adamw`` (or ``none``) run of the same comparison, i.e. measured in the same session."""
import dataclasses
import datetime
import json
import os
import shlex
import sys

from ..compare import _machine
from ..guards import run_recorded
from .config import fail
from .loop import train_lm


def _parse(name: str, cfg):
    method, _, optimizer = name.partition("+")
    return method, optimizer or cfg.optimizer


def _load_avg() -> str:
    try:
        return " / ".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def _finished(run):
    """The metrics of a completed run with the same resolved configuration in run.out, else None."""
    path = os.path.join(run.out, "metrics.json")
    try:
        with open(path) as f:
            m = json.load(f)
    except (OSError, ValueError):
        return None
    config = m.get("config")
    if not isinstance(config, dict):
        return None
    same = (_result_keys(config) == _result_keys(run.resolved().to_dict())
            and m.get("steps_done") == config.get("steps"))
    return m if same else None


_NOT_RESULT = ("progress", "threads", "save_every")   # how a run is shown or paced, not what it computes


def _result_keys(config: dict) -> dict:
    return {k: v for k, v in config.items() if k not in _NOT_RESULT}


def _note_load(folder, load):
    path = os.path.join(folder, "metrics.json")
    with open(path) as f:
        m = json.load(f)
    m["load_average"] = load
    with open(path, "w") as f:
        json.dump(m, f, indent=1)


def run_compare(cfg, names, argv=None):
    if not cfg.out:
        fail("--compare needs --out (the folder for the per-run folders and the table)")
    if cfg.resume:
        fail("--compare cannot be combined with --resume")
    if not names:
        fail("--compare: give at least one method")
    from .config import METHODS, validate
    from .optim import OPTIMIZERS
    for name in names:  # every name checked before any run trains
        method, optimizer = _parse(name, cfg)
        if method not in METHODS or optimizer not in OPTIMIZERS:
            fail(f"--compare: unknown run {name!r}; a run is METHOD or METHOD+OPTIMIZER, METHOD one of "
                 f"{', '.join(METHODS)}, OPTIMIZER one of {', '.join(OPTIMIZERS)}")
        validate(dataclasses.replace(cfg, method=method, optimizer=optimizer, out=None).resolved())
    from ..checkpoint import check_out
    check_out(cfg.out)
    results, failed, loads = {}, {}, {}
    start = datetime.datetime.now(datetime.timezone.utc)
    for name in names:
        method, optimizer = _parse(name, cfg)
        print(f"== {name}", flush=True)
        run = dataclasses.replace(cfg, method=method, optimizer=optimizer,
                                  out=os.path.join(cfg.out, name.replace("+", "_")))
        done = _finished(run)
        if done is not None:  # an interrupted comparison restarted: keep the runs it completed
            print(f"   reusing the finished run in {run.out}", flush=True)
            results[name], loads[name] = done, done.get("load_average", ["n/a", "n/a"])
            continue
        loads[name] = [_load_avg()]
        result = run_recorded(name, lambda: train_lm(run), failed)
        if result is not None:
            results[name] = result
        loads[name].append(_load_avg())
        if name in results and int(os.environ.get("RANK", "0")) == 0:
            _note_load(run.out, loads[name])
    if not results:
        fail("--compare: every run failed: " + "; ".join(f"{m}: {v}" for m, v in failed.items()))
    if int(os.environ.get("RANK", "0")) != 0:
        return results
    cmd = "python -m opt_fast.train " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    text = table(results, failed, loads, cmd, start)
    with open(os.path.join(cfg.out, "compare.md"), "w") as f:
        f.write(text)
    with open(os.path.join(cfg.out, "compare.json"), "w") as f:
        json.dump({"command": cmd, "machine": _machine(), "date": start.isoformat(), "failed": failed,
                   "load_average": loads, "results": {m: {k: r[k] for k in (
                       "final_val_loss", "final_val_ppl", "tokens", "train_time", "tokens_per_s", "step_time",
                       "parameters", "trained_parameters", "spectrum", "history")} for m, r in results.items()}},
                  f, indent=1)
    plot(results, os.path.join(cfg.out, "compare.png"))
    print(text)
    return results


def table(results, failed, loads, cmd, start) -> str:
    first = next(iter(results.values()))
    c = first["config"]
    base = results.get("none+adamw") or results.get("none")
    lines = [f"# {'Fine-tuning' if first['finetune'] else 'Pretraining'}: {c['model']} on {c['corpus']}", "",
             "Generated by `opt_fast.train --compare` from the runs' metrics.json files.", "",
             f"* command: `{cmd}`", f"* machine: {_machine()}", f"* date (UTC): {start.strftime('%Y-%m-%d %H:%M')}",
             f"* budget: {c['steps']} steps × {c['batch_size']} × {c['seq_len']} tokens = {first['tokens']:,} tokens "
             f"per run; lr {c['lr']}, OPT lr {c['opt_lr']}, warmup {c['warmup']}, cosine to 10 %, weight decay "
             f"{c['weight_decay']}, clip {c['clip']}, block size {c['block_size']}, sides {c['sides']}, merge every "
             f"{c['merge_every']}, Neumann terms {c['terms']}, seed {c['seed']}", "",
             "| run | val loss | val ppl | Δ loss vs AdamW | trained params | tokens/s | tokens/s vs AdamW | "
             "ms/step | train wall s | spectrum max rel Δ | load avg (start → end) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for m, r in results.items():
        d = (f"{(r['final_val_loss'] / base['final_val_loss'] - 1) * 100:+.2f} %" if base and r is not base else "–")
        rel = f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}×" if base else "–"
        sp = r["spectrum"]["max_rel"]
        lines.append(f"| {m} | {r['final_val_loss']:.4f} | {r['final_val_ppl']:.2f} | {d} | "
                     f"{r['trained_parameters'] / 1e6:.3f} M | {r['tokens_per_s']:,.0f} | {rel} | "
                     f"{r['step_time'] * 1e3:.0f} | {r['train_time']:.0f} | "
                     f"{'–' if sp is None else f'{sp:.1e}'} | {' → '.join(loads[m])} |")
    for m, msg in failed.items():
        lines.append(f"| {m} | failed: {msg.replace('|', '/')} |" + " |" * 10)
    lines += ["", "Δ loss vs AdamW: relative difference of the final validation loss. Spectrum: max over "
              "block layers and singular values of |s_i(W) − s_i(W0)| / s_i(W0), W the merged weight, W0 "
              "the frozen weight of the last merge (float64 svdvals).", "", "Plot: `compare.png`.", ""]
    return "\n".join(lines)


def plot(results, path, title=None):
    from ..plots import _plt
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for m, r in results.items():
        h = r["history"]
        axes[0].plot([x["step"] for x in h], [x["val_loss"] for x in h], label=m, marker=".")
        axes[1].plot([x["train_time"] for x in h], [x["val_loss"] for x in h], label=m, marker=".")
    axes[0].set(xlabel="step", ylabel="validation loss (nats/token)", title=title or "validation loss vs step")
    axes[1].set(xlabel="training wall time (s)", title="validation loss vs wall time")
    lo = min(x["val_loss"] for r in results.values() for x in r["history"])
    hi = sorted(x["val_loss"] for r in results.values() for x in r["history"])
    axes[0].set_ylim(lo - 0.1, min(hi[-1], hi[len(hi) // 2] + 1.5) + 0.1)
    axes[0].legend(fontsize=8)
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
