"""Honest retrieval evaluation: held-out queries, every search mode, the same index.

Queries come from the **query** split only, which is never indexed, so a query
can never find itself. A hit is relevant when its label equals the query's.

Metrics (per query, then averaged):

``p@k``
    precision at k: relevant hits among the first k, divided by k.
``map@k``
    average precision at k: the mean of p@i over the ranks i <= k that hold a
    relevant hit, divided by ``min(k, R)`` where R is the number of indexed
    images of the query's class (so a perfect ranking scores 1 even for small classes).
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import pandas as pd

from vslib.config import MODES, Config

log = logging.getLogger(__name__)

RESULTS_JSON = "evaluation.json"
RESULTS_MD = "evaluation.md"


# ---------------------------------------------------------------------------
# Metrics


def precision_at_k(relevant: Sequence[bool], k: int) -> float:
    """Relevant hits among the first ``k``, divided by ``k`` (missing hits count as misses)."""
    rel = np.asarray(relevant, dtype=bool)[:k]
    return float(rel.sum()) / k


def average_precision_at_k(relevant: Sequence[bool], k: int, n_relevant: int) -> float:
    """AP@k = sum over relevant ranks i <= k of p@i, divided by min(k, n_relevant)."""
    rel = np.asarray(relevant, dtype=bool)[:k]
    if n_relevant <= 0:
        return 0.0
    hits = np.cumsum(rel)
    ranks = np.flatnonzero(rel) + 1
    return float((hits[rel] / ranks).sum()) / min(k, n_relevant)


# ---------------------------------------------------------------------------
# Evaluation


def _subsample_queries(q_table: pd.DataFrame, max_queries: Optional[int]) -> np.ndarray:
    """Row positions of at most ``max_queries`` queries, spread evenly over the classes."""
    n = len(q_table)
    if max_queries is None or max_queries >= n:
        return np.arange(n)
    # round-robin over classes, in a fixed order: deterministic and stratified
    groups = [np.flatnonzero(q_table["label"].to_numpy() == lbl) for lbl in sorted(q_table["label"].unique())]
    picked, depth = [], 0
    while len(picked) < max_queries:
        for g in groups:
            if depth < len(g) and len(picked) < max_queries:
                picked.append(g[depth])
        depth += 1
    return np.sort(np.asarray(picked))


def query_probabilities(classifier, vectors: np.ndarray, paths: Sequence[str]) -> np.ndarray:
    """Calibrated class probabilities of the queries (from embeddings, or images for a fine-tuned model)."""
    if getattr(classifier, "kind", "") == "fine_tuned":
        return classifier.predict_image(list(paths))
    return classifier.predict_proba(vectors)


def evaluate(cfg: Config, *, modes: Optional[Sequence[str]] = None, engine=None, write: bool = True,
             figures: bool = True, echo=print) -> dict:
    """Evaluate every mode of ``cfg.evaluation.modes`` on the query split.

    Returns the results dict (also written to ``reports/evaluation.json`` and
    ``reports/evaluation.md`` with a precision@k figure and result grids).
    """
    from vslib import features
    from vslib.search import VisualSearch

    ecfg = cfg.evaluation
    modes = list(modes or ecfg.modes)
    ks = sorted(set(ecfg.ks))
    kmax = max(ks)
    feats = features.load_features(cfg)
    index_split, queries = feats.split("index"), feats.split("query")
    if len(queries) == 0:
        from vslib.errors import DatasetError

        raise DatasetError("the query split is empty: set dataset.split.query_fraction > 0 and rerun "
                           f"`visualsearch data prepare -c {cfg.source}`")
    sel = _subsample_queries(queries.table, ecfg.max_queries)
    q_vec = queries.vectors[sel]
    q_table = queries.table.iloc[sel].reset_index(drop=True)
    q_labels = q_table["label"].astype(str).tolist()
    n_relevant = index_split.table["label"].astype(str).value_counts().to_dict()

    own_engine = engine is None
    engine = engine or VisualSearch.from_config(cfg)
    try:
        n_index = engine.index.count()
        if n_index != len(index_split):
            log.warning("the index holds %d items but the index split has %d; rebuild it with "
                        "`visualsearch index -c %s`", n_index, len(index_split), cfg.source)
        t0 = time.perf_counter()
        probs = query_probabilities(engine.classifier, q_vec, q_table["path"].tolist())
        classify_ms = (time.perf_counter() - t0) * 1e3 / max(1, len(q_vec))
        classes = engine.classes
        top1 = [classes[i] for i in probs.argmax(1)]
        clf_acc = float(np.mean([a == b for a, b in zip(top1, q_labels)]))

        results = {"dataset": cfg.dataset.name, "backbone": cfg.backbone.name, "backend": cfg.index.backend,
                   "n_index": int(n_index), "n_query": len(q_vec), "k": kmax,
                   "classifier_accuracy": round(clf_acc, 4),
                   "classify_ms_per_query": round(classify_ms, 3),
                   "modes": {}, "per_class": {}}
        runs = {}
        for mode in modes:
            rows, latencies = [], []
            for i in range(len(q_vec)):
                t = time.perf_counter()
                (hits, searched), = engine.search_vectors(q_vec[i:i + 1], kmax, mode, probs=probs[i:i + 1],
                                                          true_labels=[q_labels[i]])
                latencies.append((time.perf_counter() - t) * 1e3)
                rel = [h["label"] == q_labels[i] for h in hits]
                row = {f"p@{k}": precision_at_k(rel, k) for k in ks}
                row[f"map@{kmax}"] = average_precision_at_k(rel, kmax, n_relevant.get(q_labels[i], 0))
                row["n_classes_searched"] = len(searched) if searched is not None else len(classes)
                rows.append(row)
                runs.setdefault(mode, []).append(hits)
            df = pd.DataFrame(rows)
            lat = np.asarray(latencies)
            summary = {c: round(float(df[c].mean()), 4) for c in df.columns if c.startswith(("p@", "map@"))}
            summary["latency_ms_p50"] = round(float(np.percentile(lat, 50)), 3)
            summary["latency_ms_p95"] = round(float(np.percentile(lat, 95)), 3)
            summary["mean_classes_searched"] = round(float(df["n_classes_searched"].mean()), 2)
            results["modes"][mode] = summary
            per_class = df.assign(label=q_labels).groupby("label")[f"p@{kmax}"].mean()
            results["per_class"][mode] = {k: round(float(v), 4) for k, v in per_class.items()}
    finally:
        if own_engine:
            engine.close()

    echo(format_table(results))
    if write:
        write_results(cfg, results)
    if figures:
        from vslib import plots

        plots.precision_curve(results, ks, save_as=cfg.figures_dir / "precision_at_k.png")
        n = ecfg.grid_queries
        if n:
            pick = _subsample_queries(q_table, n)
            for mode in modes:
                plots.result_grid(q_table["path"].iloc[pick].tolist(), [q_labels[i] for i in pick],
                                  [runs[mode][i] for i in pick], title=f"{mode} search ({cfg.dataset.name})",
                                  save_as=cfg.figures_dir / f"results_{mode}.png")
    return results


def format_table(results: dict) -> str:
    """A markdown table of the modes (also what the CLI prints)."""
    modes = results["modes"]
    if not modes:
        return "(no modes evaluated)"
    cols = [c for c in next(iter(modes.values())) if c.startswith(("p@", "map@"))] + ["latency_ms_p50", "latency_ms_p95"]
    lines = [f"Retrieval on {results['dataset']} ({results['backbone']}, {results['backend']} index): "
             f"{results['n_query']} held-out queries against {results['n_index']} indexed images; "
             f"classifier top-1 accuracy on the queries {results['classifier_accuracy']:.3f}",
             "",
             "| mode | " + " | ".join(cols) + " | classes searched |",
             "|---" * (len(cols) + 2) + "|"]
    for mode, m in modes.items():
        lines.append(f"| {mode} | " + " | ".join(f"{m[c]:.3f}" if "latency" not in c else f"{m[c]:.2f}" for c in cols)
                     + f" | {m['mean_classes_searched']:.1f} |")
    return "\n".join(lines)


def write_results(cfg: Config, results: dict) -> Path:
    out = cfg.reports_dir
    out.mkdir(parents=True, exist_ok=True)
    (out / RESULTS_JSON).write_text(json.dumps(results, indent=2))
    md = [format_table(results), ""]
    modes = list(results["per_class"])
    if modes:
        k = results["k"]
        labels = sorted(next(iter(results["per_class"].values())))
        md += [f"### Per-class precision@{k}", "", "| class | " + " | ".join(modes) + " |", "|---" * (len(modes) + 1) + "|"]
        for lbl in labels:
            md.append(f"| {lbl} | " + " | ".join(f"{results['per_class'][m][lbl]:.2f}" for m in modes) + " |")
    (out / RESULTS_MD).write_text("\n".join(md) + "\n")
    return out / RESULTS_JSON


def load_results(cfg: Config) -> dict:
    p = cfg.reports_dir / RESULTS_JSON
    if not p.exists():
        from vslib.errors import VisualSearchError

        raise VisualSearchError(f"no evaluation results at {p}; run `visualsearch evaluate -c {cfg.source}`")
    return json.loads(p.read_text())


__all__ = ["MODES", "average_precision_at_k", "evaluate", "format_table", "load_results", "precision_at_k"]
