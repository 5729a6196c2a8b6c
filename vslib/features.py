"""The feature file: the vectors of every manifest image and the manifest rows they belong to, and its readers.

:func:`vslib.extraction.extract` writes the vectors plus the rows (path, label, split, content_hash) to
``<features_dir>/features-<dataset>.npz`` (:func:`features_path`); they are read back whole by
:func:`load_features`, one split at a time by :func:`read_split`, in batches of rows by
:func:`iter_features`, and table columns alone, without a vector, by :func:`feature_columns`.

Out of core: the feature file is an uncompressed ``.npz`` (:mod:`vslib.npzfile`), so a reader
memory-maps a member in place and reads only the rows it slices; it was written chunk by chunk,
so neither side holds a dataset's vectors in memory.

What is checked, and when (:mod:`vslib.integrity`; designed for 100M images, where the feature file
is ~0.5 TB and a CRC pass costs what reading it costs):

* **written**: the feature file gets a checksum sidecar (``<name>.sum``: size and CRC-32);
  :meth:`FeatureSet.save` checks its vectors finite and unit length first;
* **on every open** (:func:`iter_features`, :func:`read_split`, :func:`feature_columns`):
  its size against its checksum file (a ``stat``), and its CRC too when it is at most
  :data:`FULL_CHECK_BYTES` (256 MB, ~50,000 images: a fraction of a second);
  :func:`load_features`, which reads it whole, always checks the CRC. Every row read is
  checked finite and unit length (a garbled block of vectors shows there even where the
  CRC was not read). A damaged file is one line (:class:`~vslib.integrity.DamagedFile`,
  exit 2) naming it and saying that the next ``extract`` (or ``run``) rewrites it from the
  cache; a file checked once is not checked again by the same process while it is the same file;
* **on demand**: :func:`audit` (``visualsearch check``) checks every shard of the feature
  cache (:mod:`vslib.feature_cache`) and the feature file fully (CRC and every vector),
  whatever their size.
"""
from __future__ import annotations

import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional, Sequence

import numpy as np
import pandas as pd

from vslib.atomic import atomic_savez
from vslib.datasets import SPLITS
from vslib.errors import VisualSearchError
from vslib.feature_cache import SHARDS_DIR
from vslib.integrity import SIDECAR, DamagedFile, Finding, audit_file, check_unit_vectors, sidecar
from vslib.npzfile import checked_vectors, npz_member, read_rows, verify_file

#: columns of :attr:`FeatureSet.table`
TABLE_COLUMNS = ("path", "label", "split", "content_hash")
FEATURES_FILE = "features-{dataset}.npz"

#: feature files up to this size are CRC-checked on every open; larger ones by size (and their rows as read)
FULL_CHECK_BYTES = 256 << 20
#: what the next run does about a damaged feature file
REWRITE = "the next `visualsearch extract` (or `run`) rewrites it from the feature cache"


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
        Of the :func:`~vslib.extraction.extract` run that produced it (images, computed, reused, skipped, seconds).
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
        atomic_savez(path, vectors=self.vectors, backbone=np.array(self.backbone), verified=True,
                     **_table_arrays(self.table))
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "FeatureSet":
        with np.load(path, allow_pickle=False) as z:
            table = pd.DataFrame({c: z[c].astype(object) for c in TABLE_COLUMNS})
            return cls(z["vectors"], table, str(z["backbone"]))


def _table_arrays(table: pd.DataFrame) -> dict:
    return {c: table[c].astype(str).to_numpy(dtype=str) for c in TABLE_COLUMNS}


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


def features_path(cfg) -> Path:
    """The feature file of ``cfg``'s dataset; shards are shared by datasets (content-keyed)."""
    return cfg.features_dir / FEATURES_FILE.format(dataset=cfg.dataset.name)


def load_features(cfg) -> FeatureSet:
    """The feature set :func:`~vslib.extraction.extract` wrote for ``cfg``'s dataset and backbone, whole and in memory.

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
    checked_vectors(fs.vectors, str(path), REWRITE)
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
    verify_file(path, full=full, redo=REWRITE)
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
        block = checked_vectors(read_rows(vectors, start, stop), str(path), REWRITE)
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


def feature_columns(cfg, columns: Sequence[str], split: Optional[str] = None) -> pd.DataFrame:
    """Table columns of the feature file (of one ``split``) without reading any vector."""
    path = _check_features_file(cfg)
    data = {c: npz_member(path, c) for c in set(columns) | ({"split"} if split else set())}
    mask = slice(None) if split is None else np.asarray(data["split"]) == split
    return pd.DataFrame({c: np.asarray(data[c][mask]).astype(object) for c in columns})
