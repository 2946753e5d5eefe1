"""``explain``: every technique on every image, gathered into one :class:`~convlens.report.Report`.

Per image: the top-k predictions; the activations of the model's stages (most active channels);
Grad-CAM at the automatic layer for the target (default: the top-1 class); occlusion
sensitivity; how far to trust those two maps (``trust``: deletion / insertion beside a random
map, class sensitivity, and the Grad-CAM method's sanity verdict, computed once per run);
feature visualisations of the channels that fired most on this image in the Grad-CAM layer.
A failure (a broken file, a technique that raises) is recorded for that image and technique and
the run goes on. The results, their drawing and writing (:meth:`~convlens.report.Report.save`),
the HTML and the JSON live in :mod:`convlens.report`; this module is the driver.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from torch import Tensor

from ._compat import IMAGES, MODEL, renamed
from ._runners import (
    RUNNERS,
    _layers_for,
    _load,
    _logits_and_layer,
    _optimise_shared,
    _shared_channels,
    _top,
    pre_activation_layer,  # noqa: F401 -- convlens.explain.pre_activation_layer, as before
)
from .checks import NonFiniteError, choose, require_finite
from .images import ImageError, ImageSource
from .inputs import (
    ExplainError,
    collect_images,
    image_keys,  # noqa: F401 -- convlens.explain.image_keys, as before
    item_keys,  # noqa: F401 -- convlens.explain.item_keys, as before
    parse_shard,
    plan,
    select_shard,
    shard_folder,
)
from .metrics.evidence import map_spearman as spearman  # noqa: F401 -- convlens.explain.spearman, as before
from .models import Classifier, as_classifier, load_model
from .outputs import RunWriter, check_interrupt, printable
from .report import ImageExplanation, Report, run_writer
from .resume import earlier as _earlier
from .resume import fingerprint as _fingerprint
from .settings import EXPLAIN_OPTIONS, Settings

__all__ = [
    "METHODS", "ExplainError", "ImageExplanation", "Report", "collect_images", "explain", "parse_shard", "plan",
    "select_shard", "settings_for", "shard_folder",
]

log = logging.getLogger(__name__)

#: The techniques, in report order.
METHODS = ("activations", "gradcam", "occlusion", "trust", "filters")

#: Default settings per technique (the defaults of :data:`convlens.settings.EXPLAIN_OPTIONS`);
#: ``fast=True`` overlays :data:`FAST`. Chosen so one 224 px image with the default model finishes
#: well under a minute on a 2-core CPU (see BENCHMARKS.md).
DEFAULTS: dict[str, dict[str, Any]] = {tech: kind().to_dict() for tech, kind in EXPLAIN_OPTIONS.items()}
FAST: dict[str, dict[str, Any]] = {
    "activations": {"channels": 6},
    "occlusion": {"patch": 56, "stride": 28},
    "filters": {"channels": 3, "steps": 48, "size": 96},
    "trust": {"steps": 8},
}
#: Overlaid on the settings of a run over several images (a folder, a list, a shard), after
#: :data:`FAST`: one image alone keeps every setting above. Feature visualisation optimises at most
#: ``budget`` channels per image on average: the channels most shared among the images' top
#: channels (with the settings of one image alone, so the cache serves both), plus any channel
#: already in the cache; an image's other top channels are named, not drawn. The trust section
#: uses 8 deletion / insertion steps and remakes Grad-CAM's map for the other class but not
#: occlusion's (a second occlusion per image). Both are said on each image's page. On a 2-core
#: CPU they cut a default image from ~14 to ~4.8 s with a cold cache (BENCHMARKS.md).
FOLDER: dict[str, dict[str, Any]] = {
    "filters": {"budget": 0.4},
    "trust": {"steps": 8, "class_maps": ["gradcam"]},
}


#: the folder settings apply from this many images on (or to any shard). Counted on the default
#: model (README, "How far to trust the maps"): they save the same work on every image of a run
#: whatever its size (about 460 of 512 feature-visualisation optimisation steps, 176 of 330
#: deletion / insertion forwards and one 121-window occlusion), because different photos hardly
#: share top channels (23 different among the top 4 of 6 natural photos), so the cache does not
#: make the full settings cheaper as a run grows: they pay from the second image.
FOLDER_FROM = 2


def settings_tier(images: int, *, fast: bool = False, full: bool = False, shard: Any = None) -> dict[str, Any]:
    """Which settings a run of ``images`` images uses and how to say it: ``name`` ``"full"`` or
    ``"folder"`` (:data:`FOLDER` overlaid: ``images >= FOLDER_FROM`` or a shard, unless ``full``),
    ``fast``, ``said`` (a sentence for the terminal and the top of every page) and ``command``
    (the options that give the full settings).

    Example::

        settings_tier(12)["name"]   # "folder"
    """
    folder = (images >= FOLDER_FROM or shard is not None) and not full
    parts = []
    if folder:
        parts.append(f"the folder settings (a run over {FOLDER_FROM} or more images, or a shard): feature "
                     "visualisation draws only the channels most shared among the images (about 0.4 per image), the "
                     "trust check uses 8 deletion / insertion steps and skips occlusion's class check")
    if fast:
        parts.append("--fast: coarser occlusion, fewer and smaller feature images, 8 trust steps")
    said = ("This run used " + " and ".join(parts) + ".") if parts else "This run used the full settings."
    command = "convlens explain IMAGES" + (" --full" if folder else "")
    # the same for every shard of a run (the shards' settings must match to merge)
    return {"name": "folder" if folder else ("fast" if fast else "full"), "fast": fast, "folder_from": FOLDER_FROM,
            "said": said, "command": command}


def settings_for(
    fast: bool = False, overrides: dict[str, dict[str, Any]] | None = None, *, folder: bool = False
) -> dict[str, Settings]:
    """The settings :func:`explain` uses, one frozen dataclass per technique
    (:data:`convlens.settings.EXPLAIN_OPTIONS`): :data:`DEFAULTS`, then :data:`FAST` (``fast``), then
    :data:`FOLDER` (``folder``: a run over several images), then ``overrides``. An unknown group or
    key is an :class:`ExplainError` naming the valid ones.

    Example::

        settings_for(fast=True, folder=True)["filters"]["budget"]   # 0.4
    """
    out = {k: dict(v) for k, v in DEFAULTS.items()}
    for layer in ([FAST] if fast else []) + ([FOLDER] if folder else []) + ([overrides] if overrides else []):
        for tech, values in layer.items():
            if tech not in out:
                raise ExplainError(f"unknown settings group {tech!r}; use one of {sorted(out)}")
            out[tech].update(values)
    try:
        return {tech: EXPLAIN_OPTIONS[tech].of(values) for tech, values in out.items()}
    except ValueError as e:
        raise ExplainError(str(e)) from None


def _versions() -> dict[str, str]:
    import platform
    from importlib.metadata import PackageNotFoundError, version

    import torch

    from ._version import __version__

    out = {"convlens": __version__, "python": platform.python_version(), "platform": platform.platform(),
           "torch": torch.__version__}  # the module's own string carries the build (+cu130, +cpu)
    for pkg in ("torchvision", "timm", "numpy", "matplotlib", "Pillow"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


# -- the driver ---------------------------------------------------------------------------
@renamed(image_or_images=IMAGES, classifier=MODEL, methods="techniques", settings="options")
def explain(
    images: ImageSource | Sequence[ImageSource] | None = None,
    model: Any = None,
    *,
    target: int | str | None = None,
    techniques: Sequence[str] = METHODS,
    fast: bool = False,
    progress: bool = False,
    layer: str | None = None,
    options: dict[str, dict[str, Any]] | None = None,
    on_image: Callable[[Report, ImageExplanation], None] | None = None,
    cache: bool | str | os.PathLike[str] | None = True,
    shard: str | tuple[int, int] | None = None,
    out: str | os.PathLike[str] | RunWriter | None = None,
    force: bool = False,
    resume: bool = False,
    batch_size: int | None = None,
    full: bool = False,
) -> Report:
    """Explain each image with every technique in ``techniques`` and gather the results.

    ``images``: a path, folder, PIL image, array, bytes, or a list of them (default: the bundled
    sample photo); ``model``: a :class:`Classifier` or ``nn.Module`` (default: the bundled
    EfficientNet-Lite0); ``techniques``: any of ``activations``, ``gradcam``, ``occlusion``,
    ``trust``, ``filters`` (default: all); ``target``: a class index or name for every image
    (default: each image's top-1); ``layer``: the Grad-CAM layer (default: automatic); ``options``:
    per-technique overrides of :data:`DEFAULTS` (``{"occlusion": {"stride": 8}}``); ``cache``: where
    finished feature visualisations are kept and reused across images and runs (True: the user cache
    folder, ``$CONVLENS_CACHE`` overrides; a folder; False: off; see :mod:`convlens.cache`);
    ``shard``: ``"I/N"`` explains only part I of N of the images (:func:`select_shard`); ``out``: a
    folder each image's files go into as soon as it is done, after which its maps and figures are
    dropped from memory (the report keeps predictions, errors, timings, file names and a thumbnail),
    so memory stays flat over any number of images; ends with ``summary.json``, ``summary.csv`` and
    ``report.html`` (:meth:`Report.finish`); a shard writes into ``out/shard-I-of-N/``
    (:func:`shard_folder`); ``force`` replaces an earlier run there, ``resume`` keeps its images
    that match this run (same model, weights, settings and file content) and does the rest;
    ``on_image(report, image)`` is called as each image is done.
    A run over several images overlays :data:`FOLDER` on the settings, unless ``full`` (every
    image then gets the settings of an image alone).
    ``batch_size``: images that go through activations, Grad-CAM and occlusion together (default:
    8 on CUDA, 1 elsewhere, where a larger batch is not faster); the results are those of one image
    at a time, to float rounding. Errors (also NaN or infinite logits or maps) are recorded per
    image and technique, never raised; bad arguments raise :class:`ExplainError`.

    Example::

        report = convlens.explain("cat.jpg")
        report.save("out")       # out/report.html, out/summary.json, PNGs and .npy per technique

    It is long because it is the driver: the order of the checks (all before the model loads or before
    any image work), the run folder, resume and the loop over batches read best in one place; the work
    itself is in helpers and :mod:`convlens._runners`.
    """
    t_start = time.perf_counter()
    image_or_images, classifier, settings = images, model, options  # the body's names
    methods = choose(techniques, METHODS, "technique", error=ExplainError)
    methods = tuple(m for m in METHODS if m in methods)
    if "trust" in methods and not {"gradcam", "occlusion"} & set(methods):
        raise ExplainError("the trust technique judges the gradcam and occlusion maps: add one of them")
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
        raise ExplainError(f"batch_size must be a positive int, got {batch_size!r}")
    planned, skipped = plan(_image_list(image_or_images), shard)
    items, keys = [(n, s) for n, s, _ in planned], [k for _, _, k in planned]
    tier = settings_tier(len(planned), fast=fast, full=full, shard=shard)
    conf = settings_for(fast, settings, folder=tier["name"] == "folder")
    if layer is not None:
        conf["gradcam"] = conf["gradcam"].replace(layer=layer)
    run = out if isinstance(out, RunWriter) or out is None else run_writer(
        shard_folder(out, shard), [SimpleNamespace(key=k, path=s) for _, s, k in planned], force=force,
        resume=resume)  # checked before any work

    t0 = time.perf_counter()
    clf = load_model() if classifier is None else as_classifier(classifier)
    load_s = time.perf_counter() - t0
    if target is not None and not callable(target):
        clf.class_index(target)  # an unknown class or layer is a usage error, raised before any work
    if conf["gradcam"]["layer"] is not None:
        from .layers import resolve_layer

        resolve_layer(clf.model, conf["gradcam"]["layer"])
    report = _new_report(clf, methods, conf, tier, fast=fast, target=target, shard=shard, skipped=skipped,
                         planned=len(items))
    folder = _cache_folder(cache, methods)
    report.settings["cache"] = None if folder is None else str(folder)
    done = {} if run is None else run.reusable(
        _fingerprint(clf, report), {k: s for _, s, k in planned if isinstance(s, (str, os.PathLike))})

    bar = None
    quiet = contextlib.nullcontext()
    if progress:
        from tqdm.auto import tqdm
        from tqdm.contrib.logging import logging_redirect_tqdm

        bar = tqdm(total=len(items), desc="explain", unit="image")
        quiet = logging_redirect_tqdm()  # warnings print above the bar, not through it
    cam_layers: dict[tuple[int, ...], tuple[str, str]] = {}
    run_cache: dict[Any, Any] = {}  # what is computed once per model and run (the sanity verdict)
    if batch_size is None:
        batch_size = 8 if clf.device.type == "cuda" else 1
    try:
        with quiet, run if run is not None else contextlib.nullcontext():
            shared = None
            if "filters" in methods and conf["filters"]["budget"] is not None:
                shared = _shared_channels(clf, items, conf, cam_layers)
                report.settings["filters"]["shared"] = len(shared)
                if folder is not None:  # optimised together into the cache; each image reads them back
                    report.timings["filters_shared_s"] = _optimise_shared(clf, shared, conf["filters"], cache)
            for start in range(0, len(items), batch_size):
                group = list(zip(items[start : start + batch_size], keys[start : start + batch_size]))
                earlier = {key: _earlier(run, key, done.get(key)) for _, key in group}
                fresh = _explain_group(
                    clf, [(name, src, key) for (name, src), key in group if earlier[key] is None], target, methods,
                    conf, cam_layers, bar, run_cache, folder, shared)
                for (_, src), key in group:
                    if earlier[key] is not None:  # --resume: finished by an earlier run with the same settings
                        im = earlier[key]
                        if isinstance(src, (str, os.PathLike)):  # the same content, maybe found elsewhere now
                            im.source = printable(os.path.abspath(src))
                            im.summary = {**(im.summary or {}), "source": im.source}
                        report.images.append(im)
                        report._files[key] = run.keep_image(key, src)  # type: ignore[union-attr]
                    else:
                        report.images.append(next(fresh))
                        check_interrupt()
                        if run is not None:
                            report.save_image(run, report.images[-1])
                            report.release(report.images[-1])
                        if on_image is not None:
                            on_image(report, report.images[-1])
                    if bar is not None:
                        bar.update(1)
            report.timings["total_s"] = time.perf_counter() - t_start
            if classifier is None:
                report.timings["load_model_s"] = load_s
            if run is not None:
                report.finish(run)
    finally:
        if bar is not None:
            bar.close()
    return report  # timings as summary.json has them (set before report.finish wrote it)


def _image_list(images: Any) -> list[Any]:
    """``explain``'s ``images`` as a list: the bundled sample photo when None, one source as a list of one."""
    if images is None:
        from .images import sample_image_path

        return [sample_image_path()]
    if isinstance(images, (str, os.PathLike, bytes, Tensor)) or not isinstance(images, Sequence):
        return [images]
    return images


def _new_report(clf: Classifier, methods: tuple[str, ...], conf: dict[str, Settings], tier: dict[str, Any], *,
                fast: bool, target: Any, shard: Any, skipped: list[dict[str, str]], planned: int) -> Report:
    """The empty :class:`Report` of a run: the model, its input, the techniques and every setting."""
    report = Report(
        model=clf.name,
        weights=clf.weights,
        device=str(clf.device),
        input={"size": clf.size, "resize": clf.resize, "interpolation": clf.interpolation,
               "mean": list(clf.mean), "std": list(clf.std), "multi_label": clf.multi_label},
        methods=methods,
        settings={"fast": fast, "target": None if target is None else str(target), "tier": tier,
                  **{tech: options.to_dict() for tech, options in conf.items()},
                  **({"shard": "{}/{}".format(*parse_shard(shard))} if shard is not None else {})},
        images=[],
        skipped=skipped,
        created=time.strftime("%Y-%m-%d %H:%M:%S"),
        _planned=planned,
    )
    report.settings["versions"] = _versions()
    return report


def _cache_folder(cache: Any, methods: tuple[str, ...]) -> Path | None:
    """The feature-visualisation cache folder of a run (None: off, or no ``filters``); a bad
    ``$CONVLENS_CACHE_MB`` is a usage error now, not a failure per image."""
    from .cache import cache_dir, limit_bytes

    try:
        folder = cache_dir(cache) if "filters" in methods else None
        if folder is not None:
            limit_bytes()
    except ValueError as e:
        raise ExplainError(str(e)) from None
    return folder


def _row(result: Any, i: int) -> Any:
    """Image ``i`` of a batched Saliency or Activations result, as a call on that image alone gives it."""
    from dataclasses import replace

    if isinstance(result.maps, dict):  # Activations
        return replace(result, maps={k: v[i : i + 1] for k, v in result.maps.items()}, images=result.images[i : i + 1])
    settings = dict(result.settings)
    if "image_index" in settings:
        settings["image_index"] = [0]
    return replace(result, maps=result.maps[i : i + 1], raw=result.raw[i : i + 1], target=result.target[i : i + 1],
                   images=result.images[i : i + 1], labels=result.labels[i : i + 1], settings=settings)


#: the techniques that take several images in one call
BATCHED = ("activations", "gradcam", "occlusion")


def _batch_techniques(clf: Classifier, prepared: list[tuple[ImageExplanation, Tensor, dict[str, Any]]],
                      methods: tuple[str, ...], conf: dict[str, Settings]) -> None:
    """Run :data:`BATCHED` techniques once for each set of prepared images of the same input
    shape and class-index targets, putting each image's row into its ``ctx["batched"]``; a batch
    that fails leaves its images to their own calls (which record the error)."""
    import torch

    sets: dict[tuple[Any, ...], list[tuple[Tensor, dict[str, Any]]]] = {}
    for _, x, ctx in prepared:
        if isinstance(ctx["target"], int):
            sets.setdefault((tuple(x.shape), ctx["cam_layer"]), []).append((x, ctx))
    for group in sets.values():
        if len(group) < 2:
            continue
        xb = torch.cat([x for x, _ in group])
        # the runners themselves, on the stacked images with one target each
        batch_ctx = {"target": [ctx["target"] for _, ctx in group], "cam_layer": group[0][1]["cam_layer"],
                     "batched": {}, "layers": {}, "channels": {}}
        for tech in (t for t in BATCHED if t in methods):
            t0 = time.perf_counter()
            try:
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    result = RUNNERS[tech](clf, xb, batch_ctx, conf[tech])
                if caught:  # a warning names the batch, not the image: let each image's own call give it
                    continue
            except Exception as e:  # noqa: BLE001 -- each image then runs (and fails) alone
                log.debug("batched %s failed (%s); one image at a time", tech, e)
                continue
            share = (time.perf_counter() - t0) / len(group)
            for i, (_, ctx) in enumerate(group):
                ctx["batched"][tech] = _row(result, i)
                ctx["batched_s"][tech] = share


def _explain_group(
    clf: Classifier,
    group: Sequence[tuple[str, ImageSource, str]],
    target: Any,
    methods: tuple[str, ...],
    conf: dict[str, Settings],
    cam_layers: dict[tuple[int, ...], tuple[str, str]],
    bar: Any,
    run_cache: dict[Any, Any],
    cache: Path | None,
    shared: set[tuple[str, int]] | None,
) -> Iterator[ImageExplanation]:
    """Explain the images of ``group`` in order, yielding each as it is done; with two or more,
    :data:`BATCHED` techniques run once for all of them first."""
    prepared = [_prepare(clf, name, src, key, target, conf, cam_layers, run_cache, cache, shared)
                for name, src, key in group]
    ready = [(im, x, ctx) for im, x, ctx in prepared if ctx is not None]
    if len(ready) > 1:
        _batch_techniques(clf, ready, methods, conf)  # type: ignore[arg-type]
    for im, x, ctx in prepared:
        if ctx is not None:
            _run_techniques(clf, im, x, ctx, methods, conf, bar)  # type: ignore[arg-type]
        yield im


def _prepare(
    clf: Classifier,
    name: str,
    src: ImageSource,
    key: str,
    target: Any,
    conf: dict[str, Settings],
    cam_layers: dict[tuple[int, ...], tuple[str, str]],
    run_cache: dict[Any, Any],
    cache: Path | None,
    shared: set[tuple[str, int]] | None,
) -> tuple[ImageExplanation, Tensor | None, dict[str, Any] | None]:
    """Load one image, predict, resolve its target: ``(im, x, ctx)``, or ``(im, None, None)``
    with the error recorded when the image cannot be used."""
    is_path = isinstance(src, (str, os.PathLike))
    im = ImageExplanation(name=printable(name), source=printable(src) if is_path else None, key=key,
                          path=src if is_path else None)
    t0 = time.perf_counter()
    try:
        x, pil = _load(clf, src)
        if pil is not None:
            im.original_size = (pil.width, pil.height)
        im.rgb = clf.denormalise(x)[0].permute(1, 2, 0).float().cpu().numpy()
        cam, fv = _layers_for(clf, x, conf, cam_layers)
        logits, cam_act = _logits_and_layer(clf, x, cam)
        require_finite(logits, "the model's output")
        im.predictions = _top(clf, logits, int(conf["predictions"]["top"]))
        from .targets import resolve_target

        resolved = resolve_target(clf, target, 1, logits)
        im.target, im.target_label = resolved.indices[0], resolved.labels[0]
    except (ImageError, NonFiniteError) as e:
        im.errors["image"] = printable(e)
        log.warning("%s: %s", im.name, im.errors["image"])
        return im, None, None
    except Exception as e:  # noqa: BLE001 -- one broken image never stops the others
        im.errors["image"] = printable(f"{type(e).__name__}: {e}")
        log.warning("%s: %s", im.name, im.errors["image"], exc_info=log.isEnabledFor(logging.DEBUG))
        return im, None, None
    finally:
        im.timings["prepare_s"] = time.perf_counter() - t0
    ctx: dict[str, Any] = {
        "target": im.target if im.target is not None and im.target >= 0 else target,
        "cam_layer": cam,
        "fv_layer": fv,
        "layers": im.layers,
        "channels": im.channels,
        "results": im.results,
        "notes": im.notes,
        "name": name,
        "run": {} if run_cache is None else run_cache,
        "cache": cache if cache is not None else False,
        "cam_act": cam_act,
        "shared": shared,
        "batched": {},  # technique -> this image's row of a call on several images
        "batched_s": {},
        "t0": t0,
    }
    return im, x, ctx


def _run_techniques(clf: Classifier, im: ImageExplanation, x: Tensor, ctx: dict[str, Any], methods: tuple[str, ...],
                    conf: dict[str, Settings], bar: Any) -> None:
    """Every technique of ``methods`` on one prepared image; errors recorded per technique."""
    name = ctx["name"]
    for tech in methods:
        if bar is not None:
            bar.set_postfix_str(f"{printable(name)[:24]}: {tech}")
        t1 = time.perf_counter()
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                result = _finite(RUNNERS[tech](clf, x, ctx, conf[tech]), tech)
            if result is not None:  # None: nothing to show (said in the notes)
                im.results[tech] = result
            notes = list(dict.fromkeys(printable(w.message) for w in caught))
            if notes:
                im.notes.setdefault(tech, []).extend(notes)
        except NonFiniteError as e:
            im.errors[tech] = printable(e)
            log.warning("%s: %s failed: %s", im.name, tech, im.errors[tech])
        except Exception as e:  # noqa: BLE001 -- recorded, reported, and the run goes on
            im.errors[tech] = printable(f"{type(e).__name__}: {e}")
            log.warning("%s: %s failed: %s", im.name, tech, im.errors[tech], exc_info=log.isEnabledFor(logging.DEBUG))
        im.timings[f"{tech}_s"] = time.perf_counter() - t1 + ctx["batched_s"].get(tech, 0.0)
        check_interrupt()
    if "gradcam" in im.results and "occlusion" in im.results:
        from .metrics.evidence import agreement

        try:  # at the common (coarser) grid of the two maps: Grad-CAM's 7 x 7 against 11 x 11 windows
            im.agreement["gradcam_occlusion_spearman"] = agreement(im.results["gradcam"], im.results["occlusion"])[0]
        except (ValueError, RuntimeError) as e:  # maps that cannot be compared
            log.warning("%s: cannot compare Grad-CAM and occlusion: %s", im.name, printable(e))
    im.timings["total_s"] = time.perf_counter() - ctx["t0"]


def _finite(result: Any, tech: str) -> Any:
    """``result`` (may be None) when every map or image in it is finite; else :class:`NonFiniteError`."""
    tensors = result.maps if isinstance(getattr(result, "maps", None), dict) else {
        "": getattr(result, "maps", getattr(result, "images", None))}
    for name, t in tensors.items():
        if isinstance(t, Tensor):
            require_finite(t, f"the {tech} map{' of ' + name if name else ''}")
    return result


