"""The report's PNG plots, each written atomically."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from eval.ablation import plot_ablation
from eval.data import SLICES
from eval.scoring import N_POP_BUCKETS
from llmrec.io import atomic_path


def savefig(fig, path: Path) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    return path


def plot_recall_curves(report: dict, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(SLICES), figsize=(5 * len(SLICES), 4), squeeze=False)
    for ax, name in zip(axes[0], SLICES):
        ax.set_title(f"{name} slice")
        ax.set_xlabel("K")
        ax.set_ylabel("recall@K")
        rows = report["results"][name]
        if report["split"]["slices"][name]["empty"]:
            ax.text(0.5, 0.5, "empty slice", ha="center", va="center", transform=ax.transAxes)
            continue
        for model, r in rows.items():
            ax.plot(report["ks"], [r[f"recall@{k}"] for k in report["ks"]], marker="o", label=model)
        ax.legend(fontsize=7)
    fig.suptitle(f"{report['dataset']}: recall@K", y=1.03)  # above the per-slice titles
    path = savefig(fig, path)
    plt.close(fig)
    return path


def plot_popularity_recall(report: dict, path: Path) -> Path:
    import matplotlib.pyplot as plt

    rows = report["results"]["all"]
    fig, ax = plt.subplots(figsize=(8, 4))
    models = [m for m, r in rows.items() if not r.get("empty")]
    width = 0.8 / max(len(models), 1)
    for i, model in enumerate(models):
        vals = [rows[model].get(f"recall@20_pop{b}", np.nan) for b in range(N_POP_BUCKETS)]
        ax.bar(np.arange(N_POP_BUCKETS) + i * width, np.nan_to_num(vals), width, label=model)
    ax.set_xticks(np.arange(N_POP_BUCKETS) + 0.4 - width / 2)
    ax.set_xticklabels([f"bucket {b}" + (" (least)" if b == 0 else " (most)" if b == N_POP_BUCKETS - 1 else "")
                        for b in range(N_POP_BUCKETS)])
    ax.set_ylabel("recall@20 (micro)")
    ax.set_title("recall@20 by training popularity of the relevant item (all slice)")
    ax.legend(fontsize=7, ncol=2)
    path = savefig(fig, path)
    plt.close(fig)
    return path


def plot_cold_start(report: dict, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    if report["split"]["slices"]["cold"]["empty"]:
        ax.text(0.5, 0.5, "cold slice empty: no test plays of cold items", ha="center", va="center",
                transform=ax.transAxes)
    else:
        rows = report["results"]["cold"]
        ax.bar(list(rows), [r["recall@20"] for r in rows.values()], color="tab:blue", label="recall@20")
        ax.bar(list(rows), [r["ndcg@20"] for r in rows.values()], color="tab:orange", width=0.4, label="ndcg@20")
        ax.tick_params(axis="x", rotation=30)
        ax.legend()
    ax.set_title("cold-start: ranking among cold items only")
    path = savefig(fig, path)
    plt.close(fig)
    return path


def write_plots(directory: Path, report: dict) -> list[Path]:
    """The PNG plots of `report` in `directory` (the ablation's when it has one); returns their paths."""
    import matplotlib

    matplotlib.use("Agg")  # headless: no display on servers and CI
    plots = [plot_recall_curves(report, directory / "recall_at_k.png"),
             plot_popularity_recall(report, directory / "recall_by_popularity.png"),
             plot_cold_start(report, directory / "cold_start.png")]
    if report.get("ablation", {}).get("accuracy"):
        plot_ablation(report["ablation"], directory / "ablation.png", savefig)
        plots.append(directory / "ablation.png")
    return plots
