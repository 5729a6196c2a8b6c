"""The embedded index's rows of the search benchmark: exact (``Flat``), HNSW and compressed factories."""
from __future__ import annotations

import gc
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.common import PeakMemory, rss_anon
from benchmarks.search_data import K, Collection
from benchmarks.search_measure import add_all, index_searcher, measured
from vslib.index.embedded import EmbeddedIndex


def embedded_breakdown(index) -> dict:
    """Where an EmbeddedIndex's memory goes, from :meth:`EmbeddedIndex.memory`."""
    m = index.memory()
    return {"vector_buffer_bytes": m["vector_ram_bytes"], "faiss_bytes": m["faiss_bytes"],
            "vectors_shared_with_faiss": m["vectors"] == "in FAISS's storage", "vectors": m["vectors"],
            "ef_construction": index.ef_construction}


def run_embedded(col: Collection, factory: str, efs: list[int], budget: float) -> list[dict]:
    gc.collect()
    anon0 = rss_anon()
    with PeakMemory() as mem:
        t0 = time.perf_counter()
        index = EmbeddedIndex(col.vectors.shape[1], None, factory=factory, ef_search=max(efs or [128]))
        add_all(index, col)
        t_add = time.perf_counter() - t0
        index.search(col.queries[:1], K)  # the FAISS index is built lazily, at the first search
        build = time.perf_counter() - t0
    gc.collect()
    held = rss_anon() - anon0
    common = {"build_s": build, "add_s": t_add, "peak_rss_bytes": mem.peak, "peak_anon_delta_bytes":
              mem.peak_anon - anon0, "index_bytes": held, **embedded_breakdown(index)}
    print(f"    built {factory} over {len(col.vectors):,} vectors in {build:.1f} s "
          f"(index holds {held / 2**20:.0f} MiB, {held / col.raw_bytes:.2f}x raw)", flush=True)

    search = index_searcher(index)
    rows = []
    for ef in (efs if not index.exact else [None]):
        if ef is not None:
            index.ef_search = ef
        row = {"backend": "embedded-exact" if index.exact else "embedded-hnsw",
               "setting": factory if ef is None else f"{factory} efSearch={ef}", "exact": index.exact,
               "factory": factory, "ef_search": ef, **common}
        rows.append(measured(row, search, col, budget))
    index.drop()
    del index, search
    gc.collect()
    return rows


def nlist_for(n: int) -> int:
    """IVF list count: about 2 sqrt(n), rounded to a power of two (256 at 10k, 512 at 100k, 2048 at 1M)."""
    return int(2 ** round(np.log2(max(2 * np.sqrt(n), 16))))


def run_quant(col: Collection, factory: str, efs: list[int], nprobes: list[int], reranks: list[int],
              budget: float, work_dir: Path, ef_construction: int = 40) -> list[dict]:
    """A compressed EmbeddedIndex saved to disk, the float vectors memory-mapped for re-ranking."""
    factory = factory.format(nlist=nlist_for(len(col.vectors)))
    work_dir.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix="quant-", dir=work_dir))
    gc.collect()
    anon0 = rss_anon()
    try:
        with PeakMemory() as mem:
            t0 = time.perf_counter()
            index = EmbeddedIndex.open(folder / "index", col.vectors.shape[1], factory=factory, mmap_vectors=True,
                                       ef_construction=ef_construction)
            add_all(index, col)
            t_add = time.perf_counter() - t0
            index.save()  # trains, builds, writes; then the float vectors are mapped from the saved file
            build = time.perf_counter() - t0
        gc.collect()
        held = rss_anon() - anon0
        m = index.memory()
        common = {"build_s": build, "add_s": t_add, "peak_rss_bytes": mem.peak,
                  "peak_anon_delta_bytes": mem.peak_anon - anon0, "index_bytes": held, "factory": factory,
                  "faiss_bytes": m["faiss_bytes"], "vector_buffer_bytes": m["vector_ram_bytes"],
                  "vectors": m["vectors"], "ef_construction": index.ef_construction,
                  "index_note": "anonymous RSS growth after the build; float vectors memory-mapped (on disk)"}
        print(f"    built {factory} over {len(col.vectors):,} vectors in {build:.1f} s (index holds "
              f"{held / 2**20:.0f} MiB = {held / col.raw_bytes:.2f}x raw; FAISS {m['faiss_bytes'] / 2**20:.0f} MiB; "
              f"vectors {m['vectors']})", flush=True)

        search = index_searcher(index)
        is_ivf = "IVF" in factory
        rows = []
        for rr in reranks:
            for knob in (nprobes if is_ivf else efs):
                index.rerank = rr
                if is_ivf:
                    index.nprobe = knob
                else:
                    index.ef_search = knob
                name = f"nprobe={knob}" if is_ivf else f"efSearch={max(knob, rr)}"
                row = {"backend": "embedded-quant", "setting": f"{factory} {name} rerank={rr}", "exact": False,
                       "rerank": rr, "nprobe": knob if is_ivf else None, "ef_search": None if is_ivf else knob,
                       **common}
                rows.append(measured(row, search, col, budget))
        index.drop()
        del index, search
        gc.collect()
        return rows
    finally:
        shutil.rmtree(folder, ignore_errors=True)
