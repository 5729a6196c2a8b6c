"""The one contract every vector index backend follows.

>>> with open_index(cfg, dim=1280) as index:              # doctest: +SKIP
...     index.add(ids, vectors, metadata)                  # float32 (n, dim)
...     hits = index.search(queries, k=10, filter={"label": ["cat", "dog"]})
>>> hits[0][0]                                             # doctest: +SKIP
Hit(id='3f2a…', score=0.91, metadata={'label': 'cat', 'path': '…'})

Scores are inner products of the stored and query vectors (the cosine
similarity for the L2-normalised features), whatever the backend, so results
of the embedded index and of Elasticsearch can be compared directly.

Filters are pre-filters: the k best *among the matching items* come back, so a
search returns ``min(k, number of matching items)`` hits.
"""
from __future__ import annotations

import abc
import contextlib
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar, Iterable, Mapping, Optional, Sequence

import numpy as np

from vslib.errors import IndexBackendError
from vslib.integrity import NORM_TOLERANCE

#: a filter maps a metadata field to one value or to a collection of allowed values,
#: e.g. ``{"label": ["cat", "dog"]}``; several fields must all match
Filter = Mapping[str, Any]


class IndexUnreachableError(IndexBackendError):
    """The index server cannot be reached (names the URL, never the secrets)."""


class IndexNotFoundError(IndexBackendError):
    """The index does not exist (and was opened with ``create=False``)."""


class IndexMismatchError(IndexBackendError):
    """The existing index was built with other settings (backbone, similarity, index options) than the config's."""


class IndexDimensionError(IndexMismatchError):
    """The existing index holds vectors of another dimension than the backbone's."""


class IndexPermissionError(IndexBackendError):
    """The server refused an operation to these credentials (names the privilege to grant)."""


class IndexTimeoutError(IndexBackendError):
    """The server did not answer within the configured timeout (names the setting to raise)."""


class BulkIndexError(IndexBackendError):
    """Some documents of an :meth:`VectorIndex.add` were rejected.

    The others were indexed. ``failures`` lists ``(id, reason)`` for every
    rejected document; ``added`` counts the documents that were indexed.
    """

    def __init__(self, failures: Sequence[tuple[str, str]], added: int):
        self.failures = list(failures)
        self.added = added
        shown = "; ".join(f"{i!r}: {r}" for i, r in self.failures[:5])
        more = f" (and {len(self.failures) - 5} more)" if len(self.failures) > 5 else ""
        super().__init__(f"{len(self.failures)} document(s) were not indexed ({added} were): {shown}{more}")


@dataclass(frozen=True)
class Hit:
    """One search result: the item's id, its inner-product score and its metadata."""

    id: str
    score: float
    metadata: dict = field(default_factory=dict, compare=False)


class VectorIndex(abc.ABC):
    """A collection of (id, vector, metadata) items searchable by inner product.

    Subclasses implement the ``_add`` / ``remove`` / ``_search`` / ``count`` /
    ``close`` primitives; input checking lives here so that every backend
    accepts and rejects the same things.
    """

    #: registry name
    name: ClassVar[str] = ""
    #: the largest k one search may ask for (None: no limit)
    max_k: ClassVar[Optional[int]] = None
    #: whether a removed/replaced item disappears from searches at once
    read_your_writes: ClassVar[bool] = True

    def __init__(self, dim: int):
        if not isinstance(dim, (int, np.integer)) or dim < 1:
            raise ValueError(f"dim must be a positive integer, not {dim!r}")
        self.dim = int(dim)
        self.closed = False

    @classmethod
    @abc.abstractmethod
    def from_config(cls, cfg, dim: Optional[int] = None, *, create: bool = True) -> "VectorIndex":
        """Open this backend's index with its settings from ``cfg`` (see :func:`vslib.index.open_index`)."""

    # -- the contract ---------------------------------------------------------
    @property
    @abc.abstractmethod
    def exact(self) -> bool:
        """Whether unfiltered and filtered searches return the exact top k."""

    def add(self, ids: Sequence, vectors, metadata: Optional[Sequence[Mapping]] = None) -> int:
        """Add items; an id already present is replaced, never duplicated.

        Parameters
        ----------
        ids : sequence of str
            Stable item ids (ints are converted to str).
        vectors : array-like, float32 (n, dim)
        metadata : sequence of mappings or DataFrame, optional
            Scalar (or list-of-scalar) values, e.g. ``{"label": "cat", "path": "…"}``.

        Returns
        -------
        int
            The number of items indexed.

        Raises
        ------
        ValueError
            The arrays have the wrong shape or lengths.
        BulkIndexError
            Some items were rejected (a vector with NaN or infinity, or not of
            unit L2 norm within :data:`vslib.integrity.NORM_TOLERANCE`; a
            server-side mapping conflict, …); the others were indexed.
        """
        self._check_open()
        ids, vectors, metadata = self._check_batch(ids, vectors, metadata)
        finite = np.isfinite(vectors).all(axis=1)
        # scores are cosine similarities only for unit vectors (NaN rows give NaN sums: caught as not finite)
        squares = np.einsum("ij,ij->i", vectors, vectors)
        unit = np.abs(squares - 1.0) <= 2 * NORM_TOLERANCE
        good = finite & unit
        failures = [(ids[i], "vector contains NaN or infinity" if not finite[i] else
                     f"vector has norm {np.sqrt(squares[i]):.4g}, not 1 (L2-normalise it)")
                    for i in np.flatnonzero(~good)]
        keep = np.flatnonzero(good)
        # within one batch the last occurrence of an id wins, as it would for sequential adds
        last = {ident: i for i, ident in enumerate(ids) if good[i]}
        keep = [i for i in keep if last[ids[i]] == i]
        added = 0
        if keep:
            added, more = self._add([ids[i] for i in keep], vectors[keep], [metadata[i] for i in keep])
            failures += more
        if failures:
            raise BulkIndexError(failures, added)
        return added

    @abc.abstractmethod
    def _add(self, ids: list[str], vectors: np.ndarray, metadata: list[dict]) -> tuple[int, list[tuple[str, str]]]:
        """Add checked items; return (number added, [(id, reason) for each rejected one])."""

    @abc.abstractmethod
    def remove(self, ids: Sequence) -> int:
        """Remove items by id; ids not present are ignored. Returns the number removed."""

    def search(self, vectors, k: int, filter: Optional[Filter] = None) -> list[list[Hit]]:
        """The k items with the highest inner product for each query row.

        ``filter`` is applied before ranking: if at least k items match,
        k hits come back. Fewer come back only when fewer items match.
        """
        q, k = self._check_search(vectors, k)
        filt = normalize_filter(filter)
        if len(q) == 0:
            return []
        return self._search(q, k, filt)

    def search_many(self, vectors, k: int, filters: Sequence[Optional[Filter]]) -> list[list[Hit]]:
        """One search per row: row ``i`` of ``vectors`` with ``filters[i]`` (``None``: no filter).

        The same query vector may appear on several rows with different filters
        (e.g. one search per likely class). Backends that talk to a server send
        the searches in batches (Elasticsearch: ``_msearch``); the default runs
        them one by one. Results are those of :meth:`search`, row for row.
        """
        q, k = self._check_search(vectors, k)
        filters = list(filters)
        if len(filters) != len(q):
            raise ValueError(f"got {len(filters)} filters for {len(q)} query vectors; give one per row (None: no filter)")
        normalized = [normalize_filter(f) for f in filters]
        if len(q) == 0:
            return []
        return self._search_many(q, k, normalized)

    def _search_many(self, queries: np.ndarray, k: int, filters: list[Optional[dict[str, list]]]) -> list[list[Hit]]:
        """Checked queries, one normalised filter per row; the default calls :meth:`_search` once per distinct filter."""
        groups: dict[str, list[int]] = {}
        for i, f in enumerate(filters):
            groups.setdefault(repr(f), []).append(i)
        out: list[list[Hit]] = [[] for _ in filters]
        for rows in groups.values():
            for i, hits in zip(rows, self._search(queries[rows], k, filters[rows[0]])):
                out[i] = hits
        return out

    def count_values(self, field: str, values: Iterable, filter: Optional[Filter] = None) -> dict:
        """``{value: number of items whose field has that value}`` for each of ``values`` (0 when none).

        The default counts value by value; Elasticsearch answers with one terms aggregation.
        """
        self._check_open()
        base = normalize_filter(filter) or {}
        return {v: self.count({**base, field: [v]}) for v in values}

    def _check_search(self, vectors, k) -> tuple[np.ndarray, int]:
        self._check_open()
        q = self._check_vectors(vectors, "query vectors")
        if not np.isfinite(q).all():
            bad = int(np.flatnonzero(~np.isfinite(q).all(axis=1))[0])
            raise ValueError(f"query vector {bad} contains NaN or infinity")
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise ValueError(f"k must be a positive integer, not {k!r}")
        if self.max_k is not None and k > self.max_k:
            raise ValueError(f"k={k} is more than the {self.name} backend allows (max_k={self.max_k})")
        return q, int(k)

    @abc.abstractmethod
    def _search(self, queries: np.ndarray, k: int, filter: Optional[dict[str, list]]) -> list[list[Hit]]:
        """Search checked queries with a normalised filter (field -> list of allowed values)."""

    @abc.abstractmethod
    def count(self, filter: Optional[Filter] = None) -> int:
        """Number of items (matching ``filter`` when given)."""

    @abc.abstractmethod
    def close(self) -> None:
        """Persist pending changes (where the backend persists) and release resources."""

    @abc.abstractmethod
    def drop(self) -> None:
        """Delete the whole index (its files or its Elasticsearch index) and close it."""

    # -- building ---------------------------------------------------------------
    @contextlib.contextmanager
    def bulk_session(self):
        """Context for a large load of :meth:`add` calls; the backend may defer work to its end.

        The default does nothing. Elasticsearch turns periodic refreshes off and
        refreshes once at the end (restoring the original setting, also on failure).
        """
        yield self

    @classmethod
    def create_fresh(cls, cfg, dim: int) -> "VectorIndex":
        """An empty index that replaces the configured one once :meth:`publish` is called.

        The default deletes the current index first and creates a new one in its
        place (searches fail until it is rebuilt): a backend that can should override
        it. Elasticsearch builds a new concrete index beside the old one and swaps its
        alias in :meth:`publish`; the embedded index fills a new index in memory and
        writes it as a new generation beside the live one at :meth:`publish` (one
        rename of ``meta.json`` switches searches to it).
        """
        try:
            cls.from_config(cfg, create=False).drop()
        except IndexNotFoundError:
            pass
        return cls.from_config(cfg, dim, create=True)

    def publish(self) -> None:
        """Make an index from :meth:`create_fresh` the one searches see (default: it already is)."""

    def discard(self) -> None:
        """Give up an index from :meth:`create_fresh` after a failed build (default: keep what was written)."""

    def info(self) -> dict:
        """A small description for logs and reports (never contains secrets)."""
        return {"backend": self.name, "dim": self.dim, "count": self.count(), "exact": self.exact}

    # -- context manager --------------------------------------------------------
    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        if not self.closed:
            self.close()

    def __len__(self) -> int:
        return self.count()

    # -- input checking ---------------------------------------------------------
    def _check_open(self) -> None:
        if self.closed:
            raise IndexBackendError(f"the {self.name} index is closed; open it again with vslib.index.open_index")

    def _check_vectors(self, vectors, what: str) -> np.ndarray:
        x = np.asarray(vectors)
        if x.ndim != 2:
            hint = "; use x[None, :] for a single vector" if x.ndim == 1 else ""
            raise ValueError(f"{what} must be a 2-D array (n, {self.dim}), got shape {x.shape}{hint}")
        if x.shape[1] != self.dim:
            raise ValueError(f"{what} have {x.shape[1]} dimensions; this index holds {self.dim}-dimensional vectors")
        if not np.issubdtype(x.dtype, np.number):
            raise ValueError(f"{what} must be numbers, not {x.dtype}")
        return np.ascontiguousarray(x, dtype=np.float32)

    def _check_batch(self, ids, vectors, metadata) -> tuple[list[str], np.ndarray, list[dict]]:
        x = self._check_vectors(vectors, "vectors")
        ids = [_check_id(i) for i in (ids.tolist() if isinstance(ids, np.ndarray) else list(ids))]
        if len(ids) != len(x):
            raise ValueError(f"got {len(ids)} ids for {len(x)} vectors")
        if metadata is None:
            metadata = [{} for _ in ids]
        elif hasattr(metadata, "to_dict") and hasattr(metadata, "columns"):  # a DataFrame
            metadata = metadata.to_dict("records")
        else:
            metadata = list(metadata)
        if len(metadata) != len(ids):
            raise ValueError(f"got {len(metadata)} metadata records for {len(ids)} ids")
        return ids, x, [_check_metadata(m, ids[i]) for i, m in enumerate(metadata)]


def _check_id(value) -> str:
    if isinstance(value, (np.integer, int)) and not isinstance(value, bool):
        value = str(int(value))
    if not isinstance(value, str) or not value:
        raise ValueError(f"ids must be non-empty strings (or integers), not {value!r}")
    if len(value.encode()) > 512:
        raise ValueError(f"id {value[:40]!r}… is longer than 512 bytes (the Elasticsearch limit)")
    return value


def _plain(value, where: str):
    """A metadata value as a plain JSON-friendly Python scalar (or list of them)."""
    if isinstance(value, np.generic):
        value = value.item()
    if value is None or isinstance(value, (str, bool, int)):
        return value
    if isinstance(value, float):
        return None if math.isnan(value) else value
    if isinstance(value, (list, tuple, np.ndarray)):
        return [_plain(v, where) for v in value]
    raise ValueError(f"{where} is a {type(value).__name__}; metadata values must be strings, numbers, "
                     "booleans or lists of them")


def _check_metadata(m, ident: str) -> dict:
    if not isinstance(m, Mapping):
        raise ValueError(f"metadata of id {ident!r} must be a mapping, not {type(m).__name__}")
    out = {}
    for key, value in m.items():
        if not isinstance(key, str) or not key or key.startswith("_") or key == "vector":
            raise ValueError(f"metadata of id {ident!r}: {key!r} is not a usable field name "
                             "(non-empty, not starting with '_', not 'vector')")
        value = _plain(value, f"metadata[{key!r}] of id {ident!r}")
        if value is not None:
            out[key] = value
    return out


def normalize_filter(filter: Optional[Filter]) -> Optional[dict[str, list]]:
    """``{"label": "cat"}`` / ``{"label": {"cat", "dog"}}`` -> ``{"label": ["cat", "dog"]}``.

    ``None`` and ``{}`` mean "no filter". An empty collection matches nothing.
    """
    if filter is None:
        return None
    if not isinstance(filter, Mapping):
        raise ValueError(f"filter must be a mapping like {{'label': ['cat', 'dog']}}, not {filter!r}")
    out = {}
    for key, allowed in filter.items():
        if not isinstance(key, str) or not key:
            raise ValueError(f"filter field {key!r} must be a metadata field name")
        if isinstance(allowed, (str, bytes, int, float, bool, np.generic)) or allowed is None:
            allowed = [allowed]
        elif isinstance(allowed, Iterable):
            allowed = list(allowed)
        else:
            raise ValueError(f"filter[{key!r}] must be a value or a collection of values, not {allowed!r}")
        out[key] = sorted({_plain(v, f"filter[{key!r}]") for v in allowed}, key=repr)
    return out or None


def exact_search(vectors: np.ndarray, queries: np.ndarray, k: int, rows: Optional[np.ndarray] = None):
    """Brute-force top k by inner product (numpy), over ``rows`` of ``vectors`` when given.

    Returns (scores, row indices), each (n_queries, min(k, n_rows)), best first;
    ties are broken by row order.
    """
    base = vectors if rows is None else vectors[rows]
    rows = np.arange(len(vectors)) if rows is None else np.asarray(rows)
    k = min(k, len(base))
    if k == 0:
        return np.empty((len(queries), 0), np.float32), np.empty((len(queries), 0), np.int64)
    s = queries @ base.T
    order = np.argsort(-s, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(s, order, axis=1), rows[order]


