"""Shared fixtures: small configs written into temporary folders."""
from __future__ import annotations

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


@pytest.fixture
def make_config(tmp_path):
    """``make_config({...})`` -> a validated Config living in a temporary folder."""

    def make(data: dict):
        return load_config(write_config(tmp_path, data))

    return make
