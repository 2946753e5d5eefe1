"""The local explorer (``convlens serve``): how long the server takes to answer what the page asks.

Each row is one user action, timed at the server as the whole HTTP request through the app
(Starlette's in-process TestClient: routing, the thread hop, the computation, PNG encoding, JSON),
so it is what the page waits for minus the network. The cases run round-robin, one of each per
round, so a busy neighbour slows every row alike; ``seconds`` is the median (p50), ``p95 ms`` the
95th percentile.

- cold image: a newly added image, as the page loads it: top-5 (the forward pass, kept from the
  CAM layer on), the Grad-CAM map of the top-1 class, and the layer's 12 most active channels.
- class switch: Grad-CAM of a class not asked for before on that image (one partial backward).
- method switch: another method for a class already shown (no model call).
- layer switch: the map and the channels at a layer not used before on that image (a pass
  captured at that layer).
- repeat: the same map again (the cache; the floor of any answer).

Run alone: ``python -m benchmarks --only serve``.
"""

from __future__ import annotations

import itertools
import logging
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from .common import FLOOR_FORWARD, Row, fill_ratios

METHOD_CYCLE = ("gradcam++", "xgradcam", "layercam", "eigencam")
LAYER_CYCLE = ("blocks.4", "blocks.5", "blocks.6", "conv_head", "blocks.3")
TARGET_MS = 150


def _p95(times: list[float]) -> float:
    return statistics.quantiles(times, n=20, method="inclusive")[-1] if len(times) > 1 else times[0]


def tables(quick: bool, device: str) -> list[tuple[str, list[Row]]]:
    """One table: the explorer's answers on the default model, one 224 px photo."""
    from starlette.testclient import TestClient

    import convlens
    from convlens.serve.app import create_app
    from convlens.serve.explorer import Explorer

    for name in ("httpx", "httpx2"):  # the test client logs every request at INFO
        logging.getLogger(name).setLevel(logging.WARNING)
    clf = convlens.load_model(device=device)
    photo = convlens.sample_image()
    ex = Explorer(clf, [photo])
    rounds = 12 if quick else 20
    classes = iter(range(0, 1000, 7))  # a class never asked for before, each time
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)

    with TestClient(create_app(ex), base_url="http://127.0.0.1:8000") as c:
        def get(path: str, **params: Any) -> dict[str, Any]:
            r = c.get(path, params=params)
            if r.status_code != 200:
                raise RuntimeError(f"{path} {params}: {r.status_code} {r.text[:200]}")
            return r.json()

        def page_load(image: str) -> None:
            get("/api/predict", image=image, k=5)
            get("/api/cam", image=image)
            get("/api/channels", image=image, k=12)

        def fresh() -> str:  # an image the explorer has not seen (its caches are per image id)
            return ex.add_image(photo, "photo.jpg").id

        warm = fresh()
        page_load(warm)
        methods = itertools.cycle(METHOD_CYCLE)
        layers = itertools.cycle(LAYER_CYCLE)
        x = ex.image(warm).x

        def forward() -> Callable[[], None]:
            def run() -> None:
                with torch.no_grad():
                    clf.model(x)
            return run

        # each case: (prepare, timed); prepare is not timed
        state: dict[str, Any] = {}

        def prep_cold() -> None:
            state["cold"] = fresh()

        def prep_class() -> None:
            state["cls"] = next(classes)

        def prep_method() -> None:
            state["mcls"] = next(classes)
            get("/api/cam", image=warm, cls=state["mcls"])  # the class shown with Grad-CAM first
            state["method"] = next(methods)

        def prep_layer() -> None:
            state["limg"] = fresh()
            page_load(state["limg"])
            state["layer"] = next(layers)

        def layer_switch() -> None:
            get("/api/cam", image=state["limg"], layer=state["layer"])
            get("/api/channels", image=state["limg"], layer=state["layer"], k=12)

        cases: dict[str, tuple[Callable[[], None], Callable[[], None]]] = {
            FLOOR_FORWARD: (lambda: None, forward()),
            "cold image (top-5 + Grad-CAM + 12 channels)": (prep_cold, lambda: page_load(state["cold"])),
            "class switch (Grad-CAM, new class)": (prep_class, lambda: get("/api/cam", image=warm, cls=state["cls"])),
            "method switch (new method, class shown)": (
                prep_method, lambda: get("/api/cam", image=warm, cls=state["mcls"], method=state["method"])),
            "layer switch (map + 12 channels, new layer)": (prep_layer, layer_switch),
            "repeat (cached map)": (lambda: None, lambda: get("/api/cam", image=warm, cls=3)),
        }
        get("/api/cam", image=warm, cls=3)
        times: dict[str, list[float]] = {k: [] for k in cases}
        for r in range(rounds + 1):
            for name, (prepare, timed) in cases.items():
                prepare()
                sync()
                t0 = time.perf_counter()
                timed()
                sync()
                if r:  # round 0 warms up
                    times[name].append(time.perf_counter() - t0)
    ex.close()
    rows = []
    for name, ts in times.items():
        p50, p95 = statistics.median(ts), _p95(ts)
        extra: dict[str, Any] = {"p50 ms": round(1000 * p50, 1), "p95 ms": round(1000 * p95, 1), "n": len(ts)}
        if "switch" in name:
            ok = "yes" if 1000 * p95 < TARGET_MS else ("p50 only" if 1000 * p50 < TARGET_MS else "NO")
            extra[f"< {TARGET_MS} ms"] = ok
        rows.append(Row(name, clf.name, 1, p50, extra=extra))
    return [(f"convlens serve: answers at the server, {clf.name}, one 224 px photo, {device}",
             fill_ratios(rows, FLOOR_FORWARD))]
