"""Feature vectors of every manifest image, computed once and cached on disk.

``visualsearch extract -c application.yaml`` runs :func:`extract`:

* images are decoded and resized by :func:`vslib.images.load_for_model` in a
  thread pool (Pillow releases the GIL) a few batches ahead of the model, which
  runs batched on the backbone's runtime (TensorFlow Lite on a CPU, which also
  releases the GIL while it computes; see :mod:`vslib.runtime`);
* each finished batch is written at once as a new shard
  ``<features_dir>/shards/*.npz`` (written to a temporary file, then renamed),
  keyed by image content hash. A run that is killed keeps every finished batch;
  a rerun computes only the hashes no shard holds. ``features_dir`` is per
  backbone and every shard records the backbone (and its weights), so vectors
  of different backbones never mix. The runtime is not part of the key: a
  runtime is used only if its vectors agree with the Keras model's to cosine
  >= 0.9999, so shards computed on either serve both;
* with ``compute.scheduler: dask`` the images still to compute are cut into
  partitions that run as tasks on a Dask cluster (:mod:`vslib.compute`); each
  finished partition is written as a shard the same way;
* the result, vectors plus the manifest rows they belong to (path, label,
  split, content_hash), is written to ``<features_dir>/features-<dataset>.npz`` and read
  back whole by :func:`load_features`, one split at a time by :func:`read_split`, or in
  batches of rows by :func:`iter_features`.

Out of core: shards and feature files are uncompressed ``.npz`` files (``np.savez``
writes every member as a stored ``.npy``), so a reader memory-maps a member in place
(:func:`npz_memmap`) and reads only the rows it slices. The cache learns its known hashes
from the small ``hashes`` member of each shard without reading any vector; merging shards
and writing the feature file stream the vectors chunk by chunk (:func:`save_npz_streamed`),
so neither holds a dataset's vectors in memory.

What is checked, and when (:mod:`vslib.integrity`; designed for 100M images, where a shard or
the feature file is ~0.5 TB and a CRC pass costs what reading it costs):

* **written**: every vector is checked finite and unit length before a shard is written
  (:meth:`FeatureCache.add`: a backbone output that fails is an error naming the image's
  content hash, and nothing is cached); shards and the feature file get a checksum sidecar
  (``<name>.sum``: size and CRC-32);
* **extract**: reads every shard whole anyway (it merges them and streams every vector
  into the feature file), so it checks every shard's CRC on opening the cache
  (``FeatureCache(full=True)``), and the vectors of a shard without a checksum (an older
  version's); a damaged shard is set aside (``*.damaged``, one warning line naming it and
  its image count) and its images count as not cached, so this run computes exactly those
  again. Rows read from a shard are checked finite and unit length as they are read. An
  existing feature file that fails its check is set aside before it is rewritten;
* **the feature file, on every open** (:func:`iter_features`, :func:`read_split`,
  :func:`feature_columns`): its size against its checksum file (a ``stat``), and its CRC
  too when it is at most :data:`FULL_CHECK_BYTES` (256 MB, ~50,000 images: a fraction of
  a second); :func:`load_features`, which reads it whole, always checks the CRC. Every
  row read is checked finite and unit length (a garbled block of vectors shows there
  even where the CRC was not read). A damaged file is one line
  (:class:`~vslib.integrity.DamagedFile`, exit 2) naming it and saying that the next
  ``extract`` (or ``run``) rewrites it from the cache; a file checked once is not checked
  again by the same process while it is the same file;
* **on demand**: :func:`audit` (``visualsearch check``) checks every shard and the
  feature file fully (CRC and every vector), whatever their size.

Images that fail to load are counted as skipped and listed with their reasons.
A run holds the lock of ``features_dir`` (:mod:`vslib.locks`): a second run at the
same time waits for it, then finds everything computed.
"""
from __future__ import annotations

import collections
import logging
import os
import time
import uuid
import zipfile
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional, Sequence

import numpy as np
import pandas as pd

from vslib.atomic import TEMP_GLOB, atomic_path, atomic_savez
from vslib.errors import VisualSearchError
from vslib.integrity import (SIDECAR, DamagedFile, Finding, audit_file, check_unit_vectors, read_record, record,
                             set_aside, sidecar, verify)
from vslib.images import DEFAULT_MAX_PIXELS, ImageError, load_for_model
from vslib.locks import locked

log = logging.getLogger(__name__)

#: columns of :attr:`FeatureSet.table`
TABLE_COLUMNS = ("path", "label", "split", "content_hash")
FEATURES_FILE = "features-{dataset}.npz"
SHARDS_DIR = "shards"


#: feature files up to this size are CRC-checked on every open; larger ones by size (and their rows as read)
FULL_CHECK_BYTES = 256 << 20
#: what the next run does about a damaged feature file
REWRITE = "the next `visualsearch extract` (or `run`) rewrites it from the feature cache"


class QueryImageError(ImageError, VisualSearchError):
    """A query image cannot be used (the CLI prints it without a traceback)."""


# ---------------------------------------------------------------------------
# Feature sets


@dataclass
class FeatureSet:
    """L2-normalised vectors and the manifest rows they belong to, row for row.

    Attributes
    ----------
    vectors : ndarray of float32, shape (n, dim)
    table : DataFrame with columns path, label, split, content_hash
    backbone : str
        Name of the backbone that computed the vectors.
    stats : dict
        Of the :func:`extract` run that produced it (images, computed, reused, skipped, seconds).
    skipped : DataFrame
        Images that could not be loaded, with ``path`` and ``reason``.
    """

    vectors: np.ndarray
    table: pd.DataFrame
    backbone: str
    stats: dict = field(default_factory=dict, repr=False)
    skipped: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=["path", "reason"]), repr=False)

    def __post_init__(self):
        self.vectors = np.ascontiguousarray(self.vectors, dtype=np.float32)
        if self.vectors.ndim != 2 or len(self.vectors) != len(self.table):
            raise ValueError(f"vectors {self.vectors.shape} do not match the table's {len(self.table)} rows")
        self.table = self.table.reset_index(drop=True)

    def __len__(self) -> int:
        return len(self.table)

    @property
    def dim(self) -> int:
        return self.vectors.shape[1]

    @property
    def labels(self) -> np.ndarray:
        return self.table["label"].to_numpy()

    def split(self, name: str) -> "FeatureSet":
        """The rows of split ``name`` ('index' or 'query')."""
        mask = (self.table["split"] == name).to_numpy()
        return FeatureSet(self.vectors[mask], self.table[mask], self.backbone, dict(self.stats), self.skipped)

    def save(self, path: str | os.PathLike) -> Path:
        """Write vectors and table to one ``.npz`` file, atomically, with its checksum sidecar (the vectors are
        checked finite and unit length first: ``ValueError`` naming the first bad image, nothing written)."""
        path = Path(path)
        check_unit_vectors(self.vectors, f"{path}: vectors to write", names=self.table["path"].to_numpy())
        _atomic_savez(path, vectors=self.vectors, backbone=np.array(self.backbone), verified=True,
                      **_table_arrays(self.table))
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "FeatureSet":
        with np.load(path, allow_pickle=False) as z:
            table = pd.DataFrame({c: z[c].astype(object) for c in TABLE_COLUMNS})
            return cls(z["vectors"], table, str(z["backbone"]))


def _table_arrays(table: pd.DataFrame) -> dict:
    return {c: table[c].astype(str).to_numpy(dtype=str) for c in TABLE_COLUMNS}


_atomic_savez = atomic_savez  # the shared atomic writer (vslib.atomic)

#: rows per chunk when vectors are streamed (merging shards, writing a feature file)
STREAM_ROWS = 2048  # 10 MB of 1280-d float32: a few such buffers at once whatever the collection's size


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
            fingerprint = _digest(tmp)
    if verified:
        record(path, fingerprint)
    return Path(path)


def _verify(path: Path, *, full: bool, redo: str) -> str:
    """:func:`vslib.integrity.verify`, the CRC read through :func:`_digest`'s small buffer (readers of the feature
    file keep their memory at a batch of rows)."""
    status = verify(path, full=False, redo=redo)
    if full and status == "ok":
        if _digest(path)["crc32"] != (read_record(path) or {}).get("crc32"):
            raise DamagedFile(path, "its content changed since it was written (checksum mismatch)", redo)
    return status


def _digest(path: Path, block: int = 256 << 10) -> dict:
    """:func:`vslib.integrity.digest` read through one ``block``-byte buffer (it reads 8 MB ``bytes`` at a time)."""
    buf = bytearray(block)
    view = memoryview(buf)
    crc = size = 0
    with open(path, "rb", buffering=0) as f:
        while True:
            n = f.readinto(buf)
            if not n:
                break
            crc = zlib.crc32(view[:n], crc)
            size += n
    return {"size": size, "crc32": f"{crc:08x}"}


def text_member(column: pd.Series) -> Streamed:
    """A text column as a streamed fixed-width ``U`` member, :data:`STREAM_ROWS` rows made at a time
    (the whole column as ``U`` takes 4 bytes a character of its longest value, a row)."""
    if not pd.api.types.is_string_dtype(column):
        column = column.astype(str)
    width = max(1, int(column.str.len().max())) if len(column) else 1
    n = len(column)
    return Streamed((n,), (np.asarray(column.iloc[i:i + STREAM_ROWS].astype(str).tolist(), dtype=f"<U{width}")
                           for i in range(0, n, STREAM_ROWS)), f"<U{width}")


# ---------------------------------------------------------------------------
# The content-hash cache


class FeatureCache:
    """Append-only shards of ``content_hash -> vector`` for one backbone, read out of core.

    Opening the cache reads only each shard's ``hashes`` member (and its backbone
    and key), never its vectors: :meth:`get` memory-maps the shards it needs and
    reads just the requested rows.

    Parameters
    ----------
    directory : path
        Folder of the shards (``<features_dir>/shards``).
    backbone : str
        Backbone name stored in, and checked against, every shard.
    key : str
        Identity of the backbone's weights; shards with another key are ignored.
    full : bool
        Check every shard's checksum on opening (default: only its size). A damaged shard
        is set aside as ``<name>.damaged`` and its images count as not cached, so
        :func:`extract` computes them again.
    """

    def __init__(self, directory: str | os.PathLike, backbone: str, key: str, *, full: bool = False):
        self.directory = Path(directory)
        #: check each shard's CRC on opening (extraction reads every shard whole anyway), not just its size
        self.full = full
        #: shards found damaged on opening, set aside (``*.damaged``): their images count as not cached
        self.damaged: list[Path] = []
        self.backbone = backbone
        self.key = key
        # the index: content hashes as bytes, sorted, and beside each its shard number << 32 | row. Numpy
        # arrays, not a dict of str: ~72 bytes an image where a dict of str took ~190 (issue 17: the client's
        # memory must not grow with the collection)
        self._keys = np.zeros(0, "S1")
        self._codes = np.zeros(0, np.int64)
        self._pending: list[tuple[np.ndarray, np.ndarray]] = []  # shards added since the last lookup
        self._maps: dict[int, np.ndarray] = {}
        self.shards: list[Path] = []
        self.foreign: list[Path] = []
        self._read()

    def _read(self) -> None:
        if not self.directory.exists():
            return
        for p in sorted(self.directory.glob("*.npz")):
            try:
                self._verify(p)
                with np.load(p, allow_pickle=False) as z:  # members are read on access: the vectors are not
                    backbone, key = str(z["backbone"]), str(z["key"])
                    hashes = hash_keys(z["hashes"])
            except DamagedFile as e:
                self._set_aside(p, e.reason)
                continue
            except (OSError, ValueError, KeyError, zipfile.BadZipFile) as e:  # a torn file cannot happen (atomic rename)
                self._set_aside(p, f"unreadable: {e}")
                continue
            if backbone != self.backbone or key != self.key:
                log.warning("ignoring feature shard %s: computed by %s (%s), not %s (%s)",
                            p, backbone, key, self.backbone, self.key)
                self.foreign.append(p)
                continue
            self._remember(p, hashes)

    def _set_aside(self, p: Path, reason: str) -> None:
        """Rename damaged shard ``p`` to ``*.damaged`` (its images then count as not cached) with one warning line."""
        try:
            count = f"{len(npz_member(p, 'hashes'))} "  # the index member may well be intact
        except Exception:  # noqa: BLE001 - any failure to read a damaged file: the count is only informative
            try:
                count = f"{int((read_record(p) or {})['images'])} "  # noted in its checksum file when written
            except (KeyError, ValueError, TypeError, DamagedFile):
                count = ""
        moved = set_aside(p)
        redo = "this run re-extracts those its manifest uses" if self.full else \
            "the next `visualsearch extract` re-extracts those its manifest uses"
        log.warning("%s: damaged feature shard (%s); set aside as %s, its %simages count as not cached: %s",
                    p, reason, moved.name if moved else "-", count, redo)
        self.damaged.append(p)

    def _verify(self, p: Path) -> None:
        """Raise DamagedFile unless shard ``p`` is the file written (CRC, when ``full``) and, without a checksum
        (an older version wrote it), unless its vectors are finite and unit length."""
        redo = "its images are re-extracted by this run" if self.full else "the next `visualsearch extract` " \
            "sets it aside and re-extracts its images"
        status = _verify(p, full=self.full, redo=redo)
        if status == "unverified" and self.full:
            try:
                check_unit_vectors(npz_member(p, "vectors"), str(p))
            except ValueError as e:
                raise DamagedFile(p, str(e).split(": ", 1)[-1], redo) from None
            except (OSError, KeyError, zipfile.BadZipFile) as e:
                raise DamagedFile(p, f"unreadable: {e}", redo) from None

    def _remember(self, path: Path, keys: np.ndarray) -> None:
        n = len(self.shards)
        self.shards.append(path)
        self._pending.append((keys, (n << 32) | np.arange(len(keys), dtype=np.int64)))

    def _index(self) -> tuple[np.ndarray, np.ndarray]:
        """The sorted keys and their codes, with the shards added since the last call merged in (one sort)."""
        if self._pending:
            keys = np.concatenate([self._keys, *(k for k, _ in self._pending)])
            codes = np.concatenate([self._codes, *(c for _, c in self._pending)])
            self._pending = []
            order = np.lexsort((codes, keys))  # by hash, then by shard and row
            keys, codes = keys[order], codes[order]
            last = np.append(keys[1:] != keys[:-1], True)  # a hash in two shards: the later one, as on disk
            self._keys, self._codes = keys[last], codes[last]
        return self._keys, self._codes

    def codes(self, hashes) -> np.ndarray:
        """Where each of ``hashes`` is (shard number << 32 | row), -1 for a hash not in the cache."""
        keys, codes = self._index()
        q = hash_keys(hashes)
        if not len(keys) or not len(q):
            return np.full(len(q), -1, np.int64)
        i = np.minimum(np.searchsorted(keys, q), len(keys) - 1)
        return np.where(keys[i] == q, codes[i], -1)

    def contains(self, hashes) -> np.ndarray:
        """One bool per hash: is its vector in the cache?"""
        return self.codes(hashes) >= 0

    def __contains__(self, content_hash: str) -> bool:
        return bool(self.contains([content_hash])[0])

    def __len__(self) -> int:
        return len(self._index()[0])

    def hashes(self) -> np.ndarray:
        """The known content hashes as UTF-8 bytes, sorted (no vector is read)."""
        return self._index()[0]

    def add(self, hashes, vectors: np.ndarray, names: Optional[Sequence] = None) -> Path:
        """Write one batch as a new shard (atomically, with its checksum) and remember it.

        Every vector is checked finite and unit length first; one that is not is a
        :class:`~vslib.errors.VisualSearchError` naming its image (``names``, row for row:
        the images' paths; default their content hashes) and nothing is written."""
        name = f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:8]}.npz"
        path = self.directory / name
        keys = hash_keys(hashes)
        vectors = np.asarray(vectors, np.float32)
        try:
            check_unit_vectors(vectors, f"the {self.backbone} backbone's output",
                               names=key_text(keys) if names is None else names)
        except ValueError as e:  # never written: a NaN in the cache would be reused by every later run
            raise VisualSearchError(f"{e}; not cached. The model or its converted file may be broken: delete "
                                    f"models/backbones/{self.backbone}-* and rerun") from None
        _atomic_savez(path, hashes=key_text(keys), vectors=vectors,
                      backbone=np.array(self.backbone), key=np.array(self.key), verified=True)
        _note_images(path, len(keys))
        self._remember(path, keys)
        return path

    def _vectors_of(self, shard: int) -> np.ndarray:
        if shard not in self._maps:
            self._maps[shard] = npz_member(self.shards[shard], "vectors")
        return self._maps[shard]

    @property
    def dim(self) -> Optional[int]:
        """Vector dimension (from the first shard's header), None when empty."""
        return int(self._vectors_of(0).shape[1]) if self.shards else None

    def compact(self) -> None:
        """Merge all shards into one (then delete the old ones and any foreign shards).

        The vectors and hashes are streamed from the shards into the new one,
        :data:`STREAM_ROWS` at a time, shard by shard in the order they were written.
        """
        for p in self.directory.glob(f"*.npz{SIDECAR}"):  # sidecars whose shard is gone (merged by an older version)
            if not p.with_suffix("").exists():
                p.unlink(missing_ok=True)
        if len(self.shards) <= 1 and not self.foreign:
            return
        old = self.shards + self.foreign
        keys, codes = self._index()
        order = np.argsort(codes, kind="stable")  # shard by shard, row by row: runs of rows to read
        keys, codes = keys[order], codes[order]
        n = len(keys)
        name = f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:8]}.npz"
        merged = self.directory / name
        text = Streamed((n,), (key_text(keys[i:i + STREAM_ROWS]) for i in range(0, n, STREAM_ROWS)),
                        f"<U{max(1, keys.dtype.itemsize)}")
        chunks = (self.rows(codes[i:i + STREAM_ROWS]) for i in range(0, n, STREAM_ROWS))
        save_npz_streamed(merged, dict(hashes=text, backbone=np.array(self.backbone), key=np.array(self.key)),
                          "vectors", (n, self.dim or 0), chunks)
        _note_images(merged, n)
        self.shards, self._maps, self._pending = [], {}, []
        self._keys, self._codes = np.zeros(0, "S1"), np.zeros(0, np.int64)
        self._remember(merged, keys)
        for p in old:
            if p != merged:
                sidecar(p).unlink(missing_ok=True)  # first: a crash between leaves no sidecar of a missing shard
                p.unlink(missing_ok=True)

        self.foreign = []
        # temporary files of runs killed while writing (an hour old: surely not being written now)
        for p in self.directory.glob(TEMP_GLOB):
            try:
                if time.time() - p.stat().st_mtime > 3600:
                    p.unlink()
            except OSError as e:
                log.debug("could not remove %s: %s", p, e)

    def get(self, hashes) -> np.ndarray:
        """Vectors of ``hashes`` (row for row); KeyError names a hash that is not in the cache."""
        codes = self.codes(hashes)
        if (codes < 0).any():
            missing = str(key_text(hash_keys(hashes)[[int(np.argmax(codes < 0))]])[0])
            raise KeyError(f"content hash {missing!r} is not in the feature cache {self.directory}")
        return self.rows(codes)

    def rows(self, codes: np.ndarray) -> np.ndarray:
        """Vectors at ``codes`` (from :meth:`codes`), row for row, read run by run of consecutive rows with plain
        file reads: never through the memory map, whose pages would stay in this process's memory (growing
        with the collection)."""
        codes = np.asarray(codes, np.int64)
        if len(codes) and (np.diff(codes) == 1).all():  # one run of rows in one shard (the usual case)
            return self._shard_rows(int(codes[0] >> 32), int(codes[0] & 0xFFFFFFFF), int(codes[-1] & 0xFFFFFFFF) + 1)
        out = np.empty((len(codes), self.dim or 0), np.float32)
        order = np.argsort(codes, kind="stable")
        ordered = codes[order]
        cuts = np.flatnonzero(np.diff(ordered) != 1) + 1
        for a, b in zip(np.r_[0, cuts], np.r_[cuts, len(ordered)]):
            shard, row = int(ordered[a] >> 32), int(ordered[a] & 0xFFFFFFFF)
            out[order[a:b]] = self._shard_rows(shard, row, row + int(b - a))
        return out

    def _shard_rows(self, shard: int, start: int, stop: int) -> np.ndarray:
        """Rows ``start:stop`` of one shard, checked finite and unit length (:class:`DamagedFile` naming the shard)."""
        vectors = _read_rows(self._vectors_of(shard), start, stop)
        return _checked(vectors, self.shards[shard], "rerun `visualsearch extract`: it sets the shard aside and "
                                                     "re-extracts its images")


def _note_images(path: Path, n: int) -> None:
    """Add the shard's image count to its checksum file (a damaged shard's warning says how many images it held)."""
    fp = read_record(path)
    if fp is not None:
        record(path, {**fp, "images": int(n)})


def hash_keys(hashes) -> np.ndarray:
    """Content hashes as a NumPy bytes array (UTF-8; a byte a character where ``U`` takes four, a str ~50 more)."""
    a = hashes if isinstance(hashes, np.ndarray) else np.asarray(
        hashes if isinstance(hashes, (list, tuple, pd.Series, pd.Index)) else list(hashes), dtype=object)
    if a.dtype.kind == "S":
        return a
    if not len(a):
        return np.zeros(0, "S1")
    try:
        return a.astype("S")
    except UnicodeEncodeError:
        return np.char.encode(a.astype(str), "utf-8")


def key_text(keys: np.ndarray) -> np.ndarray:
    """:func:`hash_keys` back to text (``U``), as shards and feature files store them."""
    return np.char.decode(keys, "utf-8") if len(keys) else np.zeros(0, "U1")


# ---------------------------------------------------------------------------
# The pipeline


class RowValues(Sequence):
    """The values of ``column`` at ``rows``, made into Python objects only when asked, a slice at a time
    (a list of every image's path would grow with the collection)."""

    def __init__(self, column: pd.Series, rows: np.ndarray):
        self.column, self.rows = column, np.asarray(rows, np.int64)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return self.column.iloc[self.rows[i]].tolist()
        return self.column.iloc[int(self.rows[i])]

    def __iter__(self):
        for s in range(0, len(self.rows), STREAM_ROWS):
            yield from self[s:s + STREAM_ROWS]


def _workers(n: int) -> int:
    return n if n and n > 0 else (os.cpu_count() or 1)


def iter_batches(sources: Sequence, size: int, batch_size: int, *, workers: int = 0,
                 max_pixels: int = DEFAULT_MAX_PIXELS, prefetch_batches: int = 2
                 ) -> Iterator[tuple[list[int], np.ndarray, list[tuple[int, str]]]]:
    """Decode and resize ``sources`` in a thread pool, ``prefetch_batches`` batches ahead.

    Yields ``(positions, uint8 batch, failures)``: the positions in ``sources``
    of the images in the batch, the images, and ``(position, reason)`` of those
    in this stretch that could not be loaded.
    """
    def load(src):
        try:
            return load_for_model(src, size, max_pixels=max_pixels), None
        except ImageError as e:
            return None, e.reason

    ahead = batch_size * (prefetch_batches + 1)
    with ThreadPoolExecutor(max_workers=_workers(workers), thread_name_prefix="decode") as pool:
        pending: collections.deque = collections.deque()
        it = iter(enumerate(sources))

        def fill():
            while len(pending) < ahead:
                try:
                    i, src = next(it)
                except StopIteration:
                    return
                pending.append((i, pool.submit(load, src)))

        fill()
        while pending:
            pos, imgs, failed = [], [], []
            while pending and len(imgs) < batch_size:
                i, fut = pending.popleft()
                img, reason = fut.result()
                if img is None:
                    failed.append((i, reason))
                else:
                    pos.append(i)
                    imgs.append(img)
                fill()
            batch = np.stack(imgs) if imgs else np.zeros((0, size, size, 3), np.uint8)
            yield pos, batch, failed


def embed_images(backbone, images: Iterable, *, batch_size: int = 32, workers: int = 0,
                 max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """L2-normalised float32 vectors ``(n, dim)`` of query images (paths, PIL images or arrays).

    Raises
    ------
    QueryImageError
        If an image cannot be loaded (the message names it and says why).
    """
    images = list(images)
    out = np.zeros((len(images), backbone.dim), np.float32)
    for pos, batch, failed in iter_batches(images, backbone.input_size, batch_size, workers=workers,
                                           max_pixels=max_pixels):
        if failed:
            i, reason = failed[0]
            src = images[i] if isinstance(images[i], (str, os.PathLike)) else f"image #{i}"
            raise QueryImageError(src, reason)
        if pos:
            out[pos] = backbone.embed(batch)
    return out


def _progress(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="img", disable=not enabled, smoothing=0.1, dynamic_ncols=True)


@locked(lambda cfg: cfg.features_dir, lambda cfg: f"the {cfg.backbone.name} feature cache {cfg.features_dir}")
def extract(cfg, *, progress: bool = True, manifest: Optional[pd.DataFrame] = None,
            on_batch: Optional[Callable[[int, int], None]] = None, backbone=None) -> FeatureSet:
    """Vectors of every usable manifest image, computing only what the cache lacks.

    Parameters
    ----------
    cfg : Config
    progress : bool
        Show a progress bar (images/s).
    manifest : DataFrame, optional
        Rows to embed (default: :func:`vslib.datasets.load_manifest`).
    on_batch : callable, optional
        Called as ``on_batch(batches_done, images_done)`` after each batch (with
        ``compute.scheduler: dask``, each partition) is safely on disk.
    backbone : Backbone, optional
        Default: :func:`vslib.backbones.backbone_from_config`. Given, it runs
        here, in this process, whatever ``compute.scheduler`` says.

    Returns
    -------
    FeatureSet
        Also written to :func:`features_path`; ``stats`` holds
        the figures of this run and ``skipped`` the images that failed to load.
    """
    from vslib.backbones import backbone_from_config, config_weights_key
    from vslib.registry import BACKBONES

    t0 = time.perf_counter()
    if manifest is None:
        from vslib.datasets import load_manifest

        manifest = load_manifest(cfg, columns=TABLE_COLUMNS)  # the rest (sizes, checks) is not needed here
    if "status" in manifest.columns:
        manifest = manifest[manifest["status"] == "ok"]
    manifest = manifest.reset_index(drop=True)
    missing_cols = [c for c in TABLE_COLUMNS if c not in manifest.columns]
    if missing_cols:
        raise VisualSearchError(f"manifest lacks columns {missing_cols}; run `visualsearch data prepare "
                                f"-c {cfg.source} --force`")
    name = backbone.name if backbone is not None else cfg.backbone.name
    if name != cfg.backbone.name:
        raise VisualSearchError(f"backbone {name!r} given but the config names {cfg.backbone.name!r}")
    key = backbone_key(backbone) if backbone is not None else config_weights_key(cfg)
    cache = FeatureCache(cfg.features_dir / SHARDS_DIR, name, key, full=True)

    # one representative file (its first row) per content hash still to compute; per-image data stays in
    # NumPy arrays and the manifest's own columns, not in Python lists of str (issue 17: the client's memory)
    keys = hash_keys(manifest["content_hash"])
    first = np.sort(np.unique(keys, return_index=True)[1])
    todo_rows = first[~cache.contains(keys[first])]
    todo = keys[todo_rows]
    reused = len(first) - len(todo)
    on_dask = getattr(cfg, "compute", None) is not None and cfg.compute.scheduler == "dask" and backbone is None
    # build the model (seconds: TensorFlow) only when there is something to compute here
    bb = backbone
    if bb is None and len(todo) and not on_dask:
        bb = backbone_from_config(cfg)
    if bb is not None and backbone_key(bb) != key:
        raise VisualSearchError(f"backbone weights {backbone_key(bb)} differ from the configured {key}")
    failed_hashes: dict[str, str] = {}
    computed = 0
    bs = cfg.backbone.batch_size
    bar = _progress(len(todo), f"extract {name}", progress)
    if reused:
        bar.set_postfix(reused=reused)
    batches = 0

    def store(pos, vecs, failed):  # one finished batch (or Dask partition): on disk at once
        nonlocal computed, batches
        for i, reason in failed:
            failed_hashes[todo[i].decode()] = reason
        if pos:
            cache.add(todo[np.asarray(pos)], vecs, RowValues(manifest["path"], todo_rows[np.asarray(pos)]))
            computed += len(pos)
        batches += 1
        bar.update(len(pos) + len(failed))
        if on_batch is not None:
            on_batch(batches, computed)

    try:
        sources = RowValues(manifest["path"], todo_rows)
        size = bb.input_size if bb is not None else BACKBONES[name]["input_size"]
        if on_dask and len(todo):
            from vslib.compute import extract_on_dask

            extract_on_dask(cfg, sources, key, store, announce=bar.write if progress else None)
            sources = []  # done: skip the in-process loop below
        for pos, batch, failed in iter_batches(sources, size, bs, workers=cfg.backbone.workers,
                                               max_pixels=cfg.dataset.max_image_pixels):
            store(pos, bb.embed(batch) if pos else None, failed)
    finally:
        bar.close()
    if computed or cache.foreign or cache.damaged:
        cache.compact()

    codes = cache.codes(keys)
    ok = codes >= 0
    if ok.all():
        table = manifest[list(TABLE_COLUMNS)]
    else:
        table, codes = manifest.loc[ok, list(TABLE_COLUMNS)].reset_index(drop=True), codes[ok]
    dim = cache.dim or BACKBONES[name]["dim"]
    chunks = (cache.rows(codes[i:i + STREAM_ROWS]) for i in range(0, len(codes), STREAM_ROWS))  # rows checked
    columns = {c: text_member(table[c]) for c in TABLE_COLUMNS}  # made chunk by chunk as written
    _set_aside_damaged_file(features_path(cfg))  # rewritten below in any case; a damaged one is kept for a look
    path = save_npz_streamed(features_path(cfg), dict(backbone=np.array(name), **columns),
                             "vectors", (len(table), dim), chunks)
    skipped_rows = manifest.loc[~ok, ["path", "content_hash"]].copy()
    skipped_rows["reason"] = skipped_rows["content_hash"].map(failed_hashes).fillna("not computed")
    skipped = skipped_rows[["path", "reason"]].reset_index(drop=True)
    seconds = time.perf_counter() - t0
    stats = dict(backbone=name, images=len(manifest), computed=computed, reused=reused,
                 skipped=len(skipped), seconds=round(seconds, 3),
                 images_per_s=round(computed / seconds, 2) if computed else None)
    vectors = npz_member(path, "vectors", "c")  # mapped, copy-on-write: no copy held here
    if not vectors.flags.aligned:  # (written aligned; in case) numeric libraries want aligned data
        vectors = np.array(vectors)
    fs = FeatureSet(vectors, table, name, stats, skipped)
    log.info(summary(fs))
    return fs


def _checked(vectors: np.ndarray, where, redo: str = REWRITE) -> np.ndarray:
    """``vectors`` after :func:`~vslib.integrity.check_unit_vectors` (a DamagedFile naming file ``where`` if they fail)."""
    try:
        check_unit_vectors(vectors, str(where))
    except ValueError as e:
        raise DamagedFile(where, str(e).split(": ", 1)[-1], redo) from None
    return vectors


def _set_aside_damaged_file(path: Path) -> None:
    """Before :func:`extract` rewrites the feature file: one warning line and ``*.damaged`` if it is damaged (a
    cheap check; a file without a checksum, or one whose checksum file is left alone, is simply replaced)."""
    if not path.exists():
        return
    try:
        _verify(path, full=path.stat().st_size <= FULL_CHECK_BYTES, redo="")
    except DamagedFile as e:
        moved = set_aside(path)
        log.warning("%s: damaged feature file (%s); set aside as %s, rewritten from the feature cache by this run",
                    path, e.reason, moved.name if moved else "-")
    except OSError:
        pass


def audit(cfg) -> list[Finding]:
    """Full check of the configured backbone's feature cache (every shard: CRC, vectors finite and unit length; a
    shard whose checksum file is left without it: deleted) and of the dataset's feature file (CRC, every vector,
    table and vectors of one length), as :class:`~vslib.integrity.Finding` s for ``visualsearch check``. Never raises
    for damage; each finding's ``redo`` says what the next ``extract`` (or ``run``) does about it. Reads every byte:
    on demand only, never on the way of a run."""
    out = []
    shards = cfg.features_dir / SHARDS_DIR
    redo = "the next `visualsearch extract` (or `run`) sets it aside and re-extracts its images"
    for p in sorted(shards.glob("*.npz")) if shards.is_dir() else []:
        f = audit_file(p, "feature shard", redo)
        if f.status != "damaged":
            try:
                check_unit_vectors(npz_member(p, "vectors"), str(p))
            except ValueError as e:
                f.status, f.reason = "damaged", str(e).split(": ", 1)[-1]
            except (OSError, KeyError, zipfile.BadZipFile) as e:
                f.status, f.reason = "damaged", f"unreadable: {e}"
        out.append(f)
    for side in sorted(shards.glob(f"*.npz{SIDECAR}")) if shards.is_dir() else []:  # a shard deleted
        shard = side.with_name(side.name[:-len(SIDECAR)])
        if not shard.exists():
            out.append(Finding(str(shard), "feature shard", "damaged", "missing (its checksum file is there)",
                               "the next `visualsearch extract` (or `run`) re-extracts its images"))
    path = features_path(cfg)
    if not path.exists() and not sidecar(path).exists():  # not extracted yet: nothing to check
        return out
    f = audit_file(path, "feature file", REWRITE)
    if f.status != "damaged":
        try:
            vectors = npz_member(path, "vectors")
            check_unit_vectors(vectors, str(path))
            if any(len(npz_member(path, c)) != len(vectors) for c in TABLE_COLUMNS):
                f.status, f.reason = "damaged", "its vectors and table differ in length"
        except ValueError as e:
            f.status, f.reason = "damaged", str(e).split(": ", 1)[-1]
        except (OSError, KeyError, zipfile.BadZipFile) as e:
            f.status, f.reason = "damaged", f"unreadable: {e}"
    out.append(f)
    return out


def summary(fs: FeatureSet, limit: int = 5) -> str:
    """One line of figures, then the skipped images with reasons."""
    s = fs.stats
    line = (f"extract {s.get('backbone', fs.backbone)}: {s.get('images', len(fs))} images, "
            f"{s.get('computed', 0)} computed, {s.get('reused', 0)} reused from cache, "
            f"{s.get('skipped', 0)} skipped, {s.get('seconds', 0):.1f} s")
    if len(fs.skipped):
        lines = [f"  skipped {r.path}: {r.reason}" for r in fs.skipped.head(limit).itertuples()]
        if len(fs.skipped) > limit:
            lines.append(f"  ... and {len(fs.skipped) - limit} more")
        line += "\n" + "\n".join(lines)
    return line


def backbone_key(bb) -> str:
    """Identity of a backbone's weights, stored in every shard."""
    return getattr(bb, "cache_key", "") or f"{bb.name}:{Path(bb.weights).name if bb.weights else ''}"


def features_path(cfg) -> Path:
    """The feature file of ``cfg``'s dataset; shards are shared by datasets (content-keyed)."""
    return cfg.features_dir / FEATURES_FILE.format(dataset=cfg.dataset.name)


def load_features(cfg) -> FeatureSet:
    """The feature set :func:`extract` wrote for ``cfg``'s dataset and backbone, whole and in memory.

    Meant for small data (the explorer, the notebooks, :func:`vslib.evaluate.evaluate_seeds`):
    it holds every vector of the file, and ``.split(name)`` copies a split's rows on top.
    Where one split is enough, :func:`read_split` holds only that split's vectors; to
    touch every row in bounded memory, read batches with :func:`iter_features`; for
    table columns alone, :func:`feature_columns` reads no vector.
    """
    path = _check_features_file(cfg, full=True)  # read whole anyway: its CRC costs one more read
    try:
        fs = FeatureSet.load(path)
    except (OSError, ValueError, KeyError) as e:
        raise VisualSearchError(f"{path} is unreadable ({e}); run `visualsearch extract -c {cfg.source}` again") from None
    if fs.backbone != cfg.backbone.name:
        raise VisualSearchError(f"{path} holds {fs.backbone} vectors, but the config names {cfg.backbone.name}; "
                                f"run `visualsearch extract -c {cfg.source}`")
    _checked(fs.vectors, str(path))
    return fs


#: feature files this process has verified, by path: (inode, size, mtime) and whether the CRC was checked
_VERIFIED: dict[str, tuple[tuple, bool]] = {}


def _check_features_file(cfg, *, full: Optional[bool] = None) -> Path:
    """The feature file, after the checks of every open: its size against its checksum file, and its CRC too
    when ``full`` (default: when it is at most :data:`FULL_CHECK_BYTES`). The rows read are checked finite and
    unit length as they are read; ``visualsearch check`` (:func:`audit`) checks the CRC of any size. A file
    checked once is not checked again by this process while it is the same file (inode, size, mtime)."""
    path = features_path(cfg)
    if not path.exists():  # (audit() names one whose checksum file is left as damaged: written, then lost)
        raise VisualSearchError(f"no features for backbone {cfg.backbone.name} at {path}; run "
                                f"`visualsearch extract -c {cfg.source}` first")
    try:
        st = path.stat()
    except OSError as e:
        raise DamagedFile(path, f"unreadable: {e.strerror or e}", REWRITE) from None
    if full is None:
        full = st.st_size <= FULL_CHECK_BYTES
    ident = (st.st_ino, st.st_size, st.st_mtime_ns)
    seen = _VERIFIED.get(str(path))
    if seen is not None and seen[0] == ident and (seen[1] or not full):
        return path
    _VERIFIED.pop(str(path), None)
    _verify(path, full=full, redo=REWRITE)
    _VERIFIED[str(path)] = (ident, full)
    return path


def iter_features(cfg, split: Optional[str] = None, batch_size: int = 10_000) -> Iterator[FeatureSet]:
    """The feature set of :func:`load_features` in batches of at most ``batch_size`` rows, in file order.

    Out of core: the file's members are memory-mapped and only each batch's rows are
    read (the vectors of a batch are an in-memory copy), so memory stays at one batch
    however large the dataset. ``split`` ('index' or 'query') keeps only that split's rows.
    """
    path = _check_features_file(cfg)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, not {batch_size}")
    try:
        backbone = str(npz_member(path, "backbone")[()])
        columns = {c: npz_member(path, c) for c in TABLE_COLUMNS}
        vectors = npz_member(path, "vectors")
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as e:
        raise VisualSearchError(f"{path} is unreadable ({e}); run `visualsearch extract -c {cfg.source}` again") from None
    if backbone != cfg.backbone.name:
        raise VisualSearchError(f"{path} holds {backbone} vectors, but the config names {cfg.backbone.name}; "
                                f"run `visualsearch extract -c {cfg.source}`")
    n = len(vectors)
    if any(len(col) != n for col in columns.values()):
        raise VisualSearchError(f"{path} is inconsistent (vectors and table differ in length); "
                                f"run `visualsearch extract -c {cfg.source}` again")
    rows: list[np.ndarray] = []
    vecs: list[np.ndarray] = []
    pending = 0

    def flush():
        idx = np.concatenate(rows)
        table = pd.DataFrame({c: columns[c][idx].astype(object) for c in TABLE_COLUMNS})
        return FeatureSet(np.concatenate(vecs) if len(vecs) > 1 else vecs[0], table, backbone)

    # read a block of rows at a time (plain reads: mapped pages would count in the RSS), keep the split's
    for start in range(0, n, batch_size):
        stop = min(start + batch_size, n)
        block = _checked(_read_rows(vectors, start, stop), str(path))
        keep = np.arange(stop - start)
        if split is not None:
            keep = keep[np.asarray(columns["split"][start:stop]) == split]
        while len(keep):
            take = keep[: batch_size - pending]
            keep = keep[len(take):]
            rows.append(take + start)
            vecs.append(block[take])
            pending += len(take)
            if pending == batch_size:
                yield flush()
                rows, vecs, pending = [], [], 0
    if pending:
        yield flush()


#: rows per batch :func:`read_split` reads: a 1280-d batch is 2.6 MB and a few copies of one are alive at once
#: (Fashion-MNIST, 8,000 index rows: peak RSS 69 MB above imports at 512 rows, 102 MB at 2,048)
SPLIT_BATCH_ROWS = 512


def read_split(cfg, split: str, *, batch_size: int = SPLIT_BATCH_ROWS) -> FeatureSet:
    """``load_features(cfg).split(split)``, reading only that split's rows.

    The split's table comes first (:func:`feature_columns`, no vector read), so its rows
    are counted; the vectors are then filled batch by batch from :func:`iter_features`
    into one preallocated array, so the peak is the split's vectors once, its table and a
    few batches, never the whole file. Same checks and errors as :func:`load_features`.
    Use it where one split must be in memory at once (training a head on the index split,
    the evaluation's queries and baselines); use :func:`iter_features` where a pass over
    batches will do (building the index), and :func:`load_features` for small data that
    is used whole.
    """
    from vslib.datasets import SPLITS

    if split not in SPLITS:
        raise ValueError(f"split must be one of {list(SPLITS)}, not {split!r}")
    batches = iter_features(cfg, split, batch_size)
    first = next(batches, None)  # opens and checks the file (missing, unreadable, wrong backbone)
    path = features_path(cfg)
    table = feature_columns(cfg, TABLE_COLUMNS, split)
    hashes = table["content_hash"].to_numpy()
    dim = first.dim if first is not None else npz_member(path, "vectors").shape[1]
    vectors = np.empty((len(table), dim), dtype=np.float32)
    filled = 0

    def put(fs: FeatureSet) -> bool:
        nonlocal filled
        stop = filled + len(fs)
        if stop > len(table) or not np.array_equal(fs.table["content_hash"].to_numpy(), hashes[filled:stop]):
            return False
        vectors[filled:stop] = fs.vectors
        filled = stop
        return True

    ok = first is None or put(first)
    first = None  # the batch is copied: do not hold it
    ok = ok and all(put(fs) for fs in batches)
    if not ok or filled != len(table):  # only if the file was replaced while it was read
        raise VisualSearchError(f"{path} changed while it was read; wait for the `visualsearch extract` that "
                                f"rewrites it to finish, then retry")
    return FeatureSet(vectors, table, cfg.backbone.name)


def _read_rows(array: np.ndarray, start: int, stop: int) -> np.ndarray:
    """Rows ``start:stop`` of a (memory-mapped) 2-d array as an in-memory copy, read with a plain file read."""
    if isinstance(array, np.memmap) and array.flags.c_contiguous and array.filename:
        row = array.shape[1] * array.dtype.itemsize
        out = np.fromfile(array.filename, dtype=array.dtype, count=(stop - start) * array.shape[1],
                          offset=array.offset + start * row)
        return out.reshape(stop - start, array.shape[1]).astype(np.float32, copy=False)
    return np.array(array[start:stop], dtype=np.float32)


def feature_columns(cfg, columns: Sequence[str], split: Optional[str] = None) -> pd.DataFrame:
    """Table columns of the feature file (of one ``split``) without reading any vector."""
    path = _check_features_file(cfg)
    data = {c: npz_member(path, c) for c in set(columns) | ({"split"} if split else set())}
    mask = slice(None) if split is None else np.asarray(data["split"]) == split
    return pd.DataFrame({c: np.asarray(data[c][mask]).astype(object) for c in columns})
