"""Feature vectors of every manifest image, computed once and cached on disk.

``visualsearch extract -c application.yaml`` runs :func:`extract`:

* images are decoded and resized in a thread pool a few batches ahead of the model, which
  runs batched on the backbone's runtime (:func:`vslib.embedding.iter_batches`);
* each finished batch is written at once as a new shard of the feature cache
  (:class:`vslib.feature_cache.FeatureCache`), keyed by image content hash. A run that is
  killed keeps every finished batch; a rerun computes only the hashes no shard holds.
  ``features_dir`` is per backbone and every shard records the backbone (and its weights),
  so vectors of different backbones never mix. The runtime is not part of the key: a
  runtime is used only if its vectors agree with the Keras model's to cosine
  >= 0.9999, so shards computed on either serve both. The precision is: int8 vectors
  (``backbone.precision: int8``, :mod:`vslib.int8`) live in their own ``features_dir``
  and their shards record the calibrated model's key too;
* with ``compute.scheduler: dask`` the images still to compute are cut into
  partitions that run as tasks on a Dask cluster (:mod:`vslib.compute`); each
  finished partition is written as a shard the same way;
* the result, vectors plus the manifest rows they belong to (path, label,
  split, content_hash), is written to the feature file
  ``<features_dir>/features-<dataset>.npz``, streamed chunk by chunk, and read back by
  the readers of :mod:`vslib.features`.

What is checked at extraction (:mod:`vslib.integrity`; designed for 100M images, where a shard or
the feature file is ~0.5 TB and a CRC pass costs what reading it costs): ``extract`` reads every shard
whole anyway (it merges them and streams every vector into the feature file), so it checks every
shard's CRC on opening the cache (``FeatureCache(full=True)``), and the vectors of a shard without a
checksum (an older version's); a damaged shard is set aside and its images count as not cached, so this
run computes exactly those again. An existing feature file that fails its check is set aside before it
is rewritten.

Images that fail to load are counted as skipped and listed with their reasons.
A run holds the lock of ``features_dir`` (:mod:`vslib.locks`): a second run at the
same time waits for it, then finds everything computed.
"""
from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import pandas as pd

from vslib import npzfile
from vslib.backbones import (BACKBONES, backbone_from_config, config_vector_key, config_weights, get_backbone,
                              lite_backbone)
from vslib.compute import map_partitions, worker_threads
from vslib.datasets import load_manifest
from vslib.embedding import iter_batches
from vslib.errors import VisualSearchError
from vslib.feature_cache import SHARDS_DIR, FeatureCache, hash_keys
from vslib.features import FULL_CHECK_BYTES, TABLE_COLUMNS, FeatureSet, features_path
from vslib.integrity import DamagedFile, set_aside
from vslib.locks import locked
from vslib.npzfile import npz_member, save_npz_streamed, text_member, verify_file
from vslib.runtime import TFLiteRunner

log = logging.getLogger("vslib.features")  # the feature store's logger: its warning lines read as they always did


class RowValues(Sequence):
    """The values of ``column`` at ``rows``, made into Python objects only when asked, a slice at a time
    (a list of every image's path would grow with the collection)."""

    def __init__(self, column: pd.Series, rows: np.ndarray):
        self.column, self.rows = column, np.asarray(rows, np.int64)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return self.column.iloc[self.rows[i]].tolist()
        return self.column.iloc[int(self.rows[i])]

    def __iter__(self):
        for s in range(0, len(self.rows), npzfile.STREAM_ROWS):
            yield from self[s:s + npzfile.STREAM_ROWS]


def _progress(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="img", disable=not enabled, smoothing=0.1, dynamic_ncols=True)


@locked(lambda cfg: cfg.features_dir, lambda cfg: f"the {cfg.backbone.name} feature cache {cfg.features_dir}")
def extract(cfg, *, progress: bool = True, manifest: Optional[pd.DataFrame] = None,
            on_batch: Optional[Callable[[int, int], None]] = None, backbone=None) -> FeatureSet:
    """Vectors of every usable manifest image, computing only what the cache lacks.

    Parameters
    ----------
    cfg : Config
    progress : bool
        Show a progress bar (images/s).
    manifest : DataFrame, optional
        Rows to embed (default: :func:`vslib.datasets.load_manifest`).
    on_batch : callable, optional
        Called as ``on_batch(batches_done, images_done)`` after each batch (with
        ``compute.scheduler: dask``, each partition) is safely on disk.
    backbone : Backbone, optional
        Default: :func:`vslib.backbones.backbone_from_config`. Given, it runs
        here, in this process, whatever ``compute.scheduler`` says.

    Returns
    -------
    FeatureSet
        Also written to :func:`vslib.features.features_path`; ``stats`` holds
        the figures of this run and ``skipped`` the images that failed to load.
    """
    t0 = time.perf_counter()
    if manifest is None:
        manifest = load_manifest(cfg, columns=TABLE_COLUMNS)  # the rest (sizes, checks) is not needed here
    if "status" in manifest.columns:
        manifest = manifest[manifest["status"] == "ok"]
    manifest = manifest.reset_index(drop=True)
    missing_cols = [c for c in TABLE_COLUMNS if c not in manifest.columns]
    if missing_cols:
        raise VisualSearchError(f"manifest lacks columns {missing_cols}; run `visualsearch data prepare "
                                f"-c {cfg.source} --force`")
    name = backbone.name if backbone is not None else cfg.backbone.name
    if name != cfg.backbone.name:
        raise VisualSearchError(f"backbone {name!r} given but the config names {cfg.backbone.name!r}")
    key = backbone_key(backbone) if backbone is not None else config_vector_key(cfg)
    cache = FeatureCache(cfg.features_dir / SHARDS_DIR, name, key, full=True)

    # one representative file (its first row) per content hash still to compute; per-image data stays in
    # NumPy arrays and the manifest's own columns, not in Python lists of str (issue 17: the client's memory)
    keys = hash_keys(manifest["content_hash"])
    first = np.sort(np.unique(keys, return_index=True)[1])
    todo_rows = first[~cache.contains(keys[first])]
    todo = keys[todo_rows]
    reused = len(first) - len(todo)
    on_dask = getattr(cfg, "compute", None) is not None and cfg.compute.scheduler == "dask" and backbone is None
    # build the model (seconds: TensorFlow) only when there is something to compute here
    bb = backbone
    if bb is None and len(todo) and (not on_dask or cfg.backbone.precision == "int8"):
        bb = backbone_from_config(cfg)  # on Dask: converts the int8 model once, here, for the workers to load
    if bb is not None and backbone_key(bb) != key:
        raise VisualSearchError(f"backbone vectors {backbone_key(bb)} differ from the configured {key}")
    failed_hashes: dict[str, str] = {}
    computed = 0
    bs = cfg.backbone.batch_size
    bar = _progress(len(todo), f"extract {cfg.backbone_tag}", progress)
    if reused:
        bar.set_postfix(reused=reused)
    batches = 0

    def store(pos, vecs, failed):  # one finished batch (or Dask partition): on disk at once
        nonlocal computed, batches
        for i, reason in failed:
            failed_hashes[todo[i].decode()] = reason
        if pos:
            cache.add(todo[np.asarray(pos)], vecs, RowValues(manifest["path"], todo_rows[np.asarray(pos)]))
            computed += len(pos)
        batches += 1
        bar.update(len(pos) + len(failed))
        if on_batch is not None:
            on_batch(batches, computed)

    try:
        sources = RowValues(manifest["path"], todo_rows)
        size = bb.input_size if bb is not None else BACKBONES[name]["input_size"]
        if on_dask and len(todo):
            extract_on_dask(cfg, sources, key, store, announce=bar.write if progress else None)
            sources = []  # done: skip the in-process loop below
        for pos, batch, failed in iter_batches(sources, size, bs, workers=cfg.backbone.workers,
                                               max_pixels=cfg.dataset.max_image_pixels):
            store(pos, bb.embed(batch) if pos else None, failed)
    finally:
        bar.close()
    if computed or cache.foreign or cache.damaged:
        cache.compact()

    codes = cache.codes(keys)
    ok = codes >= 0
    if ok.all():
        table = manifest[list(TABLE_COLUMNS)]
    else:
        table, codes = manifest.loc[ok, list(TABLE_COLUMNS)].reset_index(drop=True), codes[ok]
    dim = cache.dim or BACKBONES[name]["dim"]
    step = npzfile.STREAM_ROWS
    chunks = (cache.rows(codes[i:i + step]) for i in range(0, len(codes), step))  # rows checked
    columns = {c: text_member(table[c]) for c in TABLE_COLUMNS}  # made chunk by chunk as written
    _set_aside_damaged_file(features_path(cfg))  # rewritten below in any case; a damaged one is kept for a look
    path = save_npz_streamed(features_path(cfg), dict(backbone=np.array(name), **columns),
                             "vectors", (len(table), dim), chunks)
    skipped_rows = manifest.loc[~ok, ["path", "content_hash"]].copy()
    skipped_rows["reason"] = skipped_rows["content_hash"].map(failed_hashes).fillna("not computed")
    skipped = skipped_rows[["path", "reason"]].reset_index(drop=True)
    seconds = time.perf_counter() - t0
    stats = dict(backbone=name, images=len(manifest), computed=computed, reused=reused,
                 skipped=len(skipped), seconds=round(seconds, 3),
                 images_per_s=round(computed / seconds, 2) if computed else None)
    vectors = npz_member(path, "vectors", "c")  # mapped, copy-on-write: no copy held here
    if not vectors.flags.aligned:  # (written aligned; in case) numeric libraries want aligned data
        vectors = np.array(vectors)
    fs = FeatureSet(vectors, table, name, stats, skipped)
    log.info(summary(fs))
    return fs


def _set_aside_damaged_file(path: Path) -> None:
    """Before :func:`extract` rewrites the feature file: one warning line and ``*.damaged`` if it is damaged (a
    cheap check; a file without a checksum, or one whose checksum file is left alone, is simply replaced)."""
    if not path.exists():
        return
    try:
        verify_file(path, full=path.stat().st_size <= FULL_CHECK_BYTES, redo="")
    except DamagedFile as e:
        moved = set_aside(path)
        log.warning("%s: damaged feature file (%s); set aside as %s, rewritten from the feature cache by this run",
                    path, e.reason, moved.name if moved else "-")
    except OSError:
        pass


def summary(fs: FeatureSet, limit: int = 5) -> str:
    """One line of figures, then the skipped images with reasons."""
    s = fs.stats
    line = (f"extract {s.get('backbone', fs.backbone)}: {s.get('images', len(fs))} images, "
            f"{s.get('computed', 0)} computed, {s.get('reused', 0)} reused from cache, "
            f"{s.get('skipped', 0)} skipped, {s.get('seconds', 0):.1f} s")
    if len(fs.skipped):
        lines = [f"  skipped {r.path}: {r.reason}" for r in fs.skipped.head(limit).itertuples()]
        if len(fs.skipped) > limit:
            lines.append(f"  ... and {len(fs.skipped) - limit} more")
        line += "\n" + "\n".join(lines)
    return line


def backbone_key(bb) -> str:
    """Identity of a backbone's vectors (its weights; for int8 also the calibrated model), stored in every shard."""
    return getattr(bb, "vector_key", "") or f"{bb.name}:{Path(bb.weights).name if bb.weights else ''}"


# ---------------------------------------------------------------------------
# On a Dask cluster (compute.scheduler: dask)


#: backbones loaded in this process, keyed by (name, weights, cache_dir, runtime, threads)
_BACKBONES: dict[tuple, object] = {}
_BACKBONES_LOCK = threading.Lock()


def worker_backbone(spec: dict, threads: int):
    """The backbone ``spec`` names, built once per process, with ``threads`` TensorFlow (Lite) threads."""
    key = (spec["name"], spec["weights"], spec["cache_dir"], spec["runtime"], spec.get("precision"),
           spec.get("int8_key"), threads)
    with _BACKBONES_LOCK:
        bb = _BACKBONES.get(key)
        if bb is None:
            bb = _BACKBONES[key] = _load_backbone(spec, threads)
    return bb


def _load_backbone(spec: dict, threads: int):
    precision = spec.get("precision", "float32")
    if precision == "int8" or spec["runtime"] != "keras":  # the verified model, without TensorFlow
        bb = lite_backbone(spec["name"], spec["weights"], spec["cache_dir"], precision=precision,
                           int8_key=spec.get("int8_key", ""), threads=threads)
        if bb is not None:
            return _same_vectors(bb, spec)
        if precision == "int8":
            raise VisualSearchError(f"this worker finds no verified int8 model {spec['int8_key']} of {spec['name']} "
                                    f"in {spec['cache_dir']}: the workers need the client's models folder")
    import tensorflow as tf

    try:  # only possible before TensorFlow starts its thread pools, i.e. in a fresh worker process
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(threads)
    except RuntimeError as e:
        log.debug("TensorFlow threads already set in this process: %s", e)
    bb = get_backbone(spec["name"], weights=spec["weights"], cache_dir=spec["cache_dir"], runtime=spec["runtime"])
    runner = bb.runner
    if runner is not None and runner.threads != threads:
        new = TFLiteRunner(runner.path, threads)
        new.min_cosine = runner.min_cosine
        bb = bb.with_runner(new, f"{bb.runtime_note} ({threads} threads on this worker)")
    return _same_vectors(bb, spec)


def _same_vectors(bb, spec: dict):
    if bb.vector_key != spec["key"]:
        raise VisualSearchError(f"this worker's {bb.name} vectors are {bb.vector_key}, the client's {spec['key']}: "
                                "install the same visualsearch version and weights on every worker")
    return bb


def embed_partition(spec: dict, sources: Sequence[str]) -> tuple[list[int], np.ndarray, list[tuple[int, str]]]:
    """One task: vectors of the images ``sources`` (paths) with the backbone of ``spec``.

    Each worker loads the backbone **once** (:func:`worker_backbone`: keyed by backbone, weights and
    runtime) and sizes TensorFlow's and TensorFlow Lite's threads to the worker's own thread count
    (:func:`vslib.compute.worker_threads`). Returns ``(positions, vectors, failures)``: the positions
    in ``sources`` of the images embedded, their float32 vectors row for row, and ``(position,
    reason)`` of those that could not be loaded.
    """
    threads = worker_threads()
    bb = worker_backbone(spec, threads)
    positions, chunks, failures = [], [], []
    for pos, batch, failed in iter_batches(list(sources), bb.input_size, spec["batch_size"], workers=threads,
                                           max_pixels=spec["max_pixels"]):
        failures.extend(failed)
        if pos:
            positions.extend(pos)
            chunks.append(bb.embed(batch))
    vectors = np.concatenate(chunks) if chunks else np.zeros((0, bb.dim), np.float32)
    return positions, vectors.astype(np.float32, copy=False), failures


def extract_on_dask(cfg, sources: Sequence[str], key: str,
                    on_partition: Callable[[list[int], np.ndarray, list[tuple[int, str]]], None],
                    *, announce: Optional[Callable[[str], None]] = None) -> None:
    """Embed ``sources`` (paths) on the cluster of ``cfg``, partition by partition.

    The images are cut into partitions of ``compute.dask.partition_size``, each one task
    (:func:`embed_partition`: decode, resize, backbone) on a worker (:func:`vslib.compute.map_partitions`).
    ``on_partition(positions, vectors, failures)`` is called on the client as
    each partition finishes, with positions into ``sources``; it should store
    them at once (the caller writes a shard).
    """
    size = cfg.compute.dask.partition_size
    spec = dict(name=cfg.backbone.name, weights=config_weights(cfg), cache_dir=str(cfg.models_dir / "backbones"),
                runtime=cfg.backbone.runtime, key=key, batch_size=cfg.backbone.batch_size,
                precision=cfg.backbone.precision, int8_key=key.rpartition(":int8-")[2] if ":int8-" in key else "",
                max_pixels=cfg.dataset.max_image_pixels)

    def done(s: int, e: int, result) -> None:
        pos, vecs, failures = result
        on_partition([s + i for i in pos], vecs, [(s + i, r) for i, r in failures])

    def killed(s: int, e: int, error: Exception) -> str:
        return (f"the partition of images {s}..{e - 1} (first {sources[s]}) was running on each of the workers "
                f"that died ({error}); look at the worker logs (out of memory? lower compute.dask.partition_size "
                "or backbone.batch_size), then run again: finished partitions are kept")

    map_partitions(cfg, embed_partition, len(sources), size, lambda s, e: (spec, sources[s:e]), done,
                   key=lambda s: f"embed-partition-{s // size}", readable=sources, killed=killed, announce=announce)
