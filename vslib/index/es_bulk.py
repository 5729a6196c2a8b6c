"""Elasticsearch bulk requests sent by the Dask workers, each reading its own rows of the feature file.

With ``compute.scheduler: dask`` and the Elasticsearch backend, :func:`vslib.index.build` fills the
index through :func:`index_on_dask`: the feature file is cut into ranges of rows, and each range is one
task (:func:`bulk_partition`, run by :func:`vslib.compute.map_partitions`) that reads its rows itself
(the memory-mapped file on a shared filesystem) and sends them to the cluster, so indexing throughput
grows with the workers, bounded by what Elasticsearch accepts (429 answers are retried with backoff).
Each worker process opens its connection to the index once (:func:`worker_es_index`).
"""
from __future__ import annotations

import threading
from typing import Callable, Optional, Sequence

import numpy as np

from vslib.compute import map_partitions
from vslib.errors import VisualSearchError
from vslib.features import REWRITE
from vslib.index.base import BulkIndexError
from vslib.index.elasticsearch import ElasticsearchIndex, connect, redact
from vslib.npzfile import checked_vectors, npz_member, read_rows

#: Elasticsearch connections of this worker process, keyed by (hosts, user, concrete index)
_ES_INDEXES: dict[tuple, object] = {}
_ES_INDEXES_LOCK = threading.Lock()
#: bulk retries of a worker (each waits up to 30 s): many workers against one cluster meet 429 more often
WORKER_BULK_RETRIES = 8


def worker_es_index(es_cfg, index_name: str, dim: int):
    """This process's connection to the concrete Elasticsearch index ``index_name``, opened once.

    The client created and checked the index; a worker only writes documents to
    it (no refresh per request: the client's bulk session refreshes once at the end).
    """
    key = (tuple(es_cfg.hosts), es_cfg.username, index_name)
    with _ES_INDEXES_LOCK:
        index = _ES_INDEXES.get(key)
        if index is None:
            index = ElasticsearchIndex(connect(es_cfg), index_name, dim, es_cfg=es_cfg,
                                       where=", ".join(redact(h) for h in es_cfg.hosts))
            index._in_bulk = True
            index.max_retries = WORKER_BULK_RETRIES
            _ES_INDEXES[key] = index
    return index


def bulk_partition(es_cfg, index_name: str, dim: int, path: str, start: int, stop: int, ids: Sequence[str],
                   fields: Sequence[str], backbone: str) -> tuple[int, list[tuple[str, str]]]:
    """One task: index the ``index``-split rows among rows ``start:stop`` of the feature file ``path``.

    ``ids`` are those rows' item ids, in file order. The worker reads its rows
    itself (memory-mapped file on a shared filesystem) and sends them with
    bulk requests that retry on 429 and 5xx with backoff. Returns ``(added,
    [(id, reason), ...])``; failures are returned, not raised, so that one bad
    document does not fail the task.
    """
    keep = np.flatnonzero(np.asarray(npz_member(path, "split")[start:stop]) == "index")
    if len(keep) != len(ids):
        raise VisualSearchError(f"{path} rows {start}..{stop - 1} hold {len(keep)} index rows, the client sent "
                                f"{len(ids)} ids: the feature file changed during indexing; run it again")
    if not len(keep):
        return 0, []
    vectors = read_rows(npz_member(path, "vectors"), start, stop)[keep]
    vectors = checked_vectors(vectors, path, REWRITE)  # finite, unit length
    columns = {c: np.asarray(npz_member(path, c)[start:stop])[keep] for c in fields}
    metadata = [{**{c: str(columns[c][i]) for c in fields}, "backbone": backbone} for i in range(len(keep))]
    index = worker_es_index(es_cfg, index_name, dim)
    try:
        return index.add(list(ids), vectors, metadata), []
    except BulkIndexError as e:
        return e.added, e.failures


def index_on_dask(cfg, index, path, ids: Sequence[str], fields: Sequence[str], backbone: str, *,
                  rows_per_task: int, on_task: Callable[[int, int, list[tuple[str, str]]], None],
                  announce: Optional[Callable[[str], None]] = None) -> None:
    """Fill the Elasticsearch ``index`` (an open :class:`~vslib.index.elasticsearch.ElasticsearchIndex`) from
    the workers.

    The feature file ``path`` is cut into ranges of ``rows_per_task`` rows; each
    range is one task (:func:`bulk_partition`) that reads its rows and sends
    them to the cluster itself. ``on_task(rows, added, failures)`` is called on the client as
    each task finishes. Raises :class:`~vslib.compute.WorkersCannotRead` before any work is
    sent when a worker cannot read ``path``.
    """
    path = str(path)
    split = np.asarray(npz_member(path, "split")) == "index"
    before = np.concatenate([[0], np.cumsum(split)])  # index rows before each file row
    if int(before[-1]) != len(ids):
        raise VisualSearchError(f"{path} holds {int(before[-1])} index rows but {len(ids)} ids were given")

    def args(s: int, e: int) -> tuple:
        return (cfg.index.elasticsearch, index.index_name, index.dim, path, s, e, list(ids[before[s]:before[e]]),
                list(fields), backbone)

    def done(s: int, e: int, result) -> None:
        added, failures = result
        on_task(int(before[e] - before[s]), added, failures)

    def killed(s: int, e: int, error: Exception) -> str:
        return (f"a bulk task was running on each of the workers that died ({error}); look at the worker logs, "
                "then index again (ids are stable: documents already sent are replaced, not duplicated)")

    map_partitions(cfg, bulk_partition, len(split), rows_per_task, args, done, key=lambda s: f"es-bulk-{s}",
                   readable=[path], what="the feature file", killed=killed, announce=announce)
