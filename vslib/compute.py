"""Where work runs: in this process (``compute.scheduler: local``) or on a Dask cluster (``dask``).

``local`` is the default and never imports Dask. With ``dask``,
:func:`vslib.extraction.extract` cuts the images still to compute into
partitions of ``compute.dask.partition_size`` and runs each as one task
(:func:`embed_partition`: decode, resize, backbone) on a worker:

* ``compute.dask.address: null`` starts a :class:`distributed.LocalCluster` of
  ``workers`` processes with ``threads_per_worker`` threads each on this machine;
  an address such as ``tcp://host:8786`` connects to a running scheduler (started
  with ``dask scheduler``, by ``dask-jobqueue`` on Slurm/PBS, or on Kubernetes).
  The dashboard link is printed either way;
* each worker loads the backbone **once** (a module-level cache in this module,
  keyed by backbone, weights and runtime) and sizes TensorFlow's and TensorFlow
  Lite's threads to the worker's own thread count, so that the workers of one
  machine do not oversubscribe its cores;
* results come back with ``as_completed`` and the client writes each finished
  partition at once as a shard of the feature cache: a killed client keeps every
  finished partition, and a worker that dies costs only its running partitions,
  which the scheduler gives to another worker;
* before any work is sent, every worker checks that it can read the images (a
  shared filesystem mounted at the same path as on the client); one that cannot
  is named with the path and the error.

Library functions here take and return plain data (paths, arrays), so the same
function runs in-process or as a task.
"""
from __future__ import annotations

import contextlib
import itertools
import logging
import os
import sys
import threading
from typing import Callable, Iterator, Optional, Sequence

import numpy as np

from vslib.errors import VisualSearchError

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'dask[distributed]' (both are dependencies of visualsearch: pip install -e .)"


def _distributed():
    try:
        import distributed
    except ImportError as e:
        raise VisualSearchError(f"compute.scheduler: dask needs the `distributed` package ({e}); {INSTALL_HINT}") from None
    return distributed


def local_workers(cfg) -> int:
    """Worker processes of a LocalCluster: ``compute.dask.workers``, or cores // threads_per_worker."""
    d = cfg.compute.dask
    return d.workers or max(1, (os.cpu_count() or 1) // d.threads_per_worker)


@contextlib.contextmanager
def dask_client(cfg, *, announce: Callable[[str], None] = None) -> Iterator[object]:
    """A :class:`distributed.Client` on the cluster ``cfg.compute.dask`` describes; closed on exit.

    A LocalCluster started here is shut down on exit; a running scheduler is left running.
    ``announce`` receives one line naming the cluster and its dashboard link (default: stderr).
    """
    distributed = _distributed()
    d = cfg.compute.dask
    announce = announce or (lambda line: print(line, file=sys.stderr, flush=True))
    if d.address:
        try:
            client = distributed.Client(d.address, timeout="20s")
        except (OSError, TimeoutError) as e:
            raise VisualSearchError(f"cannot reach the Dask scheduler at compute.dask.address {d.address!r} ({e}); "
                                    "start it (`dask scheduler`) and its workers (`dask worker ADDRESS`), or set "
                                    "compute.dask.address: null to start a LocalCluster here") from None
        where = f"Dask scheduler {d.address}"
        cluster = None
    else:
        cluster = distributed.LocalCluster(n_workers=local_workers(cfg), threads_per_worker=d.threads_per_worker,
                                           processes=True, dashboard_address=d.dashboard_address)
        client = distributed.Client(cluster)
        where = f"Dask LocalCluster ({local_workers(cfg)} workers x {d.threads_per_worker} threads)"
    try:
        n = len(client.scheduler_info().get("workers", {}))
        announce(f"{where}: {n} workers; dashboard {client.dashboard_link}")
        yield client
    finally:
        client.close()
        if cluster is not None:
            cluster.close()


# ---------------------------------------------------------------------------
# Worker side


#: backbones loaded in this process, keyed by (name, weights, cache_dir, runtime, threads)
_BACKBONES: dict[tuple, object] = {}
_BACKBONES_LOCK = threading.Lock()


def _worker_threads() -> int:
    """Threads of the Dask worker running this task (1 outside a worker)."""
    try:
        from distributed import get_worker

        return max(1, int(get_worker().state.nthreads))
    except (ImportError, ValueError, AttributeError):
        return 1


def worker_backbone(spec: dict, threads: int):
    """The backbone ``spec`` names, built once per process, with ``threads`` TensorFlow (Lite) threads."""
    key = (spec["name"], spec["weights"], spec["cache_dir"], spec["runtime"], threads)
    with _BACKBONES_LOCK:
        bb = _BACKBONES.get(key)
        if bb is None:
            bb = _BACKBONES[key] = _load_backbone(spec, threads)
    return bb


def _load_backbone(spec: dict, threads: int):
    import dataclasses

    import tensorflow as tf

    from vslib.backbones import get_backbone
    from vslib.runtime import TFLiteRunner

    try:  # only possible before TensorFlow starts its thread pools, i.e. in a fresh worker process
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(threads)
    except RuntimeError as e:
        log.debug("TensorFlow threads already set in this process: %s", e)
    bb = get_backbone(spec["name"], weights=spec["weights"], cache_dir=spec["cache_dir"], runtime=spec["runtime"])
    runner = bb._runner
    if runner is not None and runner.threads != threads:
        new = TFLiteRunner(runner.path, threads)
        new.min_cosine = runner.min_cosine
        bb = dataclasses.replace(bb, _runner=new, runtime_note=f"{bb.runtime_note} ({threads} threads on this worker)")
    if bb.cache_key != spec["key"]:
        raise VisualSearchError(f"this worker's {bb.name} weights are {bb.cache_key}, the client's {spec['key']}: "
                                "install the same visualsearch version and weights on every worker")
    return bb


def embed_partition(spec: dict, sources: Sequence[str]) -> tuple[list[int], np.ndarray, list[tuple[int, str]]]:
    """One task: vectors of the images ``sources`` (paths) with the backbone of ``spec``.

    Returns ``(positions, vectors, failures)``: the positions in ``sources`` of
    the images embedded, their float32 vectors row for row, and ``(position,
    reason)`` of those that could not be loaded.
    """
    from vslib.embedding import iter_batches

    threads = _worker_threads()
    bb = worker_backbone(spec, threads)
    positions, chunks, failures = [], [], []
    for pos, batch, failed in iter_batches(list(sources), bb.input_size, spec["batch_size"], workers=threads,
                                           max_pixels=spec["max_pixels"]):
        failures.extend(failed)
        if pos:
            positions.extend(pos)
            chunks.append(bb.embed(batch))
    vectors = np.concatenate(chunks) if chunks else np.zeros((0, bb.dim), np.float32)
    return positions, vectors.astype(np.float32, copy=False), failures


def check_readable(paths: Sequence[str]) -> list[tuple[str, str]]:
    """``(path, error)`` of each of ``paths`` this process cannot open and read."""
    bad = []
    for p in paths:
        try:
            with open(p, "rb") as f:
                f.read(1)
        except OSError as e:
            bad.append((p, e.strerror or type(e).__name__))
    return bad


def _sample(paths: Sequence[str], n: int = 16) -> list[str]:
    """Up to ``n`` paths spread over the sequence, one per folder first (among the first 10,000), never copied
    whole."""
    by_dir: dict[str, str] = {}
    for p in itertools.islice(paths, 10_000):
        by_dir.setdefault(os.path.dirname(p), p)
        if len(by_dir) >= n:
            break
    picks = list(by_dir.values())
    step = max(1, len(paths) // n)
    picks += [paths[i] for i in range(0, len(paths), step)][:n]
    return list(dict.fromkeys(picks))[: 2 * n]


class WorkersCannotRead(VisualSearchError):
    """Some Dask workers cannot read files this client can (no shared filesystem at the same path)."""


def check_workers_read(client, paths: Sequence[str], what: str = "the images") -> None:
    """Raise :class:`WorkersCannotRead` naming each worker that cannot read a sample of ``paths`` this client can."""
    sample = [str(p) for p in _sample(paths)]
    if not sample:
        return
    try:
        root = os.path.commonpath(sample)
    except ValueError:  # mixed absolute and relative paths
        root = os.path.dirname(sample[0])
    # a file that this client cannot read either is only a skipped image, not a worker's fault
    unreadable_here = {p for p, _ in check_readable(sample)}
    results = client.run(check_readable, sample)
    bad = {w: [e for e in errs if e[0] not in unreadable_here] for w, errs in results.items()}
    bad = {w: errs for w, errs in bad.items() if errs}
    if bad:
        lines = [f"  worker {w}: cannot read {errs[0][0]} ({errs[0][1]})" + (
            f" and {len(errs) - 1} more of {len(sample)} checked" if len(errs) > 1 else "")
            for w, errs in sorted(bad.items())]
        raise WorkersCannotRead(f"{len(bad)} of {len(results)} Dask workers cannot read {what} under {root}:\n"
                                + "\n".join(lines) + f"\nThe workers must see {what} at the same path as this "
                                "client: put them on a shared filesystem mounted at that path on every node, "
                                "or set compute.scheduler: local")


# ---------------------------------------------------------------------------
# Client side


#: partitions kept in flight per worker thread (the rest wait on the client, as start offsets only)
IN_FLIGHT_PER_THREAD = 3


def in_window(client, items: Sequence, submit: Callable[[object], object]) -> Iterator[tuple[object, object]]:
    """``(item, future)`` as each task finishes, with a few tasks per worker thread in flight.

    ``submit(item)`` sends one task and returns its future; the next item is sent as
    each one finishes, so neither the scheduler nor this client holds every task at
    once (390,000 of them at 100M images). Tasks still running are cancelled on exit.
    """
    distributed = _distributed()
    threads = sum(w.get("nthreads", 1) for w in client.scheduler_info().get("workers", {}).values()) or 1
    todo = iter(items)
    item_of: dict = {}
    running = distributed.as_completed(loop=client.loop)

    def submit_next() -> None:
        item = next(todo, _DONE)
        if item is not _DONE:
            fut = submit(item)
            item_of[fut.key] = item
            running.add(fut)

    for _ in range(max(2, IN_FLIGHT_PER_THREAD * threads)):
        submit_next()
    try:
        for fut in running:
            yield item_of.pop(fut.key), fut
            submit_next()
    finally:
        client.cancel(list(running.futures))


_DONE = object()


def extract_on_dask(cfg, sources: Sequence[str], key: str,
                    on_partition: Callable[[list[int], np.ndarray, list[tuple[int, str]]], None],
                    *, announce: Optional[Callable[[str], None]] = None) -> None:
    """Embed ``sources`` (paths) on the cluster of ``cfg``, partition by partition.

    ``on_partition(positions, vectors, failures)`` is called on the client as
    each partition finishes, with positions into ``sources``; it should store
    them at once (the caller writes a shard).
    """
    from vslib.backbones import _config_weights

    distributed = _distributed()
    size = cfg.compute.dask.partition_size
    spec = dict(name=cfg.backbone.name, weights=_config_weights(cfg), cache_dir=str(cfg.models_dir / "backbones"),
                runtime=cfg.backbone.runtime, key=key, batch_size=cfg.backbone.batch_size,
                max_pixels=cfg.dataset.max_image_pixels)
    starts = list(range(0, len(sources), size))
    with dask_client(cfg, announce=announce) as client:
        if not client.scheduler_info().get("workers"):
            client.wait_for_workers(1, timeout=60)
        check_workers_read(client, sources)
        def submit(s):
            return client.submit(embed_partition, spec, sources[s:s + size], pure=False,
                                 key=f"embed-partition-{s // size}-{os.urandom(4).hex()}")

        with contextlib.closing(in_window(client, starts, submit)) as partitions:  # closed at once on an error
            for s, fut in partitions:
                try:
                    pos, vecs, failures = fut.result()
                except distributed.KilledWorker as e:
                    raise VisualSearchError(
                        f"the partition of images {s}..{min(s + size, len(sources)) - 1} (first {sources[s]}) was "
                        f"running on each of the workers that died ({e}); look at the worker logs (out of memory? "
                        "lower compute.dask.partition_size or backbone.batch_size), then run again: finished "
                        "partitions are kept") from None
                fut.release()  # its vectors are on disk once on_partition returns: the cluster may forget them
                on_partition([s + i for i in pos], vecs, [(s + i, r) for i, r in failures])


# ---------------------------------------------------------------------------
# Elasticsearch bulk from the workers

#: Elasticsearch connections of this worker process, keyed by (hosts, user, concrete index)
_ES_INDEXES: dict[tuple, object] = {}
#: bulk retries of a worker (each waits up to 30 s): many workers against one cluster meet 429 more often
WORKER_BULK_RETRIES = 8


def worker_es_index(es_cfg, index_name: str, dim: int):
    """This process's connection to the concrete Elasticsearch index ``index_name``, opened once.

    The client created and checked the index; a worker only writes documents to
    it (no refresh per request: the client's bulk session refreshes once at the end).
    """
    from vslib.index.elasticsearch import ElasticsearchIndex, connect, redact

    key = (tuple(es_cfg.hosts), es_cfg.username, index_name)
    with _BACKBONES_LOCK:
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
    from vslib.features import REWRITE
    from vslib.index.base import BulkIndexError
    from vslib.npzfile import checked_vectors, npz_member, read_rows

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
    """Fill the Elasticsearch ``index`` (an open :class:`~vslib.index.elasticsearch.ElasticsearchIndex`) from the workers.

    The feature file ``path`` is cut into ranges of ``rows_per_task`` rows; each
    range is one task (:func:`bulk_partition`) that reads its rows and sends
    them to the cluster itself, so indexing throughput grows with the workers,
    bounded by what Elasticsearch accepts (429 answers are retried with
    backoff). ``on_task(rows, added, failures)`` is called on the client as
    each task finishes. Raises :class:`WorkersCannotRead` before any work is
    sent when a worker cannot read ``path``.
    """
    from vslib.npzfile import npz_member

    distributed = _distributed()
    path = str(path)
    split = np.asarray(npz_member(path, "split")) == "index"
    before = np.concatenate([[0], np.cumsum(split)])  # index rows before each file row
    if int(before[-1]) != len(ids):
        raise VisualSearchError(f"{path} holds {int(before[-1])} index rows but {len(ids)} ids were given")
    n = len(split)
    starts = list(range(0, n, rows_per_task))
    with dask_client(cfg, announce=announce) as client:
        if not client.scheduler_info().get("workers"):
            client.wait_for_workers(1, timeout=60)
        check_workers_read(client, [path], what="the feature file")

        def submit(s):
            e = min(s + rows_per_task, n)
            return client.submit(bulk_partition, cfg.index.elasticsearch, index.index_name, index.dim, path, s, e,
                                 list(ids[before[s]:before[e]]), list(fields), backbone, pure=False,
                                 key=f"es-bulk-{s}-{os.urandom(4).hex()}")

        with contextlib.closing(in_window(client, starts, submit)) as tasks:
            for s, fut in tasks:
                try:
                    added, failures = fut.result()
                except distributed.KilledWorker as e:
                    raise VisualSearchError(f"a bulk task was running on each of the workers that died ({e}); "
                                            "look at the worker logs, then index again (ids are stable: "
                                            "documents already sent are replaced, not duplicated)") from None
                fut.release()
                on_task(int(before[min(s + rows_per_task, n)] - before[s]), added, failures)
