"""Decoding the explorer's images within a memory budget.

A small file can hold a huge picture (an 86 KB PNG of 9400 x 9400 decodes to 265 MB of RGB and
costs ~700 MB at its peak), and a server decodes uploads in parallel. So the explorer decodes at
most :data:`DECODE_BUDGET_PX` pixels at once (a decode waits for room; small images go in
parallel, one huge one at a time), asks JPEG for a reduced decode (``draft``), keeps at most
:data:`MAX_SIDE` pixels on the longer side (the model sees a few hundred), and hands freed memory
back to the system after a large decode (glibc ``malloc_trim``).
"""

from __future__ import annotations

import contextlib
import ctypes
import io
import os
import threading
from collections.abc import Iterator
from typing import Any

from PIL import Image, ImageOps

from ..images import FORMATS, MAX_PIXELS, load_image

__all__ = ["DECODE_BUDGET_PX", "MAX_SIDE", "decode"]

#: pixels decoded at once over all requests (~200 MB of decoded pixels): many photos in parallel,
#: one large picture at a time (one over the budget, up to the pixel limit, waits to decode alone)
DECODE_BUDGET_PX = 48_000_000
#: the longer side an image is kept at (larger ones are downscaled on load)
MAX_SIDE = 2048
_TRIM_PX = 4_000_000  # after decoding more than this, return freed memory to the system


class _Budget:
    """A counting semaphore of pixels."""

    def __init__(self, total: int) -> None:
        self.total, self.free = total, total
        self._cond = threading.Condition()

    @contextlib.contextmanager
    def take(self, n: int) -> Iterator[None]:
        n = max(1, min(n, self.total))
        with self._cond:
            self._cond.wait_for(lambda: self.free >= n)
            self.free -= n
        try:
            yield
        finally:
            with self._cond:
                self.free += n
                self._cond.notify_all()


BUDGET = _Budget(DECODE_BUDGET_PX)


def _trim() -> None:
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).malloc_trim(0)  # glibc: give freed arenas back (elsewhere: nothing to do)


def decode(source: Any, max_side: int = MAX_SIDE) -> Image.Image:
    """``source`` (bytes or a path; anything else as :func:`~convlens.images.load_image` takes it)
    as RGB with at most ``max_side`` pixels on its longer side, decoded within :data:`BUDGET`.

    Example::

        img = decode(open("huge.png", "rb").read())   # at most 2048 px on the longer side
    """
    if not isinstance(source, (bytes, bytearray, str, os.PathLike)):
        img = load_image(source)
        return _shrink(img.copy() if img is source else img, max_side)
    if not isinstance(source, (bytes, bytearray)) and not os.path.isfile(source):
        return load_image(source)  # its message (missing, a folder, a FIFO or device)
    try:
        probe = Image.open(io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source, formats=FORMATS)
    except Exception:  # noqa: BLE001 - load_image says what is wrong, in its words
        return load_image(bytes(source) if isinstance(source, bytearray) else source)
    w, h = probe.size
    if w * h > MAX_PIXELS or w < 1 or h < 1:
        return load_image(probe)  # the size error
    if probe.format == "JPEG" and max(w, h) > max_side:
        probe.draft("RGB", (max_side, max_side))  # the decoder skips detail (1/2 .. 1/8 scale)
    with BUDGET.take(probe.size[0] * probe.size[1]):
        if probe.mode in ("RGB", "L", "RGBA", "LA"):
            try:  # decoded once, turned and shrunk in place: no second full-size copy
                probe.load()
                ImageOps.exif_transpose(probe, in_place=True)
            except (OSError, ValueError, SyntaxError):
                return load_image(bytes(source) if isinstance(source, bytearray) else source)  # its message
            img = load_image(_shrink(probe, max_side))  # RGB and the checks, on the small image
        else:
            img = _shrink(load_image(probe), max_side)
        if img is not probe:
            probe.close()  # the full-size pixels go now (Pillow closes a file it opened itself once loaded)
        del probe
        if w * h > _TRIM_PX:
            _trim()  # before the next decode starts, or its pixels would come on top of these
    return img


def _shrink(img: Image.Image, max_side: int) -> Image.Image:
    """``img`` (ours: changed in place, no full-size copy) with at most ``max_side`` px a side."""
    if max(img.size) > max_side:
        img.thumbnail((max_side, max_side), Image.Resampling.LANCZOS, reducing_gap=3.0)
    return img
