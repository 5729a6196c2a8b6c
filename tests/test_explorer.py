"""The query explorer's callbacks, driven by setting widget values as a user would.

One copy of the session's small trained pipeline (conftest's ``tux_pipeline``: a Tux
Paint subset, prepare -> extract -> train -> index, all real) is shared by the tests.
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from vslib import features
from vslib.explorer import QueryExplorer
from vslib.index.elasticsearch import elasticsearch_status
from conftest import ES_NOT_LISTENING, copy_pipeline



@pytest.fixture(scope="module")
def cfg(tux_pipeline, tmp_path_factory):
    """A copy of the session's trained pipeline (the explorer caches its map beside the features)."""
    return copy_pipeline(tux_pipeline, tmp_path_factory.mktemp("explorer"), **ES_NOT_LISTENING)


@pytest.fixture(scope="module")
def explorer(cfg):
    with QueryExplorer(cfg) as ex:
        yield ex


def test_compare_view_shows_the_three_modes_side_by_side_in_rank_order(explorer, cfg):
    path = explorer.query_paths[3]
    explorer.k_slider.value = 4
    explorer.mode.value = "compare"
    explorer.select(path)
    assert explorer.last_error is None
    assert list(explorer.last_results) == ["flat", "hierarchical", "adaptive"]
    assert explorer.last_result is explorer.last_results["adaptive"]
    html = explorer.view.panel_html
    assert html.index('data-mode="flat"') < html.index('data-mode="hierarchical"') < html.index('data-mode="adaptive"')
    for mode, r in explorer.last_results.items():
        assert r.query == path and len(r.hits) == 4
        ranked = [h.get("rank_score", h["score"]) for h in r.hits]
        assert ranked == sorted(ranked, reverse=True), (mode, ranked)  # listed in rank order
        for rank, h in enumerate(r.hits, 1):  # every hit: its path on hover, its rank and similarity
            assert f'data-id="{h["path"]}" data-rank="{rank}"' in html
            assert f'title="{h["path"]}"' in html and f"sim {h['score']:.3f}" in html
    hier = explorer.last_results["hierarchical"]
    assert all(h["label"] == hier.predicted[0][0] for h in hier.hits)  # narrowed to the top class
    assert "predicted classes" in html and html.count("<img") == 1 + 3 * 4  # the query and 3 x 4 hits


def test_one_mode_and_k_drive_the_search(explorer):
    explorer.select(explorer.query_paths[5])
    explorer.mode.value = "hierarchical"
    assert list(explorer.last_results) == ["hierarchical"]
    r = explorer.last_result
    assert r.mode == "hierarchical" and r.searched_labels == [r.predicted[0][0]]
    explorer.mode.value = "flat"
    assert explorer.last_result.mode == "flat" and explorer.last_result.searched_labels is None
    explorer.k_slider.value = 5
    assert len(explorer.last_result.hits) == 5
    explorer.mode.value = "compare"


def test_the_gallery_filters_by_class_and_by_text(explorer):
    everything = explorer.gallery_paths()
    assert everything == explorer.query_paths and explorer.view.gallery_html.count('class="vs-thumb"') == len(everything)
    cls = explorer._labels[everything[-1]]
    explorer.label_filter.value = cls
    shown = explorer.gallery_paths()
    assert shown and all(explorer._labels[p] == cls for p in shown) and len(shown) < len(everything)
    assert explorer.view.gallery_html.count('class="vs-thumb"') == len(shown)
    name = Path(shown[0]).name[:5]
    explorer.search_text.value = name.upper()  # case-insensitive, matched against the file name too
    assert shown[0] in explorer.gallery_paths()
    explorer.search_text.value = "no-such-thing-anywhere"
    assert explorer.gallery_paths() == [] and "no query image matches" in explorer.view.gallery_html
    explorer.search_text.value, explorer.label_filter.value = "", "all classes"


def test_clicking_a_thumbnail_or_a_hit_searches_with_it(explorer):
    """A click sets the view's ``selected`` trait from the browser; the kernel searches with that image."""
    first = explorer.query_paths[0]
    explorer.view.selected = first
    assert explorer.last_result.query == first
    hit = explorer.last_results["flat"].hits[2]["path"]  # an indexed image, not a query
    explorer.view.selected = hit
    r = explorer.last_results["flat"]
    assert r.query == hit and r.hits[0]["path"] == hit and r.hits[0]["score"] > 0.99  # it finds itself first
    assert f'data-query="{hit}"' in explorer.view.panel_html


def test_enlarge_sends_a_bigger_image(explorer, monkeypatch):
    sent = []
    monkeypatch.setattr(explorer.view, "send", lambda content, buffers=None: sent.append(content))
    path = explorer.query_paths[1]
    explorer._on_view_msg(explorer.view, {"type": "enlarge", "id": path}, [])
    assert sent[0]["type"] == "enlarged" and sent[0]["id"] == path and path in sent[0]["caption"]
    from PIL import Image
    import base64, io

    img = Image.open(io.BytesIO(base64.b64decode(sent[0]["uri"].split(",", 1)[1])))
    assert max(img.size) > 72  # bigger than the hit's thumbnail


def test_a_dropped_image_is_used_as_the_query(explorer, cfg):
    index = features.load_features(cfg).split("index").table
    src = index["path"].iloc[0]
    explorer.k_slider.value = 4
    # what the drop zone sends: the file's name, its bytes as a buffer
    explorer._on_view_msg(explorer.view, {"type": "upload", "name": "my-photo.png"}, [memoryview(Path(src).read_bytes())])
    r = explorer.last_result
    assert explorer.last_error is None and r is not None
    assert r.query == "my-photo.png" and explorer.view.selected == "upload:my-photo.png"
    assert r.hits[0]["path"] == src and r.hits[0]["score"] > 0.99  # an indexed image finds itself first
    assert "query: my-photo.png" in explorer.view.panel_html
    # no gallery thumbnail is marked as the query (the front end marks the one whose data-id is `selected`)
    assert f'data-id="{explorer.view.selected}"' not in explorer.view.gallery_html
    # the same file dropped again searches again
    explorer.k_slider.value = 3
    assert len(explorer.upload_bytes("my-photo.png", Path(src).read_bytes()).hits) == 3
    explorer.select(explorer.query_paths[1])  # back to the query split
    assert explorer.last_result.query == explorer.query_paths[1]


def test_an_unreadable_upload_shows_a_clear_message(explorer):
    explorer.upload_bytes("notes.txt", b"this is not an image")
    assert explorer.last_result is None
    assert "notes.txt" in explorer.last_error and "cannot be used as a query" in explorer.last_error
    assert "Cannot search" in explorer.view.panel_html and "Traceback" not in explorer.view.panel_html
    explorer.select(explorer.query_paths[0])  # recovers
    assert explorer.last_result is not None and explorer.last_error is None


def test_the_display_carries_a_static_snapshot_for_html_exports(explorer):
    bundle = explorer._repr_mimebundle_()
    assert "application/vnd.jupyter.widget-view+json" in bundle
    snap = bundle["text/html"]
    assert snap.count('class="vs-col"') == 3 and "make lab" in snap
    # enlarging works without JavaScript: each hit links to a hidden full-size copy
    assert snap.count('class="vs-big"') == 3 * explorer.k_slider.value
    assert "<script" not in snap and not re.search(r'(src|href)="https?:', snap)  # nothing to fetch
    assert snap.count("Elasticsearch is not offered") == 1
    # the embedding map as a static SVG, the query and the main mode's hits ringed, labels in native tooltips
    assert snap.count("<svg") == 1 and snap.count('class="vs-pt vs-querypt"') == 1
    assert snap.count('class="vs-pt vs-hitpt"') == len(explorer.last_result.hits)
    assert snap.count("<title>") == len(explorer.map_points)


def test_the_embedding_map_has_one_point_per_image_with_its_label(explorer, cfg):
    import numpy as np

    from vslib.explorer import map_points

    fs = features.load_features(cfg)
    explorer.select(explorer.query_paths[0])  # a held-out query: not among its own hits
    pts = explorer.map_points
    assert len(pts) == len(fs) and sorted(pts["path"]) == sorted(fs.table["path"].astype(str))
    assert set(pts["split"]) == {"index", "query"}
    assert np.isfinite(pts[["x", "y"]].to_numpy()).all() and pts["x"].std() > 0 and pts["y"].std() > 0
    assert dict(zip(pts["path"], pts["label"])) == explorer._labels
    svg = explorer.view.map_html
    for path, label in zip(pts["path"], pts["label"]):  # every image is one point carrying its label
        assert svg.count(f'data-id="{path}" data-label="{label}"') == 1, path
    assert len(re.findall(r'class="vs-pt[" ]', svg)) == len(pts)
    names = re.findall(r'<text [^>]*font-size="(\d+)"[^>]*>([^<]+)</text>', svg)
    last = [c.split("/")[-1] for c in sorted(set(pts["label"]))]
    expected = {c.split("/")[-1] if last.count(c.split("/")[-1]) == 1 else c for c in pts["label"]}
    assert {n for _, n in names} == expected  # class names at the centres (in full where the last part repeats)
    assert min(int(f) for f, _ in names) >= 9  # legible: the SVG is shown unscaled
    # computed once: the second call reads the cached coordinates
    cached = list(fs.table["path"].astype(str))
    again = map_points(cfg)
    assert list(again["path"]) == cached and np.array_equal(again[["x", "y"]].to_numpy(), pts[["x", "y"]].to_numpy())
    assert len(list(features.features_path(cfg).parent.glob("umap-*.npy"))) == 1


def test_clicking_a_map_point_makes_it_the_query_and_rings_its_hits(explorer, monkeypatch):
    explorer.mode.value = "compare"
    explorer.select(explorer.query_paths[0])
    before = [h["path"] for h in explorer.last_result.hits]
    pts = explorer.map_points
    point = next(p for p in pts[pts["split"] == "index"]["path"] if p not in before)
    # a click on a point sets `selected` from the browser, as a click on a thumbnail does
    explorer.view.selected = point
    r = explorer.last_result
    assert r.query == point and r.hits[0]["path"] == point and [h["path"] for h in r.hits] != before
    svg = explorer.view.map_html
    assert re.findall(r'class="vs-pt vs-querypt" data-id="([^"]+)"', svg) == [point]
    assert re.findall(r'class="vs-pt vs-hitpt" data-id="([^"]+)"', svg) == [h["path"] for h in r.hits]
    assert f'data-query="{point}"' in explorer.view.panel_html
    # hovering a point asks for its thumbnail; only images of the collection are answered
    sent = []
    monkeypatch.setattr(explorer.view, "send", lambda content, buffers=None: sent.append(content))
    explorer._on_view_msg(explorer.view, {"type": "thumb", "id": point}, [])
    explorer._on_view_msg(explorer.view, {"type": "thumb", "id": "/etc/passwd"}, [])
    assert len(sent) == 1 and sent[0]["id"] == point and sent[0]["uri"].startswith("data:image/png;base64,")


def test_the_front_end_is_read_from_the_package_data():
    from vslib.explorer import CSS, ESM, _view_class

    assert CSS.startswith(".vs-x{") and ESM.startswith("export default {") and ESM.rstrip().endswith("};")
    view = _view_class()
    assert view._esm == ESM and view._css == CSS


def test_rank_score_is_shown_beside_the_similarity_when_the_engine_ranks_by_it():
    from vslib.explorer import scores_text

    assert scores_text({"score": 0.81234}) == "sim 0.812"
    assert scores_text({"score": 0.81234, "rank_score": 0.81234}) == "sim 0.812"
    assert scores_text({"score": 0.81234, "rank_score": 0.70111}) == "sim 0.812 · rank 0.701"


def test_elasticsearch_is_offered_only_when_the_cluster_answers(explorer, cfg):
    ok, message = elasticsearch_status(cfg, timeout=1)
    assert not ok and "127.0.0.1:9" in message
    assert list(explorer.backend.options) == ["embedded"]
    # one short notice, not the connection error twice
    assert explorer.backend_note == "Elasticsearch is not offered: no answer from http://127.0.0.1:9."
    assert explorer.notice.value.count("Elasticsearch") == 1


def test_an_unreachable_backend_chosen_anyway_is_a_message_not_a_traceback(cfg):
    with QueryExplorer(cfg, check_elasticsearch=False) as ex:
        assert "elasticsearch" in ex.backend.options
        ex.backend.value = "elasticsearch"
        assert ex.last_result is None
        assert "cannot reach Elasticsearch" in ex.last_error
        ex.backend.value = "embedded"
        assert ex.last_result is not None


@pytest.mark.elasticsearch
def test_elasticsearch_backend_when_a_server_runs(cfg, es_url):
    import dataclasses

    from vslib import index as vindex

    es = dataclasses.replace(cfg.index.elasticsearch, hosts=[es_url], request_timeout=10,
                             index_name="vs-explorer-test")
    es_cfg = dataclasses.replace(cfg, index=dataclasses.replace(cfg.index, backend="elasticsearch",
                                                                elasticsearch=es))
    vindex.build(es_cfg, rebuild=True, progress=False)
    try:
        with QueryExplorer(es_cfg) as ex:
            assert set(ex.backend.options) == {"embedded", "elasticsearch"}
            assert ex.backend.value == "elasticsearch"
            ex.mode.value = "flat"
            ex.k_slider.value = 3
            flat_es = ex.last_result
            ex.backend.value = "embedded"
            flat_emb = ex.last_result
            assert len(flat_es.hits) == len(flat_emb.hits) == 3
            assert flat_es.hits[0]["path"] == flat_emb.hits[0]["path"]
    finally:
        vindex.open_index(es_cfg, create=False).drop()
