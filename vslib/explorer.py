"""An ipywidgets query explorer: pick or upload an image, see what the engine predicts and finds.

>>> explorer = QueryExplorer(cfg)          # doctest: +SKIP
>>> explorer.widget                        # display it in a notebook

Controls: a dropdown of the held-out query images (or a file upload), a k
slider, the search mode and the index backend. Every change re-runs the
search and redraws the output: the query, the classifier's top classes with
their calibrated probabilities, and the hits with their scores (framed green
when the label matches the query's known label, red when not).

Everything a callback does is also a method (:meth:`QueryExplorer.run`), and
the last result is kept (``last_result``, ``last_html``, ``last_error``), so
the explorer can be driven and checked without a browser.
"""
from __future__ import annotations

import base64
import dataclasses
import html
import io
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Optional

from vslib.config import Config
from vslib.errors import VisualSearchError

log = logging.getLogger(__name__)

#: modes a user can pick (``oracle`` needs the true label: evaluation only)
USER_MODES = ("flat", "hierarchical", "adaptive")
BACKEND_NAMES = ("embedded", "elasticsearch")
SPLIT, UPLOAD = "query split", "uploaded file"
GOOD, BAD, NEUTRAL = "#1a9850", "#d73027", "#999999"


def elasticsearch_status(cfg: Config, timeout: float = 2.0) -> tuple[bool, str]:
    """``(answers, message)``: whether the configured Elasticsearch cluster answers within ``timeout`` s."""
    from vslib.index.elasticsearch import connect, redact

    es_cfg = dataclasses.replace(cfg.index.elasticsearch,
                                 request_timeout=min(timeout, cfg.index.elasticsearch.request_timeout))
    where = ", ".join(redact(h) for h in es_cfg.hosts)
    try:
        client = connect(es_cfg)
    except VisualSearchError as e:
        return False, str(e)
    client.close()
    return True, f"Elasticsearch at {where} answers"


def _with_backend(cfg: Config, backend: str) -> Config:
    return dataclasses.replace(cfg, index=dataclasses.replace(cfg.index, backend=backend))


def _png_data_uri(src, size: int) -> str:
    """A thumbnail of ``src`` (path or PIL image) as a ``data:`` URI ('' when unreadable)."""
    from vslib.images import ImageError, thumbnail

    try:
        img = thumbnail(src, size)
    except ImageError:
        return ""
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _tile(uri: str, caption: str, border: str, size: int) -> str:
    img = (f'<img src="{uri}" style="max-width:{size}px;max-height:{size}px">' if uri
           else f'<div style="width:{size}px;height:{size}px;line-height:{size}px;color:#999">unreadable</div>')
    return (f'<div style="display:inline-block;margin:3px;padding:3px;border:3px solid {border};'
            f'text-align:center;vertical-align:top;width:{size + 6}px;font-size:11px">{img}'
            f'<div style="overflow:hidden;text-overflow:ellipsis;white-space:nowrap">{caption}</div></div>')


def render_result(result, query_image, *, query_label: Optional[str] = None, query_name: str = "",
                  thumb: int = 112) -> str:
    """HTML of one search: the query, predicted classes with probability bars, the hits grid with scores."""
    q_uri = _png_data_uri(query_image, thumb * 2)
    mode = result.mode + (f" → {result.effective_mode}" if result.effective_mode and
                          result.effective_mode != result.mode else "")
    pred_rows = "".join(
        f'<tr><td style="padding-right:8px">{html.escape(lbl)}</td><td><div style="background:#4575b4;'
        f'height:10px;width:{max(1, round(160 * p))}px;display:inline-block"></div> {p:.1%}</td></tr>'
        for lbl, p in result.predicted)
    searched = ("all classes" if result.searched_labels is None
                else ", ".join(html.escape(s) for s in result.searched_labels))
    header = (f'<div style="display:flex;gap:18px;align-items:flex-start">'
              f'<div>{_tile(q_uri, "query: " + html.escape(query_label or query_name or "uploaded"), "black", thumb * 2)}</div>'
              f'<div><b>predicted classes</b><table style="font-size:12px">{pred_rows}</table>'
              f'<div style="font-size:12px;margin-top:6px">mode <b>{html.escape(mode)}</b>; searched: {searched}; '
              f'{len(result.hits)} hits; {sum(result.timings_ms.values()):.0f} ms</div></div></div>')
    tiles = []
    for rank, h in enumerate(result.hits, 1):
        border = NEUTRAL if query_label is None else (GOOD if h["label"] == query_label else BAD)
        tiles.append(_tile(_png_data_uri(h["path"], thumb),
                           f'{rank}. {html.escape(str(h["label"]))}<br>{h["score"]:.3f}', border, thumb))
    grid = "".join(tiles) or "<i>no hits</i>"
    return f'<div class="vs-explorer-result">{header}<div style="margin-top:8px">{grid}</div></div>'


class QueryExplorer:
    """Widgets to search the index with a query image and see the result.

    Parameters
    ----------
    cfg : Config
        Needs the features (the query split), a trained classifier and a built index.
    engine : VisualSearch, optional
        Used for ``cfg.index.backend``; other backends are opened on first use.
    check_elasticsearch : bool
        Offer the elasticsearch backend only when the configured cluster answers
        (otherwise the toggle offers what is configured and says why).
    """

    def __init__(self, cfg: Config, engine=None, *, check_elasticsearch: bool = True, thumb: int = 112):
        import ipywidgets as W

        from vslib import features

        self.cfg = cfg
        self.thumb = thumb
        self._engines = {} if engine is None else {cfg.index.backend: engine}
        self._own = set()
        self._tmp = Path(tempfile.mkdtemp(prefix="vs-explorer-"))
        self.last_result = None
        self.last_html = ""
        self.last_error: Optional[str] = None
        self.last_query = None
        self._upload_image = None
        self._upload_name = ""
        self._upload_error: Optional[str] = None
        self._busy = False

        queries = features.load_features(cfg).split("query").table
        self._labels = dict(zip(queries["path"].astype(str), queries["label"].astype(str)))
        options = [(f"{lbl} · {Path(p).name}", p) for p, lbl in sorted(self._labels.items(), key=lambda x: (x[1], x[0]))]
        if not options:
            raise VisualSearchError(f"the query split of {cfg.dataset.name} is empty; set "
                                    "dataset.split.query_fraction > 0 and rerun `visualsearch data prepare`")

        backends, note = self._available_backends(check_elasticsearch)
        self.backend_note = note
        mode = cfg.search.mode if cfg.search.mode in USER_MODES else "adaptive"
        self.dropdown = W.Dropdown(options=options, value=options[0][1], description="query",
                                   layout=W.Layout(width="420px"))
        self.upload = W.FileUpload(accept="image/*", multiple=False, description="upload image")
        self.source = W.ToggleButtons(options=[SPLIT, UPLOAD], value=SPLIT, description="use")
        self.k_slider = W.IntSlider(value=min(cfg.search.k, 50), min=1, max=50, description="k")
        self.mode = W.ToggleButtons(options=list(USER_MODES), value=mode, description="mode")
        self.backend = W.ToggleButtons(options=backends, value=cfg.index.backend if cfg.index.backend in backends
                                       else backends[0], description="backend")
        self.status = W.HTML(value=f"<small>{html.escape(note)}</small>" if note else "")
        # an HTML widget, not an Output widget: setting its value needs no output capture, which
        # nbclient (papermill) can wait on forever when a kernel writes into an Output widget
        self.output = W.HTML(value="", layout=W.Layout(border="1px solid #ddd", min_height="120px"))
        self.widget = W.VBox([W.HBox([self.dropdown, self.upload]), self.source, self.k_slider, self.mode,
                              self.backend, self.status, self.output])

        self.dropdown.observe(self._on_pick, names="value")
        self.upload.observe(self._on_upload, names="value")
        for w in (self.source, self.k_slider, self.mode, self.backend):
            w.observe(self._on_change, names="value")

    # -- setup ------------------------------------------------------------------------
    def _available_backends(self, check: bool) -> tuple[list[str], str]:
        configured = self.cfg.index.backend
        if not check:
            return [configured] + [b for b in BACKEND_NAMES if b != configured], ""
        ok, message = elasticsearch_status(self.cfg)
        if ok:
            return list(BACKEND_NAMES), ""
        return ["embedded"], f"elasticsearch is not offered: {message}"

    def engine(self, backend: Optional[str] = None):
        """The :class:`~vslib.search.VisualSearch` of ``backend`` (opened on first use)."""
        from vslib.search import VisualSearch

        backend = backend or self.backend.value
        if backend not in self._engines:
            self._engines[backend] = VisualSearch.from_config(_with_backend(self.cfg, backend))
            self._own.add(backend)
        return self._engines[backend]

    # -- callbacks ----------------------------------------------------------------------
    def _on_pick(self, change) -> None:
        if self.source.value != SPLIT:
            self.source.value = SPLIT  # triggers _on_change -> run
        else:
            self.run()

    def _on_upload(self, change) -> None:
        value = change["new"]
        if not value:
            return
        self._read_upload(value)
        if self.source.value != UPLOAD:
            self.source.value = UPLOAD
        else:
            self.run()

    def _on_change(self, change) -> None:
        self.run()

    def _read_upload(self, value) -> None:
        """Decode the FileUpload value (ipywidgets 8: tuple of dicts; 7: dict name -> dict)."""
        from vslib.images import ImageError, load_image

        files = list(value.values()) if isinstance(value, dict) else list(value)
        f = files[-1]
        name = str(f.get("name") or (f.get("metadata") or {}).get("name") or "upload")
        content = bytes(f.get("content") or b"")
        self._upload_name = name
        self._upload_image = None
        self._upload_error = None
        path = self._tmp / ("upload" + (Path(name).suffix[:10] if Path(name).suffix else ""))
        path.write_bytes(content)
        try:
            self._upload_image = load_image(path, max_pixels=self.cfg.dataset.max_image_pixels)
        except ImageError as e:
            self._upload_error = f"the uploaded file {name!r} cannot be used as a query: {e.reason}"

    # -- the work --------------------------------------------------------------------
    def query(self):
        """``(image, label or None, display name)`` of the current query; raises VisualSearchError if unusable."""
        if self.source.value == UPLOAD:
            if self._upload_image is None:
                raise VisualSearchError(self._upload_error
                                        or "no file uploaded yet: use the upload button, or switch to the query split")
            return self._upload_image, None, self._upload_name
        path = self.dropdown.value
        return path, self._labels.get(path), Path(path).name

    def run(self):
        """Search with the current settings and redraw the output; returns the SearchResult (None on error)."""
        from vslib.images import ImageError

        if self._busy:
            return self.last_result
        self._busy = True
        try:
            image, label, name = self.query()
            result = self.engine().search(image, k=self.k_slider.value, mode=self.mode.value)
            result.query = str(image) if isinstance(image, str) else name
            self.last_query, self.last_result, self.last_error = image, result, None
            self.last_html = render_result(result, image, query_label=label, query_name=name, thumb=self.thumb)
        except (VisualSearchError, ImageError) as e:
            self.last_result, self.last_error = None, str(e)
            self.last_html = (f'<div style="color:{BAD}"><b>Cannot search:</b> {html.escape(str(e))}</div>')
        finally:
            self._busy = False
        self.output.value = self.last_html
        return self.last_result

    def show(self):
        """Display the widget (and run a first search)."""
        from IPython.display import display

        display(self.widget)
        self.run()

    def close(self) -> None:
        for backend in list(self._own):
            self._engines.pop(backend).close()
        self._own.clear()
        shutil.rmtree(self._tmp, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


__all__ = ["QueryExplorer", "elasticsearch_status", "render_result"]
