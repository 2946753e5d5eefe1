"""Device handling checked without a GPU: every tensor convlens makes follows its input's device.

A tensor made without ``device=`` lands on torch's default device. On a GPU run that is the CPU,
and mixing it with the model's CUDA tensors raises (or copies, and waits for the device, every
call). Here the default device is set to ``meta`` while the model and the images stay on the CPU:
a tensor made without naming its device is then a meta tensor, and mixing it with the CPU tensors
raises in the same places a CPU tensor would on a GPU run. What convlens makes on the host on
purpose (seeded draws, the occlusion refinement's plan) says ``device="cpu"``; a static check
holds every factory call in ``src/`` to that.
"""

from __future__ import annotations

import ast
import contextlib
import copy
import dataclasses
import traceback
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import NamedTuple

import pytest
import timm
import torch
from tests.test_anymodel import small_net
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

import convlens
from conftest import assert_unchanged, snapshot
from convlens import Classifier
from convlens.metrics.trust import trust_summary

pytestmark = pytest.mark.usefixtures("one_thread")

SRC = Path(__file__).resolve().parents[1] / "src" / "convlens"
#: torch's factory functions that take ``device=`` (``from_numpy`` and ``*_like`` follow their source)
FACTORIES = {"tensor", "as_tensor", "zeros", "ones", "full", "empty", "arange", "rand", "randn", "randint",
             "randperm", "linspace", "logspace", "eye", "fftfreq", "rfftfreq"}


def test_every_factory_call_in_the_package_names_its_device():
    missing = []
    for path in sorted(SRC.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in FACTORIES
                    and ast.unparse(node.func.value) in ("torch", "torch.fft")
                    and not any(k.arg == "device" for k in node.keywords)):
                missing.append(f"{path.relative_to(SRC)}:{node.lineno} {ast.unparse(node.func)}")
    assert missing == []


@contextlib.contextmanager
def elsewhere():
    """Tensors made without a device go to ``meta``, not to the inputs' CPU."""
    torch.set_default_device("meta")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        torch.set_default_device(None)


def test_elsewhere_catches_a_tensor_made_without_the_inputs_device():
    x = torch.ones(3)
    with elsewhere(), pytest.raises((RuntimeError, NotImplementedError)):
        float((x + torch.zeros(3)).sum())
    assert torch.zeros(1).device.type == "cpu"  # restored


def _tensors(value, path: str = "", depth: int = 4) -> list[tuple[str, Tensor]]:
    """Every tensor in a result, with its path (``rows.0.deletion.scores``): through dataclass
    fields, mappings, lists and tuples, ``depth`` levels deep."""
    if isinstance(value, Tensor):
        return [(path, value)]
    if depth == 0:
        return []
    if dataclasses.is_dataclass(value):
        items = [(f.name, getattr(value, f.name)) for f in dataclasses.fields(value)]
    elif isinstance(value, Mapping):
        items = list(value.items())
    elif isinstance(value, (list, tuple)):
        items = list(enumerate(value))
    else:
        return []
    return [found for k, v in items for found in _tensors(v, f"{path}.{k}".lstrip("."), depth - 1)]


def _plain(net: nn.Module, channels: int = 3, **kw) -> Classifier:
    return Classifier(net, mean=(0.1,) * channels, std=(0.9,) * channels, size=None, **kw)


class Segmenter(nn.Module):
    """A tiny dense model: (N, 3, H, W) -> (N, 3 classes, H / 2, W / 2)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Conv2d(3, 6, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(6, 6, 3, padding=1))
        self.head = nn.Conv2d(6, 3, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.relu(self.body(x)))


def _gray_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(4, 3)).eval()


class Case(NamedTuple):
    clf: Classifier
    x: Tensor
    call: Callable[[Classifier, Tensor], object]
    #: what the CPU computes to compare with (default ``call``)
    reference: Callable[[Classifier, Tensor], object] | None = None
    #: paths of tensors compared by device only, not by value (random draws that differ by device)
    skip: tuple[str, ...] = ()
    #: paths of tensors kept on the host on purpose (thumbnails)
    host: tuple[str, ...] = ()


#: feature visualisation: one Adam step moves a pixel by lr * sign(gradient); where the gradient is
#: near 0 its sign differs with rounding. The objective of step 0 (the same image) is compared.
AFTER_A_STEP = ("images", "inputs", "objective")


def _cases() -> dict[str, Case]:
    clf, x = _plain(small_net()), torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    multi = _plain(small_net(), multi_label=True)
    wide = torch.randn(2, 3, 24, 40, generator=torch.Generator().manual_seed(2))
    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2,
                            num_classes=4).eval()
    tokens = _plain(vit)
    seg = _plain(Segmenter(), labels=["background", "cat", "dog"])
    mask = torch.zeros(16, 16)
    mask[4:12, 2:10] = 1.0
    region = convlens.Region("cat", mask)
    gray = _plain(_gray_net(), channels=1)
    half = _plain(copy.deepcopy(clf.model).to(torch.bfloat16))
    given = torch.rand(2, 32, 32, generator=torch.Generator().manual_seed(4))  # a map on the host
    g1 = torch.randn(2, 1, 20, 28, generator=torch.Generator().manual_seed(3))

    def cam(method, **kw):
        return lambda c, v: convlens.grad_cam(c, v, layer="6", method=method, batch_size=8, **kw)

    def occ(**kw):
        return lambda c, v: convlens.occlusion(c, v, patch=16, stride=8, **kw)

    cases = {f"cam {m}": Case(clf, x, cam(m, target=[1, 3])) for m in convlens.CAM_METHODS}
    cases.update({
        "cam top-2": Case(clf, x, cam("gradcam", top=2)),
        "cam callable": Case(clf, x, cam("gradcam", target=lambda o: o[:, 2] - o[:, 0])),
        "activations": Case(clf, x, lambda c, v: convlens.activations(c, v, ["2", "6"])),
        "occlusion exact": Case(clf, x, occ(target=2)),
        # on a GPU an approximate request gives the exact map (settings["fallback"] says so)
        "occlusion approximate refined": Case(clf, x, occ(mode="approximate", refine=0.5),
                                              reference=occ(mode="exact", refine=0.5)),
        "occlusion full forwards blur": Case(clf, x, occ(fast=False, baseline="blur")),
        "feature visualisation fourier": Case(clf, x, lambda c, v: convlens.feature_visualization(
            c, "6", [0, 3], steps=1, size=32), skip=AFTER_A_STEP),
        "feature visualisation pixel class": Case(clf, x, lambda c, v: convlens.feature_visualization(
            c, None, [1], objective="class", param="pixel", steps=1, size=32), skip=AFTER_A_STEP),
        "deletion insertion": Case(clf, x, lambda c, v: convlens.deletion_insertion(
            c, v, {"g": convlens.grad_cam(c, v, layer="6")}, steps=4)),
        # the re-initialised weights are drawn by the device's own generator: compared by device only
        "sanity check": Case(clf, x, lambda c, v: convlens.sanity_check(c, v, "gradcam", layer="6", draws=2),
                             skip=("",)),
        "class sensitivity": Case(clf, x, lambda c, v: convlens.class_sensitivity(c, v, "gradcam", layer="6")),
        "compare": Case(clf, x, lambda c, v: convlens.compare(
            c, v, ["gradcam", "occlusion"], steps=4, draws=2, options={"occlusion": {"patch": 16, "stride": 8}}),
            skip=("rows.0.sanity", "rows.1.sanity"), host=("thumbnails",)),
        "trust summary": Case(clf, x[:1], lambda c, v: trust_summary(
            c, v, {"gradcam": convlens.grad_cam(c, v, layer="6"), "occlusion": convlens.occlusion(
                c, v, patch=16, stride=8)}, steps=4, draws=2)),
        "multi-label occlusion": Case(multi, x, occ()),
        "multi-label deletion": Case(multi, x, lambda c, v: convlens.deletion(
            c, v, convlens.grad_cam(c, v, layer="6"), steps=4)),
        "non-square cam": Case(clf, wide, cam("gradcam++")),
        "non-square occlusion": Case(clf, wide, occ()),
        "tokens cam": Case(tokens, x, lambda c, v: convlens.grad_cam(c, v, target=[1, 2])),
        "tokens activations": Case(tokens, x, lambda c, v: convlens.activations(c, v, ["blocks.1"])),
        "tokens occlusion": Case(tokens, x, occ()),
        "region cam": Case(seg, x, lambda c, v: convlens.grad_cam(c, v, target=region, layer="body.2")),
        "region occlusion": Case(seg, x, occ(target=region)),
        "region deletion": Case(seg, x, lambda c, v: convlens.deletion(
            c, v, convlens.grad_cam(c, v, target=region, layer="body.2"), target=region, steps=4)),
        "grayscale cam": Case(gray, g1, lambda c, v: convlens.grad_cam(c, v, layer="1")),
        "grayscale feature visualisation": Case(gray, g1, lambda c, v: convlens.feature_visualization(
            c, "1", [0], steps=1, size=20), skip=AFTER_A_STEP),
        "denormalise": Case(gray, g1, lambda c, v: c.denormalise(v)),
        # a bfloat16 model: inputs follow its dtype, the metrics compute in float32; the two devices
        # round differently in bfloat16, so the GPU run compares devices only
        "bfloat16 compare": Case(half, x, lambda c, v: convlens.compare(
            c, v, ["gradcam", "occlusion"], steps=4, draws=2, sanity=False,
            options={"occlusion": {"patch": 16, "stride": 8}}), skip=("",), host=("thumbnails",)),
        "bfloat16 tokens cam": Case(_plain(copy.deepcopy(vit).to(torch.bfloat16)), x, lambda c, v: convlens.grad_cam(
            c, v, target=[1, 2]), skip=("",)),
        "bfloat16 region deletion": Case(seg.with_model(copy.deepcopy(seg.model).to(torch.bfloat16)), x,
                                         lambda c, v: convlens.deletion(c, v, given, target=region, steps=4),
                                         skip=("",)),
    })
    return cases


with torch.random.fork_rng():  # built at collection: the global generator is left as it was
    CASES = _cases()


@pytest.mark.parametrize("name", list(CASES))
def test_tensors_made_follow_the_inputs_device(name):
    clf, x, call = CASES[name][:3]
    before = snapshot(clf.model)
    with elsewhere():
        result = call(clf, x)
    found = _tensors(result)
    assert found, "the result holds no tensor to check"
    assert {t.device.type for _, t in found} == {"cpu"}  # on the inputs' device, not the default one
    assert_unchanged(clf.model, before)


@pytest.mark.parametrize("name", list(CASES))
def test_on_the_device_equals_the_cpu(name, device):
    """Where a GPU is present: each case there equals the CPU's, within 1e-3 of the largest value
    (2e-2 when the caller enabled TF32), and its tensors stay on the GPU (thumbnails aside)."""
    if device == "cpu":
        pytest.skip("the CPU is the reference; test_tensors_made_follow_the_inputs_device checks it")
    case = CASES[name]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = (case.reference or case.call)(case.clf, case.x)
        moved = case.clf.with_model(copy.deepcopy(case.clf.model).to(device))
        before = snapshot(moved.model)
        got = case.call(moved, case.x.to(device))
    assert_unchanged(moved.model, before)
    want, found = _tensors(ref), _tensors(got)
    assert [p for p, _ in found] == [p for p, _ in want]
    tf32 = torch.backends.cuda.matmul.allow_tf32 or torch.backends.cudnn.allow_tf32
    for (path, a), (_, b) in zip(want, found):
        host = any(path.startswith(h) for h in case.host)
        assert b.device.type == ("cpu" if host else device), path
        if not any(path.startswith(k) for k in case.skip):
            a, b = a.detach().double(), b.detach().cpu().double()
            scale = float(a.abs().nan_to_num().max()) if a.numel() else 1.0
            torch.testing.assert_close(b, a, rtol=0, atol=(2e-2 if tf32 else 1e-3) * (scale or 1.0), equal_nan=True,
                                       msg=path)


# -- waits for the device: per call, not per batch or step ----------------------------------------
SYNCS = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__")


def _has_list(index) -> bool:
    return isinstance(index, list) or (isinstance(index, tuple) and any(isinstance(i, list) for i in index))


def _note(seen: list[str], name: str) -> None:
    """Record ``name`` with the line of convlens that asked (for the assertion's message); not what
    the optimiser does (its step counter lives on the host, torch.optim reads it there)."""
    stack = traceback.extract_stack(limit=14)
    if any("torch/optim" in f.filename for f in stack):
        return
    where = [f for f in stack if str(SRC) in f.filename]
    seen.append(f"{name} {where[-1].filename[len(str(SRC)) + 1:]}:{where[-1].lineno}" if where else name)


class _ListIndexing(TorchFunctionMode):
    """Notes indexing with a Python list. (A mode, not a patched ``Tensor.__getitem__``: putting
    that back leaves CPython's sequence slot set, and ``torch.tensor`` of 0-d tensors then fails.)"""

    def __init__(self, seen: list[str]) -> None:
        super().__init__()
        self.seen = seen

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in (Tensor.__getitem__, Tensor.__setitem__) and _has_list(args[1]):
            _note(self.seen, func.__name__)
        return func(*args, **(kwargs or {}))


@pytest.fixture()
def waits(monkeypatch):
    """Counts what waits for the device on a GPU, as a CPU run makes it: reading a value to the host
    (``.item()``, ``.tolist()``, ``float()``...), host data made straight on a tensor's device
    (``torch.tensor(list, device=t.device)``: a synchronous copy; ``device="cpu"`` is the host on
    purpose) and indexing with a Python list (a synchronous copy of the index). Not seen here: a
    ``.to(device)`` of a host tensor without ``non_blocking`` (on the CPU it cannot be told from a
    no-op): the code review found none in a loop."""
    seen: list[str] = []

    def spy(owner, name, counts):
        original = getattr(owner, name)

        def wrapper(*a, **k):
            if counts(a, k):
                _note(seen, name)
            return original(*a, **k)

        monkeypatch.setattr(owner, name, wrapper)

    for name in SYNCS:
        spy(torch.Tensor, name, lambda a, k: True)
    for name in ("tensor", "as_tensor"):
        spy(torch, name, lambda a, k: isinstance(k.get("device"), torch.device) and not isinstance(a[0], Tensor))
    with _ListIndexing(seen):
        yield seen


def _count(waits: list[str], fn, *args, **kwargs) -> list[str]:
    """The waits of ``fn(*args, **kwargs)``'s second call (the first builds what a model's later
    calls reuse: the checked private copy, the layer table)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fn(*args, **kwargs)
        waits.clear()
        fn(*args, **kwargs)
    return sorted(waits)


def test_occlusion_on_the_gpu_path_waits_per_call_not_per_batch(waits, monkeypatch):
    """The GPU path (full batches through the private copy; crop devices emptied, as on CUDA): the
    same waits with one window per batch as with every window in one batch."""
    monkeypatch.setattr(convlens.methods.occlusion, "CROP_DEVICES", ())
    clf, x = CASES["occlusion exact"][:2]
    seg, region = CASES["region occlusion"][0], convlens.Region("cat", torch.ones(16, 16))
    for c, kw in ((clf, {}), (clf, {"fast": False}), (seg, {"target": region})):
        one = _count(waits, convlens.occlusion, c, x, patch=16, stride=8, batch_size=1, **kw)
        assert one == _count(waits, convlens.occlusion, c, x, patch=16, stride=8, batch_size=64, **kw), kw


def test_score_cam_and_deletion_waits_per_call_not_per_batch(waits):
    clf, x = CASES["cam scorecam"][:2]
    kw = {"target": [1, 3], "layer": "6", "method": "scorecam"}
    assert _count(waits, convlens.grad_cam, clf, x, batch_size=1, **kw) == _count(
        waits, convlens.grad_cam, clf, x, batch_size=16, **kw)
    cam = convlens.grad_cam(clf, x, layer="6")
    seg, region = CASES["region occlusion"][0], convlens.Region("cat", torch.ones(16, 16))
    for c, t in ((clf, None), (seg, region)):
        one = _count(waits, convlens.deletion_insertion, c, x, {"m": cam}, target=t, steps=4, batch_size=1)
        assert one == _count(waits, convlens.deletion_insertion, c, x, {"m": cam}, target=t, steps=4, batch_size=64)


def test_feature_visualisation_waits_per_call_not_per_step(waits):
    """Diversity across two images of one channel and the transforms that draw scales and angles
    (jitter's offsets are drawn and read on the host by design)."""
    from convlens.methods.transforms import pad, random_rotate, random_scale

    clf = CASES["feature visualisation fourier"][0]
    kw = {"size": 32, "diversity": 0.5, "transforms": [pad(2), random_scale([0.9, 1.0, 1.1]), random_rotate([-5, 5])]}
    assert _count(waits, convlens.feature_visualization, clf, "6", [0, 0, 3], steps=1, **kw) == _count(
        waits, convlens.feature_visualization, clf, "6", [0, 0, 3], steps=4, **kw)


def _cuda_syncs(call) -> int:
    """How many operations of ``call()``'s second run synchronise with the GPU
    (``torch.cuda.set_sync_debug_mode``: each warns)."""
    call()
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            call()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in seen)


@pytest.mark.parametrize("name", ["occlusion exact", "region occlusion", "cam scorecam", "deletion insertion",
                                  "feature visualisation fourier"])
def test_waits_on_the_gpu_do_not_grow_with_batches_or_steps(name, device):
    """Where a GPU is present, CUDA's own sync detection: the same number of synchronising
    operations with one item per batch (one step) as with several."""
    if device == "cpu":
        pytest.skip("the CPU run counts them with the waits spy (the tests above)")
    case = CASES[name]
    c = case.clf.with_model(copy.deepcopy(case.clf.model).to(device))
    x = case.x.to(device)
    region = convlens.Region("cat", torch.ones(16, 16))
    maps = torch.rand(2, 32, 32, generator=torch.Generator().manual_seed(0)).to(device)
    calls = {
        "occlusion exact": lambda b: convlens.occlusion(c, x, patch=16, stride=8, batch_size=b),
        "region occlusion": lambda b: convlens.occlusion(c, x, patch=16, stride=8, batch_size=b, target=region),
        "cam scorecam": lambda b: convlens.grad_cam(c, x, layer="6", method="scorecam", batch_size=b, target=[1, 3]),
        "deletion insertion": lambda b: convlens.deletion_insertion(c, x, {"m": maps}, steps=4, batch_size=b),
        "feature visualisation fourier": lambda b: convlens.feature_visualization(c, "6", [0, 0, 3], steps=b, size=32,
                                                                                  diversity=0.5),
    }
    assert _cuda_syncs(lambda: calls[name](1)) == _cuda_syncs(lambda: calls[name](8))
