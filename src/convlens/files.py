"""The files convlens writes one at a time: names, Ctrl-C / SIGTERM, atomic writes, the files of each result.

Naming: every image gets a *key*, its whole file name made safe (``cat.v2.jpg`` -> ``cat.v2.jpg``);
its results go into the folder ``<out>/<key>/`` (``gradcam.png``, ``gradcam.npy``, ...). A name that
had to be changed (control characters, undecodable bytes, ``/ \\ : * ? " < > |``, a leading dot,
over :data:`MAX_KEY_BYTES` bytes) or that repeats an earlier key of the run (``a/cat.png`` and
``b/cat.png``, also differing only in case) gets ``~`` and 8 hex digits of the SHA-1 of the
source's full path, so keys are unique within a run and the same for the same inputs.

Every rename goes through :func:`_rename`, where the crash tests stop the process
(:data:`FAULT_ENV`). Library ``save()`` calls write each file to a temporary name beside it and
rename it; they refuse a file they did not write in this process unless ``force=True``. A run over
many images (staging, manifest, lock, ``--force``'s swap) is :mod:`convlens.outputs`.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import logging
import math
import os
import re
import signal
import stat
import sys
import tempfile
import threading
import unicodedata
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

import numpy as np

from ._names import INTENT, JOURNAL, LOCK, MANIFEST, STAGING_PREFIX, printable

__all__ = [
    "MAX_KEY_BYTES", "DiskFullError", "atomic_path", "check_interrupt", "hold_interrupts", "image_keys",
    "interruptible", "printable", "resolve_out", "safe_key", "save_files", "to_json", "write_file",
]

log = logging.getLogger(__name__)

OLD = ".old"  # inside a staging folder: the entries a swap moved aside
FAULT_ENV = "CONVLENS_FAULT"  # tests: "rename:K:kill|term|enospc" acts before the K-th rename of the process
#: top-level names no image key may take (compared case-insensitively)
RESERVED = frozenset({"report.html", "summary.json", "summary.csv", MANIFEST, JOURNAL, LOCK, INTENT})
MAX_KEY_BYTES = 120
_BAD_CHARS = set('/\\:*?"<>|')

Writer = Callable[[IO[bytes]], None]


# -- names ----------------------------------------------------------------------------------
def _digest(source: Any) -> str:
    raw = os.fsencode(os.path.abspath(source)) if isinstance(source, (str, os.PathLike)) else str(source).encode(
        "utf-8", "surrogateescape")
    return hashlib.sha1(raw).hexdigest()[:8]


def safe_key(name: str) -> tuple[str, bool]:
    """``(key, changed)``: ``name`` as one safe path component, and whether it had to change.

    Keeps letters of any script, digits, spaces and punctuation; replaces path separators,
    characters Windows forbids, control/format characters and undecodable bytes by ``_``; a
    leading dot or space by ``_``; cuts to :data:`MAX_KEY_BYTES` UTF-8 bytes.

    Example::

        safe_key("cat.v2.jpg")  # ('cat.v2.jpg', False)
    """
    chars = []
    for ch in name:
        o = ord(ch)
        bad = ch in _BAD_CHARS or 0xD800 <= o <= 0xDFFF or unicodedata.category(ch) in ("Cc", "Cf", "Zl", "Zp")
        chars.append("_" if bad else ch)
    key = "".join(chars).rstrip(" .")
    if key[:1] in (".", " ", "-"):
        key = "_" + key[1:]
    data = key.encode("utf-8")
    if len(data) > MAX_KEY_BYTES:
        key = data[:MAX_KEY_BYTES].decode("utf-8", "ignore").rstrip(" .")
    key = key or "image"
    return key, key != name


def image_keys(names: Sequence[str], sources: Sequence[Any] | None = None) -> list[str]:
    """Unique keys (folder names) for a run's images, from their whole file names.

    A changed or repeated name gets ``~`` and 8 hex digits of the SHA-1 of its source's absolute
    path (its name when there is no path), then ``-2``, ``-3`` if that still repeats.

    Example::

        image_keys(["cat.png", "cat.png"], ["a/cat.png", "b/cat.png"])  # ['cat.png', 'cat.png~1b2c...']
    """
    sources = list(sources) if sources is not None else list(names)
    keys: list[str] = []
    seen = {r.lower() for r in RESERVED}
    for name, src in zip(names, sources):
        base, changed = safe_key(str(name))
        key = base
        if changed or key.lower() in seen or key.lower().startswith(STAGING_PREFIX):
            key = f"{base}~{_digest(src)}"
        n = 1
        while key.lower() in seen:
            n += 1
            key = f"{base}~{_digest(src)}-{n}"
        seen.add(key.lower())
        keys.append(key)
    return keys


# -- Ctrl-C ---------------------------------------------------------------------------------
_state = threading.local()
_pending: dict[str, Any] = {"interrupt": False, "signal": signal.SIGINT}


def last_signal() -> int:
    """The signal behind the last interrupt (``SIGINT`` or ``SIGTERM``)."""
    return int(_pending["signal"])


def check_interrupt() -> None:
    """Raise ``KeyboardInterrupt`` when a Ctrl-C arrived that something swallowed (a weakref
    callback, a ``finally`` in third-party code). Called between steps of a run."""
    if _pending["interrupt"]:
        _pending["interrupt"] = False
        raise KeyboardInterrupt


@contextlib.contextmanager
def interruptible() -> Iterator[None]:
    """Within the block, Ctrl-C (and ``SIGTERM``) raises ``KeyboardInterrupt`` and is also
    remembered, so :func:`check_interrupt` re-raises it if it was swallowed. The CLI wraps each
    command in it."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        _pending["interrupt"], _pending["signal"] = True, signum
        if getattr(_state, "held", 0):
            return  # raised when the held section ends
        raise KeyboardInterrupt

    def unraisable(info: Any) -> None:
        # a Ctrl-C that lands in a weakref callback or __del__ cannot propagate: Python would print
        # "Exception ignored in ..." and go on; it is remembered (handler) and raised at the next step
        if isinstance(info.exc_value, KeyboardInterrupt):
            _pending["interrupt"] = True
            return
        old_hook(info)

    _pending["interrupt"], _pending["signal"] = False, signal.SIGINT
    old = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    old_hook, sys.unraisablehook = sys.unraisablehook, unraisable
    try:
        yield
    finally:
        for sig, previous in old.items():
            signal.signal(sig, previous)
        sys.unraisablehook = old_hook


@contextlib.contextmanager
def hold_interrupts() -> Iterator[None]:
    """Hold Ctrl-C back during a few renames that must happen together; it is raised after."""
    _state.held = getattr(_state, "held", 0) + 1
    try:
        yield
    finally:
        _state.held -= 1
    if not _state.held:
        check_interrupt()


# -- renames: every rename of a run goes through _rename (the fault-injection point) -----------
_RENAMES = [0]  # renames this process made (the count CONVLENS_FAULT's K refers to)


class DiskFullError(OSError):
    """The device holding ``path`` is full; nothing of the earlier run was replaced."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        super().__init__(errno.ENOSPC, "no space left on the device", os.fspath(path))

    def __str__(self) -> str:
        return f"{printable(self.filename)}: no space left on the device; free some space and run again"


_PARTIAL_WRITE = re.compile(r"\d+ requested and \d+ written")  # numpy's tofile on a full disk (no errno)


def _disk_full(e: OSError, path: str | os.PathLike[str]) -> OSError:
    """``e`` as a :class:`DiskFullError` naming ``path`` when it says the disk is full."""
    if isinstance(e, DiskFullError) or not (e.errno in (errno.ENOSPC, errno.EDQUOT) or _PARTIAL_WRITE.search(str(e))):
        return e
    return DiskFullError(path)


def _fault(dst: str | os.PathLike[str]) -> None:
    """The test hook: ``CONVLENS_FAULT="rename:K:ACTION"`` kills the process (``kill``), sends it
    SIGTERM (``term``) or fails with a full disk (``enospc``) just before its K-th rename."""
    spec = os.environ.get(FAULT_ENV, "").split(":")
    if len(spec) != 3 or spec[0] != "rename" or spec[1] != str(_RENAMES[0]):
        return
    if spec[2] == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif spec[2] == "term":
        os.kill(os.getpid(), signal.SIGTERM)
    elif spec[2] == "enospc":
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), os.fspath(dst))


def _renameat2() -> Callable[..., int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # not glibc >= 2.28
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_EXCHANGE: list[Any] = []


def _exchange(a: Path, b: Path) -> bool:
    """Swap ``a`` and ``b`` in one step (Linux ``renameat2(RENAME_EXCHANGE)``); False where the
    system or file system cannot (the caller then moves one aside and the other in)."""
    if not _EXCHANGE:
        _EXCHANGE.append(_renameat2())
    fn = _EXCHANGE[0]
    if fn is None:
        return False
    import ctypes

    if fn(-100, os.fsencode(a), -100, os.fsencode(b), 2) == 0:  # AT_FDCWD, RENAME_EXCHANGE
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), os.fspath(b))


def _rename(src: str | os.PathLike[str], dst: str | os.PathLike[str], *, exchange: bool = False) -> bool:
    """Rename ``src`` to ``dst`` (replacing it), or with ``exchange`` swap the two when the system
    can; returns False only when an exchange was asked for, ``dst`` exists and the system cannot
    swap (nothing was done then). Every rename and replace of a run goes through here, so the
    crash tests can stop the process before each one (:data:`FAULT_ENV`)."""
    _RENAMES[0] += 1
    _fault(dst)
    if exchange and os.path.lexists(dst):
        return _exchange(Path(src), Path(dst))
    os.replace(src, dst)
    return True


# -- single files -----------------------------------------------------------------------------
_WRITTEN: set[str] = set()  # resolved paths this process wrote: a library save() may replace them


def _umask_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path in ``path``'s folder; it is renamed to ``path`` only if the block
    succeeds (an existing ``path``, even a symlink, is replaced, never written through), so an
    interrupted write never leaves a half-written file.

    Example::

        with atomic_path("out/a.txt") as tmp: tmp.write_text("hi")
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = ""
    try:
        # a short temporary name: a 240-byte output name must not make a 260-byte temporary one
        fd, tmp = tempfile.mkstemp(prefix=".convlens-", suffix=".tmp", dir=path.parent)
        os.close(fd)
        os.chmod(tmp, _umask_mode())  # mkstemp makes the file private (0600)
        try:
            yield Path(tmp)
            _rename(tmp, path)
        except OSError as e:
            raise _disk_full(e, path) from e
        _WRITTEN.add(os.path.realpath(path))
    finally:
        if tmp:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)


def write_file(path: str | os.PathLike[str], data: bytes | Writer) -> Path:
    """Write ``data`` (bytes, or a function writing to a binary file) to ``path`` atomically."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data) if isinstance(data, (bytes, bytearray)) else data(f)
    return Path(path)


def _clean(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, Mapping):  # dicts and the settings dataclasses
        return {printable(k): _clean(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_clean(x) for x in v]
    if isinstance(v, str):
        return printable(v)  # valid UTF-8 JSON, no terminal escapes, whatever the file names hold
    if v is None or isinstance(v, (int, float, bool)):
        return v
    if hasattr(v, "tolist"):
        return _clean(v.tolist())
    return str(v)


def to_json(data: dict[str, Any]) -> str:
    """Strict JSON (non-finite numbers become null; other objects their ``str``): every JSON file
    convlens writes (``summary.json``, a result's ``save()``)."""
    return json.dumps(_clean(data), indent=2, ensure_ascii=False, allow_nan=False) + "\n"


def npy_writer(array: np.ndarray) -> Writer:
    """A writer of ``array`` as ``.npy``."""
    return lambda f: np.save(f, np.asarray(array))


def figure_writer(fig: Any, dpi: int = 120) -> Writer:
    """A writer of a matplotlib figure as PNG."""
    return lambda f: fig.savefig(f, format="png", dpi=dpi, bbox_inches="tight")


def png_writer(rgb_uint8: np.ndarray) -> Writer:
    """A writer of an (H, W, 3) uint8 array as PNG, pixel for pixel."""
    from PIL import Image

    return lambda f: Image.fromarray(rgb_uint8, mode="RGB").save(f, format="PNG")


def save_files(files: Sequence[tuple[Path, Writer | bytes]], *, force: bool = False) -> list[Path]:
    """Write ``files`` (``(path, data)``) for a library ``save()``: first check that none would
    replace a file this process did not write (unless ``force``), then write each atomically.

    Example::

        save_files([(Path("out/cam.png"), png_bytes)])
    """
    paths = [Path(p) for p, _ in files]
    if len({os.path.realpath(p) for p in paths}) != len(paths):
        raise ValueError("two outputs of one save() would have the same name")
    for p in paths:
        real = os.path.realpath(p)
        if os.path.lexists(p) and not force:
            if os.path.isdir(p) and not os.path.islink(p):
                raise IsADirectoryError(f"{printable(p)} is a folder")
            if os.path.islink(p) or real not in _WRITTEN:
                raise FileExistsError(
                    f"{printable(p)} exists and this session did not write it (an earlier run or another program did); "
                    "pass force=True to replace it")
        elif not os.path.lexists(p):
            _check_parent(p.parent)
    written = []
    for p, data in files:
        check_interrupt()
        written.append(write_file(p, data))
    return written


def _check_parent(folder: Path) -> None:
    probe = Path(os.path.realpath(folder))
    while not probe.exists():
        if os.path.lexists(probe):
            raise NotADirectoryError(f"{printable(folder)}: a dangling symlink is in the way")
        probe = probe.parent
    if not probe.is_dir():
        raise NotADirectoryError(f"{printable(folder)}: {printable(probe)} is a file, not a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise PermissionError(f"{printable(folder)}: cannot write in {printable(probe)}")


def resolve_out(path: str | os.PathLike[str]) -> Path:
    """The output folder with symlinks and ``..`` resolved, checked before any work: it must be a
    folder or creatable (no file or dangling symlink in the way) and writable.

    Example::

        resolve_out("out/nonexist/../o")  # Path('/abs/out/o'); creates nothing
    """
    p = Path(path)
    if os.path.islink(p) and not p.exists():
        raise NotADirectoryError(f"--out {printable(p)} is a dangling symlink")
    real = Path(os.path.realpath(p))
    if real.exists() and not real.is_dir():
        raise NotADirectoryError(f"--out {printable(p)} exists and is not a folder")
    _check_parent(real)
    return real


def to_bytes(writer: Writer) -> bytes:
    """What ``writer`` writes, as bytes."""
    buf = io.BytesIO()
    writer(buf)
    return buf.getvalue()


def is_regular(path: Path) -> bool:
    """True for a regular file (after symlinks)."""
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except OSError:
        return False


# -- the files of each result ----------------------------------------------------------------
def _base(path: str | os.PathLike[str]) -> Path:
    """``path`` without a ``.png``/``.npy`` suffix; any other dot stays (``cam.v2`` -> ``cam.v2.png``)."""
    p = Path(path)
    return p.with_name(p.stem) if p.suffix.lower() in (".png", ".npy") else p


def saliency_files(result: Any, path: str | os.PathLike[str], *, index: int | None = None,
                   **plot_args: Any) -> list[tuple[Path, Writer]]:
    """The files of a :class:`~convlens.results.Saliency`: ``<path>.png`` (figure) and ``<path>.npy``
    (raw map) per row; with several rows ``<path>_<row>.png`` ... (rows are images or targets)."""
    base = _base(path)
    rows = range(result.maps.shape[0]) if index is None else [index]
    files: list[tuple[Path, Writer]] = []
    arrays = result.to_numpy()
    for i in rows:
        stem = base.name if len(rows) == 1 else f"{base.name}_{i}"
        files.append((base.with_name(stem + ".png"), _lazy_figure(result.plot, index=i, **plot_args)))
        files.append((base.with_name(stem + ".npy"), npy_writer(arrays[i])))
    return files


def activations_files(result: Any, directory: str | os.PathLike[str], *, prefix: str = "activations",
                      **plot_args: Any) -> list[tuple[Path, Writer]]:
    """The files of an :class:`~convlens.results.Activations`: ``<prefix>_<layer>.npy`` per layer,
    ``<prefix>.png`` (``<prefix>_<i>.png`` per image when there are several)."""
    d = Path(directory)
    files: list[tuple[Path, Writer]] = [
        (d / f"{prefix}_{safe_key(name)[0]}.npy", npy_writer(arr)) for name, arr in result.to_numpy().items()
    ]
    n = result.images.shape[0]
    for i in range(n):
        png = d / (f"{prefix}.png" if n == 1 else f"{prefix}_{i}.png")
        files.append((png, _lazy_figure(result.plot, index=i, **plot_args)))
    return files


def feature_files(result: Any, path: str | os.PathLike[str]) -> list[tuple[Path, Writer]]:
    """The files of a :class:`~convlens.results.FeatureImages`: ``<path>_<i>_c<channel>.png`` per
    image (exact pixels), ``<path>.npy`` (all images) and ``<path>_grid.png`` (the figure)."""
    base = _base(path)
    files: list[tuple[Path, Writer]] = []
    for i, unit in enumerate(result.channels):
        tag = "layer" if unit is None else f"c{safe_key(str(unit))[0]}"
        files.append((base.with_name(f"{base.name}_{i}_{tag}.png"), png_writer(result.uint8(i))))
    files.append((base.with_name(base.name + ".npy"), npy_writer(result.to_numpy())))
    files.append((base.with_name(base.name + "_grid.png"), _lazy_figure(result.plot)))
    return files


def figure_and_array_files(result: Any, path: str | os.PathLike[str], **plot_args: Any) -> list[tuple[Path, Writer]]:
    """``<path>.png`` (``result.plot(**plot_args)``) and ``<path>.npy`` (``result.to_numpy()``): the
    files of a metric result (deletion/insertion curves, a sanity check, class sensitivity)."""
    base = _base(path)
    return [(base.with_name(base.name + ".png"), _lazy_figure(result.plot, **plot_args)),
            (base.with_name(base.name + ".npy"), npy_writer(result.to_numpy()))]


def result_files(result: Any, folder: str | os.PathLike[str], name: str) -> list[tuple[Path, Writer]]:
    """The files of ``result.save(folder, name)``: ``<name>.png`` (``result.plot()``), ``<name>.npy``
    (its main array; ``<name>.npz`` when it has several, a dict of arrays) and ``<name>.json``
    (``result.to_dict()``, strict JSON)."""
    d = Path(folder)
    if not name or name in (".", "..") or any(c in name for c in "/\\\0"):
        raise ValueError(f"name {name!r} must be a file name without a folder")
    arrays = result._array()
    if isinstance(arrays, dict):
        data: Writer = lambda f: np.savez(f, **arrays)  # noqa: E731
        array = (d / f"{name}.npz", data)
    else:
        array = (d / f"{name}.npy", npy_writer(arrays))
    text = to_json(result.to_dict()).encode("utf-8")
    return [(d / f"{name}.png", _lazy_figure(result.plot)), array, (d / f"{name}.json", text)]


def _lazy_figure(plot: Callable[..., Any], *args: Any, **kwargs: Any) -> Writer:
    def write(f: IO[bytes]) -> None:
        figure_writer(plot(*args, **kwargs))(f)

    return write
