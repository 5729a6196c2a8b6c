"""backbone.precision: int8 (vslib.int8): calibrated once, checked against float32, never mixed with float32.

One int8 `visualsearch run` over a copy of the session's float32 pipeline (Tux Paint, 10 stamps a class) backs
the end-to-end tests; the rest are the calibration sample, the fidelity check and the config.
"""
from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from conftest import CLI_ENV, copy_pipeline, write_config
from vslib import int8
from vslib.config import ConfigError, load_config, parse_config
from vslib.datasets import load_manifest
from vslib.errors import BackboneError, VisualSearchError


def _digests(folder: Path) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def int8_project(tux_pipeline, tmp_path_factory):
    """``(float32 config, int8 config, run)``: a copy of the float32 pipeline, then the same project run again
    with ``backbone.precision: int8``; the float32 feature cache's digests before the int8 run are kept."""
    folder = tmp_path_factory.mktemp("int8") / "project"
    f32 = copy_pipeline(tux_pipeline, folder)
    before = _digests(f32.features_dir)
    float32_results = json.loads((f32.reports_dir / "evaluation.json").read_text())  # the int8 run rewrites reports/
    data = yaml.safe_load((folder / f32.source).read_text())
    data["backbone"]["precision"] = "int8"
    cfg_path = write_config(folder, data, name="int8.yaml")
    run = subprocess.run([sys.executable, "-m", "vslib.cli", "run", "-c", str(cfg_path)],
                         capture_output=True, text=True, cwd=folder, env=CLI_ENV, timeout=1200)
    assert run.returncode == 0, run.stderr[-3000:]
    return f32, load_config(cfg_path), run, (before, float32_results)


def test_int8_run_leaves_every_float32_file_alone(int8_project):
    f32, i8, run, (before, _) = int8_project
    assert _digests(f32.features_dir) == before
    assert i8.features_dir != f32.features_dir and i8.index_dir != f32.index_dir
    assert i8.classifier_dir != f32.classifier_dir
    for d in (i8.features_dir, i8.index_dir, i8.classifier_dir):
        assert any(d.rglob("*")), d
    (model,) = (i8.models_dir / "backbones").glob("efficientnet_lite0-int8-*.tflite")
    verdict = json.loads(str(np.load(model.with_suffix("").with_suffix(".check.npz"))["verdict"]))
    assert verdict["accepted"] and verdict["figures"]["median_cosine"] >= int8.MIN_MEDIAN_COSINE
    assert "int8 model" not in run.stderr and "fully_quantize" not in run.stderr  # the converter's lines held back


def test_int8_retrieval_within_two_queries_of_float32(int8_project):
    f32, i8, _, (_, a) = int8_project
    b = json.loads((i8.reports_dir / "evaluation.json").read_text())
    assert a["backbone"] == "efficientnet_lite0" and b["backbone"] == "efficientnet_lite0-int8"
    assert a["n_query"] == b["n_query"] > 0
    two = 2 / a["n_query"] + 1e-9
    for mode in ("flat", "adaptive"):
        for k in ("p@1", "p@10"):
            assert abs(a["modes"][mode][k] - b["modes"][mode][k]) <= two, (mode, k, a["modes"][mode], b["modes"][mode])
    print({m: {k: (a["modes"][m][k], b["modes"][m][k]) for k in ("p@1", "p@10")} for m in ("flat", "adaptive")})


@pytest.mark.parametrize("precision", ["float32", "int8"])
def test_search_imports_no_tensorflow(int8_project, precision):
    """A query finds the verified .tflite its index was built with and runs it on the interpreter alone."""
    f32, i8, _, _ = int8_project
    cfg = f32 if precision == "float32" else i8
    query = load_manifest(cfg).query("split == 'query'")["path"].iloc[0]
    code = ("import sys; from vslib.config import load_config; from vslib.search import VisualSearch\n"
            f"cfg = load_config({str(Path(cfg.base_dir) / cfg.source)!r})\n"
            "with VisualSearch.from_config(cfg) as engine:\n"
            f"    r = engine.search({query!r}, k=3, mode='adaptive')\n"
            "    print(engine.backbone.precision, engine.backbone.runtime, len(r.hits))\n"
            "print(sorted(m for m in ('tensorflow', 'keras') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=CLI_ENV, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split("\n")[:2] == [f"{precision} tflite 3", "[]"], out.stdout


def test_a_query_of_the_other_precision_is_refused(int8_project):
    from vslib import classifier as clf_mod
    from vslib import index as index_mod
    from vslib.backbones import backbone_from_config
    from vslib.search import VisualSearch

    f32, i8, _, _ = int8_project
    index = index_mod.open_index(i8, create=False)
    try:
        with pytest.raises(VisualSearchError, match="float32 and int8 vectors do not mix"):
            VisualSearch(backbone_from_config(f32), clf_mod.load_classifier(i8), index)
    finally:
        index.close()
    with pytest.raises(Exception, match="int8 vectors"):
        clf_mod.load_classifier(i8).predict_image(load_manifest(i8)["path"].iloc[0])


def test_calibration_sample_is_fixed_by_content_and_holds_out_queries(tux_pipeline):
    manifest = load_manifest(tux_pipeline.cfg)
    cal, probes = int8.calibration_sample(manifest)
    again, again_probes = int8.calibration_sample(manifest.sample(frac=1.0, random_state=3))  # another row order
    assert list(cal["content_hash"]) == list(again["content_hash"])
    assert list(probes["content_hash"]) == list(again_probes["content_hash"])
    assert set(cal["split"]) == set(probes["split"]) == {"index"}
    assert not set(cal["content_hash"]) & set(probes["content_hash"])
    index_labels = set(manifest.query("split == 'index'")["label"])
    assert set(cal["label"]) == index_labels or len(cal) == int8.CALIBRATION_IMAGES  # round-robin covers classes
    with pytest.raises(BackboneError, match="needs at least"):
        int8.calibration_sample(manifest.head(10))


def test_fidelity_figures():
    rng = np.random.default_rng(0)
    ref = rng.normal(size=(40, 16))
    same = int8.fidelity(ref, ref.copy(), slice(30, None))
    assert same == {"median_cosine": 1.0, "min_cosine": 1.0, "neighbour_agreement": 1.0, "probes": 10}
    noisy = int8.fidelity(ref, ref + rng.normal(scale=2.0, size=ref.shape), slice(30, None))
    assert noisy["median_cosine"] < 0.6 and noisy["neighbour_agreement"] < 1.0
    assert int8.passes(same) and not int8.passes(noisy)
    assert "median cosine" in int8.refusal("x", noisy) and "backbone.precision: float32" in int8.refusal("x", noisy)


def test_a_model_that_fails_the_check_is_refused_and_the_refusal_is_remembered(int8_project, tmp_path, monkeypatch):
    from vslib import backbones

    _, i8, _, _ = int8_project
    cfg = load_config(Path(i8.base_dir) / i8.source, overrides={"paths": {"models": str(tmp_path / "models")}})
    monkeypatch.setattr(int8, "MIN_MEDIAN_COSINE", 0.99999)  # no int8 model reaches this
    with pytest.raises(BackboneError, match=r"int8 model is refused: on \d+ probe images .*median cosine 0\.9"):
        backbones.backbone_from_config(cfg)
    assert not list((cfg.models_dir / "backbones").glob("*-int8-*.tflite"))  # only the verdict is kept

    def no_conversion(*a, **k):
        raise AssertionError("converted again")

    monkeypatch.setattr(int8, "convert", no_conversion)
    with pytest.raises(BackboneError, match="int8 model is refused"):
        backbones.backbone_from_config(cfg)


def test_precision_is_validated():
    with pytest.raises(ConfigError, match=r"backbone.precision 'int4' is not allowed"):
        parse_config({"backbone": {"precision": "int4"}})
    with pytest.raises(ConfigError, match="int8 runs on TensorFlow Lite"):
        parse_config({"backbone": {"precision": "int8", "runtime": "keras"}})
    with pytest.raises(ConfigError, match="classifier.fine_tune trains the float32 network"):
        parse_config({"backbone": {"precision": "int8"}, "classifier": {"fine_tune": True}})
    assert parse_config({}).backbone.precision == "float32"
