"""The numbered notebooks: committed clean, run end to end by papermill, exported to HTML.

The full run executes all six notebooks on a small Tux Paint subset in a
temporary project (under a minute on two CPU cores, most of it kernel
start-up, TensorFlow imports and UMAP's first compilation), so it is not
marked slow.
"""
from __future__ import annotations

import dataclasses
import json
import re
import sys
from pathlib import Path

import nbformat
import papermill as pm
import pytest

from conftest import NOTEBOOK_PROJECT, REPORT_PARAMETERS, write_tux_config
from vslib import report
from vslib.config import ConfigError, load_config
from vslib.paths import NOTEBOOKS_DIR, PROJ_ROOT
from vslib.report import ReportError, error_outputs, list_notebooks, notebook_config, run_notebooks

EXPECTED = ["01_train_classifier.ipynb", "02_extract_features.ipynb", "03_index.ipynb",
            "04_evaluate_retrieval.ipynb", "05_query_explorer.ipynb", "06_compare_runs.ipynb"]
#: small settings for the notebooks' own parameters

def _config(dir_: Path, **sections) -> Path:
    return write_tux_config(dir_, NOTEBOOK_PROJECT, **sections)


# ---------------------------------------------------------------------------
# The committed notebooks


def test_the_five_numbered_notebooks_exist_in_order():
    assert [p.name for p in list_notebooks()] == EXPECTED


@pytest.mark.parametrize("name", EXPECTED)
def test_committed_without_outputs_and_with_one_documented_parameters_cell(name):
    nb = nbformat.read(str(NOTEBOOKS_DIR / name), as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(not c.outputs and c.execution_count is None for c in code), f"{name} has outputs"
    tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1, f"{name}: {len(tagged)} cells tagged parameters"
    assert nb.cells[0].cell_type == "markdown" and nb.cells[0].source.startswith("# ")
    params = pm.inspect_notebook(str(NOTEBOOKS_DIR / name))
    assert {"config_path", "dataset", "backbone", "backend", "max_per_class", "data_dir", "reports_dir"} <= set(params)
    for p in params.values():
        assert p["help"], f"{name}: parameter {p['name']} has no comment"


def test_notebook_config_applies_the_parameters(tmp_path):
    path = _config(tmp_path)
    cfg = notebook_config(path, backend="elasticsearch", max_per_class=5, max_queries=3,
                          reports_dir=str(tmp_path / "out"), overrides={"evaluation": {"grid_queries": 1}})
    assert cfg.index.backend == "elasticsearch" and cfg.dataset.max_per_class == 5
    assert cfg.evaluation.max_queries == 3 and cfg.evaluation.grid_queries == 1
    assert cfg.reports_dir == tmp_path / "out" and cfg.data_dir == tmp_path / "data"
    assert notebook_config(path).dataset.max_per_class == 8  # None keeps the file's value
    with pytest.raises(ConfigError, match="index.backend 'elastic'"):
        notebook_config(path, backend="elastic")


def test_parameters_round_trip_through_notebook_config(tmp_path):
    cfg = load_config(_config(tmp_path), overrides={"index": {"backend": "elasticsearch"}})
    params = report.notebook_parameters(cfg)
    assert Path(params["config_path"]).is_absolute() and Path(params["reports_dir"]).is_absolute()
    again = notebook_config(**params)
    assert (again.data_dir, again.models_dir, again.reports_dir) == (cfg.data_dir, cfg.models_dir, cfg.reports_dir)
    assert dataclasses.replace(again, paths=cfg.paths) == cfg


# ---------------------------------------------------------------------------
# Running them


@pytest.fixture(scope="module")
def project(notebook_reports):
    """The session's small project, its notebooks run into reports (read only)."""
    return notebook_reports.cfg


@pytest.fixture(scope="module")
def full_run(notebook_reports):
    return notebook_reports.runs, notebook_reports.lines


@pytest.fixture
def own_project(tmp_path):
    """A small project of this test's own, nothing run yet (for the notebooks a test makes fail)."""
    return load_config(_config(tmp_path))


def test_all_notebooks_run_into_html_reports(project, full_run):
    runs, lines = full_run
    out = project.reports_dir
    assert [r["name"] for r in runs] == EXPECTED and all(r["status"] == "ok" for r in runs)
    for name in EXPECTED:
        stem = Path(name).stem
        html = out / f"{stem}.html"
        executed = out / "notebooks" / name
        assert html.stat().st_size > 10_000, html
        assert executed.exists()
        assert error_outputs(executed) == [], f"{name} has error outputs"
        assert any(name in ln and "ok" in ln for ln in lines), lines  # progress per notebook
    index = (out / "index.html").read_text()
    for name in EXPECTED:  # the link to the HTML report says so; the executed notebook is linked by its name
        assert f'href="{Path(name).stem}.html">{Path(name).stem}</a>' in index
        assert f'href="notebooks/{name}">{name}</a>' in index
    assert "Retrieval summary" in index  # notebook 04's evaluation, summarised
    # outputs went to the configured folders, not the project's
    for fig in ("class_counts.png", "confusion_matrix.png", "similarity_histogram.png", "precision_at_k.png",
                "umap.png", "results_adaptive.png", "per_class.png", "modes_side_by_side.png"):
        assert (project.figures_dir / fig).exists(), fig
    assert json.loads((out / "evaluation.json").read_text())["n_query"] == 24


def test_the_executed_notebooks_used_the_injected_parameters_and_this_venv(project, full_run):
    nb = nbformat.read(str(project.reports_dir / "notebooks" / "04_evaluate_retrieval.ipynb"), as_version=4)
    injected = [c for c in nb.cells if "injected-parameters" in c.metadata.get("tags", [])]
    assert len(injected) == 1
    src = injected[0].source
    assert repr(str(project.reports_dir)) in src or f'"{project.reports_dir}"' in src
    assert "umap_points = 120" in src and "start_k" not in src  # each notebook gets the parameters it declares
    setup = "".join(o.get("text", "") for o in nb.cells[2].outputs)
    assert str(Path(sys.executable).parent) in setup, setup  # the kernel ran this venv's python
    explorer_nb = nbformat.read(str(project.reports_dir / "notebooks" / "05_query_explorer.ipynb"), as_version=4)
    shown = [o for c in explorer_nb.cells for o in c.get("outputs", []) if "text/html" in o.get("data", {})]
    # the explorer is displayed once, as a live widget with a static snapshot beside it
    assert len(shown) == 1 and "application/vnd.jupyter.widget-view+json" in shown[0]["data"]
    assert "predicted classes" in shown[0]["data"]["text/html"]


def test_the_html_reports_load_nothing_from_the_internet_and_show_no_stderr(project, full_run):

    for name in EXPECTED:
        page = (project.reports_dir / f"{Path(name).stem}.html").read_text()
        external = re.findall(r'(?:src|href)=["\'](https?://[^"\']+)', page)
        assert external == [], f"{name}: {external}"
        assert "require.min.js" not in page and "mathjax" not in page.lower()
        assert 'data-mime-type="application/vnd.jupyter.stderr"' not in page, f"{name} shows stderr output"
    explorer = (project.reports_dir / "05_query_explorer.html").read_text()
    assert explorer.count('class="vs-col"') == 3  # the snapshot: flat | hierarchical | adaptive
    assert "widget-view+json" not in explorer  # no empty widget box waiting for a widget manager
    executed = nbformat.read(str(project.reports_dir / "notebooks" / "05_query_explorer.ipynb"), as_version=4)
    texts = [o.get("text", "") for c in executed.cells for o in c.get("outputs", []) if o.get("name") == "stderr"]
    assert texts == []
    notice = [o for c in executed.cells for o in c.get("outputs", []) if "Elasticsearch is not offered" in str(o)]
    assert len(notice) == 1  # once, in the explorer


def test_tables_show_counts_as_integers(project, full_run):
    nb = nbformat.read(str(project.reports_dir / "notebooks" / "01_train_classifier.ipynb"), as_version=4)
    html = "".join(o["data"].get("text/html", "") for c in nb.cells for o in c.get("outputs", []) if "data" in o)
    assert "<th>n</th>" in html and not re.search(r"<th>n</th>\s*<td>\d+\.0+</td>", html)
    assert "predicted as" in html  # the most-confused pairs


def test_the_figures_are_legible_at_the_size_the_notebooks_show_them():
    """No text smaller than plots.MIN_TEXT_PX screen pixels, with 35 classes as on Tux Paint."""
    import numpy as np
    import pandas as pd

    from vslib import plots

    root = Path("/usr/share/tuxpaint/stamps")
    if not root.is_dir():
        pytest.skip("needs Debian's tuxpaint-stamps-default (`visualsearch data install`)")
    paths = sorted(str(p) for p in root.rglob("*.png"))[:60]
    labels = [f"group{i % 7}/category-{i:02d}" for i in range(35)]
    rng = np.random.default_rng(0)
    counts = pd.DataFrame({"index": rng.integers(5, 40, 35), "query": rng.integers(1, 9, 35)}, index=labels)
    cm = rng.integers(0, 3, (35, 35)) + np.diag(rng.integers(3, 9, 35))
    per_class = pd.DataFrame(rng.random((35, 3)), index=labels, columns=["flat", "hierarchical", "adaptive"])
    hits = [[{"path": p, "label": labels[j % 3], "score": 0.5} for j, p in enumerate(paths[q * 5:(q + 1) * 5])]
            for q in range(3)]
    shown = {  # figure -> the width its notebook shows it at
        "class counts (01)": (plots.class_counts(counts, title="Images per class"), 700),
        "sample grid (01)": (plots.sample_grid({lbl: paths[i * 5:(i + 1) * 5] for i, lbl in enumerate(labels[:12])},
                                               per_class=5), 760),
        "confusion matrix (01)": (plots.confusion_matrix({"labels": labels, "matrix": cm.tolist()}), 900),
        "per class (04)": (plots.per_class_bars(per_class, k=10), 820),
        "modes side by side (04)": (plots.mode_comparison(paths[:3], labels[:3], {m: hits for m in per_class}, k=5),
                                    820),
        "precision@k (04)": (plots.precision_curve(
            {"modes": {m: {"p@1": 0.5, "p@5": 0.4, "p@10": 0.3} for m in per_class}, "dataset": "tuxpaint",
             "backbone": "efficientnet_lite0", "n_query": 137}, [1, 5, 10]), 600),
    }
    small = {name: round(plots.smallest_text_px(fig, width), 1) for name, (fig, width) in shown.items()}
    assert all(px >= plots.MIN_TEXT_PX for px in small.values()), small
    table = plots.most_confused({"labels": labels, "matrix": cm.tolist()}, n=5)
    assert list(table.columns) == ["true class", "predicted as", "mistakes", "class images", "share"] and len(table) == 5
    assert table["mistakes"].is_monotonic_decreasing and table["mistakes"].dtype.kind == "i"


def test_a_failing_notebook_names_the_notebook_and_the_cell(own_project):
    with pytest.raises(ReportError) as err:
        run_notebooks(own_project, notebooks=["03"], parameters={"backend": "bogus"}, echo=lambda *_: None)
    e = err.value
    msg = str(e)
    assert e.notebook == "03_index.ipynb" and e.cell is not None
    assert "03_index.ipynb" in msg and f"cell {e.cell}" in msg and "'bogus' is not allowed" in msg
    assert "notebook_config" in msg  # the failing cell's first line
    assert e.executed.exists() and (own_project.reports_dir / "03_index.html").exists()  # what ran is exported
    index = (own_project.reports_dir / "index.html").read_text()
    assert "failed" in index


def test_a_missing_config_file_is_reported_with_the_notebook(own_project, tmp_path):
    with pytest.raises(ReportError, match=r"02_extract_features.ipynb failed in cell \d+.*does not exist"):
        run_notebooks(own_project, notebooks=["02_extract_features"], echo=lambda *_: None,
                      parameters={"config_path": str(tmp_path / "missing.yaml")})


def test_unknown_notebook_names_the_available_ones(own_project):
    with pytest.raises(ReportError, match="'07_nothing' not found.*01_train_classifier.ipynb"):
        run_notebooks(own_project, notebooks=["07_nothing"], echo=lambda *_: None)


def test_the_cli_report_command_reaches_run_notebooks(monkeypatch, tmp_path):
    from vslib import cli

    seen = {}
    monkeypatch.setattr(report, "run_notebooks", lambda cfg, **kw: seen.setdefault("cfg", cfg))
    assert cli.main(["report", "-c", str(_config(tmp_path))]) == 0
    assert seen["cfg"].dataset.max_per_class == 8


def test_makefile_report_and_demo_targets_produce_the_reports():
    make = (PROJ_ROOT / "Makefile").read_text()
    assert "visualsearch report -c $(CONFIG)" in make
    assert "run -c $(CONFIG) --report" in make


def test_make_lab_opens_jupyterlab_on_the_notebooks_as_root_too():
    import subprocess

    out = subprocess.run(["make", "-n", "lab", "STAMP=Makefile"], cwd=PROJ_ROOT, capture_output=True, text=True,
                         check=True).stdout
    line = next(ln for ln in out.splitlines() if "jupyter lab" in ln)
    assert "notebooks/" in line
    import os

    assert ("--allow-root" in line) == (os.geteuid() == 0)


@pytest.mark.elasticsearch
def test_index_notebook_on_elasticsearch_shows_the_mapping(tmp_path, es_url):
    import os

    cfg = load_config(_config(tmp_path, index={"backend": "elasticsearch", "elasticsearch": {
        "hosts": [es_url], "index_name": f"vs-nb-{os.getpid()}"}}))
    try:
        runs = run_notebooks(cfg, notebooks=["03_index"], echo=lambda *_: None)
    finally:
        from vslib.index import IndexNotFoundError, open_index

        try:
            open_index(cfg, create=False).drop()  # leave a real cluster (VS_ES_URL) as it was
        except IndexNotFoundError:
            pass
    assert runs[0]["status"] == "ok"
    nb = nbformat.read(str(cfg.reports_dir / "notebooks" / "03_index.ipynb"), as_version=4)
    text = "".join(o.get("text", "") for c in nb.cells for o in c.get("outputs", []))
    assert '"dense_vector"' in text and '"similarity": "dot_product"' in text  # the mapping, as the cluster has it
    assert "items in the elasticsearch index" in text
