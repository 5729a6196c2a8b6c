"""The Elasticsearch rows of the search benchmark (``es-knn``, ``es-exact``), against the emulator or ``--es-url``."""
from __future__ import annotations

import time
import uuid
from typing import Optional

import psutil

from benchmarks.es_server import EsServer
from benchmarks.search_data import K, Collection
from benchmarks.search_measure import (ADAPTIVE_CLASSES, add_all, index_searcher, measure, print_row,
                                       requests_per_query)
from vslib.config import ElasticsearchConfig
from vslib.index.elasticsearch import ElasticsearchIndex


def server_rss(pid: Optional[int]) -> int:
    """RSS of the Elasticsearch test server and its children (0 when unknown)."""
    if pid is None:
        return 0
    try:
        proc = psutil.Process(pid)
        return sum(p.memory_info().rss for p in [proc, *proc.children(recursive=True)])
    except psutil.Error:
        return 0


class EsRunner:
    """One Elasticsearch (emulator) server for the whole run, started lazily."""

    def __init__(self, url: Optional[str]):
        self.url, self.server, self.pid = url, None, None

    def ensure(self) -> str:
        if self.url is None:
            self.server = EsServer(startup_timeout=60).start()
            self.url, self.pid = self.server.url, self.server.proc.pid
            print(f"    started the noida-db Elasticsearch-API emulator at {self.url} (pid {self.pid})", flush=True)
        return self.url

    def stop(self):
        if self.server is not None:
            self.server.stop()
            self.server = None

    def run(self, col: Collection, which: list[str], ncs: list[int], nq: int, budget: float) -> list[dict]:
        url = self.ensure()
        cfg = ElasticsearchConfig(hosts=[url], index_name=f"bench-{uuid.uuid4().hex[:8]}", request_timeout=300.0,
                                  search_timeout=600.0, bulk_timeout=600.0,
                                  index_options={"type": "hnsw", "m": 16, "ef_construction": 100})
        index = ElasticsearchIndex.open(cfg, col.vectors.shape[1], create=True)
        before = server_rss(self.pid)
        t0 = time.perf_counter()
        try:
            add_all(index, col, batch=50_000)
            build = time.perf_counter() - t0
            index.search(col.queries[:1], K)  # a first search (some servers build the graph lazily)
            first = time.perf_counter() - t0 - build
            after = server_rss(self.pid)
            print(f"    indexed {len(col.vectors):,} vectors into the emulator in {build:.1f} s "
                  f"(server RSS +{(after - before) / 2**20:.0f} MiB)", flush=True)
            common = {"build_s": build, "first_search_s": first, "index_bytes": max(after - before, 0),
                      "index_note": "server RSS growth while indexing (emulator)", "emulator": True}
            q, ql = col.queries[:nq], col.query_labels[:nq]

            search = index_searcher(index)
            rows = []
            settings = [("es-knn", nc) for nc in ncs] if "es-knn" in which else []
            if "es-exact" in which:
                settings.append(("es-exact", None))
            for name, nc in settings:
                index.exact_mode = name == "es-exact"
                if nc is not None:
                    index.num_candidates = nc
                row = {"backend": name, "setting": "script_score" if nc is None else f"knn num_candidates={nc}",
                       "exact": nc is None, "num_candidates": nc, **common}
                # batched: the backend sends the queries as _msearch requests of msearch_batch searches
                row.update(measure(search, q, ql, col.truth[:nq], col.truth_f[:nq], budget, batched=True))
                row.update(requests_per_query(index, q[:min(nq, 20)], ql[:min(nq, 20)]))
                rows.append(row)
                print_row(row, col.raw_bytes)
                print(f"      requests/query: one at a time {row['rpq_single']:.2f}, batched {row['rpq_batch']:.2f}; "
                      f"adaptive pattern (1 + {ADAPTIVE_CLASSES} class searches) {row['rpq_adaptive_loop']:.2f} -> "
                      f"{row['rpq_adaptive_msearch']:.2f}; class counts {row['class_count_requests_loop']} -> "
                      f"{row['class_count_requests_agg']} requests", flush=True)
            return rows
        finally:
            index.drop()
