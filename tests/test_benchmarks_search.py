"""Smoke test of benchmarks/search.py: a tiny run through every backend, checking the JSON it writes."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from benchmarks.es_server import find_binary
from benchmarks.search_data import hardness, hardness_gap
from benchmarks.search_embedded import nlist_for

ROOT = Path(__file__).resolve().parents[1]
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
    report = _run(tmp_path, "--backends", "numpy,embedded-exact,embedded-hnsw,embedded-quant",
                  "--quant-factories", "HNSW16,SQ8;IVF{nlist},SQ8", "--rerank", "0,200", "--nprobe", "64")
    assert report["machine"]["cpu_cores"] >= 1 and report["machine"]["ram_gib"] > 0
    assert "emulator" in report["emulator_note"].lower()
    res = report["sizes"]["3000"]
    assert res["n"] == 3000 and res["dim"] == 64 and res["raw_bytes"] == 3000 * 64 * 4
    assert 0.02 < res["label_share"] < 0.12  # one label is ~5% of the collection
    rows = {(r["backend"], r["setting"]): r for r in res["results"]}
    assert {b for b, _ in rows} == {"numpy", "embedded-exact", "embedded-hnsw", "embedded-quant"}
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
    quant = [r for r in res["results"] if r["backend"] == "embedded-quant"]
    assert {r["factory"] for r in quant} == {"HNSW16,SQ8", f"IVF{nlist_for(3000)},SQ8"}
    assert len(quant) == 4  # factories x rerank depths (one efSearch / nprobe each)
    for r in quant:
        assert "memory-mapped" in r["vectors"] and r["vector_buffer_bytes"] == 0
        if r["rerank"] == 200:  # 200 candidates re-ranked exactly out of 3000 clustered vectors
            assert r["recall"] >= 0.98, r
    # the hardness of the benchmark collection is published beside its results
    h = res["hardness"]
    assert h["n"] == 3000 and h["lid_median"] > 1 and h["rc_median"] > 1
    assert any(x["data"].startswith("benchmark collection") for x in report["hardness"])
    assert {t["target"] for t in report["targets"]} and all(t["status"] in ("PASS", "FAIL", "n/a")
                                                            for t in report["targets"])
    assert all(t["provisional"] for t in report["targets"])  # 3000 vectors, not the 1M the targets are set at


def test_hardness_measures_intrinsic_dimension_and_contrast():
    rng = np.random.default_rng(0)
    basis = np.linalg.qr(rng.standard_normal((128, 5)))[0].T  # 5 orthonormal directions in 128 dims
    low = (rng.standard_normal((4000, 5)) @ basis).astype(np.float32) * 0.05
    low[:, 0] += 1.0  # a small patch of the sphere around e0, 5-dimensional
    low /= np.linalg.norm(low, axis=1, keepdims=True)
    high = rng.standard_normal((4000, 128)).astype(np.float32)
    high /= np.linalg.norm(high, axis=1, keepdims=True)
    h_low = hardness(low[100:], low[:100])
    h_high = hardness(high[100:], high[:100])
    assert 3.5 < h_low["lid_median"] < 7.5, h_low  # the MLE finds the 5 dimensions
    assert h_high["lid_median"] > 25, h_high
    assert h_low["rc_median"] > 2.0 and 1.0 < h_high["rc_median"] < 1.3  # random 128-d points: all alike far
    assert hardness_gap(h_low, h_low) == 0 and hardness_gap(h_low, h_high) > 1


def test_search_benchmark_real_vectors_and_calibration(tmp_path):
    import pandas as pd

    from vslib.features import FeatureSet

    rng = np.random.default_rng(1)
    centres = rng.standard_normal((8, 64))
    lab = rng.integers(0, 8, 700)
    x = (centres[lab] + 0.8 * rng.standard_normal((700, 64))).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    table = pd.DataFrame({"path": [f"{i}.png" for i in range(700)], "label": [f"c{v}" for v in lab],
                          "split": "index", "content_hash": [str(i) for i in range(700)]})
    feats = FeatureSet(x, table, "test").save(tmp_path / "features-real.npz")
    report = _run(tmp_path, "--backends", "numpy,embedded-quant", "--quant-factories", "IVF16,SQ8",
                  "--rerank", "100", "--nprobe", "16", "--real", str(feats), "--calibrate", str(feats))
    real = report["real"]["features-real.npz"]
    assert real["n"] == 700 - 40  # its own size: the 40 queries are held out, nothing is tiled
    assert {r["backend"] for r in real["results"]} == {"numpy", "embedded-quant"}
    assert next(r for r in real["results"] if r["backend"] == "embedded-quant")["recall"] >= 0.98
    cal = report["calibration"]
    target = next(h for h in report["hardness"] if h["data"] == "real: features-real.npz")
    assert cal["target"] == "features-real.npz" and set(cal["params"]) == {"per_cluster", "rank", "spread", "noise"}
    # the chosen parameters are the closest of the grid, and they generate the synthetic sizes of the run
    assert cal["best"][0]["gap"] == min(b["gap"] for b in cal["best"])
    assert hardness_gap(cal["hardness"], target) == pytest.approx(cal["best"][0]["gap"])
    assert f"rank-{cal['params']['rank']} " in report["source"]
    md = (tmp_path / "bench" / "search.md").read_text()
    assert "How hard the data is" in md and "Real vectors: features-real.npz" in md


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
