"""Fast CPU inference for a backbone: TensorFlow Lite on XNNPACK, converted once and cached.

TensorFlow stays the training, fine-tuning and GPU runtime; on a CPU the same
network converted to TensorFlow Lite runs about twice as fast (measured by
``benchmarks/extract.py``) with the same outputs. ``backbone.runtime`` picks:

========  ====================================================================
``auto``  TensorFlow Lite on a CPU-only machine, Keras (``tf.function``) when
          TensorFlow sees a GPU; falls back to Keras, logging why, when the
          conversion fails or its outputs differ from the Keras model's
``tflite`` TensorFlow Lite, or an error saying why it cannot be used
``keras`` the Keras model in a compiled ``tf.function`` (the reference)
========  ====================================================================

The converted model takes uint8 pixels and returns the L2-normalised features
(preprocessing, network and normalisation in one graph). It is written to
``<cache_dir>/<backbone>-<key>.tflite``, where ``key`` hashes the network's
layer configurations and weights, so a changed model is converted again and an
unchanged one never is. Beside it, ``<backbone>-<key>.check.npz`` keeps probe
images, the Keras model's vectors of them and the file's checksum: a conversion
is accepted only if every probe vector agrees with Keras to cosine >=
:data:`MIN_COSINE`, and each load checks the checksum (the interpreter does not
verify its input, so a damaged file could crash the process) and re-runs the
probes (milliseconds); a mismatch converts again.

Vectors are therefore interchangeable between the runtimes, and the feature
cache key (:attr:`vslib.backbones.Backbone.cache_key`) does not depend on the
runtime: a cache filled by one is reused by the other.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import threading
import warnings
from pathlib import Path
from typing import Optional

import numpy as np

from vslib.atomic import atomic_write_bytes, atomic_write_json
from vslib.errors import BackboneError

log = logging.getLogger(__name__)

#: values of ``backbone.runtime``
RUNTIMES = ("auto", "tflite", "keras")
#: a converted model is used only if every probe vector has at least this cosine with the Keras one
MIN_COSINE = 0.9999
#: bump when the converted graph changes meaning (its inputs, outputs or preprocessing)
FORMAT_VERSION = 1
#: images per interpreter call; larger inputs are cut into chunks of this size
MAX_CHUNK = 64
#: probe images checked at conversion and at every load
N_PROBES = 8


def cpu_threads() -> int:
    """Cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def gpu_present() -> bool:
    """Whether TensorFlow sees a GPU (then ``auto`` keeps Keras)."""
    import tensorflow as tf

    return bool(tf.config.list_physical_devices("GPU"))


# ---------------------------------------------------------------------------
# Identity of a model


def model_key(bb) -> str:
    """16 hex digits identifying ``bb``'s network: layer types and configurations, weights, input, format."""
    h = hashlib.sha256()
    h.update(json.dumps([bb.name, bb.input_size, bb.dim, bb.cache_key, FORMAT_VERSION,
                         getattr(bb.preprocess_fn, "__name__", "")]).encode())
    for layer in bb.keras_model.layers:
        cfg = layer.get_config()
        cfg.pop("name", None)
        h.update(type(layer).__name__.encode())
        h.update(json.dumps(cfg, sort_keys=True, default=str).encode())
        for w in layer.get_weights():
            w = np.ascontiguousarray(w)
            h.update(str((w.dtype.str, w.shape)).encode())
            h.update(w.tobytes())
    return h.hexdigest()[:16]


def probe_images(size: int, n: int = N_PROBES, seed: int = 0) -> np.ndarray:
    """``n`` deterministic uint8 test images ``(n, size, size, 3)`` with natural-image traits.

    Smooth colour fields at several scales, hard-edged shapes, fine noise, one
    flat grey and one saturated image: enough variety that a conversion error
    in any layer shows in the pooled features.
    """
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    out = np.empty((n, size, size, 3), np.uint8)
    for i in range(n):
        if i == 0:
            out[i] = 128
            continue
        if i == n - 1:
            out[i] = np.where(rng.random((size, size, 1)) < 0.5, 0, 255).astype(np.uint8) * [1, 0, 1]
            continue
        grid = int(rng.choice([2, 4, 8, 16]))
        field = Image.fromarray(rng.integers(0, 256, (grid, grid, 3), dtype=np.uint8)).resize((size, size), Image.BICUBIC)
        draw = ImageDraw.Draw(field)
        for _ in range(int(rng.integers(1, 6))):
            x0, y0 = (int(v) for v in rng.integers(0, size, 2))
            w, h = (int(v) for v in rng.integers(8, size // 2, 2))
            colour = tuple(int(c) for c in rng.integers(0, 256, 3))
            (draw.ellipse if rng.random() < 0.5 else draw.rectangle)([x0, y0, x0 + w, y0 + h], fill=colour)
        a = np.asarray(field, np.float32) + rng.normal(0, 4 * (i % 3), (size, size, 3))
        out[i] = np.clip(a, 0, 255).astype(np.uint8)
    return out


def keras_vectors(bb, images: np.ndarray) -> np.ndarray:
    """The reference: L2-normalised features of uint8 ``images`` from the Keras model."""
    f = np.asarray(bb.keras_model(bb.preprocess(images), training=False), np.float64)
    return (f / np.linalg.norm(f, axis=1, keepdims=True)).astype(np.float32)


def min_cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Smallest row-wise cosine between two sets of vectors."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    return float(cos.min()) if len(cos) else 1.0


# ---------------------------------------------------------------------------
# TensorFlow Lite


def _interpreter_class():
    """LiteRT's interpreter when ``ai-edge-litert`` is installed, else the one inside TensorFlow."""
    try:
        from ai_edge_litert.interpreter import Interpreter  # type: ignore[import-not-found]

        return Interpreter
    except ImportError:
        import tensorflow as tf

        return tf.lite.Interpreter


def convert_tflite(bb) -> bytes:
    """The flatbuffer of ``bb``: uint8 NHWC pixels -> preprocessing -> network -> L2 normalisation.

    Keras 3 models convert through a concrete function (``from_keras_model``
    fails on them); the batch dimension stays dynamic.
    """
    import tensorflow as tf

    model, preprocess, s = bb.keras_model, bb.preprocess_fn, bb.input_size

    @tf.function(input_signature=[tf.TensorSpec([None, s, s, 3], tf.uint8, name="pixels")])
    def embed(pixels):
        x = preprocess(tf.cast(pixels, tf.float32))
        return tf.math.l2_normalize(model(x, training=False), axis=-1)

    converter = tf.lite.TFLiteConverter.from_concrete_functions([embed.get_concrete_function()], model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return converter.convert()


class TFLiteRunner:
    """Runs a converted backbone: uint8 ``(n, s, s, 3)`` -> float32 ``(n, dim)``; thread-safe.

    Parameters
    ----------
    path : path
        The ``.tflite`` file.
    threads : int, optional
        XNNPACK threads (default: every core this process may use).
    """

    def __init__(self, path, threads: Optional[int] = None, content: Optional[bytes] = None, *,
                 normalise: bool = False):
        self.path = Path(path)
        self.threads = threads or cpu_threads()
        #: L2-normalise the outputs here (an int8 model ends at the pooled features: see :mod:`vslib.int8`)
        self.normalise = normalise
        content = self.path.read_bytes() if content is None else content
        with warnings.catch_warnings():  # TensorFlow's interpreter warns that LiteRT will replace it
            warnings.simplefilter("ignore")
            self._it = _interpreter_class()(model_content=content, num_threads=self.threads)
        self._in = self._it.get_input_details()[0]["index"]
        self._out = self._it.get_output_details()[0]["index"]
        self._shape = None
        self._lock = threading.Lock()
        #: smallest cosine to the Keras model over the probe images, once checked
        self.min_cosine: Optional[float] = None

    def __call__(self, images: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(images, np.uint8)
        if len(x) > MAX_CHUNK:
            return np.concatenate([self(x[i:i + MAX_CHUNK]) for i in range(0, len(x), MAX_CHUNK)])
        with self._lock:
            if self._shape != x.shape:  # resizing is cheap after the first allocation
                self._it.resize_tensor_input(self._in, list(x.shape))
                self._it.allocate_tensors()
                self._shape = x.shape
            self._it.set_tensor(self._in, x)
            self._it.invoke()  # releases the GIL: decoding threads keep running
            out = self._it.get_tensor(self._out).copy()
        if self.normalise:
            out /= np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)
        return out


def _atomic_write(path: Path, data: bytes) -> None:
    atomic_write_bytes(path, data)


def _check(runner: TFLiteRunner, probes: np.ndarray, reference: np.ndarray, tolerance: float) -> tuple[bool, float]:
    got = runner(probes)
    if got.shape != reference.shape or not np.isfinite(got).all():
        return False, float("nan")
    cos = min_cosine(got, reference)
    return cos >= tolerance, cos


def load_tflite(bb, cache_dir, *, threads: Optional[int] = None, tolerance: float = MIN_COSINE) -> TFLiteRunner:
    """A verified :class:`TFLiteRunner` of ``bb``, converting (once) when the cache lacks it.

    Raises
    ------
    BackboneError
        If the conversion fails, or its outputs differ from the Keras model's
        (the message gives the cosine; this verdict is cached, so later runs
        do not convert again).
    """
    cache_dir = Path(cache_dir)
    key = model_key(bb)
    path = cache_dir / f"{bb.name}-{key}.tflite"
    check_path = cache_dir / f"{bb.name}-{key}.check.npz"

    if check_path.exists():
        try:
            probes, reference, verdict = read_check(check_path)
        except (OSError, ValueError, KeyError) as e:
            log.warning("%s: %s unreadable (%s); converting again", bb.name, check_path, e)
        else:
            try:
                runner = open_checked(path, verdict, threads)
                ok, cos = _check(runner, probes, reference, tolerance)
            except (OSError, ValueError, RuntimeError) as e:
                log.warning("%s: cached %s unusable (%s); converting again", bb.name, path, e)
            else:
                if ok:
                    runner.min_cosine = cos
                    _point(cache_dir, bb, path, check_path)
                    return runner
                if verdict.get("min_cosine", 1.0) < tolerance:  # the same file failed this check before
                    raise BackboneError(_refusal(bb, cos, len(probes), tolerance))
                log.warning("%s: cached %s gives cosine %.6f against the Keras model; converting again",
                            bb.name, path, cos)

    log.info("converting %s to TensorFlow Lite (once; cached in %s)", bb.name, cache_dir)
    probes = probe_images(bb.input_size)
    reference = keras_vectors(bb, probes)
    cache_dir.mkdir(parents=True, exist_ok=True)
    verdict = {"key": key, "tolerance": tolerance}
    try:
        content = convert_tflite(bb)
        _atomic_write(path, content)
        verdict["sha256"] = hashlib.sha256(content).hexdigest()
        runner = TFLiteRunner(path, threads, content)
        ok, cos = _check(runner, probes, reference, tolerance)
        verdict["min_cosine"] = cos
    except Exception as e:  # noqa: BLE001 - the converter raises many kinds; say which
        # not remembered: a failure may be passing (memory, a file being edited), so the next run tries again
        path.unlink(missing_ok=True)
        check_path.unlink(missing_ok=True)
        raise BackboneError(f"{bb.name}: TensorFlow Lite conversion failed: {type(e).__name__}: {str(e)[:300]}") from None
    buf = io.BytesIO()
    np.savez(buf, probes=probes, reference=reference, verdict=np.array(json.dumps(verdict)))
    _atomic_write(check_path, buf.getvalue())
    if not ok:  # remembered (the check file records the cosine): the same model would convert the same way
        raise BackboneError(_refusal(bb, cos, len(probes), tolerance))
    log.info("%s: TensorFlow Lite verified, minimum cosine %.7f to the Keras model", bb.name, cos)
    runner.min_cosine = cos
    _point(cache_dir, bb, path, check_path)
    return runner


def read_check(check_path: Path) -> tuple[np.ndarray, np.ndarray, dict]:
    """The probe images, their reference vectors and the verdict a conversion recorded beside its model."""
    with np.load(check_path, allow_pickle=False) as z:
        return z["probes"], z["reference"], json.loads(str(z["verdict"]))


def open_checked(path: Path, verdict: dict, threads: Optional[int] = None, *, normalise: bool = False) -> TFLiteRunner:
    """A runner of the model file ``path`` if its checksum is the one ``verdict`` recorded, else ValueError.

    The interpreter does not verify a flatbuffer: a damaged file could crash the process.
    """
    content = Path(path).read_bytes()
    if hashlib.sha256(content).hexdigest() != verdict.get("sha256"):
        raise ValueError("its checksum differs from the one recorded at conversion")
    return TFLiteRunner(path, threads, content, normalise=normalise)


# ---------------------------------------------------------------------------
# Without TensorFlow: the verified model a previous run left


def pointer_path(cache_dir, name: str) -> Path:
    """``<cache_dir>/<name>.tflite.json``: which converted file holds the float32 model of ``name``'s weights."""
    return Path(cache_dir) / f"{name}.tflite.json"


def _point(cache_dir: Path, bb, path: Path, check_path: Path) -> None:
    """Record the verified model of ``bb``'s weights, so a query can find it without building the Keras model."""
    pointer = {"format": FORMAT_VERSION, "weights_key": bb.cache_key, "input_size": bb.input_size, "dim": bb.dim,
               "file": path.name, "check": check_path.name}
    target = pointer_path(cache_dir, bb.name)
    try:
        if target.exists() and json.loads(target.read_text(encoding="utf-8")) == pointer:
            return
    except (OSError, ValueError):
        pass
    try:
        atomic_write_json(target, pointer)
    except OSError as e:  # a read-only cache still serves this process; only the next query pays for TensorFlow
        log.debug("cannot write %s: %s", target, e)


def find_verified(cache_dir, name: str, weights_key: str, threads: Optional[int] = None) -> Optional[TFLiteRunner]:
    """The float32 runner a previous run verified for ``name`` with weights ``weights_key``, or None.

    Reads ``<name>.tflite.json``, checks the model file's checksum and re-runs
    its probe images (milliseconds); imports no TensorFlow where
    ``ai-edge-litert`` is installed. None (and the caller builds the Keras
    model) when there is no such file or any check fails.
    """
    cache_dir = Path(cache_dir)
    try:
        pointer = json.loads(pointer_path(cache_dir, name).read_text(encoding="utf-8"))
        if pointer.get("format") != FORMAT_VERSION or pointer.get("weights_key") != weights_key:
            return None
        path, check_path = cache_dir / Path(pointer["file"]).name, cache_dir / Path(pointer["check"]).name
        probes, reference, verdict = read_check(check_path)
        runner = open_checked(path, verdict, threads)
        ok, cos = _check(runner, probes, reference, float(verdict.get("tolerance", MIN_COSINE)))
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as e:
        log.debug("%s: no verified TensorFlow Lite model to use without TensorFlow (%s)", name, e)
        return None
    if not ok:
        return None
    runner.min_cosine = cos
    return runner


def _refusal(bb, cos: float, n: int, tolerance: float) -> str:
    return (f"{bb.name}: TensorFlow Lite refused: its vectors differ from the Keras model's (minimum cosine "
            f"{cos:.6f} over {n} probe images < {tolerance})")
