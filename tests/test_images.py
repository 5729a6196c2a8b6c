"""The robust loader on every kind of image from the wild."""
import io

import numpy as np
import pytest
from PIL import Image

from vslib.images import ImageError, file_hash, load_for_model, load_image


@pytest.fixture
def photo():
    from skimage import data

    return Image.fromarray(data.astronaut())  # 512x512 RGB


def save(img, path, **kw):
    img.save(path, **kw)
    return path


def test_exif_orientation_is_applied(tmp_path):
    # a 40x20 image tagged "rotate 90 CW" (orientation 6) must come back 20x40
    img = Image.new("RGB", (40, 20), (255, 0, 0))
    img.paste((0, 0, 255), (0, 0, 10, 20))  # blue strip on the left
    exif = Image.Exif()
    exif[0x0112] = 6
    p = save(img, tmp_path / "rot.jpg", exif=exif.tobytes(), quality=95)
    out = load_image(p)
    assert out.size == (20, 40)
    top = np.asarray(out)[:5].reshape(-1, 3).mean(0)
    assert top[2] > 150 and top[0] < 100  # the blue strip is now on top


@pytest.mark.parametrize("mode", ["L", "P", "CMYK", "RGBA", "LA", "I;16", "1"])
def test_every_mode_becomes_rgb(tmp_path, photo, mode):
    if mode == "I;16":
        src = Image.fromarray(np.asarray(photo.convert("L"), dtype=np.uint16) * 257)  # 16-bit greyscale
        assert src.mode.startswith("I;16")
    else:
        src = photo.convert(mode)
    p = save(src, tmp_path / ("img.jpg" if mode == "CMYK" else "img.png"))
    out = load_image(p)
    assert out.mode == "RGB" and out.size == photo.size
    a = np.asarray(out)
    assert a.dtype == np.uint8 and a.std() > 20  # real content, not a blank frame


def test_sixteen_bit_keeps_full_range(tmp_path):
    a = np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16)
    p = save(Image.fromarray(a), tmp_path / "deep.png")
    out = np.asarray(load_image(p))
    assert out.min() <= 1 and out.max() >= 254  # scaled, not clipped to white


def test_alpha_composited_on_white(tmp_path):
    a = np.zeros((10, 10, 4), np.uint8)
    a[..., 0] = 200  # red where opaque; hidden RGB elsewhere is arbitrary
    a[:5, :, 3] = 255
    p = save(Image.fromarray(a, "RGBA"), tmp_path / "a.png")
    out = np.asarray(load_image(p))
    assert tuple(out[0, 0]) == (200, 0, 0)
    assert tuple(out[9, 9]) == (255, 255, 255)


def test_truncated_file_is_an_error_not_a_grey_image(tmp_path, photo):
    buf = io.BytesIO()
    photo.save(buf, "JPEG")
    p = tmp_path / "cut.jpg"
    p.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with pytest.raises(ImageError) as e:
        load_image(p)
    assert "truncated" in e.value.reason


def test_zero_byte_and_non_image_and_missing(tmp_path):
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "notes.jpg").write_text("not an image at all")
    with pytest.raises(ImageError, match="empty file"):
        load_image(tmp_path / "empty.png")
    with pytest.raises(ImageError, match="not an image"):
        load_image(tmp_path / "notes.jpg")
    with pytest.raises(ImageError, match="file not found"):
        load_image(tmp_path / "gone.png")


def test_decompression_bomb_refused_from_header(tmp_path):
    # 12000 x 12000 = 144 megapixels, but only ~150 kB on disk
    p = save(Image.new("L", (12000, 12000)), tmp_path / "bomb.png", optimize=True)
    assert p.stat().st_size < 1_000_000
    with pytest.raises(ImageError, match=r"too large: 12000x12000 = 144 megapixels > limit 50"):
        load_image(p)
    assert load_image(p, max_pixels=200_000_000).size == (12000, 12000)


def test_arrays_and_pil_images_are_accepted(photo):
    a = np.asarray(photo)
    assert np.array_equal(np.asarray(load_image(a)), a)
    assert np.array_equal(np.asarray(load_image(a.astype(np.float32) / 255.0)), a)
    assert load_image(photo.convert("L")).mode == "RGB"
    assert load_for_model(photo, 224).shape == (224, 224, 3)
    with pytest.raises(ImageError, match="not an image"):
        load_image(np.zeros((4, 4, 7)))


def test_file_hash_is_content_based(tmp_path):
    (tmp_path / "a").write_bytes(b"abc")
    (tmp_path / "b").write_bytes(b"abc")
    (tmp_path / "c").write_bytes(b"abd")
    assert file_hash(tmp_path / "a") == file_hash(tmp_path / "b") != file_hash(tmp_path / "c")
    assert file_hash(tmp_path / "a") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
