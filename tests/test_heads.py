"""Classifier heads, adaptive tuning and honest evaluation (issue 11), on real Tux Paint embeddings.

One module-scoped pipeline (prepare -> extract) on a small subset of the
stamps (at most 12 per class) is shared; heads are fitted on its cached vectors.
"""
from __future__ import annotations

import inspect
import json
import subprocess
import sys

import numpy as np
import pytest
from sklearn.base import clone

from vslib import calibration, classifier, evaluate, features, index, integrity, ranking
from vslib.config import ClassifierConfig
from vslib.errors import ClassifierError
from vslib.heads import HEADS, head_class
from vslib.heads.ensemble import EnsembleHead
from vslib.heads.format import load_model
from vslib.heads.knn import KnnHead
from vslib.heads.linear import LinearHead, calibrated_nll
from vslib.search import VisualSearch

from conftest import copy_pipeline


def test_one_registry_names_every_head_without_importing_its_libraries():
    """vslib.heads.HEADS is read without numpy, scikit-learn or Keras; each name is its class's saved kind."""
    code = ("import sys, vslib.heads as h; print(h.HEAD_NAMES); "
            "print([m for m in ('numpy', 'sklearn', 'keras', 'tensorflow') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split("\n")
    assert out[:2] == ["('ensemble', 'linear', 'knn', 'mlp')", "[]"]
    for name in HEADS:
        assert head_class(name).kind == name
    with pytest.raises(ClassifierError, match=r"Unsupported head 'lineer'. Available heads are \['ensemble'"):
        head_class("lineer")


def test_each_head_maps_its_own_config_keys():
    ccfg = ClassifierConfig(C=10.0, neighbors=7, folds=3, seed=1, calibrate=False, hidden_units=8)
    assert head_class("knn").from_config(ccfg).get_params()["n_neighbors"] == 7
    ens = head_class("ensemble").from_config(ccfg).get_params()
    assert (ens["C"], ens["n_neighbors"], ens["folds"], ens["seed"], ens["calibrate"]) == (10.0, 7, 3, 1, False)
    assert "n_neighbors" not in head_class("linear").from_config(ccfg).get_params()
    assert head_class("mlp").from_config(ccfg).get_params()["hidden_units"] == 8
    assert head_class("fine_tuned").from_config(ccfg, fine_tune_layers=4).get_params()["fine_tune_layers"] == 4


@pytest.mark.parametrize("name", list(HEADS))
def test_every_head_is_a_scikit_learn_estimator(name):
    """get_params reads the __init__ signature; set_params and clone keep every parameter as given."""
    cls = head_class(name)
    head = cls()
    params = head.get_params()
    assert list(params) == sorted(inspect.signature(cls.__init__).parameters.keys() - {"self"})
    assert set(head.config_keys.values()) <= set(params)
    key = {"ensemble": "weight", "linear": "C", "knn": "n_neighbors"}.get(name, "epochs")
    value = {"weight": 0.3, "C": 10.0, "n_neighbors": 7, "epochs": 2}[key]
    assert head.set_params(**{key: value}) is head and head.get_params()[key] == value
    twin = clone(head)
    assert type(twin) is cls and twin is not head and twin.get_params() == head.get_params()
    assert repr(twin) == repr(head) and f"{key}={value!r}" in repr(head)


@pytest.fixture(scope="module")
def pipeline(tux_pipeline, tmp_path_factory):
    """(cfg, index FeatureSet, query FeatureSet) of a copy of the session's pipeline, prepared and extracted."""
    cfg = copy_pipeline(tux_pipeline, tmp_path_factory.mktemp("tux"), extracted_only=True,
                        evaluation={"grid_queries": 0})
    fs = features.load_features(cfg)
    return cfg, fs.split("index"), fs.split("query")


def _xy(fs):
    return fs.vectors, fs.table["label"].astype(str).to_numpy()


@pytest.fixture(scope="module")
def fitted(pipeline):
    _, ix, _ = pipeline
    X, y = _xy(ix)
    return {cls.kind: cls().fit(X, y) for cls in (LinearHead, KnnHead, EnsembleHead)}


@pytest.mark.parametrize("kind", ["linear", "knn", "ensemble"])
def test_head_fits_on_every_index_row_and_predicts_well(pipeline, fitted, kind):
    _, ix, q = pipeline
    head = fitted[kind]
    X, y = _xy(ix)
    Xq, yq = _xy(q)
    assert head.n_train_ == len(X)  # nothing held back
    assert head.oof_proba_.shape == (len(X), len(head.classes_))
    np.testing.assert_allclose(head.oof_proba_.sum(1), 1, atol=1e-9)
    chance = 1 / len(head.classes_)
    assert head.oof_accuracy_ > 5 * chance
    assert head.score(Xq, yq) > 5 * chance
    P = head.predict_proba(Xq)
    np.testing.assert_allclose(P.sum(1), 1, atol=1e-9)
    assert list(head.predict(Xq)) == list(head.classes_[P.argmax(1)])


@pytest.mark.parametrize("kind", ["linear", "knn", "ensemble"])
def test_temperature_is_fitted_out_of_fold(fitted, pipeline, kind):
    head = fitted[kind]
    _, ix, _ = pipeline
    yi = head.encode_labels(_xy(ix)[1], "y")
    cal = head.calibration_
    assert cal["nll_after"] <= cal["nll_before"] + 1e-12
    assert cal["temperature"] == head.temperature_ == pytest.approx(calibration.fit_temperature(head.oof_logits_, yi))


def test_linear_head_chooses_C_out_of_fold(fitted):
    head = fitted["linear"]
    scores = head.selected_["oof_nll_by_C"]
    assert set(scores) == {str(c) for c in LinearHead().Cs}
    assert head.C_ == float(min(scores, key=scores.get))


def test_knn_head_votes_like_its_definition(pipeline, fitted):
    """The knn logits are the log of similarity-weighted votes of the k nearest indexed vectors."""
    _, ix, q = pipeline
    head = fitted["knn"]
    X, y = _xy(ix)
    xq = q.vectors[:3]
    S = xq @ X.T
    for row, s in enumerate(S):
        nn = np.argsort(-s)[:head.n_neighbors_]
        votes = {}
        for j in nn:
            votes[y[j]] = votes.get(y[j], 0.0) + np.exp((s[j] - 1) / head.tau_)
        best = max(votes, key=votes.get)
        assert head.predict(xq[row:row + 1])[0] == best


def test_ensemble_is_no_worse_out_of_fold_than_either_part(fitted, pipeline):
    head = fitted["ensemble"]
    yi = head.encode_labels(_xy(pipeline[1])[1], "y")
    mix = calibrated_nll(head.oof_logits_, yi)
    for part in (head.linear_, head.knn_):
        assert mix <= calibrated_nll(part.oof_logits_, yi) + 1e-3
    assert head.weight_ in head.weight_grid


@pytest.mark.parametrize("kind", ["linear", "knn", "ensemble"])
def test_save_and_load_every_head(fitted, pipeline, tmp_path, kind):
    _, _, q = pipeline
    head = fitted[kind]
    head.save(tmp_path / kind, {"backbone": "efficientnet_lite0", "dataset": "tuxpaint"})
    loaded = load_model(tmp_path / kind)
    assert type(loaded) is type(head) and list(loaded.classes_) == list(head.classes_)
    np.testing.assert_allclose(loaded.predict_proba(q.vectors), head.predict_proba(q.vectors), atol=1e-6)


# ---------------------------------------------------------------------------
# Through the pipeline: train, tune, search, evaluate


@pytest.fixture(scope="module")
def trained(pipeline):
    cfg, _, _ = pipeline
    clf, metrics = classifier.train(cfg)
    index.build(cfg)
    return clf, metrics


def test_train_default_head_writes_tuned_settings(pipeline, trained):
    cfg, ix, q = pipeline
    clf, metrics = trained
    assert cfg.classifier.head == "ensemble" and clf.kind == "ensemble"
    meta = json.loads((cfg.classifier_dir / "metadata.json").read_text())
    tuned = meta["search"]
    assert tuned["n_validation"] == len(ix)
    assert set(tuned) >= {"mass", "min_confidence", "max_classes", "class_weight", "validation"}
    assert metrics["n"] == len(ix)  # metrics are out of fold on the whole index split
    loaded = classifier.load_classifier(cfg)
    assert loaded.kind == "ensemble"
    probs = loaded.predict_image(q.table["path"].iloc[0])
    np.testing.assert_allclose(probs, clf.predict_proba(q.vectors[:1]), atol=1e-5)
    # a head on embeddings classifies a query from its vector
    np.testing.assert_array_equal(loaded.query_proba(q.vectors[:1], ["not read"]), loaded.predict_proba(q.vectors[:1]))
    with VisualSearch.from_config(cfg) as engine:
        assert engine.cfg.class_weight == tuned["class_weight"] and engine.cfg.mass == tuned["mass"]
        assert engine.settings["source"].startswith("tuned")


@pytest.mark.slow
def test_settings_do_not_move_when_only_query_images_change(pipeline, trained, tmp_path):
    """No query-split leakage: scrambling every query vector and label leaves every chosen setting as it was."""
    cfg, _, _ = pipeline
    clf, _ = trained
    before = json.loads((cfg.classifier_dir / "metadata.json").read_text())
    path = features.features_path(cfg)
    original = path.read_bytes()
    checksum = integrity.sidecar(path).read_bytes()  # fs.save rewrites it: put both back together
    try:
        fs = features.load_features(cfg)
        is_q = (fs.table["split"] == "query").to_numpy()
        rng = np.random.default_rng(0)
        noise = rng.normal(size=(is_q.sum(), fs.dim)).astype(np.float32)
        fs.vectors[is_q] = noise / np.linalg.norm(noise, axis=1, keepdims=True)
        fs.table.loc[is_q, "label"] = rng.permutation(fs.table.loc[is_q, "label"].to_numpy())
        fs.save(path)
        again, _ = classifier.train(cfg, force=True)
        after = json.loads((cfg.classifier_dir / "metadata.json").read_text())
    finally:
        path.write_bytes(original)
        integrity.sidecar(path).write_bytes(checksum)
        classifier.train(cfg, force=True)
    assert after["search"] == before["search"]
    assert after["selected"] == before["selected"]
    assert after["temperature"] == before["temperature"]


def test_vectorised_ranking_matches_the_engine_hit_for_hit(pipeline, trained):
    cfg, ix, q = pipeline
    with VisualSearch.from_config(cfg) as engine:
        k = 10
        P = engine.classifier.predict_proba(q.vectors)
        yi = engine.classifier.encode_labels(ix.table["label"].astype(str), "index")
        cands = ranking.candidates(q.vectors, ix.vectors, yi, len(engine.classes), k)
        paths = ix.table["path"].astype(str).to_numpy()
        for mode in ("flat", "hierarchical", "adaptive"):
            s = ranking.settings(mode, engine.cfg)
            items = ranking.ranked_items(cands, P, s, k)
            for i, (hits, _) in enumerate(engine.search_vectors(q.vectors, k, mode, probs=P)):
                expect = [paths[j] for j in items[i] if j >= 0]
                assert [h["path"] for h in hits] == expect, (mode, i)
                ranks = [h["rank_score"] for h in hits if not h.get("outside")]
                assert ranks == sorted(ranks, reverse=True), (mode, i)


@pytest.mark.slow
def test_evaluate_reports_the_quantities_that_matter(pipeline, trained):
    cfg, ix, q = pipeline
    r = evaluate.evaluate(cfg, write=False, figures=False, seeds=2, echo=lambda *_: None)
    for key in ("classifier_accuracy", "classifier_top3", "nn1_accuracy", "logreg_accuracy"):
        assert 0 <= r[key] <= 1, key
    assert r["classifier_top3"] >= r["classifier_accuracy"]
    assert r["nn1_accuracy"] == pytest.approx(r["modes"]["flat"]["p@1"])  # flat's first hit is the 1-NN
    gain = r["hierarchy_gain"]["adaptive_vs_flat"]
    for k in ("p@1", "p@5", "p@10"):
        g = gain[k]
        assert g["ci95"][0] <= g["mean"] <= g["ci95"][1]
        assert g["mean"] == pytest.approx(r["modes"]["adaptive"][k] - r["modes"]["flat"][k], abs=1e-3)
    assert "diagnostic" in r["modes"]["oracle"]["note"]
    seeds = r["seeds"]
    assert seeds["seeds"] == [cfg.dataset.split.seed, cfg.dataset.split.seed + 1] and len(seeds["runs"]) == 2
    # the configured seed, redone in memory with exact search, matches the engine's figures
    first = seeds["runs"][0]
    assert first["classifier_accuracy"] == pytest.approx(r["classifier_accuracy"], abs=1e-4)
    for mode in ("flat", "hierarchical", "adaptive"):
        assert first["modes"][mode]["p@10"] == pytest.approx(r["modes"][mode]["p@10"], abs=1e-4)


def test_paired_bootstrap_interval():
    assert evaluate.paired_bootstrap(np.zeros(50))["ci95"] == [0.0, 0.0]
    c = evaluate.paired_bootstrap(np.full(40, 0.25))
    assert c["mean"] == 0.25 and c["ci95"] == [0.25, 0.25]
    d = np.random.default_rng(1).normal(0.1, 1.0, 400)
    b = evaluate.paired_bootstrap(d)
    assert b["ci95"][0] < d.mean() < b["ci95"][1]
    assert b["ci95"][1] - b["ci95"][0] == pytest.approx(2 * 1.96 / 20, rel=0.25)


def test_tuning_never_reads_queries(pipeline):
    """tune_adaptive takes index rows only, and each row is searched against the others, never itself."""
    _, ix, _ = pipeline
    X, y = _xy(ix)
    classes = np.unique(y)
    yi = np.searchsorted(classes, y)
    cands = ranking.candidates(X, X, yi, len(classes), 5, self_rows=np.arange(len(X)))
    assert not (cands.items == np.arange(len(X))[:, None, None]).any()
    onehot = np.eye(len(classes))[yi] * 0.9 + 0.1 / len(classes)
    tuned = ranking.tune_adaptive(X, yi, onehot, k=5)
    # with a perfect classifier, narrowing to the top class is best: p@1 at least flat's, p@5 at least hierarchical's
    v = tuned["validation"]
    assert tuned["meets_constraints"]
    assert v["adaptive"]["p@1"] >= v["flat"]["p@1"] and v["adaptive"]["p@5"] >= v["hierarchical"]["p@5"]
