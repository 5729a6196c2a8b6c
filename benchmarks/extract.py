"""Feature-extraction throughput: the batched pipeline against the original way and the model alone.

Three figures, measured in one process on the same images and backbone:

* **pipeline**: :func:`vslib.features.extract` end to end (decode, resize, model,
  shard writes) into an empty cache;
* **per-image predict**: the original project's way, one ``model.predict`` call
  per image (on a smaller subset: it is slow);
* **model only**: the batched model on images already decoded and resized in memory.

Targets: pipeline >= 5x per-image predict and >= 0.85x model only. Prints a
table and writes ``reports/benchmarks/extract.json`` and ``.md``.

    python benchmarks/extract.py [-c application.yaml] [-n 300] [--predict-n 50]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import psutil  # noqa: E402

from vslib.config import load_config, parse_config  # noqa: E402
from vslib.paths import DEFAULT_CONFIG  # noqa: E402

STAMPS = Path("/usr/share/tuxpaint/stamps")


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def demo_images(cfg, n: int) -> pd.DataFrame:
    """``n`` usable images of the demo dataset: from the manifest, else straight from the Tux Paint stamps."""
    from vslib.images import file_hash

    try:
        from vslib.datasets import load_manifest

        m = load_manifest(cfg)
        source = f"manifest {cfg.manifest_path}"
    except Exception as e:  # noqa: BLE001 - no manifest yet: fall back, and say so
        print(f"(no manifest: {e}; using {STAMPS} directly)")
        files = sorted(STAMPS.rglob("*.png"))
        if not files:
            raise SystemExit(f"no images: run `visualsearch data prepare` or install tuxpaint-stamps-default")
        m = pd.DataFrame({"path": [str(p) for p in files], "label": [p.parent.name for p in files]})
        m["split"], m["status"] = "index", "ok"
        source = str(STAMPS)
    m = m.sample(n=min(n, len(m)), random_state=0).reset_index(drop=True) if len(m) > n else m
    if "content_hash" not in m.columns:
        m["content_hash"] = [file_hash(p) for p in m["path"]]
    m.attrs["source"] = source
    return m


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-c", "--config", default=str(DEFAULT_CONFIG))
    ap.add_argument("-n", type=int, default=300, help="images for the pipeline and model-only runs")
    ap.add_argument("--predict-n", type=int, default=50, help="images for the per-image predict run")
    ap.add_argument("--repeats", type=int, default=2, help="timed repeats of each fast run; best is kept")
    args = ap.parse_args(argv)

    cfg = load_config(args.config) if Path(args.config).exists() else parse_config({})
    from vslib.backbones import backbone_from_config
    from vslib.features import extract
    from vslib.images import load_for_model

    load_before = os.getloadavg()[0]
    manifest = demo_images(cfg, args.n)
    n = len(manifest)
    t = time.perf_counter()
    bb = backbone_from_config(cfg)
    load_s = time.perf_counter() - t
    bs, size = cfg.backbone.batch_size, bb.input_size
    workers = cfg.backbone.workers or os.cpu_count()
    print(f"{bb.name}: {n} images from {manifest.attrs['source']}, batch {bs}, {workers} decode threads, "
          f"{os.cpu_count()} CPU cores; backbone ready in {load_s:.1f} s")

    # warm-up: trace the tf.function and Keras' predict once, outside every timing
    warm = np.stack([load_for_model(p, size) for p in manifest["path"][:bs]])
    bb.embed(warm)
    bb.embed(warm[:1])
    bb.keras_model.predict(bb.preprocess(warm[:1]), verbose=0)

    # (b) model alone on pre-decoded tensors
    decoded = np.stack([load_for_model(p, size, max_pixels=cfg.dataset.max_image_pixels) for p in manifest["path"]])
    model_s = []
    for _ in range(args.repeats):
        t = time.perf_counter()
        for i in range(0, n, bs):
            bb.embed(decoded[i:i + bs])
        model_s.append(time.perf_counter() - t)
    model_ips = n / min(model_s)
    del decoded

    # pipeline: extract() into an empty cache each repeat
    pipe_s = []
    for r in range(args.repeats):
        with tempfile.TemporaryDirectory() as tmp:
            c = parse_config({**cfg.to_dict(), "paths": {"data": tmp, "models": str(cfg.models_dir),
                                                         "reports": str(cfg.reports_dir)}},
                             base_dir=cfg.base_dir)
            t = time.perf_counter()
            fs = extract(c, progress=(r == 0), manifest=manifest, backbone=bb)
            pipe_s.append(time.perf_counter() - t)
            assert fs.stats["computed"] == manifest["content_hash"].nunique() - fs.stats["skipped"]
    pipe_ips = n / min(pipe_s)

    # (a) the original way: one model.predict call per image
    sub = manifest["path"][: args.predict_n].tolist()
    t = time.perf_counter()
    for p in sub:
        x = bb.preprocess(load_for_model(p, size, max_pixels=cfg.dataset.max_image_pixels)[None])
        f = bb.keras_model.predict(x, verbose=0)
        f / np.linalg.norm(f, axis=1, keepdims=True)
    predict_ips = len(sub) / (time.perf_counter() - t)

    result = {
        "backbone": bb.name,
        "images": n,
        "images_source": manifest.attrs["source"],
        "batch_size": bs,
        "decode_threads": workers,
        "cpu_cores": os.cpu_count(),
        "cpu": platform.processor() or platform.machine(),
        "pipeline_images_per_s": round(pipe_ips, 2),
        "per_image_predict_images_per_s": round(predict_ips, 2),
        "per_image_predict_images": len(sub),
        "model_only_images_per_s": round(model_ips, 2),
        "speedup_vs_per_image_predict": round(pipe_ips / predict_ips, 2),
        "fraction_of_model_only": round(pipe_ips / model_ips, 3),
        "targets": {"speedup_vs_per_image_predict": 5.0, "fraction_of_model_only": 0.85},
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "rss_now_mb": round(psutil.Process().memory_info().rss / 2**20, 1),
        "backbone_load_s": round(load_s, 2),
        "repeats": args.repeats,
        # other processes competing for the cores make every figure (and the ratios) unreliable
        "load_average_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],
    }
    rows = [
        ("pipeline (extract, end to end)", pipe_ips, f"{n} images, best of {args.repeats}"),
        ("(a) per-image model.predict", predict_ips, f"{len(sub)} images"),
        ("(b) model only, pre-decoded", model_ips, f"{n} images, best of {args.repeats}"),
    ]
    md = [f"# Feature extraction benchmark ({bb.name})", "",
          f"{n} images ({manifest.attrs['source']}), batch {bs}, {workers} decode threads, "
          f"{os.cpu_count()} CPU cores, no GPU.", "",
          "| run | images/s | notes |", "|---|---:|---|"]
    md += [f"| {a} | {b:.1f} | {c} |" for a, b, c in rows]
    md += ["", f"- pipeline / per-image predict: **{result['speedup_vs_per_image_predict']}x** (target >= 5x)",
           f"- pipeline / model only: **{result['fraction_of_model_only']}** (target >= 0.85)",
           f"- peak RSS: {result['peak_rss_mb']} MB",
           f"- 1-minute load average before/after: {result['load_average_1min']} "
           f"(above {os.cpu_count()}, other processes shared the cores and the figures are unreliable)", ""]
    text = "\n".join(md)
    print()
    print(text)
    out = cfg.reports_dir / "benchmarks"
    out.mkdir(parents=True, exist_ok=True)
    (out / "extract.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "extract.md").write_text(text)
    print(f"wrote {out / 'extract.json'} and {out / 'extract.md'}")
    return result


if __name__ == "__main__":
    main()
