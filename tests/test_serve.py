"""The local explorer's HTTP API (Starlette's TestClient): every value equals the library's own
call, the Host/Origin checks, upload limits, jobs with progress and cancel, the model untouched."""

from __future__ import annotations

import base64
import io
import threading
import time

import matplotlib
import numpy as np
import pytest
import starlette  # noqa: F401 -- the test extra has convlens[serve]
import torch
import uvicorn  # noqa: F401
from PIL import Image
from starlette.testclient import TestClient
from torch import nn

import convlens
from conftest import assert_unchanged, snapshot
from convlens.serve import app as app_module
from convlens.serve import explorer as explorer_module
from convlens.serve.app import create_app
from convlens.serve.explorer import Explorer, ModelLock

BASE = "http://127.0.0.1:8000"
GRAD_METHODS = ["gradcam", "gradcam++", "xgradcam", "layercam", "eigencam"]


@pytest.fixture(scope="module")
def explorer(clf: convlens.Classifier) -> Explorer:
    ex = Explorer(clf, [convlens.sample_image_path()])
    yield ex
    ex.close()


@pytest.fixture(scope="module")
def client(explorer: Explorer) -> TestClient:
    with TestClient(create_app(explorer), base_url=BASE) as c:
        yield c


@pytest.fixture(scope="module")
def image_id(client: TestClient) -> str:
    return client.get("/api/state").json()["images"][0]["id"]


class Tiny(nn.Module):
    """A small fixed-weight CNN (5 classes, 32 px): fast enough to run the long jobs in tests."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.act1 = nn.ReLU()
        self.conv2 = nn.Conv2d(4, 6, 3, padding=1, stride=2)
        self.act2 = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(6, 5)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.act2(self.conv2(self.act1(self.conv1(x))))).flatten(1))


@pytest.fixture()
def tiny_clf() -> convlens.Classifier:
    return convlens.Classifier(Tiny(), mean=(0.5,) * 3, std=(0.25,) * 3, size=32, labels=list("abcde"))


def _decode(uri: str) -> np.ndarray:
    assert uri.startswith("data:image/png;base64,")
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))))


def _npy(client: TestClient, **params: object) -> np.ndarray:
    r = client.get("/api/cam.npy", params=params)
    assert r.status_code == 200, r.text
    return np.load(io.BytesIO(r.content))


def _wait(client: TestClient, job: dict, timeout: float = 120.0) -> dict:
    t0 = time.perf_counter()
    while job["state"] in ("queued", "running"):
        assert time.perf_counter() - t0 < timeout, job
        time.sleep(0.05)
        job = client.get(f"/api/jobs/{job['id']}").json()
    return job


# -- values equal to the library's ------------------------------------------------------------
def test_state_lists_layers_methods_and_the_default_layer(client, clf, sample_x):
    st = client.get("/api/state").json()
    assert st["model"] == clf.name and st["methods"] == list(convlens.CAM_METHODS)
    assert st["default_layer"] == convlens.default_cam_layer(clf.model, sample_x) == "bn2"
    names = [row["name"] for row in st["layers"]]
    assert "blocks.4" in names and "bn2" in names and names.index("blocks.4") < names.index("bn2")
    table = {r.name: r for r in convlens.layer_table(clf.model, sample_x)}
    assert st["layers"][names.index("blocks.4")]["shape"] == list(table["blocks.4"].shape[1:])
    assert len(client.get("/api/labels").json()) == 1000
    assert st["images"][0]["name"] == "chelsea.jpg" and st["images"][0]["error"] is None


def test_predictions_equal_clf_predict(client, clf, image_id, sample_x):
    got = client.get("/api/predict", params={"image": image_id, "k": 5}).json()["predictions"]
    want = clf.predict(sample_x, top=5)[0]
    assert [p["index"] for p in got] == [p.index for p in want]
    assert np.allclose([p["probability"] for p in got], [p.probability for p in want], atol=1e-6)
    assert got[0]["label"] == "Egyptian cat"


@pytest.mark.parametrize("method", GRAD_METHODS)
def test_cam_equals_grad_cam_for_another_class(client, clf, image_id, sample_x, method):
    # tabby (281) is not the top-1 class: a class switch, then a method switch on the cache
    lib = convlens.grad_cam(clf, sample_x, target=281, method=method)
    got = _npy(client, image=image_id, cls=281, method=method)
    assert got.shape == (224, 224) and got.dtype == np.float32
    np.testing.assert_allclose(got, lib.maps[0].numpy(), rtol=1e-5, atol=1e-6)
    j = client.get("/api/cam", params={"image": image_id, "cls": 281, "method": method}).json()
    assert j["target"] == 281 and j["label"] == "tabby" and j["layer"] == "bn2" and j["raw_shape"] == [7, 7]
    m = lib.maps[0].numpy()
    assert j["min"] == pytest.approx(float(m.min()), rel=1e-5, abs=1e-7)
    assert j["max"] == pytest.approx(float(m.max()), rel=1e-5)
    # the picture is that map, min-max scaled, through matplotlib's jet; both sides look the value
    # up in a 256-entry table (rounded to 1/255 there, floored to 1/256 here), and jet's steepest
    # channel moves 4 levels per 1/255: up to 6 levels apart, the same colours on average
    want = matplotlib.colormaps["jet"]((m - m.min()) / (m.max() - m.min()))[..., :3] * 255
    diff = np.abs(_decode(j["png"]).astype(float) - want)
    assert diff.max() <= 6 and diff.mean() < 1


def test_cam_at_another_layer_and_class_by_name(client, clf, image_id, sample_x):
    lib = convlens.grad_cam(clf, sample_x, target="tiger cat", layer="blocks.4", method="layercam")
    got = _npy(client, image=image_id, cls="tiger cat", method="layercam", layer="blocks.4")
    np.testing.assert_allclose(got, lib.maps[0].numpy(), rtol=1e-5, atol=1e-6)


def test_class_and_method_switch_run_no_forward_pass(client, clf, image_id):
    client.get("/api/cam", params={"image": image_id, "cls": 285, "method": "gradcam"})
    calls = []
    handle = clf.model.register_forward_pre_hook(lambda m, a: calls.append(1))
    try:
        for cls, method in [(3, "gradcam"), (999, "gradcam++"), (3, "eigencam"), (500, "xgradcam")]:
            assert client.get("/api/cam", params={"image": image_id, "cls": cls, "method": method}).status_code == 200
    finally:
        handle.remove()
    assert calls == []  # one partial backward per new class, nothing for a new method


def test_raw_scale_uses_the_top1_maximum(client, clf, image_id, sample_x):
    top1 = convlens.grad_cam(clf, sample_x, method="gradcam").maps[0]
    j = client.get("/api/cam", params={"image": image_id, "cls": 281, "scale": "raw"}).json()
    assert j["vmin"] == 0 and j["vmax"] == pytest.approx(float(top1.max()), rel=1e-5)
    assert client.get("/api/cam", params={"image": image_id, "scale": "other"}).status_code == 400


def test_png_download_is_the_overlay(client, clf, image_id, sample_x):
    r = client.get("/api/cam.png", params={"image": image_id, "cls": 281, "alpha": 0.5})
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    assert r.headers["content-disposition"] == 'attachment; filename="chelsea_gradcam_281_bn2.png"'
    lib = convlens.grad_cam(clf, sample_x, target=281).maps[0].numpy()
    rgb = clf.denormalise(sample_x)[0].permute(1, 2, 0).numpy()
    # half the photo, half the min-max scaled map through jet
    heat = matplotlib.colormaps["jet"]((lib - lib.min()) / (lib.max() - lib.min()))[..., :3]
    want = (0.5 * rgb + 0.5 * heat) * 255
    got = np.asarray(Image.open(io.BytesIO(r.content))).astype(float)
    assert np.abs(got - want).max() <= 1.0


def test_channels_equal_activations(client, clf, image_id, sample_x):
    for layer in ("blocks.2", "bn2"):
        j = client.get("/api/channels", params={"image": image_id, "layer": layer, "k": 6}).json()
        acts = convlens.activations(clf, sample_x, [layer])
        top = acts.top_channels(layer, k=6)[0].tolist()
        assert [c["channel"] for c in j["channels"]] == top and j["count"] == acts[layer].shape[1]
        means = acts[layer][0].mean(dim=(1, 2))[top]
        np.testing.assert_allclose([c["mean"] for c in j["channels"]], means.numpy(), rtol=1e-5)
        assert _decode(j["channels"][0]["png"]).shape[2] == 3


def test_bad_parameters_are_clear_errors(client, image_id):
    r = client.get("/api/cam", params={"image": image_id, "method": "magic"})
    assert r.status_code == 400 and "unknown method 'magic'" in r.json()["error"]
    r = client.get("/api/cam", params={"image": image_id, "cls": "no such class"})
    assert r.status_code == 400 and "unknown class" in r.json()["error"]
    r = client.get("/api/cam", params={"image": image_id, "layer": "blocks.99"})
    assert r.status_code == 400 and "no layer named" in r.json()["error"]
    assert client.get("/api/cam", params={"image": "nope"}).status_code == 404
    assert client.get("/api/image/nope/input.png").status_code == 404
    assert client.get("/api/image/../../etc/passwd").status_code == 404
    assert client.get(f"/api/image/{image_id}/other.png").status_code == 404
    assert client.get("/api/predict", params={"image": image_id, "k": "x"}).status_code == 400


def test_metrics_pass_the_served_map_to_convlens_deletion_and_insertion(client, clf, image_id, sample_x,
                                                                        monkeypatch):
    """The wiring to convlens.deletion / insertion, with stand-ins that record what they get and
    answer a PerturbationCurve's fields."""
    from types import SimpleNamespace

    calls = []

    def fake(kind):
        def curve(model, x, saliency, *, target=None):
            calls.append((kind, model, x, saliency, target))
            return SimpleNamespace(fractions=torch.linspace(0, 1, 3), scores=torch.tensor([[0.9, 0.5, 0.1]]),
                                   auc=torch.tensor([0.5 if kind == "deletion" else 0.6]))
        return curve

    monkeypatch.setattr(explorer_module, "deletion", fake("deletion"))
    monkeypatch.setattr(explorer_module, "insertion", fake("insertion"))
    params = {"image": image_id, "cls": 281, "method": "layercam"}
    r = client.get("/api/metrics", params=params)
    assert r.status_code == 202
    assert _wait(client, r.json()["job"])["state"] == "done"
    j = client.get("/api/metrics", params=params).json()
    assert j["deletion"] == {"x": [0.0, 0.5, 1.0], "y": pytest.approx([0.9, 0.5, 0.1]), "auc": 0.5}
    assert j["insertion"]["auc"] == pytest.approx(0.6)
    assert [c[0] for c in calls] == ["deletion", "insertion"]  # once: the second answer is cached
    # the verdict in words beside the curves: LayerCAM's map hardly changes with the class on this model
    assert j["verdict"]["level"] == "do not trust" and "not class-discriminative" in j["verdict"]["reasons"][0]
    assert set(j["references"]) == {"random 7x7 map", "centred Gaussian"} and j["class_rho"] > 0.5
    lib = convlens.grad_cam(clf, sample_x, target=281, method="layercam").maps
    for _, model, x, saliency, target in calls:
        assert model is clf and torch.equal(x, sample_x) and target == 281
        torch.testing.assert_close(saliency, lib, rtol=1e-5, atol=1e-6)


def test_page_and_assets_are_local(client):
    page = client.get("/")
    assert page.status_code == 200 and "convlens" in page.text
    assert "http://" not in page.text and "https://" not in page.text
    csp = page.headers["content-security-policy"]
    assert "default-src 'self'" in csp and "connect-src 'self'" in csp
    for asset in ("app.js", "style.css"):
        r = client.get(f"/static/{asset}")
        assert r.status_code == 200 and "https://" not in r.text and "@import" not in r.text


# -- safety -----------------------------------------------------------------------------------
def test_host_header_must_be_the_servers_own(explorer):
    with TestClient(create_app(explorer), base_url="http://evil.example:8000") as c:
        r = c.get("/api/state")
        assert r.status_code == 400 and "Host header" in r.json()["error"]
        assert c.get("/").status_code == 400
    for ok in ("http://localhost:8000", "http://127.0.0.1:1234", "http://[::1]:8000"):
        with TestClient(create_app(explorer), base_url=ok) as c:
            assert c.get("/api/state").status_code == 200, ok


def test_cross_site_writes_are_refused(client):
    r = client.post("/api/upload", content=b"x", headers={"origin": "http://evil.example"})
    assert r.status_code == 403
    r = client.post("/api/features", json={"layer": "bn2", "channel": 0}, headers={"origin": "https://evil.example"})
    assert r.status_code == 403


def _png_bytes(size: tuple[int, int] = (40, 30), colour: tuple[int, int, int] = (200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="PNG")
    return buf.getvalue()


def test_upload_then_explain_it(client, clf):
    r = client.post("/api/upload", content=_png_bytes(), headers={"x-filename": "red%20%3Cb%3E.png"})
    assert r.status_code == 200, r.text
    entry = r.json()
    assert entry["name"] == "red <b>.png" and entry["uploaded"] and entry["error"] is None
    assert entry["id"] in [i["id"] for i in client.get("/api/state").json()["images"]]
    x = clf.preprocess(Image.new("RGB", (40, 30), (200, 30, 30)))
    got = client.get("/api/predict", params={"image": entry["id"], "k": 3}).json()["predictions"]
    assert [p["index"] for p in got] == [p.index for p in clf.predict(x, top=3)[0]]
    # the name is data only: a path in it never becomes a path
    r = client.post("/api/upload", content=_png_bytes(), headers={"x-filename": "..%2F..%2Fetc%2Fpasswd"})
    assert r.status_code == 200 and r.json()["name"] == "passwd"


def test_broken_upload_is_an_error_and_the_server_goes_on(client, image_id):
    r = client.post("/api/upload", content=b"this is not an image", headers={"x-filename": "notes.png"})
    # load_image's own message, named after the upload
    assert r.status_code == 400 and r.json()["error"] == "notes.png: not an image in a supported format " \
        "(JPEG, PNG, BMP, GIF, TIFF, WEBP, PPM)"
    r = client.post("/api/upload", content=_png_bytes()[:60], headers={"x-filename": "cut.png"})
    assert r.status_code == 400 and r.json()["error"].startswith("cut.png: ")
    r = client.post("/api/upload", content=b"", headers={"x-filename": "empty.png"})
    assert r.status_code == 400 and "empty" in r.json()["error"]
    assert client.get("/api/predict", params={"image": image_id}).status_code == 200


def test_upload_limits(client, monkeypatch):
    monkeypatch.setattr(app_module, "MAX_UPLOAD_BYTES", 1000)
    r = client.post("/api/upload", content=b"\0" * 1001, headers={"x-filename": "big.png"})
    assert r.status_code == 413 and "upload limit" in r.json()["error"]

    def chunks():  # no Content-Length: the limit holds while reading
        for _ in range(5):
            yield b"\0" * 400

    r = client.post("/api/upload", content=chunks(), headers={"x-filename": "big.png"})
    assert r.status_code == 413
    monkeypatch.setattr(convlens.images, "MAX_PIXELS", 1000)
    r = client.post("/api/upload", content=_png_bytes((50, 50)), headers={"x-filename": "wide.png"})
    assert r.status_code == 400 and "Mpx limit" in r.json()["error"]


# -- jobs: Score-CAM, occlusion, feature visualisation (on a tiny net) -------------------------
@pytest.fixture()
def tiny_client(tiny_clf):
    x = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    img = Image.fromarray((x[0].permute(1, 2, 0).numpy() * 255).astype(np.uint8))
    ex = Explorer(tiny_clf, [img])
    with TestClient(create_app(ex), base_url=BASE) as c:
        yield c, ex, tiny_clf, ex.images()[0]
    ex.close()


def test_scorecam_job_equals_grad_cam(tiny_client):
    c, ex, clf, entry = tiny_client
    before = snapshot(clf.model)
    r = c.get("/api/cam", params={"image": entry.id, "cls": 2, "method": "scorecam"})
    assert r.status_code == 202
    job = _wait(c, r.json()["job"])
    assert job["state"] == "done" and job["done"] == job["total"] == 6
    got = _npy(c, image=entry.id, cls=2, method="scorecam")
    lib = convlens.grad_cam(clf, entry.x, target=2, method="scorecam")
    np.testing.assert_allclose(got, lib.maps[0].numpy(), rtol=1e-5, atol=1e-7)
    assert_unchanged(clf.model, before)


def test_occlusion_job_equals_occlusion(tiny_client):
    c, ex, clf, entry = tiny_client
    before = snapshot(clf.model)
    body = {"image": entry.id, "cls": 4, "patch": 8, "stride": 4}
    r = c.post("/api/occlusion", json=body)
    assert r.status_code == 202
    job = _wait(c, r.json()["job"])
    assert job["state"] == "done" and job["done"] == job["total"] == 49
    j = c.post("/api/occlusion", json=body).json()
    lib = convlens.occlusion(clf, entry.x, target=4, patch=8, stride=4)
    assert j["max_drop"] == pytest.approx(float(lib.raw.max()), abs=1e-6) and j["windows"] == 49
    np.testing.assert_allclose(ex.occlusion_result(entry.id, 4, 8, 4).maps.numpy(), lib.maps.numpy(), atol=1e-6)
    assert _decode(j["png"]).shape == (32, 32, 4)
    assert c.post("/api/occlusion", json={**body, "patch": 99}).status_code == 400
    assert_unchanged(clf.model, before)


def test_feature_job_equals_feature_visualization_and_is_cached(tiny_client):
    c, ex, clf, entry = tiny_client
    before = snapshot(clf.model)
    r = c.post("/api/features", json={"layer": "act2", "channel": 1})
    assert r.status_code == 202
    job = _wait(c, r.json()["job"])
    assert job["state"] == "done" and job["done"] == job["total"] == 128
    j = c.post("/api/features", json={"layer": "act2", "channel": 1})
    assert j.status_code == 200  # cached: no second job
    lib = convlens.feature_visualization(clf, "act2", [1])
    assert np.array_equal(_decode(j.json()["png"]), lib.uint8(0))
    assert j.json()["objective"] == pytest.approx(float(lib.objective[0]), rel=1e-5)
    r = c.post("/api/features", json={"layer": "act2", "channel": 99})
    job = _wait(c, r.json()["job"])
    assert job["state"] == "error" and "6 channels" in job["error"]
    assert c.post("/api/features", json={"layer": "act2"}).status_code == 400
    assert_unchanged(clf.model, before)


def test_cancel_stops_a_running_job_and_leaves_the_model(tiny_client):
    c, ex, clf, entry = tiny_client
    before = snapshot(clf.model)
    job = c.post("/api/features", json={"layer": "act1", "channel": 0}).json()["job"]
    while job["state"] == "queued" or (job["state"] == "running" and job["done"] == 0):
        job = c.get(f"/api/jobs/{job['id']}").json()
    assert job["state"] == "running"
    c.post(f"/api/jobs/{job['id']}/cancel")
    job = _wait(c, job)
    assert job["state"] == "cancelled" and 0 < job["done"] < 128
    assert ex.feature_result("act1", 0) is None
    # a queued job is dropped at once
    queued = [c.post("/api/occlusion", json={"image": entry.id, "patch": 4, "stride": s}).json()["job"] for s in (1, 2)]
    assert c.post(f"/api/jobs/{queued[1]['id']}/cancel").json()["state"] == "cancelled"
    assert _wait(c, queued[0])["state"] == "done"
    # asked again, a cancelled job runs anew
    job = _wait(c, c.post("/api/features", json={"layer": "act1", "channel": 0}).json()["job"])
    assert job["state"] == "done"
    assert_unchanged(clf.model, before)
    assert c.get("/api/jobs/nope").status_code == 404


def test_model_lock_lets_a_request_in_between_a_jobs_batches():
    lock, order, started = ModelLock(), [], threading.Event()

    def job() -> None:
        with lock.job():
            started.set()
            for _ in range(40):
                time.sleep(0.01)
                order.append("batch")
                lock.pause()

    t = threading.Thread(target=job)
    t.start()
    started.wait()
    with lock:
        order.append("request")
    t.join()
    k = order.index("request")
    assert 0 < k < len(order) - 10  # after a batch, long before the job's end


def test_model_untouched_after_a_session_from_train_mode(tiny_clf):
    m = tiny_clf.model.train()
    m.conv1.weight.grad = torch.ones_like(m.conv1.weight)
    m.fc.bias.requires_grad_(False)
    before = snapshot(m)
    ex = Explorer(tiny_clf, [Image.new("RGB", (32, 32), (10, 200, 90))])
    with TestClient(create_app(ex), base_url=BASE) as c:
        i = ex.images()[0].id
        for method in GRAD_METHODS:
            assert c.get("/api/cam", params={"image": i, "cls": 0, "method": method}).status_code == 200
        assert c.get("/api/channels", params={"image": i, "layer": "act1"}).status_code == 200
        _wait(c, c.post("/api/occlusion", json={"image": i, "patch": 8, "stride": 8}).json()["job"])
    ex.close()
    assert_unchanged(m, before)
    assert m.training and torch.is_grad_enabled()


# -- the library hooks the jobs use -----------------------------------------------------------
def test_progress_callbacks_count_to_the_total_and_can_stop(tiny_clf):
    x = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    seen: list[tuple[int, int]] = []
    convlens.occlusion(tiny_clf, x, patch=8, stride=8, callback=lambda d, t: seen.append((d, t)))
    assert seen[-1] == (16, 16) and [d for d, _ in seen] == sorted(d for d, _ in seen)
    seen.clear()
    convlens.grad_cam(tiny_clf, x, method="scorecam", batch_size=4, callback=lambda d, t: seen.append((d, t)))
    assert seen == [(4, 6), (6, 6)]
    seen.clear()
    convlens.feature_visualization(tiny_clf, "act1", [0], steps=5, callback=lambda d, t: seen.append((d, t)))
    assert seen == [(k, 5) for k in range(1, 6)]

    class Stop(Exception):
        pass

    def stop(d: int, t: int) -> None:
        raise Stop

    before = snapshot(tiny_clf.model)
    for call in (
        lambda: convlens.occlusion(tiny_clf, x, patch=8, stride=8, callback=stop),
        lambda: convlens.grad_cam(tiny_clf, x, method="scorecam", callback=stop),
        lambda: convlens.feature_visualization(tiny_clf, "act1", [0], steps=5, callback=stop),
    ):
        with pytest.raises(Stop):
            call()
        assert_unchanged(tiny_clf.model, before)


def test_cam_from_layer_is_grad_cams_rule(tiny_clf):
    from convlens.hooks import LayerCapture
    from convlens.methods.cam import cam_from_layer

    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    m = tiny_clf.model
    with LayerCapture({"act2": m.act2}, grad=["act2"]) as cap:
        out = cap.run(m, x)
        (g,) = torch.autograd.grad(out[:, 3].sum(), cap["act2"])
    for method in GRAD_METHODS:
        raw, maps = cam_from_layer(method, cap["act2"].detach(), None if method == "eigencam" else g, (32, 32))
        lib = convlens.grad_cam(tiny_clf, x, target=3, method=method, layer="act2")
        torch.testing.assert_close(raw, lib.raw)
        torch.testing.assert_close(maps, lib.maps)
    with pytest.raises(ValueError, match="needs the gradient"):
        cam_from_layer("gradcam", cap["act2"].detach(), None, (32, 32))


# -- the command and the Python entry point ---------------------------------------------------
def test_cli_without_the_extra_prints_the_install_hint(monkeypatch, capsys):
    import importlib.util

    from convlens.cli import main

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "uvicorn" else real(name, *a))
    assert main(["serve"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("convlens: error: convlens serve needs the optional web server: pip install 'convlens[serve]' "
                   "(uvicorn not installed)")


def test_cli_bad_input_is_a_one_line_error(capsys, tmp_path):
    from convlens.cli import main

    assert main(["serve", str(tmp_path / "missing.jpg")]) == 2
    assert capsys.readouterr().err.strip().endswith("missing.jpg: no such file or folder")
    assert main(["serve", "--port", "70000"]) == 2
    assert "--port must be between 0 and 65535" in capsys.readouterr().err


def test_port_in_use_is_a_clear_oserror(explorer):
    import socket

    from convlens.serve import Server

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        with pytest.raises(OSError, match=r"cannot listen on 127\.0\.0\.1:\d+ .*pass another --port"):
            Server(explorer, "127.0.0.1", s.getsockname()[1])


def test_cli_prints_the_url_serves_and_stops_on_ctrl_c(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import urllib.request
    from pathlib import Path

    img = tmp_path / "red.png"
    img.write_bytes(_png_bytes())
    src = str(Path(convlens.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": src, "OMP_NUM_THREADS": "1"}
    p = subprocess.Popen([sys.executable, "-m", "convlens.cli", "serve", str(img), str(tmp_path), "--port", "0"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = p.stdout.readline()
        assert line.startswith("convlens explorer: http://127.0.0.1:") and "(2 images, efficientnet_lite0" in line
        url = line.split()[2]
        with urllib.request.urlopen(url + "api/state", timeout=60) as r:
            names = [i["name"] for i in __import__("json").load(r)["images"]]
        assert names == ["red.png", "red.png"]  # the file, then the folder's one image
        req = urllib.request.Request(url + "api/state", headers={"Host": "attacker.example"})
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(req, timeout=60)
        assert e.value.code == 400
    finally:
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=60)
    assert p.returncode == 0 and err.strip() == "convlens serve: stopped", err


def test_serve_in_the_background_shows_itself_inline(tiny_clf):
    import json
    import urllib.request

    srv = convlens.serve(tiny_clf, Image.new("RGB", (32, 32), (1, 2, 3)), block=False)
    try:
        assert srv.url.startswith("http://127.0.0.1:") and srv.port != 8000
        with urllib.request.urlopen(srv.url + "api/state", timeout=30) as r:
            st = json.load(r)
        assert st["model"] == "Tiny" and [i["name"] for i in st["images"]] == ["image 1"]
        assert f'<iframe src="{srv.url}"' in srv._repr_html_()
    finally:
        srv.stop()
    with pytest.raises(OSError):
        urllib.request.urlopen(srv.url, timeout=5)


def test_serve_function_survives_the_subpackage_import():
    import convlens.serve.app  # noqa: F401  (importing the subpackage must not replace the function)

    assert callable(convlens.serve) and convlens.serve.__name__ == "serve"


def test_other_hosts_warn_and_are_allowed_by_name(caplog, tiny_clf):
    from convlens.serve import allowed_hosts, is_loopback

    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.5")
    assert allowed_hosts("192.168.1.5") == {"127.0.0.1", "localhost", "::1", "192.168.1.5"}
    import socket

    assert socket.gethostname() in allowed_hosts("0.0.0.0")
    with caplog.at_level("WARNING", logger="convlens.serve"):
        srv = convlens.serve(tiny_clf, Image.new("RGB", (32, 32)), host="0.0.0.0", block=False)
        srv.stop()
    assert "anyone who can reach this machine on that network can use the explorer" in caplog.text


def test_a_finished_job_whose_result_was_evicted_runs_again(tiny_client):
    c, ex, clf, entry = tiny_client
    body = {"image": entry.id, "cls": 0, "patch": 16, "stride": 16}
    first = _wait(c, c.post("/api/occlusion", json=body).json()["job"])
    assert c.post("/api/occlusion", json=body).status_code == 200
    ex._occlusion.drop(lambda k: False)  # as the LRU does when full
    again = c.post("/api/occlusion", json=body).json()["job"]
    assert again["id"] != first["id"] and _wait(c, again)["state"] == "done"
    assert c.post("/api/occlusion", json=body).status_code == 200


def test_in_a_notebook_it_serves_in_the_background_and_shows_inline(tmp_path):
    """A real IPython kernel (as Jupyter runs it): `convlens.serve(...)` returns at once, the
    cell's result is the page in an iframe, and the server answers while the kernel is idle."""
    import json
    import os
    import sys
    from pathlib import Path

    import jupyter_client as jc  # comes with ipykernel (test extra), which the kernel below runs
    from jupyter_client.kernelspec import KernelSpecManager

    spec = tmp_path / "kernels" / "convlens-test"
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "convlens test", "language": "python",
    }))
    km = jc.KernelManager(kernel_name="convlens-test",
                          kernel_spec_manager=KernelSpecManager(kernel_dirs=[str(spec.parent)]))
    src = str(Path(convlens.__file__).resolve().parents[1])
    km.start_kernel(env={**os.environ, "PYTHONPATH": src, "OMP_NUM_THREADS": "1"})
    kc = km.client()
    kc.start_channels()

    def run(code: str) -> list[tuple[str, dict]]:
        msg_id = kc.execute(code)
        out = []
        while True:
            msg = kc.get_iopub_msg(timeout=120)
            if msg["parent_header"].get("msg_id") != msg_id:
                continue
            out.append((msg["msg_type"], msg["content"]))
            if msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
                return out

    try:
        kc.wait_for_ready(timeout=120)
        out = run(
            "import torch, convlens\nfrom torch import nn\n"
            "m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))\n"
            "clf = convlens.Classifier(m, mean=(0.5,)*3, std=(0.5,)*3, size=32)\n"
            "srv = convlens.serve(clf, torch.rand(3, 32, 32))\n"
            "srv"
        )
        result = [c for t, c in out if t == "execute_result"]
        assert result, out
        html = result[0]["data"]["text/html"]
        assert html.startswith('<iframe src="http://127.0.0.1:') and 'title="convlens explorer"' in html
        out = run("import urllib.request, json\n"
                  "json.load(urllib.request.urlopen(srv.url + 'api/state'))['model']")
        assert [c["data"]["text/plain"] for t, c in out if t == "execute_result"] == ["'Sequential'"]
        run("srv.stop()")
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)


def test_many_clients_at_once_get_the_librarys_values(client, clf, image_id, sample_x):
    from concurrent.futures import ThreadPoolExecutor

    asks = [(cls, method) for cls in (1, 2, 281, 285, 900) for method in ("gradcam", "layercam", "eigencam")]
    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(lambda a: _npy(client, image=image_id, cls=a[0], method=a[1], layer="blocks.6"), asks))
    for (cls, method), m in zip(asks, got):
        lib = convlens.grad_cam(clf, sample_x, target=cls, method=method, layer="blocks.6").maps[0]
        np.testing.assert_allclose(m, lib.numpy(), rtol=1e-5, atol=1e-6)
