"""Embedded FAISS index: exact inner-product search by default, any FAISS factory by config.

Filtered search is a pre-filter: the allowed rows become an ``IDSelectorBitmap``
that FAISS applies while it searches. When few rows match, or when an
approximate (HNSW, …) search found fewer than k of them, the matching rows are
ranked exactly with numpy instead, so a filter that matches at least k items
always yields k hits.

On disk (``cfg.index_dir``)::

    meta.json            format, dim, factory, count, generation   (written last, atomically)
    g000003/vectors.npy  float32 (count, dim)
    g000003/metadata.parquet   id + one column per metadata field
    g000003/faiss.index  the trained/built FAISS index (non-Flat factories only)

Compressed factories (``HNSW32,SQ8``, ``IVF4096_HNSW32,SQ8``, ``OPQ64,IVF4096,PQ64``
…) keep only codes in RAM. With ``rerank`` > 0 a search asks FAISS for that
many candidates and re-ranks them exactly against the float vectors, which
(``mmap_vectors``) stay in ``vectors.npy`` memory-mapped instead of in RAM once
the index is saved or opened, so RAM holds the codes and links, and the
operating system's page cache holds the float rows searches touch.
:meth:`EmbeddedIndex.memory` says where the bytes are.

A save writes a new generation folder, then replaces ``meta.json`` (which
names it) in one rename, then deletes older generations, so a crash at any
moment leaves the previous or the new state, never a mix. A rebuild
(:meth:`EmbeddedIndex.create_fresh`) starts empty *beside* the live index and
writes its generation only at :meth:`~EmbeddedIndex.publish`: until then searches
answer from the old one, and a rebuild killed at any moment leaves it searchable
(its debris — ``.tmp-*`` folders, generations meta.json does not name — is removed
by the next build or save, under the index folder's lock: a save waits for a running
build, so it never removes a build's work in progress). A searcher in another process
that opened an older generation keeps answering from it after a save removed it: a
Flat index copies the vectors into RAM, and a memory-mapped ``vectors.npy`` stays
readable once unlinked (Linux keeps its pages while they are mapped).

What is verified when: ``meta.json`` records the size and CRC-32 of each file of
its generation, and the generation's name must be ``gNNNNNN`` (never a path). Every
open checks the sizes and shapes; a generation of at most :data:`FULL_CHECK_BYTES`
is also checked by CRC (1.6 GB/s here: 0.1 s at the 256 MB limit), a larger one by
the finiteness and unit norm of :data:`SAMPLE_ROWS` evenly spaced rows;
:func:`audit` (``visualsearch check``) checks everything. Damage is a
:class:`~vslib.integrity.DamagedFile` naming the file; ``visualsearch index`` /
``run`` then rebuild the index from the feature file.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Optional

import numpy as np

from vslib.atomic import TEMP_GLOB, atomic_write_json, ensure_dir
from vslib.integrity import DamagedFile, Finding, check_unit_vectors, digest
from vslib.locks import LOCK_FILE, run_lock
from vslib.memory import release_free_memory
from vslib.errors import environment_fault
from vslib.index.base import (Hit, IndexBackendError, IndexDimensionError, IndexNotFoundError, VectorIndex,
                              exact_search, normalize_filter)

log = logging.getLogger(__name__)

FORMAT = "visualsearch-embedded-1"
#: a generation folder's name: nothing else is ever read (no path traversal through meta.json)
GENERATION = re.compile(r"^g\d{6}$")
#: generations up to this many bytes are CRC-checked on every open; larger ones by a sample of rows
FULL_CHECK_BYTES = 256 << 20
#: rows checked (finite, unit norm) on opening a generation too large for a full check
SAMPLE_ROWS = 4096
#: what the next run does about a damaged embedded index
REBUILD = "the next `visualsearch index` (or `run`) rebuilds the index from the feature file"


def _faiss():
    try:
        import faiss
    except ImportError:  # pragma: no cover - faiss-cpu is a dependency
        raise IndexBackendError("the embedded index needs FAISS: pip install faiss-cpu") from None
    return faiss


def _faiss_fault(error: RuntimeError, path: Path):
    """FAISS's C++ I/O errors arrive as RuntimeError quoting strerror: the fault they name, if any."""
    import errno

    text = str(error)
    for n in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOENT,
              errno.EMFILE, errno.ENFILE, errno.EIO):
        if os.strerror(n) in text:
            return environment_fault(OSError(n, os.strerror(n)), path)
    return None


class EmbeddedIndex(VectorIndex):
    """FAISS index in this process, persisted to a directory (or in memory when ``path`` is None)."""

    name = "embedded"
    max_k = None
    #: below this many matching rows a filtered search ranks them exactly with numpy
    exact_below = 10_000
    #: compact (drop removed rows) when more than this share of the rows is dead
    compact_share = 0.5
    #: quantizers (IVF centroids, SQ ranges, PQ codebooks) are trained on at most this many rows
    train_max = 100_000

    def __init__(self, dim: int, path: Optional[os.PathLike] = None, factory: str = "Flat", ef_search: int = 128,
                 ef_construction: int = 200, *, nprobe: int = 16, rerank: int = 0, mmap_vectors: bool = True):
        super().__init__(dim)
        self.path = Path(path) if path is not None else None
        self.factory = factory
        self.ef_search = int(ef_search)
        self.ef_construction = int(ef_construction)
        #: IVF lists scanned per query (IVF factories only)
        self.nprobe = int(nprobe)
        #: candidates fetched from FAISS and re-ranked exactly with the float vectors (0: no re-ranking)
        self.rerank = int(rerank)
        #: keep the float vectors memory-mapped from disk when FAISS does not hold them (compressed factories)
        self.mmap_vectors = bool(mmap_vectors)
        #: what owns the memory ``_vectors`` views (the FAISS index, or a read-only memmap); None: our own buffer
        self._view_owner = None
        # fail now, naming the factory string, if it is not valid; and learn whether FAISS keeps the floats
        self.stores_floats = _stores_floats(_make_faiss(dim, factory))
        self._vectors = np.empty((0, dim), np.float32)  # capacity buffer; rows [0, _n) are used
        self._n = 0
        self._ids: list[Optional[str]] = []
        self._meta = Metadata()
        self._alive = np.empty(0, bool)
        self._pos: dict[str, int] = {}
        self._faiss = None
        self._columns: dict = {}
        self._filter_cache: dict = {}
        self._dirty = False

    # -- opening -------------------------------------------------------------
    @classmethod
    def open(cls, path: Optional[os.PathLike], dim: Optional[int] = None, *, create: bool = True,
             **options) -> "EmbeddedIndex":
        """Open the index saved in ``path``, or create an empty one.

        ``options`` are the constructor's: factory, ef_search, ef_construction,
        nprobe, rerank, mmap_vectors.

        Raises :class:`IndexNotFoundError` when there is none and ``create`` is
        False, :class:`IndexDimensionError` when the saved vectors are not ``dim``-dimensional.
        """
        meta_file = Path(path) / "meta.json" if path is not None else None
        if meta_file is None or not meta_file.exists():
            if not create:
                raise IndexNotFoundError(f"no embedded index in {path}; build it with `visualsearch index`")
            if dim is None:
                raise IndexBackendError(f"cannot create an embedded index in {path} without knowing the "
                                        "vector dimension (pass dim=...)")
            return cls(dim, path, **options)
        meta = _read_meta(meta_file)
        saved_dim = int(meta["dim"])
        if meta.get("format") != FORMAT:
            raise IndexBackendError(f"{meta_file}: unknown format {meta.get('format')!r} (expected {FORMAT!r}); "
                                    f"delete {path} and rebuild the index")
        if dim is not None and dim != saved_dim:
            raise IndexDimensionError(
                f"the embedded index in {path} holds {saved_dim}-dimensional vectors but the backbone gives "
                f"{dim}-dimensional ones; delete {path} or rebuild it with vslib.index.build(cfg, rebuild=True)")
        self = cls(saved_dim, path, **options)
        try:
            self._load(Path(path) / _generation(meta, meta_file), meta)
        except DamagedFile:
            again = _read_meta(meta_file)  # a rebuild may have switched generations while this one was read
            if again.get("generation") == meta.get("generation"):
                raise
            self = cls(saved_dim, path, **options)
            self._load(Path(path) / _generation(again, meta_file), again)
        return self

    @classmethod
    def create_fresh(cls, cfg, dim: int) -> "EmbeddedIndex":
        """An empty index beside the live one: the live one keeps answering until :meth:`publish`."""
        e = cfg.index.embedded
        fresh = cls(dim, cfg.index_dir, factory=e.factory, ef_search=e.ef_search, ef_construction=e.ef_construction,
                    nprobe=e.nprobe, rerank=e.rerank, mmap_vectors=e.mmap_vectors)
        fresh._staged = True
        return fresh

    def publish(self) -> None:
        """Write the rebuilt index as a new generation and switch meta.json to it (one rename)."""
        self._staged = False
        self._dirty = True
        self.save()

    def discard(self) -> None:
        """Give up a rebuild: nothing of it is written, the live index stays as it was."""
        if getattr(self, "_staged", False):
            self._dirty = False
            self.closed = True
            self._faiss = None

    @classmethod
    def from_config(cls, cfg, dim: Optional[int] = None, *, create: bool = True) -> "EmbeddedIndex":
        e = cfg.index.embedded
        return cls.open(cfg.index_dir, dim, factory=e.factory, ef_search=e.ef_search,
                        ef_construction=e.ef_construction, nprobe=e.nprobe, rerank=e.rerank,
                        mmap_vectors=e.mmap_vectors, create=create)

    def _load(self, folder: Path, meta: dict) -> None:
        import pyarrow.parquet as pq

        _check_files(folder, meta, full=None)
        try:
            vectors = np.load(folder / "vectors.npy", mmap_mode="r")  # copied below only if FAISS lacks them
        except (OSError, ValueError) as e:
            raise DamagedFile(folder / "vectors.npy", f"unreadable: {e}", REBUILD) from None
        try:
            table = pq.read_table(folder / "metadata.parquet")
        except (OSError, ValueError) as e:
            raise DamagedFile(folder / "metadata.parquet", f"unreadable: {e}", REBUILD) from None
        if vectors.shape != (meta["count"], self.dim) or table.num_rows != meta["count"]:
            raise DamagedFile(folder, f"meta.json says {meta['count']} items, found {vectors.shape} vectors and "
                                      f"{table.num_rows} metadata rows", REBUILD)
        # rows whose bytes the CRC (or size) check vouched for were checked before they were written: a sample
        # suffices; a generation of an older version (no checksums) has every row checked
        _check_rows(vectors, folder / "vectors.npy", sample=isinstance(meta.get("files"), dict))
        ids = table.column("id").to_pylist()
        if "_json" in table.column_names:
            metas = Metadata()
            metas.extend(json.loads(j) for j in table.column("_json").to_pylist())
        else:  # column by column: never a dict per item
            metas = Metadata({c: table.column(c).to_pylist() for c in table.column_names if c != "id"}, len(ids))
        del table
        self._vectors = vectors
        self._n = len(ids)
        self._ids, self._meta = ids, metas
        self._alive = np.ones(self._n, bool)
        self._pos = {ident: i for i, ident in enumerate(ids)}
        if meta.get("factory") == self.factory and (folder / "faiss.index").exists():
            faiss = _faiss()
            try:
                self._faiss = faiss.read_index(str(folder / "faiss.index"))
            except RuntimeError as e:
                raise DamagedFile(folder / "faiss.index", f"FAISS cannot read it: {str(e).strip().splitlines()[-1:]}",
                                  REBUILD) from None
            if self._faiss.ntotal != self._n or self._faiss.d != self.dim:
                log.warning("%s does not match the saved vectors; rebuilding it", folder / "faiss.index")
                self._faiss = None
        elif self._n and meta.get("factory") != self.factory:
            log.info("embedded index in %s was built with factory %r; rebuilding it as %r",
                     self.path, meta.get("factory"), self.factory)
            self._dirty = True
        if self._faiss is not None and self._adopt_storage(self._faiss):
            return
        if self.mmap_vectors and not self.stores_floats:
            # compressed codes in RAM, floats on disk (a later save replaces the file but never rewrites it, so
            # the mapping stays valid; Linux keeps a deleted file's pages while they are mapped)
            self._vectors, self._view_owner = vectors, vectors
        else:
            self._vectors = np.array(vectors, dtype=np.float32)  # into memory: the file may be replaced

    # -- the contract ------------------------------------------------------------
    @property
    def exact(self) -> bool:
        return self.factory.strip().lower() in ("flat", "flat,", "idmap,flat")

    def _add(self, ids, vectors, metadata):
        replaced = [self._pos[i] for i in ids if i in self._pos]
        if replaced:
            self._kill(np.asarray(replaced))
        start = self._n
        self._reserve(start + len(ids))
        self._vectors[start:start + len(ids)] = vectors
        self._alive[start:start + len(ids)] = True
        self._n += len(ids)
        self._ids.extend(ids)
        self._meta.extend(metadata)
        for j, ident in enumerate(ids):
            self._pos[ident] = start + j
        self._changed()
        self._maybe_compact()
        return len(ids), []

    def remove(self, ids) -> int:
        self._check_open()
        ids = [ids] if isinstance(ids, str) else list(ids)
        rows = [self._pos.pop(str(i)) for i in ids if str(i) in self._pos]
        if rows:
            self._kill(np.asarray(rows))
            self._changed()
            self._maybe_compact()
        return len(rows)

    def count(self, filter=None) -> int:
        self._check_open()
        filt = normalize_filter(filter)
        if filt is None:
            return len(self._pos)
        return int(self._allowed(filt).sum())

    def _search(self, queries, k, filt):
        nq = len(queries)
        if not self._pos:
            return [[] for _ in range(nq)]
        allowed = None
        if filt is not None or len(self._pos) < self._n:
            allowed = self._allowed(filt)
        n_match = len(self._pos) if allowed is None else int(allowed.sum())
        if n_match == 0:
            return [[] for _ in range(nq)]
        want = min(k, n_match)
        depth = min(max(k, self.rerank), n_match) if self.rerank and not self.exact else want
        if allowed is not None and n_match <= self.exact_below:
            rows = np.flatnonzero(allowed)
            scores, found = exact_search(self._vectors[:self._n], queries, k, rows)
            return [self._hits(s, r) for s, r in zip(scores, found)]
        index = self._index()
        faiss = _faiss()
        params = None
        sel_bits = None
        sel = None
        if allowed is not None:
            sel_bits = np.packbits(allowed, bitorder="little")
            sel = faiss.IDSelectorBitmap(len(sel_bits), faiss.swig_ptr(sel_bits))
        inner = faiss.downcast_index(index.index) if isinstance(index, faiss.IndexPreTransform) else index
        if hasattr(inner, "hnsw"):
            params = faiss.SearchParametersHNSW(efSearch=max(self.ef_search, depth))
        elif hasattr(inner, "nprobe"):
            params = faiss.SearchParametersIVF(nprobe=self.nprobe)
            if _hnsw_quantizer(inner) is not None:  # the lists to scan, found accurately (see COARSE_EF_SEARCH)
                coarse = faiss.SearchParametersHNSW(efSearch=max(COARSE_EF_SEARCH, 2 * self.nprobe))
                params.quantizer_params = coarse
        elif sel is not None:
            params = faiss.SearchParameters()
        if sel is not None:
            params.sel = sel
        scores, found = index.search(queries, depth, params=params)
        del sel_bits  # the selector reads this buffer; keep it alive until here
        out = []
        short = []
        for qi in range(nq):
            ok = found[qi] >= 0
            if depth > want:  # re-rank the candidates exactly with the float vectors
                s, r = self._rerank(queries[qi], found[qi][ok], k)
                out.append(self._hits(s, r))
            else:
                out.append(self._hits(scores[qi][ok], found[qi][ok]))
            if ok.sum() < want:
                short.append(qi)
        if short:  # an approximate search missed some matches: rank those queries exactly
            rows = None if allowed is None else np.flatnonzero(allowed)
            s, r = exact_search(self._vectors[:self._n], queries[short], k, rows)
            for j, qi in enumerate(short):
                out[qi] = self._hits(s[j], r[j])
        return out

    def close(self) -> None:
        if self.closed:
            return
        self.save()
        self.closed = True
        self._faiss = None

    def drop(self) -> None:
        if self.path is not None and self.path.exists():
            shutil.rmtree(self.path)
        self._dirty = False
        self.closed = True
        self._faiss = None

    def info(self) -> dict:
        out = {**super().info(), "factory": self.factory, "path": str(self.path) if self.path else None,
               "memory": self.memory()}
        if not self.exact:
            out.update(rerank=self.rerank, ef_search=self.ef_search, nprobe=self.nprobe)
        return out

    def memory(self) -> dict:
        """Where the index's bytes are: RAM held by FAISS and by the float vectors, and what stays on disk.

        ``ram_bytes`` is what this index keeps in memory (FAISS's codes, links and
        lists plus any float vectors of our own); ``ram_ratio`` divides it by the
        raw float32 vector bytes. Memory-mapped vectors count as on disk: the
        page cache holds the rows that searches touch and may drop them.
        """
        raw = self._n * self.dim * 4
        faiss_bytes = _faiss_bytes(self._faiss) if self._faiss is not None else 0
        mapped = isinstance(self._view_owner, np.memmap)
        shared = self._view_owner is not None and not mapped
        vec_ram = 0 if (mapped or shared) else int(self._vectors.nbytes)
        where = ("memory-mapped from " + str(getattr(self._view_owner, "filename", "disk")) if mapped
                 else "in FAISS's storage" if shared else "in RAM")
        ram = faiss_bytes + vec_ram
        return {"ram_bytes": ram, "faiss_bytes": faiss_bytes, "vector_ram_bytes": vec_ram, "vectors": where,
                "raw_vector_bytes": raw, "ram_ratio": ram / raw if raw else None}

    # -- persistence -----------------------------------------------------------------
    def save(self) -> None:
        """Write pending changes to ``path`` (atomically); nothing to do when unchanged or in memory.

        Holds the index folder's lock (:func:`vslib.locks.run_lock`, re-entrant: a build already holds it),
        so a save outside a build (a library user's ``close``) never removes a running build's files.
        """
        self._check_open()
        if self.path is None or not self._dirty or getattr(self, "_staged", False):
            return
        ensure_dir(self.path)
        with run_lock(self.path, f"the embedded index {self.path}"):
            self._save()

    def _save(self) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        self._compact()
        ensure_dir(self.path)
        meta_file = self.path / "meta.json"
        try:
            old = json.loads(meta_file.read_text()).get("generation") if meta_file.exists() else None
        except (OSError, ValueError, AttributeError):
            old = None  # a damaged meta.json is replaced by this save
        # the one after the live generation, skipping any folder a killed save left: an existing folder is never
        # replaced (a searcher elsewhere may still be reading it)
        number = int(old[1:]) + 1 if isinstance(old, str) and GENERATION.match(old) else 1
        while (self.path / f"g{number % 1_000_000:06d}").exists():
            number += 1
        gen = f"g{number % 1_000_000:06d}"
        files = {}
        # a new generation is written whole in a hidden folder, then named; meta.json (written
        # atomically, last) points at it. On any fault the folder is removed and the index on
        # disk stays the previous generation.
        tmp = None
        try:
            tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=self.path))
            np.save(tmp / "vectors.npy", self._vectors[:self._n])
            rows = {"id": self._ids, **self._meta.columns}
            try:
                table = pa.table(rows) if self._ids else pa.table({"id": pa.array([], pa.string())})
            except (pa.ArrowInvalid, pa.ArrowTypeError):  # a field holds mixed types: keep it as JSON
                table = pa.table({"id": self._ids, "_json": [json.dumps(m) for m in self._meta]})
            pq.write_table(table, tmp / "metadata.parquet")
            if not self.exact and self._n:
                _faiss().write_index(self._index(), str(tmp / "faiss.index"))
            files = {f.name: digest(f) for f in sorted(tmp.iterdir()) if f.is_file()}
            if (self.path / gen).exists():
                shutil.rmtree(self.path / gen)
            os.replace(tmp, self.path / gen)
            tmp = None
        except OSError as e:
            raise (environment_fault(e, self.path) or e) from e
        except RuntimeError as e:  # faiss reports a failed write as a RuntimeError quoting strerror
            fault = _faiss_fault(e, self.path)
            raise (fault or e) from e
        finally:
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)
        meta = {"format": FORMAT, "dim": self.dim, "factory": self.factory, "count": self._n, "generation": gen,
                "files": files}
        atomic_write_json(meta_file, meta)
        if self.mmap_vectors and not self.stores_floats and self._n:
            # the floats now live in the saved file: map it and let the RAM copy go
            self._vectors = np.load(self.path / gen / "vectors.npy", mmap_mode="r")
            self._view_owner = self._vectors
        del rows, table
        release_free_memory()  # the metadata table and the float copy were freed: return the pages
        remove_debris(self.path, keep=gen)  # older generations and leftovers of crashed saves
        self._dirty = False
        log.debug("saved %d vectors to %s/%s", self._n, self.path, gen)

    # -- internals ------------------------------------------------------------------
    def _rerank(self, query: np.ndarray, rows: np.ndarray, k: int):
        """Exact scores of candidate ``rows`` (read in row order, kind to a memory map); the best k first."""
        rows = np.sort(rows)
        scores = np.asarray(self._vectors[rows], dtype=np.float32) @ query
        order = np.argsort(-scores, kind="stable")[:k]
        return scores[order], rows[order]

    def _hits(self, scores, rows) -> list[Hit]:
        return [Hit(self._ids[r], float(s), self._meta[r]) for s, r in zip(scores, rows)]

    def _reserve(self, n: int) -> None:
        if n <= len(self._vectors) and self._view_owner is None:
            return
        # a view of FAISS's storage or of a memory map is never written to: new rows go into a buffer of our own
        cap = max(n, 2 * self._n if self._view_owner is None else n, 1024)
        vectors = np.empty((cap, self.dim), np.float32)
        vectors[:self._n] = self._vectors[:self._n]
        alive = np.zeros(cap, bool)
        alive[:self._n] = self._alive[:self._n]
        self._vectors, self._alive = vectors, alive
        self._view_owner = None

    def _adopt_storage(self, index) -> bool:
        """Use the FAISS index's own float storage as ``_vectors``, so the vectors are held once.

        Works for indexes that store raw float vectors (Flat, HNSW<M>, HNSW<M>,Flat);
        returns False for compressed storage (PQ, SQ, ...), where we keep our own copy.
        """
        faiss = _faiss()
        flat = faiss.downcast_index(index.storage) if hasattr(index, "storage") else index
        if not isinstance(flat, faiss.IndexFlat) or flat.ntotal != self._n or flat.d != self.dim or not self._n:
            return False
        view = faiss.rev_swig_ptr(flat.get_xb(), self._n * self.dim).reshape(self._n, self.dim)
        view.flags.writeable = False  # FAISS owns this memory: a write through the view would corrupt the index
        self._vectors = view
        self._view_owner = index  # keeps the C++ storage alive as long as the view is in use
        return True

    def _kill(self, rows: np.ndarray) -> None:
        self._alive[rows] = False
        for r in rows:
            self._meta.clear(r)

    def _changed(self) -> None:
        self._dirty = True
        self._columns.clear()
        self._filter_cache.clear()

    def _maybe_compact(self) -> None:
        dead = self._n - len(self._pos)
        if dead > 1000 and dead > self.compact_share * self._n:
            self._compact()

    def _compact(self) -> None:
        """Drop dead rows; the FAISS index is rebuilt when next needed."""
        if len(self._pos) == self._n:
            return
        keep = np.flatnonzero(self._alive[:self._n])
        self._vectors = np.ascontiguousarray(self._vectors[keep])
        self._view_owner = None
        self._ids = [self._ids[r] for r in keep]
        self._meta = self._meta.select(keep)
        self._n = len(keep)
        self._alive = np.ones(self._n, bool)
        self._pos = {ident: i for i, ident in enumerate(self._ids)}
        self._faiss = None
        self._columns.clear()
        self._filter_cache.clear()

    def _index(self):
        """The FAISS index over rows [0, _n), brought up to date incrementally."""
        if self._faiss is None:
            self._faiss = _make_faiss(self.dim, self.factory)
            if hasattr(self._faiss, "hnsw"):
                self._faiss.hnsw.efConstruction = self.ef_construction
        index = self._faiss
        if index.ntotal < self._n:
            new = self._vectors[index.ntotal:self._n]
            if not index.is_trained:
                check_factory(self.factory, self._n, self.dim)  # one line naming what it needs, not FAISS's abort
                index.train(self._training_sample())
            q = _hnsw_quantizer(index)
            if q is not None:  # assign each vector to its nearest list, not to an approximate one
                q.hnsw.efSearch = max(q.hnsw.efSearch, COARSE_EF_SEARCH)
            index.add(np.ascontiguousarray(new))
            if not self._adopt_storage(index) and len(new) * 10 >= index.ntotal:
                # FAISS grows its code arrays by doubling: a large add leaves them a third larger than
                # their codes (1.3x at 300k SQ8 vectors); a copy holds exactly the codes
                index = self._faiss = _faiss().clone_index(index)
            release_free_memory()
        return index

    def _training_sample(self) -> np.ndarray:
        """At most ``train_max`` rows (a fixed random sample, in row order) to train FAISS's quantizers on."""
        if self._n <= self.train_max:
            return np.ascontiguousarray(self._vectors[:self._n])
        rows = np.sort(np.random.default_rng(0).choice(self._n, self.train_max, replace=False))
        return np.ascontiguousarray(self._vectors[rows])

    def _column(self, field: str):
        import pandas as pd

        if field not in self._columns:
            self._columns[field] = pd.Series(self._meta.column(field, self._n), dtype=object)
        return self._columns[field]

    def _allowed(self, filt) -> np.ndarray:
        """Boolean mask over rows [0, _n): alive and matching the (normalised) filter."""
        key = repr(filt)
        if key in self._filter_cache:
            return self._filter_cache[key]
        mask = self._alive[:self._n].copy()
        for field, allowed in (filt or {}).items():
            col = self._column(field)
            allowed_set = set(allowed)
            match = col.isin(allowed).to_numpy(bool)
            lists = col.map(lambda v: isinstance(v, list)).to_numpy(bool)
            if lists.any():  # list-valued metadata matches when any element is allowed
                for r in np.flatnonzero(lists):
                    match[r] = any(v in allowed_set for v in col.iat[r])
            mask &= match
        if len(self._filter_cache) > 64:
            self._filter_cache.clear()
        self._filter_cache[key] = mask
        return mask


#: efSearch of an HNSW coarse quantizer (``IVF<n>_HNSW32``) when assigning vectors to lists and
#: choosing the lists to scan. FAISS's default, 16, put 6% of 1M vectors in a list other than their
#: nearest with 2,048 lists (and the lists a query scans miss them): recall@10 stalled at 0.90 whatever
#: nprobe or rerank; at 128 the assignment matched exact search for every vector checked.
COARSE_EF_SEARCH = 128


class Metadata:
    """Items' metadata by field: one list per field (None where an item lacks the field), strings interned.

    A dict per item cost 0.1x the raw float32 bytes of 1280-d vectors at 1M items (a dict is
    ~200 bytes, each label string another ~50); a column of shared strings costs 8 bytes an
    item. ``m[row]`` is the item's metadata as a new dict (fields holding None are left out,
    as they are after a save and reload).
    """

    def __init__(self, columns: Optional[dict] = None, n: int = 0):
        self.columns: dict[str, list] = {k: [_shared(v) for v in col] for k, col in (columns or {}).items()}
        self.n = n

    def __len__(self) -> int:
        return self.n

    def extend(self, rows) -> None:
        rows = list(rows)
        for key in dict.fromkeys(k for r in rows for k in r):
            if key not in self.columns:
                self.columns[key] = [None] * self.n
        for key, col in self.columns.items():
            col.extend(_shared(r.get(key)) for r in rows)
        self.n += len(rows)

    def __getitem__(self, row: int) -> dict:
        return {k: col[row] for k, col in self.columns.items() if col[row] is not None}

    def __iter__(self):
        return (self[r] for r in range(self.n))

    def clear(self, row: int) -> None:
        for col in self.columns.values():
            col[row] = None

    def select(self, rows) -> "Metadata":
        out = Metadata()
        out.columns = {k: [col[r] for r in rows] for k, col in self.columns.items()}
        out.n = len(rows)
        return out

    def column(self, field: str, n: int) -> list:
        col = self.columns.get(field)
        return col[:n] if col is not None else [None] * n


def _shared(value):
    """Strings interned (one object per distinct value: labels repeat), other values as given."""
    return sys.intern(str(value)) if isinstance(value, str) else value


def _hnsw_quantizer(index):
    """The HNSW coarse quantizer of an IVF index (inside any pre-transform), or None."""
    faiss = _faiss()
    try:
        ivf = faiss.extract_index_ivf(index)
    except RuntimeError:  # not an IVF index
        return None
    q = faiss.downcast_index(ivf.quantizer)
    return q if hasattr(q, "hnsw") else None


def _make_faiss(dim: int, factory: str):
    faiss = _faiss()
    try:
        return faiss.index_factory(int(dim), factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[-1] if str(e).strip() else ""
        raise IndexBackendError(f"index.embedded.factory {factory!r} is not a FAISS index factory string "
                                f"(e.g. 'Flat', 'HNSW32'): {first}") from None


def _read_meta(meta_file: Path) -> dict:
    """meta.json, checked: a JSON object of this format with a dim, a count and a generation name."""
    try:
        meta = json.loads(meta_file.read_text(encoding="utf-8"))
        int(meta["dim"]), int(meta["count"])
    except FileNotFoundError:
        raise IndexNotFoundError(f"no embedded index in {meta_file.parent}; build it with `visualsearch index`") from None
    except (OSError, ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise DamagedFile(meta_file, f"unreadable: {e}", REBUILD) from None
    if meta.get("format") != FORMAT:
        raise DamagedFile(meta_file, f"unknown format {meta.get('format')!r} (expected {FORMAT!r})", REBUILD)
    if int(meta["dim"]) < 1 or int(meta["count"]) < 0:
        raise DamagedFile(meta_file, f"dim {meta['dim']!r} and count {meta['count']!r} cannot be right", REBUILD)
    files = meta.get("files")
    try:
        if files is not None:
            for name, fp in files.items():
                int(fp["size"]), str(fp["crc32"]), str(name)
    except (AttributeError, KeyError, TypeError, ValueError):
        raise DamagedFile(meta_file, "its record of the generation's files is not valid", REBUILD) from None
    return meta


def _generation(meta: dict, meta_file: Path) -> str:
    gen = meta.get("generation")
    if not isinstance(gen, str) or not GENERATION.match(gen):
        raise DamagedFile(meta_file, f"its generation {gen!r} is not a generation name (gNNNNNN)", REBUILD)
    return gen


def _total_bytes(meta: dict) -> int:
    return sum(int(f.get("size", 0)) for f in (meta.get("files") or {}).values())


def _check_files(folder: Path, meta: dict, *, full: Optional[bool]) -> None:
    """Sizes of the generation's files against meta.json; their CRCs too when ``full`` (None: when small)."""
    files = meta.get("files")
    if not isinstance(files, dict):  # written by an older version: nothing recorded to check against
        return
    if full is None:
        full = _total_bytes(meta) <= FULL_CHECK_BYTES
    for name, fp in files.items():
        if "/" in name or name.startswith("."):
            raise DamagedFile(folder.parent / "meta.json", f"it names a file {name!r} outside its generation", REBUILD)
        f = folder / name
        try:
            size = f.stat().st_size
        except FileNotFoundError:
            raise DamagedFile(f, "missing", REBUILD) from None
        if size != int(fp["size"]):
            raise DamagedFile(f, f"{size} bytes where {fp['size']} were written", REBUILD)
        if full and digest(f)["crc32"] != fp["crc32"]:
            raise DamagedFile(f, "its content changed since it was written (checksum mismatch)", REBUILD)


def _check_rows(vectors: np.ndarray, path: Path, *, sample: bool) -> None:
    """Stored vectors must be finite and unit length: all rows, or an even sample of a large file."""
    if not len(vectors):
        return
    try:
        if not sample:
            check_unit_vectors(vectors, str(path))
            return
        picked = np.unique(np.linspace(0, len(vectors) - 1, min(SAMPLE_ROWS, len(vectors))).astype(np.int64))
        for i in range(0, len(picked), 256):  # a few rows at a time: the sample is never one large copy
            check_unit_vectors(vectors[picked[i:i + 256]], str(path))
    except ValueError as e:
        raise DamagedFile(path, str(e).split(": ", 1)[-1], REBUILD) from None


def remove_debris(path: Path, keep: Optional[str] = None) -> list[Path]:
    """Remove what killed saves and rebuilds left in the index folder: ``.tmp-*`` folders, temporary files and
    generations other than ``keep`` (default: the one meta.json names). Call it only holding the build's lock."""
    path = Path(path)
    if keep is None:
        try:
            keep = _generation(_read_meta(path / "meta.json"), path / "meta.json")
        except (IndexNotFoundError, DamagedFile):
            return []  # nothing is known to be live: keep everything for the rebuild to replace
    removed = []
    for child in path.iterdir() if path.is_dir() else []:
        if _is_debris(child, keep):
            shutil.rmtree(child, ignore_errors=True) if child.is_dir() else child.unlink(missing_ok=True)
            removed.append(child)
    return removed


def _is_debris(child: Path, live: str) -> bool:
    """A generation other than the live one, or a temporary file or folder of a killed save."""
    return bool((GENERATION.match(child.name) and child.name != live) or child.name.startswith((".tmp-", ".meta-"))
                or child.match(TEMP_GLOB))


def check_factory(factory: str, n: int, dim: int) -> None:
    """Refuse, naming the factory and what it needs, a FAISS factory that ``n`` vectors of ``dim`` cannot train."""
    lists = re.search(r"IVF(\d+)", factory)
    if lists and n < int(lists.group(1)):
        nlist = int(lists.group(1))
        suggest = max(1, int(np.sqrt(max(n, 1))))
        raise IndexBackendError(
            f"index.embedded.factory {factory!r} needs at least {nlist} vectors to train its {nlist} lists (FAISS "
            f"advises 39 per list: {39 * nlist}); the index split has {n}. Use 'Flat' (exact, fine below ~1M "
            f"vectors) or fewer lists, e.g. 'IVF{suggest},Flat'")
    pq = re.search(r"PQ(\d+)(?:x(\d+))?", factory)
    if pq:
        m, bits = int(pq.group(1)), int(pq.group(2) or 8)
        if m and dim % m:
            raise IndexBackendError(f"index.embedded.factory {factory!r}: PQ{m} needs a vector dimension divisible "
                                    f"by {m}, but the vectors have {dim}; use a divisor of {dim} (e.g. PQ64 for 1280)")
        if n < 2 ** bits:
            raise IndexBackendError(f"index.embedded.factory {factory!r}: PQ codes of {bits} bits need at least "
                                    f"{2 ** bits} training vectors; the index split has {n}. Use 'Flat' or 'SQ8'")


def audit(cfg) -> list[Finding]:
    """Full check of the configured embedded index: meta.json, the live generation's files (CRC) and every vector
    (finite, unit length); leftover debris is a warning (the next build removes it)."""
    path = Path(cfg.index_dir)
    meta_file = path / "meta.json"
    if not meta_file.exists():
        if not any(GENERATION.match(c.name) for c in (path.iterdir() if path.is_dir() else [])):
            # never built (the folder may hold only the lock of a build refused before it wrote anything)
            return [Finding(str(path), "embedded index", "missing", "not built yet", "`visualsearch index` builds it")]
        return [Finding(str(meta_file), "embedded index", "damaged", "missing (generation folders are there)",
                        REBUILD)]
    out = []
    try:
        meta = _read_meta(meta_file)
        folder = path / _generation(meta, meta_file)
        bad = []
        for name, fp in (meta.get("files") or {}).items():  # each file on its own: every damaged one is named
            try:
                _check_files(folder, {"files": {name: fp}}, full=True)
            except DamagedFile as e:
                bad.append(Finding(str(e.path), "embedded index", "damaged", e.reason, REBUILD))
        if bad:
            return bad
        vectors = np.load(folder / "vectors.npy", mmap_mode="r")
        if vectors.shape != (int(meta["count"]), int(meta["dim"])):
            raise DamagedFile(folder / "vectors.npy", f"shape {vectors.shape}, meta.json says "
                                                      f"({meta['count']}, {meta['dim']})", REBUILD)
        _check_rows(vectors, folder / "vectors.npy", sample=False)
        status = "ok" if isinstance(meta.get("files"), dict) else "unverified"
        out.append(Finding(str(folder), "embedded index", status, f"{meta['count']} vectors" if status == "ok"
                           else "no checksums recorded (written by an older version)", REBUILD))
    except DamagedFile as e:
        out.append(Finding(str(e.path), "embedded index", "damaged", e.reason, REBUILD))
        return out
    except (OSError, ValueError) as e:
        out.append(Finding(str(path), "embedded index", "damaged", f"unreadable: {e}", REBUILD))
        return out
    live = meta["generation"]
    if _build_running(path):
        return out  # what is beside the live generation is the running build's work, not debris
    for child in sorted(path.iterdir()):
        if _is_debris(child, live):
            out.append(Finding(str(child), "index debris", "warning", "left by a killed build",
                               "the next `visualsearch index` removes it"))
    return out


def _build_running(path: Path) -> bool:
    """Whether a build or save (in another process) holds the index folder's lock now."""
    import filelock

    if not (path / LOCK_FILE).exists():
        return False
    lock = filelock.FileLock(str(path / LOCK_FILE))
    try:
        lock.acquire(timeout=0)
    except filelock.Timeout:
        return True
    except OSError:  # a read-only folder: nobody is writing it
        return False
    lock.release()
    return False


def _stores_floats(index) -> bool:
    """Whether this (empty) FAISS index keeps the raw float vectors (Flat, HNSW over Flat)."""
    faiss = _faiss()
    top = faiss.downcast_index(index)  # a view: ``index`` (which owns the C++ object) must stay referenced
    flat = faiss.downcast_index(top.storage) if hasattr(top, "storage") else top
    return isinstance(flat, faiss.IndexFlat)


def _faiss_bytes(index) -> int:
    """RAM a FAISS index holds: codes, HNSW links, IVF lists (codes + ids), quantizers and transforms."""
    faiss = _faiss()
    index = faiss.downcast_index(index)  # the caller keeps the owning object alive
    if isinstance(index, faiss.IndexPreTransform):
        chain = sum(int(faiss.downcast_VectorTransform(index.chain.at(i)).d_in) *
                    int(faiss.downcast_VectorTransform(index.chain.at(i)).d_out) * 4
                    for i in range(index.chain.size()))
        return chain + _faiss_bytes(index.index)
    if isinstance(index, faiss.IndexHNSW):
        h = index.hnsw
        links = h.neighbors.size() * 4 + h.levels.size() * 4 + h.offsets.size() * 8 + h.assign_probas.size() * 8
        return int(links) + _faiss_bytes(index.storage)
    if isinstance(index, faiss.IndexIVF):
        lists = int(index.invlists.compute_ntotal()) * (int(index.code_size) + 8)
        return lists + index.nlist * 16 + _faiss_bytes(index.quantizer)  # 16: a list's vector header
    if isinstance(index, faiss.IndexFlatCodes):
        return int(index.codes.size())
    return int(faiss.serialize_index(index).nbytes)
