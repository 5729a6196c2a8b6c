"""Where work runs: in this process (``compute.scheduler: local``) or on a Dask cluster (``dask``).

``local`` is the default and never imports Dask. With ``dask``, a caller cuts its work into
partitions and :func:`map_partitions` runs a plain function on each, one task a partition, on the
cluster's workers (the extraction embeds images, :func:`vslib.extraction.extract`; the Elasticsearch
backend sends bulk requests, :mod:`vslib.index.es_bulk`):

* ``compute.dask.address: null`` starts a :class:`distributed.LocalCluster` of
  ``workers`` processes with ``threads_per_worker`` threads each on this machine;
  an address such as ``tcp://host:8786`` connects to a running scheduler (started
  with ``dask scheduler``, by ``dask-jobqueue`` on Slurm/PBS, or on Kubernetes).
  The dashboard link is printed either way (:func:`dask_client`);
* a task learns its worker's thread count from :func:`worker_threads` (to size its own
  thread pools, so that the workers of one machine do not oversubscribe its cores);
* results come back with ``as_completed``, a few partitions per worker thread in flight
  (:func:`in_window`), and the caller stores each finished one at once: a killed client keeps
  every finished partition, and a worker that dies costs only its running partitions, which
  the scheduler gives to another worker;
* before any work is sent, every worker checks that it can read the caller's files (a
  shared filesystem mounted at the same path as on the client); one that cannot
  is named with the path and the error (:func:`check_workers_read`).

Functions run as tasks take and return plain data (paths, arrays), so the same function runs
in-process or on a worker.
"""
from __future__ import annotations

import contextlib
import itertools
import os
import sys
from typing import Callable, Iterator, Optional, Sequence

from vslib.errors import VisualSearchError

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


def worker_threads() -> int:
    """Threads of the Dask worker running this task (1 outside a worker)."""
    try:
        from distributed import get_worker

        return max(1, int(get_worker().state.nthreads))
    except (ImportError, ValueError, AttributeError):
        return 1


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


def map_partitions(cfg, func: Callable, n: int, size: int, args: Callable[[int, int], tuple],
                   on_result: Callable[[int, int, object], None], *, key: Callable[[int], str],
                   readable: Sequence[str], what: str = "the images",
                   killed: Callable[[int, int, Exception], str],
                   announce: Optional[Callable[[str], None]] = None) -> None:
    """Run ``func(*args(start, stop))`` on the cluster of ``cfg`` for each partition ``start:stop`` of ``n`` items.

    The partitions are ``size`` items long (the last one shorter). ``on_result(start, stop, result)`` is
    called on the client as each task finishes, after which the cluster forgets the result (store it at
    once). ``key(start)`` names the task (a random suffix is added). Raises :class:`WorkersCannotRead` before
    any work is sent when a worker cannot read a sample of ``readable`` (``what`` names them), and a
    :class:`~vslib.errors.VisualSearchError` saying ``killed(start, stop, error)`` when a partition was
    running on each of the workers that died.
    """
    distributed = _distributed()
    with dask_client(cfg, announce=announce) as client:
        if not client.scheduler_info().get("workers"):
            client.wait_for_workers(1, timeout=60)
        check_workers_read(client, readable, what=what)

        def submit(s):
            return client.submit(func, *args(s, min(s + size, n)), pure=False,
                                 key=f"{key(s)}-{os.urandom(4).hex()}")

        partitions = in_window(client, range(0, n, size), submit)
        with contextlib.closing(partitions):  # closed at once on an error: the running tasks are cancelled
            for s, fut in partitions:
                try:
                    result = fut.result()
                except distributed.KilledWorker as e:
                    raise VisualSearchError(killed(s, min(s + size, n), e)) from None
                fut.release()  # stored once on_result returns: the cluster may forget it
                on_result(s, min(s + size, n), result)
