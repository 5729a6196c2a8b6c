"""Does the client's memory grow with the collection? Extraction and Elasticsearch indexing at two sizes.

For each size (default 5,000 and 60,000 Fashion-MNIST images: ``dataset.max_per_class``
500 and 6,000) it prepares the dataset into a folder of its own under
``data/interim/scale/`` and runs, each in a fresh subprocess through the CLI's own
entry point, so that the figures are the client's alone:

* ``visualsearch extract`` into an empty feature cache (``--scheduler dask``: a
  LocalCluster of ``--workers`` single-threaded worker processes, the client only
  schedules and writes shards; ``--scheduler local``: the model runs in the client);
* ``visualsearch index --backend elasticsearch`` into a fresh index (with
  ``--scheduler dask`` the workers send the bulk requests; the client only plans them),
  against the Elasticsearch-API emulator the tests use (noida-db), or ``--es-url``;

and records the client process's peak RSS (``VmHWM``), seconds and throughput. The
target (issue 17): the peak at 60,000 images within 100 MB of the peak at 5,000, where
an all-in-memory design grows by more than 250 MB (60,000 x 1,280 float32 = 293 MiB of
vectors). Prints a table and writes ``reports/benchmarks/scale_memory.json`` and ``.md``.

    python benchmarks/scale_memory.py [--sizes 5000,60000] [--scheduler dask|local] [--workers 2] [--es-url URL]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import yaml  # noqa: E402

from benchmarks.common import REPORT_DIR, command_line, write_report  # noqa: E402
from benchmarks.es_server import EsServer  # noqa: E402
from vslib.config import load_config  # noqa: E402
from vslib.features import feature_columns, features_path  # noqa: E402
from vslib.npzfile import npz_member  # noqa: E402

TARGET_MB = 100.0
CLASSES = 10  # Fashion-MNIST

#: run one CLI command in this process and print the process's memory figures as JSON (last line)
CHILD = r'''
import json, os, sys, time
from benchmarks.common import proc_status
def status(key):  # MB, from /proc/self/status
    return proc_status(key, float("nan")) / 2**20
from vslib.cli import main
t0 = time.perf_counter()
rc = main(sys.argv[1:])
print(json.dumps({"rc": rc, "seconds": time.perf_counter() - t0, "peak_rss_mb": status("VmHWM"),
                  "rss_end_mb": status("VmRSS"), "rss_anon_end_mb": status("RssAnon")}))
'''


def write_config(folder: Path, n: int, args, es_url: str, alias: str) -> Path:
    cfg = {
        "dataset": {"name": "fashion-mnist", "max_per_class": n // CLASSES, "install": True},
        "backbone": {"name": "efficientnet_lite0", "batch_size": 32, "runtime": "auto"},
        "index": {"backend": "elasticsearch",
                  "elasticsearch": {"hosts": [es_url], "index_name": alias, "index_options": {"type": "hnsw"}}},
        "compute": {"scheduler": args.scheduler,
                    "dask": {"address": None, "workers": args.workers, "threads_per_worker": 1,
                             "partition_size": 256, "dashboard_address": ":0"}},
        # the converted backbone is shared with the project's models folder (converted once)
        "paths": {"data": str(folder / "data"), "models": str(ROOT / "models"), "reports": str(folder / "reports")},
    }
    path = folder / "application.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def run_step(argv: list[str], log) -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
               TF_CPP_MIN_LOG_LEVEL="2", TQDM_MININTERVAL="5")
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-c", CHILD, *argv], env=env, stdout=subprocess.PIPE,
                       stderr=log, text=True)
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("{")]
    if r.returncode != 0 or not lines:
        raise SystemExit(f"{' '.join(argv)} failed (exit {r.returncode}); see {log.name}")
    out = json.loads(lines[-1])
    out["wall_s"] = time.perf_counter() - t0
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", default="5000,60000", help="numbers of images (multiples of 10), default 5000,60000")
    p.add_argument("--scheduler", choices=["dask", "local"], default="dask")
    p.add_argument("--workers", type=int, default=2, help="LocalCluster worker processes (--scheduler dask)")
    p.add_argument("--steps", default="extract,index", help="extract,index (index needs the extract step's features)")
    p.add_argument("--es-url", default=None, help="an Elasticsearch URL instead of starting the emulator")
    p.add_argument("--work", type=Path, default=ROOT / "data" / "interim" / "scale",
                   help="where each size's dataset, features and logs go (kept for reruns)")
    p.add_argument("--out", type=Path, default=REPORT_DIR)
    args = p.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    steps = args.steps.split(",")
    args.work.mkdir(parents=True, exist_ok=True)
    load = os.getloadavg()[0]
    report = {"command": command_line("scale_memory.py", argv),
              "started": time.strftime("%Y-%m-%d %H:%M:%S"), "scheduler": args.scheduler,
              "workers": args.workers if args.scheduler == "dask" else 0,
              "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "load_average_start": load},
              "target_mb": TARGET_MB, "runs": {}}
    previous = args.out / "scale_memory.json"
    if previous.exists() and len(steps) < 2:  # a rerun of one step keeps the other step's figures
        old = json.loads(previous.read_text())
        if old.get("scheduler") == args.scheduler:
            report["runs"] = {n: {k: v for k, v in r.items() if k not in steps} for n, r in old.get("runs", {}).items()}
            report["kept_from"] = old.get("kept_from") or (old.get("command"), old.get("started"))
            report["es"] = old.get("es")
    server = None
    es_url = args.es_url
    if "index" in steps and not es_url:
        server = EsServer().start()
        es_url = server.url
        report["es"] = "noida-db (Elasticsearch-API emulator), not Elasticsearch"
    elif es_url or "es" not in report:
        report["es"] = es_url or "not used in this run"
    try:
        for n in sizes:
            folder = args.work / f"fashion-mnist-{n}"
            folder.mkdir(parents=True, exist_ok=True)
            alias = f"vs-scale-{n}-{uuid.uuid4().hex[:6]}"
            cfg = write_config(folder, n, args, es_url or "http://127.0.0.1:9", alias)
            runs = report["runs"].setdefault(str(n), {})
            with open(folder / "run.log", "a") as log:
                print(f"== {n:,} images ({folder}) ==", flush=True)
                prep = run_step(["data", "prepare", "-c", str(cfg)], log)
                runs["prepare"] = prep
                print(f"  prepare: {prep['seconds']:.0f} s", flush=True)
                if "extract" in steps:
                    shutil.rmtree(folder / "data" / "features", ignore_errors=True)  # an empty cache
                    r = run_step(["extract", "-c", str(cfg)], log)
                    r["images"] = int(len(npz_member(features_path(load_config(cfg)), "vectors")))
                    r["images_per_s"] = r["images"] / r["seconds"]
                    runs["extract"] = r
                    print(f"  extract: {r['images']:,} images in {r['seconds']:.0f} s ({r['images_per_s']:.0f}/s); "
                          f"client peak RSS {r['peak_rss_mb']:.0f} MB", flush=True)
                if "index" in steps:
                    r = run_step(["index", "-c", str(cfg), "--rebuild"], log)
                    r["documents"] = int(len(feature_columns(load_config(cfg), ["path"], split="index")))
                    r["documents_per_s"] = r["documents"] / r["seconds"]
                    runs["index"] = r
                    print(f"  index: {r['documents']:,} documents in {r['seconds']:.0f} s "
                          f"({r['documents_per_s']:.0f}/s); client peak RSS {r['peak_rss_mb']:.0f} MB", flush=True)
            write(report, args.out)
    finally:
        if server is not None:
            server.stop()
    small, large = str(min(sizes)), str(max(sizes))
    report["growth"] = {}
    for step in ("extract", "index"):
        a, b = report["runs"].get(small, {}).get(step), report["runs"].get(large, {}).get(step)
        if a and b:
            g = b["peak_rss_mb"] - a["peak_rss_mb"]
            report["growth"][step] = {"mb": round(g, 1), "pass": g <= TARGET_MB}
            print(f"{step}: client peak RSS {a['peak_rss_mb']:.0f} MB at {int(small):,} -> {b['peak_rss_mb']:.0f} MB "
                  f"at {int(large):,}: {g:+.0f} MB ({'PASS' if g <= TARGET_MB else 'FAIL'}, target <= {TARGET_MB:.0f})")
    write(report, args.out)
    return report


def write(report: dict, out: Path) -> None:
    lines = [f"# Client memory against collection size ({report['scheduler']}"
             + (f", {report['workers']} workers" if report["workers"] else "") + ")", "",
             f"`{report['command']}`, {report['started']}, {report['machine']['cpus']} CPUs, load average at start "
             f"{report['machine']['load_average_start']:.1f}; Elasticsearch: {report['es']}."
             + (f" Figures of the other step kept from `{report['kept_from'][0]}` ({report['kept_from'][1]})."
                if report.get("kept_from") else ""), "",
             "| images | step | seconds | per second | client peak RSS MB | client RSS at end MB |",
             "|---:|---|---:|---:|---:|---:|"]
    for n, runs in report["runs"].items():
        for step in ("extract", "index"):
            r = runs.get(step)
            if r:
                rate = r.get("images_per_s") or r.get("documents_per_s") or 0
                lines.append(f"| {int(n):,} | {step} | {r['seconds']:.0f} | {rate:.0f} | {r['peak_rss_mb']:.0f} | "
                             f"{r['rss_end_mb']:.0f} |")
    for step, g in report.get("growth", {}).items():
        lines.append(f"\n{step}: growth of the client's peak RSS {g['mb']:+.0f} MB "
                     f"({'PASS' if g['pass'] else 'FAIL'}: target <= {report['target_mb']:.0f} MB)")
    write_report(out, "scale_memory", report, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
