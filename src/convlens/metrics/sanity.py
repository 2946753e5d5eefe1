"""Sanity checks for saliency maps (Adebayo et al., "Sanity Checks for Saliency Maps", NeurIPS
2018) and class sensitivity: does a map depend on the model's decision at all?

Cascading model-parameter randomisation: on a private deep copy of the model (the user's model is
never touched), the parameters are re-initialised from the output layer towards the input, one
stage at a time and cumulatively, and the method's map is made again after each step. A map that
explains the decision changes at once (low rank correlation with the original map); a map that
still looks the same after the classifier is random shows the image's activations, not why the
model chose the class.

Class sensitivity: the rank correlation between the map for the target class and the map for a
distant class (default: the least likely one). A class-discriminative method gives different maps.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .._compat import MODEL_AND_IMAGES, method_options, renamed
from ..hooks import model_guard, unhooked_copy
from ..layers import find_stages, layer_table, remembered, resolve_layer
from ..models import Classifier, OutputAdapter, as_classifier, model_output
from ..results import Saliency
from ..targets import Region, ResolvedTarget, Target, resolve_target
from ._common import MethodSpec, make_map, method_name, spearman, ssim
from .results import ClassSensitivity, SanityCheck

__all__ = ["sanity_check", "class_sensitivity", "cascade_stages", "SANITY_THRESHOLD", "CLASS_THRESHOLD"]

log = logging.getLogger(__name__)

#: a method passes the sanity check when the rank correlation between its map and the map after
#: the classifier alone is re-initialised is below this (Adebayo et al. read "visually similar"
#: off such correlations; 0.5 leaves "unchanged" and "decorrelated" well apart)
SANITY_THRESHOLD = 0.5
#: a method is class-discriminative on an image when the maps of the target and of the other
#: class have a rank correlation below this
CLASS_THRESHOLD = 0.5


def _with_params(model: nn.Module) -> dict[str, nn.Module]:
    """Modules that hold parameters or buffers of their own, by name."""
    return {
        name: m for name, m in model.named_modules()
        if any(True for _ in m.parameters(recurse=False)) or any(True for _ in m.buffers(recurse=False))
    }


def cascade_stages(model: nn.Module, x: Tensor, *, output: OutputAdapter | None = None) -> list[str]:
    """The default randomisation steps, from the output down: the last module with parameters to
    run whose parameters the explained output depends on (the classifier: with ``output=`` picking
    one head of several, that head, not the one that happens to run last), then each stage of
    :func:`convlens.layers.find_stages` from the top.

    Args:
        model: the model (one traced pass, remembered per input shape; left as it was).
        x: (N, C, H, W) model-ready input on the model's device (its first image is traced).
        output: the classifier's output adapter (``clf.output``; default :func:`model_output`).
    Returns:
        Module names, the classifier first.
    Raises:
        ValueError: no module with parameters runs in the model.
        LayerError: no stage outputs are found.

    Example::

        cascade_stages(clf.model, x)   # ['classifier', 'blocks.6', 'blocks.4', 'blocks.2', 'blocks.1', 'blocks.0']
    """
    key = ("cascade_stages", tuple(x.shape[1:]), output)
    return list(remembered(model, key, lambda: _cascade_stages(model, x, output or model_output)))


def _reaching(model: nn.Module, x: Tensor, names: list[str], output: OutputAdapter) -> set[str] | None:
    """The modules of ``names`` whose own parameters the output depends on: autograd reaches them
    from ``output(model(x[:1]))`` (gradients asked of autograd, never stored in ``.grad``; the
    parameters' ``requires_grad`` restored by the guard). None when that cannot be traced."""
    params = {n: next(model.get_submodule(n).parameters(recurse=False)) for n in names}
    try:
        with torch.inference_mode(False), model_guard(model), torch.enable_grad():
            for p in params.values():
                p.requires_grad_(True)
            out = output(model(x[:1]))
            grads = torch.autograd.grad(out.float().sum(), list(params.values()), allow_unused=True)
    except Exception as e:  # noqa: BLE001 -- the order of the modules still gives a default
        log.info("cascade stages: the output's dependencies cannot be traced (%s: %s)", type(e).__name__, e)
        return None
    return {n for n, g in zip(params, grads) if g is not None}


def _cascade_stages(model: nn.Module, x: Tensor, output: OutputAdapter) -> list[str]:
    table = layer_table(model, x)
    own = _with_params(model)
    ran = [r for r in table if r.order >= 0 and r.name in own and any(True for _ in own[r.name].parameters(False))]
    if not ran:
        raise ValueError("the model has no parameters to randomise")
    reaching = _reaching(model, x, [r.name for r in ran], output)
    if reaching:  # another head that runs later does not explain this output
        ran = [r for r in ran if r.name in reaching]
    head = max(ran, key=lambda r: r.order).name
    stages = [s for s in reversed(find_stages(model, x, table)) if s != head]
    return [head, *stages]


def _steps(model: nn.Module, x: Tensor, stages: Sequence[str]) -> list[list[str]]:
    """For each stage (top down): the names of the modules its step re-initialises, i.e. those with
    parameters that run at or after the first module of the stage and were not reset before."""
    # one traced pass per model and input shape (the comparison asks once per method)
    key = ("layer_table", tuple(x.shape[1:]))
    table = {r.name: r for r in remembered(model, key, lambda: layer_table(model, x))}
    own = _with_params(model)
    done: set[str] = set()
    out = []
    for stage in stages:
        name, _ = resolve_layer(model, stage)
        inside = [r.order for n, r in table.items() if (n == name or n.startswith(name + ".")) and r.order >= 0]
        if not inside:
            raise ValueError(f"stage {stage!r} did not run in the forward pass")
        start = min(inside)
        now = [n for n in own if n not in done and n in table and table[n].order >= start]
        done.update(now)
        out.append(now)
    return out


def _reinit(module: nn.Module) -> None:
    """The module's own initialisation (``reset_parameters``), else a normal draw with each
    parameter's own standard deviation."""
    if callable(getattr(module, "reset_parameters", None)):
        module.reset_parameters()
        return
    with torch.no_grad():
        for p in module.parameters(recurse=False):
            std = float(p.std()) if p.numel() > 1 else 0.0
            p.normal_(0.0, std or 0.02)


def _private_copy(clf: Classifier) -> Classifier:
    """A classifier around a deep copy of the model (unfolded, to be re-initialised; without the
    caller's hooks: :func:`convlens.hooks.unhooked_copy`), keeping every other attribute (the
    output adapter, multi-label, the layout: :meth:`Classifier.with_model`)."""
    return clf.with_model(unhooked_copy(clf.model), name=f"{clf.name} (randomised copy)")


def per_image_classes(target: Target, classes: list[int]) -> Target:
    """``classes`` (one per image) as a target of the same kind as ``target``: a :class:`Region`
    with the same mask for a Region, else the list."""
    return Region(list(classes), target.mask) if isinstance(target, Region) else list(classes)


def fixed_target(clf: Classifier, x: Tensor, target: Target) -> tuple[Target, ResolvedTarget, Tensor]:
    """``target`` resolved once on the user's model and fixed per image (a class per image, or a
    Region with a class per image), so every map of a metric explains the same classes; with the
    resolved target and the model's output.

    Raises:
        ValueError: a callable target, or one :func:`resolve_target` refuses.
    """
    out = clf.outputs(x)
    resolved = resolve_target(clf, target, x.shape[0], out)
    if resolved.fn is not None:
        raise ValueError("the metrics need class targets (an index or name per image, or a Region), not a callable")
    return per_image_classes(target, resolved.indices), resolved, out


def _given_or_made(
    clf: Classifier, x: Tensor, method: MethodSpec, target: Target, indices: list[int], layer: str | None,
    options: dict[str, Any] | None, original: Saliency | Tensor | None,
) -> tuple[Tensor, Saliency | None]:
    if original is None:
        return make_map(clf, x, method, target, layer=layer, options=options)
    if isinstance(original, Saliency):
        if list(original.target) != indices:
            raise ValueError(f"the given map explains classes {original.target}, not the targets {indices}")
        maps, sal = original.maps, original
    else:
        maps, sal = (original[None] if original.dim() == 2 else original), None
    if maps.dim() != 3 or maps.shape[0] != x.shape[0]:
        raise ValueError(f"the given map must be (N, H, W) for {x.shape[0]} images, got {tuple(maps.shape)}")
    return maps.detach().to(x.device, torch.float32), sal


@renamed(**MODEL_AND_IMAGES)
def sanity_check(
    model: nn.Module | Classifier,
    images: Any,
    method: MethodSpec = "gradcam",
    *,
    target: Target = None,
    layer: str | None = None,
    stages: Sequence[str] | None = None,
    seed: int = 0,
    draws: int = 10,
    threshold: float = SANITY_THRESHOLD,
    options: dict[str, Any] | None = None,
    original: Saliency | Tensor | None = None,
) -> SanityCheck:
    """Cascading model-parameter randomisation of a private copy of the model: ``spearman[n, j]``
    and ``ssim[n, j]`` compare image ``n``'s original map with the map after step ``j`` (the
    classifier, then each stage from the top, cumulatively re-initialised with the modules' own
    ``reset_parameters``, seeded by ``seed``). ``passed[n] = spearman[n, 0] < threshold``; a map
    that becomes constant has correlation 0 (changed), and NaN (original and randomised maps both
    constant: nothing to judge) does not pass. The first step, which gives the verdict, is
    drawn ``draws`` times (seeds ``seed .. seed+draws-1``) and its
    ``spearman``/``ssim`` are the means over the draws: one random classifier can, by chance,
    weight the image's strongest activations positively and give a map that still looks like the
    original (Grad-CAM on the default model: rho from -0.4 to 0.7 over seeds, mean about 0.1);
    the later steps use the first draw. The per-draw values are in ``settings["draws"]``.

    ``method``: a CAM method name, ``"occlusion"``, or ``f(clf, x, target) -> Saliency | tensor``;
    ``options={"occlusion": {"patch": 32}}``: per-method options, the named method's are passed to
    it (e.g. occlusion's ``patch``/``stride``; a callable gets ``options`` as given). ``stages``: module names
    (default :func:`cascade_stages`; ``stages=[]`` is refused). ``target``: default the original
    model's top-1 class, kept for every randomised model. ``original``: the method's map on the
    user's model for these targets, when the caller has it already (saves one run). The user's
    model is never touched.

    Args:
        model: an ``nn.Module`` or a :class:`convlens.Classifier`.
        images: (N, 3, H, W) float tensor (moved to the model's device and dtype), or image(s) that
            :meth:`Classifier.batch` accepts.
        method: a CAM method name, ``"occlusion"`` or ``f(clf, x, target) -> Saliency | tensor``.
        target: one class per image (index or name), a :class:`convlens.Region` of a dense
            output, or None (top-1); not a callable.
        layer: the CAM layer (default: the one the method chooses on the user's model).
        stages: module names to re-initialise, from the output down.
        seed: the first draw's seed.
        draws: draws of the first step (>= 1).
        threshold: the verdict's rank-correlation threshold.
        options: ``{method name: {option: value}}``; the named method's are passed to it.
        original: the method's (N, H, W) map or Saliency on the user's model for these targets.
    Returns:
        A :class:`SanityCheck`: ``spearman`` and ``ssim`` (N, steps) float32, ``maps``
        (N, steps+1, H, W) float32 (the original first), on the model's device; ``passed`` per
        image; ``settings`` with the per-draw values.
    Raises:
        ValueError: empty ``stages``, bad ``draws``, a callable or bad target, an ``original``
            that explains other classes or has the wrong shape, an unknown method.
        LayerError: an unknown stage or layer name.

    Example::

        check = convlens.sanity_check(clf, x, "gradcam")
        check.passed, check.plot()
    """
    clf = as_classifier(model)
    x = clf.batch(images)
    options = method_options(method, options)
    fixed, resolved, _ = fixed_target(clf, x, target)
    indices, labels = list(resolved.indices), list(resolved.labels)
    original, sal = _given_or_made(clf, x, method, fixed, indices, layer, options, original)
    used_layer = layer if layer is not None else (sal.layer if sal is not None else None)
    stages = (cascade_stages(clf.model, x, output=clf.output) if stages is None
              else [resolve_layer(clf.model, s)[0] for s in stages])
    if not stages:
        raise ValueError("stages is empty; give at least one module to randomise")
    if isinstance(draws, bool) or not isinstance(draws, int) or draws < 1:
        raise ValueError(f"draws must be a positive int, got {draws!r}")
    steps = _steps(clf.model, x, stages)

    private = _private_copy(clf)
    named = dict(private.model.named_modules())

    def randomised(names: list[str]) -> Tensor:
        with model_guard(private.model), torch.no_grad():
            for name in names:
                _reinit(named[name])
        return make_map(private, x, method, fixed, layer=used_layer, options=options, quiet=True)[0]

    # the first step's modules are put back between the verdict's draws (cheaper than a new copy)
    saved = {n: {k: v.clone() for k, v in named[n].state_dict().items()} for n in steps[0]}
    maps = [original]
    first_rho, first_ssim = [], []
    devices = [x.device] if x.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        for d in range(1, draws):
            torch.manual_seed(seed + d)
            m = randomised(steps[0])
            first_rho.append(spearman(original, m))
            first_ssim.append(ssim(original, m))
            for n in steps[0]:
                named[n].load_state_dict(saved[n])
        torch.manual_seed(seed)
        for names in steps:
            maps.append(randomised(names))
    rho = torch.stack([spearman(original, m) for m in maps[1:]], 1)
    sim = torch.stack([ssim(original, m) for m in maps[1:]], 1)
    draws_rho = torch.stack([rho[:, 0], *first_rho], 1)
    draws_ssim = torch.stack([sim[:, 0], *first_ssim], 1)
    rho[:, 0] = draws_rho.nanmean(1)
    sim[:, 0] = draws_ssim.mean(1)
    passed = [bool(r < threshold) for r in rho[:, 0].tolist()]
    log.info("sanity check of %s: rho after %s = %s", method_name(method), stages[0], rho[:, 0].tolist())
    return SanityCheck(
        method=method_name(method),
        stages=list(stages),
        spearman=rho,
        ssim=sim,
        passed=passed,
        threshold=float(threshold),
        target=indices,
        maps=torch.stack(maps, 1),
        images=clf.denormalise(x),
        labels=labels,
        settings={"seed": seed, "draws": draws_rho.tolist(), "layer": used_layer, "reinitialised": steps,
                  "options": dict(options or {})},
    )


@renamed(**MODEL_AND_IMAGES)
def class_sensitivity(
    model: nn.Module | Classifier,
    images: Any,
    method: MethodSpec = "gradcam",
    *,
    other: Target = None,
    target: Target = None,
    layer: str | None = None,
    threshold: float = CLASS_THRESHOLD,
    options: dict[str, Any] | None = None,
    original: Saliency | Tensor | None = None,
) -> ClassSensitivity:
    """Rank correlation per image between ``method``'s map for ``target`` (default: top-1) and
    for ``other`` (default: the least likely class): ``rho = spearman(map_target, map_other)``;
    ``discriminative[n] = rho[n] < threshold`` (NaN, a constant map, counts as not).
    ``original``: the target's map when the caller has it already (saves one run).

    Args:
        model: an ``nn.Module`` or a :class:`convlens.Classifier` (left as it was).
        images: (N, 3, H, W) float tensor (moved to the model's device and dtype), or image(s) that
            :meth:`Classifier.batch` accepts.
        method: a CAM method name, ``"occlusion"`` or ``f(clf, x, target) -> Saliency | tensor``.
        other: the other class per image (index or name; over the same region for a Region
            target; default: the least likely).
        target: the explained class per image (default: top-1), or a :class:`convlens.Region`;
            not a callable.
        layer: the CAM layer (default: the method's automatic choice).
        threshold: the rank-correlation threshold.
        options: ``{method name: {option: value}}``; the named method's are passed to it.
        original: the target's (N, H, W) map or Saliency, when the caller has it.
    Returns:
        A :class:`ClassSensitivity`: ``spearman`` (N,) float32 and ``maps`` (N, 2, H, W) float32
        (target, other) on the model's device; ``discriminative`` per image.
    Raises:
        ValueError: a callable or bad target or ``other``, an ``original`` that explains other
            classes or has the wrong shape, an unknown method.

    Example::

        cs = convlens.class_sensitivity(clf, x, "gradcam++")
        cs.spearman, cs.discriminative
    """
    clf = as_classifier(model)
    x = clf.batch(images)
    options = method_options(method, options)
    fixed, resolved, out = fixed_target(clf, x, target)
    indices, labels = list(resolved.indices), list(resolved.labels)
    if other is None:
        others = resolved.per_class(out).argmin(1).tolist()  # the least likely class (over the Region)
        other_target = per_image_classes(target, others)
    else:
        if isinstance(target, Region) and not isinstance(other, Region):
            other = Region(other, target.mask)  # the other class over the same region
        other_target, resolved_other, _ = fixed_target(clf, x, other)
        others = list(resolved_other.indices)
    other_labels = [clf.label(i) for i in others]
    a, sal = _given_or_made(clf, x, method, fixed, indices, layer, options, original)
    used_layer = layer if layer is not None else (sal.layer if sal is not None else None)
    b, _ = make_map(clf, x, method, other_target, layer=used_layer, options=options, quiet=True)
    rho = spearman(a, b)
    return ClassSensitivity(
        method=method_name(method),
        spearman=rho,
        discriminative=[bool(r < threshold) for r in rho.tolist()],
        threshold=float(threshold),
        target=indices,
        other=others,
        maps=torch.stack([a, b], 1),
        labels=labels,
        other_labels=other_labels,
        settings={"layer": used_layer, "options": dict(options or {})},
    )
