"""Vector index backends behind one contract (:class:`~vslib.index.base.VectorIndex`).

The backends, their classes, settings sections and capabilities are declared in
:data:`vslib.registry.BACKENDS` (``embedded``, the default: FAISS in this process;
``elasticsearch``: a cluster with ``dense_vector`` + knn).

>>> with open_index(cfg, dim=1280) as index:               # doctest: +SKIP
...     hits = index.search(queries, k=10, filter={"label": ["cat"]})
"""
from __future__ import annotations

import hashlib
import itertools
import logging
from typing import Optional

from vslib.compute import WorkersCannotRead
from vslib.features import TABLE_COLUMNS, FeatureSet, feature_columns, features_path, iter_features
from vslib.npzfile import npz_member
from vslib.integrity import DamagedFile
from vslib.locks import locked
from vslib.registry import BACKENDS
from vslib.index import embedded
from vslib.index.es_bulk import index_on_dask
from vslib.index.base import (BulkIndexError, Hit, IndexDimensionError, IndexMismatchError, IndexNotFoundError,
                              IndexPermissionError, IndexTimeoutError, IndexUnreachableError, VectorIndex, exact_search,
                              normalize_filter)

log = logging.getLogger(__name__)


def backend_class(name: str) -> type[VectorIndex]:
    """The :class:`VectorIndex` subclass registered as ``name`` (:data:`vslib.registry.BACKENDS`; its module is
    imported now, only when its backend is used)."""
    return BACKENDS.resolve(name)


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
    index is filled beside the live one and written as a new generation at the end (searches
    meanwhile answer from the old one; a build killed at any moment leaves it, and the next
    build removes what the killed one left). A damaged embedded index (a
    :class:`~vslib.integrity.DamagedFile`) is rebuilt. A factory the index split cannot train is
    refused before anything is done or undone (:func:`vslib.index.embedded.check_factory`). The
    load runs in the backend's :meth:`~VectorIndex.bulk_session`
    (Elasticsearch: no periodic refresh, one refresh at the end). The vectors are read
    from the feature file in batches of ``batch_size`` rows (:func:`vslib.features.iter_features`)
    and each batch is added at once (FAISS ``add``, one Elasticsearch bulk request), so the
    client holds one batch, not the dataset. With ``compute.scheduler: dask`` and the
    Elasticsearch backend the bulk requests are sent by the Dask workers instead, in
    parallel, each reading its own rows of the feature file
    (:func:`vslib.index.es_bulk.index_on_dask`; 429 answers are retried with backoff); when the
    workers cannot read the feature file the client sends them, as above. Returns
    :meth:`VectorIndex.info`.
    """
    from tqdm.auto import tqdm

    import pandas as pd

    # ids need the whole split's hashes and paths (to tell duplicates apart), not its vectors
    ids = item_ids(feature_columns(cfg, ["content_hash", "path"], split="index"))
    batches = iter_features(cfg, split="index", batch_size=batch_size)  # out of core: one batch in memory
    first = next(batches, None)  # checks the file and its backbone
    if first is None:  # no index rows: an empty index of the file's dimension
        first = FeatureSet(npz_member(features_path(cfg), "vectors")[:0], pd.DataFrame(columns=list(TABLE_COLUMNS)),
                           cfg.backbone.name)
    backbone = first.backbone
    fields = [c for c in ("label", "path", "split", "content_hash", "predicted_label") if c in first.table.columns]
    dim = int(first.dim)
    if cfg.index.backend == "embedded":
        embedded.check_factory(cfg.index.embedded.factory, len(ids), dim)  # before any work is done or undone
        embedded.remove_debris(cfg.index_dir)  # what a killed build left (this build holds the folder's lock)
    if not rebuild:
        try:
            index = open_index(cfg, dim=dim, create=True)
        except DamagedFile as e:
            log.warning("%s: damaged (%s); rebuilding the index", e.path, e.reason)
            rebuild = True
    if rebuild:
        index = backend_class(cfg.index.backend).create_fresh(cfg, dim)
    failures = []
    added = 0
    done = False
    try:
        with index.bulk_session(), tqdm(total=len(ids), desc=f"indexing ({cfg.index.backend})", unit="img",
                                        disable=not progress) as bar:
            def tally(rows, ok, failed):
                nonlocal added
                added += ok
                failures.extend(failed)
                bar.update(rows)
                if failures:
                    bar.set_postfix(failed=len(failures))

            sent = False
            if cfg.index.backend == "elasticsearch" and cfg.compute.scheduler == "dask" and ids:
                sent = _index_on_workers(cfg, index, ids, fields, backbone, batch_size, tally)
            if not sent:
                start = 0
                for feats in itertools.chain([first], batches):  # FAISS add / Elasticsearch bulk per batch
                    stop = start + len(feats)
                    metadata = feats.table[fields].to_dict("records")
                    for m in metadata:
                        m["backbone"] = backbone
                    try:
                        tally(stop - start, index.add(ids[start:stop], feats.vectors, metadata), [])
                    except BulkIndexError as e:
                        tally(stop - start, e.added, e.failures)
                    start = stop
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


def _index_on_workers(cfg, index, ids, fields, backbone, rows_per_task, tally) -> bool:
    """Elasticsearch bulk requests from the Dask workers (:func:`vslib.index.es_bulk.index_on_dask`).

    Returns False, having sent nothing, when the workers cannot read the feature
    file (no shared filesystem): the client then sends the batches itself.
    """
    try:
        index_on_dask(cfg, index, features_path(cfg), ids, fields, backbone, rows_per_task=rows_per_task,
                      on_task=tally)
        return True
    except WorkersCannotRead as e:
        log.warning("%s\nIndexing from this client instead (one bulk request at a time).", e)
        return False


__all__ = ["BulkIndexError", "Hit", "IndexDimensionError", "IndexMismatchError", "IndexNotFoundError",
           "IndexPermissionError", "IndexTimeoutError", "IndexUnreachableError",
           "VectorIndex", "backend_class", "build", "exact_search", "item_ids", "normalize_filter", "open_index"]
