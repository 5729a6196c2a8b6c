"""Smoke test of benchmarks/search.py: a tiny run through every backend, checking the JSON it writes."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from es_server import find_binary  # noqa: E402

SCRIPT = ROOT / "benchmarks" / "search.py"
ROW_KEYS = {"backend", "setting", "build_s", "index_bytes", "qps_single", "qps_batch", "recall",
            "filtered_qps_single", "filtered_qps_batch", "filtered_recall"}


def _run(tmp_path, *extra) -> dict:
    out = tmp_path / "bench"
    cmd = [sys.executable, str(SCRIPT), "--sizes", "3000", "--dim", "64", "--queries", "40", "--ef", "16,128",
           "--num-candidates", "100", "--single-budget", "0.5", "--no-cache", "--out", str(out), *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "EMULATOR" in proc.stdout  # the printed header says where the Elasticsearch figures come from
    assert (out / "search.md").read_text().count("|") > 20
    return json.loads((out / "search.json").read_text())


def test_search_benchmark_embedded(tmp_path):
    report = _run(tmp_path, "--backends", "numpy,embedded-exact,embedded-hnsw")
    assert report["machine"]["cpu_cores"] >= 1 and report["machine"]["ram_gib"] > 0
    assert "emulator" in report["emulator_note"].lower()
    res = report["sizes"]["3000"]
    assert res["n"] == 3000 and res["dim"] == 64 and res["raw_bytes"] == 3000 * 64 * 4
    assert 0.02 < res["label_share"] < 0.12  # one label is ~5% of the collection
    rows = {(r["backend"], r["setting"]): r for r in res["results"]}
    assert {b for b, _ in rows} == {"numpy", "embedded-exact", "embedded-hnsw"}
    assert len([r for r in res["results"] if r["backend"] == "embedded-hnsw"]) == 2  # one row per efSearch
    for r in res["results"]:
        assert ROW_KEYS <= set(r), r
        assert r["qps_single"] > 0 and r["qps_batch"] > 0 and r["filtered_qps_single"] > 0
        assert 0.0 <= r["recall"] <= 1.0 and 0.0 <= r["filtered_recall"] <= 1.0
        assert r["build_s"] >= 0
    for backend in ("numpy", "embedded-exact"):  # exact searches agree with the ground truth
        r = next(r for r in res["results"] if r["backend"] == backend)
        assert r["recall"] >= 0.999 and r["filtered_recall"] >= 0.999, r
    hnsw = max((r for r in res["results"] if r["backend"] == "embedded-hnsw"), key=lambda r: r["ef_search"])
    assert hnsw["recall"] >= 0.9  # efSearch=128 over 3000 vectors is close to exact
    assert hnsw["index_bytes"] > 0 and hnsw["faiss_bytes"] > 0
    assert {t["target"] for t in report["targets"]} and all(t["status"] in ("PASS", "FAIL", "n/a")
                                                            for t in report["targets"])
    assert all(t["provisional"] for t in report["targets"])  # 3000 vectors, not the 1M the targets are set at


@pytest.mark.skipif(find_binary() is None, reason="noida-db (the Elasticsearch-API test server) is not installed")
def test_search_benchmark_elasticsearch_emulator(tmp_path):
    report = _run(tmp_path, "--backends", "numpy,es-knn,es-exact", "--es-queries", "10")
    res = report["sizes"]["3000"]
    assert not res["notes"], res["notes"]
    es = [r for r in res["results"] if r["backend"].startswith("es-")]
    assert {r["backend"] for r in es} == {"es-knn", "es-exact"}
    for r in es:
        assert r["emulator"] is True and r["qps_single"] > 0 and r["qps_batch"] > 0
        # _msearch: fewer HTTP requests per query than one search per call; class counts in one aggregation
        assert r["rpq_single"] == 1 and r["rpq_batch"] < 1 and r["rpq_adaptive_loop"] == 6
        assert r["rpq_adaptive_msearch"] < 1 and r["class_count_requests_agg"] == 1 < r["class_count_requests_loop"]
    exact = next(r for r in es if r["backend"] == "es-exact")
    assert exact["recall"] >= 0.999 and exact["filtered_recall"] >= 0.999


@pytest.mark.slow
def test_quick_mode_as_documented(tmp_path):
    """`benchmarks/search.py --quick`, exactly as README documents it (10k vectors, about a minute)."""
    out = tmp_path / "quick"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--no-cache", "--out", str(out)],
                          capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((out / "search.json").read_text())
    assert list(report["sizes"]) == ["10000"]
    rows = report["sizes"]["10000"]["results"]
    assert {"numpy", "embedded-exact", "embedded-hnsw"} <= {r["backend"] for r in rows}
    hnsw = [r for r in rows if r["backend"] == "embedded-hnsw"]
    assert max(r["recall"] for r in hnsw) >= 0.95
    # the embedded index holds the vectors once (FAISS's storage), plus the HNSW links
    assert all(r["index_bytes"] <= 1.5 * report["sizes"]["10000"]["raw_bytes"] for r in hnsw)
    assert "Targets:" in proc.stdout
