"""Reading back what an earlier run finished, for ``explain(..., resume=True)``: the fingerprint that
says whether an image's outputs are this run's, and the image rebuilt from the run's own
``summary.json`` (read as untrusted input by :mod:`convlens.runfolder`).
"""

from __future__ import annotations

import json
import logging
import math
from typing import Any

from .models import Classifier, Prediction
from .outputs import RunWriter, printable
from .report import ImageExplanation, Report

__all__ = ["earlier", "fingerprint"]

log = logging.getLogger("convlens.explain")


def fingerprint(clf: Classifier, report: Report) -> dict[str, Any]:
    """What makes an image's outputs the same as another run's: the model, its weights (digest
    of every parameter and buffer), its input, the techniques and all their settings."""
    from .cache import model_digest

    settings = {k: v for k, v in report.settings.items() if k not in ("versions", "cache", "shard")}
    return json.loads(json.dumps({
        "model": clf.name, "weights": clf.weights, "weights_digest": model_digest(clf.model), "input": report.input,
        "methods": list(report.methods), "settings": settings}, default=str))


def earlier(run: RunWriter | None, key: str, rec: dict[str, Any] | None) -> ImageExplanation | None:
    """An image an earlier run finished, from its own ``summary.json`` (None when unreadable)."""
    if run is None or rec is None:
        return None
    from .runfolder import RunFolderError, read_summary, read_thumbnail

    try:
        entry = read_summary(run.root, key)  # untrusted input: checked types, no symlink, bounded size
        return ImageExplanation(
            name=entry["name"], source=entry.get("source"), key=key,
            original_size=tuple(entry["original_size"]) if entry.get("original_size") else None,
            predictions=[Prediction(p["label"], p["index"], math.nan if p["probability"] is None else p["probability"])
                         for p in entry.get("predictions") or []],
            target=(entry.get("target") or {}).get("index"), target_label=(entry.get("target") or {}).get("label"),
            layers=entry.get("layers") or {}, channels=entry.get("channels") or {},
            errors=entry.get("errors") or {}, notes=entry.get("notes") or {}, timings=entry.get("timings") or {},
            agreement=entry.get("agreement") or {}, summary=entry, reused=True,
            thumb=read_thumbnail(run.root, key),
        )
    except (OSError, RunFolderError) as e:
        log.warning("%s: the earlier run's summary cannot be read (%s); explaining it again", printable(key), e)
        return None
