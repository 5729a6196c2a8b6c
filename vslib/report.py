"""Notebook reports: run ``notebooks/NN_*.ipynb`` in order with papermill, export HTML.

>>> run_notebooks(load_config("application.yaml"))          # doctest: +SKIP
[1/5] 01_train_classifier.ipynb ... ok (14.2 s) -> reports/01_train_classifier.html
...

Every notebook has one cell tagged ``parameters``; :func:`notebook_parameters`
derives their values from a :class:`~vslib.config.Config`, so a report shows
exactly the configured run. Inside a notebook, :func:`notebook_config` turns
those parameters back into a Config, and :func:`ensure` runs (or reuses) the
stages the notebook depends on, so each notebook also runs on its own.

Executed copies go to ``reports/notebooks/``, HTML to ``reports/NN_*.html``
and an index page to ``reports/index.html``. A failing notebook stops the run
with a :class:`ReportError` naming the notebook, the cell and the error; what
ran until then is still exported.
"""
from __future__ import annotations

import contextlib
import html
import json
import logging
import os
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

from vslib import stages
from vslib.config import Config, load_config, merge
from vslib.errors import VisualSearchError
from vslib.evaluate import RESULTS_JSON, fmt_number, load_results
from vslib.paths import NOTEBOOKS_DIR
from vslib.redact import redact_text, secret_env

log = logging.getLogger(__name__)

#: stages :func:`ensure` knows, in pipeline order (those of :data:`vslib.stages.STAGES` before ``evaluate``)
STAGES = stages.STAGES[: stages.STAGES.index("index") + 1]
INDEX_PAGE = "index.html"
EXECUTED_DIR = "notebooks"


class ReportError(VisualSearchError):
    """A notebook failed while building the reports (names the notebook and the cell)."""

    def __init__(self, message: str, *, notebook: str = "", cell: Optional[int] = None,
                 executed: Optional[Path] = None):
        super().__init__(message)
        self.notebook = notebook
        self.cell = cell
        self.executed = executed


# ---------------------------------------------------------------------------
# Inside a notebook


def notebook_config(config_path: str | os.PathLike, *, dataset: Optional[str] = None,
                    backbone: Optional[str] = None, backend: Optional[str] = None,
                    max_per_class: Optional[int] = None, max_queries: Optional[int] = None,
                    data_dir: Optional[str] = None, models_dir: Optional[str] = None,
                    reports_dir: Optional[str] = None, overrides: Optional[dict] = None) -> Config:
    """The :class:`Config` a notebook's ``parameters`` cell describes.

    ``None`` keeps the value of the config file; anything else overrides it.
    ``overrides`` is a nested mapping for settings without a parameter of their own.
    """
    over: dict = {}

    def put(section: str, key: str, value) -> None:
        if value is not None:
            over.setdefault(section, {})[key] = value

    put("dataset", "name", dataset)
    put("dataset", "max_per_class", max_per_class)
    put("backbone", "name", backbone)
    put("index", "backend", backend)
    put("evaluation", "max_queries", max_queries)
    put("paths", "data", None if data_dir is None else str(data_dir))
    put("paths", "models", None if models_dir is None else str(models_dir))
    put("paths", "reports", None if reports_dir is None else str(reports_dir))
    if overrides:
        over = merge(over, overrides)
    return load_config(config_path, overrides=over or None)


def notebook_parameters(cfg: Config) -> dict:
    """Papermill parameters that make a notebook rebuild ``cfg`` (absolute paths: notebooks run in notebooks/)."""
    path = Path(cfg.base_dir) / cfg.source
    if not path.is_file():
        raise ReportError(f"the notebooks need the settings file, but {path} does not exist (a Config made "
                          "from a dict cannot be passed to a notebook; write it to a YAML file and load_config it)")
    return {
        "config_path": str(path.resolve()),
        "dataset": cfg.dataset.name,
        "backbone": cfg.backbone.name,
        "backend": cfg.index.backend,
        "max_per_class": cfg.dataset.max_per_class,
        "max_queries": cfg.evaluation.max_queries,
        "data_dir": str(cfg.data_dir.resolve()),
        "models_dir": str(cfg.models_dir.resolve()),
        "reports_dir": str(cfg.reports_dir.resolve()),
    }


def ensure(cfg: Config, upto: str = "index", *, echo: Callable[[str], None] = print) -> dict:
    """Run the stages up to ``upto`` (prepare, extract, train, index), reusing what is already done.

    The manifest is reused when present, the feature cache and the classifier
    are reused by their own checks, and the index is built only when it is
    missing or holds another number of items than the index split
    (:func:`vslib.stages.index_action`). Returns ``{stage: seconds}``.
    """
    if upto not in STAGES:
        raise ValueError(f"upto={upto!r} is not a stage (choices: {', '.join(STAGES)})")
    runner = stages.Runner(cfg, echo=echo, progress=False, skip_done=("prepare", "index"))
    runner.run(upto)
    echo("ready: " + ", ".join(f"{k} {v:.1f} s" for k, v in runner.timings.items()))
    return runner.timings


# ---------------------------------------------------------------------------
# Running the notebooks


def list_notebooks(folder: Path = NOTEBOOKS_DIR) -> list[Path]:
    """The numbered notebooks ``NN_*.ipynb`` of ``folder``, in run order."""
    return sorted(p for p in Path(folder).glob("[0-9][0-9]_*.ipynb") if p.is_file())


def _resolve(notebooks: Optional[Sequence], folder: Path) -> list[Path]:
    available = list_notebooks(folder)
    if notebooks is None:
        if not available:
            raise ReportError(f"no numbered notebooks (NN_*.ipynb) in {folder}")
        return available
    out = []
    for nb in notebooks:
        p = Path(nb)
        if not p.suffix:
            p = p.with_suffix(".ipynb")
        if not p.is_absolute():
            match = [a for a in available if a.name == p.name or a.name.startswith(p.stem + "_")]
            p = match[0] if match else folder / p
        if not p.is_file():
            raise ReportError(f"notebook {nb!r} not found in {folder} (available: "
                              f"{', '.join(a.name for a in available) or 'none'})")
        out.append(p)
    return out


def _declared_parameters(path: Path) -> set[str]:
    import papermill as pm

    return set(pm.inspect_notebook(str(path)))


#: nbconvert's lab template without what it fetches from the internet (require.js, MathJax,
#: mermaid, the widget manager): the reports must work offline
OFFLINE_TEMPLATE = """{%- extends 'index.html.j2' -%}
{%- block html_head_js -%}{%- endblock html_head_js -%}
{%- block jupyter_widgets -%}{%- endblock jupyter_widgets -%}
{%- block html_head_js_mathjax -%}{%- endblock html_head_js_mathjax -%}
{%- block html_head_js_mermaidjs -%}{%- endblock html_head_js_mermaidjs -%}
"""
WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"
WIDGET_NOTE = ('<p style="color:#666"><i>An interactive widget: open the notebook in JupyterLab '
               "(<code>make lab</code>) to use it.</i></p>")


def offline_notebook(nb):
    """Drop live-widget outputs (they need a widget manager from a CDN) in favour of their HTML snapshot.

    A widget displayed with a ``text/html`` snapshot (the query explorer) keeps the snapshot;
    one without gets a one-line note instead of an empty box. Changes ``nb`` in place and returns it.
    """
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            data = out.get("data", {})
            if WIDGET_VIEW in data:
                del data[WIDGET_VIEW]
                if "text/html" not in data:
                    data["text/html"] = WIDGET_NOTE
                    data.pop("text/plain", None)
    nb.metadata.pop("widgets", None)
    return nb


def export_html(executed: Path, html_path: Path) -> Path:
    """Export an executed notebook to a self-contained HTML file that needs no network.

    Figures are inline, and nothing is loaded from a CDN: no require.js, MathJax or
    widget manager (widgets are replaced by their static snapshot, see :func:`offline_notebook`).
    """
    import jinja2
    import nbformat
    from nbconvert import HTMLExporter

    nb = offline_notebook(nbformat.read(str(executed), as_version=4))
    quiet = logging.getLogger("traitlets")  # "Alternative text is missing on N image(s)" for every figure
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        exporter = HTMLExporter(template_name="lab", template_file="vs_offline.html.j2",
                                extra_loaders=[jinja2.DictLoader({"vs_offline.html.j2": OFFLINE_TEMPLATE})])
        body, _ = exporter.from_notebook_node(nb)
    finally:
        quiet.setLevel(level)
    html_path.parent.mkdir(parents=True, exist_ok=True)
    html_path.write_text(body, encoding="utf-8")
    return html_path


def error_outputs(executed: Path) -> list[dict]:
    """``{"cell", "ename", "evalue"}`` of every error output in an executed notebook."""
    import nbformat

    nb = nbformat.read(str(executed), as_version=4)
    out = []
    for i, cell in enumerate(nb.cells):
        for o in cell.get("outputs", []):
            if o.get("output_type") == "error":
                out.append({"cell": i, "ename": o.get("ename", ""), "evalue": o.get("evalue", "")})
    return out


def run_notebooks(cfg: Config, notebooks: Optional[Sequence] = None, parameters: Optional[dict] = None, *,
                  folder: Path = NOTEBOOKS_DIR, kernel_name: str = "python3", timeout: Optional[int] = 600,
                  progress_bar: bool = False, echo: Callable[[str], None] = print) -> list[dict]:
    """Execute the notebooks in order, save executed copies, export HTML and an index page.

    Parameters
    ----------
    cfg : Config
        Its settings become the notebooks' parameters (:func:`notebook_parameters`).
    notebooks : list, optional
        Names (``"03_index"``, ``"03"`` or ``"03_index.ipynb"``) or paths; default all ``NN_*.ipynb``.
    parameters : dict, optional
        Extra or overriding parameters; each notebook receives those its ``parameters`` cell declares.
    kernel_name : str
        Jupyter kernel; ``python3`` runs this interpreter (jupyter_client starts ``sys.executable``).
    timeout : int, optional
        Seconds one cell may run.

    Returns
    -------
    list of dict
        Per notebook: ``name``, ``status``, ``seconds``, ``executed`` and ``html`` paths.

    Raises
    ------
    ReportError
        When a notebook fails: names the notebook, the cell and the error, and where
        the executed copy and its HTML are. Later notebooks are not run.
    """
    paths = _resolve(notebooks, Path(folder))
    params = {**notebook_parameters(cfg), **(parameters or {})}
    exec_dir = cfg.reports_dir / EXECUTED_DIR
    exec_dir.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # the kernels inherit it: less TensorFlow chatter
    with _kernel_secrets(cfg):
        return _run_all(cfg, paths, params, exec_dir=exec_dir, kernel_name=kernel_name, timeout=timeout,
                        progress_bar=progress_bar, echo=echo)


@contextlib.contextmanager
def _kernel_secrets(cfg: Config):
    """The config's Elasticsearch secrets in the environment the kernels inherit, for the run only: a notebook
    reading a redacted config (an experiment run's ``config.yaml``) takes them from ``VS_ES_*``, as the CLI
    would, and they are never written into a notebook's parameters or a file."""
    added = {k: v for k, v in secret_env(cfg).items() if not os.environ.get(k)}
    os.environ.update(added)
    try:
        yield
    finally:
        for k in added:
            os.environ.pop(k, None)


def _run_all(cfg: Config, paths: list, params: dict, *, exec_dir: Path, kernel_name: str, timeout: Optional[int],
             progress_bar: bool, echo: Callable[[str], None]) -> list[dict]:
    import papermill as pm
    from papermill.exceptions import PapermillExecutionError

    out_dir = cfg.reports_dir
    logging.getLogger("papermill").setLevel(logging.WARNING)  # our own line per notebook is enough
    runs: list[dict] = []
    t_all = time.perf_counter()
    for n, path in enumerate(paths, 1):
        executed = exec_dir / path.name
        html_path = out_dir / (path.stem + ".html")
        declared = _declared_parameters(path)
        nb_params = {k: v for k, v in params.items() if k in declared}
        echo(f"[{n}/{len(paths)}] {path.name} ...")
        t = time.perf_counter()
        run = {"name": path.name, "title": _title(path), "executed": executed, "html": html_path,
               "parameters": nb_params}
        runs.append(run)
        try:
            pm.execute_notebook(str(path), str(executed), parameters=nb_params, cwd=str(path.parent),
                                kernel_name=kernel_name, progress_bar=progress_bar, log_output=False,
                                execution_timeout=timeout, report_mode=False,
                                # C-level stderr (TensorFlow's banner) goes to the terminal, not into the report
                                extra_arguments=["--IPKernelApp.capture_fd_output=False",
                                                 "--IPKernelApp.log_level=ERROR"])
        except PapermillExecutionError as e:
            run.update(status="failed", seconds=time.perf_counter() - t,
                       error=f"cell {e.cell_index}: {e.ename}: {e.evalue}")
            _export_quietly(executed, html_path)
            write_index(cfg, runs, total=time.perf_counter() - t_all)
            first_line = next((ln.strip() for ln in (e.source or "").splitlines() if ln.strip()), "")
            raise ReportError(
                f"notebook {path.name} failed in cell {e.cell_index} (execution count {e.exec_count}"
                + (f", `{first_line[:80]}`" if first_line else "") + f"): {e.ename}: {e.evalue}\n"
                f"executed copy: {executed}\nHTML: {html_path}",
                notebook=path.name, cell=e.cell_index, executed=executed) from None
        except Exception as e:  # the kernel died, timed out or could not start
            run.update(status="failed", seconds=time.perf_counter() - t, error=f"{type(e).__name__}: {e}")
            _export_quietly(executed, html_path)
            write_index(cfg, runs, total=time.perf_counter() - t_all)
            raise ReportError(f"notebook {path.name} could not be run: {type(e).__name__}: {e}\n"
                              f"executed copy (if any): {executed}", notebook=path.name, executed=executed) from e
        export_html(executed, html_path)
        run.update(status="ok", seconds=time.perf_counter() - t)
        echo(f"[{n}/{len(paths)}] {path.name} ok ({run['seconds']:.1f} s) -> {html_path}")
    index = write_index(cfg, runs, total=time.perf_counter() - t_all)
    echo(f"reports: {index} ({time.perf_counter() - t_all:.1f} s)")
    return runs


def _export_quietly(executed: Path, html_path: Path) -> None:
    """Export what ran of a failed notebook; a failure here is logged, the notebook's own error wins."""
    if not executed.exists():
        return
    try:
        export_html(executed, html_path)
    except Exception as e:  # noqa: BLE001 - best effort, recorded
        log.warning("could not export %s to HTML: %s", executed, e)


def _title(path: Path) -> str:
    """The first markdown heading of a notebook (its title), else its file name."""
    try:
        cells = json.loads(path.read_text(encoding="utf-8")).get("cells", [])
    except (OSError, ValueError):
        return path.stem
    for cell in cells:
        if cell.get("cell_type") == "markdown":
            src = "".join(cell.get("source", []))
            for line in src.splitlines():
                if line.startswith("#"):
                    return line.lstrip("# ").strip()
    return path.stem


def write_index(cfg: Config, runs: Sequence[dict], *, total: Optional[float] = None) -> Path:
    """Write ``reports/index.html``: one link per notebook, its status and time, the evaluation summary."""
    out = cfg.reports_dir / INDEX_PAGE
    rows = []
    for r in runs:
        rel = os.path.relpath(r["html"], out.parent)
        status = r.get("status", "not run")
        colour = {"ok": "#1a9850", "failed": "#d73027"}.get(status, "#777")
        stem = Path(r["name"]).stem
        link = f'<a href="{html.escape(rel)}">{html.escape(stem)}</a>' if Path(r["html"]).exists() \
            else html.escape(stem)
        nb_rel = os.path.relpath(r["executed"], out.parent)
        rows.append(
            f"<tr><td>{link}</td><td>{html.escape(r.get('title', ''))}</td>"
            f'<td style="color:{colour}"><b>{status}</b>'
            + (f"<br><small>{html.escape(redact_text(r['error'], cfg=cfg))}</small>" if r.get("error") else "")
            + f"</td><td>{r.get('seconds', 0):.1f} s</td>"
            f'<td><a href="{html.escape(nb_rel)}">{html.escape(r["name"])}</a></td></tr>')
    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>VisualSearch reports</title>",
        "<style>body{font-family:sans-serif;max-width:60em;margin:2em auto;padding:0 1em}"
        "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:.3em .6em;text-align:left}"
        "th{background:#f3f3f3}</style></head><body>",
        "<h1>VisualSearch reports</h1>",
        f"<p>Dataset <b>{html.escape(cfg.dataset.name)}</b>, backbone <b>{html.escape(cfg.backbone_tag)}</b>, "
        f"<b>{html.escape(cfg.index.backend)}</b> index; settings from <code>{html.escape(cfg.source)}</code>; "
        f"generated {time.strftime('%Y-%m-%d %H:%M:%S')}"
        + (f" in {total:.0f} s" if total is not None else "") + ".</p>",
        "<table><tr><th>report (HTML)</th><th>what it shows</th><th>status</th><th>time</th>"
        "<th>executed notebook</th></tr>",
        *rows, "</table>",
    ]
    parts += _evaluation_section(cfg)
    parts.append("</body></html>")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(parts), encoding="utf-8")
    return out


def _evaluation_section(cfg: Config) -> list[str]:
    try:
        res = load_results(cfg)
        modes = res["modes"]
    except (VisualSearchError, OSError, ValueError, KeyError):  # not evaluated yet, or an unreadable file
        return []
    if not modes:
        return []
    cols = [c for c in next(iter(modes.values())) if c.startswith(("p@", "map@"))] + ["latency_ms_p50"]
    out = ["<h2>Retrieval summary</h2>",
           f"<p>{res.get('n_query')} held-out queries against {res.get('n_index')} indexed images; classifier "
           f"top-1 accuracy on the queries {fmt_number(res.get('classifier_accuracy'))} "
           f"(from <code>{html.escape(RESULTS_JSON)}</code>).</p>",
           "<table><tr><th>mode</th>" + "".join(f"<th>{html.escape(c)}</th>" for c in cols) + "</tr>"]
    for mode, m in modes.items():
        out.append(f"<tr><td>{html.escape(mode)}</td>"
                   + "".join(f"<td>{fmt_number(m.get(c))}</td>" for c in cols) + "</tr>")
    out.append("</table>")
    fig = cfg.figures_dir / "precision_at_k.png"
    if fig.exists():
        out.append(f'<p><img src="{html.escape(os.path.relpath(fig, cfg.reports_dir))}" width="480"></p>')
    return out


__all__ = ["ReportError", "ensure", "error_outputs", "export_html", "list_notebooks", "notebook_config",
           "notebook_parameters", "offline_notebook", "run_notebooks", "write_index"]
