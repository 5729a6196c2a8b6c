"""Backbones: genuine ImageNet weights, embedding contract, registry errors, offline ResNet50."""
from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import pytest
import skimage.data

from vslib import backbones, runtime
from vslib.backbones import IMAGENET_CAT_CLASSES, IMAGENET_COFFEE_CLASSES, get_backbone
from vslib.config import ConfigError, parse_config
from vslib.errors import BackboneError
from vslib.images import load_for_model
from vslib.pth import PthError, load_state_dict


def _photos(size):
    return np.stack([load_for_model(skimage.data.chelsea(), size), load_for_model(skimage.data.coffee(), size)])


@pytest.fixture(scope="module")
def lite0():
    return get_backbone("efficientnet_lite0")


def test_pth_reader_reads_legacy_state_dict_without_torch():
    sd = load_state_dict(backbones._pth_path("efficientnet_lite0"))
    assert len(sd) == 296
    assert sd["_conv_stem.weight"].shape == (32, 3, 3, 3)
    assert sd["_fc.weight"].shape == (1000, 1280) and sd["_fc.weight"].dtype == np.float32
    assert np.isfinite(sd["_bn0.running_var"]).all() and (sd["_bn0.running_var"] >= 0).all()
    import sys
    assert "torch" not in sys.modules


@pytest.mark.parametrize("content", [b"", b"not a torch file " * 8, "head", "half"])
def test_pth_reader_rejects_broken_files_with_pth_error(tmp_path, content):
    data = backbones._pth_path("efficientnet_lite0").read_bytes()
    content = {"head": data[:50], "half": data[:len(data) // 2]}.get(content, content)
    p = tmp_path / "broken.pth"
    p.write_bytes(content)
    with pytest.raises(PthError, match="broken.pth"):
        load_state_dict(p)


def _check_imagenet(bb):
    top = bb.classify_imagenet(_photos(bb.input_size), top=5)
    cat, coffee = top
    assert {c for c, _ in cat} & set(IMAGENET_CAT_CLASSES), f"chelsea top-5 has no cat class: {cat}"
    assert coffee[0][0] in (967, 968), f"coffee top-1 is not espresso/cup: {coffee}"
    assert cat[0][0] in IMAGENET_CAT_CLASSES and cat[0][1] > 0.5  # confident, as genuine weights are


def test_lite0_weights_are_genuine_imagenet(lite0):
    _check_imagenet(lite0)


def test_lite2_weights_are_genuine_imagenet():
    bb = get_backbone("efficientnet_lite2")
    assert bb.input_size == 260 and bb.dim == 1280
    _check_imagenet(bb)


def test_embedding_contract(lite0):
    x = _photos(224)
    e = lite0.embed(x)
    assert e.shape == (2, 1280) and e.dtype == np.float32 and lite0.dim == 1280
    np.testing.assert_allclose(np.linalg.norm(e, axis=1), 1.0, rtol=1e-5)
    np.testing.assert_array_equal(e, lite0.embed(x))  # deterministic
    # batch composition does not change a vector
    np.testing.assert_allclose(lite0.embed(x[:1])[0], e[0], atol=1e-5)
    assert float(e[0] @ e[1]) < 0.9  # a cat and a coffee cup are not the same picture


def test_preprocess_is_the_lite_normalisation(lite0):
    x = np.array([0, 127, 255], np.uint8)[None, None, :].repeat(224, 0).repeat(224, 1)[None]
    p = lite0.preprocess(x)
    assert p.dtype == np.float32
    np.testing.assert_allclose(p[0, 0, 0], [-127 / 128, 0, 1])
    with pytest.raises(ValueError, match="224x224"):
        lite0.preprocess(np.zeros((1, 100, 100, 3), np.uint8))


def test_backbone_is_built_once_per_process(lite0, tmp_path):
    t = time.perf_counter()
    assert get_backbone("efficientnet_lite0", cache_dir=tmp_path) is lite0
    assert time.perf_counter() - t < 0.1


def test_converted_weights_are_cached_and_reload_identically(lite0, tmp_path):
    cache = tmp_path / "bb"
    first = backbones._load_lite("efficientnet_lite0", 224, cache)
    assert (cache / "efficientnet_lite0.weights.h5").exists()
    again = backbones._load_lite("efficientnet_lite0", 224, cache)  # from the .h5 this time
    x = _photos(224)
    np.testing.assert_array_equal(again.embed(x), first.embed(x))
    np.testing.assert_allclose(first.embed(x), lite0.embed(x), atol=1e-6)


def test_unknown_backbone_names_the_choices():
    with pytest.raises(BackboneError, match=r"Unsupported backbone 'vgg16'. Available backbones are \["):
        get_backbone("vgg16")


def test_resnet50_offline_fails_fast_naming_both_options(monkeypatch, tmp_path):
    # no cached download in this KERAS_HOME; this machine has no internet
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras"))
    if backbones._reachable(backbones.RESNET50_URL_HOST, timeout=2.0) is None:
        pytest.skip("online: the download would succeed")
    t = time.perf_counter()
    with pytest.raises(BackboneError) as e:
        backbones.load_resnet50("resnet50", "imagenet", tmp_path)
    assert time.perf_counter() - t < 15
    msg = str(e.value)
    assert "weights: imagenet" in msg and "weights: /path/to/resnet50_weights.h5" in msg


def test_resnet50_missing_file_names_the_path(tmp_path):
    missing = tmp_path / "nope.h5"
    with pytest.raises(BackboneError, match="nope.h5"):
        get_backbone("resnet50", weights=str(missing))


def test_resnet50_local_weights_file(tmp_path):
    import keras

    path = tmp_path / "resnet50.weights.h5"
    keras.applications.ResNet50(include_top=True, weights=None).save_weights(path)  # random, but a real file
    bb = backbones.load_resnet50("resnet50", str(path), tmp_path)
    assert bb.dim == 2048 and bb.input_size == 224 and bb.has_classifier
    e = bb.embed(_photos(224))
    assert e.shape == (2, 2048) and e.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(e, axis=1), 1.0, rtol=1e-5)
    assert bb.cache_key.startswith("resnet50:sha256=")


# ---------------------------------------------------------------------------
# The TensorFlow Lite runtime (vslib.runtime)

STAMPS = Path("/usr/share/tuxpaint/stamps")


def _real_images(size, n_stamps=14):
    pics = [skimage.data.chelsea(), skimage.data.coffee(), skimage.data.astronaut(), skimage.data.rocket(),
            skimage.data.camera(), skimage.data.immunohistochemistry(), skimage.data.hubble_deep_field()]
    stamps = sorted(STAMPS.rglob("*.png"))[::37][:n_stamps] if STAMPS.exists() else []
    return np.stack([load_for_model(p, size) for p in pics + stamps])


@pytest.fixture(scope="module")
def lite0_keras():
    return get_backbone("efficientnet_lite0", runtime="keras")


@pytest.fixture
def fresh_lite0(tmp_path):
    """A Keras-runtime lite0 built from the weights (its own model object) and an empty model cache."""
    return backbones._load_lite("efficientnet_lite0", 224, tmp_path / "h5"), tmp_path / "cache"


def test_default_runtime_on_cpu_is_tflite_and_matches_keras_on_real_images(lite0, lite0_keras):
    assert not runtime.gpu_present()
    assert lite0.runtime == "tflite" and "TensorFlow Lite" in lite0.runtime_note
    assert lite0_keras.runtime == "keras" and lite0_keras.keras_model is lite0.keras_model
    x = _real_images(224)
    fast, ref = lite0.embed(x), lite0_keras.embed(x)
    assert fast.shape == ref.shape == (len(x), 1280) and fast.dtype == np.float32
    assert runtime.min_cosine(fast, ref) >= runtime.MIN_COSINE
    # odd batch sizes resize the interpreter; each vector is the same whatever batch it is in
    np.testing.assert_allclose(lite0.embed(x[3:4])[0], fast[3], atol=1e-5)
    np.testing.assert_allclose(lite0.embed(x[:5]), fast[:5], atol=1e-5)
    assert lite0.cache_key == lite0_keras.cache_key  # so feature caches are shared between runtimes


def test_lite2_tflite_matches_keras():
    bb = get_backbone("efficientnet_lite2")
    assert bb.runtime == "tflite"
    x = _real_images(260, n_stamps=3)
    assert runtime.min_cosine(bb.embed(x), get_backbone("efficientnet_lite2", runtime="keras").embed(x)) >= 0.9999


def test_tflite_is_converted_once_then_loaded(fresh_lite0, caplog):
    bb, cache = fresh_lite0
    with caplog.at_level(logging.INFO, logger="vslib.runtime"):
        first = bb.with_runtime("tflite", cache)
    assert "converting efficientnet_lite0" in caplog.text
    (model_file,) = cache.glob("efficientnet_lite0-*.tflite")
    assert model_file.name == f"efficientnet_lite0-{runtime.model_key(bb)}.tflite"
    stamp = model_file.stat().st_mtime_ns
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="vslib.runtime"):
        again = bb.with_runtime("tflite", cache)
    assert "converting" not in caplog.text and model_file.stat().st_mtime_ns == stamp
    x = _photos(224)
    np.testing.assert_array_equal(again.embed(x), first.embed(x))


def test_changed_model_is_converted_again(fresh_lite0):
    bb, cache = fresh_lite0
    original = bb.with_runtime("tflite", cache)
    layer = bb.keras_model.get_layer("_conv_head")
    layer.set_weights([w * np.float32(1.5) for w in layer.get_weights()])  # the same names, another model
    changed = bb.with_runtime("tflite", cache)
    assert len(list(cache.glob("*.tflite"))) == 2
    x = _real_images(224, n_stamps=4)
    assert runtime.min_cosine(changed.embed(x), runtime.keras_vectors(bb, x)) >= runtime.MIN_COSINE
    assert runtime.min_cosine(changed.embed(x), original.embed(x)) < 0.999


def test_damaged_tflite_file_is_converted_again(fresh_lite0, caplog):
    bb, cache = fresh_lite0
    bb.with_runtime("tflite", cache)
    (model_file,) = cache.glob("*.tflite")
    model_file.write_bytes(model_file.read_bytes()[:100_000])
    with caplog.at_level(logging.WARNING, logger="vslib.runtime"):
        again = bb.with_runtime("tflite", cache)
    assert "converting again" in caplog.text and again.runtime == "tflite"
    x = _photos(224)
    assert runtime.min_cosine(again.embed(x), runtime.keras_vectors(bb, x)) >= runtime.MIN_COSINE


def test_disagreeing_runtime_falls_back_to_keras_with_the_reason(fresh_lite0, caplog):
    bb, cache = fresh_lite0
    # no converted model can reach a cosine of 2: the check refuses it as it would a wrong conversion
    with caplog.at_level(logging.WARNING, logger="vslib.backbones"):
        auto = bb.with_runtime("auto", cache, tolerance=2.0)
    assert auto.runtime == "keras" and "minimum cosine" in auto.runtime_note
    assert "running on Keras instead" in caplog.text and "< 2.0" in caplog.text
    x = _photos(224)
    np.testing.assert_allclose(auto.embed(x), runtime.keras_vectors(bb, x), atol=1e-5)
    with pytest.raises(BackboneError, match=r"TensorFlow Lite refused.*backbone.runtime: keras"):
        bb.with_runtime("tflite", cache, tolerance=2.0)
    # the refusal is remembered: no second conversion
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="vslib.runtime"):
        assert bb.with_runtime("auto", cache, tolerance=2.0).runtime == "keras"
    assert "converting" not in caplog.text
    # and a normal tolerance accepts the same cached file
    assert bb.with_runtime("auto", cache).runtime == "tflite"


def test_keras_runtime_and_bad_runtime_names(fresh_lite0):
    bb, cache = fresh_lite0
    assert bb.with_runtime("keras", cache).runtime == "keras" and not list(cache.glob("*"))
    with pytest.raises(BackboneError, match=r"'tfl' is not a runtime \(choices: auto, tflite, keras\)"):
        bb.with_runtime("tfl", cache)
    with pytest.raises(ConfigError, match=r"backbone.runtime 'tflit' is not allowed; did you mean 'tflite'"):
        parse_config({"backbone": {"runtime": "tflit"}})
    assert parse_config({}).backbone.runtime == "auto"
