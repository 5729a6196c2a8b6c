"""Checksums of the files the project writes, verified when they are read back.

Every artifact read back later (feature shards and the feature file, the manifest and the
checks file, the classifier's files, the embedded index's generations, UMAP caches, run
records) gets a *sidecar* when it is written: ``<name>.sum``, a small JSON object with the
file's size and CRC-32 (``zlib``; 1.6 GB/s on this machine: it guards against damage — a
torn copy, a failing disk, an edit in place — not against someone who also rewrites the
sidecar). Writers opt in with ``atomic_path(path, verified=True)`` (:mod:`vslib.atomic`), or
call :func:`record` after writing a file themselves.

Readers call :func:`verify`: ``full=False`` checks that the file exists and has the size
recorded (a ``stat``: free, used on every open of a large file); ``full=True`` also reads it
and compares the CRC (used on every read of a small file and of a file read whole anyway,
and by ``visualsearch check``). A mismatch raises :class:`DamagedFile`: one line naming the
file, what is wrong and what the next ``run`` will redo. The stage that owns the artifact
catches it, :func:`set_aside` the file (renamed ``<name>.damaged``, kept for a look, never
read again) and recomputes it.

A file without a sidecar was written by an older version (or by hand): :func:`verify`
returns ``"unverified"`` and the reader goes on (its own content checks still apply).

Vectors are checked before they are written and after they are read:
:func:`check_unit_vectors` (finite, L2 norm 1 within :data:`NORM_TOLERANCE`).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from vslib.atomic import record
from vslib.checksum import SIDECAR, digest, sidecar
from vslib.errors import VisualSearchError

#: suffix given to a damaged file set aside by :func:`set_aside`
DAMAGED = ".damaged"
#: largest |norm - 1| a stored feature vector may have (float32 rounding is ~1e-7)
NORM_TOLERANCE = 1e-3


class DamagedFile(VisualSearchError):
    """A stored file does not match what was written, or holds values that cannot be right.

    ``path``: the file; ``reason``: what is wrong; ``redo``: what the next ``run`` does about it.
    """

    def __init__(self, path, reason: str, redo: str = "the next `visualsearch run` recomputes it"):
        self.path, self.reason, self.redo = Path(path), reason, redo
        super().__init__(f"{path}: damaged ({reason}); {redo}")


def read_record(path: str | os.PathLike) -> Optional[dict]:
    """The sidecar's content, None when there is none; a sidecar that is not JSON is damage."""
    side = sidecar(path)
    try:
        text = side.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as e:
        raise DamagedFile(path, f"its checksum file {side.name} is unreadable: {e}") from None
    try:
        fp = json.loads(text)
        int(fp["size"]), str(fp["crc32"])
    except (ValueError, KeyError, TypeError):
        raise DamagedFile(path, f"its checksum file {side.name} is not valid") from None
    return fp


def verify(path: str | os.PathLike, *, full: bool = True,
           redo: str = "the next `visualsearch run` recomputes it") -> str:
    """Check ``path`` against its sidecar: ``"ok"``, or ``"unverified"`` when it has none.

    Raises :class:`DamagedFile` (with ``redo`` in its message) when the file is missing,
    has another size, or (``full``) another CRC-32.
    """
    path = Path(path)
    fp = read_record(path)
    try:
        st = path.stat()
    except FileNotFoundError:
        raise DamagedFile(path, "missing", redo) from None
    if not path.is_file():
        raise DamagedFile(path, "not a regular file", redo)
    if fp is None:
        return "unverified"
    if st.st_size != int(fp["size"]):
        raise DamagedFile(path, f"{st.st_size} bytes where {fp['size']} were written", redo)
    if full:
        got = digest(path)
        if got["crc32"] != fp["crc32"] or got["size"] != int(fp["size"]):
            raise DamagedFile(path, "its content changed since it was written (checksum mismatch)", redo)
    return "ok"


def set_aside(path: str | os.PathLike) -> Optional[Path]:
    """Rename a damaged file to ``<name>.damaged`` (replacing an older one) and drop its sidecar.

    Returns the new path, or None when the file was not there. Nothing reads ``*.damaged``
    files; they are kept so a person can look at what went wrong.
    """
    path = Path(path)
    target = path.with_name(path.name + DAMAGED)
    moved = None
    try:
        os.replace(path, target)
        moved = target
    except FileNotFoundError:
        pass
    try:
        sidecar(path).unlink()
    except FileNotFoundError:
        pass
    return moved


def check_unit_vectors(vectors: np.ndarray, where: str, *, names=None, tolerance: float = NORM_TOLERANCE) -> None:
    """Raise ``ValueError`` naming ``where`` (and the first bad row, or its name) unless every row is
    finite with L2 norm 1 within ``tolerance``. Reads the array once, in blocks of 8 MB."""
    n = len(vectors)
    dim = int(np.prod(vectors.shape[1:])) if getattr(vectors, "ndim", 1) > 1 else 1
    step = max(1, (8 << 20) // (4 * max(1, dim)))  # 8 MB blocks: a memory map is read, never copied whole
    for start in range(0, n, step):
        block = np.asarray(vectors[start:start + step], dtype=np.float32)
        squares = np.einsum("ij,ij->i", block, block)  # NaN or inf anywhere in a row makes its sum NaN or inf
        bad = ~(np.abs(squares - 1.0) <= 2 * tolerance)  # |n^2 - 1| ~ 2 |n - 1|; NaN compares False: bad
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            row = start + i
            label = f"row {row}" if names is None else f"{names[row]} (row {row})"
            finite = bool(np.isfinite(block[i]).all())
            what = f"norm {np.sqrt(squares[i]):.4g}, not 1" if finite else "not finite"
            raise ValueError(f"{where}: {int(bad.sum())}+ vectors are not unit length or not finite; first: "
                             f"{label}: {what}")


@dataclass
class Finding:
    """One artifact's state, as ``visualsearch check`` lists it.

    ``status``: ``"ok"``, ``"unverified"`` (no checksum: written by an older version),
    ``"damaged"`` (missing, truncated, changed, or holding impossible values) or ``"warning"``
    (usable but wrong, e.g. an Elasticsearch index left with refresh off, an orphan index).
    ``what`` names the kind of artifact ("feature shard", "classifier", ...); ``redo`` says what the
    next ``run`` does about it.
    """

    path: str
    what: str
    status: str = "ok"
    reason: str = ""
    redo: str = ""

    @property
    def bad(self) -> bool:
        return self.status == "damaged"

    def line(self) -> str:
        text = f"{self.status:<10} {self.what}: {self.path}"
        if self.reason:
            text += f" ({self.reason})"
        if self.redo and self.status != "ok":
            text += f"; {self.redo}"
        return text


def audit_file(path: str | os.PathLike, what: str, redo: str = "the next `visualsearch run` recomputes it") -> Finding:
    """A full :func:`verify` of one file as a :class:`Finding` (never raises for damage)."""
    try:
        status = verify(path, full=True, redo=redo)
    except DamagedFile as e:
        return Finding(str(path), what, "damaged", e.reason, redo)
    except OSError as e:
        return Finding(str(path), what, "damaged", f"unreadable: {e.strerror or e}", redo)
    return Finding(str(path), what, status, "no checksum recorded (written by an older version)"
                   if status == "unverified" else "", redo)


__all__ = ["Finding", "audit_file", "DAMAGED", "DamagedFile", "NORM_TOLERANCE", "SIDECAR", "check_unit_vectors", "digest", "read_record",
           "record", "set_aside", "sidecar", "verify"]
