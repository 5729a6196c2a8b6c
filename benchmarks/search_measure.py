"""Measuring one searcher: exact search with numpy (the baseline and the ground truth), QPS and recall@10.

``measure(search, ...)`` times any ``search(queries, label_or_None) -> row ids`` one query per
call and batched, unfiltered and filtered by each query's own label; :func:`requests_per_query`
counts an Elasticsearch index's HTTP requests; :func:`print_row` prints a result row as it comes.
"""
from __future__ import annotations

import time
from typing import Optional

import numpy as np

from benchmarks.search_data import K, Collection


# -- numpy brute force --------------------------------------------------------------------------------------------
def topk(scores: np.ndarray, k: int) -> np.ndarray:
    """Row-wise indices of the k largest scores, best first."""
    k = min(k, scores.shape[1])
    part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    order = np.argsort(-np.take_along_axis(scores, part, axis=1), axis=1, kind="stable")
    return np.take_along_axis(part, order, axis=1)


def numpy_search(x: np.ndarray, q: np.ndarray, k: int, mask: Optional[np.ndarray] = None,
                 block: int = 131_072) -> np.ndarray:
    """Exact top-k by inner product, scanning ``x`` in row blocks (bounded memory); ``mask`` pre-filters rows."""
    best_s = np.full((len(q), 0), -np.inf, np.float32)
    best_i = np.zeros((len(q), 0), np.int64)
    for lo in range(0, len(x), block):
        s = q @ np.asarray(x[lo:lo + block]).T
        if mask is not None:
            s[:, ~mask[lo:lo + block]] = -np.inf
        i = topk(s, k)
        best_s = np.concatenate([best_s, np.take_along_axis(s, i, axis=1)], axis=1)
        best_i = np.concatenate([best_i, i + lo], axis=1)
        if best_s.shape[1] > k:
            j = topk(best_s, k)
            best_s, best_i = np.take_along_axis(best_s, j, axis=1), np.take_along_axis(best_i, j, axis=1)
    j = topk(best_s, k)
    best_s, best_i = np.take_along_axis(best_s, j, axis=1), np.take_along_axis(best_i, j, axis=1)
    best_i[~np.isfinite(best_s)] = -1
    return best_i


# -- measuring one searcher ---------------------------------------------------------------------------------------
def recall_at_k(found: list, truth: np.ndarray, k: int = K) -> float:
    """Mean over queries of |found ∩ exact top k| / k (rows padded with -1 in ``truth`` are not counted)."""
    vals = []
    for f, t in zip(found, truth):
        t = [int(r) for r in t[:k] if r >= 0]
        if t:
            vals.append(len(set(int(r) for r in list(f)[:k]) & set(t)) / len(t))
    return float(np.mean(vals)) if vals else float("nan")


def measure(search, queries: np.ndarray, labels: np.ndarray, truth: np.ndarray, truth_f: np.ndarray,
            budget: float, batched: bool = True) -> dict:
    """QPS (single, batched) and recall@10, unfiltered and filtered by each query's own label.

    ``search(q, label_or_None) -> list of row-index lists``.
    """
    out = {}
    for tag, filt, want in (("", None, truth), ("filtered_", labels, truth_f)):
        def call(qs, idx):
            if filt is None:
                return search(qs, None)
            res = [None] * len(qs)
            for lab in np.unique(filt[idx]):  # a batch holds queries of several labels: one call per label
                sel = np.flatnonzero(filt[idx] == lab)
                for j, r in zip(sel, search(qs[sel], int(lab))):
                    res[j] = r
            return res

        if filt is not None:  # untimed: one search per label first, so that the backend's one-off work per
            for lab in np.unique(filt):  # filter (the embedded index builds a mask and keeps it) is not timed
                first = int(np.flatnonzero(filt == lab)[0])
                call(queries[first:first + 1], np.array([first]))
        # one query per call, within the time budget (at least 5 queries)
        found_single = []
        t0 = time.perf_counter()
        for i in range(len(queries)):
            found_single += call(queries[i:i + 1], np.array([i]))
            if i >= 4 and time.perf_counter() - t0 > budget:
                break
        dt = time.perf_counter() - t0
        n_single = len(found_single)
        out[tag + "qps_single"] = n_single / dt
        out[tag + "single_queries_timed"] = n_single
        if batched:
            t0 = time.perf_counter()
            found = call(queries, np.arange(len(queries)))
            out[tag + "qps_batch"] = len(queries) / (time.perf_counter() - t0)
        else:
            found, out[tag + "qps_batch"] = found_single, None
        out[tag + "recall"] = recall_at_k(found, want[:len(found)])
        out[tag + "recall_queries"] = len(found)
    return out


#: adaptive search's pattern per query: one unfiltered search plus one per likely class (search.max_classes)
ADAPTIVE_CLASSES = 5


def requests_per_query(index, q: np.ndarray, ql: np.ndarray) -> dict:
    """HTTP requests per query an Elasticsearch index sends: before (one search per call) and after (_msearch)."""
    n = len(q)

    def sent(fn) -> int:
        r0 = index.requests
        fn()
        return index.requests - r0

    rows = np.repeat(q, 1 + ADAPTIVE_CLASSES, axis=0)
    filters = [None if j == 0 else {"label": [label_name((int(lab) + j - 1) % 20)]}
               for lab in ql for j in range(1 + ADAPTIVE_CLASSES)]
    labels = [label_name(i) for i in range(20)]
    return {
        "rpq_single": sent(lambda: [index.search(q[i:i + 1], K) for i in range(n)]) / n,
        "rpq_batch": sent(lambda: index.search(q, K)) / n,
        "rpq_adaptive_loop": sent(lambda: [index.search(rows[i:i + 1], K, f) for i, f in enumerate(filters)]) / n,
        "rpq_adaptive_msearch": sent(lambda: index.search_many(rows, K, filters)) / n,
        "class_count_requests_loop": sent(lambda: [index.count({"label": [lab]}) for lab in labels]),
        "class_count_requests_agg": sent(lambda: index.count_values("label", labels)),
        "rpq_queries": n, "msearch_batch": index.msearch_batch,
    }


# -- an index under test ------------------------------------------------------------------------------------------
def row_ids(hits_per_query) -> list:
    return [[int(h.id) for h in hits] for hits in hits_per_query]


def label_name(label: int) -> str:
    """The value of the ``label`` field indexed for label id ``label`` (``7`` -> ``l07``)."""
    return f"l{int(label):02d}"


def index_searcher(index):
    """``search(queries, label_or_None) -> row ids`` of an index, for :func:`measure` (a label is a filter)."""
    def search(q, label):
        return row_ids(index.search(q, K, None if label is None else {"label": [label_name(label)]}))

    return search


def measured(row: dict, search, col: Collection, budget: float) -> dict:
    """``row`` with the figures of ``search`` on ``col`` against its ground truth (:func:`measure`), printed."""
    row.update(measure(search, col.queries, col.query_labels, col.truth, col.truth_f, budget))
    print_row(row, col.raw_bytes)
    return row


def add_all(index, col: Collection, batch: int = 1_000_000) -> None:
    """Add the collection to ``index`` in batches: ids are row numbers, the ``label`` field :func:`label_name`."""
    n = len(col.vectors)
    for lo in range(0, n, batch):
        hi = min(n, lo + batch)
        index.add([str(i) for i in range(lo, hi)], col.vectors[lo:hi],
                  [{"label": label_name(v)} for v in col.labels[lo:hi]])


# -- result rows --------------------------------------------------------------------------------------------------
def fmt(v, spec=".0f", none="-"):
    return none if v is None or (isinstance(v, float) and np.isnan(v)) else format(v, spec)


def held(r: dict) -> int:
    """Memory an index holds: the larger of the measured anonymous-RSS growth and what its parts count up to.

    RSS growth is the truth at large sizes but under-reads small ones (the allocator reuses freed pages), so
    the bytes FAISS's codes, links and lists and any float buffer add up to are a floor.
    """
    return max(r.get("index_bytes") or 0, (r.get("faiss_bytes") or 0) + (r.get("vector_buffer_bytes") or 0))


def print_row(r: dict, raw: int) -> None:
    mem = held(r)
    print(f"    {r['backend']:<15} {r['setting']:<28} build {fmt(r.get('build_s'), '7.1f')} s  "
          f"mem {fmt(mem / raw if mem else None, '5.2f')}x raw  "
          f"QPS {fmt(r.get('qps_single'), '8.1f')} / {fmt(r.get('qps_batch'), '8.1f')}  "
          f"R@10 {fmt(r.get('recall'), '.3f')}  | filtered QPS {fmt(r.get('filtered_qps_single'), '8.1f')} / "
          f"{fmt(r.get('filtered_qps_batch'), '8.1f')}  R@10 {fmt(r.get('filtered_recall'), '.3f')}", flush=True)


# -- the baseline -------------------------------------------------------------------------------------------------
def run_numpy(col: Collection, budget: float) -> list[dict]:
    """The numpy brute-force row; sets ``col.truth``, ``col.truth_f``: the exact answers every row is scored on."""
    x = col.vectors
    masks = {}

    def search(q, label):
        if label is None:
            return numpy_search(x, q, K).tolist()
        if label not in masks:
            masks[label] = col.labels == label
        return numpy_search(x, q, K, masks[label]).tolist()

    truth = numpy_search(x, col.queries, K)
    truth_f = np.empty_like(truth)
    for lab in np.unique(col.query_labels):
        sel = np.flatnonzero(col.query_labels == lab)
        truth_f[sel] = numpy_search(x, col.queries[sel], K, col.labels == lab)
    col.truth, col.truth_f = truth, truth_f  # ground truth for every other backend
    row = {"backend": "numpy", "setting": "brute force", "exact": True, "build_s": 0.0,
           "index_bytes": col.raw_bytes, "index_note": "no index: scans the raw vectors"}
    row.update(measure(search, col.queries, col.query_labels, truth, truth_f, budget))
    return [row]
