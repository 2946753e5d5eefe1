"""Explain a folder with Ray: one task per shard (``explain(..., shard=(i, N), out=...)``), then
the merge (:func:`convlens.runs.merge_runs`). Ray schedules; convlens only splits and merges.

Needs ``pip install convlens[ray]``. Each task writes into ``out/shard-i-of-N/`` as the CLI's
``--shard i/N`` does, so a task that dies can be rerun (``resume=True``) and the shards can also
be merged later with ``convlens report out --out out``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from ._compat import IMAGES, renamed

if TYPE_CHECKING:
    from .runs import RunSummary

__all__ = ["explain_on_ray"]


def _shard_task(sources: Sequence[Any], out: str, shard: tuple[int, int], make_classifier: Callable[[], Any] | None,
                kwargs: dict[str, Any]) -> dict[str, int]:
    from .explain import ExplainError, explain

    clf = make_classifier() if make_classifier is not None else None
    try:
        report = explain(list(sources), clf, shard=shard, out=out, **kwargs)
    except ExplainError as e:
        if "holds no image" in str(e):  # more shards than images: this one has nothing to do
            return {"images": 0, "failed": 0}
        raise
    return {"images": len(report.images), "failed": len(report.failed)}


@renamed(sources=IMAGES, make_classifier="make_model")
def explain_on_ray(
    images: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    out: str | os.PathLike[str],
    shards: int,
    *,
    make_model: Callable[[], Any] | None = None,
    num_cpus: float = 1,
    resume: bool = False,
    force_merge: bool = True,
    **kwargs: Any,
) -> RunSummary:
    """Explain ``images`` (files or folders) in ``shards`` Ray tasks into ``out`` and merge them.

    ``make_model``: a picklable function that builds the model (a Classifier or nn.Module) inside each task (default:
    the bundled model); ``num_cpus``: Ray CPUs per task; ``resume``: keep what earlier tasks
    finished; other keyword arguments go to :func:`convlens.explain` (``techniques``, ``fast``, ...).
    Ray must be initialised (``ray.init()``) by the caller. The merged report replaces an earlier
    merge in ``out`` (``force_merge``). Returns the merged summary, a :class:`~convlens.runs.RunSummary`
    (see :func:`merge_runs`).

    Example::

        ray.init()
        summary = explain_on_ray("photos/", "run", shards=8, fast=True)
    """
    try:
        import ray
    except ImportError as e:  # pragma: no cover - the extra is not installed
        raise ImportError("explain_on_ray needs Ray: pip install 'convlens[ray]'") from e
    from .runs import merge_runs

    sources, make_classifier = images, make_model  # the body's names
    if isinstance(sources, (str, os.PathLike)):
        sources = [sources]
    paths = [os.fspath(s) for s in sources]
    if not ray.is_initialized():
        raise RuntimeError("call ray.init() before explain_on_ray")
    task = ray.remote(num_cpus=num_cpus)(_shard_task)
    refs = [task.remote(paths, os.fspath(out), (i, shards), make_classifier, {"resume": resume, **kwargs})
            for i in range(1, shards + 1)]
    ray.get(refs)
    return merge_runs([out], out, force=force_merge)
