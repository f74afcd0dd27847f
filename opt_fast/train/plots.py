"""Matplotlib (Agg) plots of a run and of a comparison."""
import os


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_run(metrics, out):
    plt = _plt()
    h = metrics["history"]
    ep = [r["epoch"] for r in h]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(ep, [r["train_acc"] for r in h], label="train", marker=".")   # (a 1-epoch run is one point)
    ax.plot(ep, [r["test_acc"] for r in h], label="test", marker=".")
    ax.set(xlabel="epoch", ylabel="accuracy", title=f"{metrics['model']} / {metrics['method']} / {metrics['dataset']}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(out, "accuracy.png"), dpi=100)
    plt.close(fig)
    if metrics["energy0"]:
        fig, ax = plt.subplots(figsize=(5, 3.5))
        for name in metrics["energy0"]:
            ax.plot([0] + ep, [0.0] + [r["energy_drift"][name] for r in h], label=name)
        ax.set(xlabel="epoch", ylabel="|E - E0| / E0 (s=1)", title=f"hyperspherical energy drift ({metrics['method']})")
        if any(r["energy_drift"][n] > 0 for r in h for n in r["energy_drift"]):
            ax.set_yscale("symlog", linthresh=1e-8)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(os.path.join(out, "energy.png"), dpi=100)
        plt.close(fig)


def plot_compare(results, out):
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    for m, met in results.items():
        h = met["history"]
        ax.plot([r["epoch"] for r in h], [r["test_acc"] for r in h], label=m, marker=".")
    ax.set(xlabel="epoch", ylabel="test accuracy", title="method comparison (same seed and budget)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = os.path.join(out, "compare.png")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
