"""What the integrity checks cost at scale (issue 23): 1M vectors of 1280 float32 by default.

On a synthetic ``vectors.npy`` of ``--rows`` unit vectors of ``--dim`` dimensions (5.1 GB at the
default 1M x 1280, written once into ``--dir`` and reused), it measures, in interleaved rounds:

* **cheap check** — :func:`vslib.integrity.verify` with ``full=False`` (a ``stat`` against the sidecar):
  what every open of a large file pays;
* **full CRC** — :func:`vslib.integrity.verify` with ``full=True`` (reads the file, CRC-32): what
  ``visualsearch check`` and the readers of a whole file pay; page cache warm (the file was just
  read) and, when ``--cold`` and run as root, after dropping the page cache;
* **vector check** — :func:`vslib.integrity.check_unit_vectors` over every row (finite, unit norm),
  on the memory-mapped array: what a reader pays on rows it reads anyway;
* **sampled check** — the same on 4,096 evenly spaced rows: what the embedded index pays on open
  when its generation is too large for a full CRC.

Each figure is also given per million vectors and as a ratio to reading the file once
(``np.load`` into RAM), so the cost reads against the work it guards. Prints a table and writes
``reports/benchmarks/integrity.json`` and ``.md``.

    python benchmarks/integrity.py [--rows 1000000] [--dim 1280] [--rounds 3] [--dir /tmp/vs-integrity]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import REPORT_DIR, interleaved_rounds, normalise, write_report  # noqa: E402
from vslib import integrity  # noqa: E402


def _make(path: Path, rows: int, dim: int) -> None:
    if path.exists() and integrity.read_record(path) is not None:
        arr = np.load(path, mmap_mode="r")
        if arr.shape == (rows, dim):
            return
    rng = np.random.default_rng(0)
    arr = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(rows, dim))
    for start in range(0, rows, 65_536):
        block = rng.standard_normal((min(65_536, rows - start), dim), dtype=np.float32)
        arr[start:start + len(block)] = normalise(block)
    arr.flush()
    del arr
    integrity.record(path)


def _time(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def _drop_caches() -> bool:
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=1280)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--dir", default="/tmp/vs-integrity")
    ap.add_argument("--cold", action="store_true", help="also time a full CRC after dropping the page cache (root)")
    ap.add_argument("--out", default=str(REPORT_DIR))
    args = ap.parse_args(argv)
    folder = Path(args.dir)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"vectors-{args.rows}x{args.dim}.npy"
    print(f"writing {path} ..." if not path.exists() else f"reusing {path}", flush=True)
    _make(path, args.rows, args.dim)
    size = path.stat().st_size
    sample_rows = np.linspace(0, args.rows - 1, 4096).astype(np.int64)

    cases = {
        "read_whole_file": lambda: np.load(path),
        "cheap_check": lambda: integrity.verify(path, full=False),
        "full_crc": lambda: integrity.verify(path, full=True),
        "vector_check_all_rows": lambda: integrity.check_unit_vectors(np.load(path, mmap_mode="r"), "bench"),
        "sampled_vector_check": lambda: integrity.check_unit_vectors(
            np.load(path, mmap_mode="r")[sample_rows], "bench"),
    }

    def print_round(r, wall, cpu):
        print(f"round {r + 1}/{args.rounds}: " + ", ".join(f"{n} {t[-1]:.3f}s" for n, t in wall.items()), flush=True)

    times, _ = interleaved_rounds(cases, args.rounds, after_round=print_round)  # each round runs every case in turn
    cold = None
    if args.cold and _drop_caches():
        cold = _time(cases["full_crc"])

    read = statistics.median(times["read_whole_file"])
    per_m = 1_000_000 / args.rows
    rows = {}
    for name, t in times.items():
        med = statistics.median(t)
        rows[name] = {"median_s": med, "min_s": min(t), "max_s": max(t), "s_per_million_vectors": med * per_m,
                      "ratio_to_reading_the_file": med / read if read else None}
    result = {"rows": args.rows, "dim": args.dim, "file_bytes": size, "rounds": args.rounds,
              "cpu_count": os.cpu_count(), "cases": rows, "full_crc_cold_s": cold,
              "full_crc_gb_per_s": size / 1e9 / rows["full_crc"]["median_s"]}
    lines = [f"# Integrity checks at {args.rows:,} x {args.dim} float32 ({size / 1e9:.2f} GB), "
             f"{args.rounds} interleaved rounds, {os.cpu_count()} cores", "",
             "| check | median s | min-max s | s per 1M vectors | x reading the file |", "|---|---:|---:|---:|---:|"]
    for name, r in rows.items():
        lines.append(f"| {name.replace('_', ' ')} | {r['median_s']:.4f} | {r['min_s']:.4f}-{r['max_s']:.4f} | "
                     f"{r['s_per_million_vectors']:.4f} | {r['ratio_to_reading_the_file']:.3f} |")
    if cold is not None:
        lines.append(f"\nfull CRC with a cold page cache: {cold:.2f} s")
    write_report(Path(args.out), "integrity", result, "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
