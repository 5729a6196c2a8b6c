"""Shared fixtures: small configs written into temporary folders."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

from vslib.config import load_config


def write_config(dir_: Path, data: dict, name: str = "application.yaml") -> Path:
    """Write a YAML config whose outputs (data, models, reports) stay inside ``dir_``."""
    data = dict(data)
    data.setdefault("paths", {"data": "data", "models": "models", "reports": "reports"})
    p = Path(dir_) / name
    p.write_text(yaml.safe_dump(data, sort_keys=False))
    return p


def tux_config(dir_: Path, **sections):
    """A small Tux Paint config (at most 12 stamps a class, lite0) in ``dir_``; ``sections`` update its sections."""
    data = {
        "dataset": {"name": "tuxpaint", "max_per_class": 12, "install": False},
        "backbone": {"name": "efficientnet_lite0", "batch_size": 32, "workers": 2},
    }
    for k, v in sections.items():
        data[k] = {**data.get(k, {}), **v}
    return load_config(write_config(dir_, data))


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
