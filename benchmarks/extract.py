"""Feature-extraction throughput: TensorFlow's path, the TensorFlow Lite runtime, and the pipeline end to end.

Measured in one process on the same images and backbone, in interleaved rounds
(each round runs every path once, in a rotating order) so that other processes
sharing the cores disturb all paths alike; ratios are taken within a round and
the median round is reported:

* **tf.function alone**: the Keras model in a compiled ``tf.function`` on images
  already decoded and resized in memory (the runtime before issue 15);
* **TensorFlow Lite alone**: the same network converted to TensorFlow Lite
  (XNNPACK) on the same in-memory images;
* **pipeline, tf.function**: :func:`vslib.extraction.extract` end to end (decode,
  resize, model, shard writes) into an empty cache with ``backbone.runtime: keras``
  (today's pipeline; it benefits from the decoding changes too);
* **pipeline, TensorFlow Lite**: the same with the TensorFlow Lite runtime;
* **int8 alone** and **pipeline, int8**: the same with ``backbone.precision: int8``
  (:mod:`vslib.int8`: full-integer TensorFlow Lite calibrated on the collection);
* **decode alone**: the pipeline's decode/resize threads without a model;
* with ``--scheduler dask --workers N``, also **pipeline, Dask**: the same
  extraction with ``compute.scheduler: dask`` on a LocalCluster of N
  single-threaded worker processes, started once before the rounds (its start
  and the workers' first backbone load are reported apart), one partition per
  batch (use ``-n`` of several batches per worker); the target is
  >= 0.9x the in-process TensorFlow Lite pipeline in the same round: on one
  machine this measures Dask's overhead, the gain comes with more machines.

It also profiles where a single thread's time goes per image (decode, EXIF and
colour conversion, resize, array copy) against the model's time per image, and
checks that the two pipelines' vectors agree (cosine).

After the rounds, the cold start of ``visualsearch search`` (a fresh process: imports, model, classifier,
index, one query) is timed in both precisions, interleaved, with its peak RSS, where the project has been
run in that precision.

Targets: pipeline (TensorFlow Lite) >= 1.8x pipeline (tf.function) and >= 0.85x
TensorFlow Lite alone; the int8 pipeline >= 2.3x the float32 pipeline and >= 0.85x int8 alone; ``search``
starts within 1.5 s and 300 MB. Prints a table and writes ``reports/benchmarks/extract.json`` and ``.md``.

    python benchmarks/extract.py [-c application.yaml] [-n 256] [--rounds 3] [--scheduler dask --workers 2]
"""
from __future__ import annotations

import argparse
import os
import platform
import re
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from PIL import Image, ImageOps  # noqa: E402

from benchmarks.common import interleaved_rounds, round_ratio, write_report  # noqa: E402
from vslib.backbones import get_backbone, int8_backbone  # noqa: E402
from vslib.config import load_config, parse_config  # noqa: E402
from vslib.datasets import load_manifest  # noqa: E402
from vslib.embedding import iter_batches  # noqa: E402
from vslib.extraction import extract  # noqa: E402
from vslib.images import _to_rgb, file_hash, load_for_model  # noqa: E402
from vslib.int8 import calibration_sample  # noqa: E402
from vslib.paths import DEFAULT_CONFIG  # noqa: E402
from vslib.runtime import min_cosine  # noqa: E402

STAMPS = Path("/usr/share/tuxpaint/stamps")
TARGETS = {"pipeline_vs_todays_pipeline": 1.8, "pipeline_vs_runtime_alone": 0.85,
           "int8_pipeline_vs_float32_pipeline": 2.3, "int8_pipeline_vs_int8_runtime_alone": 0.85}
#: ``visualsearch search`` cold start, seconds and MB of peak RSS
COLD_START_TARGETS = {"seconds": 1.5, "peak_rss_mb": 300}


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def demo_images(cfg, n: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``n`` usable images of the demo dataset (from the manifest, else straight from the Tux Paint stamps), and
    the whole collection they come from."""
    try:
        m = load_manifest(cfg)
        source = f"manifest {cfg.manifest_path}"
    except Exception as e:  # noqa: BLE001 - no manifest yet: fall back, and say so
        print(f"(no manifest: {e}; using {STAMPS} directly)")
        files = sorted(STAMPS.rglob("*.png"))
        if not files:
            raise SystemExit("no images: run `visualsearch data prepare` or install tuxpaint-stamps-default")
        m = pd.DataFrame({"path": [str(p) for p in files], "label": [p.parent.name for p in files]})
        m["split"], m["status"] = "index", "ok"
        source = str(STAMPS)
    if "status" in m.columns:
        m = m[m["status"] == "ok"]
    everything = m  # the whole collection: the int8 model calibrates on it
    m = m.sample(n=min(n, len(m)), random_state=0).reset_index(drop=True) if len(m) > n else m
    if "content_hash" not in m.columns:
        m["content_hash"] = [file_hash(p) for p in m["path"]]
    m = m.drop_duplicates("content_hash").reset_index(drop=True)
    m.attrs["source"] = source
    return m, (everything if "content_hash" in everything.columns else m)


def stage_profile(paths, size: int) -> dict:
    """Milliseconds of one thread's CPU time per image in each stage of :func:`vslib.images.load_for_model`."""
    t = dict(decode=0.0, exif_and_rgb=0.0, resize=0.0, to_array=0.0)
    for p in paths:
        c0 = time.thread_time()
        with Image.open(p) as img:
            img.load()
            c1 = time.thread_time()
            ImageOps.exif_transpose(img, in_place=True)
            rgb = _to_rgb(img, (255, 255, 255))
            c2 = time.thread_time()
            small = rgb.resize((size, size), Image.BILINEAR, reducing_gap=2.0) if rgb.size != (size, size) else rgb
            c3 = time.thread_time()
            np.asarray(small, dtype=np.uint8)
            c4 = time.thread_time()
        for k, a, b in (("decode", c0, c1), ("exif_and_rgb", c1, c2), ("resize", c2, c3), ("to_array", c3, c4)):
            t[k] += b - a
    out = {k: round(v / len(paths) * 1e3, 3) for k, v in t.items()}
    out["total"] = round(sum(out.values()), 3)
    return out


def cold_starts(cfg, rounds: int) -> dict:
    """Wall seconds and peak RSS of ``visualsearch search`` in a fresh process, per precision (interleaved)."""
    import subprocess

    import yaml

    # the `visualsearch` entry point, reporting its own peak RSS (VmHWM: this process's memory only; a child's
    # getrusage maximum would count the benchmark's own memory, inherited at fork)
    launcher = ("import atexit, re, sys\n"
                "def peak():\n"
                "    text = open('/proc/self/status').read()\n"
                "    sys.stderr.write('VS_PEAK_KB %s\\n' % re.search(r'VmHWM:\\s+(\\d+)', text).group(1))\n"
                "atexit.register(peak)\n"
                "from vslib.cli import main\n"
                "sys.argv[0] = 'visualsearch'\n"
                "sys.exit(main())\n")
    out: dict = {}
    configs = {}
    with tempfile.TemporaryDirectory() as tmp:
        for precision in ("float32", "int8"):
            data = cfg.to_dict()
            data["backbone"]["precision"] = precision
            data["paths"] = {k: str(cfg.path(v).resolve()) for k, v in data["paths"].items()}
            c = parse_config(data, base_dir=cfg.base_dir)
            if not (c.classifier_dir / "metadata.json").exists() or not c.index_dir.exists():
                out[precision] = {"skipped": f"not measured: the project has no {precision} classifier and index "
                                             f"(run `visualsearch run` with backbone.precision: {precision})"}
                continue
            path = Path(tmp) / f"{precision}.yaml"
            path.write_text(yaml.safe_dump(data, sort_keys=False))
            query = load_manifest(c).query("split == 'query'")["path"].iloc[0]
            configs[precision] = [sys.executable, "-c", launcher, "search", "-c", str(path), str(query), "-k", "5"]
        for _ in range(rounds):
            for precision, argv in configs.items():
                t = time.perf_counter()
                p = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     env=dict(os.environ, CUDA_VISIBLE_DEVICES=""))
                err = p.communicate()[1].decode(errors="replace")
                seconds = time.perf_counter() - t
                peak = re.search(r"VS_PEAK_KB (\d+)", err)
                if p.returncode != 0 or peak is None:
                    raise SystemExit(f"visualsearch search ({precision}) failed: {err[-2000:]}")
                o = out.setdefault(precision, {"seconds": [], "peak_rss_mb": []})
                o["seconds"].append(round(seconds, 3))
                o["peak_rss_mb"].append(round(int(peak.group(1)) / 1024.0, 1))
    for o in out.values():
        if "seconds" in o:
            o["seconds_median"] = round(statistics.median(o["seconds"]), 3)
            o["peak_rss_mb_median"] = round(statistics.median(o["peak_rss_mb"]), 1)
            o["passed"] = (o["seconds_median"] <= COLD_START_TARGETS["seconds"]
                           and o["peak_rss_mb_median"] <= COLD_START_TARGETS["peak_rss_mb"])
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-c", "--config", default=str(DEFAULT_CONFIG))
    ap.add_argument("-n", type=int, default=256, help="images per path and round")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the median round's ratios are reported")
    ap.add_argument("--scheduler", choices=["local", "dask"], default="local",
                    help="dask: also run the pipeline on a Dask LocalCluster (compute.scheduler: dask)")
    ap.add_argument("--workers", type=int, default=2, help="--scheduler dask: single-threaded worker processes")
    args = ap.parse_args(argv)
    targets = dict(TARGETS, **({"dask_vs_in_process": 0.9} if args.scheduler == "dask" else {}))

    cfg = load_config(args.config) if Path(args.config).exists() else parse_config({})

    load_before = os.getloadavg()
    manifest, collection = demo_images(cfg, args.n)
    n = len(manifest)
    paths = manifest["path"].tolist()
    weights = cfg.backbone.weights
    cache_dir = cfg.models_dir / "backbones"
    t = time.perf_counter()
    bb_keras = get_backbone(cfg.backbone.name, weights=weights, cache_dir=cache_dir, runtime="keras")
    keras_load_s = time.perf_counter() - t
    t = time.perf_counter()
    bb_lite = get_backbone(cfg.backbone.name, weights=weights, cache_dir=cache_dir, runtime="tflite")
    lite_load_s = time.perf_counter() - t
    t = time.perf_counter()
    bb_int8 = int8_backbone(bb_lite, cache_dir, *calibration_sample(collection),
                            max_pixels=cfg.dataset.max_image_pixels)
    int8_load_s = time.perf_counter() - t
    bs, size, mp = cfg.backbone.batch_size, bb_keras.input_size, cfg.dataset.max_image_pixels
    workers = cfg.backbone.workers or os.cpu_count()
    print(f"{bb_keras.name}: {n} images from {manifest.attrs['source']}, batch {bs}, {workers} decode threads, "
          f"{os.cpu_count()} CPU cores; Keras ready in {keras_load_s:.1f} s, TensorFlow Lite in {lite_load_s:.1f} s "
          f"({bb_lite.runtime_note}), int8 in {int8_load_s:.1f} s ({bb_int8.runtime_note})")

    decoded = np.stack([load_for_model(p, size, max_pixels=mp) for p in paths])
    for bb in (bb_keras, bb_lite, bb_int8):  # warm-up: trace / allocate for both batch shapes, outside every timing
        bb.embed(decoded[:bs])
        bb.embed(decoded[: n % bs or bs])

    def model_alone(bb):
        for i in range(0, n, bs):
            bb.embed(decoded[i:i + bs])

    vectors = {}

    def pipeline(bb, tag):
        with tempfile.TemporaryDirectory() as tmp:
            data = cfg.to_dict()
            data["backbone"]["runtime"] = bb.runtime
            data["backbone"]["precision"] = bb.precision
            data["paths"] = {"data": tmp, "models": str(cfg.models_dir), "reports": str(cfg.reports_dir)}
            c = parse_config(data, base_dir=cfg.base_dir)
            fs = extract(c, progress=False, manifest=manifest, backbone=bb)
        if fs.stats["computed"] != n - fs.stats["skipped"]:
            raise SystemExit(f"pipeline {tag} computed {fs.stats['computed']} of {n}: {fs.stats}")
        vectors[tag] = fs.vectors

    dask_info = {}
    cluster = client = None
    if args.scheduler == "dask":
        from distributed import Client, LocalCluster

        t = time.perf_counter()
        cluster = LocalCluster(n_workers=args.workers, threads_per_worker=1, processes=True, dashboard_address=":0")
        client = Client(cluster)
        dask_info["cluster_start_s"] = round(time.perf_counter() - t, 2)
        print(f"Dask LocalCluster: {args.workers} workers x 1 thread, dashboard {client.dashboard_link}")

    def pipeline_dask(tag="dask", rows=None):
        with tempfile.TemporaryDirectory() as tmp:
            data = cfg.to_dict()
            data["backbone"]["runtime"] = "tflite"
            data["compute"] = {"scheduler": "dask", "dask": {"address": cluster.scheduler_address,
                                                             "partition_size": bs}}
            data["paths"] = {"data": tmp, "models": str(cfg.models_dir), "reports": str(cfg.reports_dir)}
            c = parse_config(data, base_dir=cfg.base_dir)
            m = manifest if rows is None else manifest.iloc[rows]
            fs = extract(c, progress=False, manifest=m, on_batch=None)
        if rows is None:
            if fs.stats["computed"] != n - fs.stats["skipped"]:
                raise SystemExit(f"pipeline {tag} computed {fs.stats['computed']} of {n}: {fs.stats}")
            vectors[tag] = fs.vectors

    if client is not None:  # warm-up: each worker loads the backbone once (a module-level cache), outside the timings
        t = time.perf_counter()
        pipeline_dask(rows=slice(0, bs * args.workers * 2))
        dask_info["first_load_and_warm_up_s"] = round(time.perf_counter() - t, 2)

    def decode_alone():
        for _ in iter_batches(paths, size, bs, workers=cfg.backbone.workers, max_pixels=mp):
            pass

    runs = {
        "tf.function alone": lambda: model_alone(bb_keras),
        "TensorFlow Lite alone": lambda: model_alone(bb_lite),
        "pipeline, tf.function": lambda: pipeline(bb_keras, "keras"),
        "pipeline, TensorFlow Lite": lambda: pipeline(bb_lite, "tflite"),
        "int8 alone": lambda: model_alone(bb_int8),
        "pipeline, int8": lambda: pipeline(bb_int8, "int8"),
        "decode alone": decode_alone,
    }
    dask_name = f"pipeline, Dask {args.workers}x1 thread"
    if client is not None:
        runs[dask_name] = pipeline_dask
    names = list(runs)

    def print_round(r, wall, cpu):
        print(f"round {r + 1}: " + ", ".join(f"{k} {n / wall[k][-1]:.1f}" for k in names) + " images/s", flush=True)

    wall, cpu = interleaved_rounds(runs, args.rounds, rotate=True, after_round=print_round)
    ips = {k: [n / t for t in v] for k, v in wall.items()}
    # this process's CPU time (all threads) per image: less disturbed by others
    cpu_ms = {k: [c / n * 1e3 for c in v] for k, v in cpu.items()}

    def ratio(a, b):
        return round_ratio(ips[a], ips[b])

    ratios = {
        "pipeline_vs_todays_pipeline": ratio("pipeline, TensorFlow Lite", "pipeline, tf.function"),
        "pipeline_vs_runtime_alone": ratio("pipeline, TensorFlow Lite", "TensorFlow Lite alone"),
        "runtime_vs_tf_function": ratio("TensorFlow Lite alone", "tf.function alone"),
        "todays_pipeline_vs_tf_function": ratio("pipeline, tf.function", "tf.function alone"),
        "int8_pipeline_vs_float32_pipeline": ratio("pipeline, int8", "pipeline, TensorFlow Lite"),
        "int8_pipeline_vs_int8_runtime_alone": ratio("pipeline, int8", "int8 alone"),
        "int8_runtime_vs_float32_runtime": ratio("int8 alone", "TensorFlow Lite alone"),
    }
    if client is not None:
        ratios["dask_vs_in_process"] = ratio(dask_name, "pipeline, TensorFlow Lite")
        dask_info["min_cosine_dask_vs_in_process"] = round(min_cosine(vectors["dask"], vectors["tflite"]), 7)
        dask_info["workers"] = args.workers
        client.close()
        cluster.close()
    profile = stage_profile(paths, size)
    cos = min_cosine(vectors["tflite"], vectors["keras"])
    int8_cos = (vectors["int8"].astype(np.float64) * vectors["tflite"]).sum(1)
    cold = cold_starts(cfg, args.rounds)
    load_after = os.getloadavg()
    disturbed = max(load_before[0], load_after[0]) > (os.cpu_count() or 1)
    result = {
        "backbone": bb_keras.name,
        "images": n,
        "images_source": manifest.attrs["source"],
        "batch_size": bs,
        "decode_threads": workers,
        "tflite_threads": bb_lite.runner.threads,
        "cpu_cores": os.cpu_count(),
        "cpu": platform.processor() or platform.machine(),
        "rounds": args.rounds,
        "images_per_s_median": {k: round(statistics.median(v), 2) for k, v in ips.items()},
        "images_per_s_per_round": {k: [round(x, 2) for x in v] for k, v in ips.items()},
        "cpu_ms_per_image_median": {k: round(statistics.median(v), 2) for k, v in cpu_ms.items()},
        "ratios": ratios,
        "targets": targets,
        "passed": {k: ratios[k]["median"] >= v for k, v in targets.items()},
        "dask": dask_info or None,
        "decode_profile_ms_per_image_one_thread_cpu": profile,
        "min_cosine_pipeline_tflite_vs_tf_function": round(cos, 7),
        "int8_cosine_to_float32": {"median": round(float(np.median(int8_cos)), 4), "min": round(float(int8_cos.min()), 4)},
        "int8_model": bb_int8.runtime_note,
        "search_cold_start": cold,
        "cold_start_targets": COLD_START_TARGETS,
        "tflite_min_cosine_probe_images": bb_lite.runner.min_cosine,
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "backbone_load_s": {"keras": round(keras_load_s, 2), "tflite": round(lite_load_s, 2)},
        "load_average_1min": [round(load_before[0], 2), round(load_after[0], 2)],
        "disturbed": disturbed,
    }
    med = result["images_per_s_median"]
    cpu_med = result["cpu_ms_per_image_median"]
    rows = [(k, med[k], cpu_med[k], ", ".join(f"{x:.1f}" for x in ips[k])) for k in names]
    pf = ", ".join(f"{k} {v}" for k, v in profile.items() if k != "total")
    md = [f"# Feature extraction benchmark ({bb_keras.name})", "",
          f"{n} images ({manifest.attrs['source']}), batch {bs}, {workers} decode threads, "
          f"{result['tflite_threads']} TensorFlow Lite threads, {os.cpu_count()} CPU cores, no GPU; "
          f"{args.rounds} interleaved rounds.", "",
          "| path | images/s (median) | CPU ms per image | images/s per round |", "|---|---:|---:|---|"]
    md += [f"| {a} | {b:.1f} | {c:.2f} | {d} |" for a, b, c, d in rows]
    md += ["", "Ratios within a round (median [min, max] over rounds):", ""]
    for k, v in ratios.items():
        target = f" (target >= {targets[k]}: {'PASS' if result['passed'][k] else 'FAIL'})" if k in targets else ""
        md.append(f"- {k.replace('_', ' ')}: **{v['median']}x** [{v['min']}, {v['max']}]{target}")
    md += ["",
           f"- where one thread's time goes per image (CPU ms): {pf}; total {profile['total']} ms "
           f"against {cpu_med['TensorFlow Lite alone']:.2f} CPU ms for the TensorFlow Lite model",
           f"- pipeline vectors, TensorFlow Lite vs tf.function: minimum cosine {cos:.7f}; int8 vs float32: median "
           f"{result['int8_cosine_to_float32']['median']}, min {result['int8_cosine_to_float32']['min']} "
           f"({bb_int8.runtime_note})",
           *[f"- `visualsearch search` cold start, {p}: " + (f"{c['seconds_median']} s, {c['peak_rss_mb_median']} MB peak "
             f"RSS (median of {len(c['seconds'])}; target <= {COLD_START_TARGETS['seconds']} s and "
             f"{COLD_START_TARGETS['peak_rss_mb']} MB: {'PASS' if c['passed'] else 'FAIL'})" if 'seconds' in c else c['skipped'])
             for p, c in cold.items()],
           f"- peak RSS: {result['peak_rss_mb']} MB",
           *([f"- Dask: LocalCluster of {args.workers} single-threaded workers started in "
              f"{dask_info['cluster_start_s']} s, first backbone load and warm-up {dask_info['first_load_and_warm_up_s']} s "
              f"(outside the timings); vectors vs in-process: minimum cosine {dask_info['min_cosine_dask_vs_in_process']}"]
             if dask_info else []),
           f"- 1-minute load average before/after: {result['load_average_1min']}"
           + (f" (above {os.cpu_count()} cores: other processes shared the machine; images/s are disturbed, "
              "the within-round ratios less so)" if disturbed else ""), ""]
    text = "\n".join(md)
    print()
    print(text)
    json_path, md_path = write_report(cfg.reports_dir / "benchmarks", "extract", result, text)
    print(f"wrote {json_path} and {md_path}")
    return result


if __name__ == "__main__":
    main()
