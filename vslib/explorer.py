"""A query explorer for notebooks: pick a query from a thumbnail gallery, see what each mode finds.

>>> explorer = QueryExplorer(cfg)          # doctest: +SKIP
>>> explorer.show()                        # in JupyterLab

What it shows:

- a **gallery** of the held-out query images, filtered by class and by a text
  matched against the label and the file name; clicking a thumbnail searches
  with it;
- a **drop zone**: drop an image file on it (or click it to choose one) to
  search with your own image;
- the **result**: the query, the classifier's top classes with their calibrated
  probabilities, and the hits of ``flat | hierarchical | adaptive`` side by side
  (``compare``, the default) or of one mode. Hits are listed in rank order with
  their cosine similarity (``sim``) and, where the engine ranks by something
  else (``rank_score``), the score the list was ranked by; the path shows on
  hover; clicking a hit searches with it ("more like this"), its ⤢ button
  enlarges it. Frames are green when a hit has the query's label, red when
  not, grey when the query's label is unknown (an upload);
- the **embedding map**: a UMAP of every image coloured by class (:func:`map_points`,
  :func:`render_map`); hovering a point shows its thumbnail, clicking it searches
  with it; the query and its hits are ringed.

The gallery, the map, the result and the drop zone are one small `anywidget
<https://anywidget.dev>`_ view (its JavaScript travels inside the widget state:
nothing is fetched from the internet). Everything a click does is also a
method (:meth:`QueryExplorer.select`, :meth:`QueryExplorer.upload_bytes`,
:meth:`QueryExplorer.run`), and the last results are kept (``last_results``,
``last_result``, ``last_html``, ``last_error``), so the explorer can be driven
and checked without a browser. Displayed in a notebook, the explorer also
carries a static HTML snapshot of its current result, which is what an
exported HTML report shows (no widget manager needed).

Made for data that fits in memory: the explorer and the embedding map load the whole
feature set (:func:`vslib.features.load_features`, every vector of both splits).
"""
from __future__ import annotations

import base64
import dataclasses
import hashlib
import html
import io
import itertools
import logging
import shutil
import tempfile
from importlib import resources
from pathlib import Path
from typing import Optional

import numpy as np

from vslib import features
from vslib.atomic import atomic_write_bytes
from vslib.config import Config
from vslib.errors import VisualSearchError
from vslib.images import ImageError, load_image, thumbnail
from vslib.index.elasticsearch import elasticsearch_status, redact
from vslib.integrity import DamagedFile, audit_file, verify
from vslib.plots import distinct_colours, umap_coords
from vslib.registry import BACKENDS, MODES, USER_MODES
from vslib.search import VisualSearch

log = logging.getLogger(__name__)

#: the user's modes (:data:`vslib.registry.USER_MODES`: ``oracle`` needs the true label) side by side, or one
COMPARE = "compare"
VIEW_MODES = (COMPARE,) + USER_MODES
ALL_CLASSES = "all classes"
UPLOAD_ID = "upload:"
GOOD, BAD, NEUTRAL = "#1a9850", "#d73027", "#9a9a9a"
_ids = itertools.count(1)


def _static(name: str) -> str:
    """A file of the widget's front end, shipped inside the package (``vslib/static/explorer/``)."""
    return resources.files("vslib").joinpath("static", "explorer", name).read_text(encoding="utf-8")


#: the widget's look (also inlined in the static snapshot)
CSS = _static("explorer.css")
#: the widget's front end: draws the HTML the kernel sends, turns clicks and drops into messages
ESM = _static("explorer.js")


def _with_backend(cfg: Config, backend: str) -> Config:
    return dataclasses.replace(cfg, index=dataclasses.replace(cfg.index, backend=backend))


def _png_data_uri(src, size: int) -> str:
    """A thumbnail of ``src`` (path or PIL image) as a ``data:`` URI ('' when unreadable)."""
    try:
        img = thumbnail(src, size)
    except ImageError:
        return ""
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _e(value) -> str:
    return html.escape(str(value), quote=True)


def _img(uri: str, alt: str) -> str:
    return f'<img src="{uri}" alt="{_e(alt)}">' if uri else '<span class="vs-empty">unreadable</span>'


def scores_text(hit: dict) -> str:
    """``sim 0.812`` and, when the list was ranked by another score, `` · rank 0.701``."""
    sim = float(hit["score"])
    text = f"sim {sim:.3f}"
    rank = hit.get("rank_score")
    if rank is not None and abs(float(rank) - sim) >= 5e-4:
        text += f" · rank {float(rank):.3f}"
    return text


def render_result(results, query_image, *, query_label: Optional[str] = None, query_name: str = "",
                  query_path: str = "", thumb: int = 72, uri=None, static: bool = False) -> str:
    """HTML of one query's search(es): the query, its predicted classes, the hits of each mode side by side.

    ``results`` is a :class:`~vslib.search.SearchResult` or ``{mode: SearchResult}``. ``static``
    adds enlarged copies that open without JavaScript (for exported HTML); the live widget fetches
    them on demand instead. ``uri(path, size)`` makes a thumbnail's data URI (cached by the explorer).
    """
    uri = uri or _png_data_uri
    if not isinstance(results, dict):
        results = {results.mode: results}
    first = next(iter(results.values()))
    uid = next(_ids)
    q_caption = (f"query: {query_label}" if query_label else f"query: {query_name or 'uploaded image'}")
    q_title = query_path or query_name
    pred_rows = "".join(
        f'<tr><td>{_e(lbl)}</td><td><span class="vs-bar" style="width:{max(1, round(140 * p))}px"></span>'
        f'{p:.1%}</td></tr>' for lbl, p in first.predicted)
    head = (f'<div class="vs-head"><div class="vs-query" title="{_e(q_title)}">{_img(uri(query_image, 160), q_caption)}'
            f'<div>{_e(q_caption)}</div>'
            + (f'<div style="color:#555;font-size:12px">{_e(Path(query_path).name)}</div>' if query_path else "")
            + f'</div><div><b>predicted classes</b><table class="vs-pred">{pred_rows}</table></div></div>')
    cols, bigs = [], []
    for mode, result in results.items():
        eff = (f" → {result.effective_mode}" if result.effective_mode and result.effective_mode != mode else "")
        searched = ("all classes" if result.searched_labels is None else ", ".join(result.searched_labels))
        same = ("" if query_label is None else
                f"; {sum(h['label'] == query_label for h in result.hits)}/{len(result.hits)} share its label")
        info = f"searched: {searched}{same}; {sum(result.timings_ms.values()):.0f} ms"
        tiles = []
        for rank, h in enumerate(result.hits, 1):
            border = NEUTRAL if query_label is None else (GOOD if h["label"] == query_label else BAD)
            path = str(h["path"])
            if static:
                big_id = f"vs-big-{uid}-{len(bigs)}"
                bigs.append(f'<div class="vs-big" id="{big_id}"><a href="#_"><figure>{_img(uri(path, 384), path)}'
                            f'<figcaption>{_e(h["label"])} · {_e(scores_text(h))}<br>{_e(path)}</figcaption>'
                            f'</figure></a></div>')
                zoom = f'<a class="vs-zoom" href="#{big_id}" title="enlarge">⤢</a>'
            else:
                zoom = f'<a class="vs-zoom" href="#" data-id="{_e(path)}" title="enlarge">⤢</a>'
            tiles.append(
                f'<div class="vs-hit" data-id="{_e(path)}" data-rank="{rank}" style="border-color:{border}" '
                f'title="{_e(path)}">{_img(uri(path, thumb), path)}<div class="vs-meta">'
                f'<div class="vs-label"><b>{rank}.</b> {_e(h["label"])}</div>'
                f'<div class="vs-score">{_e(scores_text(h))}</div></div>{zoom}</div>')
        cols.append(f'<div class="vs-col" data-mode="{_e(mode)}"><h4>{_e(mode)}{_e(eff)}</h4>'
                    f'<div class="vs-info">{_e(info)}</div>'
                    f'<div class="vs-hits">{"".join(tiles) or "<i>no hits</i>"}</div></div>')
    ranked_by_other = any(h.get("rank_score") is not None for r in results.values() for h in r.hits)
    legend = ("Hits in rank order. sim = cosine similarity to the query"
              + ("; rank = the score the list is ranked by (shown where it differs)" if ranked_by_other else "")
              + ". Green frame: same label as the query; red: another label"
              + ("; grey: the query's label is unknown" if query_label is None else "") + ".")
    return (f'<div class="vs-result" data-query="{_e(q_title)}">{head}'
            f'<div class="vs-cols">{"".join(cols)}</div><div class="vs-legend">{_e(legend)}</div>'
            + "".join(bigs) + "</div>")


MAP_W, MAP_H, MAP_PAD = 760, 520, 16
MAP_FONT = 11  # px: class names at the cluster centres (legible at the size shown: the SVG is never scaled)


def audit_umap(cfg: Config) -> list:
    """Full check of the explorer's UMAP caches beside the feature file (a damaged one is recomputed when next used)."""
    folder = features.features_path(cfg).parent
    return [audit_file(p, "UMAP cache", "the explorer recomputes it when the map is next drawn")
            for p in sorted(folder.glob(f"umap-{cfg.dataset.name}-*.npy"))] if folder.is_dir() else []


def map_points(cfg: Config):
    """The embedding map's points: a DataFrame with ``path, label, split, x, y``, one row per image (index + query).

    The coordinates are a 2-D UMAP of the feature vectors (:func:`vslib.plots.umap_coords`), computed once per
    feature set and cached next to the feature file (keyed by a hash of the vectors and paths). Loads the whole
    feature set (:func:`vslib.features.load_features`): the map is of every image.
    """
    fs = features.load_features(cfg)
    digest = hashlib.sha1(fs.vectors.tobytes())
    digest.update("\n".join(fs.table["path"].astype(str)).encode())
    cache = features.features_path(cfg).with_name(f"umap-{cfg.dataset.name}-{digest.hexdigest()[:16]}.npy")
    xy = None
    if cache.exists():
        try:
            verify(cache, full=True, redo="recomputed now")
            xy = np.load(cache, allow_pickle=False)
        except (DamagedFile, OSError, ValueError) as e:
            log.warning("%s: damaged UMAP cache (%s); recomputing it", cache, getattr(e, "reason", e))
            xy = None
        if xy is not None and (xy.shape != (len(fs), 2) or not np.isfinite(xy).all()):
            xy = None
    if xy is None:
        log.info("computing the UMAP of %d embeddings for the explorer's map (cached in %s)", len(fs), cache)
        xy = np.asarray(umap_coords(fs.vectors), dtype=np.float64)
        buf = io.BytesIO()
        np.save(buf, xy)
        atomic_write_bytes(cache, buf.getvalue(), verified=True)
    points = fs.table[["path", "label", "split"]].astype(str).copy()
    points["x"], points["y"] = xy[:, 0], xy[:, 1]
    return points


def _label_boxes(centres, names, font: int = MAP_FONT, tries: int = 10):
    """Positions for the class names: nudged up/down in steps of a line until no two (estimated) boxes overlap."""
    placed, out = [], []
    for (cx, cy), name in zip(centres, names):
        w, h = 0.62 * font * len(name) + 4, font + 3
        x = min(max(cx, w / 2 + 2), MAP_W - w / 2 - 2)
        for step in range(tries + 1):
            y = cy + h * ((step + 1) // 2) * (1 if step % 2 else -1)
            y = min(max(y, h), MAP_H - 4)
            box = (x - w / 2, y - h, x + w / 2, y)
            if not any(box[0] < b[2] and b[0] < box[2] and box[1] < b[3] and b[1] < box[3] for b in placed):
                break
        placed.append(box)
        out.append((x, y))
    return out


def render_map(points, *, query: Optional[str] = None, hits=(), mode: str = "", static: bool = False,
               uploaded: bool = False) -> str:
    """The embedding map as an SVG scatter (HTML): points coloured by class, class names at the class centres,
    the ``query`` and its ``hits`` (paths) ringed and joined. ``static`` adds a native tooltip to each point
    (label and file name) for exported pages; the live widget draws its own, with the thumbnail."""
    def hexc(c):
        return c if isinstance(c, str) else "#%02x%02x%02x" % tuple(round(255 * v) for v in c)

    if points is None or not len(points):
        return ""
    xy = points[["x", "y"]].to_numpy(float)
    lo, hi = xy.min(axis=0), xy.max(axis=0)
    span = np.where(hi - lo > 0, hi - lo, 1.0)
    px = MAP_PAD + (xy[:, 0] - lo[0]) / span[0] * (MAP_W - 2 * MAP_PAD)
    py = MAP_PAD + (1 - (xy[:, 1] - lo[1]) / span[1]) * (MAP_H - 2 * MAP_PAD)
    labels = points["label"].tolist()
    paths = points["path"].tolist()
    splits = points["split"].tolist()
    classes = sorted(set(labels))
    colour = dict(zip(classes, (hexc(c) for c in distinct_colours(len(classes)))))
    pos = {p: i for i, p in enumerate(paths)}
    hits = [h for h in hits if h in pos]
    marked = set(hits) | ({query} if query in pos else set())
    dim = bool(marked)
    parts = []
    for i, (path, lbl, split) in enumerate(zip(paths, labels, splits)):
        if path in marked:
            continue
        tip = f"<title>{_e(lbl)}: {_e(Path(path).name)}</title>" if static else ""
        attrs = (f'class="vs-pt" data-id="{_e(path)}" data-label="{_e(lbl)}" fill="{colour[lbl]}"'
                 + (' fill-opacity="0.45"' if dim else ""))
        if split == "query":
            parts.append(f'<rect {attrs} x="{px[i] - 3:.1f}" y="{py[i] - 3:.1f}" width="6" height="6">{tip}</rect>')
        else:
            parts.append(f'<circle {attrs} cx="{px[i]:.1f}" cy="{py[i]:.1f}" r="3.2">{tip}</circle>')
    # class names at the median of their points
    last = [c.split("/")[-1] for c in classes]
    names = [n if last.count(n) == 1 else c for n, c in zip(last, classes)]
    lab = np.asarray(labels)
    centres = [(float(np.median(px[lab == c])), float(np.median(py[lab == c]))) for c in classes]
    texts = [f'<text x="{x:.1f}" y="{y:.1f}" text-anchor="middle" font-size="{MAP_FONT}" fill="{colour[c]}">'
             f'{_e(n)}</text>' for (x, y), n, c in zip(_label_boxes(centres, names), names, classes)]
    marks = []
    if query in pos:
        q = pos[query]
        marks += [f'<line x1="{px[q]:.1f}" y1="{py[q]:.1f}" x2="{px[pos[h]]:.1f}" y2="{py[pos[h]]:.1f}" '
                  f'stroke="#555" stroke-width="1" stroke-opacity="0.6"/>' for h in hits]
    for rank, h in enumerate(hits, 1):
        i = pos[h]
        tip = f"<title>hit {rank}: {_e(labels[i])}: {_e(Path(h).name)}</title>" if static else ""
        marks.append(f'<circle class="vs-pt vs-hitpt" data-id="{_e(h)}" data-label="{_e(labels[i])}" '
                     f'data-rank="{rank}" cx="{px[i]:.1f}" cy="{py[i]:.1f}" r="5.5" fill="{colour[labels[i]]}" '
                     f'stroke="#111" stroke-width="2">{tip}</circle>')
    if query in pos:
        q = pos[query]
        tip = f"<title>query: {_e(labels[q])}: {_e(Path(query).name)}</title>" if static else ""
        marks.append(f'<circle cx="{px[q]:.1f}" cy="{py[q]:.1f}" r="11" fill="none" stroke="#2b6cb0" '
                     f'stroke-width="3"/>')  # the blue ring, outside a white one: visible on any class colour
        marks.append(f'<circle class="vs-pt vs-querypt" data-id="{_e(query)}" data-label="{_e(labels[q])}" '
                     f'cx="{px[q]:.1f}" cy="{py[q]:.1f}" r="7" fill="{colour[labels[q]]}" stroke="#fff" '
                     f'stroke-width="2.5">{tip}</circle>')
    n_index = sum(s != "query" for s in splits)
    caption = (f"UMAP of {len(paths)} embeddings ({n_index} indexed: dots; {len(paths) - n_index} held-out "
               "queries: squares), coloured by class, class names at the class centres.")
    if query in pos:
        caption += " Blue ring: the query"
        caption += f"; black rings: its hits{f' ({mode})' if mode else ''}, joined to it." if hits else "."
    elif uploaded:
        caption += (" The uploaded query is not on the map" + (f"; black rings: its hits{f' ({mode})' if mode else ''}."
                                                               if hits else "."))
    caption += (" Hover a point to see its label and file name." if static else
                " Hover a point to see its image; click it to search with it.")
    svg = (f'<svg xmlns="http://www.w3.org/2000/svg" width="{MAP_W}" height="{MAP_H}" '
           f'viewBox="0 0 {MAP_W} {MAP_H}" role="img" aria-label="embedding map">'
           f'<g class="vs-pts">{"".join(parts)}</g><g class="vs-names">{"".join(texts)}</g>'
           f'<g class="vs-marks">{"".join(marks)}</g></svg>')
    return f'{svg}<div class="vs-legend">{_e(caption)}</div>'


def _view_class():
    """The anywidget class (imported lazily: ``import vslib.explorer`` stays light)."""
    global _View
    if _View is None:
        import anywidget
        import traitlets

        class ExplorerView(anywidget.AnyWidget):
            _esm = ESM
            _css = CSS
            gallery_html = traitlets.Unicode("").tag(sync=True)
            panel_html = traitlets.Unicode("").tag(sync=True)
            selected = traitlets.Unicode("").tag(sync=True)
            map_html = traitlets.Unicode("").tag(sync=True)

        _View = ExplorerView
    return _View


_View = None


class QueryExplorer:
    """Widgets to search the index with a query image and compare what each mode finds.

    Parameters
    ----------
    cfg : Config
        Needs the features (the query split), a trained classifier and a built index.
        The whole feature set is loaded (:func:`vslib.features.load_features`): made for data that fits in memory.
    engine : VisualSearch, optional
        Used for ``cfg.index.backend``; other backends are opened on first use.
    check_elasticsearch : bool
        Offer the elasticsearch backend only when the configured cluster answers
        (otherwise only what is configured, with a one-line notice saying why).
    query : int or str
        The first query: a position in the (sorted) query split or an image path.
    k : int
        Hits per mode at start (the slider goes to 50).
    mode : str
        ``compare`` (flat, hierarchical and adaptive side by side) or one mode.
    embedding_map : bool
        Show the embedding map (a UMAP of every image, computed on first use and cached; see :func:`map_points`).
    """

    def __init__(self, cfg: Config, engine=None, *, check_elasticsearch: bool = True, query=0,
                 k: Optional[int] = None, mode: str = COMPARE, thumb: int = 72, embedding_map: bool = True):
        import ipywidgets as W

        if mode not in VIEW_MODES:
            raise VisualSearchError(f"explorer mode {mode!r} is not offered (choices: {', '.join(VIEW_MODES)})")
        self.cfg = cfg
        self.thumb = thumb
        self._engines = {} if engine is None else {cfg.index.backend: engine}
        self._own = set()
        self._tmp = Path(tempfile.mkdtemp(prefix="vs-explorer-"))
        self._uris: dict = {}
        self.last_results: dict = {}
        self.last_result = None
        self.last_html = ""
        self.last_error: Optional[str] = None
        self.last_query = None
        self._upload_image = None
        self._upload_name = ""
        self._upload_error: Optional[str] = None
        self._busy = False

        table = features.load_features(cfg).table
        self._labels = dict(zip(table["path"].astype(str), table["label"].astype(str)))
        queries = table[table["split"] == "query"].sort_values(["label", "path"])
        self.query_paths = queries["path"].astype(str).tolist()
        if not self.query_paths:
            raise VisualSearchError(f"the query split of {cfg.dataset.name} is empty; set "
                                    "dataset.split.query_fraction > 0 and rerun `visualsearch data prepare`")
        classes = sorted(set(queries["label"].astype(str)))

        backends, note = self._available_backends(check_elasticsearch)
        self.backend_note = note
        self.search_text = W.Text(value="", placeholder="label or file name", description="filter",
                                  continuous_update=True, layout=W.Layout(width="260px"))
        self.label_filter = W.Dropdown(options=[ALL_CLASSES] + classes, value=ALL_CLASSES, description="class",
                                       layout=W.Layout(width="280px"))
        self.k_slider = W.IntSlider(value=min(k or cfg.search.k, 50), min=1, max=50, description="k",
                                    continuous_update=False)
        self.mode = W.ToggleButtons(options=list(VIEW_MODES), value=mode, description="mode",
                                    tooltips=[f"{', '.join(USER_MODES[:-1])} and {USER_MODES[-1]} side by side"]
                                    + [MODES[m]["summary"] for m in USER_MODES],
                                    style={"button_width": "110px"})
        self.backend = W.ToggleButtons(options=backends, value=cfg.index.backend if cfg.index.backend in backends
                                       else backends[0], description="backend", style={"button_width": "110px"})
        self.notice = W.HTML(value=f'<span style="color:#666;font-size:12px">{html.escape(note)}</span>' if note else "")
        self.view = _view_class()()
        self.map_points = map_points(cfg) if embedding_map else None
        self.widget = W.VBox([W.HBox([self.search_text, self.label_filter, self.k_slider]),
                              W.HBox([self.mode, self.backend]), self.notice, self.view])

        self._draw_gallery()
        first = query if isinstance(query, str) else self.query_paths[int(query) % len(self.query_paths)]
        self.view.selected = str(first)
        self.view.observe(self._on_select, names="selected")
        self.view.on_msg(self._on_view_msg)
        for w in (self.search_text, self.label_filter):
            w.observe(lambda change: self._draw_gallery(), names="value")
        for w in (self.k_slider, self.mode, self.backend):
            w.observe(self._on_change, names="value")

    # -- setup ------------------------------------------------------------------------
    def _available_backends(self, check: bool) -> tuple[list[str], str]:
        configured = self.cfg.index.backend
        if not check:
            return [configured] + [b for b in BACKENDS if b != configured], ""
        ok, message = elasticsearch_status(self.cfg)
        if ok:
            return list(BACKENDS), ""
        where = ", ".join(redact(h) for h in self.cfg.index.elasticsearch.hosts)
        log.info("elasticsearch not offered in the explorer: %s", message)
        return list(BACKENDS.names(remote=False)), f"Elasticsearch is not offered: no answer from {where}."

    def engine(self, backend: Optional[str] = None):
        """The :class:`~vslib.search.VisualSearch` of ``backend`` (opened on first use)."""
        backend = backend or self.backend.value
        if backend not in self._engines:
            self._engines[backend] = VisualSearch.from_config(_with_backend(self.cfg, backend))
            self._own.add(backend)
        return self._engines[backend]

    def _uri(self, src, size: int) -> str:
        if not isinstance(src, (str, Path)):
            return _png_data_uri(src, size)
        key = (str(src), size)
        if key not in self._uris:
            self._uris[key] = _png_data_uri(src, size)
        return self._uris[key]

    # -- the gallery ----------------------------------------------------------------------
    def gallery_paths(self) -> list[str]:
        """The query images the gallery shows under the current filters."""
        text = self.search_text.value.strip().lower()
        cls = self.label_filter.value
        return [p for p in self.query_paths
                if (cls == ALL_CLASSES or self._labels[p] == cls)
                and (not text or text in self._labels[p].lower() or text in Path(p).name.lower())]

    def _draw_gallery(self) -> None:
        tiles = [f'<div class="vs-thumb" data-id="{_e(p)}" title="{_e(self._labels[p])}: {_e(p)}">'
                 f'{_img(self._uri(p, 64), self._labels[p])}<span>{_e(self._labels[p].split("/")[-1])}</span></div>'
                 for p in self.gallery_paths()]
        self.view.gallery_html = "".join(tiles) or '<div class="vs-empty">no query image matches the filter</div>'

    # -- callbacks ----------------------------------------------------------------------
    def _on_select(self, change) -> None:
        self.run()

    def _on_change(self, change) -> None:
        self.run()

    def _on_view_msg(self, widget, content, buffers) -> None:
        kind = content.get("type")
        if kind == "upload":
            self.upload_bytes(str(content.get("name") or "upload"), bytes(buffers[0]) if buffers else b"")
        elif kind == "enlarge":
            key = str(content.get("id", ""))
            src = self._upload_image if key.startswith(UPLOAD_ID) else key
            label = self._labels.get(key, "")
            self.view.send({"type": "enlarged", "id": key, "uri": self._uri(src, 384),
                            "caption": f"{label}: {key}" if label else key})
        elif kind == "thumb":  # hovering a point of the map
            key = str(content.get("id", ""))
            if key in self._labels:
                self.view.send({"type": "thumb", "id": key, "uri": self._uri(key, 96)})

    def select(self, key: str):
        """Search with ``key`` (an image path, as a click on a thumbnail or a hit does); returns the result."""
        if self.view.selected == key:
            return self.run()
        self.view.selected = key  # observed: runs the search
        return self.last_result

    def upload_bytes(self, name: str, content: bytes):
        """Use an uploaded file as the query (what a drop on the drop zone does); returns the result."""
        self._upload_name = name
        self._upload_image = None
        self._upload_error = None
        path = self._tmp / ("upload" + (Path(name).suffix[:10] if Path(name).suffix else ""))
        path.write_bytes(content)
        try:
            self._upload_image = load_image(path, max_pixels=self.cfg.dataset.max_image_pixels)
        except ImageError as e:
            self._upload_error = f"the uploaded file {name!r} cannot be used as a query: {e.reason}"
        return self.select(UPLOAD_ID + name)

    # -- the work --------------------------------------------------------------------
    def query(self):
        """``(image, label or None, display name, path)`` of the current query; raises VisualSearchError if unusable."""
        key = self.view.selected
        if key.startswith(UPLOAD_ID):
            if self._upload_image is None:
                raise VisualSearchError(self._upload_error or "no file uploaded yet: drop one on the drop zone")
            return self._upload_image, None, self._upload_name, ""
        return key, self._labels.get(key), Path(key).name, key

    def modes(self) -> tuple[str, ...]:
        return USER_MODES if self.mode.value == COMPARE else (self.mode.value,)

    def run(self):
        """Search with the current settings and redraw; returns the SearchResult of the main mode (None on error).

        The main mode is the one picked, or ``adaptive`` when comparing; ``last_results`` holds every mode's.
        """
        if self._busy:
            return self.last_result
        self._busy = True
        try:
            image, label, name, path = self.query()
            engine = self.engine()
            results = {}
            for mode in self.modes():
                r = engine.search(image, k=self.k_slider.value, mode=mode)
                r.query = path or name
                results[mode] = r
            self.last_query, self.last_results, self.last_error = image, results, None
            self.last_result = results.get("adaptive") if self.mode.value == COMPARE else results[self.mode.value]
            self.last_html = render_result(results, image, query_label=label, query_name=name, query_path=path,
                                           thumb=self.thumb, uri=self._uri)
        except (VisualSearchError, ImageError) as e:
            self.last_results, self.last_result, self.last_error = {}, None, str(e)
            self.last_html = f'<div class="vs-error">Cannot search: {html.escape(str(e))}</div>'
        finally:
            self._busy = False
        self.view.panel_html = self.last_html
        self.view.map_html = self.map_html()
        return self.last_result

    def map_html(self, static: bool = False) -> str:
        """The embedding map with the current query and the main mode's hits ringed ('' without a map)."""
        if self.map_points is None:
            return ""
        key = self.view.selected
        r = self.last_result
        return render_map(self.map_points, query=None if key.startswith(UPLOAD_ID) else key,
                          hits=[str(h["path"]) for h in r.hits] if r is not None else (),
                          mode=r.mode if r is not None else "", static=static,
                          uploaded=key.startswith(UPLOAD_ID))

    def snapshot_html(self) -> str:
        """A self-contained HTML copy of the current result (for exported reports: no JavaScript needed)."""
        if not self.last_results:
            body = self.last_html or "<i>no search yet</i>"
        else:
            image, label, name, path = self.query()
            body = render_result(self.last_results, image, query_label=label, query_name=name, query_path=path,
                                 thumb=self.thumb, uri=self._uri, static=True)
        note = ("A snapshot of the explorer (k = {k}, {backend} index). Open the notebook in JupyterLab "
                "(<code>make lab</code>) to pick queries from a gallery, drop your own image and click a hit "
                "to search with it.").format(k=self.k_slider.value, backend=_e(self.backend.value))
        if self.backend_note:
            note += " " + _e(self.backend_note)
        emap = self.map_html(static=True)
        if emap:
            emap = f'<h4 style="margin:10px 0 4px">Embedding map</h4><div class="vs-map">{emap}</div>'
        return (f'<div class="vs-x vs-snapshot"><style>{CSS}</style>'
                f'<p style="font-size:13px;color:#555">{note}</p>{body}{emap}</div>')

    def _repr_mimebundle_(self, **kwargs):
        bundle = self.widget._repr_mimebundle_(**kwargs) or {}
        if isinstance(bundle, tuple):
            bundle = bundle[0]
        return {**bundle, "text/html": self.snapshot_html()}

    def show(self):
        """Run a first search and display the explorer (the widget, plus a static snapshot for HTML exports)."""
        from IPython.display import display

        self.run()
        display(self)

    def close(self) -> None:
        for backend in list(self._own):
            self._engines.pop(backend).close()
        self._own.clear()
        shutil.rmtree(self._tmp, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


__all__ = ["QueryExplorer", "map_points", "render_map", "render_result", "scores_text"]
