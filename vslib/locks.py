"""One run at a time per cache, model or index folder.

Two runs that would write the same folder (a notebook and a terminal, say) would both
compute everything. :func:`run_lock` takes an exclusive lock on ``<folder>/.lock`` through
`filelock <https://py-filelock.readthedocs.io>`_ (``fcntl.flock`` on POSIX: the kernel
drops it when its process ends, however it ends, so a lock left by a killed run never
blocks). A second run logs one line, ``waiting for the run with PID N started at T that is
writing X``, waits, then goes on and finds the work done (extraction computes only what
the cache still lacks). The holder's PID, start time and purpose are kept next to the
lock in ``.lock.owner`` (JSON), for that message.

The lock is re-entrant within a process (``pipeline.run`` holding a folder while a step
below it takes the same folder is fine).
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import functools
import json
import logging
import os
import socket
import threading
from pathlib import Path
from typing import Callable, Iterator, Optional

from vslib.atomic import atomic_write_json, ensure_dir
from vslib.errors import environment_fault

log = logging.getLogger(__name__)

LOCK_FILE = ".lock"
OWNER_FILE = ".lock.owner"

_held: dict[str, int] = {}
_held_guard = threading.Lock()


def owner(directory: str | os.PathLike) -> Optional[dict]:
    """What ``.lock.owner`` says about the run holding (or last holding) ``directory``'s lock."""
    try:
        return json.loads((Path(directory) / OWNER_FILE).read_text())
    except (OSError, ValueError):
        return None


def describe(info: Optional[dict], lock_path: Path) -> str:
    if not info:
        return f"another run (it holds {lock_path})"
    host = info.get("host")
    where = f" on {host}" if host and host != socket.gethostname() else ""
    return (f"the run with PID {info.get('pid', '?')}{where} started at {info.get('started', '?')} "
            f"that is writing {info.get('what', lock_path.parent)}")


@contextlib.contextmanager
def run_lock(directory: str | os.PathLike, what: str = "", *, timeout: float = -1,
             poll_interval: float = 0.5) -> Iterator[Path]:
    """Hold the lock of ``directory`` for the block; wait (saying for whom) while another run holds it.

    Parameters
    ----------
    directory : path
        The folder the block writes (created if missing).
    what : str
        What the block writes, in words, for the message another run shows while it waits.
    timeout : float
        Seconds to wait at most (negative: as long as it takes); then a ``filelock.Timeout``.
    """
    import filelock

    directory = Path(directory).resolve()
    key = str(directory)
    with _held_guard:
        if _held.get(key):
            _held[key] += 1
            reentrant = True
        else:
            reentrant = False
    if reentrant:
        try:
            yield directory / LOCK_FILE
        finally:
            with _held_guard:
                _held[key] -= 1
        return

    ensure_dir(directory)
    lock_path = directory / LOCK_FILE
    lock = filelock.FileLock(str(lock_path))
    try:
        try:
            lock.acquire(timeout=0)
        except filelock.Timeout:
            log.warning("waiting for %s; it holds %s (stop it, or let it finish: this run then reuses its work)",
                        describe(owner(directory), lock_path), lock_path)
            lock.acquire(timeout=timeout, poll_interval=poll_interval)
            log.info("%s is free; going on", lock_path)
    except OSError as e:
        raise (environment_fault(e, lock_path) or e) from e
    try:
        with _held_guard:
            _held[key] = 1
        atomic_write_json(directory / OWNER_FILE, {
            "pid": os.getpid(), "host": socket.gethostname(), "what": what or str(directory),
            "started": _dt.datetime.now().astimezone().isoformat(timespec="seconds")})
        yield lock_path
    finally:
        with _held_guard:
            _held.pop(key, None)
        with contextlib.suppress(OSError):
            (directory / OWNER_FILE).unlink(missing_ok=True)
        lock.release()


def locked(directory_of: Callable, what: Callable | str):
    """Decorator: run ``fn(cfg, ...)`` holding :func:`run_lock` on ``directory_of(cfg)`` (None: no lock)."""
    def deco(fn):
        @functools.wraps(fn)
        def wrapper(cfg, *args, **kwargs):
            directory = directory_of(cfg)
            if directory is None:
                return fn(cfg, *args, **kwargs)
            with run_lock(directory, what(cfg) if callable(what) else what):
                return fn(cfg, *args, **kwargs)
        return wrapper
    return deco


__all__ = ["LOCK_FILE", "OWNER_FILE", "locked", "owner", "run_lock"]
