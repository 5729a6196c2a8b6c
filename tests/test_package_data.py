"""The static files (the pages' CSS and JavaScript under vslib/static/) are in a non-editable install.

The project is built into a wheel from a copy of its sources, the wheel is installed into a folder of its own,
and that folder's vslib reads them through importlib.resources, as an installed package would.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # a wheel build: about 45 s on a busy machine

ROOT = Path(__file__).resolve().parents[1]
STATIC = ROOT / "vslib" / "static"


def _offline_backend() -> bool:
    """Whether this interpreter's setuptools can build the project without fetching one ([build-system] requires)."""
    try:
        import setuptools
    except ImportError:
        return False
    return int(setuptools.__version__.split(".")[0]) >= 77


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    shutil.copytree(ROOT / "vslib", src / "vslib", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    dist = tmp_path_factory.mktemp("dist")
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", str(dist), str(src)]
    if _offline_backend():
        cmd.insert(4, "--no-build-isolation")
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    (whl,) = dist.glob("visualsearch-*.whl")
    return whl


def _static_files() -> list[str]:
    files = sorted(p.relative_to(ROOT).as_posix() for p in STATIC.rglob("*") if p.is_file())
    assert "vslib/static/compare.css" in files and "vslib/static/compare.js" in files
    return files


def test_the_wheel_holds_every_static_file_and_the_experiments_package(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    assert not [f for f in _static_files() if f not in names]
    assert {"vslib/experiments/__init__.py", "vslib/experiments/compare.py", "vslib/stages.py"} <= names


def test_an_installed_vslib_reads_them_through_importlib_resources(wheel, tmp_path):
    site = tmp_path / "site"
    r = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "--quiet", "--target",
                        str(site), str(wheel)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    code = ("import json, sys; sys.path.insert(0, sys.argv[1]); import vslib; "
            "from importlib import resources; "
            "base = resources.files('vslib').joinpath('static'); "
            "print(json.dumps({'vslib': vslib.__file__, 'files': {n: base.joinpath(*n.split('/')).read_text("
            "encoding='utf-8') for n in sys.argv[2:]}}))")
    rel = [f[len("vslib/static/"):] for f in _static_files()]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    r = subprocess.run([sys.executable, "-c", code, str(site), *rel], capture_output=True, text=True, cwd=tmp_path,
                       env=env, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout)
    assert Path(out["vslib"]).is_relative_to(site)  # the installed copy, not this checkout
    assert out["files"] == {n: (STATIC / n).read_text(encoding="utf-8") for n in rel}
