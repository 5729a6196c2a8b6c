"""The query explorer's callbacks, driven by setting widget values as a user would.

One module-scoped project (a small Tux Paint subset: prepare -> extract -> train
-> index, all real) is shared by the tests.
"""
from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
import yaml

from vslib import features, report
from vslib.config import load_config
from vslib.explorer import QueryExplorer, elasticsearch_status



@pytest.fixture(scope="module")
def cfg(tmp_path_factory):
    d = tmp_path_factory.mktemp("explorer")
    data = {
        "dataset": {"name": "tuxpaint", "max_per_class": 6, "install": False},
        "backbone": {"name": "efficientnet_lite0", "batch_size": 32, "workers": 2},
        "classifier": {"epochs": 30},
        # nothing listens on port 9 (discard): the elasticsearch backend must not be offered
        "index": {"backend": "embedded", "elasticsearch": {"hosts": ["http://127.0.0.1:9"], "request_timeout": 1}},
        "paths": {"data": "data", "models": "models", "reports": "reports"},
    }
    p = d / "application.yaml"
    p.write_text(yaml.safe_dump(data, sort_keys=False))
    cfg = load_config(p)
    report.ensure(cfg, "index", echo=lambda *_: None)
    return cfg


@pytest.fixture(scope="module")
def explorer(cfg):
    with QueryExplorer(cfg) as ex:
        yield ex


def _upload(ex, name: str, content: bytes) -> None:
    """Set the FileUpload value as ipywidgets 8 does after a user picks a file."""
    ex.upload.value = ({"name": name, "type": "image/png", "size": len(content),
                        "last_modified": dt.datetime.now(dt.timezone.utc),
                        "content": memoryview(content)},)


def test_query_split_choice_k_and_mode_drive_the_search(explorer, cfg):
    queries = features.load_features(cfg).split("query").table
    path = queries["path"].iloc[3]
    explorer.dropdown.value = path
    explorer.k_slider.value = 3
    explorer.mode.value = "hierarchical"
    r = explorer.last_result
    assert explorer.last_error is None
    assert r is not None and len(r.hits) == 3
    assert r.mode == "hierarchical" and r.searched_labels == [r.predicted[0][0]]
    assert all(h["label"] == r.predicted[0][0] for h in r.hits)  # narrowed to the top class
    assert r.query == path
    html = explorer.output.value
    assert "predicted classes" in html and html.count("<img") >= 4  # the query and 3 hits
    assert f"{r.hits[0]['score']:.3f}" in html

    explorer.mode.value = "flat"
    assert explorer.last_result.mode == "flat" and explorer.last_result.searched_labels is None
    explorer.k_slider.value = 5
    assert len(explorer.last_result.hits) == 5


def test_an_uploaded_image_is_used_as_the_query(explorer, cfg):
    index = features.load_features(cfg).split("index").table
    src = index["path"].iloc[0]
    explorer.k_slider.value = 4
    explorer.mode.value = "flat"
    _upload(explorer, "my-photo.png", Path(src).read_bytes())
    assert explorer.source.value == "uploaded file"
    r = explorer.last_result
    assert explorer.last_error is None and r is not None
    assert r.query == "my-photo.png"
    # the uploaded image is an indexed one: it finds itself first
    assert r.hits[0]["path"] == src and r.hits[0]["score"] > 0.99
    # picking from the dropdown switches back to the query split
    explorer.dropdown.value = explorer.dropdown.options[1][1]
    assert explorer.source.value == "query split"
    assert explorer.last_result.query == explorer.dropdown.value


def test_an_unreadable_upload_shows_a_clear_message(explorer):
    _upload(explorer, "notes.txt", b"this is not an image")
    assert explorer.last_result is None
    assert "notes.txt" in explorer.last_error and "cannot be used as a query" in explorer.last_error
    assert "Cannot search" in explorer.output.value and "Traceback" not in explorer.output.value
    explorer.source.value = "query split"  # recovers
    assert explorer.last_result is not None and explorer.last_error is None


def test_elasticsearch_is_offered_only_when_the_cluster_answers(explorer, cfg):
    ok, message = elasticsearch_status(cfg, timeout=1)
    assert not ok and "127.0.0.1:9" in message
    assert list(explorer.backend.options) == ["embedded"]
    assert "elasticsearch is not offered" in explorer.backend_note


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
            ex.k_slider.value = 3
            flat_es = ex.last_result
            ex.backend.value = "embedded"
            flat_emb = ex.last_result
            assert len(flat_es.hits) == len(flat_emb.hits) == 3
            assert flat_es.hits[0]["path"] == flat_emb.hits[0]["path"]
    finally:
        vindex.open_index(es_cfg, create=False).drop()
