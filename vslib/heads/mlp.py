"""``mlp``: a light Keras head on the embeddings (standardise, optional hidden layer with dropout, then logits).

Unlike the cross-fitted heads of :mod:`vslib.heads.base` it holds out a
stratified part of its training rows (:func:`~vslib.heads.base.stratified_split`)
for early stopping and the temperature. Keras is imported when a model is built
or loaded, never on import.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import numpy as np

from vslib import calibration
from vslib.errors import ClassifierError
from vslib.heads.base import Estimator, HeadMixin, as_matrix, check_trainable, stratified_split
from vslib.heads.format import LABELS_FILE, MODEL_FILE

log = logging.getLogger(__name__)


def _keras():
    import keras  # heavy: imported when a model is built or loaded

    return keras


class MlpHead(HeadMixin, Estimator):
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

    kind = "mlp"
    state_file = MODEL_FILE
    config_keys = {k: k for k in ("hidden_units", "dropout", "epochs", "batch_size", "learning_rate",
                                  "weight_decay", "validation_fraction", "seed", "calibrate")}

    def __init__(self, *, hidden_units: int = 0, dropout: float = 0.2, epochs: int = 60, batch_size: int = 64,
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

    def fit(self, X, y, X_val=None, y_val=None) -> "MlpHead":
        """Train on ``X`` (n, dim) with labels ``y``; early-stop and calibrate on the validation data.

        Without ``X_val``, a stratified ``validation_fraction`` of ``X`` is held
        out (:func:`stratified_split`). Raises :class:`ClassifierError` for
        fewer than 2 classes or a class with fewer than 2 images.
        """
        keras = _keras()
        X = as_matrix(X, "X")
        y = np.asarray(y, dtype=object).astype(str)
        if len(y) != len(X):
            raise ClassifierError(f"X has {len(X)} rows but y has {len(y)} labels")
        if X_val is None:
            check_trainable(y)
            tr, va = stratified_split(y, self.validation_fraction, self.seed)
            X, X_val, y, y_val = X[tr], X[va], y[tr], y[va]
        else:
            X_val = as_matrix(X_val, "X_val")
            y_val = np.asarray(y_val, dtype=object).astype(str)
            check_trainable(np.concatenate([y, y_val]))
            if X_val.shape[1] != X.shape[1]:
                raise ClassifierError(f"X_val has {X_val.shape[1]} features but X has {X.shape[1]}")
        self.classes_ = np.unique(y)
        if len(self.classes_) < 2:
            raise ClassifierError(f"the training part holds a single class {str(self.classes_[0])!r}")
        self.n_features_in_ = X.shape[1]
        yi = self.encode_labels(y, "training data")
        yv = self.encode_labels(y_val, "the validation data") if len(y_val) else np.zeros(0, np.int64)

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
        return self._save(directory, metadata, fields, self.state_file, self.model_.save)

    @classmethod
    def _from_saved(cls, directory: Path, meta: dict, labels: list) -> "MlpHead":
        clf = cls(**cls._saved_params(meta))
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
