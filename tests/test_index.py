"""One contract suite for every vector index backend.

Elasticsearch runs against a server this suite starts itself (PyPI's noida-db,
an Elasticsearch-API emulator, on a free loopback port), or against the
cluster named by ``VS_ES_URL`` (with ``VS_ES_API_KEY`` / ``VS_ES_USERNAME`` /
``VS_ES_PASSWORD`` / ``VS_ES_CA_CERTS``) when that is set. Every test uses its
own index name and deletes it afterwards.

Quirks of the emulator (noida-db 0.2.3) that these tests work around or
cannot see, and that the ``VS_ES_URL`` run covers:

- it reports version 8.15.3 but accepts any ``compatible-with`` header, so a
  9.x client "works" against it; the client/server major check below is what
  catches that (a real 8.x server answers ``400 media_type_header_exception``);
- no security: 401/403 and the privileges table are checked only against a
  real cluster with security on (the test creates a read-only API key);
- ``knn.rescore_vector`` is unknown (400), and its quantized ``int8_hnsw`` is
  approximate in its own way: quantized scores are not checked against it;
- it never refreshes on its own (documents appear only after ``_refresh``),
  so ``refresh_interval: -1`` cannot be observed changing visibility, only the
  setting itself;
- ``index_options`` such as ``m: -1`` are accepted instead of rejected.
"""
from __future__ import annotations

import os
import time
import uuid

import numpy as np
import pandas as pd
import pytest

from benchmarks.es_server import free_port
from vslib.config import parse_config
from vslib.errors import IndexBackendError
from vslib.index import (BulkIndexError, IndexDimensionError, IndexMismatchError, IndexNotFoundError,
                         IndexPermissionError, IndexTimeoutError, IndexUnreachableError, build, exact_search, item_ids,
                         open_index)

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
    assert not [p for p in folder.iterdir() if p.name.startswith(".") and p.name != ".lock"], "temporary files left behind"
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
    assert sorted(p.name for p in cfg.index_dir.iterdir() if p.name != ".lock") == ["g000002", "meta.json"]


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


# ---------------------------------------------------------------------------
# batched searches and counts (contract, with a default for every backend)


def test_search_many_equals_one_search_per_row(opener):
    ids, x, meta = dataset(n=400, n_labels=20)
    q = unit_vectors(6, seed=11)
    # each query searched unfiltered and within three classes, as adaptive search does
    rows = np.repeat(q, 4, axis=0)
    filters = [None if j == 0 else {"label": [f"class{(i + j) % 20}"]} for i in range(len(q)) for j in range(4)]
    with opener() as index:
        index.add(ids, x, meta)
        if opener.backend == "elasticsearch":
            index.msearch_batch = 10
            before = index.requests
        many = index.search_many(rows, 7, filters)
        if opener.backend == "elasticsearch":
            assert index.requests - before == 3  # 24 searches, 10 per _msearch
        one = [index.search(rows[i:i + 1], 7, filters[i])[0] for i in range(len(rows))]
        assert hit_ids(many) == hit_ids(one)
        np.testing.assert_allclose([[h.score for h in r] for r in many], [[h.score for h in r] for r in one], atol=1e-6)
        assert all(h.metadata["label"] in filters[i]["label"] for i, r in enumerate(many) if filters[i] for h in r)
        with pytest.raises(ValueError, match="one per row"):
            index.search_many(rows, 7, filters[:-1])


def test_count_values_in_one_request(opener):
    ids, x, meta = dataset(n=90, n_labels=9)
    with opener() as index:
        index.add(ids, x, meta)
        wanted = ["class0", "class4", "no-such-class"]
        if opener.backend == "elasticsearch":
            before = index.requests
        got = index.count_values("label", wanted)
        if opener.backend == "elasticsearch":
            assert index.requests - before == 1
        assert got == {v: index.count({"label": [v]}) for v in wanted} == {"class0": 10, "class4": 10,
                                                                          "no-such-class": 0}


# ---------------------------------------------------------------------------
# Elasticsearch: versions, errors, aliases, bulk loads, timeouts


@pytest.fixture
def es_opener(request, tmp_path):
    op = Opener("es-knn-hnsw", tmp_path, request)
    yield op
    op.cleanup()


def test_client_compatibility_major_is_not_above_the_servers(es_url):
    """The client sends compatible-with=<its major> on every request; an 8.x server rejects 9 (noida-db does not)."""
    import elasticsearch

    from vslib.index.elasticsearch import check_compatibility

    client = elasticsearch.Elasticsearch(es_url, basic_auth=(os.environ["VS_ES_USERNAME"], os.environ.get(
        "VS_ES_PASSWORD", "")) if os.environ.get("VS_ES_USERNAME") else None, api_key=os.environ.get("VS_ES_API_KEY"),
        ca_certs=os.environ.get("VS_ES_CA_CERTS"))
    try:
        server = client.info()["version"]["number"]
    finally:
        client.close()
    client_major, server_major = int(elasticsearch.__versionstr__.split(".")[0]), int(server.split(".")[0])
    assert client_major <= server_major, (f"client {elasticsearch.__versionstr__} sends compatible-with={client_major}; "
                                          f"a {server_major}.x server rejects it: pin elasticsearch<{server_major + 1}")
    assert client_major >= server_major - 1
    check_compatibility(elasticsearch.__versionstr__, server, es_url)  # what connect() checks


def test_compatibility_rules():
    from vslib.index.elasticsearch import check_compatibility

    for client, server in [("8.19.3", "8.15.3"), ("8.19.3", "9.2.0"), ("9.1.0", "9.2.0")]:
        check_compatibility(client, server, "http://es:9200")
    with pytest.raises(IndexBackendError, match=r"compatible-with=9.*8\.x server at http://es:9200.*pip install "
                                                 r"'elasticsearch>=8.16,<9'"):
        check_compatibility("9.1.0", "8.17.0", "http://es:9200")
    with pytest.raises(IndexBackendError, match="needs 8.x or 9.x"):
        check_compatibility("8.19.3", "7.17.0", "http://es:9200")


def test_elasticsearch_server_errors_name_url_index_and_operation(es_opener):
    import elasticsearch

    ids, x, meta = dataset(n=20)
    with es_opener() as index:
        index.add(ids, x, meta)
        too_long = 2 * unit_vectors(1, seed=5)  # dot_product accepts unit vectors only: the server answers 400
        for call in (lambda: index.search(too_long, 3),
                     lambda: index.search_many(np.vstack([unit_vectors(2), too_long]), 3, [None, None, None])):
            with pytest.raises(IndexBackendError) as err:
                call()
            assert not isinstance(err.value, elasticsearch.ApiError)
            message = str(err.value)
            assert index.where in message and index.alias in message and "search" in message and "unit" in message
        assert "search 2 of the batch" in message


def test_elasticsearch_alias_per_dataset_and_backbone_and_mapping_checks(es_opener, tmp_path):
    tag = uuid.uuid4().hex[:8]
    template = f"vs-test-{tag}-{{dataset}}-{{backbone}}"
    cfg = es_opener.config(index_name=template)
    with es_opener(cfg=cfg) as index:
        assert index.alias == f"vs-test-{tag}-{cfg.dataset.name}-{cfg.backbone.name}".lower()
        assert index.index_name.startswith(index.alias + "-") and index.index_name != index.alias
        info = index.info()
        assert (info["alias"], info["index_name"], info["dim"]) == (index.alias, index.index_name, DIM)
        assert info["backbone"] == cfg.backbone.name and info["dataset"] == cfg.dataset.name
        assert info["index_options"]["type"] == "hnsw" and info["index_options"]["m"] == 16
        assert info["server_version"].split(".")[0] in ("8", "9")
    # the same alias opened with other settings: a clear error, never a silent mix
    other_backbone = parse_config({"index": {"backend": "elasticsearch", "elasticsearch": {
        **{k: getattr(cfg.index.elasticsearch, k) for k in ("hosts", "index_options")}, "index_name": index.alias}},
        "backbone": {"name": "efficientnet_lite2"}}, base_dir=tmp_path, env=os.environ)
    with pytest.raises(IndexMismatchError, match=rf"{cfg.backbone.name}.*efficientnet_lite2.*--rebuild"):
        open_index(other_backbone, create=False)
    cfg_cos = es_opener.config(index_name=template, similarity="cosine")
    with pytest.raises(IndexMismatchError, match="similarity 'dot_product'.*'cosine'"):
        open_index(cfg_cos, create=False)
    cfg_m = es_opener.config(index_name=template, index_options={"type": "hnsw", "m": 32, "ef_construction": 100})
    with pytest.raises(IndexMismatchError, match="m: stored 16, configured 32"):
        open_index(cfg_m, create=False)


def test_elasticsearch_bulk_session_turns_refresh_off_and_restores_it(es_opener):
    ids, x, meta = dataset(n=60)
    with es_opener() as index:
        assert index.refresh_interval() is None  # the server's default
        with index.bulk_session():
            assert index.refresh_interval() == "-1"
            index.add(ids[:30], x[:30], meta[:30])
        assert index.refresh_interval() is None and index.count() == 30  # one refresh at the end
        index._put_refresh_interval("7s")
        with pytest.raises(RuntimeError, match="boom"), index.bulk_session():
            index.add(ids[30:], x[30:], meta[30:])
            raise RuntimeError("boom")
        assert index.refresh_interval() == "7s" and index.count() == 60  # restored and refreshed on failure too


def _write_features(cfg, n=60, seed=0):
    from vslib.features import FeatureSet, features_path

    table = pd.DataFrame({"path": [f"/data/img{i}.png" for i in range(n)], "label": [f"c{i % 4}" for i in range(n)],
                          "split": ["query" if i % 5 == 0 else "index" for i in range(n)],
                          "content_hash": [f"h{i:03d}" for i in range(n)]})
    FeatureSet(unit_vectors(n, seed=seed), table, cfg.backbone.name).save(features_path(cfg))


def test_elasticsearch_rebuild_swaps_the_alias_and_deletes_the_old_index(es_opener):
    cfg = es_opener.config()
    _write_features(cfg)
    first = build(cfg, progress=False)
    with open_index(cfg, create=False) as index:
        client, old = index.client, index.index_name
        assert client.indices.get_settings(index=old)[old]["settings"]["index"].get("refresh_interval") is None
    _write_features(cfg, seed=1)  # new vectors: the rebuilt index must hold these
    second = build(cfg, rebuild=True, progress=False)
    assert second["count"] == first["count"] == 48 and second["index_name"] != first["index_name"]
    with open_index(cfg, create=False) as index:
        es_opener.opened.append((cfg, index))
        assert index.index_name == second["index_name"]
        assert not index.client.indices.exists(index=old)
        assert index.search(unit_vectors(60, seed=1)[1:2], 1)[0][0].metadata["path"] == "/data/img1.png"


def test_elasticsearch_rebuild_replaces_an_index_named_like_the_alias(es_opener):
    """Older versions created a plain index called `visualsearch`; a rebuild turns that name into an alias."""
    cfg = es_opener.config()
    name = cfg.index.elasticsearch.index_name
    _write_features(cfg)
    with open_index(cfg, dim=DIM) as index:  # make a plain index of that name through the client
        index.client.indices.delete(index=index.index_name)
        index.client.indices.create(index=name, mappings={"properties": {"vector": {
            "type": "dense_vector", "dims": DIM, "similarity": "dot_product", "index": True}}})
    info = build(cfg, rebuild=True, progress=False)
    assert info["alias"] == name and info["index_name"] != name and info["count"] == 48
    with open_index(cfg, create=False) as index:
        es_opener.opened.append((cfg, index))
        assert index.client.indices.get_alias(name=name).body.keys() == {info["index_name"]}


def test_elasticsearch_failed_rebuild_keeps_the_live_index(es_opener):
    cfg = es_opener.config()
    _write_features(cfg)
    live = build(cfg, progress=False)["index_name"]
    from vslib.index.elasticsearch import ElasticsearchIndex

    fresh = ElasticsearchIndex.create_fresh(cfg, DIM)
    new = fresh.index_name
    fresh.discard()
    with open_index(cfg, create=False) as index:
        es_opener.opened.append((cfg, index))
        assert index.index_name == live and index.count() == 48
        assert not index.client.indices.exists(index=new)


def test_elasticsearch_slow_search_says_so(request, tmp_path):
    op = Opener("es-exact", tmp_path, request)
    try:
        ids, x, meta = dataset(n=3000)
        with op() as index:
            index.add(ids, x, meta)
            index.search_timeout = 0.0005  # script_score over 3000 vectors takes longer than half a millisecond
            with pytest.raises(IndexTimeoutError, match=r"took longer than search_timeout=0.0005 s.*slow search"):
                index.search_many(unit_vectors(50), 10, [None] * 50)
            index.search_timeout = 30.0
            assert len(index.search(unit_vectors(1), 10)[0]) == 10  # the connection is still usable
    finally:
        op.cleanup()


@pytest.mark.skipif(not os.environ.get("VS_ES_URL"), reason="needs a real cluster with security (VS_ES_URL)")
def test_elasticsearch_403_names_the_missing_privilege(es_opener):
    """A read-only API key may search but not write; the error names the privilege (real clusters only)."""
    import elasticsearch

    with es_opener() as index:
        index.add(["a"], unit_vectors(1), [{"label": "x"}])
        try:
            key = index.client.security.create_api_key(name=f"vs-test-{uuid.uuid4().hex[:6]}", role_descriptors={
                "ro": {"cluster": ["monitor"], "indices": [{"names": [index.alias, index.index_name],
                                                            "privileges": ["read", "view_index_metadata"]}]}})
        except elasticsearch.ApiError as e:
            pytest.skip(f"security is not enabled on the cluster: {e}")
    cfg = es_opener.config()
    cfg.index.elasticsearch.api_key, cfg.index.elasticsearch.username = key["encoded"], None
    with open_index(cfg, create=False) as ro:
        assert ro.count() == 1
        with pytest.raises(IndexPermissionError, match="'write'"):
            ro.add(["b"], unit_vectors(1, seed=2), [{"label": "y"}])
