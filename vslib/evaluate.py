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

Beside them, the quantities that say whether the hierarchy earns its place:
the classifier's top-1/top-3 accuracy, the 1-NN accuracy (the index itself as
a classifier), a logistic-regression baseline (``C = 100`` on the index
split), and the **hierarchy gain**: adaptive minus flat (and adaptive minus
hierarchical) p@k per query, with a paired bootstrap 95 % interval. With
``seeds > 1`` the whole split-train-tune-search chain is repeated in memory on
other seeded splits (exact search, as the default ``Flat`` index), so "beats
flat" is a statement over splits, not one lucky split. ``oracle`` (filter to
the true label) is kept as a labelled diagnostic, not a ceiling.
"""
from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import pandas as pd

from vslib import classifier as clf_mod
from vslib import datasets, features, plots, ranking
from vslib.atomic import atomic_write_json, atomic_write_text
from vslib.config import ADAPTIVE_SETTINGS, Config
from vslib.errors import DatasetError, VisualSearchError
from vslib.registry import MODES
from vslib.search import VisualSearch

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


def paired_bootstrap(diff: np.ndarray, *, n_boot: int = 2000, seed: int = 0, strata: Optional[np.ndarray] = None) -> dict:
    """Mean of per-query differences with a 95 % percentile-bootstrap interval (resampling queries).

    ``strata`` (e.g. the seed of each query's split) resamples within each stratum.
    """
    diff = np.asarray(diff, dtype=np.float64)
    rng = np.random.default_rng(seed)
    groups = [np.flatnonzero(strata == g) for g in np.unique(strata)] if strata is not None else [np.arange(len(diff))]
    boots = np.zeros(n_boot)
    for g in groups:
        boots += diff[g][rng.integers(0, len(g), (n_boot, len(g)))].sum(1)
    boots /= len(diff)
    lo, hi = np.percentile(boots, [2.5, 97.5])
    return {"mean": round(float(diff.mean()), 4), "ci95": [round(float(lo), 4), round(float(hi), 4)]}


def gains(per_query: dict, ks: Sequence[int], strata: Optional[np.ndarray] = None) -> dict:
    """Hierarchy gain at each k: adaptive - flat and adaptive - hierarchical, with paired bootstrap intervals."""
    out = {}
    for other in ("flat", "hierarchical"):
        if "adaptive" in per_query and other in per_query:
            out[f"adaptive_vs_{other}"] = {f"p@{k}": paired_bootstrap(per_query["adaptive"][f"p@{k}"]
                                                                      - per_query[other][f"p@{k}"], strata=strata)
                                           for k in ks}
    return out


def baselines(X_index: np.ndarray, y_index: np.ndarray, X_query: np.ndarray, y_query: np.ndarray) -> dict:
    """1-NN accuracy (label of the most similar indexed image) and a logistic-regression baseline (C = 100)."""
    import warnings

    from sklearn.linear_model import LogisticRegression
    from threadpoolctl import threadpool_limits

    y_index, y_query = np.asarray(y_index).astype(str), np.asarray(y_query).astype(str)
    nn = np.concatenate([(X_query[i:i + 2048] @ X_index.T).argmax(1) for i in range(0, len(X_query), 2048)])
    with warnings.catch_warnings(), threadpool_limits(1):
        warnings.simplefilter("ignore")
        lr = LogisticRegression(C=100, max_iter=1000).fit(X_index, y_index)
    return {"nn1_accuracy": round(float(np.mean(y_index[nn] == y_query)), 4),
            "logreg_accuracy": round(float(lr.score(X_query, y_query)), 4)}


def evaluate_split(X_index: np.ndarray, y_index: np.ndarray, X_query: np.ndarray, y_query: np.ndarray, cfg: Config,
                   *, modes: Sequence[str] = ("flat", "hierarchical", "adaptive"), with_baselines: bool = True) -> dict:
    """The whole chain in memory on one split: fit ``classifier.head``, tune, rank every mode exactly.

    Exact search over all of ``X_index`` gives what the embedded ``Flat``
    index gives. Returns summary metrics, the per-query p@k of every mode
    (``per_query``) and the time of each stage.
    """

    ks = sorted(set(cfg.evaluation.ks))
    kmax = max(ks)
    t0 = time.perf_counter()
    head, rows, oof, metrics = clf_mod.fit_head(X_index, np.asarray(y_index).astype(str), cfg.classifier)
    yi = head.encode_labels(y_index, "the index split")
    yq = head.encode_labels(y_query, "the query split")
    t1 = time.perf_counter()
    if cfg.search.tune:
        tuned = ranking.tune_adaptive(X_index, yi, oof, k=clf_mod.tuning_k(cfg), rows=rows, seed=cfg.classifier.seed)
        adaptive = ranking.Settings("adaptive", **{k: tuned[k] for k in ADAPTIVE_SETTINGS})
    else:
        adaptive = ranking.settings("adaptive", cfg.search)
    t2 = time.perf_counter()
    P = head.predict_proba(X_query)
    cands = ranking.candidates(X_query, X_index, yi, len(head.classes_), kmax)
    n_rel = np.bincount(yi, minlength=len(head.classes_))[yq]
    out = {"n_index": int(len(yi)), "n_query": int(len(yq)), "classifier_accuracy": round(float(np.mean(P.argmax(1) == yq)), 4),
           "classifier_top3": round(float(np.mean((np.argsort(-P, 1)[:, :3] == yq[:, None]).any(1))), 4),
           "settings": adaptive.as_dict(), "modes": {}, "per_query": {}}
    for mode in modes:
        s = adaptive if mode == "adaptive" else ranking.Settings(mode)
        rel = ranking.relevance(ranking.ranked_items(cands, P, s, kmax, true_labels=yq), yi, yq)
        pq = {f"p@{k}": ranking.per_query_precision(rel, k) for k in ks}
        hits = np.cumsum(rel, 1)
        pq[f"map@{kmax}"] = (rel * hits / np.arange(1, kmax + 1)).sum(1) / np.minimum(kmax, np.maximum(n_rel, 1))
        out["per_query"][mode] = pq
        out["modes"][mode] = {m: round(float(v.mean()), 4) for m, v in pq.items()}
    t3 = time.perf_counter()
    out["seconds"] = {"fit_head": round(t1 - t0, 2), "tune_search": round(t2 - t1, 2), "search_all_modes": round(t3 - t2, 2)}
    if with_baselines:
        out.update(baselines(X_index, y_index, X_query, y_query))
    return out


def evaluate_seeds(cfg: Config, seeds: Sequence[int], *, feats=None, echo=print) -> dict:
    """:func:`evaluate_split` on the split of each seed (the dataset's stratified split rule, in memory).

    In memory by design: it re-splits the whole feature set, so it loads every vector
    (:func:`vslib.features.load_features`, or ``feats`` when given). Meant for data that fits.
    """

    feats = feats or features.load_features(cfg)
    table = feats.table.assign(status="ok")
    ks = sorted(set(cfg.evaluation.ks))
    runs, strata, pooled = [], [], {}
    for seed in seeds:
        split = datasets.assign_splits(table, query_fraction=cfg.dataset.split.query_fraction, seed=seed,
                                       min_query=cfg.dataset.split.min_query_per_class).to_numpy()
        ix, q = split == "index", split == "query"
        labels = table["label"].astype(str).to_numpy()
        r = evaluate_split(feats.vectors[ix], labels[ix], feats.vectors[q], labels[q], cfg)
        echo(f"seed {seed}: classifier {r['classifier_accuracy']:.3f}, 1-NN {r['nn1_accuracy']:.3f}, "
             + ", ".join(f"{m} p@1 {v['p@1']:.3f} p@{max(ks)} {v[f'p@{max(ks)}']:.3f}" for m, v in r["modes"].items()))
        for mode, pq in r.pop("per_query").items():
            for metric, v in pq.items():
                pooled.setdefault(mode, {}).setdefault(metric, []).append(v)
        strata.append(np.full(r["n_query"], seed))
        runs.append({"seed": int(seed), **r})
    pooled = {m: {k: np.concatenate(v) for k, v in d.items()} for m, d in pooled.items()}
    keys = ["classifier_accuracy", "classifier_top3", "nn1_accuracy", "logreg_accuracy"]
    summary = {k: _mean_sd([r[k] for r in runs]) for k in keys}
    summary["modes"] = {m: {metric: _mean_sd([r["modes"][m][metric] for r in runs]) for metric in runs[0]["modes"][m]}
                        for m in runs[0]["modes"]}
    return {"seeds": [int(s) for s in seeds], "runs": runs, "mean": summary,
            "gain": gains(pooled, ks, strata=np.concatenate(strata)),
            "note": "each seed: its own stratified split, head, tuned settings; exact in-memory search"}


def _mean_sd(values) -> dict:
    v = np.asarray(values, dtype=np.float64)
    return {"mean": round(float(v.mean()), 4), "sd": round(float(v.std(ddof=1)) if len(v) > 1 else 0.0, 4)}


def query_probabilities(classifier, vectors: np.ndarray, paths: Sequence[str]) -> np.ndarray:
    """Calibrated class probabilities of the queries (from embeddings, or images for a fine-tuned model)."""
    return classifier.query_proba(vectors, paths)


def evaluate(cfg: Config, *, modes: Optional[Sequence[str]] = None, engine=None, write: bool = True,
             figures: bool = True, seeds: int = 1, echo=print) -> dict:
    """Evaluate every mode of ``cfg.evaluation.modes`` on the query split, through the configured engine.

    Returns the results dict (also written to ``reports/evaluation.json`` and
    ``reports/evaluation.md`` with a precision@k figure and result grids):
    p@k / map@k per mode, classifier top-1/top-3, 1-NN and logistic-regression
    baselines, the hierarchy gain with bootstrap intervals and the adaptive
    settings used. ``seeds > 1`` adds :func:`evaluate_seeds` over the
    configured split seed and the ``seeds - 1`` following ones (which loads
    the whole feature set).

    Reads only what it needs: the index split's labels without its vectors
    (:func:`vslib.features.feature_columns`), the query split
    (:func:`vslib.features.read_split`), and the index split's vectors just
    for the 1-NN and logistic-regression baselines, freed once they are computed.
    """

    ecfg = cfg.evaluation
    modes = list(modes or ecfg.modes)
    ks = sorted(set(ecfg.ks))
    kmax = max(ks)
    queries = features.read_split(cfg, "query")
    index_labels = features.feature_columns(cfg, ["label"], split="index")["label"].astype(str)
    if len(queries) == 0:
        raise DatasetError("the query split is empty: set dataset.split.query_fraction > 0 and rerun "
                           f"`visualsearch data prepare -c {cfg.source}`")
    sel = _subsample_queries(queries.table, ecfg.max_queries)
    q_vec = queries.vectors[sel]
    q_table = queries.table.iloc[sel].reset_index(drop=True)
    q_labels = q_table["label"].astype(str).tolist()
    del queries  # q_vec and q_table are copies of the rows used
    n_relevant = index_labels.value_counts().to_dict()

    own_engine = engine is None
    engine = engine or VisualSearch.from_config(cfg)
    try:
        n_index = engine.index.count()
        if n_index != len(index_labels):
            log.warning("the index holds %d items but the index split has %d; rebuild it with "
                        "`visualsearch index -c %s`", n_index, len(index_labels), cfg.source)
        t0 = time.perf_counter()
        probs = query_probabilities(engine.classifier, q_vec, q_table["path"].tolist())
        classify_ms = (time.perf_counter() - t0) * 1e3 / max(1, len(q_vec))
        classes = np.asarray(engine.classes)
        order = np.argsort(-probs, axis=1)
        truth = np.asarray(q_labels)
        clf_acc = float(np.mean(classes[order[:, 0]] == truth))
        top3 = float(np.mean((classes[order[:, :3]] == truth[:, None]).any(1)))
        # the index split's vectors only for the baselines, freed when they return
        baseline_scores = baselines(features.read_split(cfg, "index").vectors, index_labels.to_numpy(), q_vec, truth)

        results = {"dataset": cfg.dataset.name, "backbone": cfg.backbone_tag, "backend": cfg.index.backend,
                   "head": getattr(engine.classifier, "kind", ""),
                   "n_index": int(n_index), "n_query": len(q_vec), "k": kmax,
                   "classifier_accuracy": round(clf_acc, 4), "classifier_top3": round(top3, 4),
                   **baseline_scores,
                   "classify_ms_per_query": round(classify_ms, 3),
                   "search_settings": engine.settings,
                   "modes": {}, "per_class": {}}
        runs, per_query = {}, {}
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
            per_query[mode] = {c: df[c].to_numpy() for c in df.columns if c.startswith("p@")}
            lat = np.asarray(latencies)
            summary = {c: round(float(df[c].mean()), 4) for c in df.columns if c.startswith(("p@", "map@"))}
            summary["latency_ms_p50"] = round(float(np.percentile(lat, 50)), 3)
            summary["latency_ms_p95"] = round(float(np.percentile(lat, 95)), 3)
            summary["mean_classes_searched"] = round(float(df["n_classes_searched"].mean()), 2)
            if mode == "oracle":
                summary["note"] = "diagnostic: filtered to the true label, so p@k = 1 whenever the class holds k images"
            results["modes"][mode] = summary
            per_class = df.assign(label=q_labels).groupby("label")[f"p@{kmax}"].mean()
            results["per_class"][mode] = {k: round(float(v), 4) for k, v in per_class.items()}
    finally:
        if own_engine:
            engine.close()
    results["hierarchy_gain"] = gains(per_query, ks)
    if seeds > 1:
        base = cfg.dataset.split.seed
        results["seeds"] = evaluate_seeds(cfg, [base + i for i in range(seeds)], echo=echo)

    echo(format_table(results))
    if write:
        write_results(cfg, results)
    if figures:
        plots.precision_curve(results, ks, save_as=cfg.figures_dir / "precision_at_k.png")
        n = ecfg.grid_queries
        if n:
            pick = _subsample_queries(q_table, n)
            for mode in modes:
                plots.result_grid(q_table["path"].iloc[pick].tolist(), [q_labels[i] for i in pick],
                                  [runs[mode][i] for i in pick], title=f"{mode} search ({cfg.dataset.name})",
                                  save_as=cfg.figures_dir / f"results_{mode}.png")
    return results


def fmt_number(value, spec: str = ".3f") -> str:
    """``value`` formatted with ``spec``; "–" for a value that is missing, None (NaN read back from strict JSON) or
    not finite, so a table never shows ``nan`` and never fails on a result read back from disk."""
    try:
        return format(value, spec) if value is not None and math.isfinite(value) else "–"
    except (TypeError, ValueError):
        return "–"


def format_table(results: dict) -> str:
    """Markdown: the modes table, the classifier and baselines, the hierarchy gain (also what the CLI prints)."""
    modes = results["modes"]
    if not modes:
        return "(no modes evaluated)"
    cols = [c for c in next(iter(modes.values())) if c.startswith(("p@", "map@"))] + ["latency_ms_p50", "latency_ms_p95"]
    lines = [f"Retrieval on {results['dataset']} ({results['backbone']}, {results['backend']} index, "
             f"{results.get('head') or 'classifier'} head): {results['n_query']} held-out queries against "
             f"{results['n_index']} indexed images",
             "",
             f"First level: classifier top-1 {fmt_number(results['classifier_accuracy'])}"
             + (f", top-3 {fmt_number(results['classifier_top3'])}" if "classifier_top3" in results else "")
             + (f"; baselines on the same split: 1-NN {fmt_number(results['nn1_accuracy'])}, logistic regression "
                f"{fmt_number(results['logreg_accuracy'])}" if "nn1_accuracy" in results else ""),
             "",
             "| mode | " + " | ".join(cols) + " | classes searched |",
             "|---" * (len(cols) + 2) + "|"]
    for mode, m in modes.items():
        name = f"{mode} (diagnostic)" if mode == "oracle" else mode
        lines.append(f"| {md_cell(name)} | " + " | ".join(fmt_number(m.get(c), ".2f" if "latency" in c else ".3f")
                                                      for c in cols)
                     + f" | {fmt_number(m.get('mean_classes_searched'), '.1f')} |")
    settings = results.get("search_settings")
    if settings:
        lines += ["", "Adaptive settings: " + ", ".join(f"{k} {v}" for k, v in settings.items() if k != "source")
                  + f" ({settings.get('source', '')})"]
    seeded = results.get("seeds") or {}
    for title, gain in (("this split", results.get("hierarchy_gain")),
                        (f"{len(seeded.get('seeds', []))} seeded splits", seeded.get("gain"))):
        if gain:
            lines += ["", f"Hierarchy gain, {title} (mean difference in p@k per query, paired bootstrap 95 % interval):", ""]
            for name, by_k in gain.items():
                lines.append(f"- {name.replace('_', ' ')}: " + "; ".join(
                    f"{k} {g['mean']:+.3f} [{g['ci95'][0]:+.3f}, {g['ci95'][1]:+.3f}]" for k, g in by_k.items()))
    if results.get("seeds"):
        mean = results["seeds"]["mean"]
        lines += ["", f"Over seeds {results['seeds']['seeds']} (mean ± sd): classifier "
                  f"{mean['classifier_accuracy']['mean']:.3f} ± {mean['classifier_accuracy']['sd']:.3f}, 1-NN "
                  f"{mean['nn1_accuracy']['mean']:.3f} ± {mean['nn1_accuracy']['sd']:.3f}, logistic regression "
                  f"{mean['logreg_accuracy']['mean']:.3f} ± {mean['logreg_accuracy']['sd']:.3f}; "
                  + "; ".join(f"{m} " + ", ".join(f"{k} {v['mean']:.3f}" for k, v in d.items())
                              for m, d in mean["modes"].items())]
    return "\n".join(lines)


def md_cell(value) -> str:
    """``value`` as one Markdown table cell: HTML, pipes, backticks and newlines escaped (a class or file name is
    data, never markup, and never splits a row)."""
    import html

    text = html.escape(str(value), quote=False)
    text = text.replace("\\", "\\\\").replace("|", "\\|").replace("`", "\\`")
    return " ".join(text.splitlines()) if ("\n" in text or "\r" in text) else text


def write_results(cfg: Config, results: dict) -> Path:
    out = cfg.reports_dir
    atomic_write_json(out / RESULTS_JSON, results)
    md = [format_table(results), ""]
    modes = list(results["per_class"])
    if modes:
        k = results["k"]
        labels = sorted(next(iter(results["per_class"].values())))
        md += [f"### Per-class precision@{k}", "", "| class | " + " | ".join(modes) + " |", "|---" * (len(modes) + 1) + "|"]
        for lbl in labels:
            md.append(f"| {md_cell(lbl)} | " + " | ".join(fmt_number(results['per_class'][m].get(lbl), ".2f")
                                                          for m in modes) + " |")
    atomic_write_text(out / RESULTS_MD, "\n".join(md) + "\n")
    return out / RESULTS_JSON


def load_results(cfg: Config) -> dict:
    p = cfg.reports_dir / RESULTS_JSON
    if not p.exists():
        raise VisualSearchError(f"no evaluation results at {p}; run `visualsearch evaluate -c {cfg.source}`")
    return json.loads(p.read_text())


__all__ = ["MODES", "average_precision_at_k", "evaluate", "format_table", "load_results", "precision_at_k"]
