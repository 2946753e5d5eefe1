"""The explorer's state, free of HTTP: images by opaque id, what each image's answers need
(cached), one lock on the model, and background jobs with progress and cancel.

Per image and CAM layer one forward pass is kept with its autograd graph from the layer to the
logits (recorded with the parameters frozen, so it holds no weight gradient). A class then costs
one partial backward (``torch.autograd.grad`` of the logits down to the layer, ``retain_graph``),
cached; a method costs no model call at all (:func:`convlens.methods.cam.cam_from_layer` on the
cached layer output and gradient); EigenCAM needs no gradient. Score-CAM, occlusion and feature
visualisation run as jobs on one worker thread; they give the model up between their batches when
an interactive request waits (:class:`ModelLock`).
"""

from __future__ import annotations

import inspect
import logging
import secrets
import threading
import time
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ..checks import choose, require_finite
from ..hooks import LayerCapture, model_guard
from ..images import ImageError
from ..layers import LayerError, default_cam_layer, layer_table, map_grid, resolve_layer
from ..layout import Layout, layout_for
from ..methods.activations import activations
from ..methods.cam import cam_from_layer, grad_cam
from ..methods.featureviz import feature_visualization
from ..methods.occlusion import occlusion
from ..methods.registry import cam_methods, method_spec
from ..metrics.faithfulness import deletion, insertion
from ..models import Classifier, require_logits, top_predictions
from ..results import top_channels
from .decode import decode
from .jobs import (
    LRU,
    Cancelled,
    ImageEntry,
    Job,
    ModelLock,
)

__all__ = ["Explorer", "ModelLock", "Job", "Cancelled", "MAX_UPLOAD_BYTES", "instant_methods"]

log = logging.getLogger(__name__)


#: Uploads larger than this are refused before decoding (pixels are limited by ``load_image``).
MAX_UPLOAD_BYTES = 25 * 2**20
#: Methods answered from the per-image cache; ``scorecam`` runs as a job (one forward per channel).


def instant_methods() -> tuple[str, ...]:
    """The CAM methods answered from a cached activation and gradient (all but Score-CAM)."""
    return tuple(m for m in cam_methods() if method_spec(m).instant)


@dataclass
class _Graph:
    """One forward pass of one image, kept from the CAM layer to the logits."""

    out: Tensor  # (1, K) logits, attached to the graph
    a: Tensor  # (1, C, h, w) layer output as a map (through its layout)
    t: Tensor  # the captured output itself, the tensor the gradients are taken to
    lay: Layout  # how t lies on the image: a = lay.apply(t)
    grads: LRU = field(default_factory=lambda: LRU(64))  # class -> d logit / d a, (1, C, h, w)


def _supports_callback(fn: Callable[..., Any]) -> bool:
    try:
        return "callback" in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


class Explorer:
    """Everything the local explorer computes, thread-safe, for one classifier.

    Example::

        ex = Explorer(load_model(), [sample_image_path()])
        cam = ex.cam(ex.images()[0].id, cls=None, method="gradcam++")   # raw, maps, layer, target
    """

    def __init__(self, clf: Classifier, sources: Sequence[Any] = (), *, max_images: int = 200) -> None:
        self.clf = clf
        self.lock = ModelLock()
        self.max_images = max_images
        self._images: dict[str, ImageEntry] = {}
        self._graphs: LRU = LRU(12)  # (image, layer) -> _Graph
        self._maps: LRU = LRU(256)  # (image, layer, class, method) -> (raw, maps)
        self._acts: LRU = LRU(24)  # (image, layer) -> (1, C, h, w)
        self._features: LRU = LRU(512)  # (layer, channel) -> FeatureImages of one channel
        self._occlusion: LRU = LRU(32)  # (image, class, patch, stride) -> Saliency
        self._curves: LRU = LRU(64)  # (image, layer, class, method) -> (deletion, insertion)
        self._layers: list[dict[str, Any]] | None = None
        self._default_layer: str | None = None
        self._jobs: dict[str, Job] = {}
        self._queue: list[Job] = []
        self._jobs_cv = threading.Condition()
        self._worker: threading.Thread | None = None
        self._closed = False
        from ..explain import collect_images

        items, _ = collect_images(list(sources), warn=True)
        for name, src in items:
            self.add_image(src, name, raise_errors=False)

    # -- images -------------------------------------------------------------------------------
    def add_image(self, source: Any, name: str, *, uploaded: bool = False, raise_errors: bool = True) -> ImageEntry:
        """Register an image (path, bytes, PIL image, array or model-ready tensor) under a new id.

        An image that cannot be read raises :class:`ImageError` (``raise_errors``) or is kept
        with its error so the page can list it."""
        if len(self._images) >= self.max_images:
            raise ImageError(f"the explorer holds {self.max_images} images already; restart it for more")
        image_id = secrets.token_urlsafe(9)
        try:
            if isinstance(source, Tensor):
                x = self.clf.batch(source)[:1]
            else:
                x = self.clf.preprocess(decode(source))  # within the memory budget; large photos downscaled
            rgb = self.clf.denormalise(x.detach())[0].permute(1, 2, 0).float().cpu().numpy()
            entry = ImageEntry(image_id, str(name), x, rgb, uploaded=uploaded)
        except (ImageError, ValueError, OSError) as e:
            if raise_errors:
                raise
            entry = ImageEntry(image_id, str(name), None, None, error=str(e).splitlines()[0])
        self._images[image_id] = entry
        return entry

    def images(self) -> list[ImageEntry]:
        """Every image, in the order added."""
        return list(self._images.values())

    def image(self, image_id: str) -> ImageEntry:
        """The image with this id; ``KeyError`` for an unknown id or one that failed to load."""
        entry = self._images.get(image_id)
        if entry is None:
            raise KeyError("no image with that id")
        if entry.x is None:
            raise KeyError(f"{entry.name} could not be read: {entry.error}")
        return entry

    # -- model-level facts ----------------------------------------------------------------------
    def _probe(self) -> Tensor:
        first = next((e.x for e in self._images.values() if e.x is not None), None)
        if first is not None:
            return first
        from PIL import Image

        h, w = self.clf.target_size(224, 224)
        return self.clf.preprocess(Image.new("RGB", (w, h), (128, 128, 128)))

    def layers(self) -> tuple[list[dict[str, Any]], str]:
        """The layers with a spatial (C, h, w) output, in execution order, and the default CAM layer."""
        if self._layers is None:
            with self.lock:
                x = self._probe()
                table = layer_table(self.clf.model, x)
                self._default_layer = default_cam_layer(self.clf.model, x, table)
            rows = [r for r in table if (g := map_grid(r)) is not None and r.order >= 0
                    and g[0] * g[1] > 1 and r.type != "Identity"]
            rows.sort(key=lambda r: r.order)
            self._layers = [{"name": r.name, "type": r.type, "shape": list(r.shape[1:]), "layout": r.layout}
                            for r in rows]
        return self._layers, str(self._default_layer)

    def labels(self) -> list[str]:
        """Every class name (``class N`` for a model without names)."""
        k = self.logits(self._first_id())[0].numel() if self._first_id() else len(self.clf.labels or [])
        return [self.clf.label(i) for i in range(k)]

    def _first_id(self) -> str | None:
        return next((e.id for e in self._images.values() if e.x is not None), None)

    # -- per image ------------------------------------------------------------------------------
    def _layer(self, layer: str | None) -> str:
        if layer in (None, "", "auto"):
            return self.layers()[1]
        name, _ = resolve_layer(self.clf.model, layer)
        return name

    def _graph(self, image_id: str, layer: str) -> _Graph:
        """The image's forward pass kept from ``layer`` on (the caller holds the lock)."""
        key = (image_id, layer)
        graph = self._graphs.get(key)
        if graph is not None:
            return graph
        x = self.image(image_id).x
        model = self.clf.model
        name, module = resolve_layer(model, layer)
        # as grad_cam does: parameters frozen, so autograd records activations only
        with torch.inference_mode(False), model_guard(model, freeze=True):
            with LayerCapture({name: module}, grad=[name]) as cap:
                out = self.clf.adapt(cap.run(model, x))  # tuple/dict/.logits outputs too
            if name not in cap.outputs:
                raise LayerError(f"layer {name!r} did not run in the forward pass")
            t = cap[name]
            lay = layout_for(self.clf, name, module, tuple(t.shape), tuple(x.shape[-2:]), batch=len(x))
            a = lay.apply(t)
        require_finite(require_logits(out), "the model's output")  # as grad_cam does
        return self._graphs.put(key, _Graph(out, a, t, lay))

    def logits(self, image_id: str) -> Tensor:
        """(1, K) logits of the image (from the cached pass at the default layer)."""
        layer = self._layer(None)
        graph = self._graphs.get((image_id, layer))
        if graph is None:  # the lock only for a new pass: a running job must not delay cached answers
            with self.lock:
                graph = self._graph(image_id, layer)
        return graph.out.detach()

    def predictions(self, image_id: str, k: int = 5) -> list[dict[str, Any]]:
        """The top-``k`` classes with their probabilities (softmax, or sigmoids for a multi-label
        model: :meth:`Classifier.probabilities`)."""
        (top,) = top_predictions(self.clf.probabilities(self.logits(image_id)), k, self.clf.label)
        return [{"index": p.index, "label": p.label, "probability": p.probability} for p in top]

    def _gradient(self, g: _Graph, cls: int) -> Tensor:
        grad = g.grads.get(cls)
        if grad is None:
            seed = torch.zeros_like(g.out)
            seed[0, cls] = 1.0
            (grad,) = torch.autograd.grad(g.out, g.t, grad_outputs=seed, retain_graph=True)
            grad = g.grads.put(cls, require_finite(g.lay.apply(grad), "the gradient at the layer"))
        return grad

    def class_index(self, image_id: str, cls: int | str | None) -> int:
        """``None`` -> the image's top-1 class; otherwise an index or name (checked)."""
        if cls is None or cls == "":
            return int(self.logits(image_id)[0].argmax())
        k = self.logits(image_id).shape[1]
        idx = self.clf.class_index(cls)
        if idx >= k:
            raise ValueError(f"class index {idx} is out of range: the model has {k} outputs")
        return idx

    def cam(self, image_id: str, cls: int | str | None = None, method: str = "gradcam",
            layer: str | None = None) -> dict[str, Any]:
        """A CAM of the image for class ``cls`` (default top-1) at ``layer`` (default: automatic):
        ``{"raw", "maps", "layer", "target", "method"}``, ``raw`` (h, w), ``maps`` (H, W), the
        same values :func:`convlens.grad_cam` gives for one image. ``scorecam`` is answered only
        from the cache (see :meth:`scorecam_job`); KeyError when it is not there yet."""
        choose([method], cam_methods(), "method")
        layer = self._layer(layer)
        cls = self.class_index(image_id, cls)
        key = (image_id, layer, cls, method)
        found = self._maps.get(key)
        if found is None:
            if not method_spec(method).instant:
                raise KeyError(f"{method} is computed by a job")
            with self.lock:
                found = self._maps.put(key, self._compute_cam(image_id, cls, method, layer))
        raw, maps = found
        return {"raw": raw, "maps": maps, "layer": layer, "target": cls, "method": method,
                "label": self.clf.label(cls)}

    def _compute_cam(self, image_id: str, cls: int, method: str, layer: str) -> tuple[Tensor, Tensor]:
        size = tuple(self.image(image_id).x.shape[-2:])
        for attempt in (0, 1):
            g = self._graph(image_id, layer)
            try:
                with torch.no_grad():
                    grad = self._gradient(g, cls) if method_spec(method).needs_gradient else None
                    raw, maps = cam_from_layer(method, g.a.detach(), grad, size)
            except RuntimeError as e:  # the weights were changed in place since the pass: redo it
                if attempt or "modified by an inplace operation" not in str(e):
                    raise
                self._forget_image(image_id)
                continue
            return raw[0].float(), maps[0].float()
        raise AssertionError("unreachable")

    def _forget_image(self, image_id: str) -> None:
        for cache in (self._graphs, self._maps, self._acts):
            cache.drop(lambda k: k[0] != image_id)

    def channels(self, image_id: str, layer: str | None = None, k: int = 12) -> dict[str, Any]:
        """The ``k`` channels of ``layer`` with the largest mean activation on the image:
        ``{"layer", "channels": [indices], "means": [values], "maps": (k, h, w) array, "count": C}``."""
        layer = self._layer(layer)
        key = (image_id, layer)
        act = self._acts.get(key)
        if act is None:
            graph = self._graphs.get(key)
            if graph is not None:  # the CAM pass captured this very output
                act = graph.a.detach()
            else:
                with self.lock:
                    act = activations(self.clf, self.image(image_id).x, [layer]).maps[layer]
            self._acts.put(key, act)
        means, top = (t[0] for t in top_channels(act[:1], k))
        return {"layer": layer, "channels": top.tolist(), "means": means.tolist(),
                "maps": act[0, top].float().cpu().numpy(), "count": int(act.shape[1])}

    # -- jobs -------------------------------------------------------------------------------------
    def submit(self, kind: str, key: Hashable, fn: Callable[[Callable[[int, int], None]], Any],
               cached: Callable[[], bool] = lambda: True) -> Job:
        """Queue ``fn(progress)`` on the worker, or return the job already made for ``key``
        (a finished one only while ``cached()`` says its result is still in the cache)."""
        with self._jobs_cv:
            for job in self._jobs.values():
                if job.key == key and (job.state in ("queued", "running") or (job.state == "done" and cached())):
                    return job
            job = Job(secrets.token_urlsafe(9), kind, key, fn)
            self._jobs[job.id] = job
            self._queue.append(job)
            if self._worker is None or not self._worker.is_alive():
                self._worker = threading.Thread(target=self._work, name="convlens-serve-jobs", daemon=True)
                self._worker.start()
            self._jobs_cv.notify_all()
        return job

    def job(self, job_id: str) -> Job:
        """The job with this id (``KeyError`` if unknown)."""
        return self._jobs[job_id]

    def cancel(self, job_id: str) -> Job:
        """Ask a job to stop: a queued job is dropped, a running one stops at its next batch."""
        with self._jobs_cv:
            job = self._jobs[job_id]
            job.cancel_requested = True
            if job.state == "queued":
                self._queue.remove(job)
                job.state = "cancelled"
        return job

    def close(self) -> None:
        """Cancel every job and stop the worker."""
        with self._jobs_cv:
            self._closed = True
            for job in list(self._jobs.values()):
                if job.state in ("queued", "running"):
                    job.cancel_requested = True
            self._jobs_cv.notify_all()

    def _work(self) -> None:
        while True:
            with self._jobs_cv:
                self._jobs_cv.wait_for(lambda: self._queue or self._closed)
                if self._closed:
                    for job in self._queue:
                        job.state = "cancelled"
                    self._queue.clear()
                    return
                job = self._queue.pop(0)
                job.state, job.started = "running", time.perf_counter()

            def progress(done: int, total: int, job: Job = job) -> None:
                job.done, job.total = done, total
                if job.cancel_requested:
                    raise Cancelled
                self.lock.pause()

            try:
                with self.lock.job():
                    job.result = job.fn(progress)
                job.state = "done"
            except Cancelled:
                job.state = "cancelled"
            except Exception as e:  # shown on the page; the server goes on
                log.warning("%s job failed: %s", job.kind, e)
                job.error = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                job.state = "error"
            finally:
                job.finished = time.perf_counter()
                if job.state != "done":
                    with self._jobs_cv:  # a failed or cancelled job may be asked for again
                        job.key = (job.key, job.id)

    def scorecam_job(self, image_id: str, cls: int | str | None, layer: str | None) -> Job:
        """Score-CAM (one masked forward per channel) as a job; its map lands in the CAM cache."""
        layer = self._layer(layer)
        cls = self.class_index(image_id, cls)
        x = self.image(image_id).x

        def run(progress: Callable[[int, int], None]) -> None:
            kw = {"callback": progress} if _supports_callback(grad_cam) else {}
            # small batches: progress, cancel and the requests waiting for the model get a turn
            # every 16 masked forwards instead of every ~50 (10 s on 2 shared cores)
            res = grad_cam(self.clf, x, target=cls, layer=layer, method="scorecam", batch_size=16, **kw)
            self._maps.put((image_id, layer, cls, "scorecam"), (res.raw[0], res.maps[0]))

        return self.submit("scorecam", ("scorecam", image_id, layer, cls), run,
                           lambda: (image_id, layer, cls, "scorecam") in self._maps)

    def occlusion_job(self, image_id: str, cls: int | str | None, patch: int, stride: int) -> Job:
        """Occlusion sensitivity (``convlens.occlusion``) as a job; result in :meth:`occlusion_result`."""
        for what, v in (("patch", patch), ("stride", stride)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{what} must be a positive number of pixels")
        cls = self.class_index(image_id, cls)
        x = self.image(image_id).x
        if patch > min(x.shape[-2:]):
            raise ValueError(f"patch {patch} is larger than the image ({x.shape[-2]} x {x.shape[-1]})")
        key = (image_id, cls, patch, stride)

        def run(progress: Callable[[int, int], None]) -> None:
            kw = {"callback": progress} if _supports_callback(occlusion) else {}
            res = occlusion(self.clf, x, target=cls, patch=patch, stride=stride, **kw)
            self._occlusion.put(key, res)

        return self.submit("occlusion", ("occlusion", *key), run, lambda: key in self._occlusion)

    def occlusion_result(self, image_id: str, cls: int | str | None, patch: int, stride: int) -> Any:
        """The finished occlusion :class:`~convlens.Saliency`, or None."""
        return self._occlusion.get((image_id, self.class_index(image_id, cls), patch, stride))

    def feature_job(self, layer: str, channel: int) -> Job:
        """Feature visualisation of one channel (library defaults), once per layer and channel."""
        layer = self._layer(layer)
        key = (layer, int(channel))

        def run(progress: Callable[[int, int], None]) -> None:
            kw = {"callback": progress} if _supports_callback(feature_visualization) else {}
            res = feature_visualization(self.clf, layer, [int(channel)], **kw)
            self._features.put(key, res)

        return self.submit("features", ("features", *key), run, lambda: key in self._features)

    def feature_result(self, layer: str, channel: int) -> Any:
        """The cached :class:`~convlens.FeatureImages` of one channel, or None."""
        return self._features.get((self._layer(layer), int(channel)))

    # -- deletion / insertion of the current map --
    def curves_job(self, image_id: str, cls: int | str | None, method: str, layer: str | None) -> Job:
        """The deletion and insertion curves of a map as a job (each is ``steps`` + 1 forwards);
        the map itself is computed first, here, outside the job's hold on the model."""
        res = self.cam(image_id, cls, method, layer)
        key = (image_id, res["layer"], res["target"], method)
        x, maps, target = self.image(image_id).x, res["maps"][None], res["target"]
        other = int(self.logits(image_id)[0].argmin())
        other_map = self.cam(image_id, other, method, layer)["maps"][None]

        def run(progress: Callable[[int, int], None]) -> None:
            progress(0, 3)
            removed = deletion(self.clf, x, maps, target=target)
            progress(1, 3)
            restored = insertion(self.clf, x, maps, target=target)
            progress(2, 3)
            judged = _judge(self.clf, x, target, res["raw"], removed, restored, maps, other_map)
            progress(3, 3)
            self._curves.put(key, (removed, restored, judged))

        return self.submit("curves", ("curves", *key), run, lambda: key in self._curves)

    def curves_result(self, image_id: str, cls: int | str | None, method: str, layer: str | None) -> Any:
        """The cached ``(deletion, insertion, judged)`` curves of a map (``judged``: its verdict and
        the references' AUCs, see :func:`_judge`), or None."""
        return self._curves.get((image_id, self._layer(layer), self.class_index(image_id, cls), method))


#: random maps drawn at the map's grid for the explorer's verdict (each costs 2 x 16 forwards)
JUDGE_DRAWS = 4


def _judge(clf: Classifier, x: Tensor, target: int, raw: Tensor, removed: Any, restored: Any, maps: Tensor,
           other_map: Tensor) -> dict[str, Any]:
    """The verdict on one explorer map (:func:`convlens.metrics.evidence.verdict`, one image): its
    insertion - deletion AUC against random maps at its own grid (resized bilinearly, as CAMs are)
    and a centred Gaussian, and its rank correlation with the least likely class's map. The
    sanity check is left to ``convlens compare`` (it randomises a copy of the model)."""
    from ..metrics._common import spearman
    from ..metrics.compare import reference_map
    from ..metrics.evidence import grid_name, interval, noise_margin, random_like, verdict
    from ..metrics.faithfulness import deletion_insertion
    from ..metrics.sanity import CLASS_THRESHOLD

    size = tuple(x.shape[-2:])
    grid = tuple(int(v) for v in raw.shape[-2:])
    name = grid_name("bilinear", grid)
    given = {f"#{k}": m[None] for k, m in enumerate(random_like("bilinear", grid, size, {}, draws=JUDGE_DRAWS)
                                                          .to(x.device))}
    given["centred Gaussian"] = reference_map("centred Gaussian", 1, *size, device=x.device)
    curves = deletion_insertion(clf, x, given, target=[target])
    diffs = torch.stack([curves[f"#{k}"][1].auc - curves[f"#{k}"][0].auc for k in range(JUDGE_DRAWS)])[:, 0]
    mine = float(restored.auc[0] - removed.auc[0])
    margin = noise_margin(diffs)
    gauss = float(curves["centred Gaussian"][1].auc[0] - curves["centred Gaussian"][0].auc[0])
    versus = {name: interval(mine - float(diffs.mean()), float("nan"), float("nan"), margin),
              "centred Gaussian": interval(mine - gauss, float("nan"), float("nan"), margin)}
    rho = float(spearman(maps.float().cpu(), other_map.float().cpu())[0])
    out = verdict(images=1, versus=versus, margin=margin, class_rho=rho, class_threshold=CLASS_THRESHOLD)
    out["reasons"].append("The sanity check (the classifier re-initialised) is in `convlens compare`.")
    return {"verdict": out, "references": {
        name: {"deletion": float(torch.stack([curves[f"#{k}"][0].auc for k in range(JUDGE_DRAWS)]).mean()),
               "insertion": float(torch.stack([curves[f"#{k}"][1].auc for k in range(JUDGE_DRAWS)]).mean())},
        "centred Gaussian": {"deletion": float(curves["centred Gaussian"][0].auc[0]),
                             "insertion": float(curves["centred Gaussian"][1].auc[0])}}, "class_rho": rho}
