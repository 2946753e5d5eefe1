"""Reading a run folder, which is untrusted input: the one reader of what a run left behind.

People copy, sync, merge and edit output folders; shards arrive from other machines. So
everything ``--resume``, ``--force`` and ``convlens report`` read from a run (manifest, journal,
intent record, per-image ``summary.json``, thumbnails) goes through here:

- only regular files and folders that are not symlinks, opened component by component with
  ``O_NOFOLLOW`` below the run's folder (nothing outside it is ever read), a FIFO or device is
  refused without blocking (``O_NONBLOCK``, then ``fstat``);
- at most a fixed number of bytes per file (:data:`LIMITS`);
- JSON nested at most :data:`MAX_DEPTH` deep, validated against a schema with pydantic (strict
  types, no coercion; pydantic because it is well kept, already comes with the stack and names
  the failing field's path in its errors, which is what a user needs to fix a file). The
  manifest, journal and intent record are convlens's alone: an unknown field is an error. A
  per-image ``summary.json`` has its known fields checked and may carry more (other techniques
  add theirs); names and paths in it are never followed.

A failure is a :class:`RunFolderError` naming the file and the field; callers treat that part as
damaged (``report`` lists the image as damaged and goes on, ``--resume`` explains it again,
``--force`` moves it aside) and never crash.
"""

from __future__ import annotations

import errno
import json
import os
import stat
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError

from ._names import INTENT, JOURNAL, MANIFEST, STAGING_PREFIX, printable

__all__ = ["LIMITS", "MAX_DEPTH", "RunFolderError", "is_dir", "is_file", "read_bytes", "read_intent", "read_json",
           "read_manifest_file", "read_summary", "read_thumbnail", "validate_record"]

MAX_DEPTH = 32
#: the most bytes read of each kind of file
LIMITS = {MANIFEST: 256 << 20, JOURNAL: 256 << 20, INTENT: 64 << 20, "summary.json": 8 << 20,
          "thumbnail.jpg": 2 << 20}
_DEFAULT_LIMIT = 8 << 20


class RunFolderError(ValueError):
    """A file of a run folder that cannot be used as it is: the message names the file and why."""


# -- files ------------------------------------------------------------------------------------
def _parts(rel: str) -> list[str]:
    parts = rel.split("/")
    if rel.startswith("/") or any(p in ("", ".", "..") or "\\" in p or "\0" in p for p in parts):
        raise RunFolderError(f"{printable(rel)}: not a path inside the run")
    return parts


def _open(root: Path, rel: str, *, directory: bool) -> int:
    """A descriptor of ``root/rel`` opened without following any symlink below ``root``."""
    parts = _parts(rel)
    if os.open not in os.supports_dir_fd:  # (Windows) each component checked, then opened
        path = root
        for part in parts:
            path = path / part
            if stat.S_ISLNK(os.lstat(path).st_mode):
                raise RunFolderError(f"{printable(root / rel)}: a symlink (a run's files are never followed out of it)")
        return os.open(path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
    fd = os.open(root, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
            if not last or directory:
                flags |= getattr(os, "O_DIRECTORY", 0)
            try:
                nfd = os.open(part, flags, dir_fd=fd)
            except OSError as e:
                if e.errno in (errno.ELOOP, errno.EMLINK):
                    raise RunFolderError(f"{printable(root / rel)}: a symlink (a run's files are never followed "
                                         "out of it)") from None
                if e.errno == errno.ENOTDIR:
                    raise RunFolderError(f"{printable(root / rel)}: not a folder where one belongs") from None
                raise
            os.close(fd)
            fd = nfd
        return fd
    except BaseException:
        os.close(fd)
        raise


def read_bytes(root: str | os.PathLike[str], rel: str, limit: int | None = None) -> bytes:
    """The bytes of the regular file ``root/rel`` (no symlink on the way, at most ``limit`` bytes).

    Example::

        read_bytes("out", "cat.jpg/thumbnail.jpg", 2 << 20)
    """
    root = Path(root)
    limit = LIMITS.get(rel.rsplit("/", 1)[-1], _DEFAULT_LIMIT) if limit is None else limit
    fd = _open(root, rel, directory=False)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise RunFolderError(f"{printable(root / rel)}: not a regular file (a FIFO, device or folder)")
        if st.st_size > limit:
            raise RunFolderError(f"{printable(root / rel)}: {st.st_size} bytes, over the limit of {limit}")
        with os.fdopen(os.dup(fd), "rb") as f:
            data = f.read(limit + 1)
        if len(data) > limit:
            raise RunFolderError(f"{printable(root / rel)}: over the limit of {limit} bytes")
        return data
    finally:
        os.close(fd)


def is_file(root: str | os.PathLike[str], rel: str) -> bool:
    """True when ``root/rel`` is a regular file reached without a symlink."""
    try:
        fd = _open(Path(root), rel, directory=False)
    except (OSError, RunFolderError):
        return False
    try:
        return stat.S_ISREG(os.fstat(fd).st_mode)
    finally:
        os.close(fd)


def is_dir(root: str | os.PathLike[str], rel: str) -> bool:
    """True when ``root/rel`` is a folder reached without a symlink."""
    try:
        if os.open not in os.supports_dir_fd:  # (Windows: a folder cannot be opened) each component checked
            path = Path(root)
            for part in _parts(rel):
                path = path / part
                if stat.S_ISLNK(os.lstat(path).st_mode):
                    return False
            return stat.S_ISDIR(os.lstat(path).st_mode)
        os.close(_open(Path(root), rel, directory=True))
        return True
    except (OSError, RunFolderError):
        return False


def _depth_ok(value: Any) -> bool:
    stack = [(value, 1)]
    while stack:
        v, d = stack.pop()
        if isinstance(v, (dict, list)):
            if d > MAX_DEPTH:
                return False
            stack += [(x, d + 1) for x in (v.values() if isinstance(v, dict) else v)]
    return True


def parse_json(data: bytes, where: str) -> Any:
    """JSON from ``data`` with the depth limit; errors name ``where``."""
    try:
        value = json.loads(data.decode("utf-8"))
    except RecursionError:
        value = None
        deep = True
    except (UnicodeDecodeError, ValueError) as e:
        raise RunFolderError(f"{where}: not valid JSON ({printable(str(e).splitlines()[0])})") from None
    else:
        deep = not _depth_ok(value)
    if deep:
        raise RunFolderError(f"{where}: JSON nested deeper than {MAX_DEPTH} levels")
    return value


def read_json(root: str | os.PathLike[str], rel: str, limit: int | None = None) -> Any:
    """The JSON value in ``root/rel`` (see :func:`read_bytes` and :func:`parse_json`)."""
    return parse_json(read_bytes(root, rel, limit), printable(Path(root) / rel))


# -- schemas ----------------------------------------------------------------------------------
def _name(v: str) -> str:
    if v in ("", ".", "..") or set(v) & {"/", "\\", "\0"} or v.startswith(STAGING_PREFIX):
        raise ValueError("not a plain name in the run folder")
    return v


def _rel(v: str) -> str:
    try:
        _parts(v)
    except RunFolderError:
        raise ValueError("not a path inside the run folder") from None
    return v


Name = Annotated[str, AfterValidator(_name)]
Rel = Annotated[str, AfterValidator(_rel)]


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")


class ImageRecord(_Strict):
    key: Name
    name: str = ""
    ok: bool = False
    files: list[Rel] = []
    source: str | None = None
    source_hex: Annotated[str, AfterValidator(lambda v: bytes.fromhex(v) and v)] | None = None
    size: int | None = None
    mtime_ns: int | None = None
    sha256: str | None = None
    errors: dict[str, str] | None = None


class Manifest(_Strict):
    format: Literal["convlens-manifest"]
    version: int
    convlens: str | None = None
    command: str
    run: str
    created: str = ""
    updated: str = ""
    complete: bool
    settings: dict[str, Any] = {}
    files: list[Name] = []
    images: list[dict[str, Any]] = []  # each record is checked alone: one bad record damages one image


class JournalLine(_Strict):
    run: str
    image: dict[str, Any]


class Intent(_Strict):
    format: Literal["convlens-intent"]
    staging: Annotated[str, AfterValidator(lambda v: v if v.startswith(STAGING_PREFIX) and "/" not in v else
                                           _fail("not a staging folder of this run folder"))]
    old: list[Name]
    new: dict[Name, Annotated[list[int], Field(min_length=2, max_length=2)]]


class Prediction(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")
    label: str
    index: int
    probability: float | None


class Target(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")
    index: int | None = None
    label: str | None = None


class ImageSummary(BaseModel):
    """A per-image ``summary.json``: the fields convlens reads are checked; others are kept as data."""

    model_config = ConfigDict(strict=True, extra="allow")
    name: str
    source: str | None = None
    folder: str | None = None
    ok: bool = False
    original_size: Annotated[list[int], Field(min_length=2, max_length=2)] | None = None
    predictions: list[Prediction] = []
    target: Target | None = None
    layers: dict[str, Any] = {}
    channels: dict[str, Any] = {}
    timings: dict[str, float | None] = {}
    agreement: dict[str, Any] | None = {}
    errors: dict[str, str] = {}
    notes: dict[str, Any] = {}
    trust: dict[str, Any] | None = None
    files: list[Rel] = []


class RunSummary(BaseModel):
    """A run's top-level ``summary.json`` (what ``report`` takes from it)."""

    model_config = ConfigDict(strict=True, extra="allow")
    convlens: str | None = None
    model: dict[str, Any] | None = None
    methods: list[str] | None = None
    settings: dict[str, Any] | None = None
    versions: dict[str, Any] | None = None
    skipped: list[dict[str, str]] = []


def _fail(msg: str) -> Any:
    raise ValueError(msg)


def _check(model: type[BaseModel], value: Any, where: str, *, unset: bool = True) -> dict[str, Any]:
    try:
        return model.model_validate(value).model_dump(exclude_unset=not unset)
    except ValidationError as e:
        err = e.errors()[0]
        field = ".".join(str(p) for p in err["loc"]) or "(the whole file)"
        raise RunFolderError(f"{where}: field {printable(field)}: {printable(err['msg'])}") from None


# -- what a run holds ---------------------------------------------------------------------------
def validate_record(rec: Any, where: str) -> dict[str, Any]:
    """One image record of a manifest or journal, checked: its files lie inside its own folder."""
    out = _check(ImageRecord, rec, where, unset=False)
    out.setdefault("files", [])
    bad = [f for f in out["files"] if not f.startswith(out["key"] + "/")]
    if bad:
        raise RunFolderError(f"{where}: field files: {printable(bad[0])} is not in the image's folder")
    return out


def read_manifest_file(root: str | os.PathLike[str]) -> dict[str, Any]:
    """The manifest of the run in ``root`` with its journal applied; its ``images`` are the valid
    records, ``damaged`` lists ``{"key", "error"}`` of records that are not (``key`` None when
    it is not a plain name). Raises :class:`RunFolderError` when the manifest itself is not usable."""
    root = Path(root)
    where = printable(root / MANIFEST)
    data = _check(Manifest, read_json(root, MANIFEST), where)
    images: dict[str, dict[str, Any]] = {}
    damaged: dict[Any, dict[str, Any]] = {}

    def add(rec: Any, at: str) -> None:
        try:
            good = validate_record(rec, at)
        except RunFolderError as e:
            key = rec.get("key") if isinstance(rec, dict) else None
            key = key if isinstance(key, str) and _plain(key) else None
            damaged[key if key is not None else len(damaged)] = {"key": key, "error": str(e)}
            images.pop(key, None) if key is not None else None
            return
        images[good["key"]] = good
        damaged.pop(good["key"], None)

    for i, rec in enumerate(data["images"]):
        add(rec, f"{where}: images.{i}")
    try:
        lines = read_bytes(root, JOURNAL).splitlines()
    except FileNotFoundError:
        lines = []
    except RunFolderError:
        lines = []  # a journal that is a symlink, FIFO or too big is ignored: the manifest stands
    for n, line in enumerate(lines, 1):
        try:
            entry = _check(JournalLine, parse_json(line, f"{printable(root / JOURNAL)} line {n}"),
                           f"{printable(root / JOURNAL)} line {n}")
        except RunFolderError:
            continue  # a torn last line (a kill) or an edited one: that image is not recorded
        if entry["run"] == data["run"]:  # a journal left by another run (a crash between rewrite and removal)
            add(entry["image"], f"{printable(root / JOURNAL)} line {n}")
    data["images"] = list(images.values())
    data["damaged"] = list(damaged.values())
    return data


def _plain(name: str) -> bool:
    try:
        _name(name)
        return True
    except ValueError:
        return False


def read_intent(root: str | os.PathLike[str]) -> dict[str, Any]:
    """The intent record of a swap in ``root`` (see :func:`convlens.outputs.recover`)."""
    return _check(Intent, read_json(root, INTENT), printable(Path(root) / INTENT))


def read_summary(root: str | os.PathLike[str], key: str) -> dict[str, Any]:
    """Image ``key``'s own ``summary.json``, checked (its folder must be a real folder of the run)."""
    root = Path(root)
    if not is_dir(root, key):
        raise RunFolderError(f"{printable(root / key)}: not a folder of the run (missing, or a symlink)")
    rel = f"{key}/summary.json"
    out = _check(ImageSummary, read_json(root, rel), printable(root / rel))
    bad = [f for f in out["files"] if not f.startswith(key + "/")]
    if bad:
        raise RunFolderError(f"{printable(root / rel)}: field files: {printable(bad[0])} is not in the image's folder")
    return out


def read_run_summary(root: str | os.PathLike[str]) -> dict[str, Any]:
    """A run's top-level ``summary.json``, checked ({} when there is none)."""
    try:
        return _check(RunSummary, read_json(root, "summary.json"), printable(Path(root) / "summary.json"))
    except FileNotFoundError:
        return {}


def read_thumbnail(root: str | os.PathLike[str], key: str) -> bytes | None:
    """Image ``key``'s ``thumbnail.jpg`` (None when missing or not a regular file inside the run)."""
    try:
        return read_bytes(root, f"{key}/thumbnail.jpg")
    except (OSError, RunFolderError):
        return None
