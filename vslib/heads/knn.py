"""``knn``: the index as a classifier — similarity-weighted votes of the nearest indexed vectors.

The logit of class c for a query q is ``log sum_{j in N_k(q), y_j = c} exp((s_j - 1) / tau)``
over the ``k`` most similar training vectors (cosine ``s_j``), floored so a
class with no vote keeps a finite logit. ``k`` and ``tau`` are chosen
leave-one-out on the training rows (each row voted on by all the others,
exactly as a held-out query is voted on by the whole index), by the NLL
after temperature scaling; the temperature is fitted on the same leave-one-out logits.
"""
from __future__ import annotations

import logging
from typing import Optional, Sequence

import numpy as np

from vslib.heads.base import Head
from vslib.heads.linear import calibrated_nll

log = logging.getLogger(__name__)

DEFAULT_KS = (1, 5, 10, 20, 50)
DEFAULT_TAUS = (0.01, 0.02, 0.05, 0.1)
#: a class without a vote gets this share of the total vote weight (keeps logits finite)
FLOOR = 1e-4


def neighbours(Q: np.ndarray, X: np.ndarray, k: int, *, exclude_self: bool = False,
               block: int = 2048) -> tuple[np.ndarray, np.ndarray]:
    """Cosine similarities and row indices (n_q, k) of the ``k`` most similar rows of ``X``, best first.

    ``exclude_self`` (for ``Q is X``): row i never counts as its own neighbour.
    """
    k = min(k, len(X) - (1 if exclude_self else 0))
    sims = np.empty((len(Q), k), np.float32)
    idx = np.empty((len(Q), k), np.int64)
    for i in range(0, len(Q), block):
        S = Q[i:i + block] @ X.T
        if exclude_self:
            S[np.arange(len(S)), np.arange(i, i + len(S))] = -np.inf
        part = np.argpartition(-S, k - 1, axis=1)[:, :k]
        ps = np.take_along_axis(S, part, 1)
        order = np.argsort(-ps, axis=1, kind="stable")
        idx[i:i + block] = np.take_along_axis(part, order, 1)
        sims[i:i + block] = np.take_along_axis(ps, order, 1)
    return sims, idx


def vote_logits(sims: np.ndarray, labels: np.ndarray, n_classes: int, k: int, tau: float) -> np.ndarray:
    """Logits (n, n_classes) from the first ``k`` neighbours' similarities and integer labels."""
    s, lab = sims[:, :k].astype(np.float64), labels[:, :k]
    w = np.exp((s - 1.0) / tau)
    votes = np.zeros((len(s), n_classes))
    np.add.at(votes, (np.arange(len(s))[:, None], lab), w)
    return np.log(votes + FLOOR * w.sum(axis=1, keepdims=True) / n_classes + 1e-300)


class KnnHead(Head):
    """Similarity-weighted k-nearest-neighbour votes, ``k`` and ``tau`` chosen leave-one-out.

    Parameters
    ----------
    n_neighbors : int or None
        Votes per query; None chooses from ``neighbor_grid``.
    tau : float or None
        Softness of the votes (smaller: the nearest dominate); None chooses from ``tau_grid``.
    """

    kind = "knn"
    config_keys = {**Head.config_keys, "neighbors": "n_neighbors"}

    def __init__(self, *, folds: int = 5, seed: int = 42, calibrate: bool = True, n_neighbors: Optional[int] = None,
                 tau: Optional[float] = None, neighbor_grid: Sequence[int] = DEFAULT_KS,
                 tau_grid: Sequence[float] = DEFAULT_TAUS):
        super().__init__(folds=folds, seed=seed, calibrate=calibrate)
        self.n_neighbors = n_neighbors
        self.tau = tau
        self.neighbor_grid = neighbor_grid
        self.tau_grid = tau_grid

    def _cross_fit(self, X: np.ndarray, yi: np.ndarray) -> np.ndarray:
        n_classes = int(yi.max()) + 1
        ks = [int(self.n_neighbors)] if self.n_neighbors else [int(k) for k in self.neighbor_grid]
        taus = [float(self.tau)] if self.tau else [float(t) for t in self.tau_grid]
        ks = sorted({min(k, len(X) - 1) for k in ks})
        sims, idx = neighbours(X, X, max(ks), exclude_self=True)
        labels = yi[idx]
        scores = {(k, t): calibrated_nll(vote_logits(sims, labels, n_classes, k, t), yi) for k in ks for t in taus}
        self.n_neighbors_, self.tau_ = min(scores, key=scores.get)
        self.selected_ = {"n_neighbors": self.n_neighbors_, "tau": self.tau_,
                          "loo_nll": {f"k={k},tau={t}": round(v, 4) for (k, t), v in scores.items()}}
        log.info("knn head: k = %d, tau = %g (leave-one-out)", self.n_neighbors_, self.tau_)
        return vote_logits(sims, labels, n_classes, self.n_neighbors_, self.tau_)

    def _fit_final(self, X: np.ndarray, yi: np.ndarray) -> None:
        self.X_, self.y_ = np.ascontiguousarray(X, np.float32), yi.astype(np.int32)

    def _logits(self, X: np.ndarray) -> np.ndarray:
        sims, idx = neighbours(X, self.X_, self.n_neighbors_)
        return vote_logits(sims, self.y_[idx], len(self.classes_), self.n_neighbors_, self.tau_)

    def _state(self) -> dict:
        return {"X": self.X_, "y": self.y_, "n_neighbors": np.asarray(self.n_neighbors_), "tau": np.asarray(self.tau_)}

    def _load_state(self, arrays: dict) -> None:
        self.X_, self.y_ = arrays["X"], arrays["y"]
        self.n_neighbors_, self.tau_ = int(arrays["n_neighbors"]), float(arrays["tau"])
