"""The report's pictures, drawn with matplotlib (Agg: no display): the confusion matrix of a
classification and the recall@K curve of a retrieval."""
from __future__ import annotations

from pathlib import Path

MAX_NAMED = 40          # above this many classes the axes show indices, not names (the JSON has them)


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def confusion_png(result: dict, path) -> Path:
    """The confusion matrix of a classification report, rows (true classes) normalised to sum to 1,
    with every class named on both axes (readable for N24News's 24 classes); written atomically."""
    import numpy as np

    from eclip.atomic import atomic_path
    plt = _pyplot()
    names = result["confusion_matrix"]["classes"]
    counts = np.asarray(result["confusion_matrix"]["counts"], dtype=float)
    rows = counts.sum(1, keepdims=True)
    share = np.divide(counts, rows, out=np.zeros_like(counts), where=rows > 0)
    n = len(names)
    side = min(max(4.5, 0.38 * n + 2.5), 16)             # 24 classes: 11.6 inches, every name readable
    fig, ax = plt.subplots(figsize=(side + 1.2, side))
    image = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    if n <= MAX_NAMED:
        ax.set_xticks(range(n), names, rotation=60, ha="right", fontsize=8 if n > 12 else 10)
        ax.set_yticks(range(n), names, fontsize=8 if n > 12 else 10)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    if n <= 30:
        for i in range(n):
            for j in range(n):
                if share[i, j] >= 0.005:
                    ax.text(j, i, f"{100 * share[i, j]:.0f}", ha="center", va="center", fontsize=7 if n > 12 else 9,
                            color="white" if share[i, j] > 0.5 else "black")
    top5 = result.get("top5")
    ax.set_title(f"{result.get('mode', '')} top-1 {result['top1']:.1f}%"
                 + (f", top-5 {top5:.1f}%" if top5 is not None else "")
                 + f", mean per-class recall {result['mean_per_class_recall']:.1f}%\n(rows: % of each true class)",
                 fontsize=10)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="share of the true class")
    fig.tight_layout()
    return _save(fig, plt, path, atomic_path)


def recall_curve(ranks, n_gallery: int) -> tuple[list, list]:
    """(K values, Recall@K in %) for K = 1 .. n_gallery (at most 200 points, spaced evenly in log K)."""
    import numpy as np
    ranks = np.asarray(ranks)
    ks = np.unique(np.round(np.logspace(0, np.log10(max(n_gallery, 1)), num=min(200, max(n_gallery, 1)))).astype(int))
    return ks.tolist(), [100.0 * float((ranks <= k).mean()) for k in ks]


def recall_png(curves: dict, path, title: str = "") -> Path:
    """Recall@K against K (log scale) for each {name: (ks, recalls)}; written atomically."""
    from eclip.atomic import atomic_path
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for name, (ks, recalls) in curves.items():
        ax.plot(ks, recalls, label=name, drawstyle="steps-post")
    ax.set_xscale("log")
    ax.set_xlabel("K")
    ax.set_ylabel("Recall@K (%)")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    if title:
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return _save(fig, plt, path, atomic_path)


def _save(fig, plt, path, atomic_path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=100, format="png")
    finally:
        plt.close(fig)
    return path
