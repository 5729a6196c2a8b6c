"""Vector index backends behind one contract (:class:`~vslib.index.base.VectorIndex`).

========================  =================================================
``embedded`` (default)    FAISS in this process, saved to ``cfg.index_dir``
``elasticsearch``         an Elasticsearch cluster (``dense_vector`` + knn)
========================  =================================================

>>> with open_index(cfg, dim=1280) as index:               # doctest: +SKIP
...     hits = index.search(queries, k=10, filter={"label": ["cat"]})
"""
from __future__ import annotations

import hashlib
import importlib
import logging
from typing import Optional

from vslib.errors import IndexBackendError
from vslib.locks import locked
from vslib.index.base import (BulkIndexError, Hit, IndexDimensionError, IndexMismatchError, IndexNotFoundError,
                              IndexPermissionError, IndexTimeoutError, IndexUnreachableError, VectorIndex, exact_search,
                              normalize_filter)

log = logging.getLogger(__name__)

#: backend name -> "module:class"; modules are imported only when their backend is used
BACKENDS = {
    "embedded": "vslib.index.embedded:EmbeddedIndex",
    "elasticsearch": "vslib.index.elasticsearch:ElasticsearchIndex",
}


def backend_class(name: str) -> type[VectorIndex]:
    """The :class:`VectorIndex` subclass registered as ``name``."""
    if name not in BACKENDS:
        raise IndexBackendError(f"Unsupported backend {name!r}. Available backends are {sorted(BACKENDS)}")
    module, cls = BACKENDS[name].split(":")
    return getattr(importlib.import_module(module), cls)


def open_index(cfg, dim: Optional[int] = None, *, create: bool = True, backend: Optional[str] = None) -> VectorIndex:
    """Open the configured index (``cfg.index.backend`` unless ``backend`` is given).

    Parameters
    ----------
    cfg : Config
    dim : int, optional
        The vector dimension; required to create a new index, checked against an existing one
        (:class:`IndexDimensionError` when they differ).
    create : bool
        Create the index when missing; otherwise raise :class:`IndexNotFoundError`.
    """
    return backend_class(backend or cfg.index.backend).from_config(cfg, dim, create=create)


def item_ids(table) -> list[str]:
    """Stable ids for the rows of a feature table: the content hash, made unique by the path.

    Identical files at different paths keep one item each (``<hash>-<path hash>``), so
    a rerun produces the same ids and re-indexing replaces rather than duplicates.
    """
    hashes = table["content_hash"].astype(str).tolist()
    paths = table["path"].astype(str).tolist()
    seen: dict[str, int] = {}
    for h in hashes:
        seen[h] = seen.get(h, 0) + 1
    return [h if seen[h] == 1 else f"{h}-{hashlib.sha1(p.encode()).hexdigest()[:12]}" for h, p in zip(hashes, paths)]


@locked(lambda cfg: cfg.index_dir if cfg.index.backend == "embedded" else None,
        lambda cfg: f"the embedded index {cfg.index_dir}")
def build(cfg, *, rebuild: bool = False, batch_size: int = 1000, progress: bool = True) -> dict:
    """Index the feature cache's index split into the configured backend.

    Ids are stable (see :func:`item_ids`), so a rerun replaces the items instead of
    duplicating them. ``rebuild`` builds a fresh index (needed when the backbone, and
    so the vector dimension, changed): Elasticsearch fills a new concrete index while
    searches keep using the old one and swaps the alias at the end; the embedded
    index is deleted first. The load runs in the backend's :meth:`~VectorIndex.bulk_session`
    (Elasticsearch: no periodic refresh, one refresh at the end). Returns :meth:`VectorIndex.info`.
    """
    from tqdm.auto import tqdm

    from vslib.features import load_features

    feats = load_features(cfg).split("index")
    vectors, table = feats.vectors, feats.table.reset_index(drop=True)
    if len(table) != len(vectors):
        raise IndexBackendError(f"the feature cache is inconsistent: {len(vectors)} vectors for {len(table)} rows")
    ids = item_ids(table)
    fields = [c for c in ("label", "path", "split", "content_hash", "predicted_label") if c in table.columns]
    metadata = table[fields].to_dict("records")
    for m in metadata:
        m["backbone"] = feats.backbone
    dim = int(vectors.shape[1])
    if rebuild:
        index = backend_class(cfg.index.backend).create_fresh(cfg, dim)
    else:
        index = open_index(cfg, dim=dim, create=True)
    failures = []
    added = 0
    done = False
    try:
        with index.bulk_session(), tqdm(total=len(ids), desc=f"indexing ({cfg.index.backend})", unit="img",
                                        disable=not progress) as bar:
            for start in range(0, len(ids), batch_size):
                stop = min(start + batch_size, len(ids))
                try:
                    added += index.add(ids[start:stop], vectors[start:stop], metadata[start:stop])
                except BulkIndexError as e:
                    failures += e.failures
                    added += e.added
                bar.update(stop - start)
                if failures:
                    bar.set_postfix(failed=len(failures))
        if rebuild:
            index.publish()
        info = index.info()
        done = True
    finally:
        if not done and rebuild:
            index.discard()
        index.close()
    for ident, reason in failures[:20]:
        log.warning("not indexed: %s: %s", ident, reason)
    if info["count"] > len(set(ids)):
        log.warning("the index holds %d items, more than the %d of the index split: items of an earlier build "
                    "are left over; rebuild it (vslib.index.build(cfg, rebuild=True))", info["count"], len(ids))
    log.info("indexed %d of %d images into the %s index (%d items in it)", added, len(ids),
             cfg.index.backend, info["count"])
    if failures:
        raise BulkIndexError(failures, added)
    return info


__all__ = ["BACKENDS", "BulkIndexError", "Hit", "IndexDimensionError", "IndexMismatchError", "IndexNotFoundError",
           "IndexPermissionError", "IndexTimeoutError", "IndexUnreachableError",
           "VectorIndex", "backend_class", "build", "exact_search", "item_ids", "normalize_filter", "open_index"]
