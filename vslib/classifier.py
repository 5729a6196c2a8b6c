"""The training stage: the first level of the hierarchy, an image's category with calibrated probabilities.

``classifier.head`` picks the head (:mod:`vslib.heads`) trained on the cached
embeddings of the *index* split (the query split is never read here: it
belongs to :mod:`vslib.evaluate`):

``ensemble`` (default), ``linear``, ``knn``
    cross-fitted heads: trained on the whole index split, with their
    settings and temperature chosen out of fold.
``mlp``
    :class:`~vslib.heads.mlp.MlpHead`, a light Keras head (standardise,
    optional hidden layer with dropout, then logits); a stratified part of the
    index split is held out for early stopping and the temperature.

``classifier.fine_tune: true`` then trains the backbone's top layers under the
head (:class:`~vslib.heads.fine_tuned.FineTunedHead`, slow on CPU).

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
from pathlib import Path
from typing import Iterable, Optional

import numpy as np

from vslib import features, integrity, plots, ranking
from vslib.backbones import backbone_from_config, config_vector_key
from vslib.errors import ClassifierError
from vslib.heads import HEADS, head_class
from vslib.heads.base import check_trainable, classification_report, stratified_split
from vslib.heads.fine_tuned import FineTunedHead
from vslib.heads.format import FORMAT_VERSION, METADATA_FILE, RETRAIN, load_model, write_json
from vslib.heads.mlp import MlpHead
from vslib.locks import locked

log = logging.getLogger(__name__)

METRICS_FILE = "classifier_metrics.json"
CONFUSION_FIGURE = "confusion_matrix.png"


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
    return head_class(ccfg.head).from_config(ccfg)


def fit_head(X: np.ndarray, labels: np.ndarray, ccfg):
    """Fit the head of ``ccfg`` on ``(X, labels)``.

    Returns ``(head, rows, proba, metrics)``: ``proba`` are calibrated
    probabilities of ``X[rows]`` from models that never saw those rows (every
    row, out of fold, for the cross-fitted heads; the held-out validation
    part for ``mlp``), and ``metrics`` are computed on them.
    """
    head = make_head(ccfg)
    if not HEADS.spec(ccfg.head)["cross_fitted"]:  # it keeps a validation part back
        tr, va = stratified_split(labels, ccfg.validation_fraction, ccfg.seed)
        head.fit(X[tr], labels[tr], X[va], labels[va])
        metrics = head.evaluate(X[va], labels[va])
        metrics["train_accuracy"] = head.score(X[tr], labels[tr])
        metrics["evaluated_on"] = ("validation part of the index split (also used for early stopping and the "
                                   "temperature); the query split is evaluated by `visualsearch evaluate`")
        return head, va, head.predict_proba(X[va]), metrics
    head.fit(X, labels)
    yi = head.encode_labels(labels, "training data")
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
    clf.vectors_ = config_vector_key(cfg)
    yi = clf.encode_labels(labels, "training data")
    search_settings = ranking.tune_adaptive(X, yi, proba, k=tuning_k(cfg), rows=rows, seed=ccfg.seed)

    if ccfg.fine_tune:
        tr, va = stratified_split(labels, ccfg.validation_fraction, ccfg.seed)
        clf, metrics = _fine_tune(cfg, clf if isinstance(clf, MlpHead) else None, index, tr, va, metrics)

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
    write_json(cfg.reports_dir / METRICS_FILE, metrics)
    save_confusion_figure(metrics["confusion_matrix"], cfg.figures_dir / CONFUSION_FIGURE,
                          title=f"Classifier ({cfg.dataset.name}, {cfg.backbone_tag}, {ccfg.head} head), out of fold")
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
    trained_on, now = getattr(clf, "vectors_", None), config_vector_key(cfg)
    if trained_on and trained_on != now:
        raise ClassifierError(f"the classifier in {directory} was trained on vectors {trained_on}, but "
                              f"{cfg.source} gives {now} (backbone.precision {cfg.backbone.precision}); retrain "
                              f"with `visualsearch run -c {cfg.source}`")
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
    fig = plots.confusion_matrix(confusion, title=title, save_as=Path(path))
    import matplotlib.pyplot as plt

    plt.close(fig)
    return Path(path)


# ---------------------------------------------------------------------------
# Fine-tuning (optional, slow on CPU)


def _fine_tune(cfg, head: Optional[MlpHead], index, tr, va, metrics):
    ccfg = cfg.classifier
    paths = index.table["path"].astype(str).to_numpy()
    labels = index.table["label"].astype(str).to_numpy()
    backbone = backbone_from_config(cfg, keras=True)
    ft = FineTunedHead.from_config(ccfg)
    ft.backbone_, ft.backbone_weights_, ft.dataset_ = cfg.backbone.name, cfg.backbone.weights, cfg.dataset.name
    log.info("classifier: fine-tuning the top %d layers of %s for %d epochs on %d images (slow on CPU)",
             ccfg.fine_tune_layers, cfg.backbone.name, ccfg.fine_tune_epochs, len(tr))
    ft.fit(paths[tr], labels[tr], paths[va], labels[va], backbone=backbone, head=head)
    ft_metrics = ft.evaluate(paths[va], labels[va])
    ft_metrics["train_accuracy"] = ft.score(paths[tr], labels[tr])
    ft_metrics["evaluated_on"] = metrics.get("evaluated_on")
    ft_metrics["head_only"] = {k: v for k, v in metrics.items() if k not in ("per_class", "confusion_matrix")}
    return ft, ft_metrics
