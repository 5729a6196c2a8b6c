"""Hierarchical search and its evaluation, on a small real set (Tux Paint, 10 per class)."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from vslib.config import SearchConfig, load_config
from vslib.errors import VisualSearchError
from vslib.evaluate import average_precision_at_k, precision_at_k
from vslib import ranking
from vslib.search import VisualSearch


# -- metrics against hand-computed cases ------------------------------------------


def test_precision_at_k_hand_computed():
    assert precision_at_k([1, 0, 1, 0], 2) == 0.5
    assert precision_at_k([1, 0, 1, 0], 4) == 0.5
    assert precision_at_k([1, 1], 5) == 0.4  # fewer hits than k: the missing ones are misses
    assert precision_at_k([], 1) == 0.0


def test_average_precision_hand_computed():
    # relevant at ranks 1 and 3, two relevant items exist: (1/1 + 2/3) / 2
    assert average_precision_at_k([1, 0, 1], 3, 2) == pytest.approx((1 + 2 / 3) / 2)
    # five relevant exist but only 3 ranks count: divide by min(k, R) = 3
    assert average_precision_at_k([1, 0, 1], 3, 5) == pytest.approx((1 + 2 / 3) / 3)
    assert average_precision_at_k([0, 1, 1, 1], 4, 3) == pytest.approx((1 / 2 + 2 / 3 + 3 / 4) / 3)
    assert average_precision_at_k([1, 1, 1], 3, 3) == 1.0
    assert average_precision_at_k([0, 0], 2, 4) == 0.0
    assert average_precision_at_k([1], 10, 0) == 0.0


# -- which classes a search is narrowed to -----------------------------------------

CLASSES = ["a", "b", "c", "d"]


def test_chosen_labels_per_mode():
    cfg = SearchConfig(mass=0.8, min_confidence=0.3, max_classes=3)

    def chosen(p, mode, true_label=None):
        (labels,) = ranking.chosen_labels(np.array([p]), CLASSES, ranking.settings(mode, cfg),
                                          None if true_label is None else [true_label])
        return labels

    p = [0.1, 0.5, 0.35, 0.05]
    assert chosen(p, "flat") is None
    assert chosen(p, "hierarchical") == ["b"]
    assert chosen(p, "adaptive") == ["b", "c"]  # 0.85 >= 0.8
    assert chosen(p, "oracle", true_label="d") == ["d"]
    assert chosen([0.26, 0.25, 0.25, 0.24], "adaptive") is None  # unsure: falls back to flat
    assert chosen([0.31, 0.3, 0.2, 0.19], "adaptive") == ["a", "b", "c"]  # capped by max_classes
    with pytest.raises(VisualSearchError, match="oracle mode needs the query's true label"):
        chosen(p, "oracle")
    with pytest.raises(VisualSearchError, match="unknown search mode 'fuzzy'"):
        chosen(p, "fuzzy")


def test_every_class_chosen_is_still_adaptive_ranking_not_a_flat_fallback():
    # mass 1.0 is never quite reached in floating point: all four classes are kept, the query is not unsure,
    # so its hits are still weighed by class probability (as the engine does), not ranked as a flat search
    s = ranking.Settings("adaptive", mass=1.0, min_confidence=0.3, max_classes=5, class_weight=1.0)
    proba = np.array([[0.7, 0.1, 0.1, 0.1 - 1e-9]])
    assert ranking.chosen_labels(proba, CLASSES, s) == [["a", "b", "c", "d"]]
    assert not ranking.searches_flat(proba, s)[0]
    # one item per class; the item of class b is the most similar, but class a is far likelier
    cands = ranking.Candidates(sims=np.array([[[0.80], [0.95], [0.5], [0.4]]], np.float32),
                               items=np.array([[[0], [1], [2], [3]]]))
    assert ranking.ranked_items(cands, proba, s, 4)[0].tolist() == [0, 1, 2, 3]
    unsure = np.array([[0.28, 0.26, 0.24, 0.22]])
    assert ranking.ranked_items(cands, unsure, s, 4)[0].tolist() == [1, 0, 2, 3]  # flat: by similarity alone


# -- the real thing ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def project(tux_pipeline):
    """The session's small project, run end to end once through the original entry point (read only)."""
    return tux_pipeline.cfg, tux_pipeline.run


def test_run_end_to_end_writes_results_and_figures(project):
    cfg, r = project
    assert "== evaluate ==" in r.stdout and "| hierarchical |" in r.stdout
    results = json.loads((cfg.reports_dir / "evaluation.json").read_text())
    assert set(results) >= {"dataset", "backbone", "backend", "n_index", "n_query", "modes"}
    assert results["dataset"] == "tuxpaint" and results["backbone"] == "efficientnet_lite0"
    assert results["backend"] == "embedded"
    assert set(results["modes"]) == {"flat", "hierarchical", "adaptive", "oracle"}
    for m in results["modes"].values():
        assert set(m) >= {"p@1", "p@5", "p@10", "map@10", "latency_ms_p50"}
        assert all(0 <= m[k] <= 1 for k in ("p@1", "p@5", "p@10", "map@10"))
    # a held-out query split that is never indexed
    manifest = __import__("pandas").read_parquet(cfg.manifest_path)
    ok = manifest[manifest["status"] == "ok"]
    assert results["n_index"] == (ok["split"] == "index").sum()
    assert results["n_query"] == (ok["split"] == "query").sum()
    for name in ("precision_at_k.png", "results_flat.png", "results_adaptive.png", "confusion_matrix.png"):
        assert (cfg.figures_dir / name).stat().st_size > 10_000
    assert "| class |" in (cfg.reports_dir / "evaluation.md").read_text()


def test_modes_behave_as_designed(project):
    cfg, _ = project
    m = json.loads((cfg.reports_dir / "evaluation.json").read_text())["modes"]
    # the classifier works well above chance, so narrowing helps; adaptive never loses
    # to flat beyond noise, and the oracle is the ceiling of hierarchy
    assert m["hierarchical"]["p@10"] > m["flat"]["p@10"]
    assert m["adaptive"]["p@10"] >= m["flat"]["p@10"] - 0.02
    assert m["adaptive"]["map@10"] >= m["flat"]["map@10"] - 0.02
    for k in ("p@1", "p@5", "p@10", "map@10"):
        assert m["oracle"][k] >= m["hierarchical"][k]
    assert m["oracle"]["p@1"] == 1.0  # every hit of the true class is relevant


@pytest.mark.slow
def test_rerun_reuses_every_cache(tux_pipeline_copy):
    cfg = tux_pipeline_copy  # a rerun writes its reports again: into a copy
    r = subprocess.run([sys.executable, "-m", "vslib.cli", "run", "-c", str(cfg.base_dir / "application.yaml")],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    log = r.stderr
    assert " 0 computed" in log and "reusing" in log  # no vectors recomputed, classifier not retrained


def test_hierarchical_prefilter_returns_k_hits_of_the_predicted_class(project):
    cfg, _ = project
    from vslib.datasets import load_manifest
    from vslib.features import load_features

    queries = load_features(cfg).split("query")
    manifest = load_manifest(cfg)
    indexed = manifest[(manifest["status"] == "ok") & (manifest["split"] == "index")]
    n_per_class = indexed["label"].astype(str).value_counts().to_dict()  # the data's index split, class by class
    with VisualSearch.from_config(cfg) as engine:
        probs = engine.classifier.predict_proba(queries.vectors)
        out = engine.search_vectors(queries.vectors, 5, "hierarchical", probs=probs)
        for (hits, labels), p in zip(out, probs):
            predicted = engine.classes[int(p.argmax())]
            assert labels == [predicted]
            assert [h["label"] for h in hits] == [predicted] * len(hits)
            assert len(hits) == min(5, engine.index.count({"label": [predicted]}))
        # the filter counts each class's indexed images, every one of them and no query
        assert {c: engine.index.count({"label": [c]}) for c in n_per_class} == n_per_class
        assert set(engine.classes) == set(n_per_class)
        assert 0 < min(n_per_class.values()) <= max(n_per_class.values()) < cfg.dataset.max_per_class  # some held out
        flat = engine.search_vectors(queries.vectors[:3], 7, "flat")
        assert all(len(h) == 7 and labels is None for h, labels in flat)


def test_search_one_image_from_path_pil_and_array(project):
    cfg, _ = project
    from PIL import Image

    from vslib.datasets import load_manifest

    q = load_manifest(cfg).query("split == 'query'").iloc[0]
    with VisualSearch.from_config(cfg) as engine:
        by_path = engine.search(q["path"], k=4, mode="flat")
        img = Image.open(q["path"])
        by_pil = engine.search(img, k=4, mode="flat")
        by_array = engine.search(np.asarray(img.convert("RGBA")), k=4, mode="flat")
    assert [h["path"] for h in by_path.hits] == [h["path"] for h in by_pil.hits] == [h["path"] for h in by_array.hits]
    assert len(by_path.hits) == 4 and by_path.hits[0]["score"] >= by_path.hits[-1]["score"]
    assert sum(p for _, p in by_path.predicted) <= 1.0 + 1e-6
    assert q["path"] not in {h["path"] for h in by_path.hits}  # queries are never indexed


def test_search_cli_json_schema(project):
    cfg, _ = project
    from vslib.datasets import load_manifest

    q = load_manifest(cfg).query("split == 'query'").iloc[0]
    r = subprocess.run([sys.executable, "-m", "vslib.cli", "search", q["path"], "-c",
                        str(cfg.base_dir / "application.yaml"), "-k", "6", "--mode", "adaptive", "--json"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout)
    assert out["query"] == q["path"]
    assert isinstance(out["predicted"], list) and set(out["predicted"][0]) == {"label", "probability"}
    assert [p["probability"] for p in out["predicted"]] == sorted((p["probability"] for p in out["predicted"]), reverse=True)
    assert len(out["hits"]) == 6 and all(set(h) - {"outside"} == {"path", "label", "score", "rank_score"}
                                         for h in out["hits"])
    assert all(Path(h["path"]).exists() for h in out["hits"])
    ranks = [h["rank_score"] for h in out["hits"] if not h.get("outside")]
    assert ranks == sorted(ranks, reverse=True)  # listed in the order they were ranked
    assert out["search_settings"]["source"].startswith("tuned")


def test_search_cli_bad_image_is_one_clear_line(project, tmp_path):
    cfg, _ = project
    bad = tmp_path / "broken.jpg"
    bad.write_text("no pixels here")
    r = subprocess.run([sys.executable, "-m", "vslib.cli", "search", str(bad), "-c",
                        str(cfg.base_dir / "application.yaml")], capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1] == f"error: {bad}: not an image (unrecognised format)"
    assert "Traceback" not in r.stderr


@pytest.mark.slow
def test_evaluate_cli_json(tux_pipeline_copy):
    cfg = tux_pipeline_copy  # evaluate writes its reports: into a copy
    r = subprocess.run([sys.executable, "-m", "vslib.cli", "evaluate", "-c", str(cfg.base_dir / "application.yaml"),
                        "--json"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    # stdout holds the JSON document alone (the table goes to stderr), so it can be piped
    doc = json.loads(r.stdout)
    assert "| flat |" in r.stderr
    assert doc["modes"]["flat"]["p@1"] == json.loads((cfg.reports_dir / "evaluation.json").read_text())["modes"]["flat"]["p@1"]
    # the quantities that say whether the hierarchy earns its place
    for key in ("classifier_accuracy", "classifier_top3", "nn1_accuracy", "logreg_accuracy", "hierarchy_gain",
                "search_settings"):
        assert key in doc, key
    assert set(doc["hierarchy_gain"]["adaptive_vs_flat"]) == {"p@1", "p@5", "p@10"}


def test_same_search_on_elasticsearch_backend(project, es_url, tmp_path):
    """The engine gives the same answers over Elasticsearch (emulator, or VS_ES_URL) as over FAISS."""
    import os
    import uuid

    from vslib import evaluate, index

    cfg, _ = project
    embedded = json.loads((cfg.reports_dir / "evaluation.json").read_text())
    es = {"index_name": f"vs-test-{uuid.uuid4().hex[:10]}", "index_options": {"type": "hnsw", "m": 16, "ef_construction": 200}}
    if not os.environ.get("VS_ES_URL"):
        es["hosts"] = [es_url]
    es_cfg = load_config(cfg.base_dir / "application.yaml",
                         overrides={"index": {"backend": "elasticsearch", "elasticsearch": es},
                                    "paths": {"reports": str(tmp_path / "reports-es")}})
    info = index.build(es_cfg, progress=False)
    try:
        assert info["count"] == embedded["n_index"]
        results = evaluate.evaluate(es_cfg, figures=False, echo=lambda s: None)
        assert results["backend"] == "elasticsearch"
        for mode in ("flat", "hierarchical", "oracle"):
            for k in ("p@1", "p@10", "map@10"):
                assert results["modes"][mode][k] == pytest.approx(embedded["modes"][mode][k], abs=0.02), (mode, k)
    finally:
        index.open_index(es_cfg, create=False).drop()


def test_adaptive_class_weight_ranks_exactly_over_the_chosen_classes(project):
    """Merged per-class lists equal a brute-force ranking of every item in the chosen classes."""
    cfg, _ = project
    from vslib.features import load_features
    from vslib.index import item_ids

    feats = load_features(cfg)
    idx, queries = feats.split("index"), feats.split("query")
    ids = np.array(item_ids(idx.table))
    with VisualSearch.from_config(cfg) as engine:
        engine.cfg = SearchConfig(mass=0.99, min_confidence=0.0, max_classes=4, class_weight=0.2)
        probs = engine.classifier.predict_proba(queries.vectors)
        out = engine.search_vectors(queries.vectors, 6, "adaptive", probs=probs)
        checked = 0
        for q, p, (hits, labels) in zip(queries.vectors, probs, out):
            if labels is None or len(labels) < 2:
                continue
            logp = {c: np.log(p[engine.classes.index(c)]) for c in labels}
            mask = idx.table["label"].isin(labels).to_numpy()
            adjusted = idx.vectors[mask] @ q + 0.2 * np.array([logp[c] for c in idx.table["label"][mask]])
            expected = ids[mask][np.argsort(-adjusted, kind="stable")[:6]]
            assert [h["id"] for h in hits] == list(expected)
            checked += 1
        assert checked >= 5  # the classifier is unsure often enough to exercise the merge
