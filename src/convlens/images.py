"""Load and validate images; the bundled sample photo."""

from __future__ import annotations

import io
import os
import re
import stat
import warnings
from importlib import resources
from pathlib import Path
from typing import Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ._compat import renamed

__all__ = [
    "FORMATS", "IMAGE_SUFFIXES", "MAX_PIXELS", "ImageError",
    "ImageSource", "load_image", "sample_image", "sample_image_path",
]

ImageSource = Union[str, os.PathLike, bytes, Image.Image, np.ndarray]  # noqa: UP007 (a runtime alias on 3.10)

#: Larger images are refused (a 20k x 20k photo is 400 Mpx; this is about 9500 x 9500).
MAX_PIXELS = 90_000_000
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pnm"})
#: The only Pillow decoders convlens lets open a file (``JPEG`` includes the MPO files of many
#: cameras; ``PPM`` reads PPM/PGM/PNM). Whatever a file's content looks like, no other plugin
#: runs, in particular none that calls an external program (EPS/PS would start Ghostscript).
FORMATS = ("JPEG", "PNG", "BMP", "GIF", "TIFF", "WEBP", "PPM")


class ImageError(ValueError):
    """An image that cannot be read: missing, empty, not an image, truncated or too large."""


def sample_image_path() -> Path:
    """Path of the bundled sample photo (scikit-image's ``chelsea``, CC0; 451 x 300 JPEG)."""
    return Path(str(resources.files("convlens") / "data" / "chelsea.jpg"))


def sample_image() -> Image.Image:
    """The bundled sample photo as an RGB PIL image (451 x 300); no network needed.

    Returns:
        A ``PIL.Image.Image`` in mode ``"RGB"``.
    """
    return load_image(sample_image_path())


def _open(source: str | os.PathLike | bytes, label: str) -> Image.Image:
    if isinstance(source, bytes):
        if not source:
            raise ImageError("the image data is empty")
        fp: object = io.BytesIO(source)
    else:
        path = Path(source)
        if not path.exists():
            if re.match(r"[a-zA-Z][a-zA-Z0-9+.-]*://", str(source)):  # what a browser's "copy link" gives
                raise ImageError(f"{label}: a URL, not a file; download the image and pass its path")
            raise ImageError(f"{label}: " + ("a dangling symlink" if path.is_symlink() else "no such file"))
        if path.is_dir():
            raise ImageError(f"{label}: is a folder, not an image file")
        if not stat.S_ISREG(path.stat().st_mode):  # a FIFO would block, a device never end
            raise ImageError(f"{label}: not a regular file (a FIFO, socket or device)")
        if path.stat().st_size == 0:
            raise ImageError(f"{label}: the file is empty")
        fp = path
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(fp, formats=FORMATS)
    except (UnidentifiedImageError, Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        if isinstance(e, UnidentifiedImageError):
            raise ImageError(
                f"{label}: not an image in a supported format ({', '.join(FORMATS)})") from None
        raise ImageError(f"{label}: the image is too large to decode safely") from None
    except OSError as e:
        raise ImageError(f"{label}: cannot read the file ({e})") from None
    return img


def _check_size(width: int, height: int, label: str) -> None:
    if width * height > MAX_PIXELS:
        raise ImageError(
            f"{label}: {width}x{height} is {width * height / 1e6:.0f} Mpx, more than the "
            f"{MAX_PIXELS / 1e6:.0f} Mpx limit; downscale it first"
        )
    if width < 1 or height < 1:
        raise ImageError(f"{label}: the image has no pixels")


def _to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode -> 8-bit RGB. Transparency is composited on white; 16-bit and float
    greyscale are scaled, not clipped."""
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        a = np.asarray(img, dtype=np.float64)
        if img.mode.startswith("I;16"):
            a = a / 65535.0
        elif img.mode == "I":
            a = a / (65535.0 if a.max() > 255 else 255.0)
        elif a.max() > 1.0:  # float images: [0, 1] if they fit, else [0, 255]
            a = a / 255.0
        a = (np.clip(a, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
        return Image.fromarray(np.stack([a] * 3, axis=-1), "RGB")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def _from_array(a: np.ndarray) -> Image.Image:
    a = np.asarray(a)
    if a.ndim == 3 and a.shape[-1] not in (1, 3, 4) and a.shape[0] in (1, 3, 4):
        a = np.moveaxis(a, 0, -1)  # CHW -> HWC
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[-1] not in (3, 4)):
        raise ImageError(f"an image array must be (H, W), (H, W, 3) or (H, W, 4), got {a.shape}")
    _check_size(a.shape[1], a.shape[0], "array")
    if a.dtype == np.uint8:
        u8 = a
    elif a.dtype == np.uint16:
        u8 = (a.astype(np.float64) / 257.0 + 0.5).astype(np.uint8)
    elif np.issubdtype(a.dtype, np.floating) or a.dtype == bool:
        f = a.astype(np.float64)
        if not np.isfinite(f).all():
            raise ImageError("the image array contains NaN or infinity")
        if f.min() < 0 or f.max() > 1:
            raise ImageError("a float image array must hold values in [0, 1]")
        u8 = (f * 255.0 + 0.5).astype(np.uint8)
    elif np.issubdtype(a.dtype, np.integer):
        if a.min() < 0 or a.max() > 255:
            raise ImageError("an integer image array must hold values in [0, 255]")
        u8 = a.astype(np.uint8)
    else:
        raise ImageError(f"unsupported image array dtype {a.dtype}")
    mode = "L" if u8.ndim == 2 else ("RGB" if u8.shape[-1] == 3 else "RGBA")
    return _to_rgb(Image.fromarray(np.ascontiguousarray(u8), mode))


@renamed(source="image")
def load_image(image: ImageSource) -> Image.Image:
    """Load an image from a path, bytes, a PIL image or a numpy array as 8-bit RGB.

    Every Pillow mode (greyscale, RGBA, palette, CMYK, 16-bit) becomes RGB, EXIF orientation is
    applied, and files that are missing, empty, not images, truncated or larger than
    :data:`MAX_PIXELS` raise :class:`ImageError` with a message that says what is wrong.

    Args:
        image: a path (str or ``os.PathLike``), the file's bytes, an open binary file, a PIL
            image, or a numpy array (H, W), (H, W, 3|4) or (3|4, H, W): uint8, uint16, bool,
            integers in [0, 255] or floats in [0, 1]. Only the formats in :data:`FORMATS` are
            decoded.
    Returns:
        A ``PIL.Image.Image`` in mode ``"RGB"`` (8 bits per channel; transparency composited on
        white).
    Raises:
        ImageError: a missing or empty file, a folder, FIFO or device, data that is not an image
            in a supported format, a truncated or corrupt file, more than :data:`MAX_PIXELS`
            pixels, an array of another shape, dtype or range, or another type of ``image``.

    Example::

        img = load_image("photo.jpg")    # PIL.Image.Image, mode "RGB"
    """
    source = image  # the body's name
    if isinstance(source, np.ndarray):
        return _from_array(source)
    if isinstance(source, Image.Image):
        img, label = source, "image"
    elif hasattr(source, "read"):  # an open binary file
        img, label = _open(source.read(), "image data"), getattr(source, "name", "image data")
    elif isinstance(source, (str, os.PathLike, bytes)):
        label = "image data" if isinstance(source, bytes) else str(source)
        img = _open(source, label)
    else:
        raise ImageError(f"cannot read an image from {type(source).__name__}; give a path, bytes, PIL image or array")
    _check_size(img.width, img.height, label)
    try:
        img = ImageOps.exif_transpose(img)
        img.load()
        return _to_rgb(img)
    except ImageError:
        raise
    except (OSError, ValueError, SyntaxError) as e:
        reason = "the file is truncated or corrupt" if "truncat" in str(e) or isinstance(e, OSError) else str(e)
        raise ImageError(f"{label}: {reason}") from None
