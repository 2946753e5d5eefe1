"""Any classifier: models that return tuples, dicts, ``.logits`` objects (Hugging Face
transformers, built offline from configs) or anything through ``output=``; every technique gives
the same result as on the same network returning plain logits. Runs on every device present."""

from __future__ import annotations

import warnings
from collections import namedtuple

import pytest
import torch
import torchvision
from torch import nn

import convlens
from convlens import Classifier, ModelError, activations, feature_visualization, grad_cam, model_output, occlusion
from convlens.hooks import count_hooks

CAMS = ("gradcam", "gradcam++", "xgradcam", "layercam", "scorecam", "eigencam")
Pair = namedtuple("Pair", "logits features")


def small_net() -> nn.Module:
    """A small fixed-seed CNN with batch norm (its running statistics made non-trivial)."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 5),
    )
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    return net.eval()


class Wrapped(nn.Module):
    """The same network, its logits returned inside another structure."""

    def __init__(self, net: nn.Module, kind: str) -> None:
        super().__init__()
        self.net, self.kind = net, kind

    def forward(self, x):
        logits = self.net(x)
        if self.kind == "tuple":
            return logits, logits.detach() * 0 + 1
        if self.kind == "list":
            return [logits]
        if self.kind == "dict":
            return {"features": x.mean(), "logits": logits}
        if self.kind == "namedtuple":
            return Pair(logits, x)
        if self.kind == "custom":  # only output= can find it
            return {"scores": {"cls": logits}}
        raise AssertionError(self.kind)


def test_model_output_rules():
    t = torch.randn(2, 3)
    assert model_output(t) is t
    assert model_output((t, torch.zeros(1))) is t and model_output(["x", t]) is t
    assert model_output({"a": 1, "logits": t}) is t
    assert model_output(Pair(t, None)) is t

    class Obj:
        logits = t

    assert model_output(Obj()) is t
    with pytest.raises(ModelError, match="output="):
        model_output({"scores": t})
    with pytest.raises(ModelError, match="output="):
        model_output(None)
    clf = Classifier(Wrapped(small_net(), "custom"), mean=(0,) * 3, std=(1,) * 3, size=None,
                     output=lambda o: o["scores"]["cls"])
    assert clf.logits(torch.zeros(1, 3, 8, 8)).shape == (1, 5)
    with pytest.raises(ModelError, match="output="):
        Classifier(Wrapped(small_net(), "custom"), mean=(0,) * 3, std=(1,) * 3).logits(torch.zeros(1, 3, 8, 8))
    with pytest.raises(TypeError, match="callable"):
        Classifier(small_net(), mean=(0,) * 3, std=(1,) * 3, output="logits")


def _every_technique(clf, x, layer, device):
    """Results of every technique for ``clf`` on ``x`` (the layer given as a module)."""
    out = {"acts": activations(clf, x, [layer]).maps}
    for m in CAMS:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out[m] = grad_cam(clf, x, target=[1, 3], layer=layer, method=m, batch_size=8).raw
    out["callable"] = grad_cam(clf, x, target=lambda o: o[:, 2] - o[:, 0], layer=layer).raw
    out["top2"] = grad_cam(clf, x, top=2, layer=layer).raw
    out["occ"] = occlusion(clf, x, patch=x.shape[-1] // 2, stride=x.shape[-1] // 2, target=2).maps
    fv = feature_visualization(clf, layer, [0, 3], steps=3, size=x.shape[-1], transforms=())
    out["fv"], out["fv_obj"] = fv.images, fv.objective
    cls = feature_visualization(clf, None, [1], objective="class", steps=3, size=x.shape[-1], transforms=())
    out["fv_class"] = cls.images
    for v in out.values():
        tensors = v.values() if isinstance(v, dict) else [v]
        assert all(t.device.type == device for t in tensors)
    return out


@pytest.mark.parametrize("kind", ["tuple", "list", "dict", "namedtuple", "custom"])
def test_every_technique_through_the_output_adapter(kind, device):
    net = small_net().to(device)
    x = torch.randn(2, 3, 16, 16, device=device)
    plain = Classifier(net, mean=(0,) * 3, std=(1,) * 3, size=None)
    wrapped = Classifier(Wrapped(net, kind), mean=(0,) * 3, std=(1,) * 3, size=None,
                         output=(lambda o: o["scores"]["cls"]) if kind == "custom" else None)
    ref = _every_technique(plain, x, net[6], device)
    got = _every_technique(wrapped, x, net[6], device)
    for key in ref:
        a, b = ref[key], got[key]
        if isinstance(a, dict):
            a, b = list(a.values())[0], list(b.values())[0]
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=key)
    assert count_hooks(net) == 0


def test_tuple_output_keeps_the_occlusion_crop_path():
    """A torchvision ResNet whose forward returns (logits, features): the fast crop path still
    applies (the output adapter is used in its self-check) and equals full forwards."""

    class TupleResNet(torchvision.models.ResNet):
        def forward(self, x):
            return super().forward(x), x.mean()

    torch.manual_seed(0)
    net = TupleResNet(torchvision.models.resnet.BasicBlock, [1, 1, 1, 1], num_classes=7).eval()
    x = torch.randn(1, 3, 64, 64)
    fast = occlusion(net, x, patch=16, stride=16, target=3)
    slow = occlusion(net, x, patch=16, stride=16, target=3, fast=False)
    assert fast.settings["path"] == "crop" and slow.settings["path"] == "plain"
    torch.testing.assert_close(fast.maps, slow.maps, rtol=1e-4, atol=1e-6)


# -- Hugging Face transformers image classifiers, built offline from their configs ------------
def _hf(arch: str) -> nn.Module:
    import transformers  # a test dependency: missing, the test fails rather than skips
    torch.manual_seed(0)
    if arch == "resnet":
        cfg = transformers.ResNetConfig(embedding_size=16, hidden_sizes=[16, 32, 48, 64], depths=[1, 1, 1, 1],
                                        layer_type="bottleneck", num_labels=6)
        return transformers.ResNetForImageClassification(cfg).eval()
    cfg = transformers.ConvNextConfig(hidden_sizes=[16, 24, 32, 48], depths=[1, 1, 1, 1], num_labels=6)
    return transformers.ConvNextForImageClassification(cfg).eval()


class LogitsOf(nn.Module):
    """The reference: the same Hugging Face model returning ``.logits`` as a plain tensor."""

    def __init__(self, m: nn.Module) -> None:
        super().__init__()
        self.m = m

    def forward(self, x):
        return self.m(x).logits


@pytest.mark.parametrize("arch", ["resnet", "convnext"])
def test_hugging_face_classifiers(arch, device):
    hf = _hf(arch).to(device)
    x = torch.randn(2, 3, 64, 64, device=device)  # stride 32: a 2 x 2 last map
    clf = Classifier(hf, mean=(0.5,) * 3, std=(0.25,) * 3, size=64, labels=[f"c{i}" for i in range(6)])
    ref_clf = Classifier(LogitsOf(hf), mean=(0.5,) * 3, std=(0.25,) * 3, size=64)
    stage = hf.get_submodule(f"{arch}.encoder.stages.3")
    # the automatic layer is found through the ModelOutput
    assert grad_cam(clf, x).layer == f"{arch}.encoder.stages.3"
    ref = _every_technique(ref_clf, x, stage, device)
    got = _every_technique(clf, x, stage, device)
    for key in ref:
        a, b = ref[key], got[key]
        if isinstance(a, dict):
            a, b = list(a.values())[0], list(b.values())[0]
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=key)
    assert torch.equal(clf.logits(x), hf(x).logits)
    assert count_hooks(hf) == 0


def test_hugging_face_model_through_explain(tmp_path):
    hf = _hf("resnet")
    clf = Classifier(hf, mean=(0.5,) * 3, std=(0.25,) * 3, size=64, labels=[f"c{i}" for i in range(6)])
    report = convlens.explain(
        convlens.sample_image_path(), clf,
        options={"occlusion": {"patch": 16, "stride": 16}, "filters": {"steps": 2, "size": 64, "channels": 2}},
    )
    im = report.images[0]
    assert im.errors == {}, im.errors
    assert set(im.results) == {"activations", "gradcam", "occlusion", "trust", "filters"}
    assert im.predictions[0].index == int(hf(clf.preprocess(convlens.sample_image())).logits.argmax())
    report.save(tmp_path / "out")
    assert (tmp_path / "out" / "report.html").is_file()


def test_every_technique_on_the_device_equals_the_cpu(device):
    """Where a GPU is present: every technique's result there equals the CPU's (TF32 matmuls and
    convolutions, when the caller enabled them, within 1e-2 of the map's range; else 1e-4)."""
    if device == "cpu":
        pytest.skip("the CPU is the reference")
    net = small_net()
    x = torch.randn(2, 3, 16, 16)
    ref = _every_technique(Classifier(net, mean=(0,) * 3, std=(1,) * 3, size=None), x, net[6], "cpu")
    dev_net = small_net().to(device)
    got = _every_technique(Classifier(dev_net, mean=(0,) * 3, std=(1,) * 3, size=None), x.to(device),
                           dev_net[6], device)
    tf32 = torch.backends.cuda.matmul.allow_tf32 or torch.backends.cudnn.allow_tf32
    # feature visualisation: after a few Adam steps the images diverge with any rounding
    # difference; the first step sees the same image on both devices
    for key in ("fv", "fv_obj", "fv_class"):
        del ref[key], got[key]
    ref["fv0"] = feature_visualization(net, net[6], [0, 3], steps=1, size=16).history[0]
    got["fv0"] = feature_visualization(dev_net, dev_net[6], [0, 3], steps=1, size=16).history[0]
    for key in ref:
        a, b = ref[key], got[key]
        if isinstance(a, dict):
            a, b = list(a.values())[0], list(b.values())[0]
        scale = float(a.abs().max()) or 1.0
        torch.testing.assert_close(b.cpu(), a, rtol=0, atol=(1e-2 if tf32 else 1e-4) * scale, msg=key)


def test_gpu_batch_estimate_reads_memory_without_resetting_the_callers_peak(monkeypatch):
    """The GPU batch size (occlusion, Score-CAM, deletion / insertion) comes from the largest
    ``memory_allocated`` seen after any module of one forward (forward hooks), never from
    ``reset_peak_memory_stats``, which would wipe the caller's own statistics. The CUDA counters
    are simulated: 100 bytes per module output."""
    from convlens._batching import forward_peak

    def boom(*a, **k):
        raise AssertionError("the caller's peak statistics were reset")

    allocated = [1000]
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3))

    def bump(module, args, out):
        allocated[0] += 100

    handles = [m.register_forward_hook(bump) for m in net]  # registered first: they run first
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", boom)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: allocated[0])
    try:
        assert forward_peak(net, torch.zeros(1, 3, 8, 8)) == 300
    finally:
        for h in handles:
            h.remove()
    assert count_hooks(net) == 0
