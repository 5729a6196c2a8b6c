"""The files of the runs folder (``reports/runs/<run-id>/``): reading and writing a run's record, checking them.

Per run: ``run.json`` (the record), ``config.yaml`` (the run's own config, its
snapshot) and ``metrics.json``, each with a checksum sidecar. A damaged or
unreadable record or snapshot makes the run count as not run: a warning says so
and the next experiment reruns it.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Optional

import yaml

from vslib.atomic import atomic_write_json
from vslib.config import Config
from vslib.integrity import DamagedFile, audit_file, verify
from vslib.redact import redact_obj

log = logging.getLogger(__name__)

RUNS_DIR = "runs"
RECORD = "run.json"
RUN_CONFIG = "config.yaml"
METRICS = "metrics.json"


def runs_dir(cfg: Config) -> Path:
    """``<reports>/runs`` of the base config."""
    return cfg.reports_dir / RUNS_DIR


def find_run(root: Path, settings: str) -> Optional[Path]:
    """The folder under ``root`` holding a run of these settings (hash), whatever its readable name."""
    for folder in sorted(Path(root).glob(f"*_{settings}")):
        rec = read_record(folder)
        if rec is not None and rec.get("hash") == settings:
            return folder
    return None


def read_record(folder: Path) -> Optional[dict]:
    """The run record in ``folder``; None when there is none, or when it is damaged (then the run counts as not run,
    and the next experiment reruns it: a warning says so)."""
    path = Path(folder) / RECORD
    if not path.exists():
        return None
    try:
        verify(path, full=True, redo="the next `visualsearch experiment` reruns this run")
        return json.loads(path.read_text(encoding="utf-8"))
    except DamagedFile as e:
        log.warning("%s", e)
    except (OSError, ValueError) as e:
        log.warning("%s: unreadable run record (%s); the next `visualsearch experiment` reruns this run", path, e)
    return None


def snapshot_intact(folder: Path) -> bool:
    """Whether the run's ``config.yaml`` matches its checksum (a damaged one: a warning, and the run counts as not
    run, so it is run again and the snapshot rewritten)."""
    path = Path(folder) / RUN_CONFIG
    try:
        verify(path, full=True, redo="the next `visualsearch experiment` reruns this run")
    except DamagedFile as e:
        log.warning("%s", e)
        return False
    except OSError as e:
        log.warning("%s: unreadable config snapshot (%s); the next `visualsearch experiment` reruns this run", path, e)
        return False
    return True


def write_json(path: Path, obj: Any, secrets=()) -> None:
    """Strict JSON with a checksum sidecar; every string scrubbed of ``secrets`` (and URL userinfo, tokens)."""
    atomic_write_json(path, redact_obj(obj, secrets), default=str, verified=True)


def audit(cfg: Config) -> list:
    """Full check of every run under the config's runs folder: its record, config snapshot and metrics
    (a :class:`~vslib.integrity.Finding` each; damage is reported, never raised)."""
    root = runs_dir(cfg)
    out = []
    redo = "the next `visualsearch experiment` reruns this run"
    for folder in sorted(p.parent for p in root.glob(f"*/{RECORD}")) if root.is_dir() else []:
        for name, what, parse in ((RECORD, "run record", json.loads), (METRICS, "run metrics", json.loads),
                                  (RUN_CONFIG, "run config snapshot", yaml.safe_load)):
            path = folder / name
            if name == METRICS and not path.exists():
                continue  # a run that failed or is under way has none yet
            finding = audit_file(path, what, redo)
            if not finding.bad:  # also a file written before checksums were recorded must parse
                try:
                    parse(path.read_text(encoding="utf-8"))
                except (OSError, ValueError, yaml.YAMLError) as e:
                    finding.status, finding.reason = "damaged", f"unreadable: {str(e).splitlines()[0]}"
            out.append(finding)
    return out


def load_runs(root: str | os.PathLike) -> list[dict]:
    """Every run record under ``root`` (``reports/runs``), oldest first."""
    root = Path(root)
    recs = [r for r in (read_record(p) for p in sorted(root.iterdir()) if p.is_dir()) if r] if root.is_dir() else []
    return sorted(recs, key=lambda r: (r.get("started") or "", r.get("id", "")))


__all__ = ["METRICS", "RECORD", "RUNS_DIR", "RUN_CONFIG", "audit", "find_run", "load_runs", "read_record", "runs_dir",
           "snapshot_intact", "write_json"]
