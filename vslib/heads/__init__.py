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

from vslib.registry import HEADS

#: the values ``classifier.head`` takes, the default first
HEAD_NAMES = HEADS.choices()


def head_class(name: str) -> type:
    """The class of the head called ``name`` (an entry of :data:`vslib.registry.HEADS`; its module is imported now)."""
    return HEADS.resolve(name)


__all__ = ["HEADS", "HEAD_NAMES", "head_class"]
