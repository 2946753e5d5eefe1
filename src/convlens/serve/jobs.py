"""What the explorer's threads share: :class:`ModelLock` (the model used by one computation at a
time, and waiters in a fair order), a bounded :class:`LRU` cache, a background :class:`Job` with its
progress and :class:`Cancelled`, and the :class:`ImageEntry` an upload becomes. Importable from
:mod:`convlens.serve.explorer` too, as before the split.
"""

from __future__ import annotations

import contextlib
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from torch import Tensor


class Cancelled(Exception):
    """Raised inside a job's progress callback when the job was cancelled."""


class ModelLock:
    """One computation on the model at a time. Interactive requests (``with lock:``) take
    precedence: a job calls :meth:`pause` between its batches, which hands the model to waiting
    requests and takes it back after them, so a class click is not stuck behind an occlusion.
    Guards stay strictly nested: the job is parked between batches while a request runs."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._cv = threading.Condition()
        self._waiting = 0

    def __enter__(self) -> ModelLock:
        with self._cv:
            self._waiting += 1
        try:
            self._lock.acquire()
        finally:
            with self._cv:
                self._waiting -= 1
                self._cv.notify_all()
        return self

    def __exit__(self, *exc: object) -> None:
        self._lock.release()

    @contextlib.contextmanager
    def job(self) -> Iterator[None]:
        """Hold the model for a job (which should call :meth:`pause` now and then)."""
        self._lock.acquire()
        try:
            yield
        finally:
            self._lock.release()

    def pause(self) -> None:
        """From the job holding the lock: let every waiting request run, then resume."""
        with self._cv:
            if not self._waiting:
                return
        self._lock.release()
        try:
            with self._cv:
                self._cv.wait_for(lambda: self._waiting == 0, timeout=10.0)
        finally:
            self._lock.acquire()


class LRU:
    """A thread-safe cache that forgets its least recently used entries beyond ``size``.
    Values are computed outside it (under the model lock) and put in; None means absent."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._d: OrderedDict[Hashable, Any] = OrderedDict()
        self._lock = threading.Lock()

    def __contains__(self, key: Hashable) -> bool:
        return key in self._d

    def __len__(self) -> int:
        return len(self._d)

    def get(self, key: Hashable) -> Any:
        with self._lock:
            if key not in self._d:
                return None
            self._d.move_to_end(key)
            return self._d[key]

    def put(self, key: Hashable, value: Any) -> Any:
        with self._lock:
            self._d[key] = value
            self._d.move_to_end(key)
            while len(self._d) > self.size:
                self._d.popitem(last=False)
        return value

    def drop(self, keep: Callable[[Hashable], bool]) -> None:
        with self._lock:
            for key in [k for k in self._d if not keep(k)]:
                del self._d[key]


@dataclass
class Job:
    """A long computation: state ``queued`` -> ``running`` -> ``done`` | ``error`` | ``cancelled``."""

    id: str
    kind: str
    key: Hashable
    fn: Callable[[Callable[[int, int], None]], Any] = field(repr=False)
    state: str = "queued"
    done: int = 0
    total: int = 0
    error: str | None = None
    result: Any = field(default=None, repr=False)
    cancel_requested: bool = False
    started: float = 0.0
    finished: float = 0.0

    def public(self) -> dict[str, Any]:
        """What the page needs to draw a progress bar."""
        return {"id": self.id, "kind": self.kind, "state": self.state, "done": self.done,
                "total": self.total, "error": self.error}


@dataclass
class ImageEntry:
    """One image the explorer may show, by opaque id (never a path from a request)."""

    id: str
    name: str
    x: Tensor | None  # (1, 3, H, W), model-ready
    rgb: np.ndarray | None  # (H, W, 3) in [0, 1]: what the model sees, for display
    error: str | None = None
    uploaded: bool = False
