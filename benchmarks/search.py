"""Search at scale: build time, memory, QPS and recall@10 of every index backend (issues 8 and 15).

    python benchmarks/search.py --quick             # 10k vectors, a few minutes (CI smoke test)
    python benchmarks/search.py                     # 10k, 100k and 1M vectors (hours on 2 cores)
    python benchmarks/search.py --sizes 1M --backends numpy,embedded-hnsw --ef 64,128,256

For each collection size it measures, per backend and setting: build/index time,
memory (peak RSS during the build, the index's own memory and its ratio to the
raw float32 vector bytes), queries per second at k=10 (one query per call, and
all queries in one call), recall@10 against exact search, and the same with a
label filter that matches ~5% of the collection.

Backends (``--backends``)

``numpy``               brute force with numpy (``X @ q``, ``argpartition``): the baseline,
                        and the ground truth for recall
``embedded-exact``      :class:`~vslib.index.embedded.EmbeddedIndex` with FAISS ``Flat``
``embedded-hnsw``       EmbeddedIndex with FAISS ``HNSW32``, one row per ``efSearch`` (``--ef``)
``embedded-quant``      EmbeddedIndex with compressed factories (``--quant-factories``; default
                        ``HNSW32,SQ8`` and ``IVF{nlist},SQ8``) saved to disk, float vectors
                        memory-mapped for exact re-ranking; one row per re-rank depth x efSearch/nprobe
``es-knn``              :class:`~vslib.index.elasticsearch.ElasticsearchIndex`, top-level ``knn``
                        (HNSW), one row per ``num_candidates`` (``--num-candidates``)
``es-exact``            the same index searched with exact ``script_score``

The Elasticsearch rows run against ``noida-db``, an Elasticsearch-API
*emulator* started by ``benchmarks/es_server.py`` (or the cluster named by
``--es-url``); their figures say nothing about Elasticsearch itself. They run
only up to ``--es-max-size`` vectors (default 100k).

Data: synthetic clustered unit vectors by default (clusters of 250 points around
random centres on the unit sphere; each point is its centre plus variation inside a
rank-16 per-cluster subspace plus isotropic noise, normalised; labels are the
cluster id modulo 20, so one label holds ~5% of the collection). The generator's
parameters were calibrated (``--calibrate``) so that the data is as hard as real
Fashion-MNIST embeddings: every collection's relative contrast and local intrinsic
dimensionality (:func:`~benchmarks.search_data.hardness`) are measured and reported beside its results.
``--real PATH`` also runs every backend on a real FeatureSet at its own size. Queries are
drawn the same way, not taken from the collection. With ``--features PATH`` (a
FeatureSet ``.npz`` written by :mod:`vslib.features`) the real vectors are used,
held-out rows become the queries, and the collection is tiled with small
perturbations up to each size. A filtered query asks for its own label (the
label of the cluster it was drawn from), as in "more like this, same category".

Writes ``reports/benchmarks/search.json`` and ``search.md`` (``--out`` to change).
Large synthetic collections are cached as ``.npy`` files under
``data/interim/bench/`` and memory-mapped, so a rerun does not regenerate them.

This module holds the arguments and the run; the parts live beside it:
:mod:`~benchmarks.search_data` (the collections and their hardness),
:mod:`~benchmarks.search_measure` (exact numpy search, QPS and recall of one searcher),
:mod:`~benchmarks.search_embedded` and :mod:`~benchmarks.search_es` (the backends' rows) and
:mod:`~benchmarks.search_report` (the targets and the Markdown page).
"""
from __future__ import annotations

import argparse
import gc
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.common import REPORT_DIR, command_line, write_report  # noqa: E402
from benchmarks.search_data import (CALIBRATED, K, Collection, calibrate, fmt_size, from_features,  # noqa: E402
                                    hardness, parse_size, parse_synth, real_collection, synthetic)
from benchmarks.search_embedded import run_embedded, run_quant  # noqa: E402
from benchmarks.search_es import EsRunner  # noqa: E402
from benchmarks.search_measure import print_row, run_numpy  # noqa: E402
from benchmarks.search_report import EMULATOR_NOTE, check_targets, header, machine, markdown  # noqa: E402
from vslib.paths import DATA_DIR  # noqa: E402

BACKENDS = ("numpy", "embedded-exact", "embedded-hnsw", "embedded-quant", "es-knn", "es-exact")
#: compressed embedded factories tried by default; {nlist} becomes ~2 sqrt(n) rounded to a power of two
QUANT_FACTORIES = ("HNSW32,SQ8", "IVF{nlist},SQ8")


# -- arguments ----------------------------------------------------------------------------------------------------
def _list(kind, choices=None, sep=","):
    def parse(text: str):
        items = [kind(x.strip()) for x in text.split(sep) if x.strip()]
        if choices is not None:
            bad = [x for x in items if x not in choices]
            if bad:
                raise argparse.ArgumentTypeError(f"{bad} not among {list(choices)}")
        return items
    return parse


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="10k vectors only, fewer settings, embedded backends unless --backends names others "
                        "(CI smoke test)")
    p.add_argument("--sizes", type=_list(parse_size), default=None, help="collection sizes (default 10k,100k,1M)")
    p.add_argument("--dim", type=int, default=1280, help="vector dimension (default 1280, EfficientNet-Lite0)")
    p.add_argument("--features", type=Path, default=None, help="a FeatureSet .npz to use instead of synthetic data")
    p.add_argument("--backends", type=_list(str, BACKENDS), default=None,
                   help=f"comma-separated subset of {','.join(BACKENDS)} (default: all; with --quick: numpy and embedded)")
    p.add_argument("--ef", type=_list(int), default=None, help="HNSW efSearch values (default 16,32,64,128,256)")
    p.add_argument("--hnsw-m", type=int, default=32, help="HNSW links per node (FAISS factory HNSW<M>)")
    p.add_argument("--num-candidates", type=_list(int), default=None,
                   help="Elasticsearch knn num_candidates values (default 10,50,100,200)")
    p.add_argument("--quant-factories", type=_list(str, None, sep=";"), default=None,
                   help="embedded-quant FAISS factories, ';'-separated (default "
                        f"{';'.join(QUANT_FACTORIES)}; {{nlist}} ~ 2 sqrt(n))")
    p.add_argument("--rerank", type=_list(int), default=None,
                   help="embedded-quant re-rank depths (candidates re-scored with the float vectors; default 0,100)")
    p.add_argument("--nprobe", type=_list(int), default=None, help="embedded-quant IVF nprobe values (default 16,64)")
    p.add_argument("--quant-ef", type=_list(int), default=None,
                   help="embedded-quant HNSW efSearch values (default 64; raised to the re-rank depth)")
    p.add_argument("--quant-ef-construction", type=int, default=40,
                   help="embedded-quant HNSW build breadth (default 40, FAISS's own; faster builds)")
    p.add_argument("--real", type=Path, action="append", default=[],
                   help="a FeatureSet .npz of real vectors: its hardness is measured and every backend is run on "
                        "it at its own size (repeatable)")
    p.add_argument("--calibrate", type=Path, default=None,
                   help="a FeatureSet .npz: grid-search the synthetic generator to match its hardness, then use "
                        "the parameters found for the synthetic sizes")
    p.add_argument("--synthetic", type=parse_synth, default=None,
                   help="synthetic generator parameters, e.g. 'rank=16,spread=1.0,noise=0.5' (default: calibrated)")
    p.add_argument("--queries", type=int, default=200, help="number of query vectors")
    p.add_argument("--single-budget", type=float, default=None,
                   help="seconds at most for timing one-query-per-call searches (at least 5 queries are timed)")
    p.add_argument("--es-max-size", type=parse_size, default=100_000,
                   help="largest collection indexed into Elasticsearch (default 100k)")
    p.add_argument("--es-queries", type=int, default=None, help="queries sent to Elasticsearch (default: --queries)")
    p.add_argument("--es-url", default=None, help="an Elasticsearch URL to use instead of starting the emulator")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-cache", action="store_true", help="do not cache generated collections under data/")
    p.add_argument("--out", type=Path, default=REPORT_DIR, help="where search.{json,md} go")
    return p


# -- main ---------------------------------------------------------------------------------------------------------
def run_collection(col: Collection, args, res: dict, opts: dict, save) -> None:
    """Every selected backend on one collection; rows go into ``res['results']``, saved after each backend."""
    n = len(col.vectors)
    rows = run_numpy(col, opts["budget"])  # always: it is the ground truth
    if "numpy" in args.backends:
        print_row(rows[0], col.raw_bytes)
        res["results"] += rows
        save()
    if "embedded-exact" in args.backends:
        res["results"] += run_embedded(col, "Flat", [], opts["budget"])
        save()
    if "embedded-hnsw" in args.backends:
        res["results"] += run_embedded(col, f"HNSW{args.hnsw_m}", opts["efs"], opts["budget"])
        save()
    if "embedded-quant" in args.backends:
        for factory in opts["quant_factories"]:
            res["results"] += run_quant(col, factory, opts["quant_efs"], opts["nprobes"], opts["reranks"],
                                        opts["budget"], opts["work_dir"], args.quant_ef_construction)
            save()
    es_which = [b for b in args.backends if b.startswith("es-")]
    if es_which and n <= args.es_max_size:
        try:
            res["results"] += opts["es"].run(col, es_which, opts["ncs"], opts["es_q"], opts["budget"])
        except Exception as e:  # record it, keep the other figures
            msg = f"Elasticsearch rows skipped: {type(e).__name__}: {e}"
            print("    " + msg, file=sys.stderr, flush=True)
            res["notes"].append(msg)
    elif es_which:
        res["notes"].append(f"Elasticsearch rows not run at this size (--es-max-size {fmt_size(args.es_max_size)})")
    save()


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    if args.backends is None:  # the Elasticsearch emulator needs minutes for 10k vectors: not in the smoke test
        args.backends = [b for b in BACKENDS if not (args.quick and b.startswith("es-"))]
    sizes = args.sizes or ([10_000] if args.quick else [10_000, 100_000, 1_000_000])
    efs = args.ef or ([16, 64, 128] if args.quick else [16, 32, 64, 128, 256])
    ncs = args.num_candidates or ([10, 100] if args.quick else [10, 50, 100, 200])
    budget = args.single_budget if args.single_budget is not None else (3.0 if args.quick else 20.0)
    es_q = args.es_queries or (min(args.queries, 100) if args.quick else args.queries)
    cache = None if args.no_cache else DATA_DIR / "interim" / "bench"
    opts = {"budget": budget, "efs": efs, "ncs": ncs, "es_q": es_q,
            "quant_factories": args.quant_factories or list(QUANT_FACTORIES),
            "quant_efs": args.quant_ef or [64], "nprobes": args.nprobe or [16, 64],
            "reranks": args.rerank if args.rerank is not None else [0, 100],
            "work_dir": (cache or DATA_DIR / "interim" / "bench") / "indexes"}
    report = {"command": command_line("search.py", argv),
              "started": time.strftime("%Y-%m-%d %H:%M:%S"), "machine": machine(), "k": K,
              "queries": args.queries, "es_queries": es_q, "emulator_note": EMULATOR_NOTE,
              "single_query_budget_s": budget, "sizes": {}, "real": {}, "hardness": [], "calibration": None,
              "targets": [], "source": "", "elapsed_s": 0.0}
    print(header(report), flush=True)
    es = EsRunner(args.es_url)
    opts["es"] = es
    t_start = time.perf_counter()

    def save():  # after every backend, so a long run that is stopped leaves what it measured
        report["elapsed_s"] = time.perf_counter() - t_start
        report["targets"] = check_targets(report["sizes"])
        write_report(args.out, "search", report, markdown(report))

    synth = args.synthetic or CALIBRATED
    try:
        real = {}
        for path in dict.fromkeys(args.real + ([args.calibrate] if args.calibrate else [])):
            col = real_collection(path, args.queries, args.seed)
            h = hardness(col.vectors, col.queries)
            real[path] = (col, h)
            report["hardness"].append({"data": f"real: {path.name}", "source": col.source, **h})
            print(f"  hardness of {path.name}: median LID {h['lid_median']:.1f}, median RC@{K} "
                  f"{h['rc_median']:.3f} ({h['n']:,} vectors)", flush=True)
        if args.calibrate:
            col, target = real[args.calibrate]
            t0 = time.perf_counter()
            synth, h, top = calibrate(target, len(col.vectors), args.queries, int(col.vectors.shape[1]), args.seed,
                                      synth)
            report["calibration"] = {"target": args.calibrate.name, "params": synth.__dict__, "hardness": h,
                                     "best": top, "seconds": time.perf_counter() - t0}
            print(f"  calibrated to {args.calibrate.name}: {synth} gives median LID {h['lid_median']:.1f}, "
                  f"RC {h['rc_median']:.3f} at {len(col.vectors):,} vectors", flush=True)
            report["hardness"].append({"data": f"synthetic at the size of {args.calibrate.name}",
                                       "source": synth.describe(len(col.vectors)), **h})
        for path in args.real:
            col, _ = real[path]
            print(f"\n== real vectors: {path.name} ({len(col.vectors):,}) ==", flush=True)
            res = {"n": len(col.vectors), "dim": int(col.vectors.shape[1]), "raw_bytes": col.raw_bytes,
                   "source": col.source, "label_share": float(np.mean(col.labels == col.query_labels[0])),
                   "results": [], "notes": []}
            report["real"][path.name] = res
            run_collection(col, args, res, opts, save)
        real.clear()
        for n in sizes:
            print(f"\n== {fmt_size(n)} vectors ==", flush=True)
            t0 = time.perf_counter()
            col = (from_features(args.features, n, args.queries, args.seed) if args.features
                   else synthetic(n, args.queries, args.dim, args.seed, cache, synth))
            report["source"] = col.source
            print(f"  data ready in {time.perf_counter() - t0:.1f} s: {col.source}", flush=True)
            h = hardness(col.vectors, col.queries)
            report["hardness"].append({"data": f"benchmark collection, {fmt_size(n)}", "source": col.source, **h})
            print(f"  hardness: median LID {h['lid_median']:.1f}, median RC@{K} {h['rc_median']:.3f}", flush=True)
            res = {"n": n, "dim": int(col.vectors.shape[1]), "raw_bytes": col.raw_bytes,
                   "label_share": float(np.mean(col.labels == col.query_labels[0])), "hardness": h,
                   "results": [], "notes": []}
            report["sizes"][str(n)] = res
            run_collection(col, args, res, opts, save)
            del col
            gc.collect()
    finally:
        es.stop()
    save()
    print("\nTargets:")
    for t in report["targets"]:
        print(f"  {t['status']:<4} {t['target']} {t['where']}: {t['detail']}")
    print(f"\nwrote {args.out / 'search.json'} and {args.out / 'search.md'} ({report['elapsed_s']:.0f} s)")
    return report


if __name__ == "__main__":
    main()
