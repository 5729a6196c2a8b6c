"""Smoke test of benchmarks/retrieval.py: a tiny Tux Paint run, checking the report it writes."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "retrieval.py"


def test_retrieval_benchmark_tiny(tmp_path):
    out = tmp_path / "bench"
    cmd = [sys.executable, str(SCRIPT), "--datasets", "tuxpaint@8", "--heads", "knn,linear", "--seeds", "2",
           "--out", str(out), "--data", str(tmp_path / "data")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((out / "retrieval.json").read_text())
    assert report["seeds"] == [42, 43]
    rows = {r["head"]: r for r in report["results"]}
    assert set(rows) == {"knn", "linear"}
    for r in rows.values():
        assert r["dataset"] == "tuxpaint (≤8/class)" and len(r["runs"]) == 2
        assert set(r["claims"]) == {"head_top1_ge_1nn", "head_top1_ge_logreg", "adaptive_p1_ge_flat_p1",
                                    "adaptive_p10_ge_hier_p10"}
        mean = r["mean"]
        assert 0 < mean["nn1_accuracy"]["mean"] <= 1 and 0 < mean["logreg_accuracy"]["mean"] <= 1
        for mode in ("flat", "hierarchical", "adaptive"):
            assert set(mean["modes"][mode]) == {"p@1", "p@5", "p@10", "map@10"}
        g = r["gain"]["adaptive_vs_flat"]["p@10"]
        assert g["ci95"][0] <= g["mean"] <= g["ci95"][1]
        # the two seeds are two different splits
        a, b = r["runs"]
        assert (a["n_query"], a["classifier_accuracy"], a["modes"]["flat"]["p@10"]) != \
               (b["n_query"], b["classifier_accuracy"], b["modes"]["flat"]["p@10"])
    md = (out / "retrieval.md").read_text()
    assert "| tuxpaint (≤8/class) | lite0 | knn |" in md and "Time per stage" in md
