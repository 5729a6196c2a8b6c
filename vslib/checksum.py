"""The checksum of a stored file and where its sidecar lives (no other vslib module needed).

A sidecar ``<name>.sum`` holds ``{"size": bytes, "crc32": "xxxxxxxx"}`` of the file it sits
beside. :mod:`vslib.atomic` writes it with the file; :mod:`vslib.integrity` reads and checks it.
"""
from __future__ import annotations

import os
import zlib
from pathlib import Path

#: suffix of a checksum sidecar: ``features.npz`` -> ``features.npz.sum``
SIDECAR = ".sum"
_CHUNK = 1 << 20


def sidecar(path: str | os.PathLike) -> Path:
    """The checksum sidecar of ``path``."""
    path = Path(path)
    return path.with_name(path.name + SIDECAR)


def digest(path: str | os.PathLike, block: int = _CHUNK) -> dict:
    """``{"size": bytes, "crc32": "xxxxxxxx"}`` of a file, read into one ``block``-byte buffer (1 MB; no
    allocation per chunk)."""
    crc = 0
    size = 0
    buf = bytearray(block)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while True:
            n = f.readinto(buf)
            if not n:
                break
            crc = zlib.crc32(view[:n], crc)
            size += n
    return {"size": size, "crc32": f"{crc:08x}"}


__all__ = ["SIDECAR", "digest", "sidecar"]
