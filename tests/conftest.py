"""Shared fixtures: small configs written into temporary folders, and one small trained pipeline per session."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest
import skimage.data
import yaml
from PIL import Image

from vslib.config import Config, load_config
from vslib.images import file_hash
from vslib.paths import PROJ_ROOT

STAMPS = Path("/usr/share/tuxpaint/stamps")

# the environment of every command-line child: this checkout's vslib, TensorFlow quiet, on the CPU
CLI_ENV = dict(os.environ, PYTHONPATH=str(PROJ_ROOT), TF_CPP_MIN_LOG_LEVEL="3", CUDA_VISIBLE_DEVICES="")


def write_config(dir_: Path, data: dict, name: str = "application.yaml") -> Path:
    """Write a YAML config whose outputs (data, models, reports) stay inside ``dir_``."""
    data = dict(data)
    data.setdefault("paths", {"data": "data", "models": "models", "reports": "reports"})
    p = Path(dir_) / name
    p.write_text(yaml.safe_dump(data, sort_keys=False))
    return p


def tux_data(*layers: dict, **sections) -> dict:
    """The small Tux Paint config as a mapping (at most 12 stamps a class, lite0, outputs beside the config file);
    each of ``layers``, then ``sections``, updates its sections key by key."""
    data = {
        "dataset": {"name": "tuxpaint", "max_per_class": 12, "install": False},
        "backbone": {"name": "efficientnet_lite0", "batch_size": 32, "workers": 2},
        "paths": {"data": "data", "models": "models", "reports": "reports"},
    }
    for layer in (*layers, sections):
        for k, v in layer.items():
            data[k] = {**data.get(k, {}), **v}
    return data


def write_tux_config(dir_: Path, *layers: dict, **sections) -> Path:
    """:func:`tux_data` written as ``dir_/application.yaml``; its path."""
    return write_config(dir_, tux_data(*layers, **sections))


def tux_config(dir_: Path, **sections) -> Config:
    """A small Tux Paint config (:func:`tux_data`) in ``dir_``; ``sections`` update its sections."""
    return load_config(write_tux_config(dir_, **sections))


# an Elasticsearch nothing answers (port 9, discard): the backend must not be offered
ES_NOT_LISTENING = {"index": {"backend": "embedded",
                              "elasticsearch": {"hosts": ["http://127.0.0.1:9"], "request_timeout": 1}}}

# the notebooks' small project, over tux_data's: 8 stamps a class, 24 queries evaluated, no Elasticsearch
NOTEBOOK_PROJECT = {"dataset": {"max_per_class": 8}, "classifier": {"epochs": 30}, **ES_NOT_LISTENING,
                    "evaluation": {"max_queries": 24}}


# the notebooks' parameters that keep a report run small (few samples and queries, a small map)
REPORT_PARAMETERS = {"samples_per_class": 2, "sample_classes": 4, "timing_images": 8, "grid_queries": 2,
                     "compare_queries": 2, "compare_k": 3, "umap_points": 120, "umap_thumbnails": 8, "start_k": 4}


@dataclass
class Reports:
    """``NOTEBOOK_PROJECT`` with every notebook run into HTML reports: its config, the runs and the progress lines."""

    cfg: Config
    runs: list
    lines: list


@pytest.fixture(scope="session")
def notebook_reports(tmp_path_factory) -> Reports:
    """Every notebook run once for the whole session (``REPORT_PARAMETERS``), shared by the report and browser
    tests. Read only: a test that runs a notebook again (a failing one too) works on a project of its own."""
    from vslib.report import run_notebooks

    cfg = load_config(write_tux_config(tmp_path_factory.mktemp("reports"), NOTEBOOK_PROJECT))
    lines: list = []
    runs = run_notebooks(cfg, parameters=REPORT_PARAMETERS, echo=lines.append)
    return Reports(cfg, runs, lines)


# the small trained pipeline's settings, over tux_config's: 10 stamps a class, 3 queries in the result grids
TUX_PIPELINE = {"dataset": {"max_per_class": 10}, "evaluation": {"grid_queries": 3}}


@dataclass
class Pipeline:
    """A project run end to end: its config and the output of the run that built it."""

    cfg: Config
    run: subprocess.CompletedProcess

    @property
    def cfg_path(self) -> Path:
        return Path(self.cfg.base_dir) / self.cfg.source


@pytest.fixture(scope="session")
def tux_pipeline(tmp_path_factory) -> Pipeline:
    """The small Tux Paint project (``TUX_PIPELINE``) prepared, extracted, trained, indexed and evaluated once
    for the whole session, through the original entry point (``VisualSearch.py -yml``, i.e. ``visualsearch run``).

    Read only: a test that writes into a project (damages or deletes its files, reruns or retrains it,
    evaluates into its reports) works on :func:`copy_pipeline`'s copy (the ``tux_pipeline_copy`` fixture)."""
    folder = tmp_path_factory.mktemp("tux-pipeline")
    cfg = tux_config(folder, **TUX_PIPELINE)
    run = subprocess.run([sys.executable, str(PROJ_ROOT / "VisualSearch.py"), "-yml", str(folder / cfg.source)],
                         capture_output=True, text=True, cwd=folder, env=CLI_ENV, timeout=1800)
    assert run.returncode == 0, run.stderr[-3000:]
    built = _files(folder)
    yield Pipeline(cfg, run)
    changed = sorted(set(built.items()) ^ set(_files(folder).items()))
    assert not changed, f"a test wrote into the session's shared pipeline (use tux_pipeline_copy): {changed[:5]}"


def _files(folder: Path) -> dict:
    """``{relative path: (size, mtime_ns)}`` of every file under ``folder``."""
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in folder.rglob("*") if p.is_file()}


def copy_pipeline(pipeline: Pipeline, dir_: Path, *, extracted_only: bool = False, **sections) -> Config:
    """A copy of ``pipeline``'s project (config, data, models, reports) in ``dir_``, and the config that uses it.

    ``extracted_only`` leaves out the classifier, the index and the reports (a project prepared and extracted,
    the stages after it not run); ``sections`` update the copied config's sections, as in :func:`tux_config`."""
    src, dir_ = Path(pipeline.cfg.base_dir), Path(dir_)
    dir_.mkdir(parents=True, exist_ok=True)
    for p in src.iterdir():
        if p.is_dir():
            shutil.copytree(p, dir_ / p.name, symlinks=True)
        else:
            shutil.copy2(p, dir_ / p.name)
    cfg_path = dir_ / pipeline.cfg.source
    if sections:
        data = yaml.safe_load(cfg_path.read_text())
        for k, v in sections.items():
            data[k] = {**data.get(k, {}), **v}
        cfg_path.write_text(yaml.safe_dump(data, sort_keys=False))
    cfg = load_config(cfg_path)
    if extracted_only:
        for d in (cfg.classifier_dir, cfg.index_dir, cfg.reports_dir):
            shutil.rmtree(d)
    return cfg


@pytest.fixture
def tux_pipeline_copy(tux_pipeline, tmp_path) -> Config:
    """This test's own copy of the session's trained pipeline, to damage, rerun or retrain."""
    return copy_pipeline(tux_pipeline, tmp_path / "project")


def real_images(dir_: Path, n: int, step: int) -> list[Path]:
    """``n`` small real images: every ``step``-th Tux Paint stamp if the stamps are installed, else resized
    scikit-image pictures written into ``dir_``."""
    files = sorted(STAMPS.rglob("*.png"))[::step][:n] if STAMPS.exists() else []
    if len(files) >= n:
        return files
    pics = [skimage.data.chelsea(), skimage.data.coffee(), skimage.data.astronaut(), skimage.data.rocket()]
    Path(dir_).mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(n):
        p = Path(dir_) / f"{i:02d}.png"
        Image.fromarray(pics[i % 4]).resize((96 + i, 80 + i)).save(p)
        out.append(p)
    return out


def manifest_of(paths, labels=None) -> pd.DataFrame:
    """A manifest of ``paths`` (labelled by their folder unless ``labels``): every 4th image a query, all usable."""
    rows = []
    for i, p in enumerate(paths):
        rows.append(dict(path=str(p), label=labels[i] if labels else Path(p).parent.name,
                         split="query" if i % 4 == 0 else "index", content_hash=file_hash(p),
                         width=0, height=0, status="ok", reason=""))
    return pd.DataFrame(rows)


@pytest.fixture
def make_config(tmp_path):
    """``make_config({...})`` -> a validated Config living in a temporary folder."""

    def make(data: dict):
        return load_config(write_config(tmp_path, data))

    return make


@pytest.fixture(scope="session")
def es_url():
    """URL of the Elasticsearch to test against: VS_ES_URL, or an emulator started here."""
    from benchmarks.es_server import EsServer, find_binary

    if os.environ.get("VS_ES_URL"):
        yield os.environ["VS_ES_URL"].split(",")[0].strip()
        return
    if find_binary() is None:
        pytest.skip("noida-db is not installed (pip install noida-db==0.2.3) and VS_ES_URL is not set")
    with EsServer() as server:
        yield server.url
