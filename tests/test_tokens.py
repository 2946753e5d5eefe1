"""Token models (ViT, DeiT distilled, EVA-02, Swin), layouts, non-square and grayscale inputs.

Random-weight timm models built offline; Grad-CAM is checked against pytorch-grad-cam's documented
reshape recipe (drop the prefix tokens, lay the rest on the patch grid; Swin: permute NHWC).
"""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from PIL import Image
from skimage import data as skdata
from torch import nn

import convlens
from conftest import assert_unchanged, snapshot
from convlens.layers import layer_table
from convlens.layout import map_layout
from convlens.methods.activations import activations
from convlens.methods.cam import grad_cam
from convlens.methods.featureviz import feature_visualization

pytestmark = pytest.mark.usefixtures("one_thread")

#: model -> (documented Grad-CAM layer = the automatic one, prefix tokens, grid side; 0: NHWC)
DOCUMENTED = {
    "vit_tiny_patch16_224": ("blocks.11.norm1", 1, 14),
    "deit_tiny_distilled_patch16_224": ("blocks.11.norm1", 2, 14),
    "eva02_tiny_patch14_224": ("blocks.11", 1, 16),
    "swin_tiny_patch4_window7_224": ("layers.3", 0, 7),
}
#: classes (for chelsea, coffee) whose maps are not all zero after the ReLU with these seeded random
#: weights (EVA-02 tiny has no head: its 192 features are the outputs)
TARGETS = {
    "vit_tiny_patch16_224": [936, 938],
    "deit_tiny_distilled_patch16_224": [984, 407],
    "eva02_tiny_patch14_224": [30, 5],
    "swin_tiny_patch4_window7_224": [74, 216],
}
_MODELS: dict[str, convlens.Classifier] = {}


def token_clf(name: str) -> convlens.Classifier:
    """A random-weight timm model (seeded), built once per test session."""
    if name not in _MODELS:
        torch.manual_seed(0)
        m = timm.create_model(name, pretrained=False).eval()
        cfg = m.pretrained_cfg
        _MODELS[name] = convlens.Classifier(m, mean=cfg["mean"], std=cfg["std"], size=224,
                                            labels=convlens.imagenet_labels() if m.num_classes == 1000 else None,
                                            name=name)
    return _MODELS[name]


@pytest.fixture(scope="module")
def photos() -> list[np.ndarray]:
    return [skdata.chelsea(), skdata.coffee()]


def recipe(prefix: int, side: int):
    """pytorch-grad-cam's reshape_transform for ViT-style tokens, or Swin's NHWC permute."""

    def reshape(t: torch.Tensor) -> torch.Tensor:
        if t.dim() == 4:
            return t.permute(0, 3, 1, 2)
        return t[:, prefix:].reshape(t.shape[0], side, side, t.shape[2]).permute(0, 3, 1, 2)

    return reshape


def reference_cam(model: nn.Module, layer: str, x: torch.Tensor, targets: list[int], reshape) -> np.ndarray:
    gradcam = pytest.importorskip("pytorch_grad_cam")
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    with gradcam.GradCAM(model, [model.get_submodule(layer)], reshape_transform=reshape) as cam:
        out = cam(x, targets=[ClassifierOutputTarget(t) for t in targets])
    for p in model.parameters():  # its .backward() fills the parameters' .grad: the shared model is restored
        p.grad = None
    return out


def pearson(a, b) -> float:
    a, b = (t.detach().cpu() if isinstance(t, torch.Tensor) else t for t in (a, b))
    return float(np.corrcoef(np.asarray(a, dtype=np.float64).ravel(), np.asarray(b, dtype=np.float64).ravel())[0, 1])


@pytest.mark.parametrize("name", list(DOCUMENTED))
def test_gradcam_at_the_automatic_layer_equals_pytorch_grad_cam(name, photos, device):
    clf = token_clf(name)
    if device != "cpu":  # a copy on the device: the session's models stay on the CPU
        clf = clf.with_model(copy.deepcopy(clf.model).to(device))
    layer, prefix, side = DOCUMENTED[name]
    x = clf.preprocess(photos)
    before = snapshot(clf.model)
    targets = TARGETS[name]
    sal = grad_cam(clf, x, target=targets)  # the automatic layer
    assert_unchanged(clf.model, before)
    assert sal.layer == layer
    assert sal.raw.shape == (2, side, side)
    assert "layer_reason" in sal.settings
    if prefix:
        assert (sal.settings["layout"], sal.settings["prefix_tokens"], sal.settings["grid"]) == (
            "tokens", prefix, [side, side])
    else:
        assert sal.settings["layout"] == "nhwc"
    # a real map: not constant over the grid
    assert all(float(r.std()) > 0 for r in sal.raw)
    ref = reference_cam(clf.model, layer, x, targets, recipe(prefix, side))
    for i in range(2):
        assert pearson(sal.maps[i], ref[i]) >= 0.99, name
    # the user's own reshape (pytorch-grad-cam's recipe) gives the same maps
    again = grad_cam(clf, x, target=targets, layer=layer, reshape=recipe(prefix, side))
    torch.testing.assert_close(again.maps, sal.maps)


def test_batched_equals_one_at_a_time(photos):
    clf = token_clf("deit_tiny_distilled_patch16_224")
    x = clf.preprocess(photos)
    both = grad_cam(clf, x, target=[1, 2], method="gradcam++")
    for i, t in enumerate([1, 2]):
        one = grad_cam(clf, x[i : i + 1], target=t, method="gradcam++")
        torch.testing.assert_close(one.maps[0], both.maps[i], rtol=1e-4, atol=1e-6)


def test_activations_on_the_token_grid(photos):
    clf = token_clf("deit_tiny_distilled_patch16_224")
    x = clf.preprocess(photos[:1])
    seen = {}
    h = clf.model.blocks[5].register_forward_hook(lambda m, i, o: seen.setdefault("t", o.detach().clone()))
    try:
        with torch.no_grad():
            clf.model(x)
    finally:
        h.remove()
    acts = activations(clf, x, ["blocks.5"])
    manual = seen["t"][:, 2:].reshape(1, 14, 14, 192).permute(0, 3, 1, 2)
    torch.testing.assert_close(acts.maps["blocks.5"], manual)
    assert acts.settings["layouts"]["blocks.5"] == {"layout": "tokens", "prefix_tokens": 2, "grid": [14, 14]}


def test_swin_channels_last_activations_and_table(photos):
    clf = token_clf("swin_tiny_patch4_window7_224")
    x = clf.preprocess(photos[:1])
    seen = {}
    h = clf.model.layers[1].register_forward_hook(lambda m, i, o: seen.setdefault("t", o.detach().clone()))
    try:
        with torch.no_grad():
            clf.model(x)
    finally:
        h.remove()
    assert seen["t"].shape == (1, 28, 28, 192)
    acts = activations(clf, x, ["layers.1"])
    torch.testing.assert_close(acts.maps["layers.1"], seen["t"].permute(0, 3, 1, 2))
    rows = {r.name: r for r in layer_table(clf.model, x)}
    assert rows["layers.1"].layout == "nhwc"
    assert rows["layers.3.blocks.1.mlp"].layout == "tokens 0+7x7"
    assert rows["layers.0.blocks.0.attn"].layout == "?"  # attention windows: their first axis is no batch
    assert rows["head.fc"].layout is None


def test_undecidable_layout_is_an_error_naming_the_override(photos):
    clf = token_clf("vit_tiny_patch16_224")
    x = clf.preprocess(photos[:1])
    # (N, heads, T, head_dim) inside the attention: no map of the image
    with pytest.raises(convlens.LayerError, match=r"\(1, 3, 197, 64\).*layout=.*reshape="):
        grad_cam(clf, x, layer="blocks.11.attn.q_norm")
    with pytest.raises(convlens.LayerError, match="layout must be"):
        grad_cam(clf, x, layer="blocks.11.norm1", layout="chw")
    # a model that names no prefix tokens: 17 tokens fit no grid unless told
    toy = nn.Module()
    assert map_layout(toy, "t", None, (1, 16, 8), (32, 32)).describe() == "tokens 0+4x4"
    with pytest.raises(convlens.LayerError, match="17 tokens"):
        map_layout(toy, "t", None, (1, 17, 8), (32, 32))


def test_zero_gradient_at_the_final_block_of_a_class_token_model_warns(photos):
    clf = token_clf("vit_tiny_patch16_224")
    x = clf.preprocess(photos[:1])
    with pytest.warns(RuntimeWarning, match="zero everywhere.*class token"):
        sal = grad_cam(clf, x, layer="blocks.11")
    assert "class token" in sal.settings["zero_gradient"]
    assert float(sal.raw.abs().max()) == 0.0


def test_classifier_layout_override_reaches_every_technique(photos):
    clf = token_clf("vit_tiny_patch16_224")
    own = convlens.Classifier(clf.model, mean=clf.mean, std=clf.std, reshape=recipe(1, 14))
    x = clf.preprocess(photos[:1])
    auto = grad_cam(clf, x, layer="blocks.11.norm1", target=3)
    given = grad_cam(own, x, layer="blocks.11.norm1", target=3)
    torch.testing.assert_close(given.maps, auto.maps)
    assert given.settings["layout"] == "reshape"
    torch.testing.assert_close(activations(own, x, ["blocks.3"]).maps["blocks.3"],
                               activations(clf, x, ["blocks.3"]).maps["blocks.3"])


def test_feature_visualisation_on_a_fixed_size_token_model():
    clf = token_clf("vit_tiny_patch16_224")
    before = snapshot(clf.model)
    res = feature_visualization(clf, "blocks.5", [3, 7], steps=2, size=64)
    assert_unchanged(clf.model, before)
    assert res.images.shape == (2, 3, 224, 224) and res.settings["size"] == 224
    # the objective of a token layer's channel: its mean over the patch grid (no class token)
    acts = activations(clf, res.inputs, ["blocks.5"]).maps["blocks.5"]
    expect = torch.stack([acts[0, 3].mean(), acts[1, 7].mean()])
    torch.testing.assert_close(res.objective, expect, rtol=1e-4, atol=1e-5)


def _gray_net() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(
        nn.Conv2d(1, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 8, 3, stride=4, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4),
    ).eval()


def test_grayscale_non_square_model_through_gradcam():
    net = _gray_net()
    clf = convlens.Classifier(net, mean=(0.5,), std=(0.25,), size=(160, 128))
    photo = skdata.astronaut()
    x = clf.preprocess(photo)
    gray = Image.fromarray(photo).convert("L").resize((128, 160), Image.BILINEAR)
    expect = (torch.from_numpy(np.asarray(gray, dtype=np.float32) / 255.0) - 0.5) / 0.25
    torch.testing.assert_close(x, expect[None, None])
    before = snapshot(net)
    sal = grad_cam(clf, photo, target=2)
    assert_unchanged(net, before)
    assert sal.layer == "3" and sal.maps.shape == (1, 160, 128)
    assert torch.equal(sal.images[0, 0], sal.images[0, 2])  # shown as RGB, the gray repeated
    # by hand: A = the last ReLU's output, w = mean of d logit_2 / dA, relu(sum w A) upsampled
    a = net[:4](x).detach().requires_grad_(True)
    (g,) = torch.autograd.grad(net[4:](a)[0, 2], a)
    raw = (g.mean((2, 3), keepdim=True) * a).sum(1).clamp(min=0).detach()
    torch.testing.assert_close(sal.raw, raw)
    torch.testing.assert_close(sal.maps, F.interpolate(raw[:, None], (160, 128), mode="bilinear")[:, 0])
    fv = feature_visualization(clf, "2", [0, 5], steps=2, size=32)
    assert fv.inputs.shape == (2, 1, 32, 32) and fv.images.shape == (2, 3, 32, 32)


def test_metrics_and_explain_on_a_token_model(photos, tmp_path):
    from convlens.metrics.compare import compare
    from convlens.metrics.sanity import class_sensitivity, sanity_check

    clf = token_clf("vit_tiny_patch16_224")
    x = clf.preprocess(photos[1:])  # coffee: top-1 and least likely class both have non-zero maps
    before = snapshot(clf.model)
    target = int(clf.logits(x).argmax())
    other = int(clf.logits(x).argmin())
    check = sanity_check(clf, x, target=target, draws=1)
    cs = class_sensitivity(clf, x, target=target)
    cmp = compare(clf, x, ["gradcam"], steps=4, references=(), sanity=False)
    assert_unchanged(clf.model, before)
    assert check.spearman.shape[0] == 1 and torch.isfinite(check.spearman[:, 0]).all()
    row = cmp.rows[0]
    assert row.error is None
    torch.testing.assert_close(row.class_rho, cs.spearman)
    # compare judges the map pytorch-grad-cam's recipe gives: its class rank correlation is the
    # reference maps' (the wrong map of a (heads, tokens, dim) tensor used to be judged here)
    ref = reference_cam(clf.model, "blocks.11.norm1", torch.cat([x, x]), [target, other], recipe(1, 14))
    from scipy.stats import spearmanr

    assert abs(float(spearmanr(ref[0].ravel(), ref[1].ravel())[0]) - float(row.class_rho[0])) < 0.02
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rep = convlens.explain(photos[1], clf, techniques=["gradcam", "trust"], fast=True, cache=False,
                               options={"trust": {"steps": 4}})
    assert not rep.images[0].errors, rep.images[0].errors
    assert rep.images[0].results["trust"] is not None
    assert rep.images[0].layers["gradcam"] == "blocks.11.norm1"
    assert_unchanged(clf.model, before)


def test_cli_layers_shows_the_layout_column(tmp_path, capsys):
    from convlens.cli import main

    clf = token_clf("deit_tiny_distilled_patch16_224")
    weights = tmp_path / "deit.pth"
    torch.save(clf.model.state_dict(), weights)
    argv = ["layers", "--model", "timm:deit_tiny_distilled_patch16_224", "--weights", str(weights), "--device", "cpu",
            "--filter", "blocks.11.norm1"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "layout" in out.splitlines()[0]
    row = next(line for line in out.splitlines() if line.startswith("blocks.11.norm1 "))
    assert "tokens 2+14x14" in row and "<- Grad-CAM default" in row
    assert "class token" in out  # the reason for the automatic layer


def test_explorer_reads_token_maps_as_grad_cam_does(photos):
    from convlens.serve.explorer import Explorer

    clf = token_clf("vit_tiny_patch16_224")
    ex = Explorer(clf, [Image.fromarray(photos[1])])
    try:
        image_id = next(iter(ex._images))
        layers, default = ex.layers()
        assert default == "blocks.11.norm1"
        row = {"name": "blocks.11.norm1", "type": "LayerNorm", "shape": [197, 192], "layout": "tokens 1+14x14"}
        assert row in layers
        got = ex.cam(image_id, 938, "layercam")  # from the cached pass: the layout applied to A and G
        x = ex.image(image_id).x
        want = grad_cam(clf, x, target=938, method="layercam")
        torch.testing.assert_close(got["maps"], want.maps[0])
        tiles = ex.channels(image_id, k=3)
        acts = activations(clf, x, ["blocks.11.norm1"]).maps["blocks.11.norm1"][0]
        assert tiles["maps"].shape == (3, 14, 14) and tiles["count"] == 192
        np.testing.assert_allclose(tiles["maps"], acts[tiles["channels"]].numpy(), rtol=1e-5, atol=1e-6)
    finally:
        ex.close()


def test_convnext_channels_last_norms_inside_an_nchw_model():
    torch.manual_seed(0)
    m = timm.create_model("convnext_atto", conv_mlp=False).eval()  # blocks permute to NHWC for norm + MLP
    x = torch.randn(1, 3, 64, 64)
    rows = {r.name: r for r in layer_table(m, x)}
    assert rows["stages.3.blocks.1.norm"].shape == (1, 2, 2, 320) and rows["stages.3.blocks.1.norm"].layout == "nhwc"
    assert rows["stages.3.blocks.1.conv_dw"].layout == "nchw" and rows["stages.3"].layout == "nchw"
    seen = {}
    h = m.stages[3].blocks[1].norm.register_forward_hook(lambda mod, i, o: seen.setdefault("t", o.detach().clone()))
    try:
        with torch.no_grad():
            m(x)
    finally:
        h.remove()
    got = activations(m, x, ["stages.3.blocks.1.norm"]).maps["stages.3.blocks.1.norm"]
    torch.testing.assert_close(got, seen["t"].permute(0, 3, 1, 2))


def test_dynamic_size_vit_on_a_non_square_input(photos):
    torch.manual_seed(0)
    m = timm.create_model("vit_tiny_patch16_224", pretrained=False, dynamic_img_size=True).eval()
    clf = convlens.Classifier(m, mean=(0.5,) * 3, std=(0.5,) * 3, size=(160, 128))
    x = clf.preprocess(photos[1])
    assert x.shape == (1, 3, 160, 128)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random weights: some classes' maps are all zero after the ReLU
        sal = grad_cam(clf, x, top=4)
    assert sal.layer == "blocks.11.norm1" and sal.settings["grid"] == [10, 8] and sal.maps.shape == (4, 160, 128)

    def reshape(t: torch.Tensor) -> torch.Tensor:
        return t[:, 1:].reshape(len(t), 10, 8, -1).permute(0, 3, 1, 2)

    ref = reference_cam(m, "blocks.11.norm1", x.expand(4, -1, -1, -1), sal.target, reshape)
    live = [i for i in range(4) if float(sal.raw[i].std()) > 0]
    assert len(live) >= 2
    for i in live:
        assert pearson(sal.maps[i], ref[i]) >= 0.99


def test_hugging_face_vit_class_token_layer_and_grid(photos):
    tf = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = tf.ViTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                          image_size=64, patch_size=16, num_labels=5)
    hf = tf.ViTForImageClassification(config).eval()
    clf = convlens.Classifier(hf, mean=(0.5,) * 3, std=(0.5,) * 3, size=64)
    x = clf.preprocess(photos[1])
    sal = grad_cam(clf, x, target=[[0, 1, 2, 3, 4]])
    # the class token reads the last block's input norm; config.patch_size gives the 4 x 4 grid
    assert sal.layer == "vit.layers.1.layernorm_before"
    assert (sal.settings["prefix_tokens"], sal.settings["grid"]) == (1, [4, 4])

    class Logits(nn.Module):
        def __init__(self, m: nn.Module) -> None:
            super().__init__()
            self.m = m

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.m(x).logits

    ref = reference_cam(Logits(hf), "m." + sal.layer, x.expand(5, -1, -1, -1), list(range(5)), recipe(1, 4))
    live = [i for i in range(5) if float(sal.raw[i].std()) > 0]
    assert len(live) >= 3
    for i in live:
        assert pearson(sal.maps[i], ref[i]) >= 0.99
