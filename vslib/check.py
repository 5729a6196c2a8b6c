"""``visualsearch check``: an fsck for the project's stored state.

Verifies, fully, every artifact of the configured dataset and backbone — the manifest and
the checks file, the feature cache's shards and the feature file (checksums, and every
vector finite and unit length), the classifier's files, the index (embedded: meta.json and
the live generation; Elasticsearch: the alias, an index left with periodic refresh off,
orphan concrete indexes), the UMAP caches and the experiment run records — and lists what is
damaged and what the next ``visualsearch run`` will redo. Nothing is changed: the stage that
owns an artifact repairs it on the next run.

Each stage's module owns its audit (``audit(cfg) -> list[Finding]``); this module only
gathers them, so a new artifact is checked where it is written.
"""
from __future__ import annotations

import json
import sys
from typing import Callable

from vslib import classifier, datasets, experiments, explorer, features
from vslib.index import elasticsearch, embedded
from vslib.integrity import Finding


def _audits(cfg) -> list[tuple[str, Callable]]:
    out = [("dataset", datasets.audit), ("features", features.audit), ("classifier", classifier.audit)]
    if cfg.index.backend == "elasticsearch":
        out.append(("index", elasticsearch.audit))
    else:
        out.append(("index", embedded.audit))
    out += [("umap", explorer.audit_umap), ("runs", experiments.audit)]
    return out


def findings(cfg, *, progress: bool = True) -> list[Finding]:
    """Every artifact's :class:`~vslib.integrity.Finding`, stage by stage (never raises for damage)."""
    from tqdm.auto import tqdm

    audits = _audits(cfg)
    out: list[Finding] = []
    for name, audit in tqdm(audits, desc="checking", unit="stage", disable=not progress, leave=False):
        out.extend(audit(cfg))
    return out


def run(cfg, *, as_json: bool = False, verbose: bool = False, out=None) -> int:
    """Print what :func:`findings` found; 0 when nothing is damaged, else 2.

    Text: one line per artifact that is not ``ok`` (every artifact with ``verbose``), then a
    summary. ``as_json``: ``{"ok": bool, "findings": [{path, what, status, reason, redo}]}``.
    """
    out = out or sys.stdout
    found = findings(cfg, progress=not as_json)
    damaged = [f for f in found if f.bad]
    if as_json:
        print(json.dumps({"ok": not damaged, "findings": [f.__dict__ for f in found]}, indent=2,
                         allow_nan=False), file=out)
        return 2 if damaged else 0
    for f in found:
        if verbose or f.status != "ok":
            print(f.line(), file=out)
    counts: dict[str, int] = {}
    for f in found:
        counts[f.status] = counts.get(f.status, 0) + 1
    summary = ", ".join(f"{n} {status}" for status, n in sorted(counts.items())) or "nothing stored yet"
    print(f"checked {len(found)} artifacts of dataset {cfg.dataset.name!r}, backbone {cfg.backbone_tag!r}: "
          f"{summary}", file=out)
    if damaged:
        print("the next `visualsearch run` redoes what is damaged (feature shards, feature and checks files are set "
              "aside as *.damaged first; the classifier and the index are rebuilt)", file=out)
    return 2 if damaged else 0


__all__ = ["findings", "run"]
