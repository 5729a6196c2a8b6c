"""Damaged feature shards and feature files, made for real on a small Tux Paint project.

Each case copies a clean, extracted project, damages one artifact (truncated, garbled in place
at the same size, deleted), then asserts: a reader fails with one line naming the file (never a
traceback, never wrong vectors), :func:`vslib.features.audit` names it, and ``visualsearch
extract`` exits 0 and leaves a feature file whose every vector is finite, unit length and equal
to the clean run's.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import tux_config
from vslib import feature_cache, features
from vslib.config import load_config
from vslib.errors import VisualSearchError
from vslib.integrity import DAMAGED, DamagedFile, sidecar

ROOT = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, PYTHONPATH=str(ROOT), TF_CPP_MIN_LOG_LEVEL="3", CUDA_VISIBLE_DEVICES="")


def _cli(cfg_path: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vslib.cli", *args, "-c", str(cfg_path)], capture_output=True,
                          text=True, timeout=600, env=ENV, cwd=ROOT)


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    """(project folder, {content_hash: vector}) of a small extracted Tux Paint project (~220 images)."""
    folder = tmp_path_factory.mktemp("clean")
    cfg = tux_config(folder, dataset={"max_per_class": 4, "min_per_class": 2})
    cfg_path = Path(cfg.base_dir) / cfg.source
    for args in (("data", "prepare"), ("extract",)):
        out = _cli(cfg_path, *args)
        assert out.returncode == 0, out.stderr[-3000:]
    fs = features.load_features(load_config(cfg_path))
    return folder, dict(zip(fs.table["content_hash"], fs.vectors))


def _project(clean, tmp_path: Path):
    """A copy of the clean project (its models folder shared): (config path, Config)."""
    folder, _ = clean
    for p in folder.iterdir():
        if p.name == "models":
            (tmp_path / p.name).symlink_to(p)
        elif p.is_dir():
            shutil.copytree(p, tmp_path / p.name)
        else:
            shutil.copy2(p, tmp_path / p.name)
    cfg_path = tmp_path / "application.yaml"
    return cfg_path, load_config(cfg_path)


def _damage(path: Path, how: str) -> None:
    size = path.stat().st_size
    if how == "truncated":
        os.truncate(path, size // 2)
    elif how == "garbled":  # 64 KB overwritten in place, in the vectors (the last, largest member), same size
        with open(path, "r+b") as f:
            f.seek(size // 2)
            f.write(np.random.default_rng(0).bytes(65536))
        assert path.stat().st_size == size
    elif how == "deleted":
        path.unlink()
    else:
        raise ValueError(how)


def _assert_equals_clean(cfg, clean) -> None:
    _, vectors = clean
    fs = features.load_features(cfg)
    assert len(fs) == len(vectors)
    assert np.isfinite(fs.vectors).all()
    assert np.allclose(np.linalg.norm(fs.vectors, axis=1), 1, atol=1e-3)
    want = np.stack([vectors[h] for h in fs.table["content_hash"]])
    cos = np.einsum("ij,ij->i", fs.vectors, want)
    assert (cos >= 0.9999).all(), fs.table["path"][cos < 0.9999].tolist()[:5]
    assert not [f.line() for f in features.audit(cfg) if f.status != "ok"]


def _no_traceback(out: subprocess.CompletedProcess) -> None:
    assert "Traceback" not in out.stderr and "Traceback" not in out.stdout, out.stderr[-3000:]


def _warnings(stderr: str) -> list[str]:
    return [ln for ln in stderr.splitlines() if ln.startswith("WARNING vslib.features")]


@pytest.mark.parametrize("how", ["truncated", "garbled", "deleted"])
def test_a_damaged_shard_is_set_aside_and_exactly_its_images_reextracted(clean, tmp_path, how):
    cfg_path, cfg = _project(clean, tmp_path)
    shards = sorted((cfg.features_dir / feature_cache.SHARDS_DIR).glob("*.npz"))
    assert len(shards) == 1 and sidecar(shards[0]).exists()  # compacted, with its checksum
    shard = shards[0]
    n_images = len(np.load(shard)["hashes"])
    _damage(shard, how)
    features.features_path(cfg).unlink()  # the case: the feature file is rebuilt from the cache
    sidecar(features.features_path(cfg)).unlink()

    findings = [f for f in features.audit(cfg) if f.bad]
    assert [(f.path, f.what) for f in findings] == [(str(shard), "feature shard")]
    assert "re-extract" in findings[0].redo

    out = _cli(cfg_path, "extract")
    _no_traceback(out)
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"{n_images} computed, 0 reused" in out.stderr, out.stderr[-3000:]  # exactly the shard's images
    warned = _warnings(out.stderr)
    if how == "deleted":
        assert not warned, warned  # nothing to set aside: its images are simply not cached
    else:
        assert len(warned) == 1 and str(shard) in warned[0] and f"its {n_images} images" in warned[0], warned
        assert shard.with_name(shard.name + DAMAGED).exists() and not shard.exists()
    _assert_equals_clean(cfg, clean)


def test_a_shard_without_checksum_is_checked_by_its_vectors(clean, tmp_path):
    """A shard an older version wrote (no sidecar), garbled in place: its vectors give it away."""
    cfg_path, cfg = _project(clean, tmp_path)
    shard, = (cfg.features_dir / feature_cache.SHARDS_DIR).glob("*.npz")
    sidecar(shard).unlink()
    _damage(shard, "garbled")
    features.features_path(cfg).unlink()
    sidecar(features.features_path(cfg)).unlink()
    assert [f.path for f in features.audit(cfg) if f.bad] == [str(shard)]
    out = _cli(cfg_path, "extract")
    _no_traceback(out)
    assert out.returncode == 0 and len(_warnings(out.stderr)) == 1, out.stderr[-3000:]
    _assert_equals_clean(cfg, clean)


@pytest.mark.parametrize("how", ["truncated", "garbled", "deleted"])
def test_a_damaged_feature_file_is_one_line_and_extract_rewrites_it(clean, tmp_path, how):
    cfg_path, cfg = _project(clean, tmp_path)
    path = features.features_path(cfg)
    _damage(path, how)

    for read in (lambda: features.read_split(cfg, "index"), lambda: features.load_features(cfg),
                 lambda: list(features.iter_features(cfg, batch_size=64))):
        with pytest.raises(VisualSearchError) as e:
            read()
        message = str(e.value)
        assert str(path) in message and "\n" not in message
        if how == "deleted":
            assert "no features" in message and "visualsearch extract" in message
        else:
            assert isinstance(e.value, DamagedFile) and "rewrites it from the feature cache" in message
    findings = [f for f in features.audit(cfg) if f.bad]
    assert [(f.path, f.what) for f in findings] == [(str(path), "feature file")]

    if how == "garbled":  # a stage that reads the file: one line, exit 2, no traceback
        out = _cli(cfg_path, "train")
        _no_traceback(out)
        errors = [ln for ln in out.stderr.splitlines() if ln.startswith("error: ")]
        assert out.returncode == 2 and len(errors) == 1 and str(path) in errors[0], out.stderr[-3000:]

    out = _cli(cfg_path, "extract")
    _no_traceback(out)
    assert out.returncode == 0 and "0 computed" in out.stderr, out.stderr[-3000:]  # from the cache
    warned = _warnings(out.stderr)
    if how == "deleted":
        assert not warned, warned
    else:
        assert len(warned) == 1 and str(path) in warned[0], warned
        assert path.with_name(path.name + DAMAGED).exists()
    _assert_equals_clean(cfg, clean)


def test_a_backbone_output_that_is_not_unit_length_is_never_cached(clean, tmp_path):
    _, cfg = _project(clean, tmp_path)
    shards = cfg.features_dir / feature_cache.SHARDS_DIR
    before = sorted(shards.iterdir())
    fs = features.load_features(cfg)
    vectors = fs.vectors[:3].copy()
    vectors[1, 5] = np.nan
    cache = feature_cache.FeatureCache(shards, cfg.backbone.name, "some-key")
    names = fs.table["path"][:3].tolist()
    with pytest.raises(VisualSearchError) as e:
        cache.add(fs.table["content_hash"][:3].tolist(), vectors, names)
    assert names[1] in str(e.value) and "not finite" in str(e.value)
    vectors[1] = 2 * fs.vectors[1]
    with pytest.raises(VisualSearchError, match="norm 2"):
        cache.add(fs.table["content_hash"][:3].tolist(), vectors, names)
    assert sorted(shards.iterdir()) == before  # nothing written
