"""Classifier heads: the first level of the hierarchy, one small file per head.

=============  ==============================================================
``ensemble``   calibrated mix of ``linear`` and ``knn`` (the default)
``linear``     multinomial logistic regression, ``C`` chosen out of fold
``knn``        similarity-weighted votes of the nearest indexed vectors
``mlp``        the Keras head of :mod:`vslib.classifier` (optional hidden layer)
=============  ==============================================================

The first three share :class:`vslib.heads.base.Head`: they train on the whole
index split and choose their hyperparameters and temperature out of fold.
"""
from __future__ import annotations

from vslib.heads.base import Head
from vslib.heads.ensemble import EnsembleHead
from vslib.heads.knn import KnnHead
from vslib.heads.linear import LinearHead

#: cross-fitted heads by ``classifier.head`` name (``mlp`` lives in vslib.classifier)
HEADS = {cls.kind: cls for cls in (EnsembleHead, LinearHead, KnnHead)}

__all__ = ["HEADS", "EnsembleHead", "Head", "KnnHead", "LinearHead"]
