"""Images to vectors: decoded and resized in a thread pool a few batches ahead of the backbone, which embeds
them batch by batch.

:func:`iter_batches` is the decode loop of :func:`vslib.extraction.extract` (in this process and in each
Dask task); :func:`embed_images` embeds query images (paths, PIL images or arrays) for a search or a
prediction. Images are decoded and resized by :func:`vslib.images.load_for_model` (Pillow releases the
GIL); the backbone runs batched on its runtime (TensorFlow Lite on a CPU, which also releases the GIL
while it computes; see :mod:`vslib.runtime`).
"""
from __future__ import annotations

import collections
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Iterable, Iterator, Sequence

import numpy as np

from vslib.errors import VisualSearchError
from vslib.images import DEFAULT_MAX_PIXELS, ImageError, load_for_model


class QueryImageError(ImageError, VisualSearchError):
    """A query image cannot be used (the CLI prints it without a traceback)."""


def _workers(n: int) -> int:
    return n if n and n > 0 else (os.cpu_count() or 1)


def iter_batches(sources: Sequence, size: int, batch_size: int, *, workers: int = 0,
                 max_pixels: int = DEFAULT_MAX_PIXELS, prefetch_batches: int = 2
                 ) -> Iterator[tuple[list[int], np.ndarray, list[tuple[int, str]]]]:
    """Decode and resize ``sources`` in a thread pool, ``prefetch_batches`` batches ahead.

    Yields ``(positions, uint8 batch, failures)``: the positions in ``sources``
    of the images in the batch, the images, and ``(position, reason)`` of those
    in this stretch that could not be loaded.
    """
    def load(src):
        try:
            return load_for_model(src, size, max_pixels=max_pixels), None
        except ImageError as e:
            return None, e.reason

    ahead = batch_size * (prefetch_batches + 1)
    with ThreadPoolExecutor(max_workers=_workers(workers), thread_name_prefix="decode") as pool:
        pending: collections.deque = collections.deque()
        it = iter(enumerate(sources))

        def fill():
            while len(pending) < ahead:
                try:
                    i, src = next(it)
                except StopIteration:
                    return
                pending.append((i, pool.submit(load, src)))

        fill()
        while pending:
            pos, imgs, failed = [], [], []
            while pending and len(imgs) < batch_size:
                i, fut = pending.popleft()
                img, reason = fut.result()
                if img is None:
                    failed.append((i, reason))
                else:
                    pos.append(i)
                    imgs.append(img)
                fill()
            batch = np.stack(imgs) if imgs else np.zeros((0, size, size, 3), np.uint8)
            yield pos, batch, failed


def embed_images(backbone, images: Iterable, *, batch_size: int = 32, workers: int = 0,
                 max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """L2-normalised float32 vectors ``(n, dim)`` of query images (paths, PIL images or arrays).

    Raises
    ------
    QueryImageError
        If an image cannot be loaded (the message names it and says why).
    """
    images = list(images)
    out = np.zeros((len(images), backbone.dim), np.float32)
    for pos, batch, failed in iter_batches(images, backbone.input_size, batch_size, workers=workers,
                                           max_pixels=max_pixels):
        if failed:
            i, reason = failed[0]
            src = images[i] if isinstance(images[i], (str, os.PathLike)) else f"image #{i}"
            raise QueryImageError(src, reason)
        if pos:
            out[pos] = backbone.embed(batch)
    return out
