"""Files written whole or not at all.

Every writer of the project (feature shards and files, the manifest, the classifier, the
index, the reports) goes through :func:`atomic_path`: the content is written to a hidden
temporary file in the destination's own folder (``.<name>.<random>.tmp``), flushed to disk,
then renamed over the destination with :func:`os.replace` (atomic on POSIX). On any failure
(disk full, read-only, killed) the temporary file is removed and the destination keeps its
previous content, so a reader never sees a torn file. An ``OSError`` of the machine leaves as
an :class:`~vslib.errors.EnvironmentFault` naming the destination and what to do.
"""
from __future__ import annotations

import contextlib
import json
import os
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

from vslib.checksum import digest, sidecar
from vslib.errors import environment_fault

#: glob of the temporary files :func:`atomic_path` makes (left only by a killed process)
TEMP_GLOB = ".*.tmp*"


def ensure_dir(directory: str | os.PathLike) -> Path:
    """``mkdir -p``; a fault of the machine becomes an :class:`~vslib.errors.EnvironmentFault`."""
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise (environment_fault(e, directory) or e) from e
    return directory


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, suffix: str = "", verified: bool = False) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it replaces ``path``.

    ``suffix`` ends the temporary name, for writers that insist on an extension
    (``np.savez`` adds ``.npz``, Keras wants ``.keras``). The caller writes to the
    yielded path (and may fsync); nothing is left behind if the block raises.
    ``verified`` also writes the checksum sidecar (:func:`record`) once
    the file is in place, so a reader can tell it is the file that was written.
    """
    path = Path(path)
    ensure_dir(path.parent)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp{suffix}")
    try:
        yield tmp
        _fsync_file(tmp)
        fingerprint = digest(tmp) if verified else None
        os.replace(tmp, path)
        if verified:
            record(path, fingerprint)
    except OSError as e:
        raise (environment_fault(e, path, temp=tmp) or e) from e
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)


def _fsync_file(p: Path) -> None:
    if p.is_file():
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write_bytes(path: str | os.PathLike, data: bytes, *, verified: bool = False) -> Path:
    """Write ``data`` to ``path`` atomically (``verified``: with its checksum sidecar)."""
    with atomic_path(path, verified=verified) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8", *, verified: bool = False) -> Path:
    """Write ``text`` to ``path`` atomically (``verified``: with its checksum sidecar)."""
    return atomic_write_bytes(path, text.encode(encoding), verified=verified)


def atomic_write_json(path: str | os.PathLike, obj: Any, *, indent: int = 2,
                      default: Optional[Callable[[Any], Any]] = None, verified: bool = False) -> Path:
    """Write ``obj`` as strict JSON to ``path`` atomically (serialised first: a bad value writes nothing;
    NaN and infinities become null, which every JSON parser reads: see :func:`strict_json`)."""
    return atomic_write_text(path, json.dumps(strict_json(obj), indent=indent, default=default, allow_nan=False),
                             verified=verified)


def strict_json(obj: Any) -> Any:
    """``obj`` with every float NaN or infinity (Python's or numpy's) replaced by None, so ``json.dumps`` writes
    strict JSON (RFC 8259 has no NaN or Infinity; Python writes them unless told not to)."""
    import math

    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: strict_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict_json(v) for v in obj]
    try:
        import numpy as np

        if isinstance(obj, np.floating):
            return float(obj) if np.isfinite(obj) else None
    except ImportError:  # pragma: no cover - numpy is a dependency
        pass
    return obj


def record(path: str | os.PathLike, fingerprint: Optional[dict] = None) -> dict:
    """Write the checksum sidecar of ``path`` (its :func:`~vslib.checksum.digest`, or ``fingerprint`` when the
    writer has it); :mod:`vslib.integrity` reads it back."""
    fp = dict(fingerprint) if fingerprint is not None else digest(path)
    atomic_write_text(sidecar(path), json.dumps(fp))
    return fp


def atomic_savez(path: str | os.PathLike, /, *, verified: bool = False, **arrays) -> Path:
    """``np.savez`` to ``path`` atomically (``verified``: with its checksum sidecar)."""
    import numpy as np

    with atomic_path(path, verified=verified) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
    return Path(path)


__all__ = ["TEMP_GLOB", "strict_json", "atomic_path", "atomic_savez", "atomic_write_bytes", "atomic_write_json",
           "atomic_write_text", "ensure_dir", "record"]
