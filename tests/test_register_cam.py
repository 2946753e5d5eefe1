"""convlens.register_cam: a CAM rule defined here (weights = mean of the squared gradient) works in
grad_cam, compare, explain and its report, the CLI (--plugin) and the explorer, and equals a hand
computation on a fixed-weight net whose activations and gradients are known in closed form."""

from __future__ import annotations

import io
import sys
from collections import OrderedDict

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import convlens
from conftest import assert_unchanged, snapshot
from convlens.cli import main
from convlens.report import render_html

pytestmark = pytest.mark.usefixtures("one_thread")

NAME, TITLE = "gradsq", "Grad² CAM"


def gradsq(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    return (g**2).mean(dim=(2, 3))  # (N, C): one weight per channel, as BaseCAM.get_cam_weights


@pytest.fixture()
def registered():
    convlens.register_cam(NAME, gradsq, title=TITLE)
    yield NAME
    convlens.unregister_cam(NAME)


def _net() -> nn.Module:
    """conv (3 -> 4, size kept) -> ReLU -> global average pool -> linear (4 -> 3), fixed weights."""
    g = torch.Generator().manual_seed(3)
    net = nn.Sequential(OrderedDict(conv=nn.Conv2d(3, 4, 3, padding=1), act=nn.ReLU(), pool=nn.AdaptiveAvgPool2d(1),
                                    flat=nn.Flatten(), fc=nn.Linear(4, 3)))
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    return net.eval()


@pytest.fixture()
def tiny() -> convlens.Classifier:
    return convlens.Classifier(_net(), mean=(0.5,) * 3, std=(0.25,) * 3, size=12, labels=["a", "b", "c"])


def _x(n: int = 2) -> torch.Tensor:
    return torch.randn(n, 3, 12, 12, generator=torch.Generator().manual_seed(4))


def _by_hand(net: nn.Module, x: torch.Tensor, target: int) -> torch.Tensor:
    """A = relu(conv(x)); after global average pooling and the linear layer, d score_k / d A_cij =
    W_kc / (h w) at every position, so the rule's weight is (W_kc / (h w))^2; the map relu(sum_c w_c A_c)
    is already at the input's size (the conv keeps it)."""
    with torch.no_grad():
        a = F.relu(net.conv(x))
        w = (net.fc.weight[target] / (a.shape[2] * a.shape[3])) ** 2
        return (w[None, :, None, None] * a).sum(1).clamp(min=0)


def test_grad_cam_equals_the_hand_computation(registered, tiny, device):
    tiny.to(device)
    x = _x().to(device)
    before = snapshot(tiny.model)
    cam = convlens.grad_cam(tiny, x, target=1, layer="act", method=NAME)
    want = _by_hand(tiny.model, x, 1)
    torch.testing.assert_close(cam.maps, want, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(cam.raw, want, rtol=1e-5, atol=1e-7)
    assert cam.method == NAME and NAME in convlens.cam_methods()
    assert_unchanged(tiny.model, before)
    # the same rule through cam_from_layer (the explorer's path) and a per-position rule
    from convlens.methods.cam import cam_from_layer

    a = F.relu(tiny.model.conv(x)).detach()
    g = (tiny.model.fc.weight[1] / 144)[None, :, None, None].expand_as(a).detach()
    torch.testing.assert_close(cam_from_layer(NAME, a, g, (12, 12))[1], want, rtol=1e-5, atol=1e-7)


def test_bad_names_and_weights_are_clear_errors(registered, tiny):
    with pytest.raises(ValueError, match="already registered"):
        convlens.register_cam("gradcam", gradsq)
    with pytest.raises(ValueError, match="already registered.*replace=True"):
        convlens.register_cam(NAME, gradsq)
    with pytest.raises(ValueError, match="letters, digits"):
        convlens.register_cam("a,b", gradsq)
    convlens.register_cam("badshape", lambda a, g: g.mean(1))
    try:
        with pytest.raises(ValueError, match=r"badshape's weights must be \(N, C\)"):
            convlens.grad_cam(tiny, _x(), layer="act", method="badshape")
    finally:
        convlens.unregister_cam("badshape")
    with pytest.raises(ValueError, match="unknown method 'badshape'"):
        convlens.grad_cam(tiny, _x(), layer="act", method="badshape")


def test_compare_scores_the_registered_map(registered, tiny):
    x = _x()
    cmp = convlens.compare(tiny, x, methods=["gradcam", NAME], target=1, layer="act", steps=4,
                           references=["centred Gaussian"], sanity=False)
    row = cmp.row(NAME)
    assert row.error is None
    want = _by_hand(tiny.model, x, 1)
    d, i = convlens.deletion(tiny, x, want, target=1, steps=4), convlens.insertion(tiny, x, want, target=1, steps=4)
    torch.testing.assert_close(row.deletion.auc, d.auc)
    torch.testing.assert_close(row.insertion.auc, i.auc)


def test_explain_and_its_report_show_the_method_by_its_title(registered, tiny):
    x = _x(1)
    report = convlens.explain(x, tiny, techniques=("gradcam",), layer="act", options={"gradcam": {"method": NAME}})
    assert not report.failed
    cam = report.images[0].results["gradcam"]
    assert cam.method == NAME
    top1 = int(tiny.model(x).argmax())
    torch.testing.assert_close(cam.maps, _by_hand(tiny.model, x, top1), rtol=1e-5, atol=1e-7)
    assert f"{TITLE} at <code>act</code>" in render_html(report)


def test_cli_plugin_adds_the_method(tmp_path, monkeypatch, capsys, clf, sample_x):
    (tmp_path / "my_cams.py").write_text(
        "import convlens\n\n"
        f"convlens.register_cam({NAME!r}, lambda a, g: (g ** 2).mean(dim=(2, 3)), title={TITLE!r}, replace=True)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        assert main(["--plugin", "my_cams", "gradcam", "--method", NAME, "--no-evidence", "--out",
                     str(tmp_path / "out")]) == 0
        (npy,) = (tmp_path / "out").rglob("*.npy")
        lib = convlens.grad_cam(clf, sample_x, method=NAME)
        np.testing.assert_allclose(np.load(npy), lib.maps[0].numpy(), rtol=1e-5, atol=1e-6)
        # without the plugin loaded the name is a usage error
        convlens.unregister_cam(NAME)
        sys.modules.pop("my_cams")
        capsys.readouterr()
        with pytest.raises(SystemExit) as e:
            main(["gradcam", "--method", NAME])
        assert e.value.code == 2 and "invalid choice: 'gradsq'" in capsys.readouterr().err
        # the environment variable loads it too; a missing module is a one-line usage error
        monkeypatch.setenv("CONVLENS_PLUGINS", "my_cams")
        assert main(["gradcam", "--method", NAME, "--no-evidence", "--out", str(tmp_path / "env")]) == 0
        assert main(["--plugin", "no_such_cams", "predict"]) == 2
        assert "plugin 'no_such_cams' could not be imported: No module named 'no_such_cams'" in capsys.readouterr().err
    finally:
        if NAME in convlens.cam_methods():
            convlens.unregister_cam(NAME)
        sys.modules.pop("my_cams", None)


def test_explorer_serves_the_registered_method(registered, tiny):
    pytest.importorskip("starlette")
    from PIL import Image
    from starlette.testclient import TestClient

    from convlens.serve.app import create_app
    from convlens.serve.explorer import Explorer

    x = torch.rand(1, 3, 12, 12, generator=torch.Generator().manual_seed(1))
    ex = Explorer(tiny, [Image.fromarray((x[0].permute(1, 2, 0).numpy() * 255).astype(np.uint8))])
    try:
        with TestClient(create_app(ex), base_url="http://127.0.0.1:8000") as c:
            st = c.get("/api/state").json()
            assert NAME in st["methods"] and NAME in st["instant_methods"] and st["titles"][NAME] == TITLE
            entry = ex.images()[0]
            j = c.get("/api/cam", params={"image": entry.id, "cls": 2, "method": NAME, "layer": "act"}).json()
            assert j["method"] == NAME and j["target"] == 2
            r = c.get("/api/cam.npy", params={"image": entry.id, "cls": 2, "method": NAME, "layer": "act"})
            got = np.load(io.BytesIO(r.content))
            np.testing.assert_allclose(got, _by_hand(tiny.model, entry.x, 2)[0].numpy(), rtol=1e-5, atol=1e-6)
    finally:
        ex.close()
