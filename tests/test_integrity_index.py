"""The embedded index as stored state you can trust (issue 23).

* rebuilds never take the live index away: a search in another process while a rebuild is paused (between its
  adds and its publish, or at each rename of the publish) answers from the old generation; a searcher that opened
  the old generation keeps answering from it after the publish removed it (Flat copies into RAM, a compressed
  factory keeps the floats memory-mapped); a rebuild SIGKILLed at each of those points leaves the old (or, once
  meta.json was switched, the new) index searchable, and the next save, which waits for a running build's lock,
  removes its debris;
* meta.json's generation must be ``gNNNNNN``: anything else (``../../..``, an absolute path, ...) is one line naming
  meta.json, never a read outside the index folder;
* vectors.npy / metadata.parquet / meta.json truncated, garbled at the same size or deleted, and NaN rows written in
  place (also past the full-CRC threshold, where a sample of rows is checked), are named, never searched;
* vectors that are not finite or not unit length are refused by ``add``; factories the collection cannot train
  are refused naming what they need;
* on a small real project through the CLI: each damage makes ``search`` one line (exit 2) naming the file and that
  the next ``index`` / ``run`` rebuilds it; ``index`` then exits 0 and the hits equal the clean build's;
  ``IVF4096,PQ64`` on the ~100 index images is one line naming the factory, and the live index is untouched.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from vslib.config import parse_config
from vslib.errors import IndexBackendError
from vslib.index import BulkIndexError
from vslib.index import embedded as embedded_module
from vslib.index.base import IndexNotFoundError
from vslib.index.embedded import EmbeddedIndex, audit, check_factory
from vslib.integrity import DamagedFile

ROOT = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, PYTHONPATH=str(ROOT), TF_CPP_MIN_LOG_LEVEL="3", CUDA_VISIBLE_DEVICES="")
DIM = 16


def _unit(n: int, dim: int = DIM, seed: int = 0) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def _truncate(p: Path) -> None:
    with open(p, "r+b") as f:
        f.truncate(max(1, p.stat().st_size // 3))


def _garble(p: Path) -> None:
    """A third of the file (64 KB at most), in its middle, overwritten with random bytes: the same size."""
    n = p.stat().st_size
    size = min(65_536, max(1, n // 3))
    with open(p, "r+b") as f:
        f.seek((n - size) // 2)
        f.write(np.random.default_rng(1).integers(0, 256, size, dtype=np.uint8).tobytes())


DAMAGE = {"truncated": _truncate, "garbled": _garble, "deleted": lambda p: p.unlink()}
MEMBERS = ["vectors.npy", "metadata.parquet", "meta.json"]


def _options(factory: str) -> dict:
    # a compressed factory with re-ranking keeps the float vectors memory-mapped from the generation's file
    return {"factory": factory} if factory == "Flat" else {"factory": factory, "rerank": 20, "mmap_vectors": True}


def _cfg_data(tmp_path: Path, factory: str = "Flat") -> dict:
    return {"paths": {"data": str(tmp_path / "data")}, "index": {"embedded": _options(factory)}}


def _cfg(tmp_path: Path, factory: str = "Flat"):
    return parse_config(_cfg_data(tmp_path, factory), base_dir=tmp_path)


def _fill(index, n: int, seed: int, prefix: str) -> np.ndarray:
    v = _unit(n, seed=seed)
    index.add([f"{prefix}{i}" for i in range(n)], v, [{"label": prefix} for _ in range(n)])
    return v


def _build(cfg, n: int, seed: int, prefix: str) -> np.ndarray:
    with EmbeddedIndex.from_config(cfg, dim=DIM) as index:
        return _fill(index, n, seed, prefix)


def _live(cfg) -> str:
    return json.loads((cfg.index_dir / "meta.json").read_text())["generation"]


def _generations(cfg) -> list[str]:
    return sorted(p.name for p in cfg.index_dir.iterdir() if embedded_module.GENERATION.match(p.name))


def _top1(cfg, queries) -> list[str]:
    with EmbeddedIndex.from_config(cfg, create=False) as index:
        return [hits[0].id for hits in index.search(queries, 1)]


# a process that opens the index once and answers a search (the top ids) for each line it reads
SEARCHER = """
import json, sys
import numpy as np
from vslib.config import parse_config
from vslib.index.embedded import EmbeddedIndex
data, base, queries = json.loads(sys.argv[1]), sys.argv[2], np.load(sys.argv[3])
index = EmbeddedIndex.from_config(parse_config(data, base_dir=base), create=False)
for line in sys.stdin:
    print(json.dumps({"count": index.count(), "top": [h[0].id for h in index.search(queries, 1)]}), flush=True)
"""

# a rebuild (as vslib.index.build does it: under the folder's lock, create_fresh, add, publish) that pauses at
# `point` and waits for a line on stdin: "added" (between the adds and the publish), "generation" (the new
# generation written, before its folder is renamed into place), "meta" (before meta.json is replaced), "switched"
# (meta.json replaced, older generations not yet removed)
REBUILDER = """
import json, os, re, sys
import numpy as np
from vslib.config import parse_config
from vslib.index.embedded import EmbeddedIndex
from vslib.locks import run_lock
data, base, point, n = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3], int(sys.argv[4])
cfg = parse_config(data, base_dir=base)

def pause(what):
    print("paused " + what, flush=True)
    sys.stdin.readline()

real_replace = os.replace
def replace(src, dst):
    name = os.path.basename(str(dst))
    if (point == "generation" and re.fullmatch(r"g\\d{6}", name)) or (point == "meta" and name == "meta.json"):
        pause(point)
    real_replace(src, dst)
    if point == "switched" and name == "meta.json":
        pause(point)

with run_lock(cfg.index_dir, "a test rebuild"):
    os.replace = replace
    fresh = EmbeddedIndex.create_fresh(cfg, 16)
    v = np.random.default_rng(1).standard_normal((n, 16)).astype(np.float32)
    fresh.add([f"new{i}" for i in range(n)], v / np.linalg.norm(v, axis=1, keepdims=True), [{"label": "new"}] * n)
    if point == "added":
        pause(point)
    fresh.publish()
    fresh.close()
print("published", flush=True)
"""


def _spawn(script: str, *args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", script, *map(str, args)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV, cwd=ROOT)


def _ask(searcher: subprocess.Popen) -> dict:
    searcher.stdin.write("search\n")
    searcher.stdin.flush()
    line = searcher.stdout.readline()
    assert line, searcher.stderr.read()[-3000:]
    return json.loads(line)


def _wait_for(child: subprocess.Popen, text: str) -> None:
    line = child.stdout.readline().strip()
    if line != text:
        child.kill()
        raise AssertionError(f"expected {text!r}, got {line!r}: {child.stderr.read()[-3000:]}")


# -- rebuilds never take the live index away -------------------------------------------------------------

@pytest.mark.parametrize("factory", ["Flat", "IVF4,SQ8"])
def test_a_search_during_a_paused_rebuild_answers_from_the_old_generation(tmp_path, factory):
    cfg = _cfg(tmp_path, factory)
    old = _build(cfg, 200, 0, "old")
    queries = old[:5]
    np.save(tmp_path / "q.npy", queries)
    before = _generations(cfg)
    opened_before = _spawn(SEARCHER, json.dumps(_cfg_data(tmp_path, factory)), tmp_path, tmp_path / "q.npy")
    assert _ask(opened_before) == {"count": 200, "top": [f"old{i}" for i in range(5)]}
    rebuild = _spawn(REBUILDER, json.dumps(_cfg_data(tmp_path, factory)), tmp_path, "added", 120)
    try:
        _wait_for(rebuild, "paused added")
        # a searcher started while the rebuild is paused, and the one opened before, answer from the old index
        during = _spawn(SEARCHER, json.dumps(_cfg_data(tmp_path, factory)), tmp_path, tmp_path / "q.npy")
        assert _ask(during) == {"count": 200, "top": [f"old{i}" for i in range(5)]}
        during.stdin.close()
        during.wait(timeout=60)
        assert _generations(cfg) == before  # nothing of the rebuild is on disk yet
        rebuild.stdin.write("go\n")
        rebuild.stdin.flush()
        _wait_for(rebuild, "published")
        assert rebuild.wait(timeout=60) == 0
    finally:
        rebuild.kill()
    assert _generations(cfg) == [_live(cfg)] and _live(cfg) not in before  # the old generation was removed...
    # ...and the searcher that had it open still answers from it (RAM copy, or the unlinked memory-mapped file)
    assert _ask(opened_before) == {"count": 200, "top": [f"old{i}" for i in range(5)]}
    opened_before.stdin.close()
    assert opened_before.wait(timeout=60) == 0, opened_before.stderr.read()[-3000:]
    with EmbeddedIndex.from_config(cfg, create=False) as after:
        assert after.count() == 120 and after.search(queries, 1)[0][0].id.startswith("new")


@pytest.mark.parametrize("point", ["added", "generation", "meta", "switched"])
def test_a_rebuild_killed_at_each_step_leaves_a_searchable_index_and_the_next_save_removes_its_debris(tmp_path,
                                                                                                      point):
    cfg = _cfg(tmp_path)
    old = _build(cfg, 50, 0, "old")
    live = _live(cfg)
    rebuild = _spawn(REBUILDER, json.dumps(_cfg_data(tmp_path)), tmp_path, point, 30)
    try:
        _wait_for(rebuild, f"paused {point}")
        # the running rebuild's files are its work in progress, not debris of a killed build
        assert [f.status for f in audit(cfg)] == ["ok"], [f.line() for f in audit(cfg)]
        # a save elsewhere (a library user's close) waits for the rebuild's lock: it never removes the rebuild's files
        with EmbeddedIndex.from_config(cfg, create=False) as other:
            other.add(["extra"], _unit(1, seed=9), [{"label": "extra"}])
            saver = threading.Thread(target=other.close)
            saver.start()
            saver.join(timeout=3)
            assert saver.is_alive(), "a save ran while a rebuild held the index folder's lock"
            if point in ("generation", "meta"):
                assert any(p.name.startswith(".tmp-") or (p.name.startswith("g") and p.name != live)
                           for p in cfg.index_dir.iterdir()), "the paused rebuild's files are not there"
            rebuild.send_signal(signal.SIGKILL)
            rebuild.wait(timeout=30)
            saver.join(timeout=120)
            assert not saver.is_alive()
    finally:
        rebuild.kill()
    # the surviving index is the old one, or the new one when meta.json had been switched before the kill (the
    # save opened it after the switch), plus the save's item
    switched = point == "switched"
    with EmbeddedIndex.from_config(cfg, create=False) as index:
        assert index.count() == (31 if switched else 51)
        queries, prefix = (_unit(30, seed=1), "new") if switched else (old, "old")
        assert [h[0].id for h in index.search(queries[:3], 1)] == [f"{prefix}{i}" for i in range(3)]
        assert index.search(_unit(1, seed=9), 1)[0][0].id == "extra"
    findings = audit(cfg)
    assert [f.status for f in findings] == ["ok"], [f.line() for f in findings]  # no debris is left
    assert _generations(cfg) == [_live(cfg)]
    assert not [p for p in cfg.index_dir.iterdir() if p.name.startswith(".tmp-")]


def test_debris_is_a_warning_until_the_next_save_removes_it_never_the_live_generation(tmp_path):
    cfg = _cfg(tmp_path)
    old = _build(cfg, 40, 0, "old")
    live = _live(cfg)
    (cfg.index_dir / ".tmp-killed").mkdir()
    (cfg.index_dir / ".tmp-killed" / "vectors.npy").write_bytes(b"\x93NUMPY partial")
    (cfg.index_dir / "g000042").mkdir()  # written, never named by meta.json
    (cfg.index_dir / ".meta.json.tmp123").write_text("{")  # a killed atomic write of meta.json
    findings = audit(cfg)
    assert [f.status for f in findings] == ["ok", "warning", "warning", "warning"], [f.line() for f in findings]
    assert {Path(f.path).name for f in findings[1:]} == {".tmp-killed", "g000042", ".meta.json.tmp123"}
    assert _top1(cfg, old[:2]) == ["old0", "old1"]  # searches ignore the debris
    with EmbeddedIndex.from_config(cfg, create=False) as index:
        index.add(["more"], _unit(1, seed=5), [{"label": "more"}])
    assert sorted(p.name for p in cfg.index_dir.iterdir() if p.name not in (".lock",)) == \
        sorted([_live(cfg), "meta.json"]) and _live(cfg) not in (live, "g000042")
    assert [f.status for f in audit(cfg)] == ["ok"]


# -- generation names --------------------------------------------------------------------------------------

@pytest.mark.parametrize("generation", ["../../..", "../elsewhere", "/tmp", "g00001", "g0000001", "g000001/..",
                                        "G000001", 7, None])
def test_a_generation_that_is_not_gNNNNNN_is_one_line_naming_meta_json(tmp_path, generation):
    cfg = _cfg(tmp_path)
    _build(cfg, 10, 0, "a")
    outside = tmp_path / "elsewhere"
    shutil.copytree(cfg.index_dir / _live(cfg), outside)  # a readable generation outside the index folder
    meta_file = cfg.index_dir / "meta.json"
    meta = json.loads(meta_file.read_text())
    meta["generation"] = generation
    meta_file.write_text(json.dumps(meta))
    with pytest.raises(DamagedFile, match=r"meta.json: damaged \(its generation .* is not a generation name "
                                          r"\(gNNNNNN\)\); the next `visualsearch index` \(or `run`\) rebuilds"):
        EmbeddedIndex.from_config(cfg, create=False)
    assert [(Path(f.path).name, f.status) for f in audit(cfg)] == [("meta.json", "damaged")]


@pytest.mark.parametrize("field, value", [("dim", 0), ("count", -1), ("dim", "x"), ("files", {"vectors.npy": 3}),
                                          ("files", []), ("format", "other")])
def test_impossible_values_in_meta_json_are_one_line_naming_it(tmp_path, field, value):
    cfg = _cfg(tmp_path)
    _build(cfg, 10, 0, "a")
    meta_file = cfg.index_dir / "meta.json"
    meta = json.loads(meta_file.read_text())
    meta[field] = value
    meta_file.write_text(json.dumps(meta))
    with pytest.raises(DamagedFile, match=r"meta.json: damaged \("):
        EmbeddedIndex.from_config(cfg, create=False)
    assert [(Path(f.path).name, f.status) for f in audit(cfg)] == [("meta.json", "damaged")]


# -- damaged files -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("member", MEMBERS)
@pytest.mark.parametrize("kind", list(DAMAGE))
def test_each_index_file_damaged_is_named_never_searched(tmp_path, member, kind):
    cfg = _cfg(tmp_path)
    _build(cfg, 3000, 0, "a")
    path = cfg.index_dir / "meta.json" if member == "meta.json" else cfg.index_dir / _live(cfg) / member
    DAMAGE[kind](path)
    if member == "meta.json" and kind == "deleted":
        with pytest.raises(IndexNotFoundError, match="no embedded index .* build it with `visualsearch index`"):
            EmbeddedIndex.from_config(cfg, create=False)
        assert [(f.path, f.status) for f in audit(cfg)] == [(str(path), "damaged")]
        return
    with pytest.raises(DamagedFile, match=rf"{member}: damaged \(.*\); the next `visualsearch index` \(or `run`\) "
                                          "rebuilds the index"):
        EmbeddedIndex.from_config(cfg, create=False)
    findings = audit(cfg)
    assert [(f.path, f.status) for f in findings] == [(str(path), "damaged")], [f.line() for f in findings]


@pytest.mark.parametrize("kind", list(DAMAGE))
def test_a_damaged_faiss_index_is_named_never_searched(tmp_path, kind):
    cfg = _cfg(tmp_path, "IVF4,SQ8")
    _build(cfg, 300, 0, "a")
    path = cfg.index_dir / _live(cfg) / "faiss.index"
    DAMAGE[kind](path)
    with pytest.raises(DamagedFile, match=r"faiss.index: damaged \(.*\); the next `visualsearch index`"):
        EmbeddedIndex.from_config(cfg, create=False)
    assert [(f.path, f.status) for f in audit(cfg)] == [(str(path), "damaged")]


@pytest.mark.parametrize("large", [False, True], ids=["crc", "sampled"])
def test_nan_rows_written_in_place_are_found_below_and_above_the_full_check_threshold(tmp_path, monkeypatch, large):
    cfg = _cfg(tmp_path)
    _build(cfg, 2000, 0, "a")
    a = np.load(cfg.index_dir / _live(cfg) / "vectors.npy", mmap_mode="r+")
    a[::2] = np.nan  # half the rows, the file's size unchanged
    a.flush()
    del a
    if large:  # as if the generation were larger than FULL_CHECK_BYTES: sizes and a sample of rows, no CRC
        monkeypatch.setattr(embedded_module, "FULL_CHECK_BYTES", 0)
    with pytest.raises(DamagedFile, match=r"vectors.npy: damaged \(.*not finite" if large else
                       r"vectors.npy: damaged \(its content changed"):
        EmbeddedIndex.from_config(cfg, create=False)
    assert audit(cfg)[0].status == "damaged"  # the full check, whatever the size


def test_a_single_bad_row_in_a_large_generation_is_found_by_the_full_check(tmp_path, monkeypatch):
    cfg = _cfg(tmp_path)
    _build(cfg, 5000, 0, "a")
    a = np.load(cfg.index_dir / _live(cfg) / "vectors.npy", mmap_mode="r+")
    a[1] *= 2  # one row off unit length
    a.flush()
    del a
    monkeypatch.setattr(embedded_module, "FULL_CHECK_BYTES", 0)  # as if the generation were large
    findings = audit(cfg)
    assert findings[0].status == "damaged" and findings[0].path.endswith("vectors.npy")


def test_add_refuses_vectors_that_are_not_finite_or_not_unit_length(tmp_path):
    cfg = _cfg(tmp_path)
    v = _unit(4)
    v[1] *= 3
    v[2, 0] = np.inf
    with EmbeddedIndex.from_config(cfg, dim=DIM) as index:
        with pytest.raises(BulkIndexError) as err:
            index.add(["a", "b", "c", "d"], v, [{}] * 4)
        assert dict(err.value.failures) == {"b": "vector has norm 3, not 1 (L2-normalise it)",
                                            "c": "vector contains NaN or infinity"}
        assert err.value.added == 2 and index.count() == 2


# -- factories -------------------------------------------------------------------------------------------------

def test_factories_the_collection_cannot_train_are_refused_naming_what_they_need(tmp_path):
    with pytest.raises(IndexBackendError, match=r"^index.embedded.factory 'IVF4096,PQ64' needs at least 4096 vectors "
                                                r"to train its 4096 lists .*39 per list: 159744.*has 560\. Use 'Flat'.*"
                                                r"'IVF23,Flat'"):
        check_factory("IVF4096,PQ64", 560, 1280)
    with pytest.raises(IndexBackendError, match=r"PQ60 needs a vector dimension divisible by 60, but the vectors "
                                                r"have 1280"):
        check_factory("IVF16,PQ60", 10_000, 1280)
    with pytest.raises(IndexBackendError, match=r"PQ codes of 8 bits need at least 256 training vectors"):
        check_factory("HNSW32,PQ64", 200, 1280)
    for ok in [("IVF16,PQ64", 10_000, 1280), ("Flat", 3, 1280), ("HNSW32", 3, 1280), ("IVF4,SQ8", 4, 16)]:
        check_factory(*ok)
    # an index opened with a factory its rows cannot train: one line when FAISS would train, not FAISS's abort
    cfg = _cfg(tmp_path)
    _build(cfg, 100, 0, "a")
    with EmbeddedIndex.open(cfg.index_dir, factory="IVF256,Flat", create=False) as index:
        with pytest.raises(IndexBackendError, match="'IVF256,Flat' needs at least 256 vectors"):
            index.search(_unit(1), 1)
        index._dirty = False  # nothing to save: the live index stays as it was
    assert _top1(cfg, _unit(100)[:1]) == ["a0"]


# -- the CLI on a small real project ------------------------------------------------------------------------

def _cli(*args, cfg_path: Path):
    cmd = [sys.executable, "-m", "vslib.cli", *args, "-c", str(cfg_path)]
    return subprocess.run(cmd, capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=900)


@pytest.fixture(scope="module")
def clean(tux_pipeline):
    """The clean answers of the session's small real project (built by `visualsearch run`): a query, its
    `search --json` output, and the whole index's answers."""
    cfg = tux_pipeline.cfg
    query = sorted(Path("/usr/share/tuxpaint/stamps").rglob("*.png"))[0]
    search = _cli("search", str(query), "-k", "5", "--json", cfg_path=tux_pipeline.cfg_path)
    assert search.returncode == 0, search.stderr[-3000:]
    return query, search.stdout, _index_answers(cfg)


@pytest.fixture
def project(clean, tux_pipeline_copy):
    """This test's copy of the small real project, and its clean index's answers."""
    cfg = tux_pipeline_copy
    return (cfg, Path(cfg.base_dir) / cfg.source, *clean)


def _index_answers(cfg) -> list:
    """Every stored vector searched against the index: the top 5 ids and scores of each (the whole index's answer)."""
    with EmbeddedIndex.from_config(cfg, create=False) as index:
        vectors = np.array(index._vectors[:index._n])
        return [[(h.id, round(h.score, 5)) for h in hits] for hits in index.search(vectors, 5)]


def _nan_half(path: Path) -> None:
    a = np.load(path, mmap_mode="r+")
    a[: len(a) // 2] = np.nan
    a.flush()


def _traversal(meta_file: Path) -> None:
    meta = json.loads(meta_file.read_text())
    meta["generation"] = "../../.."
    meta_file.write_text(json.dumps(meta))


CASES = [(m, k) for m in MEMBERS for k in DAMAGE] + [("vectors.npy", "nan rows"), ("meta.json", "traversal")]


@pytest.mark.parametrize("member, kind", CASES, ids=[f"{m}-{k}" for m, k in CASES])
def test_a_damaged_index_makes_search_one_line_and_index_rebuilds_the_clean_answers(project, member, kind):
    cfg, cfg_path, query, clean_search, clean = project
    path = cfg.index_dir / "meta.json" if member == "meta.json" else cfg.index_dir / _live(cfg) / member
    {"nan rows": _nan_half, "traversal": _traversal, **DAMAGE}[kind](path)
    search = _cli("search", str(query), "-k", "5", "--json", cfg_path=cfg_path)
    lines = search.stderr.strip().splitlines()
    assert search.returncode == 2 and search.stdout == "" and "Traceback" not in search.stderr, search.stderr[-3000:]
    if (member, kind) == ("meta.json", "deleted"):
        assert lines[-1] == f"error: no embedded index in {cfg.index_dir}; build it with `visualsearch index`"
    else:
        assert lines[-1].startswith(f"error: {path}: damaged (") and \
            lines[-1].endswith("the next `visualsearch index` (or `run`) rebuilds the index from the feature file"), \
            lines[-1]
    index = _cli("index", cfg_path=cfg_path)
    assert index.returncode == 0 and "Traceback" not in index.stderr, index.stderr[-3000:]
    assert _index_answers(cfg) == clean
    assert [f.status for f in audit(cfg)] == ["ok"]  # the damaged generation is gone with the debris


def test_a_factory_the_index_split_cannot_train_is_one_line_and_the_live_index_stays(project):
    cfg, cfg_path, query, clean_search, clean = project
    meta_before = (cfg.index_dir / "meta.json").read_text()
    bad = cfg_path.with_name("ivf.yaml")
    text = cfg_path.read_text() + "index:\n  embedded:\n    factory: IVF4096,PQ64\n"
    bad.write_text(text)
    for args in (["index"], ["index", "--rebuild"]):
        out = _cli(*args, cfg_path=bad)
        last = out.stderr.strip().splitlines()[-1]
        assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-3000:]
        assert last.startswith("error: index.embedded.factory 'IVF4096,PQ64' needs at least 4096 vectors") and \
            "Use 'Flat'" in last, last
        assert (cfg.index_dir / "meta.json").read_text() == meta_before  # nothing was thrown away
    search = _cli("search", str(query), "-k", "5", "--json", cfg_path=cfg_path)
    assert search.returncode == 0 and search.stdout == clean_search
