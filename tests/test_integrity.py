"""Stored state you can trust (issue 23): damage is found and named, rebuilds never take the live index away.

* a corruption matrix on a real small project: every stored artifact truncated, garbled at the same size or
  deleted; ``visualsearch check`` names each damaged file, ``search`` is one line (never a traceback, never a
  wrong answer), and ``run`` recovers with the clean run's figures;
* the embedded index: a search while a rebuild is under way answers from the old index; a rebuild killed
  before it published leaves the old one searchable and the next build removes the debris; generation names
  cannot leave the index folder; factories the data cannot train are refused naming what they need;
* Elasticsearch (the emulator, or ``VS_ES_URL``): a load killed with refresh off never makes -1 the remembered
  setting; orphan concrete indexes of killed rebuilds are deleted at the next rebuild, never the live one.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from vslib.config import parse_config
from vslib.errors import IndexBackendError
from vslib.index.embedded import EmbeddedIndex, audit, check_factory, remove_debris
from vslib.integrity import DamagedFile, check_unit_vectors, record, verify

ROOT = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, PYTHONPATH=str(ROOT), TF_CPP_MIN_LOG_LEVEL="3", CUDA_VISIBLE_DEVICES="")


def _unit(n: int, dim: int = 16, seed: int = 0) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def _truncate(p: Path) -> None:
    with open(p, "r+b") as f:
        f.truncate(max(1, p.stat().st_size // 3))


def _garble(p: Path) -> None:
    """64 KB (or a third of a smaller file) overwritten in place in the middle: the same size."""
    n = p.stat().st_size
    size = min(65_536, max(1, n // 3))
    with open(p, "r+b") as f:
        f.seek((n - size) // 2)
        f.write(np.random.default_rng(1).integers(0, 256, size, dtype=np.uint8).tobytes())


DAMAGE = {"truncated": _truncate, "garbled": _garble, "deleted": lambda p: p.unlink()}


# -- the integrity primitives ------------------------------------------------------------------------

def test_verify_finds_each_kind_of_damage(tmp_path):
    p = tmp_path / "f.bin"
    p.write_bytes(os.urandom(200_000))
    assert verify(p) == "unverified"
    record(p)
    assert verify(p) == "ok"
    for kind, damage in DAMAGE.items():
        q = tmp_path / f"{kind}.bin"
        shutil.copy(p, q)
        record(q)
        damage(q)
        with pytest.raises(DamagedFile, match=rf"{q.name}: damaged \(") as e:
            verify(q, full=True)
        assert e.value.path == q


def test_unit_vector_check_names_the_first_bad_row():
    v = _unit(10)
    check_unit_vectors(v, "x")
    for bad, what in ((np.nan, "not finite"), (np.inf, "not finite"), (3.0, "norm")):
        w = v.copy()
        w[7, 3] = bad
        with pytest.raises(ValueError, match=rf"x: .*row 7: {what}"):
            check_unit_vectors(w, "x")


# -- the embedded index: crash-safe rebuilds ------------------------------------------------------------

def _embedded_cfg(tmp_path, **embedded):
    return parse_config({"paths": {"data": str(tmp_path / "data")},
                         "index": {"embedded": {"factory": "Flat", **embedded}}}, base_dir=tmp_path)


def _fill(index, n, seed, prefix):
    v = _unit(n, seed=seed)
    index.add([f"{prefix}{i}" for i in range(n)], v, [{"label": prefix} for _ in range(n)])
    return v


def test_a_search_during_a_rebuild_answers_from_the_old_index(tmp_path):
    cfg = _embedded_cfg(tmp_path)
    with EmbeddedIndex.from_config(cfg, dim=16) as live:
        old = _fill(live, 40, 0, "old")
    fresh = EmbeddedIndex.create_fresh(cfg, 16)
    _fill(fresh, 25, 1, "new")
    with EmbeddedIndex.from_config(cfg, create=False) as searcher:  # another process would see the same files
        assert searcher.count() == 40
        assert searcher.search(old[:3], 1)[0][0].id == "old0"
        fresh.publish()
        fresh.close()
        assert searcher.search(old[:3], 1)[2][0].id == "old2"  # an open searcher keeps its generation
    with EmbeddedIndex.from_config(cfg, create=False) as after:
        assert after.count() == 25 and after.search(_unit(25, seed=1)[:1], 1)[0][0].id == "new0"
    assert sorted(p.name for p in cfg.index_dir.iterdir() if p.name.startswith("g")) == ["g000002"]


def test_a_killed_rebuild_leaves_the_old_index_and_the_next_build_removes_its_debris(tmp_path):
    cfg = _embedded_cfg(tmp_path)
    with EmbeddedIndex.from_config(cfg, dim=16) as live:
        old = _fill(live, 30, 0, "old")
    code = ("import sys, numpy as np\n"
            "from vslib.config import parse_config\nfrom vslib.index.embedded import EmbeddedIndex\n"
            f"cfg = parse_config({{'paths': {{'data': {str(tmp_path / 'data')!r}}}}})\n"
            "fresh = EmbeddedIndex.create_fresh(cfg, 16)\n"
            "v = np.eye(16, dtype=np.float32)\n"
            "fresh.add([f'n{i}' for i in range(16)], v, [{'label': 'n'}] * 16)\n"
            "print('added', flush=True); sys.stdin.readline()\n")
    child = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                             env=ENV, cwd=ROOT)
    assert child.stdout.readline().strip() == "added"
    child.send_signal(signal.SIGKILL)
    child.wait(timeout=30)
    (cfg.index_dir / ".tmp-killed").mkdir()  # what a save killed mid-write leaves: a partial generation
    (cfg.index_dir / ".tmp-killed" / "vectors.npy").write_bytes(b"\x93NUMPY partial")
    (cfg.index_dir / "g000007").mkdir()  # a generation written but never named by meta.json
    with EmbeddedIndex.from_config(cfg, create=False) as searcher:
        assert searcher.count() == 30 and searcher.search(old[:1], 1)[0][0].id == "old0"
    findings = audit(cfg)
    assert [f.status for f in findings] == ["ok", "warning", "warning"]
    removed = remove_debris(cfg.index_dir)
    assert sorted(p.name for p in removed) == [".tmp-killed", "g000007"]
    assert [f.status for f in audit(cfg)] == ["ok"]


def test_a_generation_name_cannot_leave_the_index_folder(tmp_path):
    cfg = _embedded_cfg(tmp_path)
    with EmbeddedIndex.from_config(cfg, dim=16) as live:
        _fill(live, 10, 0, "a")
    meta_file = cfg.index_dir / "meta.json"
    meta = json.loads(meta_file.read_text())
    outside = tmp_path / "elsewhere"
    shutil.copytree(cfg.index_dir / meta["generation"], outside)  # a readable generation, outside the folder
    meta["generation"] = os.path.relpath(outside, cfg.index_dir)
    meta_file.write_text(json.dumps(meta))
    with pytest.raises(DamagedFile, match=r"meta.json: damaged \(its generation '\.\./.*' is not a generation name"):
        EmbeddedIndex.from_config(cfg, create=False)


@pytest.mark.parametrize("member", ["vectors.npy", "metadata.parquet"])
@pytest.mark.parametrize("kind", list(DAMAGE))
def test_a_damaged_index_file_is_named_never_searched(tmp_path, member, kind):
    cfg = _embedded_cfg(tmp_path)
    with EmbeddedIndex.from_config(cfg, dim=16) as live:
        _fill(live, 3000, 0, "a")
    gen = json.loads((cfg.index_dir / "meta.json").read_text())["generation"]
    DAMAGE[kind](cfg.index_dir / gen / member)
    with pytest.raises(DamagedFile, match=rf"{member}: damaged .*rebuilds the index"):
        EmbeddedIndex.from_config(cfg, create=False)
    assert audit(cfg)[0].status == "damaged"


def test_nan_rows_written_in_place_are_found(tmp_path):
    cfg = _embedded_cfg(tmp_path)
    with EmbeddedIndex.from_config(cfg, dim=16) as live:
        _fill(live, 100, 0, "a")
    gen = json.loads((cfg.index_dir / "meta.json").read_text())["generation"]
    a = np.load(cfg.index_dir / gen / "vectors.npy", mmap_mode="r+")
    a[:50] = np.nan
    a.flush()
    del a
    with pytest.raises(DamagedFile, match="vectors.npy: damaged"):
        EmbeddedIndex.from_config(cfg, create=False)


def test_factories_the_collection_cannot_train_are_refused_naming_what_they_need():
    with pytest.raises(IndexBackendError, match=r"'IVF4096,PQ64' needs at least 4096 vectors .* has 560.*'Flat'"):
        check_factory("IVF4096,PQ64", 560, 1280)
    with pytest.raises(IndexBackendError, match=r"PQ60 needs a vector dimension divisible by 60"):
        check_factory("IVF16,PQ60", 10_000, 1280)
    check_factory("IVF16,PQ64", 10_000, 1280)
    check_factory("Flat", 3, 1280)


# -- Elasticsearch: refresh and orphans -----------------------------------------------------------------

def _es_cfg(tmp_path, es_url, name):
    return parse_config({"paths": {"data": str(tmp_path / "data")},
                         "index": {"backend": "elasticsearch",
                                   "elasticsearch": {"hosts": [es_url], "index_name": name,
                                                     "index_options": {"type": "flat"}}}}, base_dir=tmp_path)


def _child(code: str) -> subprocess.Popen:
    child = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env=ENV, cwd=ROOT)
    line = child.stdout.readline().strip()
    assert line == "ready", child.stderr.read()[-2000:]
    return child


@pytest.mark.elasticsearch
def test_a_load_killed_with_refresh_off_never_makes_minus_one_the_remembered_setting(tmp_path, es_url):
    from vslib.index.elasticsearch import ElasticsearchIndex
    from vslib.index.elasticsearch import audit as es_audit

    name = f"vs-refresh-{os.getpid()}"
    cfg = _es_cfg(tmp_path, es_url, name)
    with ElasticsearchIndex.from_config(cfg, dim=16) as index:
        index._put_refresh_interval("7s")  # an explicit setting of the user's, to be kept
    code = ("from vslib.config import parse_config\nfrom vslib.index.elasticsearch import ElasticsearchIndex\n"
            f"cfg = parse_config({{'index': {{'backend': 'elasticsearch', 'elasticsearch': {{'hosts': [{es_url!r}], "
            f"'index_name': {name!r}, 'index_options': {{'type': 'flat'}}}}}}}})\n"
            "index = ElasticsearchIndex.from_config(cfg, dim=16)\n"
            "with index.bulk_session():\n    print('ready', flush=True); input()\n")
    child = _child(code)
    child.send_signal(signal.SIGKILL)
    child.wait(timeout=30)
    with ElasticsearchIndex.from_config(cfg, dim=16) as index:
        assert index.refresh_interval() == "-1"  # what the killed load left
    assert any(f.status == "damaged" and "periodic refresh is off" in f.reason for f in es_audit(cfg))
    with ElasticsearchIndex.from_config(cfg, dim=16) as index:
        with index.bulk_session():  # the next load
            index.add(["a"], _unit(1), [{"label": "x"}])
        assert index.refresh_interval() == "7s"
        index._put_refresh_interval("-1")  # -1 left by an older version (no record): the default, never kept
        with index.bulk_session():
            pass
        assert index.refresh_interval() in (None, "1s")
        index.drop()


@pytest.mark.elasticsearch
def test_orphans_of_killed_rebuilds_are_deleted_never_the_live_index(tmp_path, es_url):
    from vslib.index.elasticsearch import ElasticsearchIndex, connect
    from vslib.index.elasticsearch import audit as es_audit

    name = f"vs-orphans-{os.getpid()}"
    cfg = _es_cfg(tmp_path, es_url, name)
    with ElasticsearchIndex.from_config(cfg, dim=16) as live:
        live.add(["old"], _unit(1), [{"label": "x"}])
        live_name = live.index_name
    client = connect(cfg.index.elasticsearch)
    client.indices.create(index=f"{name}-notes")  # someone else's index that merely shares the prefix
    code = ("from vslib.config import parse_config\nfrom vslib.index.elasticsearch import ElasticsearchIndex\n"
            f"cfg = parse_config({{'index': {{'backend': 'elasticsearch', 'elasticsearch': {{'hosts': [{es_url!r}], "
            f"'index_name': {name!r}, 'index_options': {{'type': 'flat'}}}}}}}})\n"
            "fresh = ElasticsearchIndex.create_fresh(cfg, 16)\nprint('ready', flush=True); input()\n")
    child = _child(code)
    child.send_signal(signal.SIGKILL)
    child.wait(timeout=30)
    with ElasticsearchIndex.from_config(cfg, create=False) as searcher:  # the alias still answers from the old one
        assert searcher.index_name == live_name and searcher.search(_unit(1), 1)[0][0].id == "old"
        orphans = searcher.orphans()
    assert len(orphans) == 1 and orphans[0] != live_name
    assert any(f.status == "warning" and orphans[0] in f.path for f in es_audit(cfg))
    fresh = ElasticsearchIndex.create_fresh(cfg, 16)
    fresh.add(["new"], _unit(1, seed=3), [{"label": "x"}])
    fresh.publish()
    fresh.close()
    names = set(client.indices.get(index=f"{name}-*").body)
    assert orphans[0] not in names and live_name not in names and f"{name}-notes" in names
    with ElasticsearchIndex.from_config(cfg, create=False) as after:
        assert after.search(_unit(1, seed=3), 1)[0][0].id == "new"
        after.drop()
    client.indices.delete(index=f"{name}-notes")
    client.close()


# -- the corruption matrix, on a real project through the CLI ---------------------------------------------

def _cli(*args, cfg_path: Path):
    cmd = [sys.executable, "-m", "vslib.cli", *args, "-c", str(cfg_path)]
    return subprocess.run(cmd, capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=900)


def _figures(cfg) -> dict:
    res = json.loads((cfg.reports_dir / "evaluation.json").read_text())
    return {m: {k: round(v, 6) for k, v in r.items() if k.startswith(("p@", "map"))} for m, r in res["modes"].items()} \
        if "modes" in res else res


@pytest.fixture
def project(tux_pipeline, tux_pipeline_copy):
    """This test's copy of the session's small project (built by `visualsearch run`), and its clean figures."""
    return tux_pipeline_copy, _figures(tux_pipeline.cfg)


def _artifacts(cfg) -> dict[str, Path]:
    gen = json.loads((cfg.index_dir / "meta.json").read_text())["generation"]
    return {
        "manifest": cfg.manifest_path,
        "checks": cfg.dataset_dir / "checks.parquet",
        "feature shard": next((cfg.features_dir / "shards").glob("*.npz")),
        "feature file": cfg.features_dir / f"features-{cfg.dataset.name}.npz",
        "classifier": cfg.classifier_dir / "head.npz",
        "index vectors": cfg.index_dir / gen / "vectors.npy",
        "index metadata": cfg.index_dir / gen / "metadata.parquet",
    }


@pytest.mark.slow
@pytest.mark.parametrize("kind", list(DAMAGE))
def test_every_artifact_damaged_is_named_then_recovered_by_run(project, kind):
    cfg, clean = project
    cfg_path = Path(cfg.base_dir) / cfg.source
    damaged = _artifacts(cfg)
    for p in damaged.values():
        DAMAGE[kind](p)
    check = _cli("check", cfg_path=cfg_path)
    assert check.returncode == 2, check.stdout + check.stderr[-2000:]
    for what, p in damaged.items():
        if kind == "deleted" and what == "feature shard":
            continue  # a deleted shard leaves no trace to name: its images are simply not cached
        assert str(p) in check.stdout or (what == "classifier" and str(p.parent) in check.stdout), (what, check.stdout)
    query = next(iter(sorted((Path("/usr/share/tuxpaint/stamps")).rglob("*.png"))))
    search = _cli("search", str(query), "-k", "3", cfg_path=cfg_path)
    assert search.returncode == 2 and "Traceback" not in search.stderr, search.stderr[-2000:]
    assert search.stdout == "" and search.stderr.strip().splitlines()[-1].startswith("error: ")
    run = _cli("run", cfg_path=cfg_path)
    assert run.returncode == 0 and "Traceback" not in run.stderr, run.stderr[-3000:]
    assert _figures(cfg) == clean
    again = _cli("check", cfg_path=cfg_path)
    assert again.returncode == 0, again.stdout
    assert "damaged" not in again.stdout.split("checked")[0]
