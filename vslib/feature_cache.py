"""The feature cache: append-only shards of ``content_hash -> vector`` for one backbone, read out of core.

:func:`vslib.extraction.extract` writes each finished batch at once as a new shard
``<features_dir>/shards/*.npz`` (:data:`SHARDS_DIR`; written to a temporary file, then renamed),
keyed by image content hash; every shard records the backbone (and its weights), so vectors of
different backbones never mix. Opening the cache reads only the small ``hashes`` member of each shard,
never a vector; a lookup memory-maps the shards it needs and reads just the requested rows
(:mod:`vslib.npzfile`); :meth:`FeatureCache.compact` merges the shards chunk by chunk.

What is checked (:mod:`vslib.integrity`): every vector is checked finite and unit length before a shard
is written (:meth:`FeatureCache.add`: nothing is cached otherwise); a shard gets a checksum sidecar
(``<name>.sum``: size, CRC-32 and its image count); on opening, every shard's size is checked against it
(its CRC too with ``full=True``, and the vectors of a shard without a checksum), and a damaged shard is
set aside (``*.damaged``, one warning line naming it and its image count): its images count as not
cached. Rows read from a shard are checked finite and unit length as they are read.
"""
from __future__ import annotations

import logging
import os
import time
import uuid
import zipfile
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import pandas as pd

from vslib import npzfile
from vslib.atomic import TEMP_GLOB, atomic_savez
from vslib.errors import VisualSearchError
from vslib.integrity import SIDECAR, DamagedFile, check_unit_vectors, read_record, record, set_aside, sidecar
from vslib.npzfile import Streamed, checked_vectors, npz_member, read_rows, save_npz_streamed, verify_file

log = logging.getLogger("vslib.features")  # the feature store's logger: its warning lines read as they always did

#: folder of the shards under ``features_dir``
SHARDS_DIR = "shards"


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
        :func:`vslib.extraction.extract` computes them again.
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
        status = verify_file(p, full=self.full, redo=redo)
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
        atomic_savez(path, hashes=key_text(keys), vectors=vectors,
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
        :data:`~vslib.npzfile.STREAM_ROWS` at a time, shard by shard in the order they were written.
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
        step = npzfile.STREAM_ROWS
        text = Streamed((n,), (key_text(keys[i:i + step]) for i in range(0, n, step)),
                        f"<U{max(1, keys.dtype.itemsize)}")
        chunks = (self.rows(codes[i:i + step]) for i in range(0, n, step))
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
        vectors = read_rows(self._vectors_of(shard), start, stop)
        return checked_vectors(vectors, self.shards[shard], "rerun `visualsearch extract`: it sets the shard aside "
                                                            "and re-extracts its images")


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
