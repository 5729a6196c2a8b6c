"""Elasticsearch index: ``dense_vector`` field, top-level ``knn`` with a pre-filter, or exact ``script_score``.

One document per item: ``{"vector": [...], "label": ..., "path": ..., ...}``
with the item id as ``_id``. Metadata strings are mapped as ``keyword`` (so
``terms`` filters work on any field); the vector is left out of ``_source``
unless ``store_vectors_in_source`` is set.

Scores are converted back to inner products so they match the embedded
backend: Elasticsearch's knn score for ``dot_product`` and ``cosine`` is
``(1 + s) / 2``; the exact ``script_score`` adds 1 (scores must not be
negative) and that 1 is subtracted again.

The client is imported lazily; connection settings come from
``index.elasticsearch`` in application.yaml (and the ``VS_ES_*`` environment
variables). Secrets are passed to the client and never appear in messages.
"""
from __future__ import annotations

import logging
from typing import Optional
from urllib.parse import urlsplit, urlunsplit

from vslib.index.base import (Hit, IndexBackendError, IndexDimensionError, IndexNotFoundError,
                              IndexUnreachableError, VectorIndex, normalize_filter)

log = logging.getLogger(__name__)

VECTOR_FIELD = "vector"
#: metadata fields mapped up front; any other string field becomes a keyword by the dynamic template
KEYWORD_FIELDS = ("label", "predicted_label", "path", "split", "content_hash")
#: bulk chunks answered with these statuses are retried with exponential backoff
RETRY_STATUS = (429, 502, 503, 504)


def _es():
    try:
        import elasticsearch
        import elasticsearch.helpers  # noqa: F401
    except ImportError:
        raise IndexBackendError("the Elasticsearch backend needs the official client: "
                                "pip install 'elasticsearch>=8.12,<10'") from None
    return elasticsearch


def redact(url: str) -> str:
    """``https://user:secret@host:9200`` -> ``https://host:9200`` (for messages and logs)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparseable URL>"
    if parts.username or parts.password:
        host = parts.hostname or ""
        if parts.port:
            host = f"{host}:{parts.port}"
        return urlunsplit((parts.scheme, host, parts.path, parts.query, parts.fragment))
    return url


def connect(es_cfg):
    """An ``Elasticsearch`` client for ``cfg.index.elasticsearch``, checked to answer.

    Raises :class:`IndexUnreachableError` naming the URL(s) within about
    ``request_timeout`` seconds when no node answers.
    """
    es = _es()
    hosts = list(es_cfg.hosts)
    if not hosts:
        raise IndexBackendError("index.elasticsearch.hosts is empty; give one or more node URLs "
                                "(or set VS_ES_URL)")
    where = ", ".join(redact(h) for h in hosts)
    kwargs = dict(request_timeout=es_cfg.request_timeout, max_retries=2, retry_on_timeout=True,
                  verify_certs=es_cfg.verify_certs)
    if es_cfg.ca_certs:
        kwargs["ca_certs"] = es_cfg.ca_certs
    if es_cfg.api_key:
        kwargs["api_key"] = es_cfg.api_key
    elif es_cfg.username:
        kwargs["basic_auth"] = (es_cfg.username, es_cfg.password or "")
    if not es_cfg.verify_certs:
        import warnings

        warnings.filterwarnings("ignore", message=".*verify_certs=False.*")
    try:
        client = es.Elasticsearch(hosts, **kwargs)
    except (ValueError, TypeError) as e:
        raise IndexBackendError(f"index.elasticsearch.hosts {where}: {_clean(e, es_cfg)}") from None
    try:
        client.options(request_timeout=es_cfg.request_timeout, max_retries=0).info()
    except es.AuthenticationException:
        client.close()
        raise IndexBackendError(f"Elasticsearch at {where} rejected the credentials (401); check "
                                "index.elasticsearch.api_key / username / password or VS_ES_API_KEY / "
                                "VS_ES_USERNAME / VS_ES_PASSWORD") from None
    except es.AuthorizationException:
        client.close()
        raise IndexBackendError(f"Elasticsearch at {where}: these credentials may not read the cluster "
                                "info (403); grant the monitor privilege or use another API key") from None
    except (es.ConnectionError, es.ConnectionTimeout, es.TransportError) as e:
        client.close()
        raise IndexUnreachableError(
            f"cannot reach Elasticsearch at {where} (waited up to {es_cfg.request_timeout:g} s): "
            f"{_clean(e, es_cfg)}. Is it running? Set index.elasticsearch.hosts or VS_ES_URL, or use "
            "--backend embedded") from None
    return client


def _clean(error, es_cfg) -> str:
    """An exception's text with any configured secret blanked out."""
    text = str(getattr(error, "message", "") or error)  # elastic_transport keeps the cause in .message
    for secret in (es_cfg.api_key, es_cfg.password):
        if secret:
            text = text.replace(secret, "***")
    return text[:500]


class ElasticsearchIndex(VectorIndex):
    """Vectors in one Elasticsearch index, searched by knn (approximate) or script_score (exact)."""

    name = "elasticsearch"
    max_k = 10_000  # Elasticsearch limit: knn num_candidates and index.max_result_window

    def __init__(self, client, index_name: str, dim: int, *, es_cfg, where: str):
        super().__init__(dim)
        self.client = client
        self.index_name = index_name
        self.similarity = es_cfg.similarity
        self.index_options = dict(es_cfg.index_options)
        self.num_candidates = es_cfg.num_candidates
        self.exact_mode = es_cfg.exact
        self.chunk_size = es_cfg.chunk_size
        self.store_vectors = es_cfg.store_vectors_in_source
        self.where = where
        #: bulk retry settings (seconds); tests lower them
        self.max_retries = 3
        self.initial_backoff = 1.0

    # -- opening ----------------------------------------------------------------
    @classmethod
    def open(cls, es_cfg, dim: Optional[int] = None, *, create: bool = True,
             index_name: Optional[str] = None) -> "ElasticsearchIndex":
        """Connect and open ``index_name`` (default ``es_cfg.index_name``), creating it when allowed.

        Raises :class:`IndexUnreachableError`, :class:`IndexNotFoundError` (missing and
        ``create=False``) or :class:`IndexDimensionError` (its ``dims`` differ from ``dim``).
        """
        es = _es()
        name = index_name or es_cfg.index_name
        where = ", ".join(redact(h) for h in es_cfg.hosts)
        client = connect(es_cfg)
        try:
            try:
                mapping = client.indices.get_mapping(index=name).body
            except es.NotFoundError:
                mapping = None
            if mapping is None:
                if not create:
                    raise IndexNotFoundError(f"Elasticsearch index {name!r} does not exist at {where}; build it "
                                             "with `visualsearch index --backend elasticsearch`")
                if dim is None:
                    raise IndexBackendError(f"cannot create Elasticsearch index {name!r} without knowing the "
                                            "vector dimension (pass dim=...)")
                self = cls(client, name, dim, es_cfg=es_cfg, where=where)
                self._create()
                return self
            props = next(iter(mapping.values()))["mappings"].get("properties", {})
            field = props.get(VECTOR_FIELD, {})
            if field.get("type") != "dense_vector" or "dims" not in field:
                raise IndexBackendError(f"Elasticsearch index {name!r} at {where} has no dense_vector field "
                                        f"{VECTOR_FIELD!r} with dims; it is not a VisualSearch index (choose "
                                        "another index.elasticsearch.index_name)")
            have = int(field["dims"])
            if dim is not None and have != dim:
                raise IndexDimensionError(
                    f"Elasticsearch index {name!r} at {where} holds {have}-dimensional vectors but the backbone "
                    f"gives {dim}-dimensional ones; delete the index (DELETE /{name}) or set another "
                    "index.elasticsearch.index_name")
            self = cls(client, name, have, es_cfg=es_cfg, where=where)
            if field.get("similarity") and field["similarity"] != self.similarity:
                log.warning("Elasticsearch index %r uses similarity %r, not the configured %r; using %r",
                            name, field["similarity"], self.similarity, field["similarity"])
                self.similarity = field["similarity"]
            return self
        except BaseException:
            client.close()
            raise

    @classmethod
    def from_config(cls, cfg, dim: Optional[int] = None, *, create: bool = True) -> "ElasticsearchIndex":
        return cls.open(cfg.index.elasticsearch, dim, create=create)

    def _create(self) -> None:
        es = _es()
        mappings = {
            "dynamic_templates": [
                {"strings_as_keywords": {"match_mapping_type": "string", "mapping": {"type": "keyword"}}}],
            "properties": {
                VECTOR_FIELD: {"type": "dense_vector", "dims": self.dim, "index": True,
                               "similarity": self.similarity, "index_options": self.index_options},
                **{f: {"type": "keyword"} for f in KEYWORD_FIELDS},
            },
        }
        if not self.store_vectors:
            mappings["_source"] = {"excludes": [VECTOR_FIELD]}
        try:
            self.client.indices.create(index=self.index_name, mappings=mappings)
        except es.BadRequestError as e:
            if getattr(e, "error", "") == "resource_already_exists_exception":  # created concurrently
                return
            raise IndexBackendError(f"Elasticsearch refused to create index {self.index_name!r} at "
                                    f"{self.where}: {e}") from None
        log.info("created Elasticsearch index %r (%d dims, %s, %s)", self.index_name, self.dim,
                 self.similarity, self.index_options.get("type"))

    # -- the contract -------------------------------------------------------------
    @property
    def exact(self) -> bool:
        return bool(self.exact_mode) or self.index_options.get("type") == "flat"

    def _add(self, ids, vectors, metadata):
        def actions():
            for ident, vec, meta in zip(ids, vectors, metadata):
                yield {"_op_type": "index", "_index": self.index_name, "_id": ident,
                       "_source": {**meta, VECTOR_FIELD: vec.tolist()}}

        # bulk would silently auto-create a missing index with a dynamic mapping (no dense_vector)
        if not self._call(self.client.indices.exists, index=self.index_name):
            raise IndexNotFoundError(f"Elasticsearch index {self.index_name!r} does not exist at {self.where} "
                                     "(deleted meanwhile?); open it again with create=True or run `visualsearch index`")
        failures = [_failure(item) for ok, item in self._bulk(actions()) if not ok]
        self._refresh()
        return len(ids) - len(failures), failures

    def remove(self, ids) -> int:
        self._check_open()
        ids = [ids] if isinstance(ids, str) else [str(i) for i in ids]
        if not ids:
            return 0
        removed, failures = 0, []
        actions = ({"_op_type": "delete", "_index": self.index_name, "_id": i} for i in ids)
        for ok, item in self._bulk(actions):
            result = item.get("delete", {})
            if ok and result.get("result") == "deleted":
                removed += 1
            elif result.get("status") != 404:  # 404: the id was not there, which is fine
                failures.append(_failure(item))
        self._refresh()
        if failures:
            raise IndexBackendError(f"{len(failures)} id(s) could not be removed from {self.index_name!r}: "
                                    + "; ".join(f"{i!r}: {r}" for i, r in failures[:5]))
        return removed

    def count(self, filter=None) -> int:
        self._check_open()
        query = _query(normalize_filter(filter))
        return int(self._call(self.client.count, index=self.index_name, query=query)["count"])

    def _search(self, queries, k, filt):
        fq = _query(filt)
        out = []
        for q in queries:
            qv = q.tolist()
            if self.exact_mode:
                fn = "dotProduct" if self.similarity == "dot_product" else "cosineSimilarity"
                body = dict(query={"script_score": {
                    "query": fq, "script": {"source": f"{fn}(params.qv, '{VECTOR_FIELD}') + 1.0",
                                            "params": {"qv": qv}}}})
            else:
                knn = {"field": VECTOR_FIELD, "query_vector": qv, "k": k,
                       "num_candidates": min(max(self.num_candidates, k), self.max_k)}
                if filt is not None:
                    knn["filter"] = fq
                body = dict(knn=knn)
            resp = self._call(self.client.search, index=self.index_name, size=k, source_excludes=[VECTOR_FIELD],
                              **body)
            out.append([Hit(h["_id"], self._score(h["_score"]), dict(h.get("_source") or {}))
                        for h in resp["hits"]["hits"]])
        return out

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.client.close()

    def drop(self) -> None:
        if not self.closed:
            try:
                self._call(self.client.options(ignore_status=404).indices.delete, index=self.index_name)
            finally:
                self.close()

    def info(self) -> dict:
        return {**super().info(), "index_name": self.index_name, "hosts": self.where,
                "similarity": self.similarity, "index_options": self.index_options,
                "search": "script_score" if self.exact_mode else "knn"}

    # -- internals -------------------------------------------------------------------
    def _score(self, s: float) -> float:
        # knn: (1 + sim) / 2 for dot_product and cosine; script_score: sim + 1
        return float(s) - 1.0 if self.exact_mode else 2.0 * float(s) - 1.0

    def _bulk(self, actions):
        """``streaming_bulk`` with our retry settings: ``(ok, item)`` for every action (failures included)."""
        es = _es()
        from elasticsearch.helpers import streaming_bulk

        try:
            yield from streaming_bulk(self.client, actions, chunk_size=self.chunk_size, max_retries=self.max_retries,
                                      initial_backoff=self.initial_backoff, max_backoff=30,
                                      retry_on_status=RETRY_STATUS, raise_on_error=False, raise_on_exception=False)
        except es.TransportError as e:  # the cluster went away between chunks
            raise IndexUnreachableError(f"bulk request to {self.index_name!r} at {self.where} failed: {e}") from None

    def _refresh(self) -> None:
        self._call(self.client.indices.refresh, index=self.index_name)

    def _call(self, fn, **kwargs):
        es = _es()
        try:
            return fn(**kwargs)
        except es.NotFoundError:
            raise IndexNotFoundError(f"Elasticsearch index {self.index_name!r} does not exist at {self.where} "
                                     "(deleted meanwhile?); build it with `visualsearch index`") from None
        except (es.ConnectionError, es.ConnectionTimeout) as e:
            raise IndexUnreachableError(f"cannot reach Elasticsearch at {self.where}: {e}") from None


def _query(filt) -> dict:
    """A normalised filter as an Elasticsearch query (``terms`` per field, all must match)."""
    if not filt:
        return {"match_all": {}}
    return {"bool": {"filter": [{"terms": {field: values}} for field, values in filt.items()]}}


def _failure(item: dict) -> tuple[str, str]:
    """(id, reason) of one failed bulk item."""
    op = next(iter(item.values())) if item else {}
    error = op.get("error")
    if isinstance(error, dict):
        reason = f"{error.get('type', 'error')}: {error.get('reason', '')}"
        cause = error.get("caused_by")
        if isinstance(cause, dict) and cause.get("reason"):
            reason += f" ({cause['reason']})"
    else:
        reason = str(error or op.get("exception") or f"status {op.get('status')}")
    return str(op.get("_id")), f"[{op.get('status')}] {reason}"


__all__ = ["ElasticsearchIndex", "connect", "redact"]
