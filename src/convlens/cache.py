"""A disk cache of feature visualisations, one file per (model, layer, unit, settings, seed).

Feature visualisation does not depend on the explained photo, so a folder of images asks again
and again for the same channels: each finished channel is stored once and later calls (in this
process or another) read it back instead of optimising it again. A hit returns exactly the
arrays the optimisation produced (float32, bit for bit).

Where: ``$CONVLENS_CACHE`` when set (``off``, ``0`` or ``false`` turn the cache off), otherwise
``platformdirs.user_cache_dir("convlens")``; entries live in its ``featureviz/`` folder. Size:
at most ``$CONVLENS_CACHE_MB`` megabytes (default :data:`DEFAULT_MB`); when a write goes over,
the least recently used entries (by file modification time, refreshed on every hit) are removed
first. Safety: an entry is written to a temporary file in the same folder and renamed into place
(``os.replace``, atomic), so two processes that write the same entry at once both leave a whole
file; a file that cannot be read (damaged, removed meanwhile) is a miss.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

__all__ = ["DEFAULT_MB", "FeatureCache", "cache_dir", "model_digest", "open_cache"]

log = logging.getLogger(__name__)

#: The default size limit of the cache in megabytes (``$CONVLENS_CACHE_MB`` overrides).
DEFAULT_MB = 500.0
ENV_DIR = "CONVLENS_CACHE"
ENV_MB = "CONVLENS_CACHE_MB"
_OFF = ("off", "0", "false", "no", "none")
_SUBDIR = "featureviz"
_STALE_TMP_S = 3600.0  # a temporary file older than this was left by a killed process


def cache_dir(cache: bool | str | os.PathLike[str] | None = True) -> Path | None:
    """The cache folder ``cache`` asks for, or None when caching is off.

    ``True``: ``$CONVLENS_CACHE`` if set (``off`` disables), else the user cache folder of the
    platform (``platformdirs.user_cache_dir("convlens")``); a path: that folder; ``False``/``None``: off.

    Args:
        cache: ``True``, ``False``, ``None`` or a folder.
    Returns:
        The folder (not created here), or None.
    Raises:
        ValueError: any other value.

    Example::

        cache_dir(True)            # e.g. ~/.cache/convlens
        cache_dir("/tmp/fv-cache")
    """
    if cache is None or cache is False:
        return None
    if cache is True:
        env = os.environ.get(ENV_DIR)
        if env is not None and env.strip():
            if env.strip().lower() in _OFF:
                return None
            return Path(env).expanduser()
        import platformdirs

        return Path(platformdirs.user_cache_dir("convlens"))
    if isinstance(cache, (str, os.PathLike)):
        return Path(cache).expanduser()
    raise ValueError(f"cache is True, False, None or a folder, not {cache!r}")


def limit_bytes() -> int:
    """The size limit from ``$CONVLENS_CACHE_MB`` (a positive number of megabytes) or :data:`DEFAULT_MB`.

    Returns:
        The limit in bytes.
    Raises:
        ValueError: ``$CONVLENS_CACHE_MB`` is not a positive finite number.
    """
    text = os.environ.get(ENV_MB, "").strip()
    if not text:
        return int(DEFAULT_MB * 2**20)
    try:
        mb = float(text)
    except ValueError:
        raise ValueError(f"{ENV_MB} must be a number of megabytes, not {text!r}") from None
    if not mb > 0 or mb == float("inf"):
        raise ValueError(f"{ENV_MB} must be a positive number of megabytes, not {text!r}")
    return int(mb * 2**20)


def model_digest(model: nn.Module) -> str:
    """A stable SHA-256 of the model's architecture (its ``repr``) and every state-dict tensor
    (name, dtype, shape, bytes), computed once per model and remembered until a tensor changes.

    The memo is keyed on each tensor's in-place version counter and storage address, so loading
    new weights or an optimiser step gives a new digest without hashing the weights on every call.

    Args:
        model: the model, on any device (tensors are copied to the CPU for hashing).
    Returns:
        64 hexadecimal digits.

    Example::

        d = model_digest(load_model().model)   # 64 hex digits
        assert d == model_digest(load_model().model)
    """
    from .layers import remembered

    state = model.state_dict(keep_vars=True)
    stamp = tuple((k, v._version, v.data_ptr()) for k, v in state.items())

    def compute() -> str:
        h = hashlib.sha256()
        h.update(f"{type(model).__module__}.{type(model).__qualname__}\n{model!r}\n".encode())
        for k, v in state.items():
            t = v.detach()
            h.update(f"{k}|{t.dtype}|{tuple(t.shape)}\n".encode())
            h.update(_bytes(t.cpu().contiguous()))
        return h.hexdigest()

    return remembered(model, ("convlens.cache.model_digest", stamp), compute)


def _bytes(t: Any) -> bytes:
    """The raw bytes of a contiguous CPU tensor of any dtype (bfloat16 and bool included)."""
    import torch

    flat = t.reshape(-1)
    if flat.dtype == torch.bool:
        flat = flat.to(torch.uint8)
    return flat.view(torch.uint8).numpy().tobytes()


def entry_key(fields: Mapping[str, Any]) -> str:
    """The file key of a cache entry: SHA-256 of the fields as canonical JSON (sorted keys; values
    JSON cannot hold are written with ``str``).

    Args:
        fields: everything the entry depends on.
    Returns:
        64 hexadecimal digits.
    """
    text = json.dumps(fields, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


class FeatureCache:
    """Entries of arrays (``dict[str, np.ndarray]``) by key in ``folder``/featureviz, size-bounded.

    Args:
        folder: the cache folder (created on the first write).
        max_bytes: the size limit (default :func:`limit_bytes`, which raises ``ValueError`` for a
            bad ``$CONVLENS_CACHE_MB``).

    Example::

        fc = FeatureCache("/tmp/c"); fc.put("k", {"image": a})
        assert (fc.get("k")["image"] == a).all()
    """

    def __init__(self, folder: str | os.PathLike[str], max_bytes: int | None = None) -> None:
        self.folder = Path(folder) / _SUBDIR
        self.max_bytes = limit_bytes() if max_bytes is None else int(max_bytes)

    def path(self, key: str) -> Path:
        """Where the entry ``key`` lives."""
        return self.folder / f"{key}.npz"

    def get(self, key: str) -> dict[str, np.ndarray] | None:
        """The arrays stored under ``key``, or None (a missing or unreadable entry is a miss)."""
        path = self.path(key)
        try:
            with np.load(path, allow_pickle=False) as z:
                out = {name: z[name] for name in z.files}
        except FileNotFoundError:
            return None
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:  # damaged: drop it, compute afresh
            log.warning("feature-visualisation cache: ignoring unreadable %s (%s)", path.name, e)
            _unlink(path)
            return None
        try:
            os.utime(path)  # last use: what the size bound removes first is what was not used for longest
        except OSError:
            pass
        return out

    def put(self, key: str, arrays: Mapping[str, np.ndarray]) -> bool:
        """Store ``arrays`` under ``key`` atomically; False (logged) when the folder is not writable."""
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".npz", dir=self.folder)
            try:
                with os.fdopen(fd, "wb") as f:
                    np.savez(f, **arrays)
                os.replace(tmp, self.path(key))
            finally:
                if os.path.exists(tmp):
                    _unlink(Path(tmp))
        except OSError as e:
            log.warning("feature-visualisation cache: cannot write to %s: %s", self.folder, e)
            return False
        return True

    def entries(self) -> list[tuple[float, int, Path]]:
        """``(last use, bytes, path)`` of every entry, oldest first."""
        out = []
        try:
            scan = list(os.scandir(self.folder))
        except OSError:
            return []
        now = time.time()
        for e in scan:
            try:
                st = e.stat()
            except OSError:
                continue  # removed by another process meanwhile
            if e.name.startswith(".tmp-"):
                if now - st.st_mtime > _STALE_TMP_S:
                    _unlink(Path(e.path))
                continue
            if e.name.endswith(".npz"):
                out.append((st.st_mtime, st.st_size, Path(e.path)))
        return sorted(out)

    def size(self) -> int:
        """Total bytes of the entries."""
        return sum(s for _, s, _ in self.entries())

    def prune(self) -> int:
        """Remove the least recently used entries until the cache fits its limit; the count removed."""
        entries = self.entries()
        total = sum(s for _, s, _ in entries)
        removed = 0
        for _, size, path in entries:
            if total <= self.max_bytes:
                break
            _unlink(path)
            total -= size
            removed += 1
        if removed:
            log.info("feature-visualisation cache: removed %d old entries (limit %.0f MB)", removed,
                     self.max_bytes / 2**20)
        return removed


def open_cache(cache: bool | str | os.PathLike[str] | None) -> FeatureCache | None:
    """A :class:`FeatureCache` in the folder :func:`cache_dir` gives, or None when off.

    Raises:
        ValueError: a bad ``cache`` or ``$CONVLENS_CACHE_MB``.
    """
    folder = cache_dir(cache)
    return None if folder is None else FeatureCache(folder)


def _unlink(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass
    except OSError as e:
        log.debug("cannot remove %s: %s", path, e)
