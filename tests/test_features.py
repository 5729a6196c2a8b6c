"""Feature extraction: batched pipeline, resumable content-hash cache, skipped images."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import skimage.data
from PIL import Image

from vslib import extraction, features
from vslib.backbones import get_backbone
from vslib.errors import VisualSearchError
from vslib.embedding import embed_images
from vslib.extraction import extract
from vslib.feature_cache import FeatureCache
from vslib.features import FeatureSet, load_features

from conftest import manifest_of, real_images


@pytest.fixture
def images(tmp_path) -> list[Path]:
    """~24 real images: Tux Paint stamps if installed, else scikit-image pictures, resized variants."""
    return real_images(tmp_path / "img", 24, step=7)


@pytest.fixture
def setup(make_config, images):
    cfg = make_config({"backbone": {"name": "efficientnet_lite0", "batch_size": 8, "workers": 2}})
    manifest = manifest_of(images)
    cfg.manifest_path.parent.mkdir(parents=True, exist_ok=True)
    manifest.to_parquet(cfg.manifest_path)
    return cfg, manifest


@pytest.mark.slow
def test_extract_then_rerun_computes_nothing(setup):
    cfg, manifest = setup
    fs = extract(cfg, progress=False, manifest=manifest)
    assert len(fs) == len(manifest) and fs.stats["computed"] == len(set(manifest.content_hash))
    assert fs.vectors.dtype == np.float32 and fs.vectors.shape == (len(manifest), 1280)
    np.testing.assert_allclose(np.linalg.norm(fs.vectors, axis=1), 1.0, rtol=1e-5)
    assert list(fs.table.columns) == ["path", "label", "split", "content_hash"]
    assert fs.table["path"].tolist() == manifest["path"].tolist()

    again = extract(cfg, progress=False, manifest=manifest)
    assert again.stats["computed"] == 0 and again.stats["reused"] == len(set(manifest.content_hash))
    np.testing.assert_array_equal(again.vectors, fs.vectors)

    loaded = load_features(cfg)
    np.testing.assert_array_equal(loaded.vectors, fs.vectors)
    assert loaded.table.equals(fs.table) and loaded.backbone == "efficientnet_lite0"
    q, ix = loaded.split("query"), loaded.split("index")
    assert len(q) + len(ix) == len(loaded) and set(q.table["split"]) == {"query"}
    np.testing.assert_array_equal(q.vectors, fs.vectors[(fs.table["split"] == "query").to_numpy()])


def test_extract_reads_the_manifest_by_default(setup):
    cfg, manifest = setup
    fs = extract(cfg, progress=False)
    assert len(fs) == len(manifest)


class Killed(Exception):
    pass


def test_killed_run_resumes_and_matches_a_full_run(setup, make_config):
    cfg, manifest = setup

    def die_after_two(batches, done):
        if batches == 2:
            raise Killed

    with pytest.raises(Killed):
        extract(cfg, progress=False, manifest=manifest, on_batch=die_after_two)
    key = extraction.backbone_key(get_backbone("efficientnet_lite0"))
    assert len(FeatureCache(cfg.features_dir / "shards", "efficientnet_lite0", key)) == 16  # 2 batches of 8 kept

    resumed = extract(cfg, progress=False, manifest=manifest)
    n = len(set(manifest.content_hash))
    assert resumed.stats["reused"] == 16 and resumed.stats["computed"] == n - 16

    # the same images from scratch in another data folder
    fresh_cfg = make_config({"backbone": {"name": "efficientnet_lite0", "batch_size": 5},
                             "paths": {"data": "data2", "models": "models"}})
    full = extract(fresh_cfg, progress=False, manifest=manifest)
    assert full.stats["computed"] == n
    np.testing.assert_allclose(resumed.vectors, full.vectors, atol=1e-5)
    # compaction left one shard
    assert len(list((cfg.features_dir / "shards").glob("*.npz"))) == 1


@pytest.mark.slow
def test_backbone_change_uses_a_separate_cache(setup, make_config):
    cfg, manifest = setup
    lite0 = extract(cfg, progress=False, manifest=manifest)
    cfg2 = make_config({"backbone": {"name": "efficientnet_lite2", "batch_size": 8}})
    assert cfg2.features_dir != cfg.features_dir
    lite2 = extract(cfg2, progress=False, manifest=manifest)
    assert lite2.stats["computed"] == lite0.stats["computed"]  # nothing reused across backbones
    assert lite2.backbone == "efficientnet_lite2"
    assert load_features(cfg).backbone == "efficientnet_lite0"
    assert not np.allclose(lite0.vectors, lite2.vectors)


def test_foreign_shards_are_never_mixed_in(setup):
    cfg, manifest = setup
    shards = cfg.features_dir / "shards"
    h = manifest.content_hash.iloc[0]
    FeatureCache(shards, "efficientnet_lite2", "efficientnet_lite2:x").add([h], np.full((1, 1280), 1280 ** -0.5, np.float32))
    fs = extract(cfg, progress=False, manifest=manifest)
    assert fs.stats["reused"] == 0
    assert not np.allclose(fs.vectors[0], 1280 ** -0.5)  # a unit vector: shards hold only unit vectors


def test_bad_images_are_reported_as_skipped(setup, tmp_path):
    cfg, manifest = setup
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    extra = manifest_of([bad, empty], labels=["x", "x"])
    extra.loc[1, "content_hash"] = "e" * 64
    m = pd.concat([manifest, extra], ignore_index=True)
    fs = extract(cfg, progress=False, manifest=m)
    assert fs.stats["skipped"] == 2 and len(fs) == len(manifest)
    reasons = dict(zip(fs.skipped["path"], fs.skipped["reason"]))
    assert "empty" in reasons[str(empty)] and reasons[str(bad)]
    assert "skipped" in extraction.summary(fs) and str(bad) in extraction.summary(fs)


def test_embed_images_matches_extraction(setup):
    cfg, manifest = setup
    fs = extract(cfg, progress=False, manifest=manifest)
    bb = get_backbone("efficientnet_lite0")
    paths = manifest["path"].tolist()[:3]
    v = embed_images(bb, paths + [Image.open(paths[0]), skimage.data.chelsea()])
    assert v.shape == (5, 1280) and v.dtype == np.float32
    np.testing.assert_allclose(v[:3], fs.vectors[:3], atol=1e-5)
    np.testing.assert_allclose(v[3], v[0], atol=1e-5)
    with pytest.raises(VisualSearchError, match="file not found"):
        embed_images(bb, ["/no/such/file.png"])


def test_load_features_without_extract_says_what_to_run(make_config):
    cfg = make_config({})
    with pytest.raises(VisualSearchError, match="visualsearch extract -c"):
        load_features(cfg)


def test_featureset_checks_alignment():
    with pytest.raises(ValueError):
        FeatureSet(np.zeros((2, 4), np.float32), pd.DataFrame({c: ["a"] for c in features.TABLE_COLUMNS}), "x")


def test_rerun_with_everything_cached_does_not_load_tensorflow(setup):
    import subprocess
    import sys

    cfg, manifest = setup
    extract(cfg, progress=False)
    code = ("import sys; from vslib.config import load_config; from vslib.extraction import extract; "
            f"fs = extract(load_config({str(cfg.base_dir / 'application.yaml')!r}), progress=False); "
            "assert fs.stats['computed'] == 0 and fs.stats['reused'] > 0, fs.stats; "
            "assert 'tensorflow' not in sys.modules; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-2000:]


def test_cache_is_shared_by_the_runtimes_because_their_vectors_agree(setup, make_config):
    """A cache filled on Keras is reused on TensorFlow Lite (and back): the same key, vectors within tolerance."""
    from vslib import runtime

    cfg, manifest = setup
    n = len(set(manifest.content_hash))
    keras_cfg = make_config({"backbone": {"name": "efficientnet_lite0", "batch_size": 8, "runtime": "keras"}})
    on_keras = extract(keras_cfg, progress=False, manifest=manifest)
    assert on_keras.stats["computed"] == n
    on_tflite = extract(cfg, progress=False, manifest=manifest)  # runtime: auto -> TensorFlow Lite on this CPU
    assert get_backbone("efficientnet_lite0").runtime == "tflite"
    assert on_tflite.stats["computed"] == 0 and on_tflite.stats["reused"] == n
    # what makes the reuse sound: computed afresh on TensorFlow Lite, the vectors agree with the cached ones
    fresh_cfg = make_config({"backbone": {"name": "efficientnet_lite0", "batch_size": 8},
                             "paths": {"data": "data-tflite", "models": "models"}})
    fresh = extract(fresh_cfg, progress=False, manifest=manifest)
    assert fresh.stats["computed"] == n
    assert runtime.min_cosine(fresh.vectors, on_keras.vectors) >= runtime.MIN_COSINE
    assert extraction.backbone_key(get_backbone("efficientnet_lite0")) == \
        extraction.backbone_key(get_backbone("efficientnet_lite0", runtime="keras"))
