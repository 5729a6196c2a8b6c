"""Elasticsearch state you can trust (issue 23): loads and rebuilds killed at any moment.

* a load killed with periodic refresh off (the client killed, twice in a row; the server killed by its PID
  and restarted on the same data) never makes ``refresh_interval: -1`` the remembered setting: the next
  ``index`` restores the original; a -1 with no record (an older version's) becomes the server's default;
* a rebuild killed before it published leaves an orphan concrete index that the next rebuild deletes, never
  the live one, never an unrelated ``<alias>-notes`` nor a rebuild still running in another process;
* a search during a paused rebuild answers from the old index until the rebuild publishes;
* :func:`vslib.index.elasticsearch.audit` reports the -1, the orphan, a rebuild in progress, a missing alias
  and an unreachable server (one finding, never a traceback).

Runs on the Elasticsearch-API emulator (PyPI's noida-db) or on the cluster named by ``VS_ES_URL``; the test
that kills the server needs the emulator (it cannot kill a real cluster) and is skipped with ``VS_ES_URL``.
Emulator behaviour these tests rely on, checked on noida-db 0.2.3: ``PUT <index>/_mapping`` with ``_meta``
replaces the whole ``_meta`` and ``GET <index>/_mapping`` returns it, as Elasticsearch does; it writes its
state to ``<data-dir>/elasticsearch.json`` about once a second (SIGTERM also saves it), so a SIGKILL loses
the last second: the server-kill test waits until the state it kills over is on disk.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from benchmarks.es_server import EsServer, find_binary, free_port
from vslib.config import parse_config
from vslib.index import IndexUnreachableError, build, open_index
from vslib.index.elasticsearch import BULK_META, ElasticsearchIndex, audit, connect

pytestmark = pytest.mark.elasticsearch

ROOT = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, PYTHONPATH=str(ROOT), TF_CPP_MIN_LOG_LEVEL="3", CUDA_VISIBLE_DEVICES="")
DIM = 16

# a child process that loads or rebuilds, stops half-way and waits for a line on stdin (or to be killed)
CHILD = r'''
import json, os, sys
import numpy as np
from vslib.config import parse_config
from vslib.index.elasticsearch import ElasticsearchIndex

data, mode, base = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3]
cfg = parse_config(data, base_dir=base, env=os.environ)
v = np.random.default_rng(1).standard_normal((40, 16)).astype(np.float32)
v /= np.linalg.norm(v, axis=1, keepdims=True)
ids, meta = [f"new-{i}" for i in range(40)], [{"label": "new"}] * 40
if mode == "load":  # a load of the live index, stopped with periodic refresh off
    index = ElasticsearchIndex.from_config(cfg, dim=16)
    with index.bulk_session():
        index.add(ids[:20], v[:20], meta[:20])
        print("ready", flush=True)
        sys.stdin.readline()
else:  # a rebuild: the new index half filled; on a line from stdin it finishes and publishes
    fresh = ElasticsearchIndex.create_fresh(cfg, 16)
    print(fresh.index_name, flush=True)
    with fresh.bulk_session():
        fresh.add(ids[:20], v[:20], meta[:20])
        print("ready", flush=True)
        sys.stdin.readline()
        fresh.add(ids[20:], v[20:], meta[20:])
    fresh.publish()
    fresh.close()
    print("published", flush=True)
'''


def _unit(n: int, seed: int = 0) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal((n, DIM)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def _data(tmp_path, url, name) -> dict:
    return {"paths": {"data": str(tmp_path / "data"), "models": str(tmp_path / "models"),
                      "reports": str(tmp_path / "reports")},
            "index": {"backend": "elasticsearch",
                      "elasticsearch": {"hosts": [url], "index_name": name, "index_options": {"type": "flat"},
                                        "request_timeout": 10.0}}}


class Project:
    """A config with an alias of its own on one server; the alias's indexes are deleted at teardown."""

    def __init__(self, tmp_path, url):
        self.tmp_path, self.url = tmp_path, url
        self.name = f"vs-int-{uuid.uuid4().hex[:10]}"
        self.data = _data(tmp_path, url, self.name)
        self.cfg = parse_config(self.data, base_dir=tmp_path, env=os.environ)  # VS_ES_* apply as in production
        self.children: list[subprocess.Popen] = []

    def client(self):
        return connect(self.cfg.index.elasticsearch)

    def names(self) -> set[str]:
        client = self.client()
        try:
            return set(client.options(ignore_status=404).indices.get(index=f"{self.name}*").body)
        finally:
            client.close()

    def settings(self, index: str) -> dict:
        client = self.client()
        try:
            return client.indices.get_settings(index=index).body[index]["settings"]["index"]
        finally:
            client.close()

    def live(self, values=None) -> str:
        """Create the live index behind the alias with 40 'old-' documents; its concrete name."""
        with ElasticsearchIndex.from_config(self.cfg, dim=DIM) as index:
            if values is not None:
                index._put_refresh_interval(values)
            index.add([f"old-{i}" for i in range(40)], _unit(40), [{"label": "old"}] * 40)
            return index.index_name

    def features(self, seed: int = 0, n: int = 50) -> None:
        """A feature file whose index split `visualsearch index` (vslib.index.build) loads: 40 rows."""
        from vslib.features import FeatureSet, features_path

        table = pd.DataFrame({"path": [f"/data/img{i}.png" for i in range(n)], "label": [f"c{i % 4}" for i in range(n)],
                              "split": ["query" if i % 5 == 0 else "index" for i in range(n)],
                              "content_hash": [f"h{seed}-{i:03d}" for i in range(n)]})
        FeatureSet(_unit(n, seed=seed), table, self.cfg.backbone.name).save(features_path(self.cfg))

    def child(self, mode: str) -> tuple[subprocess.Popen, list[str]]:
        """Start CHILD in ``mode``; returns it once it says 'ready' (with the lines it printed before)."""
        script = self.tmp_path / "child.py"
        script.write_text(CHILD)
        proc = subprocess.Popen([sys.executable, str(script), json.dumps(self.data), mode, str(self.tmp_path)],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env=ENV, cwd=ROOT, start_new_session=True)
        self.children.append(proc)
        lines = []
        while True:
            line = proc.stdout.readline()
            if not line:
                proc.wait(timeout=30)
                pytest.fail(f"the child exited with {proc.returncode}: {proc.stderr.read()[-2000:]}")
            if line.strip() == "ready":
                return proc, lines
            lines.append(line.strip())

    @staticmethod
    def kill(proc: subprocess.Popen) -> None:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)

    def cleanup(self) -> None:
        for proc in self.children:
            if proc.poll() is None:
                self.kill(proc)
        try:
            client = self.client()
        except Exception:  # noqa: BLE001 - the server of a test that killed it
            return
        try:
            for name in client.options(ignore_status=404).indices.get(index=f"{self.name}*").body:
                client.options(ignore_status=404).indices.delete(index=name)
        finally:
            client.close()


@pytest.fixture
def project(tmp_path, es_url):
    p = Project(tmp_path, es_url)
    yield p
    p.cleanup()


def _text(path: Path) -> str:
    try:
        return path.read_text()
    except FileNotFoundError:  # not written yet, or being replaced
        return ""


def _findings(cfg, what: str = "") -> list:
    return [f for f in audit(cfg) if what in f.what]


# -- refresh_interval ------------------------------------------------------------------------------------------

def test_two_loads_killed_in_a_row_keep_the_original_refresh_interval(project):
    live = project.live("7s")
    for _ in range(2):  # the second killed load finds -1: it must take the recorded 7s, never the -1
        proc, _ = project.child("load")
        project.kill(proc)
        assert project.settings(live)["refresh_interval"] == "-1"
    (finding,) = _findings(project.cfg, "Elasticsearch index")
    assert finding.status == "damaged" and "periodic refresh is off" in finding.reason
    assert "by a load that did not finish" in finding.reason and "restores refresh_interval 7s" in finding.redo
    project.features()
    build(project.cfg, progress=False)  # the next `visualsearch index`
    assert project.settings(live)["refresh_interval"] == "7s"
    (finding,) = _findings(project.cfg, "Elasticsearch index")
    assert finding.status == "ok" and "100 documents" in finding.reason  # 40 old, 20 of the killed loads, 40 built


def test_minus_one_without_a_record_becomes_the_default_and_is_never_remembered(project):
    live = project.live("-1")  # as an older version's killed load left it: no record of what it replaced
    (finding,) = _findings(project.cfg, "Elasticsearch index")
    assert finding.status == "damaged" and "no record" in finding.reason
    assert "restores the server's default refresh" in finding.redo
    project.features()
    build(project.cfg, progress=False)
    assert project.settings(live).get("refresh_interval") in (None, "1s")
    proc, _ = project.child("load")  # a later killed load records the default, not -1
    project.kill(proc)
    build(project.cfg, progress=False)
    assert project.settings(live).get("refresh_interval") in (None, "1s")


@pytest.mark.skipif(bool(os.environ.get("VS_ES_URL")), reason="kills the server: the emulator only")
def test_server_killed_mid_load_and_restarted_the_next_index_restores_refresh(tmp_path):
    if find_binary() is None:
        pytest.skip("noida-db is not installed (pip install noida-db==0.2.3)")
    data_dir = tmp_path / "es"
    data_dir.mkdir()
    server = EsServer(data_dir=str(data_dir)).start()
    project = Project(tmp_path, server.url)
    try:
        live = project.live("7s")
        state = data_dir / "data" / "elasticsearch.json"
        with ElasticsearchIndex.from_config(project.cfg, dim=DIM) as index:
            index.max_retries, index.initial_backoff = 0, 0.1
            with pytest.raises(IndexUnreachableError, match="cannot reach Elasticsearch"):
                with index.bulk_session():
                    index.add(["new-0"], _unit(1, seed=1), [{"label": "new"}])
                    deadline = time.monotonic() + 30  # the emulator saves its state about once a second
                    while not ('"-1"' in _text(state) and BULK_META in _text(state)):
                        assert time.monotonic() < deadline, "the emulator never saved the -1"
                        time.sleep(0.2)
                    os.killpg(server.proc.pid, signal.SIGKILL)  # the server dies mid-load, by its PID
                    server.proc.wait(timeout=30)
                    index.add(["new-1"], _unit(1, seed=2), [{"label": "new"}])
        (finding,) = audit(project.cfg)  # the server is down: one finding, no traceback
        assert finding.status == "warning" and "cannot reach Elasticsearch" in finding.reason
        server.proc = None
        server = EsServer(port=server.port, data_dir=str(data_dir)).start()  # the same data
        assert project.settings(live)["refresh_interval"] == "-1"  # what the kill left
        (finding,) = _findings(project.cfg, "Elasticsearch index")
        assert finding.status == "damaged" and "restores refresh_interval 7s" in finding.redo
        project.features()
        build(project.cfg, progress=False)
        assert project.settings(live)["refresh_interval"] == "7s"
    finally:
        project.cleanup()
        server.stop()


# -- rebuilds ------------------------------------------------------------------------------------------------------

def test_search_during_a_paused_rebuild_answers_from_the_old_index_until_it_publishes(project):
    live = project.live()
    proc, (fresh_name,) = project.child("rebuild")  # 20 of 40 new documents loaded, then paused
    with open_index(project.cfg, create=False) as index:
        assert index.index_name == live and index.count() == 40
        hits = index.search(_unit(40, seed=1)[:3], k=5)
        assert all(h.id.startswith("old-") for row in hits for h in row)
    assert fresh_name in project.names()
    proc.stdin.write("go\n")
    proc.stdin.flush()
    assert proc.stdout.readline().strip() == "published", proc.stderr.read()[-2000:]
    proc.wait(timeout=30)
    with open_index(project.cfg, create=False) as index:
        assert index.index_name == fresh_name and index.count() == 40
        assert index.search(_unit(40, seed=1)[:1], k=1)[0][0].id == "new-0"
    assert live not in project.names()  # the old index went with the swap


def test_a_killed_rebuild_leaves_an_orphan_the_next_rebuild_deletes_never_the_live_or_unrelated(project):
    live = project.live()
    client = project.client()
    unrelated = [f"{project.name}-notes", f"{project.name}-20260101-000000-abcdef-copy"]
    for name in unrelated:  # someone else's indexes that merely share the prefix
        client.indices.create(index=name)
    # named like a rebuild's index but behind another alias: in use elsewhere, never an orphan
    client.indices.create(index=f"{project.name}-20260101-000000-0000ff", aliases={f"{project.name}-other": {}})
    unrelated.append(f"{project.name}-20260101-000000-0000ff")
    client.close()
    proc, (orphan,) = project.child("rebuild")
    project.kill(proc)  # killed before it published
    with open_index(project.cfg, create=False) as index:  # the alias still answers from the old index
        assert index.index_name == live and index.count() == 40
        assert index.search(_unit(40)[:1], k=1)[0][0].id == "old-0"
    found = [f for f in audit(project.cfg) if f.status != "ok"]
    assert [(f.status, f.what) for f in found] == [("warning", "orphan Elasticsearch index")]
    assert found[0].path.endswith("/" + orphan) and "the next `visualsearch index` deletes it" in found[0].redo
    project.features(seed=1)
    info = build(project.cfg, rebuild=True, progress=False)
    names = project.names()
    assert orphan not in names and live not in names and info["index_name"] in names
    assert set(unrelated) <= names
    assert not [f for f in audit(project.cfg) if f.status != "ok"]


def test_a_rebuild_running_in_another_process_is_never_taken_for_an_orphan(project):
    live = project.live()
    proc, (running,) = project.child("rebuild")  # alive, paused mid-load
    (finding,) = _findings(project.cfg, "rebuild in progress")
    assert finding.status == "ok" and running in finding.path and f"PID {proc.pid}" in finding.reason
    other = ElasticsearchIndex.create_fresh(project.cfg, DIM)  # another rebuild starts meanwhile: it sweeps
    other.discard()
    assert running in project.names() and live in project.names()
    project.kill(proc)  # now it is dead: an orphan at once (same machine, its PID is gone)
    assert [f.what for f in audit(project.cfg) if f.status == "warning"] == ["orphan Elasticsearch index"]
    project.features()
    build(project.cfg, progress=False)  # any load of the live index sweeps too
    assert running not in project.names() and live in project.names()


# -- audit -----------------------------------------------------------------------------------------------------

def test_audit_of_a_missing_alias_and_of_an_unreachable_server(project, tmp_path):
    (finding,) = audit(project.cfg)
    assert finding.status == "missing" and project.name in finding.path
    down = _data(tmp_path, f"http://127.0.0.1:{free_port()}", "vs-nothing-here")
    down["index"]["elasticsearch"]["request_timeout"] = 2.0
    (finding,) = audit(parse_config(down, base_dir=tmp_path, env={}))
    assert finding.status == "warning" and "cannot reach Elasticsearch" in finding.reason
    assert "Traceback" not in finding.line()


def test_an_unpublished_index_is_an_orphan_only_once_its_rebuild_is_over():
    from vslib.index.elasticsearch import _machine, _rebuild_running

    now = time.time()
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # a PID that is dead now
    here, elsewhere = _machine(), "another-host/another-boot"
    assert _rebuild_running(None, now, 600) is None  # older versions' indexes carry no record
    assert _rebuild_running({"machine": here, "pid": gone.pid, "alive_at": now}, now, 600) is None
    assert "PID" in _rebuild_running({"machine": here, "pid": os.getpid(), "alive_at": now - 5}, now, 600)
    assert _rebuild_running({"machine": here, "pid": os.getpid(), "alive_at": now - 700}, now, 600) is None
    # on another machine the PID cannot be checked: a sign of life within the lease means running
    assert "5 s ago" in _rebuild_running({"machine": elsewhere, "pid": gone.pid, "alive_at": now - 5}, now, 600)
    assert _rebuild_running({"machine": elsewhere, "pid": gone.pid, "alive_at": now - 700}, now, 600) is None


def test_a_rebuild_renews_its_sign_of_life_until_it_publishes(project, monkeypatch):
    from vslib.index import elasticsearch as es_module

    monkeypatch.setattr(es_module, "HEARTBEAT_S", 0.2)
    project.live()
    fresh = ElasticsearchIndex.create_fresh(project.cfg, DIM)

    def alive_at():
        mapping = fresh.client.indices.get_mapping(index=fresh.index_name).body[fresh.index_name]["mappings"]
        return mapping["_meta"][es_module.BUILD_META]["alive_at"]

    first, deadline = alive_at(), time.monotonic() + 30
    while alive_at() == first:
        assert time.monotonic() < deadline, "no new sign of life"
        time.sleep(0.1)
    with fresh.bulk_session():
        fresh.add(["new-0"], _unit(1, seed=1), [{"label": "new"}])
    meta = fresh.client.indices.get_mapping(index=fresh.index_name).body[fresh.index_name]["mappings"]["_meta"]
    assert meta[BULK_META] == {"active": False, "value": None} and meta[es_module.BUILD_META]["alive_at"] > first
    assert meta["created_by"] == "visualsearch"  # the beats and the load's record never dropped each other's keys
    fresh.publish()
    assert fresh._heartbeat is None  # stopped with the swap
    fresh.close()
    with open_index(project.cfg, create=False) as index:
        assert index.count() == 1 and index.search(_unit(1, seed=1), k=1)[0][0].id == "new-0"
