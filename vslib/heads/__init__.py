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
"""
from __future__ import annotations

from vslib.heads.base import Head
from vslib.heads.ensemble import EnsembleHead
from vslib.heads.fine_tuned import FineTunedHead
from vslib.heads.knn import KnnHead
from vslib.heads.linear import LinearHead
from vslib.heads.mlp import MlpHead

#: every head by the name it is saved under (``classifier.head`` names the first four)
HEADS = {cls.kind: cls for cls in (EnsembleHead, LinearHead, KnnHead, MlpHead, FineTunedHead)}

__all__ = ["HEADS", "EnsembleHead", "FineTunedHead", "Head", "KnnHead", "LinearHead", "MlpHead"]
