"""Your own model: fine-tuned heads and label files, multi-label (sigmoid) models, a segmenter's class
over a region (against pytorch-grad-cam's SemanticSegmentationTarget), and the output adapter kept
by every private copy the metrics make."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import convlens
from conftest import assert_unchanged, snapshot
from convlens.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(classes: int = 5, seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 8, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, classes),
    ).eval()


class TwoHeads(nn.Module):
    """The README's two-head model: ``out["heads"]["species"]`` is ``net``'s output."""

    def __init__(self, net: nn.Sequential, species_first: bool = False) -> None:
        super().__init__()
        self.body, self.species = net[:-1], net[-1]
        self.age = nn.Linear(8, 2)
        self.species_first = species_first

    def forward(self, x: torch.Tensor) -> dict:
        f = self.body(x)
        if self.species_first:  # the other head runs last
            species = self.species(f)
            return {"heads": {"species": species, "age": self.age(f)}, "features": f}
        return {"heads": {"age": self.age(f), "species": self.species(f)}, "features": f}


def plain(net: nn.Module, **kw) -> convlens.Classifier:
    return convlens.Classifier(net, mean=(0.0,) * 3, std=(1.0,) * 3, size=None, **kw)


@pytest.fixture(scope="module")
def x() -> torch.Tensor:
    torch.manual_seed(1)
    return torch.rand(2, 3, 24, 24)


# -- the copy helper and the label check ------------------------------------------------------
def test_with_model_keeps_every_attribute() -> None:
    clf = plain(TwoHeads(tiny()), labels=list("abcde"), output=lambda o: o["heads"]["species"], multi_label=True)
    clf.extra = "anything"  # an attribute a later version adds is kept too
    other = TwoHeads(tiny(seed=3))
    copy = clf.with_model(other, name="copy")
    assert copy.model is other and copy.name == "copy" and copy.labels == clf.labels and copy.labels is not clf.labels
    assert {k: v for k, v in vars(copy).items() if k not in ("model", "name", "labels")} == {
        k: v for k, v in vars(clf).items() if k not in ("model", "name", "labels")}
    with pytest.raises(TypeError, match="no attribute 'colour'"):
        clf.with_model(other, colour=1)


def test_label_count_must_match_the_outputs(x) -> None:
    ten = tiny(10)
    clf = plain(ten, labels=convlens.imagenet_labels())  # accepted: the count is known at the first forward
    calls = (lambda: clf.predict(x), lambda: convlens.grad_cam(clf, x), lambda: convlens.occlusion(clf, x, patch=8))
    for call in calls:
        with pytest.raises(ValueError, match="10 outputs per image but 1000 labels"):
            call()
    names = [f"n{i}" for i in range(10)]
    preds = plain(ten, labels=names).predict(x, top=2)
    assert preds[0][0].label == names[preds[0][0].index]


def test_read_labels_lines_and_json(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("cat\n dog \n\nhen\n", encoding="utf-8")
    (tmp_path / "b.json").write_text(json.dumps(["x", "y"]), encoding="utf-8")
    (tmp_path / "c.json").write_text('["x", 1]', encoding="utf-8")
    assert convlens.read_labels(tmp_path / "a.txt") == ["cat", "dog", "hen"]
    assert convlens.read_labels(tmp_path / "b.json") == ["x", "y"]
    with pytest.raises(ValueError, match="JSON list of strings"):
        convlens.read_labels(tmp_path / "c.json")


def test_read_labels_id2label_object(tmp_path: Path) -> None:
    """A Hugging Face id2label (or its whole config.json): was read as one line, one label."""
    (tmp_path / "d.json").write_text(json.dumps({"1": "dog", "0": "cat", "2": "hen"}), encoding="utf-8")
    (tmp_path / "config.json").write_text(json.dumps({"id2label": {"0": "x", "1": "y"}, "hidden": 8}))
    assert convlens.read_labels(tmp_path / "d.json") == ["cat", "dog", "hen"]
    assert convlens.read_labels(tmp_path / "config.json") == ["x", "y"]
    for bad in ({"0": "a", "2": "b"}, {"a": "b"}, {"0": 1}):
        (tmp_path / "e.json").write_text(json.dumps(bad), encoding="utf-8")
        with pytest.raises(ValueError, match=r"not a JSON object of class index -> name \(0 .. n-1\)"):
            convlens.read_labels(tmp_path / "e.json")


# -- fine-tuned heads from the command line ---------------------------------------------------------
@pytest.fixture(scope="module")
def ft10(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random resnet18 with a 10-class head, saved with torch.save, and label files beside it."""
    import torchvision

    d = tmp_path_factory.mktemp("ft10")
    torch.manual_seed(0)
    net = torchvision.models.resnet18(num_classes=10)
    with torch.no_grad():
        net.fc.weight.mul_(20)  # spread the probabilities so the ranking is clear
    torch.save(net.state_dict(), d / "ft10.pth")
    (d / "labels.txt").write_text("\n".join(f"thing {i}" for i in range(10)), encoding="utf-8")
    (d / "labels9.txt").write_text("\n".join(f"thing {i}" for i in range(9)), encoding="utf-8")
    (d / "labels.json").write_text(json.dumps([f"json {i}" for i in range(10)]), encoding="utf-8")
    return d


def test_load_model_reads_the_head_size_from_the_checkpoint(ft10: Path) -> None:
    clf = convlens.load_model("resnet18", weights=ft10 / "ft10.pth", device="cpu", labels=ft10 / "labels.txt")
    assert clf.model.fc.out_features == 10 and clf.labels[3] == "thing 3"
    saved = torch.load(ft10 / "ft10.pth", weights_only=True)
    assert torch.equal(clf.model.fc.weight, saved["fc.weight"])
    with pytest.raises(convlens.ModelError, match="num_classes= needs weights="):
        convlens.load_model("resnet18", num_classes=10)


def test_cli_predict_with_weights_and_labels(ft10: Path, capsys: pytest.CaptureFixture[str]) -> None:
    img = str(convlens.sample_image_path())
    w = str(ft10 / "ft10.pth")
    assert main(["predict", img, "--model", "resnet18", "--weights", w, "--labels", str(ft10 / "labels.txt"),
                 "-k", "3", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    clf = convlens.load_model("resnet18", weights=w, device="cpu", labels=ft10 / "labels.txt")
    want = clf.predict(clf.preprocess(img), top=3)[0]
    got = [line.split() for line in out.splitlines()[1:]]
    assert [(" ".join(g[1:3]), g[3], g[4]) for g in got] == [
        (p.label, f"{p.probability:.2%}", f"[{p.index}]") for p in want]
    assert math.isclose(sum(p.probability for p in clf.predict(clf.preprocess(img), top=10)[0]), 1.0, rel_tol=1e-5)
    # a JSON list works the same; --multi-label shows each class's own sigmoid
    assert main(["predict", img, "--model", "resnet18", "--weights", w, "--labels", str(ft10 / "labels.json"),
                 "--multi-label", "-k", "2", "--device", "cpu"]) == 0
    out = capsys.readouterr().out.splitlines()
    sig = torch.sigmoid(clf.logits(clf.preprocess(img)).float())[0]
    top = sig.topk(2)
    assert "multi-label" in out[0]
    for line, p, i in zip(out[1:], top.values, top.indices):
        assert f"json {int(i)}" in line and f"{float(p):.2%}" in line


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--labels", "labels9.txt"], "the model gives 10 outputs per image but 9 labels"),
        (["--num-classes", "12"], "(10, 512) vs (12, 512)"),
        (["--labels", "labels.txt", "--target", "thing 33"], "unknown class 'thing 33'"),
    ],
)
def test_cli_label_and_head_mismatches_exit_2(ft10, tmp_path, capsys, extra, message) -> None:
    extra = [str(ft10 / e) if e.startswith("labels") else e for e in extra]
    argv = ["--model", "resnet18", "--weights", str(ft10 / "ft10.pth"), "--device", "cpu", *extra]
    command = ["occlusion", "-o", str(tmp_path / "out")] if "--target" in extra else ["predict"]
    assert main([*command, *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and err.startswith("convlens: error:") and len(err.splitlines()) == 1
    assert not (tmp_path / "out").exists()  # refused before any image was done


def test_cli_occlusion_multi_label_target_from_the_file(ft10, tmp_path, capsys) -> None:
    img = str(convlens.sample_image_path())
    w, labels = str(ft10 / "ft10.pth"), str(ft10 / "labels.txt")
    assert main(["occlusion", img, "--model", "resnet18", "--weights", w, "--labels", labels, "--multi-label",
                 "--target", "thing 4", "--patch", "112", "--stride", "112", "--device", "cpu",
                 "-o", str(tmp_path / "o"), "--no-progress"]) == 0
    assert "thing 4 [4]" in capsys.readouterr().out
    saved = np.load(tmp_path / "o" / "chelsea.jpg" / "occlusion.npy")
    clf = convlens.load_model("resnet18", weights=w, device="cpu", labels=labels, multi_label=True)
    x = clf.preprocess(img)
    occluded = x.clone()
    occluded[..., :112, :112] = 0.0
    with torch.no_grad():
        s = torch.sigmoid(clf.model(torch.cat([x, occluded]))[:, 4])
    assert saved[0, 0] == pytest.approx(float(s[0] - s[1]), abs=1e-5)  # the top-left quarter: one window


# -- multi-label ----------------------------------------------------------------------------------
def test_multi_label_probabilities_are_sigmoids_everywhere(x) -> None:
    net = tiny(4)
    with torch.no_grad():
        net[-1].bias.copy_(torch.tensor([3.0, 2.5, -1.0, 0.5]))
    clf = plain(net, multi_label=True, labels=["car", "tree", "dog", "sky"])
    before = snapshot(net)
    logits = net(x).detach()
    sig = torch.sigmoid(logits)
    preds = clf.predict(x, top=4)
    for n in range(2):
        assert [p.probability for p in preds[n]] == pytest.approx(sig[n].sort(descending=True).values.tolist())
    assert float(sig[0].sum()) > 1.5  # independent: no softmax
    # occlusion: the drop of the one window over the top-left quarter, in sigmoid probability
    for fast in (True, False):
        occ = convlens.occlusion(clf, x, target="tree", patch=12, stride=12, fast=fast)
        occluded = x.clone()
        occluded[..., :12, :12] = 0.0
        want = sig[:, 1] - torch.sigmoid(net(occluded).detach()[:, 1])
        torch.testing.assert_close(occ.raw[:, 0, 0], want, atol=1e-6, rtol=0)
    # deletion / insertion: the clean image's score is the sigmoid
    cam = convlens.grad_cam(clf, x, target="tree")
    curve = convlens.deletion(clf, x, cam, steps=4)
    torch.testing.assert_close(curve.scores[:, 0], sig[:, 1])
    assert_unchanged(net, before)


def test_explorer_shows_sigmoids_for_a_multi_label_model(x) -> None:
    from PIL import Image

    from convlens.serve.explorer import Explorer

    clf = plain(tiny(4), multi_label=True)
    clf.size = 24
    img = Image.fromarray((x[0].permute(1, 2, 0).numpy() * 255).astype(np.uint8))
    ex = Explorer(clf, [img])
    try:
        entry = ex.images()[0]
        got = ex.predictions(entry.id, k=4)
        sig = torch.sigmoid(clf.logits(entry.x).float())[0]
        assert [p["probability"] for p in got] == pytest.approx(sig.sort(descending=True).values.tolist())
    finally:
        ex.close()


def test_metrics_and_explain_on_a_multi_label_model(x, tmp_path: Path) -> None:
    clf = plain(tiny(4), multi_label=True)
    cmp = convlens.compare(clf, x, ["gradcam", "occlusion"], steps=4,
                           options={"occlusion": {"patch": 12, "stride": 12}})
    assert not [r.error for r in cmp.rows if r.error]
    sig = torch.sigmoid(clf.logits(x).float())
    top = sig.argmax(1)
    torch.testing.assert_close(cmp.row("gradcam").deletion.scores[:, 0], sig[torch.arange(2), top])
    check = convlens.sanity_check(clf, x, "gradcam", stages=["6"], draws=2)
    assert check.spearman.shape == (2, 1) and check.target == top.tolist()
    report = convlens.explain(x[:1], clf, techniques=("gradcam", "trust"), options={"trust": {"steps": 4}})
    assert not report.failed
    im = report.images[0]
    assert im.predictions[0].probability == pytest.approx(float(sig[0].max()))
    assert im.results["trust"].auc()["gradcam"]["deletion"] == pytest.approx(
        float(convlens.deletion(clf, x[:1], im.results["gradcam"], steps=4).auc[0]))
    report.save(tmp_path)
    assert "multi-label" in (tmp_path / "report.html").read_text(encoding="utf-8")


# -- the output adapter reaches the metrics -------------------------------------------------------
def test_metrics_on_the_readme_two_head_model_equal_the_plain_model(x, tmp_path: Path) -> None:
    net = tiny()
    two = TwoHeads(net)
    adapted = plain(two, output=lambda o: o["heads"]["species"])
    ref = plain(net)
    before = snapshot(two)
    a = convlens.sanity_check(adapted, x, "gradcam", stages=["species", "body.2"], draws=3, seed=5)
    b = convlens.sanity_check(ref, x, "gradcam", stages=["6", "2"], draws=3, seed=5)
    torch.testing.assert_close(a.maps, b.maps)
    torch.testing.assert_close(a.spearman, b.spearman, equal_nan=True)
    ca, cb = convlens.class_sensitivity(adapted, x), convlens.class_sensitivity(ref, x)
    assert ca.other == cb.other
    torch.testing.assert_close(ca.spearman, cb.spearman)
    kw = {"steps": 4, "options": {"occlusion": {"patch": 12, "stride": 12}}, "sanity": False}
    cmp_a = convlens.compare(adapted, x, ["gradcam", "occlusion"], **kw)
    cmp_b = convlens.compare(ref, x, ["gradcam", "occlusion"], **kw)
    assert not [r.error for r in cmp_a.rows if r.error]
    for m in ("gradcam", "occlusion", "centred Gaussian"):
        torch.testing.assert_close(cmp_a.row(m).insertion.auc, cmp_b.row(m).insertion.auc)
    cmp = convlens.compare(adapted, x, ["gradcam"], steps=4)  # with the sanity check: its private copy
    assert cmp.row("gradcam").error is None and cmp.row("gradcam").sanity_passed is not None
    report = convlens.explain(x[:1], adapted, techniques=("gradcam", "trust"), options={"trust": {"steps": 4}})
    assert not report.failed and report.images[0].results["trust"].sanity["gradcam"]["rho"] is not None
    assert_unchanged(two, before)


def test_the_sanity_check_randomises_the_explained_head(x) -> None:
    """With output= picking one head of two, the classifier step is that head, also when the other
    head runs last (randomising it would leave the maps as they were: a false "fails")."""
    net = tiny()
    two = TwoHeads(net, species_first=True)
    for p in two.parameters():
        p.requires_grad_(False)  # a frozen model: the trace must not need, or change, requires_grad
    before = snapshot(two)
    adapted = plain(two, output=lambda o: o["heads"]["species"])
    assert convlens.metrics.sanity.cascade_stages(two, x, output=adapted.output)[0] == "species"
    assert convlens.metrics.sanity.cascade_stages(two, x)[0] == "age"  # no adapter: nothing traced, the old rule
    a = convlens.sanity_check(adapted, x, "gradcam", draws=2)
    b = convlens.sanity_check(plain(net), x, "gradcam", draws=2)
    assert a.stages[0] == "species" and b.stages[0] == "6"
    torch.testing.assert_close(a.spearman[:, 0], b.spearman[:, 0])
    assert_unchanged(two, before)


# -- a segmenter's class over a region -------------------------------------------------------------
@pytest.fixture(scope="module")
def seg():
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.segmentation.lraspp_mobilenet_v3_large(
        weights=None, weights_backbone=None, num_classes=3).eval()
    clf = convlens.Classifier(model, mean=(0.5,) * 3, std=(0.5,) * 3, size=None, output=lambda o: o["out"],
                              labels=["background", "cat", "dog"])
    torch.manual_seed(2)
    return clf, torch.randn(2, 3, 96, 96)


def _mask() -> torch.Tensor:
    mask = torch.zeros(96, 96)
    mask[20:70, 10:60] = 1.0
    return mask


def test_region_gradcam_equals_pytorch_grad_cam(seg, device) -> None:
    import copy

    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import SemanticSegmentationTarget

    clf, x = seg
    if device != "cpu":  # a copy on the device (the fixture's model is shared); the masks stay on the host
        clf, x = clf.with_model(copy.deepcopy(clf.model).to(device)), x.to(device)
    before = snapshot(clf.model)
    mask = _mask()
    cam = convlens.grad_cam(clf, x, target=convlens.Region("cat", mask), layer="backbone.16")
    assert cam.target == [1, 1] and cam.labels == ["cat", "cat"]

    class Out(nn.Module):
        def __init__(self, m: nn.Module) -> None:
            super().__init__()
            self.m = m

        def forward(self, t: torch.Tensor) -> torch.Tensor:
            return self.m(t)["out"]

    twin = copy.deepcopy(clf.model)  # pytorch-grad-cam's backward fills .grad: on a copy
    with GradCAM(Out(twin), [twin.get_submodule("backbone.16")]) as g:
        ref = g(x, targets=[SemanticSegmentationTarget(1, mask.numpy())] * 2)
    for i in range(2):
        r = np.corrcoef(cam.maps[i].cpu().numpy().ravel(), ref[i].ravel())[0, 1]
        assert r >= 0.99
    # batched == one at a time (a mask per image), and the model as it was
    masks = torch.stack([mask, 1 - mask])
    both = convlens.grad_cam(clf, x, target=convlens.Region([1, 2], masks), layer="backbone.16")
    for i, c in enumerate((1, 2)):
        one = convlens.grad_cam(clf, x[i : i + 1], target=convlens.Region(c, masks[i]), layer="backbone.16")
        # cuDNN's TF32 convolutions (its default) may take another algorithm for one image
        tf32 = device == "cuda" and torch.backends.cudnn.allow_tf32
        torch.testing.assert_close(both.raw[i], one.raw[0], atol=1e-5, rtol=1e-2 if tf32 else 1e-4)
    assert_unchanged(clf.model, before)


def test_region_occlusion_deletion_and_compare(seg) -> None:
    clf, x = seg
    x = x[:1]
    mask = _mask().bool()
    region = convlens.Region("cat", mask)
    with torch.no_grad():
        clean = clf.model(x)["out"]
        occluded = x.clone()
        occluded[..., :48, :48] = 0.0
        hidden = clf.model(occluded)["out"]
    occ = convlens.occlusion(clf, x, target=region, patch=48, stride=48, score="logit")
    want = (clean[0, 1] * mask).sum() - (hidden[0, 1] * mask).sum()
    assert float(occ.raw[0, 0, 0]) == pytest.approx(float(want), rel=1e-4, abs=1e-4)
    occ_p = convlens.occlusion(clf, x, target=region, patch=48, stride=48)
    p, q = clean.softmax(1)[0, 1][mask].mean(), hidden.softmax(1)[0, 1][mask].mean()
    assert float(occ_p.raw[0, 0, 0]) == pytest.approx(float(p - q), abs=1e-6)
    curve = convlens.deletion(clf, x, occ, target=region, steps=4, score="logit")
    assert float(curve.scores[0, 0]) == pytest.approx(float((clean[0, 1] * mask).sum()), rel=1e-5)
    curve = convlens.deletion(clf, x, occ, target=region, steps=4, baseline=0.0)  # the mean probability
    with torch.no_grad():
        gone = clf.model(torch.zeros_like(x))["out"].softmax(1)[0, 1][mask].mean()
    torch.testing.assert_close(curve.scores[0, [0, -1]], torch.stack([p, gone]), atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="dense"):
        convlens.grad_cam(plain(tiny()), torch.rand(1, 3, 24, 24), target=convlens.Region(1))
    cmp = convlens.compare(clf, x, ["gradcam", "occlusion"], target=region, layer="backbone.16", steps=4,
                           options={"occlusion": {"patch": 48, "stride": 48}})
    assert not [r.error for r in cmp.rows if r.error] and cmp.labels == ["cat"]
    cam = convlens.grad_cam(clf, x, target=region, layer="backbone.16")
    want = convlens.deletion(clf, x, cam, target=region, steps=4)
    torch.testing.assert_close(cmp.row("gradcam").deletion.scores, want.scores)
    region_sums = (clean * mask).sum((2, 3))[0]
    assert int(region_sums.argmin()) != 1  # the least likely class over the region is the "other"
    cs = convlens.class_sensitivity(clf, x, "gradcam", target=region)
    assert cs.other == [int(region_sums.argmin())]
