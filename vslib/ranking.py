"""Every search mode, ranked exactly and vectorised over many queries at once.

The engine (:mod:`vslib.search`) answers one query at a time through a
vector index. To *choose* the adaptive settings, and to evaluate many seeded
splits, the same rankings are needed for thousands of queries and hundreds
of settings. They all derive from one table: for each query and each class,
the ``kmax`` most similar items of that class (:func:`candidates`). A flat
search is the best ``kmax`` of the union; a hierarchical one the list of the
top class; an adaptive one re-scores the chosen classes' lists by
``similarity + class_weight * log p(class)`` and completes them from the other
classes. The engine ranks its index hits by the same rule: it narrows with
:func:`chosen_labels` and weighs with :func:`class_bonus` (a test checks that
the two agree hit for hit).

>>> cands = candidates(Q, X, y_index, n_classes, kmax=10)
>>> rel = ranked_relevance(cands, y_query, proba, settings("adaptive", scfg))
>>> precision_at(rel, [1, 5, 10])
"""
from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

from vslib.config import ADAPTIVE_SETTINGS, MODES, SearchConfig
from vslib.errors import VisualSearchError

log = logging.getLogger(__name__)

#: candidates outside the chosen classes rank after every chosen one (the engine appends them)
_OUTSIDE = -1e6


@dataclass
class Candidates:
    """Per query and class, the ``kmax`` most similar items: ``sims``, ``items`` (n_q, n_classes, kmax).

    Missing items (a class smaller than ``kmax``) have similarity ``-inf``.
    """

    sims: np.ndarray
    items: np.ndarray

    @property
    def kmax(self) -> int:
        return self.sims.shape[2]


def candidates(Q: np.ndarray, X: np.ndarray, labels: np.ndarray, n_classes: int, kmax: int, *,
               self_rows: Optional[np.ndarray] = None, block: int = 1024) -> Candidates:
    """The ``kmax`` most similar items of every class for every query (cosine = dot product of unit vectors).

    ``labels`` are the integer classes of the rows of ``X``. ``self_rows``
    (when the queries are rows of ``X``: ``Q = X[self_rows]``) keeps each query
    from finding itself, so an index row stands in for a held-out query
    against the rest of the index.
    """
    Q = np.asarray(Q, np.float32)
    X = np.asarray(X, np.float32)
    nq = len(Q)
    sims = np.full((nq, n_classes, kmax), -np.inf, np.float32)
    items = np.full((nq, n_classes, kmax), -1, np.int64)
    cols = [np.flatnonzero(labels == c) for c in range(n_classes)]
    for i in range(0, nq, block):
        S = Q[i:i + block] @ X.T
        if self_rows is not None:
            S[np.arange(len(S)), self_rows[i:i + block]] = -np.inf
        for c, col in enumerate(cols):
            if len(col) == 0:
                continue
            Sc = S[:, col]
            k = min(kmax, len(col))
            part = np.argpartition(-Sc, k - 1, axis=1)[:, :k] if k < len(col) else np.tile(np.arange(len(col)), (len(S), 1))
            ps = np.take_along_axis(Sc, part, 1)
            order = np.argsort(-ps, axis=1, kind="stable")
            best = np.take_along_axis(ps, order, 1)
            sims[i:i + block, c, :k] = best
            # an excluded self-match (-inf) in a class smaller than kmax is no candidate
            items[i:i + block, c, :k] = np.where(np.isfinite(best), col[np.take_along_axis(part, order, 1)], -1)
    return Candidates(sims, items)


#: the search defaults every :class:`Settings` starts from
_DEFAULT = SearchConfig()


@dataclass(frozen=True)
class Settings:
    """How one mode ranks: the classes it keeps and the weight of their log-probability.

    The fields are :data:`vslib.config.ADAPTIVE_SETTINGS`, defaulting to :class:`~vslib.config.SearchConfig`'s.
    """

    mode: str
    mass: float = _DEFAULT.mass
    min_confidence: float = _DEFAULT.min_confidence
    max_classes: int = _DEFAULT.max_classes
    class_weight: float = _DEFAULT.class_weight

    def as_dict(self) -> dict:
        return {k: getattr(self, k) for k in ADAPTIVE_SETTINGS}


def settings(mode: str, scfg) -> Settings:
    """The :class:`Settings` of ``mode`` under a :class:`vslib.config.SearchConfig` (or any object with its fields)."""
    return Settings(mode, float(scfg.mass), float(scfg.min_confidence), int(scfg.max_classes), float(scfg.class_weight))


def searches_flat(proba: Optional[np.ndarray], s: Settings) -> np.ndarray:
    """Boolean (n_q,): the queries ``s.mode`` searches unfiltered (flat; adaptive when the top class is unsure)."""
    if s.mode == "flat":
        return np.ones(len(proba) if proba is not None else 1, bool)
    if s.mode == "adaptive":
        return np.asarray(proba).max(axis=1) < s.min_confidence
    return np.zeros(len(proba), bool)


def chosen_classes(proba: np.ndarray, s: Settings) -> np.ndarray:
    """Boolean (n_q, n_classes): the classes each query's search is narrowed to (all True: flat).

    ``hierarchical`` keeps the top class; ``adaptive`` the fewest classes, in probability order, whose
    mass reaches ``s.mass`` (all of them when it never does), at most ``s.max_classes``, and every class
    when the query :func:`searches_flat`.
    """
    nq, n_classes = proba.shape
    if s.mode == "flat":
        return np.ones((nq, n_classes), bool)
    order = np.argsort(-proba, axis=1, kind="stable")
    if s.mode == "hierarchical":
        n_keep = np.ones(nq, np.int64)
    else:
        sorted_p = np.take_along_axis(proba, order, 1)
        reached = np.cumsum(sorted_p, axis=1) >= s.mass
        n_keep = np.where(reached.any(1), reached.argmax(1) + 1, n_classes)
        n_keep = np.minimum(n_keep, s.max_classes)
    keep = np.zeros((nq, n_classes), bool)
    rows = np.arange(nq)[:, None]
    keep[rows, order] = np.arange(n_classes)[None, :] < n_keep[:, None]
    if s.mode == "adaptive":
        keep[searches_flat(proba, s)] = True  # unsure: search everything
    return keep


def class_bonus(proba: np.ndarray, s: Settings) -> np.ndarray:
    """What adaptive ranking adds to a hit's similarity for its class: ``class_weight * log p(class)``
    (float64, the shape of ``proba``; zero in every other mode)."""
    p = np.asarray(proba, np.float64)
    if s.mode != "adaptive":
        return np.zeros_like(p)
    return s.class_weight * np.log(np.maximum(p, 1e-12))


def chosen_labels(proba: Optional[np.ndarray], classes: Sequence[str], s: Settings,
                  true_labels: Optional[Sequence[str]] = None) -> list[Optional[list[str]]]:
    """Per query, the labels its search is narrowed to, most probable first (None: searched flat).

    The engine's form of :func:`chosen_classes`; ``oracle`` takes each query's ``true_labels``.
    """
    if s.mode == "oracle":
        if true_labels is None:
            raise VisualSearchError("oracle mode needs the query's true label (it exists for evaluation only)")
        return [[str(t)] for t in true_labels]
    if s.mode == "flat":
        return [None] * (1 if proba is None else len(proba))
    if s.mode not in MODES:
        raise VisualSearchError(f"unknown search mode {s.mode!r} (choices: {', '.join(MODES)})")
    proba = np.atleast_2d(np.asarray(proba))
    keep, flat = chosen_classes(proba, s), searches_flat(proba, s)
    order = np.argsort(-proba, axis=1, kind="stable")
    return [None if flat[i] else [classes[j] for j in order[i] if keep[i, j]] for i in range(len(proba))]


def ranked_items(cands: Candidates, proba: Optional[np.ndarray], s: Settings, k: Optional[int] = None,
                 true_labels: Optional[np.ndarray] = None) -> np.ndarray:
    """Item ids (n_q, k) in rank order for ``s.mode`` (``-1`` where a filtered search found fewer than k)."""
    nq, n_classes, kmax = cands.sims.shape
    k = k or kmax
    if s.mode == "oracle":
        keep = np.zeros((nq, n_classes), bool)
        keep[np.arange(nq), true_labels] = True
    else:
        keep = chosen_classes(proba, s) if s.mode != "flat" else np.ones((nq, n_classes), bool)
    score = cands.sims.astype(np.float64)
    if s.mode == "adaptive":
        bonus = class_bonus(proba, s)
        bonus[searches_flat(proba, s)] = 0.0  # a flat fallback ranks by similarity alone
        score = score + np.where(keep, bonus, _OUTSIDE)[:, :, None]  # outside: appended after the chosen
    else:
        score = np.where(keep[:, :, None], score, -np.inf)
    flat = score.reshape(nq, -1)
    ids = cands.items.reshape(nq, -1)
    k_eff = min(k, flat.shape[1])
    part = np.argpartition(-flat, k_eff - 1, axis=1)[:, :k_eff]
    ps = np.take_along_axis(flat, part, 1)
    order = np.argsort(-ps, axis=1, kind="stable")
    top = np.take_along_axis(part, order, 1)
    out = np.take_along_axis(ids, top, 1)
    out[~np.isfinite(np.take_along_axis(ps, order, 1))] = -1
    return out


def relevance(items: np.ndarray, item_labels: np.ndarray, query_labels: np.ndarray) -> np.ndarray:
    """Boolean (n_q, k): the hit at each rank has the query's label (a missing hit never does)."""
    lab = np.where(items >= 0, item_labels[np.maximum(items, 0)], -1)
    return lab == np.asarray(query_labels)[:, None]


def precision_at(rel: np.ndarray, ks: Sequence[int]) -> dict:
    """Mean precision at each k."""
    return {f"p@{k}": float(rel[:, :k].sum(1).mean() / k) for k in ks}


def per_query_precision(rel: np.ndarray, k: int) -> np.ndarray:
    return rel[:, :k].sum(1) / k


# ---------------------------------------------------------------------------
# Choosing the adaptive settings


#: the grid the adaptive settings are chosen from
GRID = {
    "mass": (0.5, 0.8, 0.9, 0.95, 0.99, 1.0),
    "min_confidence": (0.0, 0.1, 0.2, 0.3),
    "max_classes": (1, 2, 3, 5, 10),
    "class_weight": (0.0, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 1.0, 2.0, 5.0),
}


def tune_adaptive(vectors: np.ndarray, labels: np.ndarray, proba: np.ndarray, *, k: int = 10,
                  rows: Optional[np.ndarray] = None, max_queries: int = 3000, seed: int = 0,
                  grid: Optional[dict] = None) -> dict:
    """Choose the adaptive settings on the index split, never on the queries.

    Each index row in ``rows`` (default: all, at most ``max_queries`` sampled)
    acts as a held-out query against the rest of the index, classified by its
    *out-of-fold* probabilities ``proba`` (one row per ``rows`` entry, columns
    = integer classes of ``labels``). Every setting of ``grid`` is ranked
    exactly (:func:`ranked_items`); the chosen one maximises the mean of p@1 ..
    p@k subject to p@1 >= flat p@1 and p@k >= hierarchical p@k on these
    validation queries (when no setting meets both, the one that misses by
    least). A setting meets a constraint only if its paired per-query
    difference is at least one standard error above zero, or exactly zero on
    every query: a gain the validation queries cannot tell from noise does
    not earn a departure from the safe choice. Returns the settings and the
    validation figures behind the choice.
    """
    grid = {**GRID, **(grid or {})}
    labels = np.asarray(labels)
    n_classes = proba.shape[1]
    rows = np.arange(len(vectors)) if rows is None else np.asarray(rows)
    if len(rows) > max_queries:
        pick = np.sort(np.random.default_rng(seed).choice(len(rows), max_queries, replace=False))
        rows, proba = rows[pick], proba[pick]
    cands = candidates(vectors[rows], vectors, labels, n_classes, k, self_rows=rows)
    qlab = labels[rows]

    def per_query(s: Settings) -> np.ndarray:
        rel = relevance(ranked_items(cands, proba, s, k), labels, qlab)
        return np.cumsum(rel, axis=1) / np.arange(1, k + 1)  # (n, k): p@1 .. p@k of every query

    def lower_bound(diff: np.ndarray) -> float:
        return float(diff.mean() - diff.std(ddof=1) / np.sqrt(len(diff))) if len(diff) > 1 else float(diff.mean())

    flat_q = per_query(Settings("flat"))
    hier_q = per_query(Settings("hierarchical"))
    flat, hier = flat_q.mean(0), hier_q.mean(0)
    best, best_key, tried = None, None, 0
    for mass, minc, maxc, w in itertools.product(grid["mass"], grid["min_confidence"], grid["max_classes"],
                                                 grid["class_weight"]):
        if maxc > n_classes or (maxc == 1 and w != grid["class_weight"][0]):
            continue  # one class kept: its log-probability shifts every hit alike, so class_weight changes nothing
        s = Settings("adaptive", mass, minc, maxc, w)
        q = per_query(s)
        c = q.mean(0)
        tried += 1
        shortfall = min(lower_bound(q[:, 0] - flat_q[:, 0]), lower_bound(q[:, -1] - hier_q[:, -1]), 0.0)
        key = (round(shortfall, 9), round(float(c.mean()), 9), round(float(c[0]), 9))
        if best_key is None or key > best_key:
            best, best_key, best_curve = s, key, c
    fmt = lambda c: {f"p@{i}": round(float(c[i - 1]), 4) for i in sorted({1, min(5, k), k})}  # noqa: E731
    result = {**best.as_dict(), "tuned_on": f"{len(rows)} index-split images, each searched against the rest "
                                            "with out-of-fold class probabilities",
              "n_validation": int(len(rows)), "settings_tried": tried,
              "validation": {"flat": fmt(flat), "hierarchical": fmt(hier), "adaptive": fmt(best_curve)},
              "meets_constraints": bool(best_key[0] >= 0)}
    log.info("adaptive settings: %s (validation p@1 %.3f vs flat %.3f; p@%d %.3f vs hierarchical %.3f)",
             best.as_dict(), best_curve[0], flat[0], k, best_curve[-1], hier[-1])
    return result
