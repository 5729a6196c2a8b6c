"""Classifier (issue 4): trained on real Tux Paint embeddings through the real pipeline.

One module-scoped pipeline (prepare -> extract -> train) on a small subset of
the stamps (at most 12 per class) is shared by the tests; it takes well under a
minute on two CPU cores.
"""
from __future__ import annotations

import dataclasses
import json
import shutil
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from vslib import integrity
from vslib.integrity import DamagedFile

from vslib import calibration, classifier, datasets, extraction, features
from vslib.classifier import check_labels, load_classifier, train
from vslib.errors import ClassifierError, VisualSearchError
from vslib.heads.base import check_trainable, stratified_split
from vslib.heads.fine_tuned import FineTunedHead
from vslib.heads.format import load_model, write_json
from vslib.heads.mlp import MlpHead

from conftest import tux_config



def _config(dir_: Path, **sections):
    # this module tests the Keras head; the others: test_heads.py
    return tux_config(dir_, **{"classifier": {"head": "mlp"}, **sections})


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """(cfg, index FeatureSet, query FeatureSet) of a prepared, extracted small Tux Paint subset."""
    cfg = _config(tmp_path_factory.mktemp("tux"))
    datasets.prepare(cfg, progress=False, echo=lambda *_: None)
    extraction.extract(cfg, progress=False)
    fs = features.load_features(cfg)
    return cfg, fs.split("index"), fs.split("query")


@pytest.fixture(scope="module")
def trained(pipeline):
    cfg, index, query = pipeline
    t = time.perf_counter()
    clf, metrics = train(cfg)
    return clf, metrics, time.perf_counter() - t


# ---------------------------------------------------------------------------
# Training on the real pipeline


def test_accuracy_well_above_chance(trained):
    clf, m, _ = trained
    assert m["n_classes"] == len(clf.classes_) >= 10
    assert m["chance"] == pytest.approx(1 / m["n_classes"])
    assert m["accuracy"] > 5 * m["chance"], m["accuracy"]
    assert m["accuracy"] > 0.4
    assert m["top3_accuracy"] >= m["accuracy"]
    assert set(m["per_class"]) == set(map(str, clf.classes_))
    cm = np.asarray(m["confusion_matrix"]["matrix"])
    assert cm.shape == (m["n_classes"],) * 2 and cm.sum() == m["n"] == clf.n_val_
    assert np.trace(cm) / cm.sum() == pytest.approx(m["accuracy"])


def test_calibration_lowers_validation_nll(trained):
    clf, m, _ = trained
    assert clf.temperature_ > 0 and clf.temperature_ != 1.0
    assert m["nll_after"] < m["nll_before"]
    assert 0 <= m["ece_after"] <= 1 and 0 <= m["ece_before"] <= 1
    assert m["temperature"] == clf.temperature_


def test_trains_on_the_index_split_only(pipeline, trained):
    cfg, index, query = pipeline
    clf, m, _ = trained
    assert clf.n_train_ + clf.n_val_ == len(index)
    meta = json.loads((cfg.classifier_dir / "metadata.json").read_text())
    val_paths = set(meta["validation_paths"])
    assert len(val_paths) == clf.n_val_
    assert val_paths <= set(index.table["path"])
    assert not val_paths & set(query.table["path"])
    # every class is trained on
    assert set(clf.classes_) == set(index.table["label"])


def test_outputs_written(pipeline, trained):
    cfg, _, _ = pipeline
    clf, m, _ = trained
    for name in ("model.keras", "labels.json", "metadata.json"):
        assert (cfg.classifier_dir / name).is_file()
    meta = json.loads((cfg.classifier_dir / "metadata.json").read_text())
    assert meta["backbone"] == "efficientnet_lite0" and meta["dataset"] == "tuxpaint"
    assert meta["temperature"] == pytest.approx(clf.temperature_)
    assert meta["n_train"] == clf.n_train_ and meta["n_val"] == clf.n_val_
    assert meta["config"] == dataclasses.asdict(cfg.classifier) and meta["date"]
    assert json.loads((cfg.classifier_dir / "labels.json").read_text()) == list(clf.classes_)
    on_disk = json.loads((cfg.reports_dir / "classifier_metrics.json").read_text())
    assert on_disk["accuracy"] == m["accuracy"] and "per_class" in on_disk
    png = cfg.figures_dir / "confusion_matrix.png"
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_round_trip_gives_the_same_predictions(pipeline, trained):
    cfg, index, query = pipeline
    clf, _, _ = trained
    loaded = load_classifier(cfg)
    assert list(loaded.classes_) == list(clf.classes_)
    assert loaded.temperature_ == clf.temperature_
    np.testing.assert_allclose(loaded.predict_proba(query.vectors), clf.predict_proba(query.vectors), atol=1e-6)
    # a new image file (from the query split, never trained on): same result from both
    path = query.table["path"].iloc[0]
    p_before, p_after = clf.predict_image(path), loaded.predict_image(path)
    assert p_before.shape == (1, len(clf.classes_))
    np.testing.assert_allclose(p_after, p_before, atol=1e-5)
    np.testing.assert_allclose(p_before[0], clf.predict_proba(query.vectors[:1])[0], atol=1e-4)
    assert p_after.sum() == pytest.approx(1.0)


def test_second_train_reuses_the_saved_model(pipeline, trained):
    cfg, _, _ = pipeline
    clf, m, _ = trained
    date = json.loads((cfg.classifier_dir / "metadata.json").read_text())["date"]
    again, m2 = train(cfg)
    assert json.loads((cfg.classifier_dir / "metadata.json").read_text())["date"] == date
    assert m2["accuracy"] == m["accuracy"]
    assert again.temperature_ == clf.temperature_


@pytest.mark.parametrize("name", ["index", "query"])
def test_read_split_is_the_split_of_load_features(pipeline, name, tmp_path):
    """train reads the index split alone (read_split): row for row what load_features(cfg).split gives."""
    cfg, index, query = pipeline
    ref = {"index": index, "query": query}[name]
    for batch in (7, features.SPLIT_BATCH_ROWS):
        got = features.read_split(cfg, name, batch_size=batch)
        assert got.backbone == ref.backbone == cfg.backbone.name and len(got) == len(ref) > 0
        assert got.vectors.dtype == np.float32 and np.array_equal(got.vectors, ref.vectors)
        pd.testing.assert_frame_equal(got.table, ref.table)
        assert set(got.table["split"]) == {name}
    assert classifier.fingerprint(got, cfg) == classifier.fingerprint(ref, cfg)  # the cached model stays valid
    other = _config(tmp_path, backbone={"name": "efficientnet_lite2"})
    other.features_dir.mkdir(parents=True)
    shutil.copy(features.features_path(cfg), features.features_path(other))
    for read in (lambda: features.load_features(other), lambda: features.read_split(other, name)):
        with pytest.raises(VisualSearchError, match="holds efficientnet_lite0 vectors.*names efficientnet_lite2"):
            read()


def test_changed_settings_retrain(pipeline, trained, tmp_path):
    cfg, index, _ = pipeline
    other = dataclasses.replace(cfg, classifier=dataclasses.replace(cfg.classifier, hidden_units=64, epochs=5))
    assert classifier.fingerprint(index, other) != classifier.fingerprint(index, cfg)


# ---------------------------------------------------------------------------
# Errors


def test_missing_model_says_how_to_train(tmp_path):
    cfg = _config(tmp_path)
    with pytest.raises(ClassifierError, match="visualsearch train"):
        load_classifier(cfg)


def test_model_of_another_backbone_is_refused(pipeline, trained, tmp_path):
    cfg, _, _ = pipeline
    other = _config(tmp_path, backbone={"name": "efficientnet_lite2"})
    shutil.copytree(cfg.classifier_dir, other.classifier_dir)
    with pytest.raises(ClassifierError, match=r"efficientnet_lite0.*efficientnet_lite2.*visualsearch train"):
        load_classifier(other)


def test_a_model_saved_as_embedding_still_loads(pipeline, trained, tmp_path):
    """Before the mlp head had one name, it was saved with kind 'embedding': such models load as MlpHead."""
    cfg, _, query = pipeline
    clf, _, _ = trained
    directory = tmp_path / "clf"
    shutil.copytree(cfg.classifier_dir, directory)
    meta = json.loads((directory / "metadata.json").read_text())
    assert meta["kind"] == "mlp"
    write_json(directory / "metadata.json", {**meta, "kind": "embedding"})  # with its checksum, as saved then
    loaded = load_model(directory)
    assert type(loaded) is MlpHead and loaded.kind == "mlp"
    np.testing.assert_array_equal(loaded.predict_proba(query.vectors), clf.predict_proba(query.vectors))


@pytest.mark.parametrize("broken", ["model.keras", "metadata.json"])
def test_corrupt_saved_model_says_how_to_retrain(pipeline, trained, tmp_path, broken):
    cfg, _, _ = pipeline
    directory = tmp_path / "clf"
    shutil.copytree(cfg.classifier_dir, directory)
    (directory / broken).write_bytes(b"not what save() wrote")
    with pytest.raises(DamagedFile, match=rf"{broken}: damaged \(.*\); the next `visualsearch train` .*retrains"):
        load_model(directory)
    integrity.sidecar(directory / broken).unlink()  # written by hand, no checksum: the reader's own checks still hold
    with pytest.raises((ClassifierError, DamagedFile), match="visualsearch train"):
        load_model(directory)


def test_labels_the_index_lacks(trained):
    clf, _, _ = trained
    labels = list(map(str, clf.classes_))
    check_labels(clf, labels + ["extra"])  # more in the index is fine
    with pytest.raises(ClassifierError, match=repr(labels[0])):
        check_labels(clf, labels[1:])


def test_too_few_classes(pipeline):
    _, index, _ = pipeline
    one = index.table["label"].iloc[0]
    rows = (index.table["label"] == one).to_numpy()
    with pytest.raises(ClassifierError, match=rf"at least 2 classes.*{one!r}"):
        MlpHead(epochs=1).fit(index.vectors[rows], index.table["label"][rows])


def test_too_few_images_per_class(pipeline):
    _, index, _ = pipeline
    labels = index.table["label"].to_numpy()
    a, b, c = sorted(set(labels))[:3]
    rows = np.concatenate([np.where(labels == a)[0], np.where(labels == b)[0][:1], np.where(labels == c)[0][:1]])
    with pytest.raises(ClassifierError, match=rf"2 of 3 classes: {b!r} \(1\), {c!r} \(1\)"):
        MlpHead(epochs=1).fit(index.vectors[rows], labels[rows])


def test_unfitted_and_wrong_width(trained):
    with pytest.raises(ClassifierError, match="not fitted"):
        MlpHead().predict_proba(np.zeros((1, 4), np.float32))
    clf, _, _ = trained
    with pytest.raises(ClassifierError, match="1280"):
        clf.predict_proba(np.zeros((2, 7), np.float32))


# ---------------------------------------------------------------------------
# Pieces


def test_stratified_split_keeps_every_class_and_is_seeded(pipeline):
    _, index, _ = pipeline
    labels = index.table["label"].to_numpy()
    tr, va = stratified_split(labels, 0.2, seed=3)
    assert not set(tr) & set(va) and len(tr) + len(va) == len(labels)
    assert set(labels[tr]) == set(labels)
    assert 0.1 < len(va) / len(labels) < 0.3
    tr2, va2 = stratified_split(labels, 0.2, seed=3)
    assert np.array_equal(va, va2)
    # classes of 2 rows: too small for train_test_split with many classes -> quota fallback
    small = np.repeat(np.arange(30).astype(str), 2)
    tr, va = stratified_split(small, 0.2, seed=0)
    assert set(small[tr]) == set(small) and len(va) > 0


def test_check_trainable_messages():
    check_trainable(["a", "a", "b", "b"])
    with pytest.raises(ClassifierError, match="no images"):
        check_trainable([])


def test_temperature_on_real_logits(trained, pipeline):
    """Overconfident logits (scaled up) get T > 1; the fitted T minimises NLL."""
    clf, _, _ = trained
    _, index, _ = pipeline
    y = np.searchsorted(clf.classes_, index.table["label"].to_numpy())
    logits = clf.predict_logits(index.vectors) * 5.0
    t = calibration.fit_temperature(logits, y)
    assert t > 1
    assert calibration.nll(logits, y, t) <= min(calibration.nll(logits, y, t * 1.1), calibration.nll(logits, y, t / 1.1))
    p = calibration.softmax(logits, t)
    assert np.allclose(p.sum(axis=1), 1)
    assert 0 <= calibration.expected_calibration_error(p, y) <= 1


def test_ece_is_zero_when_confidence_matches_accuracy():
    # 10 rows at confidence 0.8, 8 of them right
    p = np.tile([[0.8, 0.2]], (10, 1))
    y = np.array([0] * 8 + [1] * 2)
    assert calibration.expected_calibration_error(p, y) == pytest.approx(0.0)
    y_all_wrong = np.ones(10, int)
    assert calibration.expected_calibration_error(p, y_all_wrong) == pytest.approx(0.8)


# ---------------------------------------------------------------------------
# Fine-tuning (slow)


@pytest.mark.slow
def test_fine_tune_tiny_subset(pipeline, tmp_path):
    cfg, index, query = pipeline
    labels = index.table["label"].to_numpy()
    keep = [c for c in sorted(set(labels)) if (labels == c).sum() >= 8][:4]
    rows = np.concatenate([np.where(labels == c)[0][:8] for c in keep])
    paths = index.table["path"].to_numpy()[rows]
    from vslib.backbones import backbone_from_config

    bb = backbone_from_config(cfg)
    before = [w.copy() for w in bb.keras_model.get_weights()[-3:]]
    tr, va = stratified_split(labels[rows], 0.25, seed=0)
    head = MlpHead(epochs=30).fit(index.vectors[rows][tr], labels[rows][tr],
                                  index.vectors[rows][va], labels[rows][va])
    ft = FineTunedHead(fine_tune_layers=10, fine_tune_epochs=1, batch_size=8)
    ft.fit(paths[tr], labels[rows][tr], paths[va], labels[rows][va], backbone=bb, head=head)
    # the shared backbone (used for the index) is untouched
    for w0, w1 in zip(before, bb.keras_model.get_weights()[-3:]):
        np.testing.assert_array_equal(w0, w1)
    assert ft.score(paths[va], labels[rows][va]) >= 0.5  # chance is 0.25
    with pytest.raises(ClassifierError, match="embeddings"):
        ft.predict_proba(index.vectors[:2])
    ft.backbone_ = cfg.backbone.name
    ft.save(tmp_path / "ft")
    loaded = load_model(tmp_path / "ft")
    assert isinstance(loaded, FineTunedHead)
    img = query.table["path"].iloc[0]
    np.testing.assert_allclose(loaded.predict_image(img), ft.predict_image(img), atol=1e-5)
    # a query is classified from its pixels, whatever embedding comes with it
    np.testing.assert_array_equal(loaded.query_proba(np.zeros((1, 4), np.float32), [img]), loaded.predict_image(img))


@pytest.mark.slow
def test_train_with_fine_tune_setting(pipeline, tmp_path):
    """``classifier.fine_tune: true`` through train(cfg): saved, reloaded as a FineTunedHead."""
    cfg, _, query = pipeline
    ft_cfg = dataclasses.replace(
        cfg, classifier=dataclasses.replace(cfg.classifier, fine_tune=True, fine_tune_layers=5, fine_tune_epochs=1),
        paths=dataclasses.replace(cfg.paths, models=str(tmp_path / "models"), reports=str(tmp_path / "reports")))
    clf, m = train(ft_cfg)
    assert isinstance(clf, FineTunedHead)
    assert m["accuracy"] > 5 * m["chance"] and "head_only" in m
    loaded = load_classifier(ft_cfg)
    assert isinstance(loaded, FineTunedHead)
    img = query.table["path"].iloc[0]
    np.testing.assert_allclose(loaded.predict_image(img), clf.predict_image(img), atol=1e-5)
