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

A cache folder is shared and may be edited, so an entry proves what it is: it stores its own key,
the fields that made the key and a SHA-256 of its arrays (``__convlens__``), and a read checks all
three, the arrays' dtype (numbers only) and that their values are finite, and drops what does not
match with one warning (a miss: recomputed and rewritten). Only a folder convlens created (it
holds the marker file :data:`MARKER`) is ever pruned, and pruning removes only files named and
made as its entries; a symlink, FIFO or device is never read.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import stat
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
MARKER = ".convlens-cache"  # in the featureviz folder: convlens made it, so it may prune it
_META = "__convlens__"
_ENTRY = re.compile(r"[0-9a-f]{64}\.npz")
_TMP = re.compile(r"\.tmp-[A-Za-z0-9_]+\.npz")
_MAX_ENTRY_BYTES = 256 << 20


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
        self._fields: dict[str, Any] = {}

    def key(self, fields: Mapping[str, Any]) -> str:
        """The key of the entry made from ``fields`` (:func:`entry_key`); :meth:`put` stores the
        fields with it, so a read can check that the entry was made from them."""
        key = entry_key(fields)
        self._fields[key] = json.loads(json.dumps(fields, sort_keys=True, default=str))
        return key

    def path(self, key: str) -> Path:
        """Where the entry ``key`` lives."""
        return self.folder / f"{key}.npz"

    def get(self, key: str) -> dict[str, np.ndarray] | None:
        """The arrays stored under ``key``, or None: a missing entry, or one that does not prove to
        be ``key``'s (another key or fields, other bytes than its digest, a dtype that is not a
        number, a value that is not finite, a file that cannot be read) is a miss, and dropped."""
        path = self.path(key)
        try:
            arrays, meta = _load(path)
        except FileNotFoundError:
            return None
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:  # damaged: drop it, compute afresh
            return self._drop(path, f"unreadable ({e})")
        why = _mismatch(key, arrays, meta, self._fields.get(key))
        if why:
            return self._drop(path, why)
        try:
            os.utime(path)  # last use: what the size bound removes first is what was not used for longest
        except OSError:
            pass
        return arrays

    def _drop(self, path: Path, why: str) -> None:
        log.warning("feature-visualisation cache: dropping %s: %s", path.name, why)
        if _owned(self.folder):
            _unlink(path)
        return None

    def put(self, key: str, arrays: Mapping[str, np.ndarray]) -> bool:
        """Store ``arrays`` under ``key`` atomically with the proof of what they are (the key, its
        fields when :meth:`key` made it, the digest); False (logged) when the folder is not writable."""
        try:
            if not self.folder.exists():
                self.folder.mkdir(parents=True)
                (self.folder / MARKER).write_text("convlens feature-visualisation cache\n")
            elif not _owned(self.folder) and _only_entries(self.folder):  # made by a convlens before the marker
                (self.folder / MARKER).write_text("convlens feature-visualisation cache\n")
            arrays = {name: np.asarray(a) for name, a in arrays.items()}
            meta = {"key": key, "fields": self._fields.get(key), "digest": _digest(arrays)}
            fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".npz", dir=self.folder)
            try:
                with os.fdopen(fd, "wb") as f:
                    np.savez(f, **arrays, **{_META: np.array(json.dumps(meta, sort_keys=True))})
                os.replace(tmp, self.path(key))
            finally:
                if os.path.exists(tmp):
                    _unlink(Path(tmp))
        except OSError as e:
            log.warning("feature-visualisation cache: cannot write to %s: %s", self.folder, e)
            return False
        return True

    def entries(self) -> list[tuple[float, int, Path]]:
        """``(last use, bytes, path)`` of every entry (a regular file named as an entry), oldest first."""
        out = []
        try:
            scan = list(os.scandir(self.folder))
        except OSError:
            return []
        now = time.time()
        for e in scan:
            try:
                st = e.stat(follow_symlinks=False)
            except OSError:
                continue  # removed by another process meanwhile
            if not stat.S_ISREG(st.st_mode):
                continue
            if _TMP.fullmatch(e.name):
                if now - st.st_mtime > _STALE_TMP_S and _owned(self.folder):
                    _unlink(Path(e.path))
                continue
            if _ENTRY.fullmatch(e.name):
                out.append((st.st_mtime, st.st_size, Path(e.path)))
        return sorted(out)

    def size(self) -> int:
        """Total bytes of the entries."""
        return sum(s for _, s, _ in self.entries())

    def prune(self) -> int:
        """Remove the least recently used entries until the cache fits its limit; the count removed.
        Only in a folder convlens made (its marker), and only files that are its entries."""
        if not _owned(self.folder):
            if self.folder.exists():
                log.info("feature-visualisation cache: %s has no %s marker, so it is never pruned", self.folder,
                         MARKER)
            return 0
        entries = self.entries()
        total = sum(s for _, s, _ in entries)
        removed = 0
        for _, size, path in entries:
            if total <= self.max_bytes:
                break
            if not _is_entry(path):
                continue
            _unlink(path)
            total -= size
            removed += 1
        if removed:
            log.info("feature-visualisation cache: removed %d old entries (limit %.0f MB)", removed,
                     self.max_bytes / 2**20)
        return removed


def _load(path: Path) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """The arrays and the proof of an entry file: a regular file (no symlink, FIFO or device) of a
    bounded size, read without pickles."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode) or st.st_size > _MAX_ENTRY_BYTES:
            raise ValueError("not a regular file of a sensible size")
        with np.load(f, allow_pickle=False) as z:
            arrays = {name: z[name] for name in z.files}
    raw = arrays.pop(_META, None)
    if raw is None or raw.dtype.kind != "U" or raw.ndim != 0:
        raise ValueError("it holds no proof of what it is (written by an older convlens?)")
    meta = json.loads(str(raw))
    if not isinstance(meta, dict):
        raise ValueError("its proof is not an object")
    return arrays, meta


def _digest(arrays: Mapping[str, np.ndarray]) -> str:
    h = hashlib.sha256()
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        h.update(f"{name}|{a.dtype.str}|{a.shape}\n".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def _mismatch(key: str, arrays: dict[str, np.ndarray], meta: dict[str, Any], fields: Any) -> str | None:
    """Why an entry read for ``key`` is not what it claims (None when it is)."""
    if meta.get("key") != key:
        return "it is the entry of another key (entries were swapped or renamed)"
    made = meta.get("fields")
    if made is not None and entry_key(made) != key:
        return "its fields do not give its key"
    if fields is not None and made != fields:
        return "it was made from other fields"
    if meta.get("digest") != _digest(arrays):
        return "its arrays do not match their digest"
    for name, a in arrays.items():
        if a.dtype.kind not in "biuf":
            return f"array {name} has dtype {a.dtype}, not a number"
        if a.dtype.kind == "f" and not np.isfinite(a).all():
            return f"array {name} holds values that are not finite"
    return None


def _owned(folder: Path) -> bool:
    """True for a folder convlens made as its cache (not a symlink, holding the marker)."""
    if folder.is_symlink() or not folder.is_dir():
        return False
    try:
        return stat.S_ISREG(os.lstat(folder / MARKER).st_mode)
    except OSError:
        return False


def _only_entries(folder: Path) -> bool:
    """True for a real folder that holds nothing but files named as cache entries."""
    if folder.is_symlink():
        return False
    try:
        return all(e.is_file(follow_symlinks=False) and (_ENTRY.fullmatch(e.name) or _TMP.fullmatch(e.name))
                   for e in os.scandir(folder))
    except OSError:
        return False


def _is_entry(path: Path) -> bool:
    """True when ``path``'s contents are an entry of the cache (its proof names its file's key)."""
    try:
        _, meta = _load(path)
    except (EOFError, zipfile.BadZipFile):  # cut short (a full disk, a kill): ours if it began as a zip
        return _ENTRY.fullmatch(path.name) is not None and _damaged_zip(path)
    except (OSError, ValueError):  # a whole file without our proof: not ours to remove
        return False
    return meta.get("key") == path.name[: -len(".npz")]


def _damaged_zip(path: Path) -> bool:
    """A damaged entry (cut short by a full disk) that started as one of ours: a zip header."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
        with os.fdopen(fd, "rb") as f:
            return stat.S_ISREG(os.fstat(f.fileno()).st_mode) and f.read(4) == b"PK\x03\x04"
    except OSError:
        return False


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
