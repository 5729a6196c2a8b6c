"""First level of the hierarchy: predict an image's category, with calibrated probabilities.

``classifier.head`` picks the head trained on the cached embeddings of the
*index* split (the query split is never read here: it belongs to
:mod:`vslib.evaluate`):

``ensemble`` (default), ``linear``, ``knn``
    cross-fitted heads of :mod:`vslib.heads`: trained on the whole index
    split, with their settings and temperature chosen out of fold.
``mlp``
    :class:`EmbeddingClassifier`, a light Keras head (standardise, optional
    hidden layer with dropout, then logits); a stratified part of the index
    split is held out for early stopping and the temperature.

:func:`train` also chooses the adaptive search settings on the index split
(:func:`vslib.ranking.tune_adaptive`) from the head's out-of-fold
probabilities and stores them with the model. Temperatures live in
``metadata.json`` and are applied in numpy by ``predict_proba``, so every
caller gets the same calibrated probabilities.

>>> clf, metrics = train(cfg)            # or: visualsearch train -c application.yaml
>>> clf = load_classifier(cfg)
>>> clf.predict_proba(vectors)           # (n, n_classes), rows sum to 1
>>> clf.predict_image("cat.png")         # embed with the backbone, then predict_proba
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import hashlib
import json
import logging
import zipfile
import zlib
from pathlib import Path
from typing import Iterable, Optional, Sequence

import numpy as np

from vslib import calibration, integrity
from vslib.errors import ClassifierError
from vslib.heads import HEADS
from vslib.locks import locked
from vslib.heads.base import RETRAIN, ClassifierMixin, as_matrix as _as_matrix, classification_report
from vslib.heads.base import is_single_image as _is_single_image, write_json as _write_json

log = logging.getLogger(__name__)

#: bump when a change to this module makes older saved models stale
FORMAT_VERSION = 2
MODEL_FILE = "model.keras"
LABELS_FILE = "labels.json"
METADATA_FILE = "metadata.json"
METRICS_FILE = "classifier_metrics.json"
CONFUSION_FIGURE = "confusion_matrix.png"
#: images per class the head needs: one to train on, one to validate on
MIN_PER_CLASS = 2


def _keras():
    import keras  # heavy: imported when a model is built or loaded

    return keras


# ---------------------------------------------------------------------------
# Checks and splits


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


# ---------------------------------------------------------------------------
# The estimator


class EmbeddingClassifier(ClassifierMixin):
    """``mlp``: softmax (optionally one hidden layer) Keras head on embeddings, temperature-calibrated.

    Parameters
    ----------
    hidden_units : int
        0 = a linear layer straight to the logits; > 0 adds a ReLU layer of this width.
    dropout : float
        Dropout after the hidden layer (ignored without one).
    epochs, batch_size, learning_rate, weight_decay
        Adam training with an L2 penalty of ``weight_decay`` on the kernels.
    validation_fraction : float
        Share of each class held out when :meth:`fit` gets no validation data.
    seed : int
        Seeds the split, the initialisation and the shuffling.
    calibrate : bool
        Fit a temperature on the validation data (otherwise ``temperature_ = 1``).
    patience : int
        Early stopping patience (epochs without a lower validation loss); the
        best weights are restored.
    verbose : int
        Keras ``fit`` verbosity.
    """

    def __init__(self, hidden_units: int = 0, dropout: float = 0.2, epochs: int = 60, batch_size: int = 64,
                 learning_rate: float = 1e-3, weight_decay: float = 1e-4, validation_fraction: float = 0.2,
                 seed: int = 42, calibrate: bool = True, patience: int = 10, verbose: int = 0):
        self.hidden_units = hidden_units
        self.dropout = dropout
        self.epochs = epochs
        self.batch_size = batch_size
        self.learning_rate = learning_rate
        self.weight_decay = weight_decay
        self.validation_fraction = validation_fraction
        self.seed = seed
        self.calibrate = calibrate
        self.patience = patience
        self.verbose = verbose

    kind = "embedding"
    _PARAMS = ("hidden_units", "dropout", "epochs", "batch_size", "learning_rate", "weight_decay",
               "validation_fraction", "seed", "calibrate", "patience", "verbose")

    # -- fitting ------------------------------------------------------------
    def _build(self, X_train: np.ndarray, n_classes: int):
        keras = _keras()
        reg = keras.regularizers.L2(self.weight_decay) if self.weight_decay else None
        inputs = keras.Input((X_train.shape[1],), name="embedding")
        norm = keras.layers.Normalization(axis=-1, name="standardise")
        norm.adapt(X_train)
        x = norm(inputs)
        if self.hidden_units:
            x = keras.layers.Dense(self.hidden_units, activation="relu", kernel_regularizer=reg, name="hidden")(x)
            if self.dropout:
                x = keras.layers.Dropout(self.dropout, seed=self.seed, name="dropout")(x)
        logits = keras.layers.Dense(n_classes, kernel_regularizer=reg, name="logits")(x)
        model = keras.Model(inputs, logits, name="classifier_head")
        model.compile(optimizer=keras.optimizers.Adam(self.learning_rate),
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                      metrics=["accuracy"])
        return model

    def fit(self, X, y, X_val=None, y_val=None) -> "EmbeddingClassifier":
        """Train on ``X`` (n, dim) with labels ``y``; early-stop and calibrate on the validation data.

        Without ``X_val``, a stratified ``validation_fraction`` of ``X`` is held
        out (:func:`stratified_split`). Raises :class:`ClassifierError` for
        fewer than 2 classes or a class with fewer than 2 images.
        """
        keras = _keras()
        X = _as_matrix(X, "X")
        y = np.asarray(y, dtype=object).astype(str)
        if len(y) != len(X):
            raise ClassifierError(f"X has {len(X)} rows but y has {len(y)} labels")
        if X_val is None:
            check_trainable(y)
            tr, va = stratified_split(y, self.validation_fraction, self.seed)
            X, X_val, y, y_val = X[tr], X[va], y[tr], y[va]
        else:
            X_val = _as_matrix(X_val, "X_val")
            y_val = np.asarray(y_val, dtype=object).astype(str)
            check_trainable(np.concatenate([y, y_val]))
            if X_val.shape[1] != X.shape[1]:
                raise ClassifierError(f"X_val has {X_val.shape[1]} features but X has {X.shape[1]}")
        self.classes_ = np.unique(y)
        if len(self.classes_) < 2:
            raise ClassifierError(f"the training part holds a single class {str(self.classes_[0])!r}")
        self.n_features_in_ = X.shape[1]
        yi = self._encode(y, "training data")
        yv = self._encode(y_val, "the validation data") if len(y_val) else np.zeros(0, np.int64)

        keras.utils.set_random_seed(self.seed)
        self.model_ = self._build(X, len(self.classes_))
        callbacks, validation = [], None
        if len(yv):
            validation = (X_val, yv)
            callbacks.append(keras.callbacks.EarlyStopping(monitor="val_loss", patience=self.patience,
                                                           restore_best_weights=True))
        hist = self.model_.fit(X, yi, validation_data=validation, epochs=self.epochs,
                               batch_size=self.batch_size, shuffle=True, callbacks=callbacks,
                               verbose=self.verbose)
        self._finish_fit(hist, yi, X_val, yv)
        log.info("classifier: %d classes, %d train / %d validation, %d epochs, temperature %.3f",
                 len(self.classes_), self.n_train_, self.n_val_, self.n_epochs_, self.temperature_)
        return self

    def _finish_fit(self, hist, yi: np.ndarray, X_val, yv: np.ndarray) -> None:
        """Record the training history and sizes; fit the temperature on the validation data."""
        self.history_ = {k: [float(v) for v in vals] for k, vals in hist.history.items()}
        self.n_epochs_ = len(self.history_.get("loss", []))
        self.n_train_, self.n_val_ = len(yi), len(yv)
        self.temperature_, self.calibration_ = 1.0, {}
        if len(yv):
            logits = self.predict_logits(X_val)
            if self.calibrate:
                self.temperature_ = calibration.fit_temperature(logits, yv)
            self.calibration_ = calibration.calibration_report(logits, yv, self.temperature_)

    # -- predicting ---------------------------------------------------------
    def _check_fitted(self):
        if not hasattr(self, "model_"):
            raise ClassifierError(f"this {type(self).__name__} is not fitted yet; call fit() or load_classifier(cfg)")

    def predict_logits(self, X) -> np.ndarray:
        """Uncalibrated logits (n, n_classes), columns in the order of ``classes_``."""
        X = self._checked(X)
        if len(X) == 0:
            return np.zeros((0, len(self.classes_)), np.float32)
        # direct calls: model.predict would retrace its tf.function for every new batch shape
        step = 4096
        return np.concatenate([np.asarray(self.model_(X[i:i + step], training=False), np.float32)
                               for i in range(0, len(X), step)])

    # -- persistence --------------------------------------------------------
    def save(self, directory, metadata: Optional[dict] = None) -> Path:
        """Write ``model.keras``, ``labels.json`` and ``metadata.json`` into ``directory``."""
        fields = {"n_train": int(self.n_train_), "n_val": int(self.n_val_), "n_epochs": int(self.n_epochs_)}
        return self._save(directory, metadata, fields, MODEL_FILE, self.model_.save)

    @classmethod
    def load(cls, directory):
        """Load any saved classifier (every head kind): see :func:`load_model`."""
        return load_model(directory)

    @classmethod
    def _from_saved(cls, directory: Path, meta: dict, labels: list) -> "EmbeddingClassifier":
        params = {k: v for k, v in meta.get("params", {}).items() if k in cls._PARAMS}
        clf = cls(**params)
        if "input_size" in meta:
            clf.input_size_ = int(meta["input_size"])
        try:
            clf.model_ = _keras().models.load_model(directory / MODEL_FILE, compile=False)
        except (OSError, ValueError) as e:
            raise ClassifierError(f"{directory / MODEL_FILE} is unreadable ({e}); retrain with "
                                  "`visualsearch train`") from None
        clf.classes_ = np.asarray(labels, dtype=object).astype(str)
        clf.n_features_in_ = int(meta["n_features"])
        clf.n_train_, clf.n_val_ = int(meta.get("n_train", 0)), int(meta.get("n_val", 0))
        clf.n_epochs_ = int(meta.get("n_epochs", 0))
        clf.temperature_ = float(meta.get("temperature", 1.0))
        clf.calibration_ = meta.get("calibration", {})
        if clf.model_.output_shape[-1] != len(clf.classes_):
            raise ClassifierError(f"{directory}: the model has {clf.model_.output_shape[-1]} outputs but "
                                  f"{LABELS_FILE} lists {len(clf.classes_)} labels; retrain with `visualsearch train`")
        return clf


def load_model(directory):
    """Load what a head's ``save`` wrote, whatever its kind. Raises :class:`ClassifierError` if missing or incomplete."""
    directory = Path(directory)
    for name in (METADATA_FILE, LABELS_FILE, MODEL_FILE, "head.npz"):  # small files: a full check on every load
        if (directory / name).exists() or integrity.sidecar(directory / name).exists():
            integrity.verify(directory / name, full=True, redo=RETRAIN)
    try:
        meta = json.loads((directory / METADATA_FILE).read_text())
        labels = json.loads((directory / LABELS_FILE).read_text())
    except FileNotFoundError as e:
        raise ClassifierError(f"no complete classifier in {directory} (missing {Path(e.filename).name})") from None
    except (OSError, ValueError) as e:
        raise integrity.DamagedFile(directory, f"unreadable: {e}", RETRAIN) from None
    if not isinstance(meta, dict) or not isinstance(labels, list):
        raise integrity.DamagedFile(directory / METADATA_FILE, "not the JSON a classifier writes", RETRAIN)
    if meta.get("format_version") != FORMAT_VERSION:
        raise ClassifierError(f"{directory} holds a classifier of format {meta.get('format_version')}; "
                              f"this version reads format {FORMAT_VERSION}. Retrain with `visualsearch train`.")
    kinds = {**HEADS, EmbeddingClassifier.kind: EmbeddingClassifier, FineTunedClassifier.kind: FineTunedClassifier}
    klass = kinds.get(meta.get("kind"))
    if klass is None:
        raise ClassifierError(f"{directory} holds a classifier of unknown kind {meta.get('kind')!r} "
                              f"(known: {', '.join(sorted(kinds))}); retrain with `visualsearch train`")
    state = directory / (MODEL_FILE if issubclass(klass, EmbeddingClassifier) else "head.npz")
    if not state.is_file():
        raise ClassifierError(f"no complete classifier in {directory} (missing {state.name})")
    try:
        clf = klass._from_saved(directory, meta, labels)
    except (ClassifierError, integrity.DamagedFile):
        raise
    except (OSError, ValueError, KeyError, TypeError, EOFError, zipfile.BadZipFile, zlib.error) as e:
        raise integrity.DamagedFile(state, f"unreadable: {type(e).__name__}: {e}", RETRAIN) from None
    clf.backbone_ = meta.get("backbone")
    clf.backbone_weights_ = meta.get("backbone_weights")
    clf.dataset_ = meta.get("dataset")
    clf.metadata_ = meta
    return clf


# ---------------------------------------------------------------------------
# Pipeline entry points


def fingerprint(index_features, cfg) -> str:
    """A key of everything training depends on: the index vectors and labels, backbone, dataset, settings."""
    h = hashlib.sha256()
    h.update(f"v{FORMAT_VERSION}|{cfg.backbone.name}|{cfg.backbone.weights}|{cfg.dataset.name}|"
             f"k={tuning_k(cfg)}|".encode())
    h.update(json.dumps(dataclasses.asdict(cfg.classifier), sort_keys=True).encode())
    h.update(np.ascontiguousarray(index_features.vectors, dtype=np.float32).tobytes())
    table = index_features.table
    for col in ("label", "content_hash"):
        if col in table:
            h.update("\0".join(table[col].astype(str)).encode())
    return h.hexdigest()


def _cached(cfg, key: str):
    directory = cfg.classifier_dir
    try:
        meta = json.loads((directory / METADATA_FILE).read_text())
    except (OSError, ValueError):
        return None
    if meta.get("fingerprint") != key:
        return None
    try:
        return load_model(directory)
    except (ClassifierError, integrity.DamagedFile, OSError, ValueError) as e:
        log.warning("retraining: the saved classifier in %s cannot be loaded (%s)", directory, e)
        return None


def audit(cfg) -> list:
    """Full check of the configured classifier's files (:class:`~vslib.integrity.Finding` each), and that it loads."""
    directory = cfg.classifier_dir
    if not (directory / METADATA_FILE).exists():
        return [integrity.Finding(str(directory), "classifier", "missing", "not trained yet",
                                  "`visualsearch train` trains it")]
    out = [integrity.audit_file(p, "classifier", RETRAIN) for p in sorted(directory.iterdir())
           if p.is_file() and not p.name.endswith(integrity.SIDECAR) and not p.name.startswith(".")
           and not p.name.endswith(integrity.DAMAGED)]
    if not any(f.bad for f in out):
        try:
            load_model(directory)
        except (ClassifierError, integrity.DamagedFile) as e:
            out.append(integrity.Finding(str(directory), "classifier", "damaged", str(e), RETRAIN))
    return out


def make_head(ccfg):
    """An unfitted head of ``classifier.head`` with its settings from ``ccfg`` (a :class:`ClassifierConfig`)."""
    if ccfg.head == "mlp":
        return EmbeddingClassifier.from_config(ccfg)
    kw = {"folds": ccfg.folds, "seed": ccfg.seed, "calibrate": ccfg.calibrate}
    if ccfg.head in ("linear", "ensemble"):
        kw["C"] = ccfg.C
    if ccfg.head in ("knn", "ensemble"):
        kw["n_neighbors"] = ccfg.neighbors
    return HEADS[ccfg.head](**kw)


def fit_head(X: np.ndarray, labels: np.ndarray, ccfg):
    """Fit the head of ``ccfg`` on ``(X, labels)``.

    Returns ``(head, rows, proba, metrics)``: ``proba`` are calibrated
    probabilities of ``X[rows]`` from models that never saw those rows (every
    row, out of fold, for the cross-fitted heads; the held-out validation
    part for ``mlp``), and ``metrics`` are computed on them.
    """
    head = make_head(ccfg)
    if isinstance(head, EmbeddingClassifier):
        tr, va = stratified_split(labels, ccfg.validation_fraction, ccfg.seed)
        head.fit(X[tr], labels[tr], X[va], labels[va])
        metrics = head.evaluate(X[va], labels[va])
        metrics["train_accuracy"] = head.score(X[tr], labels[tr])
        metrics["evaluated_on"] = ("validation part of the index split (also used for early stopping and the "
                                   "temperature); the query split is evaluated by `visualsearch evaluate`")
        return head, va, head.predict_proba(X[va]), metrics
    head.fit(X, labels)
    yi = head._encode(labels, "training data")
    metrics = classification_report(head.oof_logits_, yi, head.classes_, head.temperature_)
    metrics["train_accuracy"] = head.score(X, labels)
    metrics["selected"] = head.selected_
    metrics["evaluated_on"] = ("out-of-fold predictions on the whole index split (each image predicted by a model "
                               "that never saw it); the query split is evaluated by `visualsearch evaluate`")
    return head, np.arange(len(labels)), head.oof_proba_, metrics


def tuning_k(cfg) -> int:
    """The depth the adaptive settings are tuned for: the deepest of ``search.k`` and ``evaluation.ks``."""
    return int(max([cfg.search.k, *cfg.evaluation.ks]))


@locked(lambda cfg: cfg.classifier_dir, lambda cfg: f"the classifier {cfg.classifier_dir}")
def train(cfg, *, force: bool = False):
    """Train, calibrate, evaluate and save the classifier of ``cfg``; return ``(classifier, metrics)``.

    Fits ``classifier.head`` on the index split of the feature cache (read
    alone by :func:`vslib.features.read_split`, so the query split's vectors
    are never in memory; see :func:`fit_head`), chooses the
    adaptive search settings on the same split from out-of-fold probabilities
    (:func:`vslib.ranking.tune_adaptive`; kept in ``metadata.json`` under
    ``search``), and writes the model to ``cfg.classifier_dir``, the metrics
    to ``reports/classifier_metrics.json`` and the confusion matrix to
    ``reports/figures/confusion_matrix.png``. A model trained on the same
    features and settings is reused unless ``force``.
    """
    from vslib import features, ranking

    index = features.read_split(cfg, "index")
    labels = index.table["label"].astype(str).to_numpy()
    check_trainable(labels)
    key = fingerprint(index, cfg)
    if not force and (clf := _cached(cfg, key)) is not None:
        log.info("classifier: reusing %s (same features and settings)", cfg.classifier_dir)
        return clf, clf.metadata_.get("metrics", {})

    ccfg = cfg.classifier
    X = index.vectors
    clf, rows, proba, metrics = fit_head(X, labels, ccfg)
    clf.backbone_, clf.backbone_weights_, clf.dataset_ = cfg.backbone.name, cfg.backbone.weights, cfg.dataset.name
    yi = clf._encode(labels, "training data")
    search_settings = ranking.tune_adaptive(X, yi, proba, k=tuning_k(cfg), rows=rows, seed=ccfg.seed)

    if ccfg.fine_tune:
        tr, va = stratified_split(labels, ccfg.validation_fraction, ccfg.seed)
        clf, metrics = _fine_tune(cfg, clf if isinstance(clf, EmbeddingClassifier) else None, index, tr, va, metrics)

    meta = {
        "backbone": cfg.backbone.name,
        "backbone_weights": cfg.backbone.weights,
        "dataset": cfg.dataset.name,
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "fingerprint": key,
        "metrics": metrics,
        "search": search_settings,
        "config": dataclasses.asdict(ccfg),
        # the held-out validation images of a head that keeps some back (mlp); [] when every image was trained on
        "validation_paths": (index.table["path"].astype(str).iloc[rows].tolist()
                             if len(rows) < len(labels) and "path" in index.table else []),
    }
    clf.save(cfg.classifier_dir, meta)
    cfg.reports_dir.mkdir(parents=True, exist_ok=True)
    _write_json(cfg.reports_dir / METRICS_FILE, metrics)
    save_confusion_figure(metrics["confusion_matrix"], cfg.figures_dir / CONFUSION_FIGURE,
                          title=f"Classifier ({cfg.dataset.name}, {cfg.backbone.name}, {ccfg.head} head), out of fold")
    log.info("classifier: %s head, accuracy %.3f, top-3 %.3f, ECE %.3f -> %.3f (T = %.2f); saved to %s",
             ccfg.head, metrics["accuracy"], metrics.get("top3_accuracy", float("nan")), metrics["ece_before"],
             metrics["ece_after"], clf.temperature_, cfg.classifier_dir)
    return clf, metrics


def load_classifier(cfg):
    """Load the classifier of ``cfg`` and check it matches the configured backbone and dataset."""
    directory = cfg.classifier_dir
    if not (directory / METADATA_FILE).is_file():
        raise ClassifierError(f"no trained classifier in {directory}; run `visualsearch train -c {cfg.source}` first")
    clf = load_model(directory)
    if clf.backbone_ != cfg.backbone.name:
        raise ClassifierError(f"the classifier in {directory} was trained on backbone {clf.backbone_!r} but "
                              f"backbone.name is {cfg.backbone.name!r} in {cfg.source}; retrain with "
                              f"`visualsearch train -c {cfg.source}`")
    if clf.dataset_ and clf.dataset_ != cfg.dataset.name:
        raise ClassifierError(f"the classifier in {directory} was trained on dataset {clf.dataset_!r} but "
                              f"dataset.name is {cfg.dataset.name!r} in {cfg.source}; retrain with "
                              f"`visualsearch train -c {cfg.source}`")
    return clf


def check_labels(classifier, index_labels: Iterable) -> None:
    """Raise :class:`ClassifierError` if the classifier predicts labels the index does not hold.

    A search narrowed to such a label would find nothing.
    """
    known = set(np.asarray(list(index_labels), dtype=object).astype(str))
    extra = sorted(set(map(str, classifier.classes_)) - known)
    if extra:
        shown = ", ".join(repr(x) for x in extra[:20]) + (f", and {len(extra) - 20} more" if len(extra) > 20 else "")
        raise ClassifierError(f"the classifier knows {len(extra)} label(s) the index lacks: {shown}. The index "
                              "and the classifier come from different data; rebuild the index "
                              "(`visualsearch index`) or retrain (`visualsearch train`).")


# ---------------------------------------------------------------------------
# Figures


def save_confusion_figure(confusion: dict, path, *, title: str = "Classifier confusion matrix") -> Path:
    """Save the row-normalised confusion matrix as a PNG (drawn by :func:`vslib.plots.confusion_matrix`)."""
    from vslib import plots

    fig = plots.confusion_matrix(confusion, title=title, save_as=Path(path))
    import matplotlib.pyplot as plt

    plt.close(fig)
    return Path(path)


# ---------------------------------------------------------------------------
# Fine-tuning (optional, slow on CPU)


class FineTunedClassifier(EmbeddingClassifier):
    """The backbone, its top ``fine_tune_layers`` layers trained further, under an :class:`EmbeddingClassifier` head.

    Unlike the head alone it reads pixels: :meth:`predict_logits` and friends
    take image files / PIL images / arrays (or a uint8 batch ``(n, h, w, 3)``
    at the backbone's input size), not embeddings. :meth:`predict_image` works
    the same for both kinds, so callers that classify query images should use it.
    The images go through the backbone's own ``preprocess`` in training and
    prediction alike. Slow on CPU: meant for small datasets.
    """

    _PARAMS = EmbeddingClassifier._PARAMS + ("fine_tune_layers", "fine_tune_epochs")
    kind = "fine_tuned"

    def __init__(self, fine_tune_layers: int = 20, fine_tune_epochs: int = 3, **params):
        super().__init__(**params)
        self.fine_tune_layers = fine_tune_layers
        self.fine_tune_epochs = fine_tune_epochs

    def fit(self, X, y, X_val=None, y_val=None, *, backbone=None, head: Optional[EmbeddingClassifier] = None):
        """Fine-tune on image sources ``X`` (paths, PIL images or arrays) with labels ``y``.

        ``backbone`` is a :class:`vslib.backbones.Backbone` (it is copied, never
        changed); ``head`` a fitted :class:`EmbeddingClassifier` on its
        embeddings, whose weights start the head (a fresh one is fitted when
        omitted). Augmentation: random crops of 80-100 % of each side and
        horizontal flips.
        """
        keras = _keras()
        if backbone is None:
            raise ClassifierError("FineTunedClassifier.fit needs backbone= (vslib.backbones.backbone_from_config(cfg))")
        X, y = list(X), np.asarray(y, dtype=object).astype(str)
        if X_val is None:
            check_trainable(y)
            tr, va = stratified_split(y, self.validation_fraction, self.seed)
            X, X_val, y, y_val = [X[i] for i in tr], [X[i] for i in va], y[tr], y[va]
        else:
            X_val, y_val = list(X_val), np.asarray(y_val, dtype=object).astype(str)
            check_trainable(np.concatenate([y, y_val]))
        self.backbone_ = getattr(self, "backbone_", None) or backbone.name
        self._backbone, self.input_size_ = backbone, int(backbone.input_size)
        if head is None:
            from vslib.embedding import embed_images

            head = EmbeddingClassifier(**{k: v for k, v in self.get_params().items() if k in EmbeddingClassifier._PARAMS})
            head.fit(embed_images(backbone, X), y, embed_images(backbone, X_val), y_val)
        self.classes_, self.n_features_in_ = head.classes_, head.n_features_in_
        yi, yv = self._encode(y, "training data"), self._encode(y_val, "the validation data")

        keras.utils.set_random_seed(self.seed)
        base = keras.models.clone_model(backbone.keras_model)
        base.set_weights(backbone.keras_model.get_weights())
        base.trainable = True
        for i, layer in enumerate(base.layers):
            # BatchNorm stays frozen (inference statistics): small batches would wreck them
            layer.trainable = i >= len(base.layers) - self.fine_tune_layers and \
                not isinstance(layer, keras.layers.BatchNormalization)
        top = keras.models.clone_model(head.model_)
        top.set_weights(head.model_.get_weights())
        for layer in top.layers:  # Normalization caches mean/variance; set_weights alone leaves them stale
            if hasattr(layer, "finalize_state"):
                layer.finalize_state()
        inp = keras.Input((self.input_size_, self.input_size_, 3), name="preprocessed_image")
        feats = keras.layers.UnitNormalization(axis=-1, name="l2_normalise")(base(inp))
        self.model_ = keras.Model(inp, top(feats), name="fine_tuned_classifier")
        self.model_.compile(optimizer=keras.optimizers.Adam(self.learning_rate / 10),
                            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                            metrics=["accuracy"])
        train_data = _ImageBatches(X, yi, backbone, self.batch_size, augment=True, seed=self.seed)
        val_data = _ImageBatches(X_val, yv, backbone, self.batch_size, augment=False) if len(yv) else None
        callbacks = [keras.callbacks.EarlyStopping(monitor="val_loss", patience=self.fine_tune_epochs,
                                                   restore_best_weights=True)] if val_data else []
        hist = self.model_.fit(train_data, validation_data=val_data, epochs=self.fine_tune_epochs,
                               callbacks=callbacks, verbose=self.verbose)
        self._finish_fit(hist, yi, X_val, yv)
        return self

    def _pixels(self, batch) -> np.ndarray:
        """A non-empty slice of image sources as uint8 (n, size, size, 3); a slice of a uint8 batch is one already."""
        from vslib.images import load_for_model

        if isinstance(batch, np.ndarray):
            return batch
        return np.stack([load_for_model(x, self.input_size_) for x in batch])

    def predict_logits(self, X) -> np.ndarray:
        """Uncalibrated logits of images: a sequence of image sources or a uint8 batch (n, h, w, 3)."""
        self._check_fitted()
        if isinstance(X, np.ndarray) and X.ndim == 2 and np.issubdtype(X.dtype, np.floating):
            raise ClassifierError("this classifier was fine-tuned on images and cannot classify embeddings; "
                                  "pass the images (or use predict_image)")
        bb = self._get_backbone()
        out = [np.zeros((0, len(self.classes_)), np.float32)]
        seq = X if isinstance(X, np.ndarray) and X.ndim == 4 else (list(X) if not _is_single_image(X) else [X])
        for i in range(0, len(seq), 32):
            out.append(np.asarray(self.model_(bb.preprocess(self._pixels(seq[i:i + 32])), training=False), np.float32))
        return np.concatenate(out)

    def predict_image(self, images, backbone=None) -> np.ndarray:
        """Calibrated probabilities (n, n_classes) of image files, PIL images or arrays."""
        if backbone is not None:
            self._backbone = backbone
        return self.predict_proba(images)

    def save(self, directory, metadata: Optional[dict] = None) -> Path:
        meta = dict(metadata or {})
        meta["input_size"] = int(self.input_size_)
        return super().save(directory, meta)


class _ImageBatches:
    """Keras ``PyDataset`` of (preprocessed images, labels), decoded per batch, optionally augmented."""

    def __new__(cls, *args, **kwargs):
        keras = _keras()

        class ImageBatches(keras.utils.PyDataset):
            def __init__(self, sources, labels, backbone, batch_size, augment=False, seed=0):
                super().__init__()
                self.sources, self.labels, self.backbone = list(sources), np.asarray(labels), backbone
                self.batch_size, self.augment = int(batch_size), augment
                self.rng = np.random.default_rng(seed)
                self.order = np.arange(len(self.sources))

            def __len__(self):
                return int(np.ceil(len(self.sources) / self.batch_size))

            def on_epoch_end(self):
                if self.augment:
                    self.order = self.rng.permutation(len(self.sources))

            def _load(self, src):
                from PIL import ImageOps

                from vslib.images import load_image, resize_for_model

                img = load_image(src)
                if self.augment:
                    w, h = img.size
                    sw, sh = (max(1, int(round(d * self.rng.uniform(0.8, 1.0)))) for d in (w, h))
                    x0, y0 = int(self.rng.integers(0, w - sw + 1)), int(self.rng.integers(0, h - sh + 1))
                    img = img.crop((x0, y0, x0 + sw, y0 + sh))
                    if self.rng.random() < 0.5:
                        img = ImageOps.mirror(img)
                return resize_for_model(img, self.backbone.input_size)

            def __getitem__(self, i):
                rows = self.order[i * self.batch_size:(i + 1) * self.batch_size]
                x = np.stack([self._load(self.sources[r]) for r in rows])
                return self.backbone.preprocess(x), self.labels[rows]

        return ImageBatches(*args, **kwargs)


def _fine_tune(cfg, head: Optional[EmbeddingClassifier], index, tr, va, metrics):
    from vslib.backbones import backbone_from_config

    ccfg = cfg.classifier
    paths = index.table["path"].astype(str).to_numpy()
    labels = index.table["label"].astype(str).to_numpy()
    backbone = backbone_from_config(cfg)
    ft = FineTunedClassifier.from_config(ccfg)
    ft.backbone_, ft.backbone_weights_, ft.dataset_ = cfg.backbone.name, cfg.backbone.weights, cfg.dataset.name
    log.info("classifier: fine-tuning the top %d layers of %s for %d epochs on %d images (slow on CPU)",
             ccfg.fine_tune_layers, cfg.backbone.name, ccfg.fine_tune_epochs, len(tr))
    ft.fit(paths[tr], labels[tr], paths[va], labels[va], backbone=backbone, head=head)
    ft_metrics = ft.evaluate(paths[va], labels[va])
    ft_metrics["train_accuracy"] = ft.score(paths[tr], labels[tr])
    ft_metrics["evaluated_on"] = metrics.get("evaluated_on")
    ft_metrics["head_only"] = {k: v for k, v in metrics.items() if k not in ("per_class", "confusion_matrix")}
    return ft, ft_metrics
