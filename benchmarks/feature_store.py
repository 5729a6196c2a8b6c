"""The feature store out of core: memory-mapped ``.npz`` members against Parquet, and the client's memory.

On a feature file written by :func:`vslib.extraction.extract` (``--features``, default the
largest ``features-*.npz`` under ``data/features``) it measures, each in a fresh
subprocess (so peak RSS is the reader's own):

* **store formats** — the same vectors and table as (a) the project's uncompressed
  ``.npz`` read through :func:`vslib.npzfile.npz_memmap` and (b) Parquet written with
  pyarrow (a ``fixed_size_list<float32>`` vector column plus path/label/split/content_hash,
  row groups of 8,192): seconds and peak RSS to read the set of content hashes, to stream
  every row of the index split in batches, and to slice 1,000 random rows; file size;
* **readers** — peak RSS of the index split read three ways, each touching every vector,
  above the RSS of the same process after its imports: ``load_features(cfg).split("index")``
  (the whole set in memory, then a copy of the split: what training and evaluation did),
  :func:`vslib.features.read_split` (the split alone, what they do now) and
  :func:`vslib.features.iter_features` (batches of ``--batch`` rows, what the indexer does).

Prints a table and writes ``reports/benchmarks/feature_store.json`` and ``.md``.

    python benchmarks/feature_store.py [--features data/features/<backbone>/features-<dataset>.npz] [--batch 1000] [--repeat 6]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import REPORT_DIR, write_report  # noqa: E402
from vslib.features import TABLE_COLUMNS  # noqa: E402
from vslib.npzfile import STREAM_ROWS, npz_member, save_npz_streamed  # noqa: E402

CHILD = r'''
import json, sys, time
from pathlib import Path
from types import SimpleNamespace as NS
import numpy as np
kind, path, batch = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
import pandas as pd, pyarrow.parquet as pq
from vslib import features as F
from vslib.npzfile import npz_member
import vslib.datasets  # imported by read_split (its split names): not the reader's memory
from benchmarks.common import proc_status
def status(key):  # MB, from /proc/self/status
    return proc_status(key, float("nan")) / 2**20
try:  # reset the peak (VmHWM) so that the imports' peak does not hide the reader's
    open("/proc/self/clear_refs", "w").write("5")
except OSError:
    pass
base, base_anon = status("VmRSS"), status("RssAnon")
t0 = time.perf_counter()
out = {}
if kind == "npz-hashes":
    out["n"] = len(npz_member(path, "content_hash"))
elif kind == "parquet-hashes":
    out["n"] = len(set(pq.read_table(path, columns=["content_hash"]).column(0).to_pylist()))
elif kind == "npz-stream" or kind == "iter_features":
    cfg = NS(features_dir=path.parent, dataset=NS(name=path.stem[len("features-"):]),
             backbone=NS(name=str(npz_member(path, "backbone")[()])), source="(benchmark)")
    s, n = 0.0, 0
    for fs in F.iter_features(cfg, "index", batch):
        s += float(fs.vectors.sum()); n += len(fs)
    out["n"] = n
elif kind == "parquet-stream":
    f = pq.ParquetFile(path); n = 0; s = 0.0
    for b in f.iter_batches(batch_size=batch):
        split = b.column("split").to_numpy(zero_copy_only=False) == "index"
        col = b.column("vectors")
        v = col.values.to_numpy().reshape(len(col), -1)[split]
        s += float(v.sum()); n += len(v)
    out["n"] = n
elif kind == "npz-slice":
    rows = np.sort(np.random.default_rng(0).choice(len(npz_member(path, "vectors")), 1000, replace=False))
    out["n"] = len(np.asarray(npz_member(path, "vectors")[rows]))
elif kind == "parquet-slice":
    f = pq.ParquetFile(path)
    rows = np.sort(np.random.default_rng(0).choice(f.metadata.num_rows, 1000, replace=False))
    t = pq.read_table(path, columns=["vectors"]).take(rows)  # pyarrow reads the row groups, then takes
    out["n"] = len(t)
elif kind == "load_features":
    cfg = NS(features_dir=path.parent, dataset=NS(name=path.stem[len("features-"):]),
             backbone=NS(name=str(npz_member(path, "backbone")[()])), source="(benchmark)")
    fs = F.load_features(cfg).split("index")
    out["n"] = len(fs); float(fs.vectors.sum())
elif kind == "read_split":
    cfg = NS(features_dir=path.parent, dataset=NS(name=path.stem[len("features-"):]),
             backbone=NS(name=str(npz_member(path, "backbone")[()])), source="(benchmark)")
    fs = F.read_split(cfg, "index")
    out["n"] = len(fs); float(fs.vectors.sum())
out["seconds"] = round(time.perf_counter() - t0, 4)
out["peak_rss_above_imports_mb"] = round(status("VmHWM") - base, 1)  # includes mapped file pages
out["anon_rss_above_imports_mb"] = round(status("RssAnon") - base_anon, 1)  # process memory at the end
print(json.dumps(out))
'''


def child(kind: str, path: Path, batch: int) -> dict:
    r = subprocess.run([sys.executable, "-c", CHILD, kind, str(path), str(batch)], capture_output=True, text=True,
                       cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    if r.returncode:
        raise SystemExit(f"{kind} failed:\n{r.stderr[-2000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def to_parquet(npz: Path, out: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    v = np.asarray(npz_member(npz, "vectors"), np.float32)
    cols = {c: pa.array(np.asarray(npz_member(npz, c)).astype(str)) for c in TABLE_COLUMNS}
    vec = pa.FixedSizeListArray.from_arrays(pa.array(v.reshape(-1)), v.shape[1])
    pq.write_table(pa.table({**cols, "vectors": vec}), out, row_group_size=8192, compression="none")


def tile(npz: Path, k: int, tmp: Path) -> Path:
    v = npz_member(npz, "vectors")
    cols = {c: np.asarray(npz_member(npz, c)) for c in TABLE_COLUMNS}
    cols = {c: np.concatenate([np.char.add(col, f"#{i}") if c in ("path", "content_hash") else col for i in range(k)])
            for c, col in cols.items()}
    out = tmp / f"features-{npz.stem[len('features-'):]}-x{k}.npz"
    chunks = (np.asarray(v[s:s + STREAM_ROWS]) for _ in range(k) for s in range(0, len(v), STREAM_ROWS))
    save_npz_streamed(out, dict(backbone=npz_member(npz, "backbone"), **cols), "vectors", (len(v) * k, v.shape[1]),
                      chunks)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--features", type=Path, default=None)
    p.add_argument("--batch", type=int, default=1000)
    p.add_argument("--repeat", type=int, default=1,
                   help="tile the file's rows this many times into a temporary feature file (paths made unique), "
                        "to see what grows with the collection")
    p.add_argument("--out", type=Path, default=REPORT_DIR)
    a = p.parse_args(argv)
    path = a.features or max((ROOT / "data" / "features").glob("*/features-*.npz"), key=lambda q: q.stat().st_size,
                             default=None)
    if path is None or not path.exists():
        raise SystemExit("no feature file: run `visualsearch extract` first or pass --features")
    with tempfile.TemporaryDirectory(dir=ROOT / "data") as tmp:
        if a.repeat > 1:
            path = tile(path, a.repeat, Path(tmp))
        pq_path = Path(tmp) / "features.parquet"
        to_parquet(path, pq_path)
        result = {"features": str(path), "repeat": a.repeat, "batch": a.batch,
                  "bytes": {"npz": path.stat().st_size, "parquet": pq_path.stat().st_size}, "runs": {}}
        for fmt, src in (("npz", path), ("parquet", pq_path)):
            for op in ("hashes", "stream", "slice"):
                result["runs"][f"{fmt}-{op}"] = child(f"{fmt}-{op}", src, a.batch)
        for kind in ("load_features", "read_split", "iter_features"):
            result["runs"][kind] = child(kind, path, a.batch)
    lines = [f"# Feature store ({path.name}, batches of {a.batch})", "",
             f"Files: npz {result['bytes']['npz'] / 1e6:.1f} MB, parquet {result['bytes']['parquet'] / 1e6:.1f} MB", "",
             "| run | rows | seconds | peak RSS above imports (MB, incl. mapped file pages) "
             "| anonymous RSS above imports at the end (MB) |", "|---|---:|---:|---:|---:|"]
    for k, r in result["runs"].items():
        lines.append(f"| {k} | {r['n']} | {r['seconds']} | {r['peak_rss_above_imports_mb']} "
                     f"| {r['anon_rss_above_imports_mb']} |")
    md = "\n".join(lines) + "\n"
    print(md)
    json_path, md_path = write_report(a.out, "feature_store", result, md)
    print(f"wrote {json_path} and {md_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
