"""Figures: one helper saves them into ``reports/figures/``, one shows them at a known width.

Every figure is drawn so that, shown at the width the notebooks use
(:data:`SHOWN_WIDTH`, or the ``width`` passed to :func:`show_fig`), no text is
smaller than :data:`MIN_TEXT_PX` screen pixels; :func:`smallest_text_px`
measures it and the tests hold the figures to it.
"""
from __future__ import annotations

import colorsys
import logging
from pathlib import Path
from typing import Mapping, Optional, Sequence

import numpy as np

from vslib.images import ImageError, thumbnail
from vslib.paths import FIGURES_DIR

log = logging.getLogger(__name__)

GOOD, BAD = "#1a9850", "#d73027"
DPI = 110
#: the width (screen pixels) notebooks show a figure at, unless they say otherwise
SHOWN_WIDTH = 900
#: the smallest text a figure may have at the size it is shown
MIN_TEXT_PX = 9.0


def _plt():
    import matplotlib

    if matplotlib.get_backend().lower() not in ("module://matplotlib_inline.backend_inline", "nbagg", "widget"):
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_fig(fig, save_as: str | Path, *, dpi: int = DPI) -> Path:
    """Save ``fig`` as PNG; a bare name goes into ``reports/figures/``."""
    path = Path(save_as)
    if not path.suffix:
        path = path.with_suffix(".png")
    if len(path.parts) == 1:
        path = FIGURES_DIR / path
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, bbox_inches="tight")
    return path


def smallest_text_px(fig, shown_width: int = SHOWN_WIDTH, *, dpi: int = DPI) -> float:
    """The smallest visible text of ``fig`` in screen pixels when its saved PNG is shown ``shown_width`` wide.

    A figure narrower than ``shown_width`` is shown at its own size (browsers do not enlarge it).
    """
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    bbox = fig.get_tightbbox(renderer)
    natural = bbox.width * dpi
    scale = min(1.0, shown_width / natural)
    sizes = [t.get_fontsize() for t in fig.findobj(lambda a: hasattr(a, "get_text") and hasattr(a, "get_fontsize"))
             if t.get_visible() and str(t.get_text()).strip()]
    if not sizes:
        return float("inf")
    return min(sizes) * dpi / 72 * scale


def show_fig(fig, save_as: str | Path, *, width: int = SHOWN_WIDTH, dpi: int = DPI) -> Path:
    """Save ``fig``, show the PNG at most ``width`` pixels wide, and close ``fig`` (shown once, not twice)."""
    from IPython.display import Image, display

    path = save_fig(fig, save_as, dpi=dpi)
    px = smallest_text_px(fig, width, dpi=dpi)
    if px < MIN_TEXT_PX:
        log.warning("%s: its smallest text is %.1f px at %d px wide", path.name, px, width)
    natural = _png_width(path)
    display(Image(filename=str(path), width=min(width, natural)))
    _plt().close(fig)
    return path


def _png_width(path: Path) -> int:
    from PIL import Image

    with Image.open(path) as im:
        return im.width


def distinct_colours(n: int) -> list:
    """``n`` colours far apart: tab10 first, then hues around the circle in three lightness bands."""
    base = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
            "#bcbd22", "#17becf"]
    out = base[:n]
    rest = n - len(out)
    golden = 0.618033988749895
    for i in range(rest):
        h = (0.07 + i * golden) % 1.0
        light, sat = [(0.38, 0.85), (0.55, 0.75), (0.30, 0.55)][i % 3]
        r, g, b = colorsys.hls_to_rgb(h, light, sat)
        out.append((r, g, b))
    return out


MARKERS = ["o", "s", "^", "D", "v", "P", "X"]


def precision_curve(results: dict, ks: Sequence[int], *, save_as: Optional[str | Path] = None):
    """precision@k against k, one line per mode."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    n = len(results["modes"])
    for i, (mode, m) in enumerate(results["modes"].items()):
        ys = [m[f"p@{k}"] for k in ks]
        # each mode its own marker, and the ones drawn first wider: a line lying exactly on another (hierarchical
        # and adaptive often agree) still shows around it
        ax.plot(ks, ys, marker=MARKERS[i % len(MARKERS)], markersize=5 + 2 * (n - i), linewidth=1.2 + 0.9 * (n - 1 - i),
                label="oracle (diagnostic)" if mode == "oracle" else mode, linestyle="--" if mode == "oracle" else "-",
                alpha=0.9)
    ax.set_xlabel("k", fontsize=11)
    ax.set_ylabel("precision@k", fontsize=11)
    ax.tick_params(labelsize=10)
    ax.set_xticks(list(ks))
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.set_title(f"{results['dataset']} · {results['backbone']} · {results['n_query']} queries", fontsize=11)
    ax.legend(fontsize=10)
    if save_as:
        save_fig(fig, save_as)
    return fig


def class_counts(counts, *, title: str = "", save_as: Optional[str | Path] = None):
    """Horizontal stacked bars of images per class (``counts``: a DataFrame with ``index`` and ``query`` columns)."""
    plt = _plt()
    counts = counts.iloc[::-1]  # the largest class on top
    n = len(counts)
    fig, ax = plt.subplots(figsize=(7.5, 0.24 * n + 1.2))
    left = np.zeros(n)
    for col, colour in (("index", "#4575b4"), ("query", "#fdae61")):
        if col in counts:
            ax.barh(range(n), counts[col], left=left, color=colour, label=f"{col} split", height=0.8)
            left += counts[col].to_numpy()
    ax.set_yticks(range(n), [str(x) for x in counts.index], fontsize=10)
    ax.set_xlabel("images", fontsize=11)
    ax.tick_params(axis="x", labelsize=10)
    ax.set_ylim(-0.6, n - 0.4)
    ax.grid(axis="x", alpha=0.3)
    ax.legend(fontsize=10, loc="lower right")
    if title:
        ax.set_title(title, fontsize=12)
    fig.tight_layout()
    if save_as:
        save_fig(fig, save_as)
    return fig


def per_class_bars(per_class, *, k: int, title: str = "", save_as: Optional[str | Path] = None):
    """precision@k of every class (rows) for every mode (grouped bars); ``per_class``: a DataFrame class x mode."""
    plt = _plt()
    per_class = per_class.sort_values(per_class.columns[-1] if "adaptive" not in per_class else "adaptive")
    n, m = per_class.shape
    fig, ax = plt.subplots(figsize=(8, 0.32 * n * max(1, m / 2.5) + 1.3))
    height = 0.8 / m
    colours = distinct_colours(m)
    for j, mode in enumerate(per_class.columns):
        ax.barh(np.arange(n) + (j - (m - 1) / 2) * height, per_class[mode], height=height, label=mode,
                color=colours[j])
    ax.set_yticks(range(n), [str(x) for x in per_class.index], fontsize=10)
    ax.set_xlim(0, 1)
    ax.set_ylim(-0.6, n - 0.4)
    ax.set_xlabel(f"precision@{k}", fontsize=11)
    ax.tick_params(axis="x", labelsize=10)
    ax.grid(axis="x", alpha=0.3)
    ax.legend(fontsize=10, loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=m, frameon=False)  # clear of the bars
    if title:
        ax.set_title(title, fontsize=12, pad=26)
    fig.tight_layout()
    if save_as:
        save_fig(fig, save_as)
    return fig


def confusion_matrix(confusion: Mapping, *, title: str = "Confusion matrix", save_as: Optional[str | Path] = None):
    """A row-normalised confusion matrix (``{"labels", "matrix"}``): each row sums to 1, cells show shares."""
    plt = _plt()
    labels = [str(x) for x in confusion["labels"]]
    norm = normalised_confusion(confusion)
    n = len(labels)
    side = float(np.clip(0.23 * n + 2, 5, 30))
    fig, ax = plt.subplots(figsize=(side + 2, side + 0.5))
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1, interpolation="nearest")
    ax.set_xticks(range(n), labels, rotation=90, fontsize=10.5)
    ax.set_yticks(range(n), labels, fontsize=10.5)
    ax.set_xlabel("predicted class", fontsize=11)
    ax.set_ylabel("true class", fontsize=11)
    ax.set_title(title + " (each row sums to 1)", fontsize=12)
    for i in range(n):
        for j in range(n):
            if norm[i, j] >= 0.1 and (i != j or n <= 40):
                ax.text(j, i, f"{norm[i, j]:.1f}".lstrip("0") if norm[i, j] < 1 else "1", ha="center",
                        va="center", fontsize=9.5, color="white" if norm[i, j] > 0.5 else "black")
    cb = fig.colorbar(im, ax=ax, fraction=0.04, pad=0.02)
    cb.set_label("share of the true class", fontsize=11)
    cb.ax.tick_params(labelsize=10)
    fig.tight_layout()
    if save_as:
        save_fig(fig, save_as)
    return fig


def normalised_confusion(confusion: Mapping) -> np.ndarray:
    """Row-normalised confusion matrix (rows without samples stay 0)."""
    cm = np.asarray(confusion["matrix"], dtype=np.float64)
    rows = cm.sum(axis=1, keepdims=True)
    return np.divide(cm, rows, out=np.zeros_like(cm), where=rows > 0)


def most_confused(confusion: Mapping, n: int = 10):
    """The ``n`` most frequent mistakes: true class, predicted class, how many, of how many images, the share."""
    import pandas as pd

    labels = [str(x) for x in confusion["labels"]]
    cm = np.asarray(confusion["matrix"], dtype=np.int64)
    norm = normalised_confusion(confusion)
    rows = [(labels[i], labels[j], int(cm[i, j]), int(cm[i].sum()), float(norm[i, j]))
            for i in range(len(labels)) for j in range(len(labels)) if i != j and cm[i, j] > 0]
    rows.sort(key=lambda r: (-r[2], -r[4], r[0], r[1]))
    df = pd.DataFrame(rows[:n], columns=["true class", "predicted as", "mistakes", "class images", "share"])
    df["share"] = df["share"].map(lambda x: f"{x:.0%}")
    df.index = range(1, len(df) + 1)
    return df


def _draw_thumbnail(ax, path, size: int, caption: str = "", edge: str = "black", fontsize: float = 9) -> None:
    """A thumbnail in ``ax`` with a coloured frame; an unreadable image says so instead of failing."""
    try:
        ax.imshow(np.asarray(thumbnail(path, size)))
    except ImageError:
        ax.text(0.5, 0.5, "unreadable", ha="center", va="center", fontsize=fontsize)
    ax.set_xticks([]), ax.set_yticks([])
    for s in ax.spines.values():
        s.set_edgecolor(edge)
        s.set_linewidth(3 if edge != "black" else 1)
    if caption:
        ax.set_title(caption, fontsize=fontsize, pad=3)


def sample_grid(paths_by_label: dict, *, per_class: int = 6, thumb: int = 96,
                save_as: Optional[str | Path] = None):
    """One row per class: its first ``per_class`` images, the class name on the left."""
    plt = _plt()
    labels = list(paths_by_label)
    fig, axes = plt.subplots(len(labels), per_class, figsize=(2.2 + 1.2 * per_class, 1.25 * len(labels)),
                             squeeze=False)
    for row, label in zip(axes, labels):
        paths = list(paths_by_label[label])[:per_class]
        for j, ax in enumerate(row):
            if j < len(paths):
                _draw_thumbnail(ax, paths[j], thumb)
            else:
                ax.axis("off")
        row[0].set_ylabel(str(label).replace("/", "/\n"), fontsize=10, rotation=0, ha="right", va="center",
                          labelpad=8)
    fig.tight_layout()
    if save_as:
        save_fig(fig, save_as)
    return fig


def result_grid(query_paths: Sequence[str], query_labels: Sequence[str], hits: Sequence[Sequence[dict]], *,
                k: int = 6, title: str = "", thumb: int = 96, save_as: Optional[str | Path] = None):
    """One row per query: the query, then its top-k hits framed green (same label) or red."""
    plt = _plt()
    n = len(query_paths)
    k = min(k, max((len(h) for h in hits), default=0)) or 1
    fig, axes = plt.subplots(n, k + 1, figsize=(1.45 * (k + 1), 1.75 * n + 0.5), squeeze=False)
    for r in range(n):
        _draw_thumbnail(axes[r, 0], query_paths[r], thumb, f"query\n{_short(query_labels[r])}")
        for c in range(k):
            ax = axes[r, c + 1]
            if c < len(hits[r]):
                h = hits[r][c]
                _draw_thumbnail(ax, h["path"], thumb, f"{_short(h['label'])}\n{h['score']:.2f}",
                                GOOD if h["label"] == query_labels[r] else BAD)
            else:
                ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=12)
    fig.tight_layout()
    if save_as:
        save_fig(fig, save_as)
    return fig


def mode_comparison(query_paths: Sequence[str], query_labels: Sequence[str], hits_by_mode: Mapping[str, Sequence],
                    *, k: int = 5, thumb: int = 96, title: str = "", save_as: Optional[str | Path] = None):
    """For each query, one row per mode with its top-k hits, so the modes can be compared side by side.

    ``hits_by_mode[mode][i]`` are the hits of query ``i`` in that mode (rank order). Each query is
    a framed panel; a hit's caption is its rank and class, its frame green when it has the query's
    label, red when not.
    """
    plt = _plt()
    modes = list(hits_by_mode)
    n = len(query_paths)
    fig = plt.figure(figsize=(1.3 * k + 2.9, (1.3 * len(modes) + 0.25) * n + (0.4 if title else 0)),
                     layout="constrained")
    panels = fig.subfigures(n, 1, squeeze=False)[:, 0] if n > 1 else [fig.subfigures(1, 1)]
    for q, panel in enumerate(panels):
        panel.set_edgecolor("#aaa")
        panel.set_linewidth(1)
        axes = panel.subplots(len(modes), k + 1, squeeze=False,
                              gridspec_kw={"width_ratios": [1.6] + [1] * k})
        for m, mode in enumerate(modes):
            hits = list(hits_by_mode[mode][q])[:k]
            right = sum(h["label"] == query_labels[q] for h in hits)
            if m == 0:
                _draw_thumbnail(axes[m, 0], query_paths[q], thumb, f"query: {_short(query_labels[q], 20)}")
            else:
                axes[m, 0].axis("off")
            axes[m, 1].set_ylabel(f"{mode}\n{right}/{len(hits)} right", fontsize=10, rotation=0, ha="right",
                                  va="center", labelpad=6)
            for c in range(k):
                ax = axes[m, c + 1]
                if c < len(hits):
                    h = hits[c]
                    _draw_thumbnail(ax, h["path"], thumb, f"{c + 1}. {_short(h['label'], 15)}",
                                    GOOD if h["label"] == query_labels[q] else BAD)
                else:
                    ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=12)
    if save_as:
        save_fig(fig, save_as)
    return fig


def _short(label: str, n: int = 18) -> str:
    return label if len(label) <= n else "…" + label[-(n - 1):]


def _spread_thumbnails(xy: np.ndarray, cells: int, rng) -> list[int]:
    """One point per occupied cell of a ``cells`` x ``cells`` grid over the map: thumbnails that cannot overlap."""
    lo, hi = xy.min(axis=0), xy.max(axis=0)
    span = np.where(hi - lo > 0, hi - lo, 1.0)
    cell = np.minimum(((xy - lo) / span * cells).astype(int), cells - 1)
    chosen = {}
    for i in rng.permutation(len(xy)):
        chosen.setdefault((cell[i, 0], cell[i, 1]), i)
    # keep every other cell in a checkerboard: neighbours never touch
    return [i for (cx, cy), i in chosen.items() if (cx + cy) % 2 == 0]


def _separate(fig, ax, texts, tries: int = 8) -> None:
    """Nudge text labels up or down (in steps of their height) until no two overlap."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    placed = []
    to_data = ax.transData.inverted()
    for t in texts:
        box = t.get_window_extent(renderer).expanded(1.05, 1.1)
        x, y = t.get_position()
        base = ax.transData.transform((x, y))
        for step in range(tries + 1):
            dy = box.height * ((step + 1) // 2) * (1 if step % 2 else -1)
            moved = box.translated(0, dy)
            if not any(moved.overlaps(p) for p in placed):
                break
        t.set_position(tuple(to_data.transform((base[0], base[1] + dy))))
        placed.append(moved)


def umap_coords(vectors: np.ndarray, *, seed: int = 42) -> np.ndarray:
    """2-D UMAP coordinates (cosine metric) of ``vectors``, one row per vector: the layout every map here uses."""
    import umap

    n = len(vectors)
    return umap.UMAP(n_neighbors=max(2, min(15, n - 1)), min_dist=0.1, metric="cosine",
                     random_state=seed, n_jobs=1).fit_transform(vectors)  # seeded UMAP runs on one thread anyway


def embedding_map(vectors: np.ndarray, labels: Sequence[str], paths: Optional[Sequence[str]] = None, *,
                  n_thumbnails: int = 40, seed: int = 42, title: str = "", save_as: Optional[str | Path] = None):
    """A UMAP map of the embedding space: points coloured (and shaped) by class, class names at the
    class centres, and thumbnails on a grid of the map so that they never overlap."""
    from matplotlib import patheffects
    from matplotlib.offsetbox import AnnotationBbox, OffsetImage

    plt = _plt()
    xy = umap_coords(vectors, seed=seed)
    labels = np.asarray(labels).astype(str)
    uniq = sorted(set(labels))
    colours = distinct_colours(len(uniq))
    fig, ax = plt.subplots(figsize=(10, 8.5))
    for i, lbl in enumerate(uniq):
        m = labels == lbl
        ax.scatter(xy[m, 0], xy[m, 1], s=16, color=colours[i], marker=MARKERS[i % len(MARKERS)], alpha=0.85,
                   linewidths=0, zorder=2)
    if paths is not None and n_thumbnails:
        rng = np.random.default_rng(seed)
        cells = max(2, int(np.ceil(np.sqrt(2 * n_thumbnails))))
        picks = _spread_thumbnails(xy, cells, rng)[:n_thumbnails]
        zoom = min(0.8, 5.5 / cells)
        for i in picks:
            try:
                img = OffsetImage(np.asarray(thumbnail(paths[i], 48)), zoom=zoom)
            except ImageError:
                continue
            ax.add_artist(AnnotationBbox(img, xy[i], frameon=True, pad=0.1, zorder=3,
                                         bboxprops={"edgecolor": colours[uniq.index(labels[i])], "linewidth": 1.5}))
    outline = [patheffects.withStroke(linewidth=3, foreground="white")]
    last = [lbl.split("/")[-1] for lbl in uniq]
    texts = []
    for i, lbl in enumerate(uniq):  # the class name at the median of its points
        cx, cy = np.median(xy[labels == lbl], axis=0)
        name = last[i] if last.count(last[i]) == 1 else lbl
        texts.append(ax.text(cx, cy, name, fontsize=10, ha="center", va="center", color=colours[i],
                             fontweight="bold", path_effects=outline, zorder=4))
    _separate(fig, ax, texts)
    ax.set_xticks([]), ax.set_yticks([])
    ax.set_title(title or f"UMAP of {len(xy)} embeddings, coloured by class", fontsize=12)
    fig.tight_layout()
    if save_as:
        save_fig(fig, save_as)
    return fig, xy
