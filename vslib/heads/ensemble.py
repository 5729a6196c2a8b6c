"""``ensemble``: a calibrated mix of the ``linear`` and ``knn`` heads.

Both heads are cross-fitted on the same rows; their calibrated
log-probabilities are mixed, ``a * log p_linear + (1 - a) * log p_knn``, with
the weight ``a`` chosen out of fold by the NLL after temperature scaling, and
the mix gets its own temperature. The linear head sees the global shape of
each class; the neighbour votes see small, tight groups a linear boundary
misses. On small classes neither dominates, so the mix is the default.
"""
from __future__ import annotations

import logging
from typing import Optional, Sequence

import numpy as np

from vslib import calibration
from vslib.heads.base import Head
from vslib.heads.knn import KnnHead
from vslib.heads.linear import LinearHead, calibrated_nll

log = logging.getLogger(__name__)

DEFAULT_WEIGHTS = tuple(float(w) for w in np.round(np.linspace(0.0, 1.0, 11), 2))


class EnsembleHead(Head):
    """``a * log p_linear + (1 - a) * log p_knn``, ``a`` chosen out of fold, then temperature-scaled.

    Parameters
    ----------
    weight : float or None
        The linear head's share ``a``; None chooses it from ``weight_grid``.
    C, n_neighbors
        Passed to the sub-heads (None: chosen out of fold there).
    """

    kind = "ensemble"
    config_keys = {**Head.config_keys, "C": "C", "neighbors": "n_neighbors"}

    def __init__(self, *, folds: int = 5, seed: int = 42, calibrate: bool = True, weight: Optional[float] = None,
                 weight_grid: Sequence[float] = DEFAULT_WEIGHTS, C: Optional[float] = None,
                 n_neighbors: Optional[int] = None):
        super().__init__(folds=folds, seed=seed, calibrate=calibrate)
        self.weight = weight
        self.weight_grid = weight_grid
        self.C = C
        self.n_neighbors = n_neighbors

    def _parts(self):
        common = {"folds": self.folds, "seed": self.seed, "calibrate": self.calibrate}
        return LinearHead(C=self.C, **common), KnnHead(n_neighbors=self.n_neighbors, **common)

    @staticmethod
    def _mix(a: float, lin: np.ndarray, t_lin: float, knn: np.ndarray, t_knn: float) -> np.ndarray:
        return a * calibration.log_softmax(lin, t_lin) + (1.0 - a) * calibration.log_softmax(knn, t_knn)

    def fit(self, X, y) -> "EnsembleHead":
        self.linear_, self.knn_ = self._parts()
        return super().fit(X, y)

    def _cross_fit(self, X: np.ndarray, yi: np.ndarray) -> np.ndarray:
        labels = self.classes_[yi]
        self.linear_.fit(X, labels)
        self.knn_.fit(X, labels)
        lin, knn = self.linear_.oof_logits_, self.knn_.oof_logits_
        tl, tk = self.linear_.temperature_, self.knn_.temperature_
        weights = [float(self.weight)] if self.weight is not None else [float(w) for w in self.weight_grid]
        scores = {a: calibrated_nll(self._mix(a, lin, tl, knn, tk), yi) for a in weights}
        self.weight_ = min(scores, key=scores.get)
        self.selected_ = {"weight": self.weight_, "oof_nll_by_weight": {str(a): round(s, 4) for a, s in scores.items()},
                          "linear": self.linear_.selected_, "knn": {k: v for k, v in self.knn_.selected_.items()
                                                                    if k != "loo_nll"},
                          "oof_accuracy": {"linear": self.linear_.oof_accuracy_, "knn": self.knn_.oof_accuracy_}}
        log.info("ensemble head: linear weight %.2f (out-of-fold accuracy linear %.3f, knn %.3f)",
                 self.weight_, self.linear_.oof_accuracy_, self.knn_.oof_accuracy_)
        return self._mix(self.weight_, lin, tl, knn, tk)

    def _fit_final(self, X: np.ndarray, yi: np.ndarray) -> None:
        pass  # the sub-heads were fitted on every row in _cross_fit

    def _logits(self, X: np.ndarray) -> np.ndarray:
        return self._mix(self.weight_, self.linear_.predict_logits(X), self.linear_.temperature_,
                         self.knn_.predict_logits(X), self.knn_.temperature_)

    def _state(self) -> dict:
        state = {f"linear.{k}": v for k, v in self.linear_._state().items()}
        state.update({f"knn.{k}": v for k, v in self.knn_._state().items()})
        state["weight"] = np.asarray(self.weight_)
        state["temperatures"] = np.asarray([self.linear_.temperature_, self.knn_.temperature_])
        return state

    def _load_state(self, arrays: dict) -> None:
        self.linear_, self.knn_ = self._parts()
        for part, name in ((self.linear_, "linear."), (self.knn_, "knn.")):
            part._load_state({k[len(name):]: v for k, v in arrays.items() if k.startswith(name)})
        self.linear_.temperature_, self.knn_.temperature_ = map(float, arrays["temperatures"])
        self.weight_ = float(arrays["weight"])
        for part in (self.linear_, self.knn_):
            part.classes_, part.n_features_in_ = self.classes_, self.n_features_in_
