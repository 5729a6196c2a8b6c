"""Temperature scaling and calibration metrics (numpy + scipy only).

Adaptive search spends probability mass: it searches the top classes until
their probabilities add up to ``search.mass``. That only works if a predicted
0.8 is right about 80 % of the time, so the classifier's logits are divided by
a temperature fitted on held-out data (Guo et al., 2017, "On Calibration of
Modern Neural Networks") and the expected calibration error is reported
before and after.
"""
from __future__ import annotations

import logging

import numpy as np

log = logging.getLogger(__name__)

#: the temperature is searched in [T_MIN, T_MAX]; a fit at a bound (e.g. every validation image
#: right, so the NLL keeps falling as T -> 0) means too little validation data to calibrate well
T_MIN, T_MAX = 0.05, 20.0


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Row-wise softmax of ``logits / temperature`` (float64, numerically stable)."""
    z = np.asarray(logits, dtype=np.float64) / float(temperature)
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def log_softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Row-wise log-softmax of ``logits / temperature``."""
    z = np.asarray(logits, dtype=np.float64) / float(temperature)
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def nll(logits: np.ndarray, y: np.ndarray, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of integer labels ``y`` under ``softmax(logits / T)``."""
    y = np.asarray(y, dtype=np.int64)
    if len(y) == 0:
        return float("nan")
    return float(-log_softmax(logits, temperature)[np.arange(len(y)), y].mean())


def expected_calibration_error(proba: np.ndarray, y: np.ndarray, n_bins: int = 15) -> float:
    """Top-label ECE: the bin-weighted gap between confidence and accuracy.

    Confidences (the highest probability of each row) are put in ``n_bins``
    equal-width bins over (0, 1]; ECE is ``sum_b |B_b|/n * |acc(B_b) - conf(B_b)|``.
    """
    proba = np.asarray(proba, dtype=np.float64)
    y = np.asarray(y, dtype=np.int64)
    if len(y) == 0:
        return float("nan")
    conf = proba.max(axis=1)
    correct = (proba.argmax(axis=1) == y).astype(np.float64)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    # bin b holds conf in (edges[b], edges[b+1]]; conf == 0 cannot happen for a softmax
    bins = np.clip(np.searchsorted(edges, conf, side="left") - 1, 0, n_bins - 1)
    ece = 0.0
    for b in range(n_bins):
        m = bins == b
        if m.any():
            ece += m.mean() * abs(correct[m].mean() - conf[m].mean())
    return float(ece)


def fit_temperature(logits: np.ndarray, y: np.ndarray) -> float:
    """The temperature ``T > 0`` that minimises the NLL of ``y`` under ``softmax(logits / T)``.

    A bounded 1-D search over ``log T``. ``T = 1`` (no change) is returned
    when the search does not beat it, so calibration never raises the NLL of
    the data it was fitted on.
    """
    from scipy.optimize import minimize_scalar

    logits = np.asarray(logits, dtype=np.float64)
    y = np.asarray(y, dtype=np.int64)
    if len(y) == 0:
        return 1.0
    lo, hi = np.log(T_MIN), np.log(T_MAX)
    res = minimize_scalar(lambda log_t: nll(logits, y, np.exp(log_t)), bounds=(lo, hi),
                          method="bounded", options={"xatol": 1e-4})
    t = float(np.exp(res.x))
    if nll(logits, y, t) >= nll(logits, y, 1.0):
        return 1.0
    if min(res.x - lo, hi - res.x) < 1e-2:
        log.warning("temperature %.3g is at the edge of [%g, %g]: %d validation rows are too few (or too "
                    "easy) to calibrate reliably", t, T_MIN, T_MAX, len(y))
    return t


def calibration_report(logits: np.ndarray, y: np.ndarray, temperature: float, n_bins: int = 15) -> dict:
    """NLL and ECE of ``logits`` before (T = 1) and after dividing by ``temperature``."""
    return {
        "temperature": float(temperature),
        "nll_before": nll(logits, y, 1.0),
        "nll_after": nll(logits, y, temperature),
        "ece_before": expected_calibration_error(softmax(logits, 1.0), y, n_bins),
        "ece_after": expected_calibration_error(softmax(logits, temperature), y, n_bins),
        "ece_bins": n_bins,
    }
