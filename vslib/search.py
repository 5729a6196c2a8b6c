"""The hierarchical search engine: classify, narrow, retrieve.

>>> with VisualSearch.from_config(load_config("application.yaml")) as engine:
...     result = engine.search("cat.jpg", k=10, mode="adaptive")
>>> result.predicted[0], result.hits[0]

Modes
-----
``flat``
    Nearest neighbours over the whole index.
``hierarchical``
    Pre-filter to the classifier's top-1 class (the original design, done right:
    the filter is applied before ranking, so k hits come back whenever the
    class holds k images).
``adaptive``
    Pre-filter to the smallest set of classes whose calibrated probability mass
    reaches ``search.mass`` (at most ``search.max_classes``); when the
    classifier is unsure (top probability below ``search.min_confidence``) it
    searches flat. Hits inside the chosen classes are ranked by
    ``similarity + search.class_weight * log p(class)``: a likelier class wins
    close calls, a much closer image from a less likely class still gets in.
    (Each class is searched on its own and the lists merged, so the ranking is
    exact.) If the chosen classes hold fewer than k images, the list is
    completed with the best hits from outside them (marked ``outside``).
    With ``search.tune`` (the default) these settings are the ones
    :func:`vslib.classifier.train` chose on the index split.
``oracle``
    Pre-filter to the query's true label (evaluation only). A diagnostic, not
    a ceiling: its p@k is 1 whenever the class holds k images.

Every hit carries ``score`` (the cosine similarity) and ``rank_score`` (what
the list is ordered by: the similarity, plus ``class_weight * log p(class)``
in adaptive mode), and lists are always in rank order.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from vslib import classifier as clf_mod
from vslib import embedding, ranking
from vslib import index as index_mod
from vslib.backbones import backbone_from_config
from vslib.config import ADAPTIVE_SETTINGS, Config, SearchConfig
from vslib.errors import VisualSearchError
from vslib.registry import MODES

log = logging.getLogger(__name__)


@dataclass
class SearchResult:
    """Ranked hits for one query, with the classes the classifier predicted."""

    query: str
    mode: str
    predicted: list[tuple[str, float]]
    hits: list[dict]
    #: the classes the search was narrowed to (None: searched everything)
    searched_labels: Optional[list[str]] = None
    #: the mode actually used (adaptive falls back to flat when unsure)
    effective_mode: str = ""
    timings_ms: dict = field(default_factory=dict)
    #: the adaptive settings used and where they came from
    settings: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return {
            "query": self.query,
            "mode": self.mode,
            "effective_mode": self.effective_mode or self.mode,
            "searched_labels": self.searched_labels,
            "predicted": [{"label": lbl, "probability": round(float(p), 6)} for lbl, p in self.predicted],
            "search_settings": self.settings,
            "hits": [{"path": h["path"], "label": h["label"], "score": round(float(h["score"]), 6),
                      "rank_score": round(float(h.get("rank_score", h["score"])), 6),
                      **({"outside": True} if h.get("outside") else {})} for h in self.hits],
        }

    def to_text(self) -> str:
        lines = [f"query: {self.query}  (mode {self.mode}"
                 + (f" -> {self.effective_mode}" if self.effective_mode and self.effective_mode != self.mode else "")
                 + ")"]
        lines.append("predicted: " + ", ".join(f"{lbl} {p:.1%}" for lbl, p in self.predicted))
        if self.searched_labels is not None:
            lines.append("searched:  " + ", ".join(self.searched_labels))
        lines.append("  #  similarity  rank score  label")
        for i, h in enumerate(self.hits, 1):
            note = "  (outside the searched classes)" if h.get("outside") else ""
            lines.append(f"{i:3d}. {h['score']:10.4f}  {h.get('rank_score', h['score']):10.4f}  "
                         f"{h['label']:<28}  {h['path']}{note}")
        return "\n".join(lines)


def _hit_dict(hit, bonus: float = 0.0) -> dict:
    md = hit.metadata or {}
    score = float(hit.score)
    return {"id": hit.id, "path": md.get("path", ""), "label": md.get("label", ""), "score": score,
            "rank_score": score + bonus}


def effective_settings(scfg: SearchConfig, classifier) -> tuple[SearchConfig, dict]:
    """``scfg`` with the adaptive settings the classifier was tuned with (when ``scfg.tune``), and their source."""
    tuned = (getattr(classifier, "metadata_", None) or {}).get("search") or {}
    keys = ADAPTIVE_SETTINGS
    if scfg.tune and all(k in tuned for k in keys):
        chosen = replace(scfg, **{k: tuned[k] for k in keys})
        return chosen, {**{k: tuned[k] for k in keys}, "source": "tuned on the index split at training"}
    why = "search.tune is false" if not scfg.tune else "the classifier holds no tuned settings"
    return scfg, {**{k: getattr(scfg, k) for k in keys}, "source": f"application.yaml ({why})"}


class VisualSearch:
    """Backbone + calibrated classifier + vector index.

    Parameters
    ----------
    backbone : vslib.backbones.Backbone
    classifier : vslib.heads.base.HeadMixin
    index : vslib.index.base.VectorIndex
        Items carry ``label`` and ``path`` metadata.
    search_cfg : SearchConfig
    """

    def __init__(self, backbone, classifier, index, search_cfg: Optional[SearchConfig] = None, *,
                 max_image_pixels: Optional[int] = None):
        trained_on = getattr(classifier, "vectors_", None)
        if trained_on and getattr(backbone, "vector_key", trained_on) != trained_on:
            raise VisualSearchError(f"queries would be embedded as {backbone.vector_key} vectors, but the classifier "
                                    f"(and its index) hold {trained_on} vectors: float32 and int8 vectors do not "
                                    "mix; use the backbone of the config that built them (backbone.precision)")
        self.backbone = backbone
        self.classifier = classifier
        self.index = index
        self.cfg, self.settings = effective_settings(search_cfg or SearchConfig(), classifier)
        self.max_image_pixels = max_image_pixels
        self.classes = [str(c) for c in classifier.classes_]

    @classmethod
    def from_config(cls, cfg: Config) -> "VisualSearch":
        """Load the backbone, the trained classifier and the built index of ``cfg``."""
        clf = clf_mod.load_classifier(cfg)
        idx = index_mod.open_index(cfg, create=False)
        try:
            if idx.count() == 0:
                raise VisualSearchError(f"the {cfg.index.backend} index is empty; run "
                                        f"`visualsearch index -c {cfg.source}` first")
            counts = idx.count_values("label", [str(c) for c in clf.classes_])
            clf_mod.check_labels(clf, [c for c, n in counts.items() if n > 0])
            return cls(backbone_from_config(cfg), clf, idx, cfg.search, max_image_pixels=cfg.dataset.max_image_pixels)
        except BaseException:
            idx.close()
            raise

    # -- context manager ----------------------------------------------------
    def close(self) -> None:
        self.index.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- searching ------------------------------------------------------------
    def embed(self, images: Sequence) -> np.ndarray:
        kw = {"max_pixels": self.max_image_pixels} if self.max_image_pixels else {}
        return embedding.embed_images(self.backbone, list(images), **kw)

    def search(self, image, k: Optional[int] = None, mode: Optional[str] = None, *,
               true_label: Optional[str] = None, top_classes: int = 5) -> SearchResult:
        """Search with one image (path, PIL image or array)."""
        k = self.cfg.k if k is None else k
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise VisualSearchError(f"k is {k!r}; the number of hits must be a whole number >= 1")
        mode = mode or self.cfg.mode
        t0 = time.perf_counter()
        vec = self.embed([image])
        t1 = time.perf_counter()
        probs = self.classifier.query_proba(vec, [image])
        t2 = time.perf_counter()
        (hits, labels), = self.search_vectors(vec, k, mode, probs=probs,
                                             true_labels=None if true_label is None else [true_label])
        t3 = time.perf_counter()
        order = np.argsort(-probs[0], kind="stable")[:top_classes]
        return SearchResult(
            query=str(image) if isinstance(image, (str, Path)) else type(image).__name__,
            mode=mode,
            predicted=[(self.classes[i], float(probs[0, i])) for i in order],
            hits=hits,
            searched_labels=labels,
            effective_mode=mode if labels is not None or mode == "flat" else "flat",
            settings=self.settings if mode == "adaptive" else {},
            timings_ms={"embed": (t1 - t0) * 1e3, "classify": (t2 - t1) * 1e3, "search": (t3 - t2) * 1e3},
        )

    def search_vectors(self, vectors: np.ndarray, k: int, mode: str, *, probs: Optional[np.ndarray] = None,
                       true_labels: Optional[Sequence[str]] = None) -> list[tuple[list[dict], Optional[list[str]]]]:
        """Search with embedded queries; returns ``(hits, searched_labels)`` per query.

        ``probs`` are the classifier's calibrated probabilities (computed here
        when not given); ``true_labels`` are needed for ``oracle`` mode only.
        """
        if mode not in MODES:
            raise VisualSearchError(f"unknown search mode {mode!r} (choices: {', '.join(MODES)})")
        vectors = np.atleast_2d(np.asarray(vectors, dtype=np.float32))
        if probs is None and mode in ("hierarchical", "adaptive"):
            probs = self.classifier.predict_proba(vectors)  # an image-level (fine-tuned) model raises here
        if mode == "flat":
            return [([_hit_dict(h) for h in hits], None) for hits in self.index.search(vectors, k)]
        s = ranking.settings(mode, self.cfg)
        chosen = ranking.chosen_labels(probs, self.classes, s, true_labels)
        bonus = None if probs is None else ranking.class_bonus(probs, s)
        out = []
        for i, (vec, labels) in enumerate(zip(vectors, chosen)):
            q = vec[None, :]
            if labels is None:
                hits = [_hit_dict(h) for h in self.index.search(q, k)[0]]
            elif mode == "adaptive" and len(labels) > 1 and s.class_weight > 0:
                hits = self._class_weighted(q, k, labels, bonus[i])
            else:
                hits = [_hit_dict(h) for h in self.index.search(q, k, filter={"label": labels})[0]]
            if mode == "adaptive" and labels is not None and len(hits) < k:
                # complete the list from outside the chosen classes, after them, by similarity
                seen = {h["id"] for h in hits}
                extra = [{**_hit_dict(h), "outside": True} for h in self.index.search(q, k + len(hits))[0]]
                hits += [h for h in extra if h["id"] not in seen][: k - len(hits)]
            out.append((hits, labels))
        return out

    def _class_weighted(self, q: np.ndarray, k: int, labels: list[str], bonus: np.ndarray) -> list[dict]:
        """Top k over ``labels`` by similarity + :func:`vslib.ranking.class_bonus`, merged from per-class searches."""
        ranked = []
        per_class = self.index.search_many(np.repeat(q, len(labels), axis=0), k, [{"label": [lbl]} for lbl in labels])
        for label, hits in zip(labels, per_class):
            ranked += [_hit_dict(h, float(bonus[self.classes.index(label)])) for h in hits]
        ranked.sort(key=lambda h: -h["rank_score"])
        return ranked[:k]
