"""Retrieval benchmark: does the hierarchy beat flat search, on every dataset, over seeded splits?

For each dataset x backbone, the features are extracted once (cached, shared
with the pipeline); then for each head and each seed the whole chain runs in
memory on that seed's stratified split (:func:`vslib.evaluate.evaluate_seeds`):
fit the head on the index split (settings and temperature out of fold), tune
the adaptive settings on the index split, rank every mode exactly for the
held-out queries. Reported per dataset, backbone and head: classifier top-1 and
top-3, 1-NN accuracy, a logistic-regression baseline (C = 100), p@1/p@5/p@10/
mAP@10 per mode (mean over seeds), the hierarchy gain (adaptive - flat,
adaptive - hierarchical) with paired bootstrap 95 % intervals pooled over
seeds, time per stage, and whether the project's claims hold:

* the head's top-1 >= 1-NN accuracy and >= the logistic-regression baseline;
* adaptive p@1 >= flat p@1 - 1/n_queries and adaptive p@10 >= hierarchical p@10 - 1/n_queries.

Writes ``reports/benchmarks/retrieval.json`` and ``.md``.

    python benchmarks/retrieval.py                               # Tux Paint, lite0, 3 heads, 3 seeds
    python benchmarks/retrieval.py --datasets tuxpaint,fashion-mnist:1000,folder:/path/to/images \\
        --backbones efficientnet_lite0,efficientnet_lite2 --heads ensemble,linear,knn,mlp --seeds 3
    python benchmarks/retrieval.py --precisions float32,int8      # int8 beside float32 (vslib.int8)

With several precisions, a last table gives int8 - float32 on p@1 and p@10 (flat, adaptive) per dataset,
backbone and head, and whether int8 stays within one query of float32. The int8 model is calibrated on
the manifest's own index split (seed ``dataset.split.seed``); other seeds may query a calibration image,
which sets activation ranges only, never a label.

Dataset specs: ``tuxpaint``, ``fashion-mnist`` (all 70,000), ``fashion-mnist:N``
(at most N per class), ``folder:PATH`` (``PATH/<class>/<image>``),
``caltech101:PATH``; any spec may end in ``@N`` to cap images per class.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import REPORT_DIR, write_report  # noqa: E402
from vslib import datasets as ds_mod  # noqa: E402
from vslib import evaluate, extraction, features  # noqa: E402
from vslib.config import parse_config  # noqa: E402


def dataset_config(spec: str, backbone: str, head: str = "ensemble", data_dir: Path = ROOT / "data",
                   precision: str = "float32") -> tuple[str, dict]:
    """(a short name, the config mapping) of a dataset spec."""
    spec, _, cap = spec.partition("@")
    name, _, arg = spec.partition(":")
    ds = {"name": name, "install": True}
    if name == "fashion-mnist" and arg:
        ds["max_per_class"] = int(arg)
    elif name in ("folder", "caltech101"):
        if not arg:
            raise SystemExit(f"dataset spec {spec!r}: give the images' folder, e.g. {name}:/path/to/images")
        ds["root"] = arg
    elif arg:
        raise SystemExit(f"dataset spec {spec!r}: only fashion-mnist:N, folder:PATH and caltech101:PATH take an argument")
    if cap:
        ds["max_per_class"] = int(cap)
    label = name if name not in ("folder", "caltech101") else f"{name}:{Path(arg).name}"
    if ds.get("max_per_class"):
        label += f" (≤{ds['max_per_class']}/class)"
    data = {"dataset": ds, "backbone": {"name": backbone, "precision": precision}, "classifier": {"head": head},
            "evaluation": {"ks": [1, 5, 10]},
            "paths": {"data": str(data_dir), "models": str(ROOT / "models"), "reports": str(ROOT / "reports")}}
    return label, data


def claims(r: dict) -> dict:
    """The project's claims for one (dataset, backbone, head), on the means over seeds."""
    m = r["mean"]
    n = min(run["n_query"] for run in r["runs"])
    tol = 1.0 / n
    top1 = m["classifier_accuracy"]["mean"]
    modes = {k: {metric: v["mean"] for metric, v in d.items()} for k, d in m["modes"].items()}
    return {
        "head_top1_ge_1nn": top1 >= m["nn1_accuracy"]["mean"],
        "head_top1_ge_logreg": top1 >= m["logreg_accuracy"]["mean"],
        "adaptive_p1_ge_flat_p1": modes["adaptive"]["p@1"] >= modes["flat"]["p@1"] - tol,
        "adaptive_p10_ge_hier_p10": modes["adaptive"]["p@10"] >= modes["hierarchical"]["p@10"] - tol,
    }


def run(datasets: list[str], backbones: list[str], heads: list[str], seeds: int, base_seed: int,
        data_dir: Path = ROOT / "data", precisions: tuple[str, ...] = ("float32",)) -> dict:
    results = []
    for spec in datasets:
        for backbone, precision in ((b, p) for b in backbones for p in precisions):
            label, data = dataset_config(spec, backbone, data_dir=data_dir, precision=precision)
            cfg = parse_config(data, source=f"benchmark {label}", base_dir=ROOT)
            t = time.perf_counter()
            ds_mod.prepare(cfg, echo=lambda *_: None)
            t_prepare = time.perf_counter() - t
            t = time.perf_counter()
            extraction.extract(cfg)
            feats = features.load_features(cfg)
            t_extract = time.perf_counter() - t
            n_classes = feats.table["label"].nunique()
            print(f"\n== {label}, {backbone} {precision}: {len(feats)} images, {n_classes} classes "
                  f"(prepare {t_prepare:.0f}s, extract {t_extract:.0f}s) ==")
            for head in heads:
                _, hdata = dataset_config(spec, backbone, head, data_dir, precision)
                hcfg = parse_config(hdata, source=f"benchmark {label}", base_dir=ROOT)
                t = time.perf_counter()
                r = evaluate.evaluate_seeds(hcfg, [base_seed + i for i in range(seeds)], feats=feats,
                                            echo=lambda m: print(f"  {head}: {m}"))
                r.update({"dataset": label, "backbone": backbone, "precision": precision, "head": head,
                          "n_images": len(feats),
                          "n_classes": int(n_classes), "seconds": {
                              "prepare": round(t_prepare, 1), "extract": round(t_extract, 1),
                              "per_seed": {k: round(sum(run["seconds"][k] for run in r["runs"]) / seeds, 2)
                                           for k in r["runs"][0]["seconds"]},
                              "all_seeds": round(time.perf_counter() - t, 1)}})
                r["claims"] = claims(r)
                results.append(r)
                print(f"  {head}: claims {r['claims']}")
    return {"date": time.strftime("%Y-%m-%d %H:%M"), "machine": f"{platform.node()} ({os.cpu_count()} cores)",
            "seeds": [base_seed + i for i in range(seeds)], "results": results}


def _name(r: dict) -> str:
    precision = r.get("precision", "float32")
    return r["backbone"].replace("efficientnet_", "") + ("" if precision == "float32" else f" {precision}")


def precision_deltas(report: dict) -> list[dict]:
    """int8 - float32 per (dataset, backbone, head) on p@1 and p@10 of flat and adaptive, and the one-query check."""
    by = {(r["dataset"], r["backbone"], r["head"], r.get("precision", "float32")): r for r in report["results"]}
    out = []
    for (d, b, h, p), r in by.items():
        base = by.get((d, b, h, "float32"))
        if p == "float32" or base is None:
            continue
        n = min(run["n_query"] for run in r["runs"])
        delta = {f"{mode} {k}": round(r["mean"]["modes"][mode][k]["mean"] - base["mean"]["modes"][mode][k]["mean"], 4)
                 for mode in ("flat", "adaptive") for k in ("p@1", "p@10")}
        out.append({"dataset": d, "backbone": b, "head": h, "precision": p, "n_query": n, "delta": delta,
                    "within_one_query": all(abs(v) <= 1.0 / n + 1e-9 for v in delta.values()),
                    "claims_hold": all(r["claims"].values())})
    return out


def to_markdown(report: dict) -> str:
    lines = [f"# Retrieval benchmark ({report['date']}, {report['machine']})", "",
             f"Seeds {report['seeds']} (a row's count is in its `seeds` column): each seed is its own stratified split, head fit, tuning and exact search; "
             "figures are means over seeds, gains are pooled over the queries of all seeds (paired bootstrap 95 % "
             "interval). `1-NN`: label of the most similar indexed image; `LR`: logistic regression, C = 100, "
             "on the same index split.", "",
             "| dataset | backbone | head | seeds | queries | top-1 | top-3 | 1-NN | LR | flat p@1 | hier p@1 | adapt p@1 "
             "| flat p@10 | hier p@10 | adapt p@10 | adapt mAP@10 | gain p@1 vs flat | gain p@10 vs flat | claims |",
             "|---" * 19 + "|"]
    for r in report["results"]:
        m = r["mean"]
        mo = m["modes"]
        g = r["gain"]["adaptive_vs_flat"]
        ok = sum(r["claims"].values())
        fail = [k for k, v in r["claims"].items() if not v]
        lines.append(
            f"| {r['dataset']} | {_name(r)} | {r['head']} | {len(r['runs'])} | "
            f"{r['runs'][0]['n_query']} | {m['classifier_accuracy']['mean']:.3f} | {m['classifier_top3']['mean']:.3f} | "
            f"{m['nn1_accuracy']['mean']:.3f} | {m['logreg_accuracy']['mean']:.3f} | "
            f"{mo['flat']['p@1']['mean']:.3f} | {mo['hierarchical']['p@1']['mean']:.3f} | {mo['adaptive']['p@1']['mean']:.3f} | "
            f"{mo['flat']['p@10']['mean']:.3f} | {mo['hierarchical']['p@10']['mean']:.3f} | {mo['adaptive']['p@10']['mean']:.3f} | "
            f"{mo['adaptive']['map@10']['mean']:.3f} | "
            f"{g['p@1']['mean']:+.3f} [{g['p@1']['ci95'][0]:+.3f}, {g['p@1']['ci95'][1]:+.3f}] | "
            f"{g['p@10']['mean']:+.3f} [{g['p@10']['ci95'][0]:+.3f}, {g['p@10']['ci95'][1]:+.3f}] | "
            f"{ok}/4{' (fails: ' + ', '.join(fail) + ')' if fail else ''} |")
    lines += ["", "Time per stage (seconds; fit/tune/search are per seed):", "",
              "| dataset | backbone | head | extract | fit head | tune search | search all modes |", "|---" * 7 + "|"]
    for r in report["results"]:
        s = r["seconds"]
        lines.append(f"| {r['dataset']} | {_name(r)} | {r['head']} | {s['extract']} | "
                     f"{s['per_seed']['fit_head']} | {s['per_seed']['tune_search']} | {s['per_seed']['search_all_modes']} |")
    deltas = report.get("precision_deltas") or []
    if deltas:
        cols = list(deltas[0]["delta"])
        lines += ["", "Precision: int8 - float32 (means over seeds; one query is 1/queries):", "",
                  "| dataset | backbone | head | queries | " + " | ".join(cols) + " | within one query | claims hold |",
                  "|---" * (len(cols) + 6) + "|"]
        for d in deltas:
            lines.append(f"| {d['dataset']} | {d['backbone'].replace('efficientnet_', '')} {d['precision']} | {d['head']} | "
                         f"{d['n_query']} | " + " | ".join(f"{d['delta'][c]:+.3f}" for c in cols)
                         + f" | {'yes' if d['within_one_query'] else 'NO'} | {'yes' if d['claims_hold'] else 'NO'} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--datasets", default="tuxpaint", help="comma-separated dataset specs (see the module docstring)")
    p.add_argument("--backbones", default="efficientnet_lite0")
    p.add_argument("--heads", default="ensemble,linear,knn")
    p.add_argument("--precisions", default="float32", help="comma-separated: float32, int8 (backbone.precision)")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--base-seed", type=int, default=42)
    p.add_argument("--out", type=Path, default=REPORT_DIR, help="folder for retrieval.json/.md (default reports/benchmarks)")
    p.add_argument("--data", type=Path, default=ROOT / "data", help="data folder: manifests and the feature cache "
                                                                    "(default: the project's, shared with the pipeline)")
    p.add_argument("--combine", nargs="+", type=Path, metavar="JSON",
                   help="write one report from retrieval.json files of earlier runs instead of running")
    args = p.parse_args(argv)
    if args.combine:
        parts = [json.loads(f.read_text()) for f in args.combine]
        report = {"date": max(r["date"] for r in parts), "machine": parts[0]["machine"],
                  "seeds": sorted({s for r in parts for s in r["seeds"]}),
                  "results": [res for r in parts for res in r["results"]]}
    else:
        report = run(args.datasets.split(","), args.backbones.split(","), args.heads.split(","), args.seeds,
                     args.base_seed, args.data, tuple(args.precisions.split(",")))
    report["precision_deltas"] = precision_deltas(report)
    md = to_markdown(report)
    write_report(args.out, "retrieval", report, md)
    print("\n" + md)
    print(f"written: {args.out / 'retrieval.json'}, {args.out / 'retrieval.md'}")
    failed = [(r["dataset"], _name(r), r["head"]) for r in report["results"] if not all(r["claims"].values())]
    if failed:
        print(f"claims not met for: {failed}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
