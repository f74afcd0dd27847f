"""PNG plots for the report (matplotlib, Agg backend; skipped with a note if matplotlib is missing)."""
import os
from typing import Dict, List, Optional

from . import headline


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


# one colour per kind of alternative: torch built-ins, then each peer package (bench.peers.PACKAGES)
COLOURS = {"torch built-in": "tab:grey", "geotorch": "tab:green", "torch parametrizations": "tab:blue",
           "peft": "tab:orange", "torch.optim.Muon": "tab:purple", "torch-householder": "tab:brown"}


def speedup_plot(points: List[Dict], path: str, title: str) -> Optional[str]:
    """The headline at a glance: one bar per (op, shape, mode), opt_fast's speed-up over the best alternative
    (the faster of the best torch built-in and the best peer), coloured by who that alternative is; log
    scale, a line at 1×. A hatched bar: that alternative fails the accuracy gate (nothing that meets it ran)."""
    if not points:
        return None
    plt = _plt()
    from matplotlib.patches import Patch
    from matplotlib.ticker import NullFormatter, ScalarFormatter
    n = len(points)
    fig, ax = plt.subplots(figsize=(11, 0.32 * n + 1.6))
    ys = list(range(n))[::-1]
    vals = [p["speedup"] for p in points if p["speedup"]]
    lo, hi = min(vals + [0.5]), max(vals + [2.0])
    for y, p in zip(ys, points):
        if p["speedup"] is None:
            why = str(p["why"]).removeprefix("n/a: ")
            ax.text(1.0, y, f"  not measured: {why}"[:90], va="center", fontsize=7, color="tab:red")
            continue
        v = p["speedup"]   # the bar runs from 1× to the speed-up: right when faster, left when slower
        ax.barh(y, v - 1.0, left=1.0, color=COLOURS.get(p["who"], "tab:olive"), hatch="" if p["gated"] else "//",
                edgecolor="white" if p["gated"] else "black", linewidth=0.5)
        ax.text(max(v, 1.0), y, f" {v:.2f}× vs {p['name']}"[:60], va="center", fontsize=6.5)
    ax.axvline(1.0, color="black", lw=1)
    ax.set_xscale("log")
    ax.set_xlim(min(lo, 1.0) / 1.5, hi * 12)
    ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_yticks(ys)
    ax.set_yticklabels([p["label"] for p in points], fontsize=7)
    ax.set_ylim(-0.7, n - 0.3)
    ax.set_xlabel("speed-up of opt_fast over the best alternative (log scale; > 1: opt_fast is faster)")
    used = [w for w in COLOURS if any(p.get("who") == w for p in points)]
    handles = [Patch(color=COLOURS[w], label=w) for w in used]
    if any(p.get("gated") is False for p in points):
        handles.append(Patch(facecolor="white", edgecolor="black", hatch="//", label="fails the accuracy gate"))
    ax.legend(handles=handles, title="the best alternative", fontsize=7, title_fontsize=7,
              loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.set_title(title, fontsize=9)
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
        points = headline.speedup_points(results["records"], results["size"], results["ops"])
        p = speedup_plot(points, os.path.join(out_dir, f"{stem}-speedup.png"), title)
        made["speedup"] = p or "no data"
        p = e2e_plot(results.get("e2e", {}), results.get("layer_set", {}),
                     os.path.join(out_dir, f"{stem}-e2e.png"), title)
        made["e2e"] = p or "no data"
    except ImportError as e:
        made["error"] = f"matplotlib not available ({e})"
    return made
