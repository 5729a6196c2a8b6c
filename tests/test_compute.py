"""Extraction on a real Dask cluster: a LocalCluster, and `dask scheduler` + `dask worker` processes.

The cluster results are compared row for row with the in-process path on the
same images; a worker killed with SIGKILL mid-run and a client stopped mid-run
must still leave exactly one vector per image.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import vslib
from vslib.config import ConfigError, parse_config
from vslib.errors import VisualSearchError
from vslib.extraction import extract

from conftest import manifest_of, real_images, write_config
from vslib.config import load_config

distributed = pytest.importorskip("distributed")

N_IMAGES = 24
PARTITION = 4
REPO = Path(vslib.__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list[Path]:
    """A few dozen small real images: Tux Paint stamps if installed, else scikit-image pictures."""
    return real_images(tmp_path_factory.mktemp("img"), N_IMAGES, step=11)


@pytest.fixture(scope="module")
def manifest(images) -> pd.DataFrame:
    return manifest_of(images)


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory) -> Path:
    """One models folder for the module: the backbone is converted once, and the workers load it from there."""
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="module")
def config_of(tmp_path_factory, models_dir):
    def make(data: dict):
        d = tmp_path_factory.mktemp("run")
        data = dict(data)
        data.setdefault("backbone", {"name": "efficientnet_lite0", "batch_size": 4})
        data["paths"] = {"data": str(d / "data"), "models": str(models_dir), "reports": str(d / "reports")}
        return load_config(write_config(d, data))

    return make


@pytest.fixture(scope="module")
def reference(config_of, manifest):
    """The in-process path (compute.scheduler: local) on the same images."""
    cfg = config_of({})
    fs = extract(cfg, progress=False, manifest=manifest)
    assert fs.stats["computed"] == len(manifest)
    return cfg, fs


def assert_same_vectors(fs, ref):
    """Every image has exactly one vector, and it matches the in-process one (cosine >= 0.9999)."""
    assert len(fs) == len(ref) and fs.table["content_hash"].is_unique
    a = pd.DataFrame(fs.vectors, index=fs.table["content_hash"]).loc[ref.table["content_hash"]].to_numpy()
    cos = np.sum(a * ref.vectors, axis=1) / np.linalg.norm(a, axis=1) / np.linalg.norm(ref.vectors, axis=1)
    assert cos.min() >= 0.9999, cos.min()


def cache_hashes(cfg) -> list[str]:
    """Every hash in every shard, duplicates included."""
    out = []
    for p in sorted((cfg.features_dir / "shards").glob("*.npz")):
        with np.load(p) as z:
            out += [str(h) for h in z["hashes"]]
    return out


class ClientStopped(Exception):
    pass


# ---------------------------------------------------------------------------
# Configuration


def test_compute_config_defaults_and_errors():
    cfg = parse_config({})
    assert cfg.compute.scheduler == "local" and cfg.compute.dask.address is None
    cfg = parse_config({"compute": {"scheduler": "dask", "dask": {"address": "tcp://10.1.2.3:8786", "workers": 3}}})
    assert cfg.compute.dask.address == "tcp://10.1.2.3:8786" and cfg.compute.dask.workers == 3
    with pytest.raises(ConfigError, match=r"compute\.scheduler 'dusk' is not allowed; did you mean 'dask'"):
        parse_config({"compute": {"scheduler": "dusk"}})
    with pytest.raises(ConfigError, match=r"unknown key 'thread_per_worker' in section 'compute.dask'; "
                                          r"did you mean 'threads_per_worker'"):
        parse_config({"compute": {"dask": {"thread_per_worker": 2}}})
    with pytest.raises(ConfigError, match=r"compute\.dask\.address 'http://head:8787' is not a scheduler address"):
        parse_config({"compute": {"dask": {"address": "http://head:8787"}}})
    with pytest.raises(ConfigError, match=r"compute\.dask\.threads_per_worker is 0; allowed values are >= 1"):
        parse_config({"compute": {"dask": {"threads_per_worker": 0}}})


def test_local_scheduler_never_imports_dask(reference, manifest, tmp_path):
    cfg, _ = reference
    manifest.to_parquet(tmp_path / "m.parquet")
    code = ("import sys, pandas as pd; from vslib.config import load_config; from vslib.extraction import extract; "
            f"fs = extract(load_config({str(cfg.base_dir / 'application.yaml')!r}), progress=False, "
            f"manifest=pd.read_parquet({str(tmp_path / 'm.parquet')!r})); "
            "assert fs.stats['reused'] == len(fs), fs.stats; "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('dask', 'distributed')]; assert not bad, bad")
    env = dict(os.environ, PYTHONPATH=str(REPO))
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]


# ---------------------------------------------------------------------------
# A LocalCluster of two worker processes


def test_local_cluster_gives_the_in_process_vectors(reference, config_of, manifest, capfd, monkeypatch):
    """Also with fewer partitions in flight than there are: 2 at a time (one per worker thread) of 6."""
    import vslib.compute

    monkeypatch.setattr(vslib.compute, "IN_FLIGHT_PER_THREAD", 1)
    _, ref = reference
    cfg = config_of({"compute": {"scheduler": "dask", "dask": {"workers": 2, "threads_per_worker": 1,
                                                               "partition_size": PARTITION,
                                                               "dashboard_address": ":0"}}})
    fs = extract(cfg, progress=False, manifest=manifest)
    assert fs.stats["computed"] == len(manifest)
    assert_same_vectors(fs, ref)
    err = capfd.readouterr().err
    assert "Dask LocalCluster (2 workers x 1 threads): 2 workers; dashboard http" in err, err[-2000:]


# ---------------------------------------------------------------------------
# `dask scheduler` and two `dask worker` processes on 127.0.0.1, the way a cluster is used


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A scheduler and two single-threaded workers (no nanny: SIGKILL kills the worker itself)."""
    port = _free_port()
    address = f"tcp://127.0.0.1:{port}"
    cwd = tmp_path_factory.mktemp("workers-cwd")  # not the client's folder: relative paths break, as on a cluster
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
               TF_CPP_MIN_LOG_LEVEL="2")
    log = open(cwd / "cluster.log", "w")
    procs = [subprocess.Popen([sys.executable, "-m", "dask", "scheduler", "--host", "127.0.0.1", "--port", str(port),
                               "--no-dashboard"], cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT)]
    try:
        with distributed.Client(address, timeout="60s") as c:  # waits for the scheduler
            for _ in range(2):
                procs.append(subprocess.Popen(
                    [sys.executable, "-m", "dask", "worker", address, "--nthreads", "1", "--no-nanny",
                     "--host", "127.0.0.1", "--no-dashboard", "--memory-limit", "0"],
                    cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT))
            c.wait_for_workers(2, timeout=120)
        yield address, procs[1:], cwd
    finally:
        for p in reversed(procs):
            if p.poll() is None:
                p.terminate()
        for p in procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
        log.close()


def dask_config(config_of, address):
    return config_of({"compute": {"scheduler": "dask", "dask": {"address": address, "partition_size": PARTITION}}})


def test_workers_that_cannot_read_the_images_are_named(cluster, images, monkeypatch):
    address, _, _ = cluster
    from vslib.compute import check_workers_read

    monkeypatch.chdir(images[0].parent)  # relative paths: readable here, not from the workers' folder
    rel = [p.name for p in images if p.parent == images[0].parent]
    with distributed.Client(address) as client:
        with pytest.raises(VisualSearchError) as e:
            check_workers_read(client, rel)
        check_workers_read(client, [str(p) for p in images])  # absolute paths: every worker reads them
        check_workers_read(client, ["/nonexistent/x.png"])  # unreadable here too: a skipped image, not a worker fault
    msg = str(e.value)
    assert "2 of 2 Dask workers cannot read the images" in msg and rel[0] in msg and "shared filesystem" in msg


def test_scheduler_and_workers_then_a_stopped_client_resumes(cluster, config_of, reference, manifest):
    address, _, _ = cluster
    _, ref = reference
    cfg = dask_config(config_of, address)

    def stop_after_first(parts, done):
        if parts == 1:
            raise ClientStopped

    with pytest.raises(ClientStopped):
        extract(cfg, progress=False, manifest=manifest, on_batch=stop_after_first)
    kept = cache_hashes(cfg)
    assert len(kept) == PARTITION  # the finished partition is on disk

    fs = extract(cfg, progress=False, manifest=manifest)  # the rerun computes only what is missing
    assert fs.stats["reused"] == PARTITION and fs.stats["computed"] == len(manifest) - PARTITION
    assert_same_vectors(fs, ref)


def _hits(cfg, queries) -> list[list[tuple[str, float]]]:
    from vslib.index import open_index

    with open_index(cfg, create=False) as index:
        return [[(h.id, round(h.score, 4)) for h in hits] for hits in index.search(queries, 5)]


def test_elasticsearch_bulk_from_the_workers_retries_429(cluster, config_of, reference, es_url):
    """`visualsearch index` with scheduler dask: the workers send the bulk requests, through a cluster that throttles."""
    import shutil

    from benchmarks.es_server import ThrottlingProxy
    from vslib.index import build, open_index

    address, _, _ = cluster
    ref_cfg, ref = reference
    name = f"vs-dask-bulk-{os.urandom(3).hex()}"

    def es_config(scheduler, hosts, alias):
        cfg = config_of({"index": {"backend": "elasticsearch", "elasticsearch": {
                             "hosts": hosts, "index_name": alias, "index_options": {"type": "flat"}}},
                         "compute": {"scheduler": scheduler, "dask": {"address": address}}})
        shutil.copytree(ref_cfg.features_dir, cfg.features_dir)  # the same feature file
        return cfg

    local = es_config("local", [es_url], name + "-local")
    build(local, progress=False)
    n_index = int((ref.table["split"] == "index").sum())
    with ThrottlingProxy(es_url, reject=3) as proxy:
        cfg = es_config("dask", [proxy.url], name + "-dask")
        info = build(cfg, batch_size=4, progress=False)  # 5 tasks of 4 rows
    assert proxy.rejected == 3  # three bulk requests answered 429 ...
    assert info["count"] == n_index  # ... and every document is in, once
    with distributed.Client(address) as client:  # the bulk requests came from the workers
        sent = client.run(lambda: sum(ix.requests for ix in
                                      __import__("vslib.index.es_bulk").index.es_bulk._ES_INDEXES.values()))
    assert sum(sent.values()) >= -(-n_index // 4), sent
    queries = ref.vectors[ref.table["split"].to_numpy() == "query"]
    cfg_direct = es_config("local", [es_url], name + "-dask")  # same index, searched without the proxy
    assert _hits(cfg_direct, queries) == _hits(local, queries)
    for c in (local, cfg_direct):
        with open_index(c, create=False) as index:
            index.drop()


def test_worker_killed_mid_run_every_image_exactly_once(cluster, config_of, reference, manifest):
    address, workers, _ = cluster
    _, ref = reference
    cfg = dask_config(config_of, address)
    victim = workers[0]
    shards_seen = []

    def kill_one_worker(parts, done):
        shards_seen.append(len(cache_hashes(cfg)))
        if parts == 1:
            os.kill(victim.pid, signal.SIGKILL)

    fs = extract(cfg, progress=False, manifest=manifest, on_batch=kill_one_worker)
    assert victim.wait(timeout=10) == -signal.SIGKILL
    assert fs.stats["computed"] == len(manifest)  # no partition written twice, none lost
    assert shards_seen[-1] == len(manifest) and len(set(cache_hashes(cfg))) == len(manifest)
    assert_same_vectors(fs, ref)
