"""Which images a run explains: folder scans (what is skipped and why), output keys, and shards.

:func:`plan` is what :func:`convlens.explain` and ``convlens explain`` call; :func:`collect_images`,
:func:`select_shard`, :func:`parse_shard` and :func:`shard_folder` are the pieces (also importable
from :mod:`convlens.explain`, as before).
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from torch import Tensor

from .images import IMAGE_SUFFIXES, ImageSource
from .outputs import image_keys as _image_keys
from .outputs import is_regular, printable

__all__ = ["ExplainError", "collect_images", "image_keys", "item_keys", "parse_shard", "plan", "select_shard",
           "shard_folder"]

log = logging.getLogger("convlens.explain")


class ExplainError(ValueError):
    """Bad arguments to :func:`explain` (unknown technique, bad settings, no images)."""


def image_keys(names: Sequence[str], sources: Sequence[Any] | None = None) -> list[str]:
    """Unique, file-system-safe folder names for images, from their whole file names
    (:func:`convlens.outputs.image_keys`)."""
    return _image_keys(names, sources)


def _unusable(f: Path) -> str | None:
    """Why a folder entry cannot be explained, or ``None`` when it is an image file to try."""
    if f.name.startswith("."):
        return "hidden file"
    if f.is_symlink() and not f.exists():
        return "dangling symlink"
    if f.is_dir():
        return "a folder (folders are not searched)"
    if not is_regular(f):
        return "not a regular file (a FIFO, socket or device)"
    if f.suffix.lower() not in IMAGE_SUFFIXES:
        return "not an image file (suffix)"
    if not os.access(f, os.R_OK):
        return "not readable (permission denied)"
    return None


def collect_images(
    sources: Iterable[ImageSource], *, warn: bool = True
) -> tuple[list[tuple[str, ImageSource]], list[dict[str, str]]]:
    """Expand folders into their image files (by suffix, sorted, not recursive).

    Returns ``([(name, source)], skipped)``: every folder entry that is not used (hidden files,
    dangling symlinks, subfolders, FIFOs and devices, files without an image suffix, unreadable
    files) is listed in ``skipped`` with the reason (display-safe path), with a warning; a file
    named directly is always kept (if it is no image, explaining it fails with a clear error).
    """
    items: list[tuple[str, ImageSource]] = []
    skipped: list[dict[str, str]] = []
    for i, src in enumerate(sources):
        if isinstance(src, (str, os.PathLike)):
            path = Path(src)
            if path.is_dir():
                for f in sorted(path.iterdir()):
                    why = _unusable(f)
                    if why is None:
                        items.append((f.name, f))
                        continue
                    if warn:
                        log.warning("skipping %s: %s", printable(f), why)
                    skipped.append({"path": printable(f), "reason": why})
            else:
                items.append((path.name, path))
        elif isinstance(src, Tensor):  # model-ready tensors: (3, H, W) or a batch (N, 3, H, W)
            batch = src[None] if src.dim() == 3 else src
            items += [(f"tensor {i + 1}" + (f"[{j}]" if len(batch) > 1 else ""), batch[j : j + 1])
                      for j in range(len(batch))]
        else:
            filename = getattr(src, "filename", "")  # a PIL image opened from a file knows its name
            items.append((Path(filename).name if filename else f"image {i + 1}", src))
    return items, skipped


def item_keys(items: Sequence[tuple[str, ImageSource]]) -> list[str]:
    """The output folder of each ``(name, source)`` from :func:`collect_images`."""
    return image_keys([n for n, _ in items], [s if isinstance(s, (str, os.PathLike)) else n for n, s in items])


def parse_shard(text: str | tuple[int, int]) -> tuple[int, int]:
    """``"I/N"`` (or ``(I, N)``) -> ``(I, N)`` with ``1 <= I <= N``: part I of N (1-based, as a
    Slurm array ``--array=1-N`` numbers its tasks); anything else is a ValueError.

    Example::

        parse_shard("2/4")   # (2, 4)
    """
    if isinstance(text, tuple):
        i, n = text
    else:
        m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", str(text))
        if not m:
            raise ValueError(f"a shard is I/N, e.g. 1/4, not {text!r}")
        i, n = int(m.group(1)), int(m.group(2))
    if isinstance(i, bool) or isinstance(n, bool) or not (isinstance(i, int) and isinstance(n, int)) or not 1 <= i <= n:
        raise ValueError(f"a shard I/N needs 1 <= I <= N, not {i}/{n}")
    return i, n


def select_shard(items: Sequence[tuple[str, Any]], shard: str | tuple[int, int] | None) -> list[tuple[str, Any]]:
    """Part ``I`` of ``N`` of ``items`` (``(name, source)`` pairs from :func:`collect_images`).

    Items are ranked by name (the path relative to the folder they were found in; ties by their
    place in ``items``), and the one at rank ``r`` (0-based) belongs to shard ``r mod N + 1``: the N
    shards are disjoint, cover every item, differ in size by at most one, and are the same on every
    machine that sees the same files, whatever the folder is called there or the order the file
    system lists it in. Selected items keep their order in ``items``.

    Example::

        items, _ = collect_images(["photos/"])
        mine = select_shard(items, "2/4")   # about a quarter
    """
    if shard is None:
        return list(items)
    i, n = parse_shard(shard)
    ranked = sorted(range(len(items)), key=lambda j: (items[j][0], j))
    keep = {j for r, j in enumerate(ranked) if r % n == i - 1}
    return [item for j, item in enumerate(items) if j in keep]


def plan(
    sources: Sequence[ImageSource], shard: str | tuple[int, int] | None = None, *, warn: bool = True
) -> tuple[list[tuple[str, ImageSource, str]], list[dict[str, str]]]:
    """The images a run explains: ``([(name, source, key)], skipped)``. Keys (output folders) are
    given over all the images before a shard is taken, so every shard names an image as one run
    over the whole folder does and their outputs merge (``convlens report``).

    Example::

        todo, skipped = plan(["photos/"], "1/2")
    """
    items, skipped = collect_images(sources, warn=warn)
    if not items:
        more = f" ({len(skipped)} folder entries skipped: {skipped[0]['reason']}, ...)" if skipped else ""
        raise ExplainError(f"no image files to explain{more}")
    keyed = [(name, (src, key)) for (name, src), key in zip(items, item_keys(items))]
    if shard is not None:
        try:
            n_all, keyed = len(keyed), select_shard(keyed, shard)
        except ValueError as e:
            raise ExplainError(str(e)) from None
        if not keyed:
            raise ExplainError(f"shard {shard} of {n_all} images holds no image")
    return [(name, src, key) for name, (src, key) in keyed], skipped


def shard_folder(out: str | os.PathLike[str], shard: str | tuple[int, int] | None) -> Path:
    """Where a run writes: ``out`` itself, or ``out/shard-I-of-N`` for shard ``I/N``, so N
    processes can share one ``out`` without writing the same files.

    Example::

        shard_folder("out", "2/4")   # Path('out/shard-2-of-4')
    """
    if shard is None:
        return Path(out)
    i, n = parse_shard(shard)
    return Path(out) / f"shard-{i}-of-{n}"
