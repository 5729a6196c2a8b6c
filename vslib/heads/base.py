"""The contract every classifier head keeps, and the cross-fitted heads' base.

A head maps embeddings ``(n, dim)`` to calibrated class probabilities.
:class:`HeadMixin` gives every head (``mlp`` and ``fine_tuned`` included) its
prediction, evaluation, image and saving methods; :func:`check_trainable` and
:func:`stratified_split` say what it may train on.

The heads on :class:`Head` (``linear``, ``knn``, ``ensemble``) use *cross-fitting*: :meth:`Head.fit` first computes out-of-fold
logits for every training row (each row predicted by a model that never saw
it), chooses its own hyperparameters and a temperature on those, and only
then fits the final model on **all** rows. No image is held back, and the
calibration is honest.

After :meth:`Head.fit`:

``classes_``
    the labels, sorted; columns of every probability matrix.
``oof_logits_``, ``oof_proba_``
    out-of-fold logits and calibrated probabilities of the training rows
    (what the adaptive search settings are tuned on, :func:`vslib.ranking.tune_adaptive`).
``temperature_``, ``calibration_``
    the temperature fitted on the out-of-fold logits and NLL/ECE before and after.
``selected_``
    the hyperparameters chosen out of fold, with their out-of-fold scores.

Subclasses implement ``_cross_fit(X, yi) -> oof_logits`` (choosing their
hyperparameters), ``_fit_final(X, yi)``, ``_logits(X)`` and ``_state()`` /
``_load_state(arrays)`` for persistence.
"""
from __future__ import annotations

import inspect
import logging
import os
import zipfile
import zlib
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
from PIL import Image

from vslib import calibration
from vslib.atomic import atomic_path
from vslib.backbones import get_backbone
from vslib.embedding import embed_images
from vslib.errors import ClassifierError
from vslib.heads.format import FORMAT_VERSION, LABELS_FILE, METADATA_FILE, RETRAIN, STATE_FILE, write_json
from vslib.integrity import DamagedFile

log = logging.getLogger(__name__)

#: images per class a head needs: one to train on, one to validate on
MIN_PER_CLASS = 2


def _describe_counts(counts: dict, limit: int = 20) -> str:
    items = [f"{str(label)!r} ({n})" for label, n in sorted(counts.items(), key=lambda kv: (kv[1], str(kv[0])))]
    more = f", and {len(items) - limit} more" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


def check_trainable(labels: Sequence, min_per_class: int = MIN_PER_CLASS) -> None:
    """Raise :class:`ClassifierError` unless ``labels`` has >= 2 classes of >= ``min_per_class`` images."""
    values, counts = np.unique(np.asarray(labels, dtype=object).astype(str), return_counts=True)
    if len(values) < 2:
        found = f"only {str(values[0])!r} ({counts[0]} images)" if len(values) else "no images at all"
        raise ClassifierError(
            f"the classifier needs at least 2 classes in the index split; found {found}. "
            "Use a dataset with more categories (dataset.name / dataset.root in application.yaml).")
    small = {v: int(c) for v, c in zip(values, counts) if c < min_per_class}
    if small:
        raise ClassifierError(
            f"the classifier needs at least {min_per_class} images per class in the index split (one to train "
            f"on, one to validate on); too few in {len(small)} of {len(values)} classes: {_describe_counts(small)}. "
            "Raise dataset.min_per_class in application.yaml to drop such classes, or add images.")


def stratified_split(labels: Sequence, fraction: float, seed: int = 42) -> tuple[np.ndarray, np.ndarray]:
    """Seeded stratified (train, validation) row indices, every class kept in train.

    Uses scikit-learn's ``train_test_split(stratify=...)``; when the classes are
    too small for it (fewer validation rows than classes), falls back to taking
    ``round(fraction * n)`` rows of each class, at least one from every class
    of >= 2 rows, never a class's last row.
    """
    from sklearn.model_selection import train_test_split

    labels = np.asarray(labels, dtype=object).astype(str)
    n = len(labels)
    idx = np.arange(n)
    if fraction <= 0 or n == 0:
        return idx, idx[:0]
    values, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    try:
        if counts.min() < 2:
            raise ValueError("a class has a single member")
        tr, va = train_test_split(idx, test_size=fraction, random_state=seed, stratify=labels)
        if len(np.unique(labels[tr])) != len(values):
            raise ValueError("a class lost all its training rows")
    except ValueError as e:
        log.debug("stratified split by class quota instead of train_test_split: %s", e)
        rng = np.random.default_rng(seed)
        va_parts = []
        for c, count in enumerate(counts):
            rows = rng.permutation(idx[inverse == c])
            k = min(count - 1, max(1, int(round(fraction * count)))) if count >= 2 else 0
            va_parts.append(rows[:k])
        va = np.sort(np.concatenate(va_parts)) if va_parts else idx[:0]
        tr = np.setdiff1d(idx, va)
    return np.sort(tr), np.sort(va)


def as_matrix(X, name: str = "X") -> np.ndarray:
    X = np.asarray(X, dtype=np.float32)
    if X.ndim != 2:
        raise ClassifierError(f"{name} must be a 2-D array (n, dim) of embeddings, not shape {X.shape}")
    return X


def n_folds(yi: np.ndarray, folds: int) -> int:
    """Folds for cross-fitting: at most ``folds``, at most the smallest class size, at least 2."""
    return int(max(2, min(folds, np.bincount(yi).min())))


def fold_indices(yi: np.ndarray, folds: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Stratified, seeded ``(train, held_out)`` row indices; every row is held out exactly once."""
    from sklearn.model_selection import StratifiedKFold

    skf = StratifiedKFold(n_folds(yi, folds), shuffle=True, random_state=seed)
    return list(skf.split(np.zeros(len(yi)), yi))


class Estimator:
    """scikit-learn's estimator protocol, without importing scikit-learn.

    ``get_params``, ``set_params`` and ``_get_param_names`` read the
    ``__init__`` signature exactly as ``sklearn.base.BaseEstimator``'s do, so
    ``sklearn.base.clone`` and parameter grids work on every head; scikit-learn's
    tags (``__sklearn_tags__``: a classifier) import it when asked. Why not the
    base class itself: importing ``sklearn.base`` takes ~0.7 s (it imports
    ``scipy.stats``), more than everything else a query loads, and a query only
    predicts (fitting imports scikit-learn's estimators where it uses them).
    """

    _estimator_type = "classifier"

    @classmethod
    def _get_param_names(cls) -> list[str]:
        init = cls.__init__
        if init is object.__init__:
            return []
        params = [p for p in inspect.signature(init).parameters.values() if p.name != "self" and p.kind != p.VAR_KEYWORD]
        if any(p.kind == p.VAR_POSITIONAL for p in params):
            raise RuntimeError(f"{cls.__name__}: an estimator's __init__ takes no *args (scikit-learn's convention)")
        return sorted(p.name for p in params)

    def get_params(self, deep: bool = True) -> dict:
        out = {}
        for key in self._get_param_names():
            value = getattr(self, key)
            if deep and hasattr(value, "get_params") and not isinstance(value, type):
                out.update((f"{key}__{k}", v) for k, v in value.get_params().items())
            out[key] = value
        return out

    def set_params(self, **params):
        valid = self.get_params(deep=True)
        nested: dict[str, dict] = {}
        for key, value in params.items():
            name, delim, sub = key.partition("__")
            if name not in valid:
                raise ValueError(f"Invalid parameter {name!r} for estimator {self}. Valid parameters are: "
                                 f"{sorted(self._get_param_names())!r}.")
            if delim:
                nested.setdefault(name, {})[sub] = value
            else:
                setattr(self, name, value)
                valid[name] = value
        for name, sub in nested.items():
            valid[name].set_params(**sub)
        return self

    def __sklearn_tags__(self):
        from sklearn.base import BaseEstimator, ClassifierMixin

        class _Classifier(ClassifierMixin, BaseEstimator):
            pass

        return _Classifier().__sklearn_tags__()


class HeadMixin:
    """Prediction, evaluation, saving and image helpers shared by every head.

    Mixed into :class:`Estimator` (whose ``__init__`` signature gives
    ``get_params``, ``set_params`` and ``clone``); needs ``classes_`` and
    ``predict_logits``.
    """

    temperature_: float = 1.0
    #: the keys of :class:`vslib.config.ClassifierConfig` (``classifier.*``) this head takes -> its parameters
    config_keys: dict[str, str] = {}

    @classmethod
    def from_config(cls, ccfg, **kw):
        """An unfitted head with the settings of ``ccfg`` (``cfg.classifier``) named by :attr:`config_keys`.

        ``kw`` overrides parameters.
        """
        params = {param: getattr(ccfg, key) for key, param in cls.config_keys.items()}
        params.update(kw)
        return cls(**params)

    def _signature_params(self) -> dict:
        """``get_params()`` in the order of the ``__init__`` signature: what repr prints, metadata.json keeps."""
        params = self.get_params(deep=False)
        return {name: params[name] for name in inspect.signature(type(self).__init__).parameters if name in params}

    @classmethod
    def _saved_params(cls, meta: dict) -> dict:
        """The constructor parameters in a saved ``metadata.json`` (JSON lists back to the tuples they were)."""
        names = cls._get_param_names()
        return {k: tuple(v) if isinstance(v, list) else v for k, v in meta.get("params", {}).items() if k in names}

    def __repr__(self) -> str:
        # every parameter (scikit-learn's repr shows only those that differ from the defaults)
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in self._signature_params().items())})"

    def _check_fitted(self):
        if not hasattr(self, "classes_"):
            raise ClassifierError(f"this {type(self).__name__} is not fitted yet; call fit() or load_classifier(cfg)")

    def encode_labels(self, y, where: str) -> np.ndarray:
        """The integer class of each label of ``y`` (its position in ``classes_``); a label the training data
        lacks raises :class:`~vslib.errors.ClassifierError` naming ``where`` they come from."""
        y = np.asarray(y, dtype=object).astype(str)
        pos = np.clip(np.searchsorted(self.classes_, y), 0, len(self.classes_) - 1)
        unknown = sorted(map(str, set(y[self.classes_[pos] != y])))
        if unknown:
            raise ClassifierError(f"{where} has labels the training data lacks: {unknown[:20]}"
                                  f"{' ...' if len(unknown) > 20 else ''}")
        return pos.astype(np.int64)

    def _checked(self, X) -> np.ndarray:
        """``X`` as a float32 matrix of the width the classifier was trained on (raises otherwise)."""
        self._check_fitted()
        X = as_matrix(X)
        if X.shape[1] != self.n_features_in_:
            raise ClassifierError(f"X has {X.shape[1]} features but the classifier was trained on "
                                  f"{self.n_features_in_} (another backbone?)")
        return X

    def _save(self, directory, metadata: Optional[dict], fields: dict, state_file: str, write_state) -> Path:
        """Write the model state (``write_state(tmp_path)``, atomically), then ``labels.json`` and ``metadata.json``.

        ``metadata.json`` is written last: its presence marks a complete model.
        """
        self._check_fitted()
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        meta = dict(metadata or {})
        meta.update({"format_version": FORMAT_VERSION, "kind": self.kind, "params": self._signature_params(),
                     "n_features": int(self.n_features_in_), "n_classes": int(len(self.classes_)),
                     **fields, "temperature": float(self.temperature_), "calibration": self.calibration_})
        for attr in ("backbone_", "backbone_weights_", "dataset_", "vectors_"):
            if getattr(self, attr, None) is not None:
                meta.setdefault(attr.rstrip("_"), getattr(self, attr))
        with atomic_path(directory / state_file, suffix=Path(state_file).suffix, verified=True) as tmp:
            write_state(tmp)
        write_json(directory / LABELS_FILE, [str(c) for c in self.classes_])
        write_json(directory / METADATA_FILE, meta)  # each with its checksum sidecar (vslib.integrity)
        self.metadata_ = meta
        return directory

    def predict_proba(self, X) -> np.ndarray:
        """Calibrated probabilities ``softmax(logits / temperature_)`` (n, n_classes)."""
        return calibration.softmax(self.predict_logits(X), self.temperature_)

    def predict(self, X) -> np.ndarray:
        """The most probable label of each row."""
        return self.classes_[self.predict_logits(X).argmax(axis=1)]

    def score(self, X, y) -> float:
        """Accuracy on ``(X, y)``."""
        return float(np.mean(self.predict(X) == np.asarray(y, dtype=object).astype(str)))

    def evaluate(self, X, y, *, top_k: int = 3) -> dict:
        """Accuracy, top-k accuracy, per-class precision/recall, confusion matrix, NLL and ECE."""
        self._check_fitted()
        return classification_report(self.predict_logits(X), self.encode_labels(y, "the evaluation data"),
                                     self.classes_, self.temperature_, top_k=top_k)

    def query_proba(self, vectors, images: Sequence) -> np.ndarray:
        """Calibrated probabilities (n, n_classes) of query images, given their embeddings and the images.

        A head on embeddings classifies ``vectors``; one that reads pixels
        (:class:`~vslib.heads.fine_tuned.FineTunedHead`) classifies ``images``.
        """
        return self.predict_proba(vectors)

    def predict_image(self, images, backbone=None) -> np.ndarray:
        """Calibrated probabilities (n, n_classes) of image files, PIL images or uint8 arrays.

        A single image gives one row. The images are embedded with ``backbone``
        (default: the one the classifier was trained on) exactly as the feature
        cache embeds them (:func:`vslib.embedding.embed_images`).
        """
        self._check_fitted()
        if is_single_image(images):
            images = [images]
        trained_on = getattr(self, "backbone_", None)
        if backbone is None:
            backbone = self._get_backbone()
        elif trained_on and backbone.name != trained_on:
            raise ClassifierError(f"the classifier was trained on backbone {trained_on!r} but was given "
                                  f"{backbone.name!r}")
        vectors = getattr(self, "vectors_", None)
        if vectors and getattr(backbone, "vector_key", vectors) != vectors:
            raise ClassifierError(f"the classifier was trained on vectors {vectors} but the backbone gives "
                                  f"{backbone.vector_key} (another precision?); pass "
                                  "backbone=vslib.backbones.backbone_from_config(cfg) of its config")
        return self.predict_proba(embed_images(backbone, list(images)))

    def _get_backbone(self):
        if getattr(self, "_backbone", None) is None:
            name = getattr(self, "backbone_", None)
            if not name:
                raise ClassifierError("this classifier does not know its backbone; pass backbone= to predict_image")
            if ":int8-" in (getattr(self, "vectors_", None) or ""):
                raise ClassifierError("this classifier was trained on int8 vectors: pass "
                                      "backbone=vslib.backbones.backbone_from_config(cfg) of its config")
            self._backbone = get_backbone(name, weights=getattr(self, "backbone_weights_", None))
        return self._backbone


def classification_report(logits: np.ndarray, yi: np.ndarray, classes: Sequence, temperature: float,
                          *, top_k: int = 3) -> dict:
    """The metrics of :meth:`HeadMixin.evaluate` from logits and integer labels."""
    from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

    proba = calibration.softmax(logits, temperature)
    pred = proba.argmax(axis=1)
    k = min(top_k, len(classes))
    topk = np.argsort(-proba, axis=1)[:, :k]
    labels = np.arange(len(classes))
    prec, rec, f1, support = precision_recall_fscore_support(yi, pred, labels=labels, zero_division=0)
    cm = confusion_matrix(yi, pred, labels=labels)
    return {
        "n": int(len(yi)),
        "n_classes": int(len(classes)),
        "chance": 1.0 / len(classes),
        "accuracy": float(np.mean(pred == yi)),
        f"top{k}_accuracy": float(np.mean((topk == yi[:, None]).any(axis=1))),
        **calibration.calibration_report(logits, yi, temperature),
        "macro_precision": float(prec.mean()),
        "macro_recall": float(rec.mean()),
        "per_class": {str(c): {"precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
                      for c, p, r, f, s in zip(classes, prec, rec, f1, support)},
        "confusion_matrix": {"labels": [str(c) for c in classes], "matrix": cm.tolist()},
    }


class Head(HeadMixin, Estimator):
    """Base of the cross-fitted heads (``linear``, ``knn``, ``ensemble``).

    Parameters common to all: ``folds`` (cross-fitting folds, capped by the
    smallest class), ``seed``, ``calibrate`` (fit a temperature out of fold).
    """

    kind = "head"
    state_file = STATE_FILE
    config_keys = {"folds": "folds", "seed": "seed", "calibrate": "calibrate"}

    def __init__(self, *, folds: int = 5, seed: int = 42, calibrate: bool = True):
        self.folds = folds
        self.seed = seed
        self.calibrate = calibrate

    # -- the contract subclasses fill in ---------------------------------------
    def _cross_fit(self, X: np.ndarray, yi: np.ndarray) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError

    def _fit_final(self, X: np.ndarray, yi: np.ndarray) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def _logits(self, X: np.ndarray) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError

    def _state(self) -> dict[str, np.ndarray]:  # pragma: no cover - abstract
        raise NotImplementedError

    def _load_state(self, arrays: dict[str, np.ndarray]) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    # -- fitting ---------------------------------------------------------------
    def fit(self, X, y) -> "Head":
        """Cross-fit (hyperparameters, temperature) on ``X``, ``y``, then fit on all of it."""
        X = as_matrix(X)
        y = np.asarray(y, dtype=object).astype(str)
        if len(y) != len(X):
            raise ClassifierError(f"X has {len(X)} rows but y has {len(y)} labels")
        check_trainable(y)
        self.classes_ = np.unique(y)
        self.n_features_in_ = X.shape[1]
        yi = self.encode_labels(y, "training data")
        self.selected_ = {}
        oof = np.asarray(self._cross_fit(X, yi), dtype=np.float64)
        self.temperature_ = calibration.fit_temperature(oof, yi) if self.calibrate else 1.0
        self.calibration_ = calibration.calibration_report(oof, yi, self.temperature_)
        self.oof_logits_ = oof
        self.oof_proba_ = calibration.softmax(oof, self.temperature_)
        self.oof_accuracy_ = float(np.mean(oof.argmax(1) == yi))
        self._fit_final(X, yi)
        self.n_train_ = len(yi)
        return self

    def predict_logits(self, X) -> np.ndarray:
        """Uncalibrated logits (n, n_classes), columns in the order of ``classes_``."""
        X = self._checked(X)
        if len(X) == 0:
            return np.zeros((0, len(self.classes_)), np.float64)
        return np.asarray(self._logits(X), dtype=np.float64)

    # -- persistence -------------------------------------------------------------
    def save(self, directory, metadata: Optional[dict] = None) -> Path:
        """Write ``head.npz``, ``labels.json`` and ``metadata.json`` (last: it marks a complete model)."""
        fields = {"selected": self.selected_, "n_train": int(self.n_train_), "oof_accuracy": self.oof_accuracy_}
        return self._save(directory, metadata, fields, self.state_file, lambda tmp: np.savez(tmp, **self._state()))

    @classmethod
    def _from_saved(cls, directory: Path, meta: dict, labels: list) -> "Head":
        head = cls(**cls._saved_params(meta))
        head.classes_ = np.asarray(labels, dtype=object).astype(str)
        head.n_features_in_ = int(meta["n_features"])
        try:
            with np.load(directory / STATE_FILE) as z:
                head._load_state({k: z[k] for k in z.files})
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, zlib.error) as e:
            raise DamagedFile(directory / STATE_FILE, f"unreadable: {e}", RETRAIN) from None
        head.n_train_ = int(meta.get("n_train", 0))
        head.selected_ = meta.get("selected", {})
        head.oof_accuracy_ = meta.get("oof_accuracy")
        head.temperature_ = float(meta.get("temperature", 1.0))
        head.calibration_ = meta.get("calibration", {})
        return head


def is_single_image(x: Any) -> bool:
    return isinstance(x, (str, os.PathLike, Image.Image)) or (isinstance(x, np.ndarray) and x.ndim in (2, 3))
