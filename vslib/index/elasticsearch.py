"""Elasticsearch index: ``dense_vector`` field, top-level ``knn`` with a pre-filter, or exact ``script_score``.

One document per item: ``{"vector": [...], "label": ..., "path": ..., ...}``
with the item id as ``_id``. Metadata strings are mapped as ``keyword`` (so
``terms`` filters work on any field); the vector is left out of ``_source``
unless ``store_vectors_in_source`` is set.

Names: ``index.elasticsearch.index_name`` is a template (default
``visualsearch-{dataset}-{backbone}``) giving an **alias**; the documents live
in a concrete index ``<alias>-<yyyymmdd-hhmmss>-<random>`` behind it. A
rebuild (:meth:`ElasticsearchIndex.create_fresh` + :meth:`~ElasticsearchIndex.publish`)
fills a new concrete index while searches keep using the old one, then moves
the alias in one ``_aliases`` request and deletes the old index. The mapping's
``_meta`` records the backbone and dataset; opening an index checks them, the
``dims``, the ``similarity`` and the ``index_options`` against the config.

Crash safety: a load (:meth:`~ElasticsearchIndex.bulk_session`) records the
``refresh_interval`` it replaces in ``_meta`` (:data:`BULK_META`) before turning
periodic refresh off, so a load or server killed mid-way never makes -1 the
remembered value; a -1 found with no record becomes the server's default. An
unpublished index carries its rebuild's signs of life (:data:`BUILD_META`: host,
PID, time, renewed every :data:`HEARTBEAT_S` s); one whose rebuild is over (its
PID dead on this machine, or silent for :data:`ORPHAN_AFTER_S` s) is an orphan,
deleted by the next rebuild or load. Only ``<alias>-<yyyymmdd-hhmmss>-<hex6>``
indexes created by VisualSearch and behind no alias qualify. :func:`audit`
reports both states to ``visualsearch check``.

Scores are converted back to inner products so they match the embedded
backend: Elasticsearch's knn score for ``dot_product`` and ``cosine`` is
``(1 + s) / 2``; the exact ``script_score`` adds 1 (scores must not be
negative) and that 1 is subtracted again. With a quantized ``index_options``
type (``int8_``/``int4_``/``bbq_``) the knn score is computed on the quantized
vectors and is itself approximate unless ``rescore_oversample`` is set.

Every failure of the server becomes an :class:`~vslib.errors.IndexBackendError`
naming the URL, the index, the operation and what to do (for a 403, the
privilege to grant; see :data:`PRIVILEGES`). Secrets never appear in messages.

The client is imported lazily; settings come from ``index.elasticsearch`` in
application.yaml (and the ``VS_ES_*`` environment variables).
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import re
import socket
import threading
import time
import uuid
from typing import Optional

from vslib.errors import VisualSearchError
from vslib.integrity import Finding
from vslib.redact import strip_userinfo
from vslib.index.base import (Hit, IndexBackendError, IndexDimensionError, IndexMismatchError, IndexNotFoundError,
                              IndexPermissionError, IndexTimeoutError, IndexUnreachableError, VectorIndex,
                              normalize_filter)

log = logging.getLogger(__name__)

VECTOR_FIELD = "vector"
#: metadata fields mapped up front; any other string field becomes a keyword by the dynamic template
KEYWORD_FIELDS = ("label", "predicted_label", "path", "split", "content_hash")
#: bulk chunks answered with these statuses are retried with exponential backoff
RETRY_STATUS = (429, 502, 503, 504)
#: the client range this module is written for: its 8.x line sends ``compatible-with=8``, which
#: 8.x and 9.x servers accept; ``retry_on_status`` of ``streaming_bulk`` exists from 8.16
CLIENT_REQUIREMENT = "elasticsearch>=8.16,<9"
#: index_options types whose knn scores are computed on quantized vectors
QUANTIZED = ("int8_hnsw", "int4_hnsw", "bbq_hnsw", "int8_flat", "int4_flat", "bbq_flat")

#: operation -> the privilege a 403 on it lacks (Elasticsearch security privilege names)
PRIVILEGES = {
    "connect": "the cluster privilege 'monitor' (GET /)",
    "read the mapping": "the index privilege 'view_index_metadata'",
    "read the settings": "the index privilege 'view_index_metadata'",
    "read the alias": "the index privilege 'view_index_metadata'",
    "create the index": "the index privilege 'create_index' (or 'manage')",
    "change the settings": "the index privilege 'manage'",
    "move the alias": "the index privilege 'manage' on the old and new indexes and on the alias",
    "bulk write": "the index privilege 'write'",
    "refresh": "the index privilege 'maintenance' (or 'manage')",
    "search": "the index privilege 'read'",
    "count": "the index privilege 'read'",
    "delete the index": "the index privilege 'delete_index' (or 'manage')",
}


def _es():
    try:
        import elasticsearch
        import elasticsearch.helpers  # noqa: F401
    except ImportError:
        raise IndexBackendError("the Elasticsearch backend needs the official client: "
                                f"pip install '{CLIENT_REQUIREMENT}'") from None
    return elasticsearch


def redact(url: str) -> str:
    """``https://user:secret@host:9200`` -> ``https://host:9200`` (for messages and logs; never raises)."""
    return strip_userinfo(url)


def _major(version: str) -> int:
    try:
        return int(str(version).split(".")[0])
    except ValueError:
        return 0


def client_version() -> str:
    """The installed client's version; its major is the ``compatible-with`` it sends on every request."""
    return _es().__versionstr__


def check_compatibility(client: str, server: str, where: str) -> None:
    """Raise :class:`IndexBackendError` unless a ``client`` version can talk to a ``server`` version.

    A client sends ``compatible-with=<its major>``; a server accepts its own major
    and the one before (a 9.x server takes 8.x clients, an 8.x server rejects 9.x
    clients with ``400 media_type_header_exception``).
    """
    c, s = _major(client), _major(server)
    if s < 8:
        raise IndexBackendError(f"Elasticsearch at {where} is version {server}; VisualSearch needs 8.x or 9.x "
                                "(dense_vector knn search). Upgrade the cluster or use --backend embedded")
    if c > s:
        raise IndexBackendError(
            f"the Elasticsearch client {client} sends 'compatible-with={c}', which the {s}.x server at {where} "
            f"(version {server}) rejects; install the {s}.x client: pip install '{CLIENT_REQUIREMENT}'")
    if c < s - 1:
        raise IndexBackendError(f"the Elasticsearch client {client} is too old for the server at {where} "
                                f"(version {server}); pip install '{CLIENT_REQUIREMENT}'")


def _reason(e) -> str:
    """``type: reason (cause)`` of an ``ApiError`` body, else its text."""
    body = getattr(e, "body", None)
    err = body.get("error") if isinstance(body, dict) else None
    if isinstance(err, dict):
        text = f"{err.get('type', 'error')}: {err.get('reason', '')}"
        cause = err.get("caused_by")
        while isinstance(cause, dict):
            if cause.get("reason"):
                text += f" ({cause['reason']})"
            cause = cause.get("caused_by")
        return text
    if isinstance(err, str):
        return err
    return str(getattr(e, "message", "") or e)


def _clean(text: str, es_cfg) -> str:
    """``text`` with any configured secret blanked out, cut to a readable length."""
    for secret in (es_cfg.api_key, es_cfg.password):
        if secret:
            text = text.replace(secret, "***")
    return text[:500]


def translate(e, *, op: str, where: str, index: Optional[str], es_cfg, timeout: Optional[tuple[str, float]] = None):
    """The project error for a client exception ``e`` raised by ``op`` (a phrase from :data:`PRIVILEGES`).

    ``timeout`` is ``(setting name, seconds)`` of the timeout the request ran under.
    """
    es = _es()
    on = f" on index {index!r}" if index else ""
    head = f"Elasticsearch at {where}: {op}{on}"
    status = getattr(e, "status_code", None) or getattr(getattr(e, "meta", None), "status", None)
    reason = _clean(_reason(e), es_cfg)
    if isinstance(e, es.ConnectionTimeout):
        name, seconds = timeout or ("request_timeout", es_cfg.request_timeout)
        if op in ("search", "count"):
            return IndexTimeoutError(
                f"{head}: the search took longer than {name}={seconds:g} s (a slow search, not a dead server); "
                f"raise index.elasticsearch.{name}, lower num_candidates or use knn instead of exact script_score")
        return IndexTimeoutError(f"{head}: no answer within {name}={seconds:g} s; the cluster may be overloaded; "
                                 f"raise index.elasticsearch.{name} or check the cluster's health")
    if isinstance(e, es.ConnectionError):
        return IndexUnreachableError(f"cannot reach Elasticsearch at {where} ({op}{on}): {reason}. Is it running? "
                                     "Set index.elasticsearch.hosts or VS_ES_URL, or use --backend embedded")
    if status == 401:
        return IndexPermissionError(f"{head}: the credentials were rejected (401); check index.elasticsearch."
                                    "api_key / username / password or VS_ES_API_KEY / VS_ES_USERNAME / VS_ES_PASSWORD")
    if status == 403:
        need = PRIVILEGES.get(op, "the privilege this operation needs")
        return IndexPermissionError(f"{head}: these credentials may not {op} (403); grant {need} on the index "
                                    f"pattern (see the README's Elasticsearch privileges). Server said: {reason}")
    if status == 404 and getattr(e, "error", "") == "index_not_found_exception":
        return IndexNotFoundError(f"Elasticsearch index {index!r} does not exist at {where} (deleted meanwhile?); "
                                  "build it with `visualsearch index`")
    if status == 400 and getattr(e, "error", "") == "media_type_header_exception":
        return IndexBackendError(f"{head}: the server rejected the client's compatibility header (400 {reason}); "
                                 f"the client {client_version()} is newer than the server: pip install "
                                 f"'{CLIENT_REQUIREMENT}'")
    if status == 429:
        return IndexBackendError(f"{head}: the cluster is overloaded (429 {reason}) even after retries; retry later, "
                                 "or lower index.elasticsearch.chunk_size / msearch_batch")
    if isinstance(status, int) and status >= 500:
        return IndexBackendError(f"{head}: server error {status} ({reason}); check the cluster's health "
                                 "(GET _cluster/health) and any proxy in front of it, then retry")
    if isinstance(status, int):
        return IndexBackendError(f"{head}: the server refused it ({status} {reason})")
    return IndexBackendError(f"{head}: {reason}")


def connect(es_cfg):
    """An ``Elasticsearch`` client for ``cfg.index.elasticsearch``, checked to answer and to be compatible.

    Raises :class:`IndexUnreachableError` naming the URL(s) within about
    ``request_timeout`` seconds when no node answers; any other failure is an
    :class:`IndexBackendError`. The client is closed whenever this raises.
    """
    es = _es()
    hosts = list(es_cfg.hosts)
    if not hosts:
        raise IndexBackendError("index.elasticsearch.hosts is empty; give one or more node URLs "
                                "(or set VS_ES_URL)")
    where = ", ".join(redact(h) for h in hosts)
    # no retry on timeout: a slow search must not be sent three times and then called unreachable
    kwargs = dict(request_timeout=es_cfg.request_timeout, max_retries=2, retry_on_timeout=False,
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
        raise IndexBackendError(f"index.elasticsearch.hosts {where}: {_clean(str(e), es_cfg)}") from None
    try:
        info = client.options(request_timeout=es_cfg.request_timeout, max_retries=0).info()
        check_compatibility(client_version(), info["version"]["number"], where)
    except IndexBackendError:
        client.close()
        raise
    except (es.ApiError, es.TransportError) as e:
        client.close()
        error = translate(e, op="connect", where=where, index=None, es_cfg=es_cfg)
        if isinstance(error, IndexTimeoutError):  # no answer at all while connecting: unreachable
            error = IndexUnreachableError(f"cannot reach Elasticsearch at {where} (waited up to "
                                          f"{es_cfg.request_timeout:g} s). Is it running? Set index.elasticsearch."
                                          "hosts or VS_ES_URL, or use --backend embedded")
        raise error from None
    except BaseException:
        client.close()
        raise
    client.server_version = info["version"]["number"]  # noqa: B010 - remembered for info()
    return client


def elasticsearch_status(cfg, timeout: float = 2.0) -> tuple[bool, str]:
    """``(answers, message)``: whether the configured Elasticsearch cluster answers within ``timeout`` s."""
    es_cfg = dataclasses.replace(cfg.index.elasticsearch,
                                 request_timeout=min(timeout, cfg.index.elasticsearch.request_timeout))
    where = ", ".join(redact(h) for h in es_cfg.hosts)
    try:
        client = connect(es_cfg)
    except VisualSearchError as e:
        return False, str(e)
    client.close()
    return True, f"Elasticsearch at {where} answers"


def alias_name(template: str, dataset: Optional[str] = None, backbone: Optional[str] = None) -> str:
    """The alias for ``index_name`` (``visualsearch-{dataset}-{backbone}``), lower-cased as Elasticsearch requires."""
    return template.format(dataset=dataset or "default", backbone=backbone or "default").lower()


#: key of the index ``_meta`` where :meth:`ElasticsearchIndex.bulk_session` records the refresh setting it replaced
BULK_META = "visualsearch_bulk"
#: key of an unpublished index's ``_meta`` where its rebuild leaves signs of life (host, PID, time)
BUILD_META = "visualsearch_build"
#: seconds between a rebuild's signs of life ...
HEARTBEAT_S = 60.0
#: ... and how long one unheard of is presumed running when its PID cannot be checked (another machine)
ORPHAN_AFTER_S = 600.0


def _machine() -> str:
    """This machine: host name and boot id (a PID means something only on the machine and boot it came from)."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except OSError:
        boot = ""
    return f"{socket.gethostname()}/{boot}"


def _build_record() -> dict:
    return {"host": socket.gethostname(), "machine": _machine(), "pid": os.getpid(), "alive_at": round(time.time(), 3)}


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    except OSError:
        return False
    return True


def _rebuild_running(record, now: float, orphan_after: float) -> Optional[str]:
    """Why the rebuild that made an unpublished index may still be running; None when it is not (an orphan).

    On this machine a dead PID settles it at once; otherwise a sign of life within
    ``orphan_after`` seconds means running. Indexes of older versions carry no record.
    """
    if not isinstance(record, dict):
        return None
    try:
        age = now - float(record.get("alive_at"))
    except (TypeError, ValueError):
        return None
    pid = record.get("pid")
    if record.get("machine") == _machine() and isinstance(pid, int) and not _pid_alive(pid):
        return None
    if age < orphan_after:
        return f"a rebuild (PID {pid} on {record.get('host')}) gave a sign of life {max(age, 0):.0f} s ago"
    return None


def _concrete_name(alias: str) -> str:
    return f"{alias}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"


class ElasticsearchIndex(VectorIndex):
    """Vectors in one Elasticsearch index behind an alias, searched by knn (approximate) or script_score (exact)."""

    name = "elasticsearch"
    max_k = 10_000  # Elasticsearch limit: knn num_candidates and index.max_result_window

    def __init__(self, client, index_name: str, dim: int, *, es_cfg, where: str, alias: Optional[str] = None,
                 backbone: Optional[str] = None, dataset: Optional[str] = None):
        super().__init__(dim)
        self.client = client
        self.index_name = index_name  #: the concrete index
        self.alias = alias or index_name  #: the name searches use
        self.es_cfg = es_cfg
        self.backbone, self.dataset = backbone, dataset
        self.similarity = es_cfg.similarity
        self.index_options = dict(es_cfg.index_options)
        self.num_candidates = es_cfg.num_candidates
        self.rescore_oversample = es_cfg.rescore_oversample
        self.exact_mode = es_cfg.exact
        self.chunk_size = es_cfg.chunk_size
        self.msearch_batch = es_cfg.msearch_batch
        self.store_vectors = es_cfg.store_vectors_in_source
        self.request_timeout = es_cfg.request_timeout
        self.search_timeout = es_cfg.search_timeout
        self.bulk_timeout = es_cfg.bulk_timeout
        self.where = where
        #: HTTP requests sent through this object (searches, counts, bulk chunks, administration)
        self.requests = 0
        #: bulk retry settings (seconds); tests lower them
        self.max_retries = 3
        self.initial_backoff = 1.0
        self._in_bulk = False
        self._fresh = False
        #: an unpublished index whose rebuild gave no sign of life for this long is an orphan; tests lower it
        self.orphan_after = ORPHAN_AFTER_S
        self._meta_lock = threading.Lock()
        self._heartbeat = None

    # -- opening ----------------------------------------------------------------
    @classmethod
    def open(cls, es_cfg, dim: Optional[int] = None, *, create: bool = True, index_name: Optional[str] = None,
             backbone: Optional[str] = None, dataset: Optional[str] = None) -> "ElasticsearchIndex":
        """Connect and open the alias ``index_name`` (default: ``es_cfg.index_name`` filled in), creating it when allowed.

        Raises :class:`IndexUnreachableError`, :class:`IndexNotFoundError` (missing and
        ``create=False``), :class:`IndexDimensionError` (its ``dims`` differ from ``dim``)
        or :class:`IndexMismatchError` (similarity, index options or backbone differ).
        """
        alias = index_name or alias_name(es_cfg.index_name, dataset, backbone)
        where = ", ".join(redact(h) for h in es_cfg.hosts)
        client = connect(es_cfg)
        try:
            self = cls(client, alias, dim or 1, es_cfg=es_cfg, where=where, alias=alias, backbone=backbone,
                       dataset=dataset)
            try:
                mapping = self._call("read the mapping", client.indices.get_mapping, index=alias).body
            except IndexNotFoundError:
                mapping = None
            if mapping is None:
                if not create:
                    raise IndexNotFoundError(f"Elasticsearch index {alias!r} does not exist at {where}; build it "
                                             "with `visualsearch index --backend elasticsearch`")
                if dim is None:
                    raise IndexBackendError(f"cannot create Elasticsearch index {alias!r} without knowing the "
                                            "vector dimension (pass dim=...)")
                self._create(_concrete_name(alias), with_alias=True)
                return self
            if len(mapping) != 1:
                raise IndexBackendError(f"Elasticsearch alias {alias!r} at {where} points to {len(mapping)} indexes "
                                        f"({', '.join(sorted(mapping))}); point it at one (POST _aliases) or rebuild "
                                        "with `visualsearch index --rebuild`")
            (self.index_name, body), = mapping.items()
            self._adopt(body.get("mappings", {}), dim)
            return self
        except BaseException:
            client.close()
            raise

    @classmethod
    def from_config(cls, cfg, dim: Optional[int] = None, *, create: bool = True) -> "ElasticsearchIndex":
        return cls.open(cfg.index.elasticsearch, dim, create=create, backbone=cfg.backbone_tag,
                        dataset=cfg.dataset.name)

    @classmethod
    def create_fresh(cls, cfg, dim: int) -> "ElasticsearchIndex":
        """A new concrete index beside the live one; :meth:`publish` moves the alias to it."""
        es_cfg = cfg.index.elasticsearch
        alias = alias_name(es_cfg.index_name, cfg.dataset.name, cfg.backbone_tag)
        client = connect(es_cfg)
        try:
            self = cls(client, alias, dim, es_cfg=es_cfg, where=", ".join(redact(h) for h in es_cfg.hosts),
                       alias=alias, backbone=cfg.backbone_tag, dataset=cfg.dataset.name)
            self._create(_concrete_name(alias), with_alias=False)
            self._fresh = True
            self._start_heartbeat()  # so that another rebuild of the alias never takes this one for an orphan
            self._sweep()  # what rebuilds killed before publishing left
            return self
        except BaseException:
            client.close()
            raise

    def _adopt(self, mappings: dict, dim: Optional[int]) -> None:
        """Check a stored mapping against the config and take its dims, similarity and index options."""
        name, where = self.alias, self.where
        field = mappings.get("properties", {}).get(VECTOR_FIELD, {})
        if field.get("type") != "dense_vector" or "dims" not in field:
            raise IndexBackendError(f"Elasticsearch index {name!r} at {where} has no dense_vector field "
                                    f"{VECTOR_FIELD!r} with dims; it is not a VisualSearch index (choose "
                                    "another index.elasticsearch.index_name)")
        have = int(field["dims"])
        rebuild = "rebuild it with `visualsearch index --rebuild` or set another index.elasticsearch.index_name"
        if dim is not None and have != dim:
            raise IndexDimensionError(f"Elasticsearch index {name!r} at {where} holds {have}-dimensional vectors but "
                                      f"the backbone gives {dim}-dimensional ones; {rebuild}")
        self.dim = have
        stored_sim = field.get("similarity")
        if stored_sim and stored_sim != self.similarity:
            raise IndexMismatchError(f"Elasticsearch index {name!r} at {where} uses similarity {stored_sim!r}, the "
                                     f"config index.elasticsearch.similarity {self.similarity!r}; {rebuild}")
        stored_opts = field.get("index_options")
        if stored_opts:
            differ = {k: (stored_opts.get(k), v) for k, v in self.index_options.items() if stored_opts.get(k) != v}
            if differ:
                shown = ", ".join(f"{k}: stored {a!r}, configured {b!r}" for k, (a, b) in differ.items())
                raise IndexMismatchError(f"Elasticsearch index {name!r} at {where} was built with other "
                                         f"index_options ({shown}); {rebuild}")
            self.index_options = dict(stored_opts)
        meta = mappings.get("_meta") or {}
        for key, want in (("backbone", self.backbone), ("dataset", self.dataset)):
            have_v = meta.get(key)
            if want and have_v and have_v != want:
                raise IndexMismatchError(f"Elasticsearch index {name!r} at {where} holds {have_v!r} vectors ({key}), "
                                         f"the config asks for {want!r}; {rebuild}")
            if want and not have_v:
                log.warning("Elasticsearch index %r records no %s; it cannot be checked against %r", name, key, want)

    def _create(self, concrete: str, *, with_alias: bool) -> None:
        es = _es()
        mappings = {
            "_meta": {"created_by": "visualsearch",
                      **{k: v for k, v in (("backbone", self.backbone), ("dataset", self.dataset)) if v},
                      **({} if with_alias else {BUILD_META: _build_record()})},
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
        kwargs = {"aliases": {self.alias: {}}} if with_alias else {}
        self.index_name = concrete
        try:
            self._call("create the index", self.client.indices.create, index=concrete, mappings=mappings, **kwargs)
        except IndexBackendError:
            if with_alias:  # another process created it at the same moment: use theirs
                try:
                    mapping = self.client.indices.get_mapping(index=self.alias).body
                except es.ApiError:
                    mapping = None
                if mapping and len(mapping) == 1:
                    (self.index_name, body), = mapping.items()
                    self._adopt(body.get("mappings", {}), self.dim)
                    return
            raise
        log.info("created Elasticsearch index %r (alias %r; %d dims, %s, %s)", concrete, self.alias, self.dim,
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
        if not self._in_bulk and not self._call("read the mapping", self.client.indices.exists, index=self.index_name):
            raise IndexNotFoundError(f"Elasticsearch index {self.index_name!r} does not exist at {self.where} "
                                     "(deleted meanwhile?); open it again with create=True or run `visualsearch index`")
        failures = [_failure(item) for ok, item in self._bulk(actions()) if not ok]
        if not self._in_bulk:
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
        if not self._in_bulk:
            self._refresh()
        if failures:
            raise IndexBackendError(f"{len(failures)} id(s) could not be removed from {self.index_name!r}: "
                                    + "; ".join(f"{i!r}: {r}" for i, r in failures[:5]))
        return removed

    def count(self, filter=None) -> int:
        self._check_open()
        query = _query(normalize_filter(filter))
        return int(self._call("count", self._searcher().count, index=self.index_name, query=query)["count"])

    def count_values(self, field, values, filter=None) -> dict:
        """Counts of ``values`` of ``field`` in one ``terms`` aggregation (one request, whatever the number)."""
        self._check_open()
        values = list(values)
        if not values:
            return {}
        base = normalize_filter(filter) or {}
        query = _query({**base, field: sorted({str(v) for v in values})})
        resp = self._call("count", self._searcher().search, index=self.index_name, size=0, query=query,
                          aggs={"values": {"terms": {"field": field, "size": len(values)}}})
        got = {str(b["key"]): int(b["doc_count"]) for b in resp["aggregations"]["values"]["buckets"]}
        return {v: got.get(str(v), 0) for v in values}

    def _search(self, queries, k, filt):
        return self._search_many(queries, k, [filt] * len(queries))

    def _search_many(self, queries, k, filters):
        bodies = [self._body(q, k, f) for q, f in zip(queries, filters)]
        out = []
        if len(bodies) == 1:
            resp = self._call("search", self._searcher().search, index=self.index_name, **bodies[0])
            return [self._hits(resp)]
        for start in range(0, len(bodies), self.msearch_batch):
            searches = []
            for body in bodies[start:start + self.msearch_batch]:
                searches += [{"index": self.index_name}, body]
            resp = self._call("search", self._searcher().msearch, searches=searches)
            for i, item in enumerate(resp["responses"]):
                if "error" in item:
                    raise self._item_error(start + i, item)
                out.append(self._hits(item))
        return out

    def _body(self, q, k, filt) -> dict:
        qv = q.tolist()
        fq = _query(filt)
        if self.exact_mode:
            fn = "dotProduct" if self.similarity == "dot_product" else "cosineSimilarity"
            return {"size": k, "_source": {"excludes": [VECTOR_FIELD]},
                    "query": {"script_score": {"query": fq, "script": {
                        "source": f"{fn}(params.qv, '{VECTOR_FIELD}') + 1.0", "params": {"qv": qv}}}}}
        knn = {"field": VECTOR_FIELD, "query_vector": qv, "k": k,
               "num_candidates": min(max(self.num_candidates, k), self.max_k)}
        if filt is not None:
            knn["filter"] = fq
        if self.rescore_oversample and self.index_options.get("type") in QUANTIZED:
            knn["rescore_vector"] = {"oversample": self.rescore_oversample}
        return {"size": k, "_source": {"excludes": [VECTOR_FIELD]}, "knn": knn}

    def _hits(self, resp) -> list[Hit]:
        return [Hit(h["_id"], self._score(h["_score"]), dict(h.get("_source") or {})) for h in resp["hits"]["hits"]]

    def _item_error(self, i: int, item: dict) -> IndexBackendError:
        err = translate(_StatusError(item), op="search", where=self.where, index=self.alias, es_cfg=self.es_cfg)
        return type(err)(f"{err} (search {i} of the batch)")

    def close(self) -> None:
        if not self.closed:
            self._stop_heartbeat()
            self.closed = True
            self.client.close()

    def drop(self) -> None:
        """Delete the concrete index (its alias goes with it) and close."""
        if not self.closed:
            try:
                self._call("delete the index", self.client.options(ignore_status=404).indices.delete,
                           index=self.index_name)
            finally:
                self.close()

    def publish(self) -> None:
        """Point the alias at this (freshly built) index in one request, then delete the indexes it left."""
        self._check_open()
        if self._fresh:  # still ours? a bulk into an index deleted meanwhile re-creates it without the mapping
            mapping = self._call("read the mapping", self.client.indices.get_mapping, index=self.index_name).body
            m = next(iter(mapping.values()), {}).get("mappings", {})
            if (m.get("_meta") or {}).get("created_by") != "visualsearch" or \
                    m.get("properties", {}).get(VECTOR_FIELD, {}).get("type") != "dense_vector":
                raise IndexBackendError(f"Elasticsearch index {self.index_name!r} at {self.where} lost its mapping "
                                        "while this rebuild ran (deleted and re-created by a bulk write); the alias "
                                        f"{self.alias!r} was not moved; rerun `visualsearch index --rebuild`")
        found = self._call("read the alias", self.client.options(ignore_status=404).indices.get_alias,
                           name=self.alias).body
        old = sorted(k for k, v in found.items() if isinstance(v, dict) and "aliases" in v)
        legacy = False
        if not old:  # an index (not an alias) of that name, as older versions created: replaced atomically too
            legacy = bool(self._call("read the mapping", self.client.indices.exists, index=self.alias))
        actions = [{"remove": {"index": o, "alias": self.alias}} for o in old if o != self.index_name]
        if legacy:
            actions.append({"remove_index": {"index": self.alias}})
        actions.append({"add": {"index": self.index_name, "alias": self.alias}})
        self._call("move the alias", self.client.indices.update_aliases, actions=actions)
        self._fresh = False
        self._stop_heartbeat()
        for o in old:
            if o != self.index_name:
                try:
                    self._call("delete the index", self.client.options(ignore_status=404).indices.delete, index=o)
                except IndexBackendError as e:  # the swap is done; a leftover only costs disk
                    log.warning("could not delete the previous index %r: %s", o, e)
        log.info("alias %r now points to %r%s", self.alias, self.index_name,
                 f" (deleted {', '.join(o for o in old if o != self.index_name)})" if old else "")
        self._sweep()

    def discard(self) -> None:
        """Delete an index from :meth:`create_fresh` that was never published."""
        if self._fresh and not self.closed:
            self.drop()

    @contextlib.contextmanager
    def bulk_session(self):
        """Periodic refreshes off (``refresh_interval: -1``) while loading; one refresh and the original setting after.

        The setting is restored also when the load fails. Without the ``manage``
        privilege the load runs with the server's refresh instead (logged).
        """
        self._check_open()
        settings = self._call("read the settings", self.client.indices.get_settings, index=self.index_name,
                              name="index.refresh_interval").body
        current = (next(iter(settings.values()), {}).get("settings", {}).get("index", {}).get("refresh_interval")
                   if settings else None)
        if not self._fresh:  # a rebuild sweeps in create_fresh; any load of the live index does too
            self._sweep()
        original = current
        if str(current) == "-1":
            saved = self._bulk_record()
            if saved.get("active"):  # a load killed mid-way recorded the setting it replaced: that is the original
                original = saved.get("value")
                log.warning("Elasticsearch index %r was left with periodic refresh off by a load that did not "
                            "finish; this load restores refresh_interval %s", self.index_name,
                            original or "to the server's default")
            else:  # no record: an older version's killed load left it; periodic refresh is the default
                original = None
                log.warning("Elasticsearch index %r has refresh_interval -1 and no record of the setting it "
                            "replaced (left by an older version?); this load resets it to the server's default",
                            self.index_name)
            if str(original) == "-1":  # never remembered
                original = None
        try:
            self._set_bulk_record({"active": True, "value": original})  # before refresh goes off: a crash keeps it
            self._put_refresh_interval("-1")
        except IndexPermissionError as e:
            log.warning("indexing without turning periodic refresh off: %s", e)
            self._in_bulk = True
            try:
                yield self
            finally:
                self._in_bulk = False
                self._refresh()
            return
        self._in_bulk = True
        try:
            yield self
        finally:
            self._in_bulk = False
            try:
                self._put_refresh_interval(original)  # None resets it to the server's default
                self._set_bulk_record({"active": False, "value": None})
            finally:
                self._refresh()

    def _bulk_record(self) -> dict:
        """What :meth:`bulk_session` recorded in the index's ``_meta`` (``{"active", "value"}``; {} when nothing)."""
        try:
            mapping = self._call("read the mapping", self.client.indices.get_mapping, index=self.index_name).body
        except IndexBackendError:
            return {}
        meta = next(iter(mapping.values()), {}).get("mappings", {}).get("_meta") or {}
        record = meta.get(BULK_META)
        return record if isinstance(record, dict) else {}

    def _set_bulk_record(self, record: dict) -> None:
        self._set_meta(BULK_META, record)

    def _set_meta(self, key: str, value) -> None:
        """Set one key of the index's mapping ``_meta`` (the whole ``_meta`` is sent: Elasticsearch replaces it)."""
        with self._meta_lock:  # the heartbeat thread writes it too
            mapping = self._call("read the mapping", self.client.indices.get_mapping, index=self.index_name).body
            meta = dict(next(iter(mapping.values()), {}).get("mappings", {}).get("_meta") or {})
            meta[key] = value
            self._call("change the settings", self.client.indices.put_mapping, index=self.index_name, meta=meta)

    def _start_heartbeat(self) -> None:
        """A daemon thread that renews :data:`BUILD_META` every :data:`HEARTBEAT_S` s until publish or close."""
        stop = threading.Event()

        def beat():
            while not stop.wait(HEARTBEAT_S):
                try:
                    self._set_meta(BUILD_META, _build_record())
                except Exception as e:  # noqa: BLE001 - a missed beat only shortens the lease
                    log.debug("no sign of life written for %r: %s", self.index_name, e)

        thread = threading.Thread(target=beat, name=f"heartbeat-{self.index_name}", daemon=True)
        thread.start()
        self._heartbeat = (stop, thread)

    def _stop_heartbeat(self) -> None:
        beat, self._heartbeat = self._heartbeat, None
        if beat is not None:
            beat[0].set()
            beat[1].join(timeout=self.request_timeout + 5)

    def unpublished(self) -> list[tuple[str, Optional[str]]]:
        """``(name, running)`` for each concrete index this alias's rebuilds made (``<alias>-YYYYmmdd-HHMMSS-xxxxxx``,
        created by VisualSearch) that no alias points to and that is not this index; ``running`` says why its
        rebuild may still be going on (see :func:`_rebuild_running`), None for an orphan."""
        pattern = re.compile(re.escape(self.alias) + r"-\d{8}-\d{6}-[0-9a-f]{6}")
        found = self._call("read the alias", self.client.options(ignore_status=404).indices.get,
                           index=f"{self.alias}-*", expand_wildcards="open,closed").body or {}
        live = self._call("read the alias", self.client.options(ignore_status=404).indices.get_alias,
                          name=self.alias).body or {}
        live = {k for k, v in live.items() if isinstance(v, dict) and "aliases" in v}
        now, out = time.time(), []
        for name, body in sorted(found.items()):
            if not isinstance(body, dict) or not pattern.fullmatch(name) or name in live or name == self.index_name:
                continue
            meta = (body.get("mappings") or {}).get("_meta") or {}
            if body.get("aliases") or meta.get("created_by") != "visualsearch":  # in use elsewhere, or not ours
                continue
            out.append((name, _rebuild_running(meta.get(BUILD_META), now, self.orphan_after)))
        return out

    def orphans(self) -> list[str]:
        """The :meth:`unpublished` indexes whose rebuild is over: left by a rebuild killed before it published."""
        return [name for name, running in self.unpublished() if running is None]

    def delete_orphans(self) -> list[str]:
        """Delete :meth:`orphans` (one log line each); never the index the alias points to."""
        gone = []
        for name in self.orphans():
            try:
                self._call("delete the index", self.client.options(ignore_status=404).indices.delete, index=name)
                log.info("deleted %r, left by a rebuild that did not finish", name)
                gone.append(name)
            except IndexBackendError as e:
                log.warning("could not delete %r, left by a rebuild that did not finish: %s", name, e)
        return gone

    def _sweep(self) -> None:
        try:
            self.delete_orphans()
        except IndexBackendError as e:  # leftovers only cost disk: never fail a rebuild for them
            log.warning("could not look for indexes left by rebuilds that did not finish: %s", e)

    def refresh_interval(self) -> Optional[str]:
        """The index's explicit ``refresh_interval`` setting (None: the server's default)."""
        settings = self._call("read the settings", self.client.indices.get_settings, index=self.index_name).body
        return next(iter(settings.values()))["settings"].get("index", {}).get("refresh_interval")

    def _put_refresh_interval(self, value) -> None:
        self._call("change the settings", self.client.indices.put_settings, index=self.index_name,
                   settings={"index": {"refresh_interval": value}})

    def info(self) -> dict:
        """What the server holds: the concrete index behind the alias, its stored mapping, count and server version."""
        self._check_open()
        mapping = self._call("read the mapping", self.client.indices.get_mapping, index=self.index_name).body
        m = next(iter(mapping.values())).get("mappings", {})
        field = m.get("properties", {}).get(VECTOR_FIELD, {})
        meta = m.get("_meta") or {}
        return {"backend": self.name, "dim": int(field.get("dims", self.dim)), "count": self.count(),
                "exact": self.exact, "alias": self.alias, "index_name": self.index_name, "hosts": self.where,
                "server_version": getattr(self.client, "server_version", None), "client_version": client_version(),
                "similarity": field.get("similarity"), "index_options": field.get("index_options"),
                "backbone": meta.get("backbone"), "dataset": meta.get("dataset"),
                "search": "script_score" if self.exact_mode else "knn"}

    # -- internals -------------------------------------------------------------------
    def _score(self, s: float) -> float:
        # knn: (1 + sim) / 2 for dot_product and cosine; script_score: sim + 1
        return float(s) - 1.0 if self.exact_mode else 2.0 * float(s) - 1.0

    def _searcher(self):
        return self.client.options(request_timeout=self.search_timeout)

    def _bulk(self, actions):
        """``streaming_bulk`` with our retry settings: ``(ok, item)`` for every action (failures included).

        A 401/403 (every document would fail alike) raises at once, naming the privilege.
        """
        es = _es()
        from elasticsearch.helpers import streaming_bulk

        client = self.client.options(request_timeout=self.bulk_timeout)
        try:
            for ok, item in streaming_bulk(client, actions, chunk_size=self.chunk_size, max_retries=self.max_retries,
                                           initial_backoff=self.initial_backoff, max_backoff=30,
                                           retry_on_status=RETRY_STATUS, raise_on_error=False,
                                           raise_on_exception=False):
                if not ok:
                    op = next(iter(item.values())) if item else {}
                    exc = op.get("exception")
                    if op.get("status") in (401, 403) or isinstance(exc, (es.ConnectionError, es.ConnectionTimeout)):
                        raise translate(exc if exc is not None else _StatusError(op), op="bulk write",
                                        where=self.where, index=self.index_name, es_cfg=self.es_cfg,
                                        timeout=("bulk_timeout", self.bulk_timeout)) from None
                yield ok, item
        except (es.ApiError, es.TransportError) as e:  # the cluster went away between chunks
            raise translate(e, op="bulk write", where=self.where, index=self.index_name, es_cfg=self.es_cfg,
                            timeout=("bulk_timeout", self.bulk_timeout)) from None
        finally:
            self.requests += 1

    def _refresh(self) -> None:
        self._call("refresh", self.client.indices.refresh, index=self.index_name)

    def _call(self, op: str, fn, **kwargs):
        es = _es()
        self.requests += 1
        try:
            return fn(**kwargs)
        except (es.ApiError, es.TransportError) as e:
            timeout = (("search_timeout", self.search_timeout) if op in ("search", "count")
                       else ("request_timeout", self.request_timeout))
            index = self.alias if op in ("search", "count") else kwargs.get("index", self.index_name)
            raise translate(e, op=op, where=self.where, index=index, es_cfg=self.es_cfg, timeout=timeout) from None


class _StatusError(Exception):
    """A failed bulk item's status and error, in the shape :func:`translate` reads."""

    def __init__(self, op: dict):
        super().__init__(str(op.get("error")))
        self.status_code = op.get("status")
        self.body = {"error": op.get("error")}
        self.error = (op.get("error") or {}).get("type", "") if isinstance(op.get("error"), dict) else ""


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


def audit(cfg) -> list:
    """The configured alias's state as :class:`~vslib.integrity.Finding` s (never raises for the server's state).

    Reports the concrete index behind the alias and its document count; an index left
    with periodic refresh off (``refresh_interval: -1`` by a load killed mid-way:
    "damaged", as documents sent since the last refresh are missing from every answer
    until the next ``visualsearch index`` restores the setting); each orphan concrete
    index ("warning": the next ``visualsearch index`` deletes it) and each rebuild in
    progress ("ok"). An unreachable server is one "warning" saying so.
    """
    what = "Elasticsearch index"
    es_cfg = cfg.index.elasticsearch
    alias = alias_name(es_cfg.index_name, cfg.dataset.name, cfg.backbone_tag)
    where = ", ".join(redact(h) for h in es_cfg.hosts)
    rebuild = "`visualsearch index --rebuild` rebuilds it"
    try:
        client = connect(es_cfg)
    except IndexBackendError as e:
        return [Finding(f"{where}/{alias}", what, "warning", f"not checked: {e}", "")]
    index = ElasticsearchIndex(client, alias, 1, es_cfg=es_cfg, where=where, alias=alias,
                               backbone=cfg.backbone_tag, dataset=cfg.dataset.name)
    out = []
    try:
        try:
            mapping = index._call("read the mapping", client.indices.get_mapping, index=alias).body
        except IndexNotFoundError:
            mapping = {}
        if not mapping:
            out.append(Finding(f"{where}/{alias}", what, "missing", "not built yet", "`visualsearch index` builds it"))
        elif len(mapping) > 1:
            out.append(Finding(f"{where}/{alias}", what, "damaged", f"the alias points to {len(mapping)} indexes "
                               f"({', '.join(sorted(mapping))}); searches would mix them", rebuild))
        else:
            (index.index_name, body), = mapping.items()
            name = f"{where}/{index.index_name}"
            try:
                index._adopt(body.get("mappings", {}), None)
            except IndexMismatchError as e:
                out.append(Finding(name, what, "warning", str(e), rebuild))
            refresh = index.refresh_interval()
            if str(refresh) == "-1":
                record = index._bulk_record()
                restores = (f"restores refresh_interval {record.get('value')}"
                            if record.get("active") and record.get("value") not in (None, "-1")
                            else "restores the server's default refresh")
                cause = ("by a load that did not finish" if record.get("active")
                         else "with no record of the setting it replaced: an older version's load that did not "
                              "finish, or set by hand")
                out.append(Finding(name, what, "damaged", f"periodic refresh is off (refresh_interval -1, left "
                                   f"{cause}); documents sent since the last refresh are missing from every answer",
                                   f"the next `visualsearch index` {restores}"))
            else:
                out.append(Finding(name, what, "ok", f"{index.count()} documents behind alias {alias!r}"))
        for orphan, running in index.unpublished():
            if running:
                out.append(Finding(f"{where}/{orphan}", "Elasticsearch rebuild in progress", "ok", running))
            else:
                out.append(Finding(f"{where}/{orphan}", "orphan Elasticsearch index", "warning",
                                   "not behind the alias: left by a rebuild that did not finish",
                                   "the next `visualsearch index` deletes it"))
    except IndexBackendError as e:
        out.append(Finding(f"{where}/{alias}", what, "warning", f"not checked: {e}", ""))
    finally:
        index.close()
    return out


__all__ = ["CLIENT_REQUIREMENT", "PRIVILEGES", "ElasticsearchIndex", "alias_name", "check_compatibility",
           "audit", "client_version", "connect", "elasticsearch_status", "redact", "translate"]
