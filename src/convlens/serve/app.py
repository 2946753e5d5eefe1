"""The HTTP layer: Starlette routes over an :class:`Explorer`, the static page, and the checks that
keep a local server local (Host header against DNS rebinding, Origin on writes, upload limits).

Every answer is JSON (``{"error": "..."}`` with a 4xx status for bad input) or a PNG/.npy; images
are named by opaque id only, never by a path taken from a request.
"""

from __future__ import annotations

import io
import logging
import re
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import numpy as np
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Receive, Scope, Send

from ..images import ImageError
from ..layers import LayerError
from ..methods.registry import METHOD_TITLES, cam_methods
from ..plotting import normalize_map, overlay
from . import render
from .explorer import MAX_UPLOAD_BYTES, Explorer, instant_methods

__all__ = ["create_app", "STATIC"]

log = logging.getLogger(__name__)

STATIC = Path(__file__).resolve().parent / "static"
MAX_JSON_BYTES = 1 << 20  # a JSON request body (uploads: MAX_UPLOAD_BYTES)
SECURITY_HEADERS = [
    # everything comes from this server: no CDN, font or script from the network can load
    (b"content-security-policy", b"default-src 'self'; img-src 'self' data: blob:; style-src 'self'; "
                                 b"script-src 'self'; connect-src 'self'; object-src 'none'; base-uri 'none'"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"cache-control", b"no-store"),
]


def _host_of(value: str) -> str:
    """The host part of a Host header value (``[::1]:8000`` -> ``::1``), lower case."""
    value = value.strip().lower()
    if value.startswith("["):
        return value[1:value.find("]")] if "]" in value else value
    return value.rsplit(":", 1)[0] if value.count(":") == 1 else value


class LocalOnly:
    """ASGI middleware: a request whose Host header is not one of the server's own names is
    refused (400), which defeats DNS rebinding (a page on ``evil.example`` whose name now points
    at 127.0.0.1 still sends ``Host: evil.example``); a write (POST) whose Origin is another
    site is refused (403), so another tab's page cannot start jobs or upload. Adds the
    security headers to every answer."""

    def __init__(self, app: ASGIApp, allowed_hosts: set[str]) -> None:
        self.app = app
        self.allowed = {_host_of(h) for h in allowed_hosts}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        host = _host_of(headers.get("host", ""))
        if host not in self.allowed:
            await JSONResponse({"error": "this server answers only to its own address (Host header refused)"},
                               status_code=400)(scope, receive, send)
            return
        origin = headers.get("origin")
        if scope["method"] not in ("GET", "HEAD") and origin and _host_of(urlsplit(origin).netloc) not in self.allowed:
            await JSONResponse({"error": "cross-site request refused"}, status_code=403)(scope, receive, send)
            return

        async def send_with_headers(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                message.setdefault("headers", [])
                message["headers"] = list(message["headers"]) + SECURITY_HEADERS
            await send(message)

        await self.app(scope, receive, send_with_headers)


def _error(message: str, status: int) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def _first_line(e: BaseException) -> str:
    text = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
    return (text.strip().splitlines() or [type(e).__name__])[0][:500]


def _safe_name(text: str) -> str:
    """A file name safe in a Content-Disposition header and on any file system."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._")[:80] or "map"


def _int(value: str | None, what: str, default: int | None = None) -> int | None:
    if value in (None, ""):
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{what} must be a whole number, not {value!r}") from None


def create_app(explorer: Explorer, allowed_hosts: set[str] | None = None) -> ASGIApp:
    """The ASGI app of the explorer. ``allowed_hosts``: the names the Host header may carry
    (default: the loopback names ``127.0.0.1``, ``localhost``, ``::1``).

    Example::

        app = create_app(Explorer(load_model(), [sample_image_path()]))
        uvicorn.run(app, host="127.0.0.1", port=8000)

    Long by design: every route is a short closure over this one explorer and its limits, kept together
    as the app's table of routes.
    """
    ex = explorer
    allowed = set(allowed_hosts or ()) | {"127.0.0.1", "localhost", "::1"}

    def handler(fn: Callable[[Request], Any]) -> Callable[[Request], Awaitable[Response]]:
        """Run a synchronous endpoint in the thread pool and turn errors into JSON answers."""

        async def endpoint(request: Request) -> Response:
            try:
                result = await run_in_threadpool(fn, request)
            except (ValueError, LayerError, ImageError, TypeError) as e:
                return _error(_first_line(e), 400)
            except KeyError as e:
                return _error(_first_line(e), 404)
            except Exception as e:  # the page shows it; the server keeps running
                log.exception("internal error")
                return _error(f"internal error: {type(e).__name__}: {_first_line(e)}", 500)
            return result if isinstance(result, Response) else JSONResponse(result)

        return endpoint

    def image_entry(entry: Any) -> dict[str, Any]:
        return {"id": entry.id, "name": entry.name, "error": entry.error, "uploaded": entry.uploaded}

    def state(request: Request) -> dict[str, Any]:
        layers, default = ex.layers()
        return {
            "model": ex.clf.name, "device": str(ex.clf.device), "methods": list(cam_methods()),
            "titles": {m: METHOD_TITLES[m] for m in cam_methods()}, "instant_methods": list(instant_methods()),
            "layers": layers, "default_layer": default,
            "images": [image_entry(e) for e in ex.images()], "max_upload_mb": MAX_UPLOAD_BYTES / 2**20,
        }

    def labels(request: Request) -> list[str]:
        return ex.labels()

    def image_png(request: Request) -> Response:
        if request.path_params["kind"] not in ("thumb", "input"):
            raise KeyError("not found")
        entry = ex.image(request.path_params["image_id"])
        side = 96 if request.path_params["kind"] == "thumb" else None
        return Response(render.rgb_png(entry.rgb, side), media_type="image/png")

    def predict(request: Request) -> dict[str, Any]:
        q = request.query_params
        k = _int(q.get("k"), "k", 5)
        if not 1 <= k <= 100:
            raise ValueError("k must be between 1 and 100")
        return {"predictions": ex.predictions(q.get("image", ""), k)}

    def cam_params(request: Request) -> tuple[str, Any, str, str | None, str]:
        q = request.query_params
        method = q.get("method", "gradcam")
        scale = q.get("scale", "norm")
        if scale not in ("norm", "raw"):
            raise ValueError("scale is norm or raw")
        cls = q.get("cls") or None
        return q.get("image", ""), (int(cls) if cls and cls.isdigit() else cls), method, q.get("layer") or None, scale

    def cam(request: Request) -> Response | dict[str, Any]:
        t0 = time.perf_counter()
        image_id, cls, method, layer, scale = cam_params(request)
        try:
            res = ex.cam(image_id, cls, method, layer)
        except KeyError:
            if method != "scorecam":
                raise
            job = ex.scorecam_job(image_id, cls, layer)
            return JSONResponse({"job": job.public()}, status_code=202)
        m = res["maps"].cpu().numpy()
        lo, hi = float(m.min()), float(m.max())
        if scale == "norm":
            vmin, vmax = lo, hi
        else:  # one colour scale for every class of this image, layer and method: the top-1 map's
            vmin, vmax = 0.0, _top1_max(image_id, method, res["layer"], hi)
        return {
            "png": render.data_uri(render.heat_png(m, vmin, vmax)), "min": lo, "max": hi,
            "vmin": vmin, "vmax": vmax, "layer": res["layer"], "target": res["target"],
            "label": res["label"], "method": method, "raw_shape": list(res["raw"].shape),
            "server_ms": round(1000 * (time.perf_counter() - t0), 1),
        }

    def _top1_max(image_id: str, method: str, layer: str, fallback: float) -> float:
        try:
            top = ex.cam(image_id, None, method, layer)
        except KeyError:  # Score-CAM of the top-1 class not computed: the map's own maximum
            return fallback
        return float(top["maps"].max()) or fallback

    def cam_download(request: Request) -> Response:
        if request.path_params["ext"] not in ("npy", "png"):
            raise KeyError("not found")
        image_id, cls, method, layer, scale = cam_params(request)
        res = ex.cam(image_id, cls, method, layer)
        entry = ex.image(image_id)
        name = _safe_name(f"{Path(entry.name).stem}_{method.replace('+', 'p')}_{res['target']}_{res['layer']}")
        m = res["maps"].cpu().numpy().astype(np.float32)
        if request.path_params["ext"] == "npy":
            buf = io.BytesIO()
            np.save(buf, m)
            body, media = buf.getvalue(), "application/octet-stream"
        else:
            alpha = float(request.query_params.get("alpha", 0.5))
            if not 0 <= alpha <= 1:
                raise ValueError("alpha must be between 0 and 1")
            heat = normalize_map(m) if scale == "norm" else m / (_top1_max(image_id, method, res["layer"], 1.0) or 1.0)
            body, media = render.png((overlay(entry.rgb, heat, alpha=alpha) * 255 + 0.5).astype(np.uint8)), "image/png"
        return Response(body, media_type=media,
                        headers={"content-disposition": f'attachment; filename="{name}.{request.path_params["ext"]}"'})

    def channels(request: Request) -> dict[str, Any]:
        q = request.query_params
        k = _int(q.get("k"), "k", 12)
        if not 1 <= k <= 64:
            raise ValueError("k must be between 1 and 64")
        res = ex.channels(q.get("image", ""), q.get("layer") or None, k)
        pngs = render.channel_pngs(res["maps"])
        return {"layer": res["layer"], "count": res["count"], "channels": [
            {"channel": c, "mean": v, "png": render.data_uri(p)}
            for c, v, p in zip(res["channels"], res["means"], pngs)
        ]}

    async def read_json(request: Request) -> dict[str, Any]:
        return _json_object(await _body(request, MAX_JSON_BYTES, "the JSON body is larger than the {} limit"))

    def features(data: dict[str, Any]) -> Response | dict[str, Any]:
        layer, channel = data.get("layer") or None, _int(str(data.get("channel", "")), "channel")
        if channel is None or channel < 0:
            raise ValueError("channel must be a non-negative whole number")
        res = ex.feature_result(layer, channel)
        if res is None:
            job = ex.feature_job(layer, channel)
            if job.state != "done":
                return JSONResponse({"job": job.public()}, status_code=202)
            res = ex.feature_result(layer, channel)
        return {"png": render.data_uri(render.png(res.uint8(0))), "layer": res.layer, "channel": channel,
                "objective": float(res.objective[0]), "dead": bool(res.dead[0]) if res.dead else False}

    def occlusion(data: dict[str, Any]) -> Response | dict[str, Any]:
        image_id = str(data.get("image", ""))
        cls = data.get("cls")
        patch, stride = _int(str(data.get("patch", 40)), "patch"), _int(str(data.get("stride", 20)), "stride")
        res = ex.occlusion_result(image_id, cls, patch, stride)
        if res is None:
            job = ex.occlusion_job(image_id, cls, patch, stride)
            if job.state != "done":
                return JSONResponse({"job": job.public()}, status_code=202)
            res = ex.occlusion_result(image_id, cls, patch, stride)
        m = res.maps[0].cpu().numpy()
        ny, nx = res.settings["windows"]
        return {"png": render.data_uri(render.signed_png(m)), "max_drop": float(res.raw.max()),
                "min_drop": float(res.raw.min()), "target": res.target[0], "label": res.labels[0],
                "windows": ny * nx, "patch": patch, "stride": stride}

    def post(fn: Callable[[dict[str, Any]], Any]) -> Callable[[Request], Awaitable[Response]]:
        async def endpoint(request: Request) -> Response:
            try:
                data = await read_json(request)
            except TooLarge as e:
                return _error(str(e), 413)
            except ValueError as e:
                return _error(str(e), 400)
            return await handler(lambda _r: fn(data))(request)

        return endpoint

    def job(request: Request) -> dict[str, Any]:
        return ex.job(request.path_params["job_id"]).public()

    def cancel(request: Request) -> dict[str, Any]:
        return ex.cancel(request.path_params["job_id"]).public()

    async def upload(request: Request) -> Response:
        try:
            body = await _body(request, MAX_UPLOAD_BYTES, "the file is larger than the {} upload limit")
        except TooLarge as e:
            return _error(str(e), 413)
        name = Path(unquote(request.headers.get("x-filename", "") or "upload")).name[:200] or "upload"

        def add(_r: Request) -> dict[str, Any]:
            try:
                entry = ex.add_image(body, name, uploaded=True)
            except ImageError as e:
                raise ImageError(f"{name}: {_first_line(e).removeprefix('image data: ')}") from None
            return image_entry(entry)

        return await handler(add)(request)

    def metrics(request: Request) -> Response | dict[str, Any]:
        # the deletion/insertion curves of the current map: 202 + a job the first time
        image_id, cls, method, layer, _ = cam_params(request)
        found = ex.curves_result(image_id, cls, method, layer)
        if found is None:
            try:
                job = ex.curves_job(image_id, cls, method, layer)
            except KeyError:
                raise KeyError("compute the map first (Score-CAM runs as a job)") from None
            if job.state != "done":
                return JSONResponse({"job": job.public()}, status_code=202)
            found = ex.curves_result(image_id, cls, method, layer)

        def curve(c: Any) -> dict[str, Any]:  # PerturbationCurve: fractions, scores (1, steps+1), auc (1,)
            return {"x": c.fractions.tolist(), "y": c.scores[0].tolist(), "auc": float(c.auc[0])}

        return {"deletion": curve(found[0]), "insertion": curve(found[1]), **(found[2] if len(found) > 2 else {})}

    async def index(request: Request) -> Response:
        return FileResponse(STATIC / "index.html", media_type="text/html")

    routes = [
        Route("/", index),
        Route("/api/state", handler(state)),
        Route("/api/labels", handler(labels)),
        Route("/api/image/{image_id}/{kind:str}.png", handler(image_png)),
        Route("/api/predict", handler(predict)),
        Route("/api/cam", handler(cam)),
        Route("/api/cam.{ext:str}", handler(cam_download)),
        Route("/api/channels", handler(channels)),
        Route("/api/features", post(features), methods=["POST"]),
        Route("/api/occlusion", post(occlusion), methods=["POST"]),
        Route("/api/jobs/{job_id}", handler(job)),
        Route("/api/jobs/{job_id}/cancel", handler(cancel), methods=["POST"]),
        Route("/api/upload", upload, methods=["POST"]),
        Route("/api/metrics", handler(metrics)),
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
    ]
    app = Starlette(routes=routes, exception_handlers={HTTPException: _http_error, Exception: _internal_error})
    return LocalOnly(app, allowed)


class TooLarge(ValueError):
    """A request body over its limit (413)."""


async def _body(request: Request, limit: int, message: str) -> bytes:
    """The request body, read only up to ``limit`` bytes (a larger one is refused, not buffered)."""
    too_large = TooLarge(message.format(f"{limit / 2**20:.0f} MB"))
    size = request.headers.get("content-length")
    if size and size.isdigit() and int(size) > limit:
        raise too_large
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise too_large
    return bytes(body)


def _json_object(body: bytes) -> dict[str, Any]:
    """A JSON object from ``body``, nested at most :data:`MAX_JSON_DEPTH` deep (ValueError if not)."""
    from ..runfolder import parse_json

    try:
        data = parse_json(body, "the request body")
    except ValueError as e:
        raise ValueError(str(e).replace("JSON nested", "nested")) from None
    if not isinstance(data, dict):
        raise ValueError("the request body must be a JSON object")
    return data


async def _http_error(request: Request, exc: Exception) -> Response:
    status = getattr(exc, "status_code", 500)
    return _error(str(getattr(exc, "detail", "")) or "error", status)


async def _internal_error(request: Request, exc: Exception) -> Response:
    log.error("internal error: %s: %s", type(exc).__name__, _first_line(exc))
    return _error(f"internal error: {type(exc).__name__}: {_first_line(exc)}", 500)


