"""What the benchmark scripts share: timing in interleaved rounds, ratios, memory readings and the report files.

* :func:`interleaved_rounds` runs every case once per round, in turn (optionally in a
  rotating order), so that other processes sharing the cores disturb all cases alike;
  :func:`round_ratio` takes a ratio within each round and reports its median, min and max;
* :func:`proc_status`, :func:`rss`, :func:`rss_anon` and :class:`PeakMemory` read this
  process's memory from ``/proc/self/status`` (also used by the scripts' child processes);
* :func:`normalise` makes the rows of generated vectors unit length;
* :func:`write_report` writes ``<name>.json`` and ``<name>.md`` into ``reports/benchmarks/``
  (or ``--out``), each replaced atomically, so a stopped run never leaves half a file.
"""
from __future__ import annotations

import json
import os
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np

from vslib.paths import REPORTS_DIR

#: where the benchmarks write their reports (``--out`` to change)
REPORT_DIR = REPORTS_DIR / "benchmarks"


# -- timing -------------------------------------------------------------------------------------------------------
def interleaved_rounds(cases: dict[str, Callable[[], object]], rounds: int, rotate: bool = False,
                       after_round: Optional[Callable[[int, dict, dict], None]] = None) -> tuple[dict, dict]:
    """Run every case once per round, in turn; ``rotate`` starts round ``r`` at the ``r``-th case.

    Returns ``(wall, cpu)``: per case, the wall-clock seconds and this process's CPU seconds
    (all threads) of each round, in the cases' order. ``after_round(r, wall, cpu)`` is called
    after each round (to print its figures).
    """
    names = list(cases)
    wall = {k: [] for k in names}
    cpu = {k: [] for k in names}
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)] if rotate else names
        for k in order:
            t, c = time.perf_counter(), time.process_time()
            cases[k]()
            wall[k].append(time.perf_counter() - t)
            cpu[k].append(time.process_time() - c)
        if after_round is not None:
            after_round(r, wall, cpu)
    return wall, cpu


def round_ratio(a: Sequence[float], b: Sequence[float]) -> dict:
    """Median, min and max over rounds of ``a / b`` taken within each round (rounded to 3 places)."""
    per_round = [x / y for x, y in zip(a, b)]
    return {"median": round(statistics.median(per_round), 3), "min": round(min(per_round), 3),
            "max": round(max(per_round), 3)}


# -- memory -------------------------------------------------------------------------------------------------------
def proc_status(field: str, default: float = 0) -> float:
    """A field of /proc/self/status in bytes (``default`` where /proc or the field is missing)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return default


def rss() -> int:
    return proc_status("VmRSS")


def rss_anon() -> int:
    """Anonymous resident memory: excludes memory-mapped input files, so it counts what an index allocates."""
    return proc_status("RssAnon") or rss()


class PeakMemory:
    """Peak RSS (and anonymous RSS) of this process while the block runs, sampled every 20 ms.

    The kernel's own high-water mark (VmHWM) is reset first where Linux allows
    it, and the larger of it and the sampled peak is reported.
    """

    def __init__(self, interval: float = 0.02):
        self.interval = interval
        self.peak = self.peak_anon = 0

    def __enter__(self):
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM
            self._hwm = True
        except OSError:
            self._hwm = False
        self._stop = threading.Event()
        self.peak, self.peak_anon = rss(), rss_anon()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, rss())
            self.peak_anon = max(self.peak_anon, rss_anon())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss())
        if self._hwm:
            self.peak = max(self.peak, proc_status("VmHWM"))


# -- data ---------------------------------------------------------------------------------------------------------
def normalise(x: np.ndarray) -> np.ndarray:
    """Scale the rows of ``x`` to unit length, in place (rows of norm 0 stay 0); returns ``x``."""
    x /= np.linalg.norm(x, axis=1, keepdims=True).clip(1e-12)
    return x


# -- reports ------------------------------------------------------------------------------------------------------
def command_line(script: str, argv: Optional[Sequence[str]] = None) -> str:
    """The command a report says it came from: ``python benchmarks/<script> <arguments>``."""
    return f"python benchmarks/{script} " + " ".join(argv if argv is not None else sys.argv[1:])


def write_report(out: Path, name: str, data: dict, markdown: str) -> tuple[Path, Path]:
    """Write ``out/<name>.json`` (``data``, indented) and ``out/<name>.md``, each replaced atomically."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = out / f"{name}.json", out / f"{name}.md"
    texts = json.dumps(data, indent=2, default=float) + "\n", markdown if markdown.endswith("\n") else markdown + "\n"
    for path, text in zip(paths, texts):
        tmp = out / f".{path.name}.tmp"
        tmp.write_text(text)
        os.replace(tmp, path)
    return paths
