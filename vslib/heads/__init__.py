"""Classifier heads: the first level of the hierarchy, one small file per head.

=============  ==============================================================
``ensemble``   calibrated mix of ``linear`` and ``knn`` (the default)
``linear``     multinomial logistic regression, ``C`` chosen out of fold
``knn``        similarity-weighted votes of the nearest indexed vectors
``mlp``        a light Keras head (optional hidden layer), early-stopped on a held-out part
=============  ==============================================================

The first three share :class:`vslib.heads.base.Head`: they train on the whole
index split and choose their hyperparameters and temperature out of fold.
``fine_tuned`` (:mod:`vslib.heads.fine_tuned`), made by ``classifier.fine_tune:
true``, trains the backbone's top layers under an ``mlp`` head and reads pixels.
Every head saves the same directory format (:mod:`vslib.heads.format`);
:func:`vslib.heads.format.load_model` loads any of them.

>>> from vslib.heads import HEAD_NAMES, head_class
>>> HEAD_NAMES
('ensemble', 'linear', 'knn', 'mlp')
>>> head_class("knn").from_config(cfg.classifier)  # doctest: +SKIP
"""
from __future__ import annotations

import importlib

from vslib.errors import ClassifierError

#: every head, by the name ``classifier.head`` takes and ``metadata.json`` records as ``kind``.
#: ``cls``: where its class lives, imported by :func:`head_class` on first use, so that reading
#: the names imports neither numpy, scikit-learn nor Keras; ``configurable``: whether
#: ``classifier.head`` may name it. Each class declares the ``classifier.*`` keys it takes
#: (``config_keys``, read by its ``from_config``).
HEADS = {
    "ensemble": {"cls": "vslib.heads.ensemble.EnsembleHead", "configurable": True},
    "linear": {"cls": "vslib.heads.linear.LinearHead", "configurable": True},
    "knn": {"cls": "vslib.heads.knn.KnnHead", "configurable": True},
    "mlp": {"cls": "vslib.heads.mlp.MlpHead", "configurable": True},
    # made by classifier.fine_tune: true on top of the trained head; classifier.head never names it
    "fine_tuned": {"cls": "vslib.heads.fine_tuned.FineTunedHead", "configurable": False},
}
#: the values ``classifier.head`` takes, the default first
HEAD_NAMES = tuple(name for name, spec in HEADS.items() if spec["configurable"])


def head_class(name: str) -> type:
    """The class of the head called ``name`` (a key of :data:`HEADS`)."""
    if name not in HEADS:
        raise ClassifierError(f"Unsupported head {name!r}. Available heads are {list(HEADS)}")
    module, _, cls = HEADS[name]["cls"].rpartition(".")
    return getattr(importlib.import_module(module), cls)


__all__ = ["HEADS", "HEAD_NAMES", "head_class"]
