"""Figures: one helper saves them all into ``reports/figures/``."""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from vslib.paths import FIGURES_DIR

GOOD, BAD = "#1a9850", "#d73027"


def _plt():
    import matplotlib

    if matplotlib.get_backend().lower() not in ("module://matplotlib_inline.backend_inline", "nbagg", "widget"):
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_fig(fig, save_as: str | Path, *, dpi: int = 110) -> Path:
    """Save ``fig`` as PNG; a bare name goes into ``reports/figures/``."""
    path = Path(save_as)
    if not path.suffix:
        path = path.with_suffix(".png")
    if len(path.parts) == 1:
        path = FIGURES_DIR / path
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, bbox_inches="tight")
    return path


def precision_curve(results: dict, ks: Sequence[int], *, save_as: Optional[str | Path] = None):
    """precision@k against k, one line per mode."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for mode, m in results["modes"].items():
        ys = [m[f"p@{k}"] for k in ks]
        ax.plot(ks, ys, marker="o", label=mode, linestyle="--" if mode == "oracle" else "-")
    ax.set_xlabel("k")
    ax.set_ylabel("precision@k")
    ax.set_xticks(list(ks))
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.set_title(f"{results['dataset']} · {results['backbone']} · {results['n_query']} queries", fontsize=10)
    ax.legend(fontsize=8)
    if save_as:
        save_fig(fig, save_as)
    return fig


def _draw_thumbnail(ax, path, size: int, caption: str = "", edge: str = "black") -> None:
    """A thumbnail in ``ax`` with a coloured frame; an unreadable image says so instead of failing."""
    from vslib.images import ImageError, thumbnail

    try:
        ax.imshow(np.asarray(thumbnail(path, size)))
    except ImageError:
        ax.text(0.5, 0.5, "unreadable", ha="center", va="center", fontsize=7)
    ax.set_xticks([]), ax.set_yticks([])
    for s in ax.spines.values():
        s.set_edgecolor(edge)
        s.set_linewidth(3 if edge != "black" else 1)
    if caption:
        ax.set_title(caption, fontsize=6)


def sample_grid(paths_by_label: dict, *, per_class: int = 6, thumb: int = 96,
                save_as: Optional[str | Path] = None):
    """One row per class: its first ``per_class`` images, the label on the left."""
    plt = _plt()
    labels = list(paths_by_label)
    fig, axes = plt.subplots(len(labels), per_class, figsize=(1.3 * per_class, 1.3 * len(labels)), squeeze=False)
    for row, label in zip(axes, labels):
        paths = list(paths_by_label[label])[:per_class]
        for j, ax in enumerate(row):
            if j < len(paths):
                _draw_thumbnail(ax, paths[j], thumb)
            else:
                ax.axis("off")
        row[0].set_ylabel(_short(str(label), 14), fontsize=7)
    fig.tight_layout()
    if save_as:
        save_fig(fig, save_as)
    return fig


def result_grid(query_paths: Sequence[str], query_labels: Sequence[str], hits: Sequence[Sequence[dict]], *,
                k: int = 8, title: str = "", thumb: int = 96, save_as: Optional[str | Path] = None):
    """One row per query: the query, then its top-k hits framed green (same label) or red."""
    plt = _plt()
    n = len(query_paths)
    k = min(k, max((len(h) for h in hits), default=0)) or 1
    fig, axes = plt.subplots(n, k + 1, figsize=(1.25 * (k + 1), 1.45 * n + 0.4), squeeze=False)
    for r in range(n):
        _draw_thumbnail(axes[r, 0], query_paths[r], thumb, f"query\n{_short(query_labels[r])}")
        for c in range(k):
            ax = axes[r, c + 1]
            if c < len(hits[r]):
                h = hits[r][c]
                _draw_thumbnail(ax, h["path"], thumb, f"{_short(h['label'])}\n{h['score']:.3f}",
                                GOOD if h["label"] == query_labels[r] else BAD)
            else:
                ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    if save_as:
        save_fig(fig, save_as)
    return fig


def _short(label: str, n: int = 18) -> str:
    return label if len(label) <= n else "…" + label[-(n - 1):]


def embedding_map(vectors: np.ndarray, labels: Sequence[str], paths: Optional[Sequence[str]] = None, *,
                  n_thumbnails: int = 40, seed: int = 42, title: str = "", save_as: Optional[str | Path] = None):
    """A UMAP map of the embedding space coloured by class, with image thumbnails at a sample of points."""
    import umap
    from matplotlib.offsetbox import AnnotationBbox, OffsetImage

    from vslib.images import ImageError, thumbnail

    plt = _plt()
    xy = umap.UMAP(n_neighbors=15, min_dist=0.1, metric="cosine", random_state=seed).fit_transform(vectors)
    labels = np.asarray(labels).astype(str)
    uniq = sorted(set(labels))
    cmap = plt.get_cmap("tab20", max(20, len(uniq)))
    fig, ax = plt.subplots(figsize=(9, 7.5))
    for i, lbl in enumerate(uniq):
        m = labels == lbl
        ax.scatter(xy[m, 0], xy[m, 1], s=9, color=cmap(i % cmap.N), label=lbl, alpha=0.8)
    if paths is not None and n_thumbnails:
        rng = np.random.default_rng(seed)
        for i in rng.choice(len(xy), size=min(n_thumbnails, len(xy)), replace=False):
            try:
                img = OffsetImage(np.asarray(thumbnail(paths[i], 40)), zoom=0.6)
            except ImageError:
                continue
            ax.add_artist(AnnotationBbox(img, xy[i], frameon=False))
    ax.set_xticks([]), ax.set_yticks([])
    if len(uniq) <= 40:
        ax.legend(fontsize=6, markerscale=1.5, bbox_to_anchor=(1.01, 1), loc="upper left", ncol=1 + len(uniq) // 30)
    ax.set_title(title or f"UMAP of {len(xy)} embeddings, coloured by class", fontsize=10)
    if save_as:
        save_fig(fig, save_as)
    return fig, xy
