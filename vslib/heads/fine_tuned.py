"""``fine_tuned``: the backbone, its top layers trained further on images, under an ``mlp`` head.

Built by ``classifier.fine_tune: true`` (:func:`vslib.classifier.train`) on top
of the ``mlp`` head trained on the embeddings; it reads pixels, not embeddings.
Slow on CPU: meant for small datasets. Keras is imported when a model is built
or loaded, never on import.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
from PIL import ImageOps

from vslib.errors import ClassifierError
from vslib.embedding import embed_images
from vslib.heads.base import check_trainable, is_single_image, stratified_split
from vslib.heads.mlp import MlpHead
from vslib.images import load_for_model, load_image, resize_for_model


def _keras():
    import keras  # heavy: imported when a model is built or loaded

    return keras


class FineTunedHead(MlpHead):
    """The backbone, its top ``fine_tune_layers`` layers trained further, under an :class:`MlpHead` head.

    Unlike the head alone it reads pixels: :meth:`predict_logits` and friends
    take image files / PIL images / arrays (or a uint8 batch ``(n, h, w, 3)``
    at the backbone's input size), not embeddings. :meth:`query_proba` and
    :meth:`predict_image` work the same for every head, so callers that classify
    query images use them.
    The images go through the backbone's own ``preprocess`` in training and
    prediction alike. Slow on CPU: meant for small datasets.
    """

    kind = "fine_tuned"
    config_keys = {**MlpHead.config_keys, "fine_tune_layers": "fine_tune_layers",
                   "fine_tune_epochs": "fine_tune_epochs"}

    def __init__(self, *, hidden_units: int = 0, dropout: float = 0.2, epochs: int = 60, batch_size: int = 64,
                 learning_rate: float = 1e-3, weight_decay: float = 1e-4, validation_fraction: float = 0.2,
                 seed: int = 42, calibrate: bool = True, patience: int = 10, verbose: int = 0,
                 fine_tune_layers: int = 20, fine_tune_epochs: int = 3):
        super().__init__(hidden_units=hidden_units, dropout=dropout, epochs=epochs, batch_size=batch_size,
                         learning_rate=learning_rate, weight_decay=weight_decay,
                         validation_fraction=validation_fraction, seed=seed, calibrate=calibrate, patience=patience,
                         verbose=verbose)
        self.fine_tune_layers = fine_tune_layers
        self.fine_tune_epochs = fine_tune_epochs

    def fit(self, X, y, X_val=None, y_val=None, *, backbone=None, head: Optional[MlpHead] = None):
        """Fine-tune on image sources ``X`` (paths, PIL images or arrays) with labels ``y``.

        ``backbone`` is a :class:`vslib.backbones.Backbone` (it is copied, never
        changed); ``head`` a fitted :class:`MlpHead` on its
        embeddings, whose weights start the head (a fresh one is fitted when
        omitted). Augmentation: random crops of 80-100 % of each side and
        horizontal flips.
        """
        keras = _keras()
        if backbone is None:
            raise ClassifierError("FineTunedHead.fit needs backbone= (vslib.backbones.backbone_from_config(cfg))")
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
            head = MlpHead(**{k: v for k, v in self.get_params().items() if k in MlpHead._get_param_names()})
            head.fit(embed_images(backbone, X), y, embed_images(backbone, X_val), y_val)
        self.classes_, self.n_features_in_ = head.classes_, head.n_features_in_
        yi, yv = self.encode_labels(y, "training data"), self.encode_labels(y_val, "the validation data")

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
        seq = X if isinstance(X, np.ndarray) and X.ndim == 4 else (list(X) if not is_single_image(X) else [X])
        for i in range(0, len(seq), 32):
            out.append(np.asarray(self.model_(bb.preprocess(self._pixels(seq[i:i + 32])), training=False), np.float32))
        return np.concatenate(out)

    def query_proba(self, vectors, images) -> np.ndarray:
        """Calibrated probabilities of the query ``images`` themselves (this model reads pixels, not ``vectors``)."""
        return self.predict_image(list(images))

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
