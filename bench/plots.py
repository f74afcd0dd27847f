"""PNG plots for the report (matplotlib, Agg backend; skipped with a note if matplotlib is missing)."""
import os
from typing import Dict, List, Optional

from . import cases as C


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def speedup_plot(records: List[Dict], path: str, title: str) -> Optional[str]:
    """Per op: speed-up of opt_fast over the best torch built-in vs d (float32), fwd and fwd+bwd."""
    plt = _plt()
    from matplotlib.ticker import NullFormatter, ScalarFormatter
    ops = [op for op in C.OPS if any(r["op"] == op for r in records)]
    if not ops:
        return None
    cols = 3
    rows = (len(ops) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.6 * rows), squeeze=False)
    for ax, op in zip(axes.flat, ops):
        for mode, style in (("fwd", "o-"), ("fwd+bwd", "s--")):
            pts = sorted((r["d"], r["speedup"], r["batch"]) for r in records
                         if r["op"] == op and r["impl"] == "opt_fast" and r["mode"] == mode
                         and r["dtype"] == "float32" and r.get("speedup") and r.get("k") == r["d"]
                         and r.get("norm") is None)
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=f"opt_fast {mode}")
                for d, s, b in pts:
                    if b > 1:
                        ax.annotate(f"b={b}", (d, s), fontsize=7, textcoords="offset points", xytext=(3, 3))
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set_xscale("log")
        ax.set_yscale("log")
        for axis in (ax.xaxis, ax.yaxis):
            axis.set_major_formatter(ScalarFormatter())
            axis.set_minor_formatter(NullFormatter())
        ax.set_title(op, fontsize=10)
        ax.set_xlabel("d")
        ax.set_ylabel("speed-up over best torch built-in")
        if ax.get_lines()[1:]:
            ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(ops):]:
        ax.axis("off")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def e2e_plot(e2e: Dict, layer_set: Dict, path: str, title: str) -> Optional[str]:
    """OPT step / plain step per method (with targets), and the layer set's R cost / Σ t_bmm."""
    ms = [(m, e) for m, e in e2e.get("methods", {}).items() if e.get("ratio")]
    ls = [(m, e) for m, e in layer_set.get("methods", {}).items() if e.get("ratio_bmm")]
    if not ms and not ls:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8), squeeze=False)
    ax = axes[0][0]
    if ms:
        ax.bar([m for m, _ in ms], [e["ratio"] for _, e in ms],
               color=["tab:green" if e.get("met") else ("tab:red" if e.get("met") is False else "tab:grey")
                      for _, e in ms])
        for i, (_, e) in enumerate(ms):
            if e.get("target"):
                ax.plot([i - 0.4, i + 0.4], [e["target"]] * 2, "k--", lw=1)
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set_ylabel("OPT step / plain step")
        ax.set_title(f"CNN-6 training step, batch {e2e.get('batch')} (dashed: target)", fontsize=9)
        ax.tick_params(axis="x", rotation=30, labelsize=8)
    else:
        ax.text(0.5, 0.5, e2e.get("status", "not run"), ha="center", va="center", wrap=True, fontsize=8)
        ax.axis("off")
    ax = axes[0][1]
    if ls:
        ax.bar([m for m, _ in ls], [e["ratio_bmm"] for _, e in ls], color="tab:blue")
        ax.set_yscale("log")
        ax.set_ylabel("R fwd+bwd / Σ t_bmm")
        ax.set_title(f"layer set {layer_set.get('layer_set')}", fontsize=9)
        ax.tick_params(axis="x", rotation=30, labelsize=8)
    else:
        ax.axis("off")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def make_plots(results: Dict, out_dir: str, stem: str) -> Dict[str, str]:
    """Returns {name: path or reason not made}."""
    made: Dict[str, str] = {}
    title = f"{results['machine']['device_slug']} {results['date']} ({results['size']})"
    try:
        p = speedup_plot(results["records"], os.path.join(out_dir, f"{stem}-speedup.png"), title)
        made["speedup"] = p or "no data"
        p = e2e_plot(results.get("e2e", {}), results.get("layer_set", {}),
                     os.path.join(out_dir, f"{stem}-e2e.png"), title)
        made["e2e"] = p or "no data"
    except ImportError as e:
        made["error"] = f"matplotlib not available ({e})"
    return made
