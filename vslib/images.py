"""One robust image loader, used everywhere a model sees pixels.

Images from the wild come rotated (EXIF), greyscale, palette, CMYK, with alpha,
16 bits per channel, truncated, empty, not images at all, or absurdly large.
:func:`load_image` turns every readable one into an 8-bit RGB ``PIL.Image`` and
raises :class:`ImageError` with a short reason for the rest, so callers can
record the reason instead of crashing or silently dropping the file.
"""
from __future__ import annotations

import hashlib
import os
import warnings
from pathlib import Path
from typing import Union

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from vslib.errors import MACHINE_ERRNOS, environment_fault

#: default decompression-bomb guard (pixels); ``dataset.max_image_pixels`` overrides it
DEFAULT_MAX_PIXELS = 50_000_000

# We enforce our own limit (checked on the header, before decoding), so Pillow's
# global guard is lifted; truncated files must still fail, never load half-grey.
Image.MAX_IMAGE_PIXELS = None
ImageFile.LOAD_TRUNCATED_IMAGES = False

ImageInput = Union[str, os.PathLike, Image.Image, np.ndarray]


class ImageError(Exception):
    """An image could not be used; ``reason`` says why in a few words."""

    def __init__(self, path, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{path}: {reason}")


def file_hash(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """SHA-256 of a file's bytes (hex): the content key of every cache."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def not_an_image_file(path: str | os.PathLike) -> str:
    """Why ``path`` cannot be an image file, in plain words ('' when it is a non-empty regular file).

    Checked with ``stat`` before anything opens it, so a FIFO never blocks a read and a
    symbolic-link loop, a folder or a device get an accurate message.
    """
    import errno as _errno
    import stat as _stat

    try:
        st = os.stat(path)
    except FileNotFoundError:
        if os.path.islink(path):
            return f"dangling symbolic link (to {os.readlink(path)}, which does not exist)"
        return "file not found"
    except OSError as e:
        if e.errno == _errno.ELOOP:
            return "a loop of symbolic links (it never reaches a file)"
        if e.errno in (_errno.EACCES, _errno.EPERM):
            return "permission denied (this process cannot read it)"
        if e.errno == _errno.ENOTDIR:
            return "file not found (a part of the path is a file, not a folder)"
        if e.errno == _errno.ENAMETOOLONG:
            return "the path is too long"
        return f"cannot be read ({e.strerror or e})"
    if _stat.S_ISDIR(st.st_mode):
        return "a folder, not an image file"
    if _stat.S_ISFIFO(st.st_mode):
        return "a named pipe (FIFO), not an image file"
    if _stat.S_ISCHR(st.st_mode) or _stat.S_ISBLK(st.st_mode):
        return "a device, not an image file"
    if _stat.S_ISSOCK(st.st_mode):
        return "a socket, not an image file"
    if not _stat.S_ISREG(st.st_mode):
        return "not a regular file"
    if st.st_size == 0:
        return "empty file (0 bytes)"
    if not os.access(path, os.R_OK):
        return "permission denied (this process cannot read it)"
    return ""


def load_image(src: ImageInput, *, max_pixels: int = DEFAULT_MAX_PIXELS,
               background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """Load ``src`` (path, PIL image or array) as an 8-bit RGB image.

    Transparent pixels are composited onto ``background`` (white), because a
    transparent stamp's hidden RGB values are arbitrary.

    Raises
    ------
    ImageError
        For empty, truncated, unreadable or non-image files, and images above
        ``max_pixels`` (decompression-bomb guard).
    """
    if isinstance(src, np.ndarray):
        return _to_rgb(_from_array(src), background)
    if isinstance(src, Image.Image):
        return _to_rgb(ImageOps.exif_transpose(src) or src, background)
    path = Path(src)
    why = not_an_image_file(path)
    if why:
        raise ImageError(path, why)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                w, h = img.size
                if w * h > max_pixels:
                    raise ImageError(
                        path, f"too large: {w}x{h} = {w * h / 1e6:.0f} megapixels > limit "
                              f"{max_pixels / 1e6:.0f} (decompression-bomb guard; raise dataset.max_image_pixels to keep it)")
                img.load()
                ImageOps.exif_transpose(img, in_place=True)  # ours to change: no copy
                return _to_rgb(img, background)
    except ImageError:
        raise
    except UnidentifiedImageError:
        raise ImageError(path, "not an image (unrecognised format)") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:  # truncated / corrupt data
        if isinstance(e, OSError) and e.errno in MACHINE_ERRNOS:  # the machine's fault, not the image's
            raise environment_fault(e, path) from e
        msg = str(e) or type(e).__name__
        if "truncated" in msg.lower() or isinstance(e, EOFError):
            raise ImageError(path, f"truncated or corrupt image ({msg})") from None
        raise ImageError(path, f"unreadable image ({msg})") from None


def _from_array(a: np.ndarray) -> Image.Image:
    a = np.asarray(a)
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if a.dtype != np.uint8:
        if np.issubdtype(a.dtype, np.floating):
            hi = 1.0 if a.max(initial=0) <= 1.0 else 255.0
            a = np.clip(a / hi * 255.0 + 0.5, 0, 255).astype(np.uint8)
        else:
            a = (a.astype(np.float64) / max(1, np.iinfo(a.dtype).max) * 255 + 0.5).astype(np.uint8)
    if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[-1] not in (3, 4)):
        raise ImageError("<array>", f"array of shape {a.shape} is not an image (H,W), (H,W,3) or (H,W,4)")
    return Image.fromarray(a)


def _to_rgb(img: Image.Image, background) -> Image.Image:
    mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        a = np.asarray(img, dtype=np.float64)
        hi = 65535.0 if mode.startswith("I;16") or a.max(initial=0) > 255 else 255.0
        img = Image.fromarray(np.clip(a / hi * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    elif mode == "F":
        a = np.asarray(img, dtype=np.float64)
        hi = 1.0 if a.max(initial=0) <= 1.0 else 255.0
        img = Image.fromarray(np.clip(a / hi * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("LA", "PA", "La"):
        img = img.convert("RGBA")
    if img.mode == "L" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode == "RGBA" or img.mode == "RGBa":
        rgba = img if img.mode == "RGBA" else img.convert("RGBA")
        base = Image.new("RGB", img.size, background)
        base.paste(rgba, mask=rgba)  # an RGBA mask means its alpha band; one conversion, not three
        return base
    if img.mode == "CMYK":
        return img.convert("RGB")
    return img.convert("RGB") if img.mode != "RGB" else img


def resize_for_model(img: Image.Image, size: int | tuple[int, int]) -> np.ndarray:
    """Resize (bilinear, antialiased) to the model's input size; return uint8 HxWx3."""
    if isinstance(size, int):
        size = (size, size)
    if img.size != tuple(size):
        img = img.resize(tuple(size), Image.BILINEAR, reducing_gap=2.0)
    return np.asarray(img, dtype=np.uint8)


def load_for_model(src: ImageInput, size: int | tuple[int, int], *,
                   max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """:func:`load_image` then :func:`resize_for_model`: uint8 array (H, W, 3)."""
    return resize_for_model(load_image(src, max_pixels=max_pixels), size)


def thumbnail(src: ImageInput, size: int = 128, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """An RGB thumbnail no larger than ``size`` on its longer side (for figures)."""
    img = load_image(src, max_pixels=max_pixels).copy()
    img.thumbnail((size, size), Image.BILINEAR)
    return img
