"""int8 backbones: full-integer TensorFlow Lite, calibrated on the collection, checked against float32.

``backbone.precision: int8`` runs the backbone as a post-training full-integer
model on the same XNNPACK path as float32, about 2.5x faster on a CPU (see the
README's precision table). Each network is converted once per collection:

Calibration
    The converter sets each layer's int8 range from a *representative sample*:
    :data:`CALIBRATION_IMAGES` images of the index split (never a query),
    taken round-robin over the classes in content-hash order, so the sample is
    the same on every machine and run, covers every class of a small collection
    and does not move when files are renamed or listed in another order. 128 is
    past the ~100 images the TensorFlow Lite guide asks for; measured here,
    doubling it changed no figure of the check below.
Fidelity
    The next :data:`PROBE_IMAGES` images of that order (not used to calibrate)
    are embedded by both precisions. The model is accepted only if the median
    cosine between the two reaches :data:`MIN_MEDIAN_COSINE` and each probe's
    nearest neighbour among the calibration and probe images is the same one
    under both precisions for at least :data:`MIN_NEIGHBOUR_AGREEMENT` of the
    probes; else :class:`~vslib.errors.BackboneError` names both figures (and
    the verdict is cached, so the next run refuses without converting again).
Identity
    ``<cache_dir>/<backbone>-int8-<key>.tflite``, where ``key`` hashes the
    weights, the calibration sample's content hashes, the converter's version
    and this module's format: a new collection or converter converts again, an
    unchanged one never does. Beside it, ``.check.npz`` keeps the figures, the
    file's checksum and a few probe images with their int8 vectors, re-run at
    every load. The key is computed from the manifest alone, so a query loads
    the model with the TensorFlow Lite interpreter (``ai-edge-litert``) and never
    imports TensorFlow.

The int8 graph ends at the pooled features; they are L2-normalised in float
after it (the converter would quantise ``L2_NORMALIZATION`` to int8 too).
Vectors of the two precisions never mix: the feature cache, the classifier and
the index of int8 live in their own folders (``Config.backbone_tag``), and a
classifier records the key of the vectors it was trained on.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import tempfile
import warnings
from importlib import metadata
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import pandas as pd

from vslib import runtime as rt
from vslib.atomic import atomic_write_bytes
from vslib.errors import BackboneError

log = logging.getLogger(__name__)

#: representative images the converter calibrates the int8 ranges on
CALIBRATION_IMAGES = 128
#: held-out images the fidelity check compares the two precisions on
PROBE_IMAGES = 64
#: fewest index images a collection needs for an int8 model (calibration plus probes)
MIN_IMAGES = 24
#: floor on the median cosine between int8 and float32 vectors of the probe images
MIN_MEDIAN_COSINE = 0.97
#: floor on the share of probes whose nearest neighbour is the same under both precisions
MIN_NEIGHBOUR_AGREEMENT = 0.75
#: probe images (with their int8 vectors) re-run at each load
LOAD_PROBES = 8
#: bump when the int8 graph or the calibration rule changes meaning
FORMAT_VERSION = 1


# ---------------------------------------------------------------------------
# The sample


def calibration_sample(manifest: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``(calibration, probes)``: rows of ``manifest``'s index split, each image once, in a fixed order.

    The order is round-robin over the labels, each label's images in content-hash
    order: the first :data:`CALIBRATION_IMAGES` calibrate, the next
    :data:`PROBE_IMAGES` check. A collection smaller than that keeps a third (at
    least 8) for the probes.
    """
    rows = manifest
    if "status" in rows.columns:
        rows = rows[rows["status"] == "ok"]
    if "split" in rows.columns:
        rows = rows[rows["split"] == "index"]
    rows = rows.drop_duplicates("content_hash").sort_values(["label", "content_hash"], kind="stable")
    if len(rows) < MIN_IMAGES:
        raise BackboneError(f"backbone.precision int8 calibrates on the index split, which holds {len(rows)} "
                            f"usable images; it needs at least {MIN_IMAGES}. Use backbone.precision float32")
    turn = rows.groupby("label", sort=False).cumcount()
    rows = rows.assign(_turn=turn.to_numpy()).sort_values(["_turn", "content_hash"], kind="stable")
    rows = rows.drop(columns="_turn").reset_index(drop=True)
    n_probe = min(PROBE_IMAGES, max(8, len(rows) // 3))
    n_cal = min(CALIBRATION_IMAGES, len(rows) - n_probe)
    return rows.iloc[:n_cal], rows.iloc[n_cal:n_cal + n_probe]


def converter_version() -> str:
    """The installed TensorFlow's version (read from its metadata: nothing is imported)."""
    for dist in ("tensorflow", "tensorflow-cpu"):
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return "none"


def model_key(weights_key: str, calibration: pd.DataFrame) -> str:
    """16 hex digits naming the int8 model of weights ``weights_key`` calibrated on ``calibration``."""
    h = hashlib.sha256(json.dumps([FORMAT_VERSION, rt.FORMAT_VERSION, weights_key, converter_version(),
                                   calibration["content_hash"].astype(str).tolist()]).encode())
    return h.hexdigest()[:16]


def vector_key(weights_key: str, key: str) -> str:
    """What the feature cache and the classifier record for vectors of this int8 model."""
    return f"{weights_key}:int8-{key}"


def model_paths(cache_dir, name: str, key: str) -> tuple[Path, Path]:
    base = Path(cache_dir) / f"{name}-int8-{key}"
    return base.with_suffix(".tflite"), base.with_suffix(".check.npz")


# ---------------------------------------------------------------------------
# Conversion


@contextlib.contextmanager
def _quiet_stderr():
    """Hold back what TensorFlow's C++ code writes to file descriptor 2 (the converter's lines); shown on error."""
    with tempfile.TemporaryFile() as held:
        saved = os.dup(2)
        os.dup2(held.fileno(), 2)
        try:
            yield held
        except BaseException:
            os.dup2(saved, 2)
            held.seek(0)
            tail = held.read()[-2000:].decode("utf-8", "replace").strip()
            if tail:
                log.debug("converter output:\n%s", tail)
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def convert(bb, calibration: np.ndarray) -> bytes:
    """The full-integer flatbuffer of ``bb``: uint8 pixels -> preprocessing -> int8 network -> pooled features.

    ``calibration`` holds uint8 images at ``bb.input_size``. Every operator is
    int8 (``TFLITE_BUILTINS_INT8``): XNNPACK runs the whole graph in integers.
    """
    import tensorflow as tf

    model, preprocess, s = bb.keras_model, bb.preprocess_fn, bb.input_size

    @tf.function(input_signature=[tf.TensorSpec([None, s, s, 3], tf.uint8, name="pixels")])
    def features(pixels):
        return model(preprocess(tf.cast(pixels, tf.float32)), training=False)

    def representative():
        for image in calibration:
            yield [image[None]]

    converter = tf.lite.TFLiteConverter.from_concrete_functions([features.get_concrete_function()], model)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = representative
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    with warnings.catch_warnings(), _quiet_stderr():
        warnings.simplefilter("ignore")
        return converter.convert()


def fidelity(reference: np.ndarray, got: np.ndarray, probes: slice) -> dict:
    """Figures comparing int8 vectors ``got`` with float32 ``reference`` (rows: calibration, then probes).

    ``median_cosine`` and ``min_cosine`` over the probe rows; ``neighbour_agreement``:
    the share of probes whose nearest other row is the same under both.
    """
    reference, got = np.asarray(reference, np.float64), np.asarray(got, np.float64)
    cos = (reference[probes] * got[probes]).sum(1) / (
        np.linalg.norm(reference[probes], axis=1) * np.linalg.norm(got[probes], axis=1))

    def nearest(v):
        sims = v[probes] @ v.T
        rows = np.arange(len(v))[probes]
        sims[np.arange(len(rows)), rows] = -np.inf  # not itself
        return sims.argmax(1)

    agree = float((nearest(reference) == nearest(got)).mean())
    return {"median_cosine": round(float(np.median(cos)), 6), "min_cosine": round(float(cos.min()), 6),
            "neighbour_agreement": round(agree, 4), "probes": int(len(cos))}


def passes(figures: dict) -> bool:
    return (figures["median_cosine"] >= MIN_MEDIAN_COSINE
            and figures["neighbour_agreement"] >= MIN_NEIGHBOUR_AGREEMENT)


def refusal(name: str, figures: dict) -> str:
    return (f"{name}: the int8 model is refused: on {figures['probes']} probe images its vectors have median "
            f"cosine {figures['median_cosine']:.4f} to float32 (floor {MIN_MEDIAN_COSINE}) and "
            f"{figures['neighbour_agreement']:.0%} of nearest neighbours agree (floor {MIN_NEIGHBOUR_AGREEMENT:.0%}). "
            "Set backbone.precision: float32")


def describe(figures: dict) -> str:
    return (f"TensorFlow Lite int8, median cosine {figures['median_cosine']:.4f} (min {figures['min_cosine']:.4f}) "
            f"to float32, {figures['neighbour_agreement']:.0%} of nearest neighbours the same")


# ---------------------------------------------------------------------------
# Loading


def open_model(cache_dir, name: str, key: str, threads: Optional[int] = None) -> tuple[rt.TFLiteRunner, dict]:
    """The cached int8 model ``key`` of ``name`` and its figures, checked (no TensorFlow needed).

    Raises
    ------
    FileNotFoundError
        If it was never converted (or its files are gone).
    ValueError
        If a file is damaged or no longer gives the vectors it gave (convert again).
    BackboneError
        If the model was refused when it was converted.
    """
    path, check_path = model_paths(cache_dir, name, key)
    probes, reference, verdict = rt.read_check(check_path)
    figures = verdict["figures"]
    if not verdict.get("accepted"):
        if passes(figures):  # refused under stricter floors than today's: convert again
            raise FileNotFoundError(path)
        raise BackboneError(refusal(name, figures))
    runner = rt.open_checked(path, verdict, threads, normalise=True)
    ok, cos = rt._check(runner, probes, reference, rt.MIN_COSINE)
    if not ok:
        raise ValueError(f"its probe images give other vectors than at conversion (cosine {cos:.6f})")
    runner.min_cosine = figures["min_cosine"]
    return runner, figures


def load(bb, cache_dir, key: str, calibration: pd.DataFrame, probes: pd.DataFrame,
         read: Callable[[list], np.ndarray], threads: Optional[int] = None) -> tuple[rt.TFLiteRunner, dict]:
    """The int8 model of the float32 backbone ``bb``, converting it (once) when the cache lacks it.

    ``read(paths)`` returns uint8 images of ``bb.input_size``.

    Raises
    ------
    BackboneError
        If the conversion fails or the model fails the fidelity check (the
        message gives the figures; the refusal is cached).
    """
    try:
        return open_model(cache_dir, bb.name, key, threads)
    except FileNotFoundError:
        pass
    except (OSError, ValueError, KeyError) as e:
        log.warning("%s: cached int8 model unusable (%s); converting again", bb.name, e)

    path, check_path = model_paths(cache_dir, bb.name, key)
    log.info("%s: converting to int8 TensorFlow Lite, calibrated on %d images (once; cached in %s)",
             bb.name, len(calibration), cache_dir)
    images = read(list(calibration["path"]) + list(probes["path"]))
    try:
        content = convert(bb, images[:len(calibration)])
    except Exception as e:  # noqa: BLE001 - the converter raises many kinds; say which
        raise BackboneError(f"{bb.name}: int8 conversion failed: {type(e).__name__}: {str(e)[:300]}") from None
    Path(cache_dir).mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, content)
    runner = rt.TFLiteRunner(path, threads, content, normalise=True)
    got = runner(images)
    figures = fidelity(bb.embed(images), got, slice(len(calibration), None))
    accepted = passes(figures)
    verdict = {"key": key, "sha256": hashlib.sha256(content).hexdigest(), "figures": figures, "accepted": accepted,
               "calibration": len(calibration), "converter": converter_version()}
    keep = np.arange(len(calibration), len(images))[:LOAD_PROBES]
    buf = io.BytesIO()
    np.savez(buf, probes=images[keep], reference=got[keep], verdict=np.array(json.dumps(verdict)))
    atomic_write_bytes(check_path, buf.getvalue())
    if not accepted:
        path.unlink(missing_ok=True)  # the verdict stays: the same model would convert the same way
        raise BackboneError(refusal(bb.name, figures))
    runner.min_cosine = figures["min_cosine"]
    log.info("%s: int8 accepted: %s", bb.name, describe(figures))
    return runner, figures
