"""``linear``: multinomial logistic regression on the embeddings (scikit-learn).

The inverse regularisation strength ``C`` is chosen out of fold: for each
candidate the out-of-fold logits are scored by their negative log-likelihood
after temperature scaling (a proper score that rewards both accuracy and
well-ranked probabilities), and the best is refitted on every row.
"""
from __future__ import annotations

import logging
import warnings
from typing import Optional, Sequence

import numpy as np

from vslib import calibration
from vslib.heads.base import Head, fold_indices

log = logging.getLogger(__name__)

#: candidates for ``C`` when it is not given (embeddings are unit vectors: little regularisation is needed)
DEFAULT_CS = (1.0, 10.0, 100.0, 1000.0)


def _decision(model, X: np.ndarray, n_classes: int) -> np.ndarray:
    """Logits (n, n_classes) in class-index order (scikit-learn gives one column for two classes)."""
    d = model.decision_function(X)
    out = np.full((len(X), n_classes), -1e9)
    if d.ndim == 1:
        d = np.stack([np.zeros_like(d), d], axis=1)
    out[:, model.classes_] = d
    return out


def calibrated_nll(logits: np.ndarray, yi: np.ndarray) -> float:
    """NLL of ``yi`` after the best temperature: how good the logits are once calibrated."""
    return calibration.nll(logits, yi, calibration.fit_temperature(logits, yi))


class LinearHead(Head):
    """Multinomial logistic regression, ``C`` chosen out of fold.

    Parameters
    ----------
    C : float or None
        Inverse regularisation strength; None chooses it from ``Cs`` out of fold.
    Cs : sequence of float
        Candidates for ``C``.
    max_iter : int
        L-BFGS iterations.
    folds, seed, calibrate
        See :class:`vslib.heads.base.Head`.
    """

    kind = "linear"
    config_keys = {**Head.config_keys, "C": "C"}

    def __init__(self, *, folds: int = 5, seed: int = 42, calibrate: bool = True, C: Optional[float] = None,
                 Cs: Sequence[float] = DEFAULT_CS, max_iter: int = 1000):
        super().__init__(folds=folds, seed=seed, calibrate=calibrate)
        self.C = C
        self.Cs = Cs
        self.max_iter = max_iter

    def _model(self, C: float):
        from sklearn.linear_model import LogisticRegression

        return LogisticRegression(C=C, max_iter=self.max_iter, warm_start=True)

    def _fit(self, model, X, yi):
        from threadpoolctl import threadpool_limits

        # one BLAS thread: these problems are small, and threads that spin while other processes hold
        # the cores made a fit 8x slower on a busy 2-core machine
        with warnings.catch_warnings(), threadpool_limits(1):
            warnings.simplefilter("ignore")  # ConvergenceWarning at large C: the warm-started path still improves
            return model.fit(X, yi)

    def _cross_fit(self, X: np.ndarray, yi: np.ndarray) -> np.ndarray:
        n_classes = int(yi.max()) + 1
        Cs = sorted([float(self.C)] if self.C is not None else [float(c) for c in self.Cs])
        oof = {C: np.zeros((len(X), n_classes)) for C in Cs}
        for tr, held in fold_indices(yi, self.folds, self.seed):
            model = self._model(Cs[0])
            for C in Cs:  # ascending C, warm-started: each fit starts from the last solution
                model.set_params(C=C)
                self._fit(model, X[tr], yi[tr])
                oof[C][held] = _decision(model, X[held], n_classes)
        scores = {C: calibrated_nll(oof[C], yi) for C in Cs}
        self.C_ = min(Cs, key=lambda C: scores[C])
        self.selected_ = {"C": self.C_, "oof_nll_by_C": {str(C): round(s, 4) for C, s in scores.items()},
                          "oof_accuracy_by_C": {str(C): round(float(np.mean(oof[C].argmax(1) == yi)), 4)
                                                for C in Cs}}
        log.info("linear head: C = %g (out-of-fold NLL %s)", self.C_, self.selected_["oof_nll_by_C"])
        return oof[self.C_]

    def _fit_final(self, X: np.ndarray, yi: np.ndarray) -> None:
        model = self._fit(self._model(self.C_), X, yi)
        self.coef_, self.intercept_ = model.coef_.astype(np.float32), model.intercept_.astype(np.float64)
        self.model_classes_ = model.classes_

    def _logits(self, X: np.ndarray) -> np.ndarray:
        d = X @ self.coef_.T.astype(np.float64) + self.intercept_
        out = np.full((len(X), len(self.classes_)), -1e9)
        if d.shape[1] == 1:
            d = np.concatenate([np.zeros_like(d), d], axis=1)
        out[:, self.model_classes_] = d
        return out

    def _state(self) -> dict:
        return {"coef": self.coef_, "intercept": self.intercept_, "model_classes": self.model_classes_,
                "C": np.asarray(self.C_)}

    def _load_state(self, arrays: dict) -> None:
        self.coef_, self.intercept_ = arrays["coef"], arrays["intercept"]
        self.model_classes_, self.C_ = arrays["model_classes"], float(arrays["C"])
