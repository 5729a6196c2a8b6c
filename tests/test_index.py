"""One contract suite for every vector index backend.

Elasticsearch runs against a server this suite starts itself (PyPI's noida-db,
an Elasticsearch-API emulator, on a free loopback port), or against the
cluster named by ``VS_ES_URL`` (with ``VS_ES_API_KEY`` / ``VS_ES_USERNAME`` /
``VS_ES_PASSWORD`` / ``VS_ES_CA_CERTS``) when that is set. Every test uses its
own index name and deletes it afterwards.
"""
from __future__ import annotations

import os
import time
import uuid

import numpy as np
import pandas as pd
import pytest

from es_server import free_port
from vslib.config import parse_config
from vslib.errors import IndexBackendError
from vslib.index import (BulkIndexError, IndexDimensionError, IndexNotFoundError, IndexUnreachableError, build,
                         exact_search, item_ids, open_index)

DIM = 32

# (backend, settings): the same tests run against each
VARIANTS = {
    "embedded": ("embedded", {"embedded": {"factory": "Flat"}}),
    "embedded-hnsw": ("embedded", {"embedded": {"factory": "HNSW16", "ef_search": 64}}),
    # `flat` index_options: knn is exact on a real cluster too, so it is checked against numpy
    "es-knn-flat": ("elasticsearch", {"elasticsearch": {"index_options": {"type": "flat"}}}),
    "es-knn-hnsw": ("elasticsearch", {"elasticsearch": {"index_options": {"type": "hnsw", "m": 16,
                                                                          "ef_construction": 100}}}),
    "es-exact": ("elasticsearch", {"elasticsearch": {"exact": True}}),
    "es-cosine": ("elasticsearch", {"elasticsearch": {"similarity": "cosine", "index_options": {"type": "flat"}}}),
}


# ---------------------------------------------------------------------------
# fixtures


def _config(tmp_path, backend: str, settings: dict, es_url=None, index_name=None):
    index = {"backend": backend, **{k: dict(v) for k, v in settings.items()}}
    if backend == "elasticsearch":
        es = index.setdefault("elasticsearch", {})
        es.setdefault("index_name", index_name or f"vs-test-{uuid.uuid4().hex[:12]}")
        es.setdefault("request_timeout", 10.0)
        if not os.environ.get("VS_ES_URL"):
            es["hosts"] = [es_url]
    # VS_ES_* environment variables (a real cluster's URL and secrets) apply as in production
    return parse_config({"index": index}, base_dir=tmp_path, env=os.environ)


class Opener:
    """Opens indexes of one variant and deletes everything it opened at teardown."""

    def __init__(self, variant, tmp_path, request):
        self.variant = variant
        self.backend, self.settings = VARIANTS[variant]
        self.tmp_path = tmp_path
        self.es_url = request.getfixturevalue("es_url") if self.backend == "elasticsearch" else None
        self.opened = []
        self.cfg = self.config()

    def config(self, **es):
        settings = {k: dict(v) for k, v in self.settings.items()}
        if es:
            settings.setdefault("elasticsearch", {}).update(es)
        return _config(self.tmp_path, self.backend, settings, self.es_url)

    def __call__(self, dim=DIM, cfg=None, create=True):
        index = open_index(cfg or self.cfg, dim=dim, create=create)
        if self.backend == "elasticsearch":
            index.max_retries, index.initial_backoff = 1, 0.1
        self.opened.append((cfg or self.cfg, index))
        return index

    def cleanup(self):
        for cfg, index in self.opened:
            try:
                if index.closed:
                    index = open_index(cfg, create=False)
                index.drop()
            except IndexNotFoundError:
                pass


@pytest.fixture(params=list(VARIANTS))
def opener(request, tmp_path):
    op = Opener(request.param, tmp_path, request)
    yield op
    op.cleanup()


def unit_vectors(n, dim=DIM, seed=0):
    x = np.random.default_rng(seed).normal(size=(n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def dataset(n=300, n_labels=10, seed=0):
    x = unit_vectors(n, seed=seed)
    ids = [f"item-{i:04d}" for i in range(n)]
    meta = [{"label": f"class{i % n_labels}", "path": f"img/{i}.png"} for i in range(n)]
    return ids, x, meta


def hit_ids(hits):
    return [[h.id for h in row] for row in hits]


# ---------------------------------------------------------------------------
# the contract


def test_exact_search_equals_numpy_brute_force(opener):
    ids, x, meta = dataset()
    q = unit_vectors(8, seed=1)
    with opener() as index:
        if not index.exact:
            pytest.skip(f"{opener.variant} is approximate (recall is checked below)")
        assert index.add(ids, x, meta) == len(ids)
        labels = np.array([m["label"] for m in meta])
        for filt, rows in [(None, None), ({"label": ["class1", "class3"]}, np.flatnonzero(np.isin(labels, ["class1", "class3"])))]:
            hits = index.search(q, k=10, filter=filt)
            scores, found = exact_search(x, q, 10, rows)
            assert hit_ids(hits) == [[ids[r] for r in row] for row in found]
            np.testing.assert_allclose([[h.score for h in row] for row in hits], scores, atol=1e-5)
            assert hits[0][0].metadata == meta[found[0][0]]


def test_approximate_search_has_good_recall(opener):
    ids, x, meta = dataset(n=1000)
    q = unit_vectors(20, seed=2)
    with opener() as index:
        index.add(ids, x, meta)
        hits = index.search(q, k=10)
        _, found = exact_search(x, q, 10)
        recall = np.mean([len(set(h) & {ids[r] for r in f}) / 10 for h, f in zip(hit_ids(hits), found)])
        assert recall >= (1.0 if index.exact else 0.8)


def test_filtered_search_returns_k_when_enough_items_match(opener):
    # 1000 items, 50 labels: each label matches 20 items, a small share of the collection
    ids, x, meta = dataset(n=1000, n_labels=50)
    q = unit_vectors(5, seed=3)
    with opener() as index:
        index.add(ids, x, meta)
        for k, filt, expected in [(10, {"label": ["class7"]}, 10),
                                  (20, {"label": "class7"}, 20),
                                  (30, {"label": ["class7"]}, 20),  # only 20 match: all of them, no more
                                  (30, {"label": ["class7", "class8"]}, 30),
                                  (5, {"label": ["no-such-label"]}, 0),
                                  (5, {"label": []}, 0)]:
            hits = index.search(q, k=k, filter=filt)
            assert [len(row) for row in hits] == [expected] * len(q), (k, filt)
            allowed = set([filt["label"]] if isinstance(filt["label"], str) else filt["label"])
            assert all(h.metadata["label"] in allowed for row in hits for h in row)
            assert all(len(set(r)) == len(r) for r in hit_ids(hits))
        assert index.count({"label": ["class7", "class8"]}) == 40


def test_remove(opener):
    ids, x, meta = dataset(n=100)
    with opener() as index:
        index.add(ids, x, meta)
        assert index.remove(ids[:10] + ["never-added"]) == 10
        assert index.count() == 90
        assert index.remove(ids[:10]) == 0
        hits = index.search(x[:10], k=5)
        assert not {h.id for row in hits for h in row} & set(ids[:10])
        # the removed item's own vector no longer finds it; a kept one still finds itself first
        assert index.search(x[50:51], k=1)[0][0].id == ids[50]


def test_re_adding_replaces_and_never_duplicates(opener):
    ids, x, meta = dataset(n=100)
    with opener() as index:
        index.add(ids, x, meta)
        index.add(ids, x, meta)
        assert index.count() == 100
        # a new vector and new metadata for an existing id replace the old ones
        new = unit_vectors(1, seed=9)
        index.add([ids[0]], new, [{"label": "moved", "path": "img/new.png"}])
        assert index.count() == 100
        assert index.count({"label": "moved"}) == 1
        top = index.search(new, k=3)[0]
        assert top[0].id == ids[0] and top[0].metadata["label"] == "moved"
        assert [h.id for h in top].count(ids[0]) == 1
        # within one batch the last occurrence wins
        index.add(["dup", "dup"], unit_vectors(2, seed=10), [{"label": "first"}, {"label": "last"}])
        assert index.count() == 101 and index.count({"label": "last"}) == 1 and index.count({"label": "first"}) == 0


def test_persists_and_reopens(opener):
    ids, x, meta = dataset(n=200)
    q = unit_vectors(4, seed=4)
    index = opener()
    index.add(ids, x, meta)
    index.remove(ids[:5])
    before = index.search(q, k=10, filter={"label": ["class2"]})
    index.close()
    with opener(dim=None, create=False) as again:  # dim is read from the stored index
        assert again.dim == DIM
        assert again.count() == 195
        after = again.search(q, k=10, filter={"label": ["class2"]})
        assert hit_ids(after) == hit_ids(before)
        np.testing.assert_allclose([[h.score for h in r] for r in after], [[h.score for h in r] for r in before],
                                   atol=1e-6)


def test_missing_index_is_a_clear_error(opener):
    with pytest.raises(IndexNotFoundError, match="does not exist|no embedded index"):
        opener(create=False)


def test_dims_mismatch_is_a_clear_error(opener):
    with opener(dim=8) as index:
        index.add(["a"], unit_vectors(1, dim=8), [{"label": "x"}])
    with pytest.raises(IndexDimensionError, match=r"8-dimensional.*16-dimensional"):
        opener(dim=16, create=False)


def test_bulk_failure_names_the_document_and_keeps_the_others(opener):
    ids, x, meta = dataset(n=50)
    x[7, 3] = np.nan
    with opener() as index:
        with pytest.raises(BulkIndexError) as err:
            index.add(ids, x, meta)
        assert [i for i, _ in err.value.failures] == [ids[7]]
        assert "NaN" in err.value.failures[0][1] and ids[7] in str(err.value)
        assert err.value.added == 49
        assert index.count() == 49


def test_input_shapes_are_checked(opener):
    with opener() as index:
        with pytest.raises(ValueError, match="16 dimensions; this index holds 32"):
            index.add(["a"], np.zeros((1, 16), np.float32))
        with pytest.raises(ValueError, match="2-D"):
            index.search(np.zeros(DIM, np.float32), k=1)
        with pytest.raises(ValueError, match="ids"):
            index.add(["a", "b"], unit_vectors(3))
        with pytest.raises(ValueError, match="k must be"):
            index.search(unit_vectors(1), k=0)
        assert index.search(unit_vectors(2), k=3) == [[], []]  # empty index: no hits, no error
        if index.max_k is not None:
            with pytest.raises(ValueError, match="max_k"):
                index.search(unit_vectors(1), k=index.max_k + 1)


# ---------------------------------------------------------------------------
# backend specifics


def test_unknown_backend_lists_the_available_ones(tmp_path):
    from vslib.index import backend_class

    with pytest.raises(IndexBackendError, match=r"Unsupported backend 'x'. Available backends are \['elasticsearch', 'embedded'\]"):
        backend_class("x")


def test_embedded_hnsw_reopens_without_rebuilding(tmp_path):
    cfg = _config(tmp_path, "embedded", {"embedded": {"factory": "HNSW16"}})
    ids, x, meta = dataset(n=300)
    with open_index(cfg, dim=DIM) as index:
        index.add(ids, x, meta)
    folder = cfg.index_dir
    files = {p.name for p in folder.rglob("*") if p.is_file()}
    assert {"meta.json", "vectors.npy", "metadata.parquet", "faiss.index"} <= files
    assert not [p for p in folder.iterdir() if p.name.startswith(".")], "temporary files left behind"
    with open_index(cfg, create=False) as again:
        assert again._faiss is not None and again._faiss.ntotal == 300  # read, not rebuilt


def test_embedded_bad_factory_names_it(tmp_path):
    cfg = _config(tmp_path, "embedded", {"embedded": {"factory": "NoSuchIndex12"}})
    with pytest.raises(IndexBackendError, match="NoSuchIndex12"):
        open_index(cfg, dim=DIM)


def test_elasticsearch_reports_documents_the_server_rejects(request, tmp_path):
    op = Opener("es-knn-hnsw", tmp_path, request)
    try:
        with op() as index:
            x = unit_vectors(3)
            # `year` is mapped as a number by the first document; the server rejects the string
            with pytest.raises(BulkIndexError) as err:
                index.add(["a", "b", "c"], x, [{"label": "x", "year": 2001}, {"label": "y", "year": "not a year"},
                                               {"label": "z", "year": 2003}])
            assert [i for i, _ in err.value.failures] == ["b"]
            assert "year" in err.value.failures[0][1]
            assert err.value.added == 2 and index.count() == 2
    finally:
        op.cleanup()


def test_elasticsearch_unreachable_fails_fast_names_url_hides_secrets(tmp_path):
    port = free_port()  # nothing listens there
    cfg = parse_config({"index": {"backend": "elasticsearch", "elasticsearch": {
        "hosts": [f"http://elastic:url-secret-1@127.0.0.1:{port}"], "username": "elastic",
        "password": "cfg-secret-2", "request_timeout": 2.0}}}, base_dir=tmp_path, env={})
    t0 = time.monotonic()
    with pytest.raises(IndexUnreachableError) as err:
        open_index(cfg, dim=DIM)
    assert time.monotonic() - t0 < 10
    message = str(err.value)
    assert f"127.0.0.1:{port}" in message
    assert "url-secret-1" not in message and "cfg-secret-2" not in message


def test_elasticsearch_mapping(request, tmp_path):
    op = Opener("es-knn-hnsw", tmp_path, request)
    try:
        with op() as index:
            mapping = index.client.indices.get_mapping(index=index.index_name).body
            m = next(iter(mapping.values()))["mappings"]
            vec = m["properties"]["vector"]
            assert (vec["type"], vec["dims"], vec["similarity"]) == ("dense_vector", DIM, "dot_product")
            assert vec["index_options"]["type"] == "hnsw" and vec["index_options"]["m"] == 16
            assert m["properties"]["label"]["type"] == "keyword"
            assert m["properties"]["predicted_label"]["type"] == "keyword"
            assert "vector" in m.get("_source", {}).get("excludes", [])
    finally:
        op.cleanup()


# ---------------------------------------------------------------------------
# build(cfg): the feature cache's index split into the configured backend


@pytest.mark.parametrize("variant", ["embedded", "es-knn-flat"])
def test_build_indexes_the_index_split_idempotently(variant, request, tmp_path):
    from vslib.features import FeatureSet, features_path

    backend, settings = VARIANTS[variant]
    es_url = request.getfixturevalue("es_url") if backend == "elasticsearch" else None
    cfg = _config(tmp_path, backend, settings, es_url)
    n = 60
    table = pd.DataFrame({"path": [f"/data/img{i}.png" for i in range(n)],
                          "label": [f"c{i % 4}" for i in range(n)],
                          "split": ["query" if i % 5 == 0 else "index" for i in range(n)],
                          "content_hash": [f"h{i:03d}" for i in range(n)]})
    table.loc[3, "content_hash"] = table.loc[1, "content_hash"]  # two identical files at different paths
    FeatureSet(unit_vectors(n), table, cfg.backbone.name).save(features_path(cfg))
    try:
        info = build(cfg, progress=False)
        assert info["count"] == 48 and info["dim"] == DIM
        info = build(cfg, progress=False)  # rerun: same ids, replaced, not duplicated
        assert info["count"] == 48
        with open_index(cfg, create=False) as index:
            hit = index.search(unit_vectors(n)[1:2], k=1)[0][0]
            assert hit.metadata["path"] == "/data/img1.png" and hit.metadata["split"] == "index"
            assert index.count({"label": "c1"}) == 12
    finally:
        try:
            open_index(cfg, create=False).drop()
        except IndexNotFoundError:
            pass
    ids = item_ids(table)
    assert len(set(ids)) == n and ids[0] == "h000" and ids[1].startswith("h001-")


@pytest.mark.parametrize("factory", ["Flat", "HNSW16"])
def test_embedded_faiss_selector_path(factory, tmp_path):
    """Filtered search through FAISS's IDSelector (not the small-subset numpy path): exact for
    Flat, and k hits for HNSW even with a selective filter (falls back to exact when HNSW misses)."""
    cfg = _config(tmp_path, "embedded", {"embedded": {"factory": factory, "ef_search": 16}})
    ids, x, meta = dataset(n=2000, n_labels=100)
    q = unit_vectors(10, seed=5)
    with open_index(cfg, dim=DIM) as index:
        index.exact_below = 0
        index.add(ids, x, meta)
        index.remove(ids[:3])  # dead rows must be excluded as well
        labels = np.array([m["label"] for m in meta])
        for allowed in (["class0"], [f"class{i}" for i in range(50)]):
            rows = np.flatnonzero(np.isin(labels, allowed) & (np.arange(len(ids)) >= 3))
            hits = index.search(q, k=10, filter={"label": allowed})
            assert [len(r) for r in hits] == [min(10, len(rows))] * len(q)
            assert all(h.metadata["label"] in allowed for r in hits for h in r)
            if index.exact:
                _, found = exact_search(x, q, 10, rows)
                assert hit_ids(hits) == [[ids[r] for r in row] for row in found]


def test_embedded_ignores_leftovers_of_a_crashed_save(tmp_path):
    cfg = _config(tmp_path, "embedded", {"embedded": {"factory": "Flat"}})
    ids, x, meta = dataset(n=20)
    with open_index(cfg, dim=DIM) as index:
        index.add(ids, x, meta)
    (cfg.index_dir / ".tmp-crashed").mkdir()
    (cfg.index_dir / "g999999").mkdir()  # a generation meta.json never pointed to
    with open_index(cfg, create=False) as index:
        assert index.count() == 20
        index.add(["new"], unit_vectors(1, seed=7))
    with open_index(cfg, create=False) as index:
        assert index.count() == 21
    # the save after the add cleaned up: meta.json and the one generation it names
    assert sorted(p.name for p in cfg.index_dir.iterdir()) == ["g000002", "meta.json"]


@pytest.mark.parametrize("factory", ["Flat", "HNSW32"])
def test_embedded_vectors_held_once_and_correct_across_changes(tmp_path, factory):
    """Once FAISS holds the vectors, the index reads them from FAISS's storage (no second copy);
    adding, replacing, removing and reopening around that must keep results exact."""
    from vslib.index.embedded import EmbeddedIndex

    rng = np.random.default_rng(3)
    x = rng.standard_normal((3000, 32)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    ids = [f"v{i}" for i in range(3000)]
    q = x[:4] + 0.05
    idx = EmbeddedIndex.open(tmp_path / "ix", 32, factory=factory, ef_search=3000)
    idx.add(ids[:2000], x[:2000])
    idx.search(q, 5)  # builds FAISS: our copy of the vectors is dropped
    assert idx._view_owner is not None and not idx._vectors.flags.owndata
    idx.add(ids[2000:], x[2000:])  # appends after a view
    y = x.copy()
    y[10] = -y[10]
    idx.add([ids[10]], y[10:11])  # replace
    idx.remove([ids[20]])

    def expected(vectors, alive):
        s = q @ vectors[alive].T
        order = np.argsort(-s, axis=1)[:, :5]
        return [[ids[j] for j in np.flatnonzero(alive)[row]] for row in order]

    alive = np.ones(3000, bool)
    alive[20] = False
    got = [[h.id for h in hits] for hits in idx.search(q, 5)]
    assert got == expected(y, alive)
    idx.close()
    again = EmbeddedIndex.open(tmp_path / "ix", factory=factory, ef_search=3000)
    assert again.count() == 2999
    assert [[h.id for h in hits] for hits in again.search(q, 5)] == expected(y, alive)
    again.close()
