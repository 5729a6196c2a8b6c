"""One click: prepare -> extract -> train -> index -> evaluate (-> notebook reports).

Each stage reuses what an earlier run left behind (manifest checks, the
feature cache, a classifier trained on the same features and settings), so a
second run is fast and an interrupted one resumes.
"""
from __future__ import annotations

import logging
import time

from vslib.config import Config

log = logging.getLogger(__name__)


def run(cfg: Config, *, report: bool = False, echo=print) -> dict:
    """Run every stage on ``cfg``; return the evaluation results."""
    from vslib import classifier, datasets, evaluate, extraction, index

    timings = {}

    def stage(name, fn):
        echo(f"\n== {name} ==")
        t = time.perf_counter()
        out = fn()
        timings[name] = time.perf_counter() - t
        return out

    stage("prepare", lambda: datasets.prepare(cfg, echo=echo))
    stage("extract", lambda: extraction.extract(cfg))
    _, metrics = stage("train", lambda: classifier.train(cfg))
    where = "out-of-fold" if cfg.classifier.head != "mlp" else "validation"
    echo(f"classifier ({cfg.classifier.head} head): {where} accuracy {metrics['accuracy']:.3f}, top-3 {metrics.get('top3_accuracy', float('nan')):.3f}, "
         f"ECE {metrics['ece_before']:.3f} -> {metrics['ece_after']:.3f} after calibration")
    stage("index", lambda: index.build(cfg))
    results = stage("evaluate", lambda: evaluate.evaluate(cfg, echo=echo))
    if report:
        from vslib import report as report_mod

        stage("report", lambda: report_mod.run_notebooks(cfg))
    echo("\n" + ", ".join(f"{k} {v:.1f}s" for k, v in timings.items())
         + f"; results in {cfg.reports_dir}")
    return results
