"""Uncompressed ``.npz`` files read out of core and written chunk by chunk: the format of the feature cache's
shards and of the feature file (:mod:`vslib.feature_cache`, :mod:`vslib.features`).

``np.savez`` writes every member as a stored ``.npy``, so a reader memory-maps a member in place
(:func:`npz_memmap`) and reads only the rows it slices (:func:`read_rows`, a plain file read: mapped pages
would stay in the reader's memory). A writer streams a large member chunk by chunk (:func:`save_npz_streamed`;
text columns too, :func:`text_member`), so neither side holds a dataset's vectors in memory.

Checks: :func:`verify_file` is :func:`vslib.integrity.verify` with the CRC read through a small buffer, and
:func:`checked_vectors` turns vectors that are not finite and unit length into a
:class:`~vslib.integrity.DamagedFile` naming the file they were read from.
"""
from __future__ import annotations

import os
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np
import pandas as pd

from vslib.atomic import atomic_path
from vslib.checksum import digest
from vslib.integrity import DamagedFile, check_unit_vectors, read_record, record, verify

#: rows per chunk when vectors are streamed (merging shards, writing a feature file)
STREAM_ROWS = 2048  # 10 MB of 1280-d float32: a few such buffers at once whatever the collection's size
#: the buffer the feature file's writers and readers compute its CRC through (their memory stays bounded by a chunk)
DIGEST_BLOCK = 256 << 10


class NotMappable(ValueError):
    """An ``.npz`` member that cannot be memory-mapped (compressed, or holds objects)."""


def npz_memmap(path: str | os.PathLike, name: str, mode: str = "r") -> np.ndarray:
    """Member ``name`` of an uncompressed ``.npz`` as a memory map (nothing is read yet).

    ``mode`` as for :class:`numpy.memmap`: ``"r"`` read-only, ``"c"`` copy-on-write
    (writable in memory, the file never changes).

    Raises :class:`NotMappable` for a compressed member (``np.savez_compressed``); use ``np.load`` then.
    """
    path = Path(path)
    with zipfile.ZipFile(path) as zf:
        info = zf.getinfo(f"{name}.npy")
    if info.compress_type != zipfile.ZIP_STORED:
        raise NotMappable(f"{path}: member {name} is compressed")
    with open(path, "rb") as f:
        f.seek(info.header_offset)
        local = f.read(30)
        if local[:4] != b"PK\x03\x04":
            raise NotMappable(f"{path}: bad zip header for member {name}")
        start = info.header_offset + 30 + int.from_bytes(local[26:28], "little") + int.from_bytes(local[28:30], "little")
        f.seek(start)
        version = np.lib.format.read_magic(f)
        shape, fortran, dtype = (np.lib.format.read_array_header_1_0(f) if version == (1, 0)
                                 else np.lib.format.read_array_header_2_0(f))
        offset = f.tell()
    if dtype.hasobject:
        raise NotMappable(f"{path}: member {name} holds Python objects")
    if int(np.prod(shape)) == 0:
        return np.zeros(shape, dtype)
    return np.memmap(path, dtype=dtype, mode=mode, offset=offset, shape=shape, order="F" if fortran else "C")


def npz_member(path: str | os.PathLike, name: str, mode: str = "r") -> np.ndarray:
    """:func:`npz_memmap`, or the member read whole where it cannot be mapped."""
    try:
        return npz_memmap(path, name, mode)
    except NotMappable:
        with np.load(path, allow_pickle=False) as z:
            return z[name]


def _aligned_member(zf: zipfile.ZipFile, filename: str, align: int = 64) -> zipfile.ZipInfo:
    """A stored zip member whose ``.npy`` data will start ``align``-aligned in the file (so a memory map
    of it is aligned): the local header is padded with an extra field, since the ``.npy`` header
    itself pads to a multiple of 64 bytes."""
    info = zipfile.ZipInfo(filename, date_time=time.localtime(time.time())[:6])
    info.compress_type = zipfile.ZIP_STORED
    # local header: 30 bytes + name + extra (ours: 4 + pad) + the zip64 extra (20) that force_zip64 adds
    used = zf.start_dir + 30 + len(filename.encode()) + 4 + 20
    pad = -used % align
    info.extra = (0x7076).to_bytes(2, "little") + pad.to_bytes(2, "little") + b"\0" * pad
    return info


@dataclass(frozen=True)
class Streamed:
    """An ``.npz`` member written chunk by chunk: its ``shape``, its row blocks ``chunks`` and its ``dtype``."""

    shape: tuple
    chunks: Iterable[np.ndarray]
    dtype: object = np.float32


def save_npz_streamed(path: str | os.PathLike, arrays: dict, name: str, shape: tuple, chunks: Iterable[np.ndarray],
                      dtype=np.float32, *, verified: bool = True) -> Path:
    """An ``.npz`` (readable by ``np.load``) with ``arrays`` plus member ``name`` of ``shape`` written
    chunk by chunk from ``chunks`` (row blocks), atomically: never more than a chunk in memory.

    A value of ``arrays`` is an array, or a :class:`Streamed` member, written chunk by chunk too.
    ``verified``: with its checksum sidecar (:mod:`vslib.integrity`; the CRC is read back through a
    256 KB buffer, so the writer's memory stays bounded by a chunk).
    """
    fingerprint = None
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as raw, zipfile.ZipFile(raw, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
            for key, arr in [*arrays.items(), (name, Streamed(tuple(shape), chunks, dtype))]:
                if not isinstance(arr, Streamed):
                    with zf.open(f"{key}.npy", "w", force_zip64=True) as f:
                        np.lib.format.write_array(f, np.asanyarray(arr), allow_pickle=False)
                    continue
                dt = np.dtype(arr.dtype).newbyteorder("<")
                with zf.open(_aligned_member(zf, f"{key}.npy"), "w", force_zip64=True) as f:
                    header = {"descr": np.lib.format.dtype_to_descr(dt), "fortran_order": False,
                              "shape": tuple(arr.shape)}
                    np.lib.format.write_array_header_1_0(f, header)
                    rows = 0
                    for chunk in arr.chunks:
                        chunk = np.ascontiguousarray(chunk, dtype=dt)
                        f.write(memoryview(chunk).cast("B"))  # no bytes copy of the chunk
                        rows += len(chunk)
                    if rows != arr.shape[0]:
                        raise ValueError(f"{path}: {rows} rows streamed for a member of {arr.shape[0]}")
        if verified:
            fingerprint = digest(tmp, block=DIGEST_BLOCK)
    if verified:
        record(path, fingerprint)
    return Path(path)


def verify_file(path: Path, *, full: bool, redo: str) -> str:
    """:func:`vslib.integrity.verify`, the CRC read through :data:`DIGEST_BLOCK`'s small buffer (readers of the feature
    file keep their memory at a batch of rows)."""
    status = verify(path, full=False, redo=redo)
    if full and status == "ok":
        if digest(path, block=DIGEST_BLOCK)["crc32"] != (read_record(path) or {}).get("crc32"):
            raise DamagedFile(path, "its content changed since it was written (checksum mismatch)", redo)
    return status


def text_member(column: pd.Series) -> Streamed:
    """A text column as a streamed fixed-width ``U`` member, :data:`STREAM_ROWS` rows made at a time
    (the whole column as ``U`` takes 4 bytes a character of its longest value, a row)."""
    if not pd.api.types.is_string_dtype(column):
        column = column.astype(str)
    width = max(1, int(column.str.len().max())) if len(column) else 1
    n = len(column)
    return Streamed((n,), (np.asarray(column.iloc[i:i + STREAM_ROWS].astype(str).tolist(), dtype=f"<U{width}")
                           for i in range(0, n, STREAM_ROWS)), f"<U{width}")


def read_rows(array: np.ndarray, start: int, stop: int) -> np.ndarray:
    """Rows ``start:stop`` of a (memory-mapped) 2-d array as an in-memory copy, read with a plain file read."""
    if isinstance(array, np.memmap) and array.flags.c_contiguous and array.filename:
        row = array.shape[1] * array.dtype.itemsize
        out = np.fromfile(array.filename, dtype=array.dtype, count=(stop - start) * array.shape[1],
                          offset=array.offset + start * row)
        return out.reshape(stop - start, array.shape[1]).astype(np.float32, copy=False)
    return np.array(array[start:stop], dtype=np.float32)


def checked_vectors(vectors: np.ndarray, where, redo: str) -> np.ndarray:
    """``vectors`` after :func:`~vslib.integrity.check_unit_vectors`: a :class:`~vslib.integrity.DamagedFile` naming
    file ``where`` (and saying ``redo``) if they are not finite and unit length."""
    try:
        check_unit_vectors(vectors, str(where))
    except ValueError as e:
        raise DamagedFile(where, str(e).split(": ", 1)[-1], redo) from None
    return vectors
