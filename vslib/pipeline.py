"""One click: prepare -> extract -> train -> index -> evaluate (-> notebook reports).

Each stage reuses what an earlier run left behind (manifest checks, the
feature cache, a classifier trained on the same features and settings), so a
second run is fast and an interrupted one resumes. The stages run through
:class:`vslib.stages.Runner`, as a notebook's :func:`vslib.report.ensure` and
an experiment's runs do; ``run`` loads the index split into the index every
time (refreshing items whose vectors changed), rebuilding it when it holds
another number of items (:func:`vslib.stages.index_action`).
"""
from __future__ import annotations

import logging

from vslib import report as report_mod
from vslib.config import Config
from vslib.registry import HEADS
from vslib.stages import Runner

log = logging.getLogger(__name__)


def run(cfg: Config, *, report: bool = False, echo=print) -> dict:
    """Run every stage on ``cfg``; return the evaluation results."""
    runner = Runner(cfg, echo=echo, header="\n== {name} ==")

    def after(stage, out):
        if stage == "train":
            _, metrics = out
            where = "out-of-fold" if HEADS.spec(cfg.classifier.head)["cross_fitted"] else "validation"
            echo(f"classifier ({cfg.classifier.head} head): {where} accuracy {metrics['accuracy']:.3f}, top-3 "
                 f"{metrics.get('top3_accuracy', float('nan')):.3f}, "
                 f"ECE {metrics['ece_before']:.3f} -> {metrics['ece_after']:.3f} after calibration")

    results = runner.run("evaluate", after=after)["evaluate"]
    if report:
        runner.stage("report", lambda: report_mod.run_notebooks(cfg))
    echo("\n" + ", ".join(f"{k} {v:.1f}s" for k, v in runner.timings.items())
         + f"; results in {cfg.reports_dir}")
    return results
