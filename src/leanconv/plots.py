"""Plots of a ``leanconv compare`` study (matplotlib, Agg canvas: no display needed).

:func:`pareto_plot` draws the picture of SCConv Fig. 4/6 and CompConv Fig. 4: test top-1 against
MACs (left) and against measured inference latency relative to vanilla (right), one point per
conv type with its seed standard deviation as an error bar.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["pareto_plot"]


def pareto_plot(results: dict, path: str | Path) -> Path:
    """Write the two-panel accuracy/complexity plot of ``results`` (``results.json``) to ``path``.

    Conv types without an accuracy (failed or not trained) are left out. Raises ImportError when
    matplotlib is not installed (``pip install 'leanconv[plot]'``).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = [r for r in results["rows"] if r.get("top1_mean") is not None]
    batches = results["config"]["batches"]
    fig = Figure(figsize=(11, 4.6), layout="constrained")
    FigureCanvasAgg(fig)
    ax_mac, ax_lat = fig.subplots(1, 2, sharey=True)
    markers = ["o", "s", "^", "D", "v", "P", "X", "*", "h", "<", ">"]
    colors = [f"C{i}" for i in range(10)]

    for i, row in enumerate(rows):
        color, marker = colors[i % len(colors)], markers[i % len(markers)]
        y = 100 * row["top1_mean"]
        err = 100 * row["top1_std"] if row.get("top1_std") is not None else None
        if row.get("macs"):
            ax_mac.errorbar(row["macs"] / 1e6, y, yerr=err, fmt=marker, color=color, ms=8,
                            capsize=3, label=row["conv"])
            ax_mac.annotate(row["conv"], (row["macs"] / 1e6, y), textcoords="offset points",
                            xytext=(6, 4), fontsize=8)
        ratios = [row.get(f"latency_b{b}_ratio") for b in batches]
        known = [r for r in ratios if r is not None]
        if len(known) > 1:  # one conv's batch sizes joined by a thin line
            ax_lat.plot(known, [y] * len(known), color=color, lw=0.8, alpha=0.6)
        for j, b in enumerate(batches):
            ratio = ratios[j]
            if ratio is None:
                continue
            ax_lat.errorbar(ratio, y, yerr=err, fmt=marker, color=color, ms=8, capsize=3,
                            mfc=color if j == len(batches) - 1 else "none",
                            label=f"{row['conv']} b{b}")
            if j == len(batches) - 1:
                ax_lat.annotate(row["conv"], (ratio, y), textcoords="offset points",
                                xytext=(6, 4), fontsize=8)

    c = results["config"]
    ax_mac.set_xlabel("MACs per image (M)")
    ax_mac.set_ylabel("test top-1 (%)")
    ax_mac.set_title("accuracy vs MACs")
    ax_mac.grid(alpha=0.3)
    ax_lat.axvline(1.0, color="grey", lw=0.8, ls="--")
    ax_lat.set_xlabel("inference latency / vanilla ("
                      + ", ".join(f"b{b}" for b in batches)
                      + "; filled = largest batch)")
    ax_lat.set_title(f"accuracy vs measured latency ({c['threads']} thread(s), {c['device']})")
    ax_lat.grid(alpha=0.3)
    fig.suptitle(results.get("title", "leanconv compare"))
    if rows:
        ax_mac.legend(fontsize=8, loc="lower right")
    path = Path(path)
    fig.savefig(path, dpi=110)
    return path
