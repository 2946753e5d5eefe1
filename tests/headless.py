"""A tiny headless-Chromium driver over the DevTools protocol (``--remote-debugging-pipe``).

No dependencies beyond the standard library: Chromium reads JSON commands from file descriptor
3 and writes replies and events to descriptor 4, each message ended by a NUL byte. Used by the
report tests (console errors, network requests, image decoding, layout, screenshots) and to make
``docs/images/report.png``::

    python tests/headless.py convlens-out/report.html docs/images/report.png --width 1280 --height 1500
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import select
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")

#: page-side checks, run through DevTools (not part of the report, which has no script)
IMAGES_JS = """
Promise.all(Array.from(document.images).map(img =>
  img.decode().then(() => [img.naturalWidth, img.naturalHeight, img.currentSrc.slice(0, 22)],
                    () => [0, 0, img.currentSrc.slice(0, 22)])))
"""
LAYOUT_JS = """({scrollWidth: document.documentElement.scrollWidth, innerWidth: window.innerWidth,
  scrollHeight: document.documentElement.scrollHeight, scripts: document.scripts.length,
  text: document.body ? document.body.innerText.length : 0})"""


def find_chromium() -> str | None:
    """The path of a Chromium or Chrome executable, or None."""
    for name in CHROMIUM_NAMES:
        path = shutil.which(name)
        if path:
            return path
    return None


@dataclass
class PageResult:
    """What loading one page showed."""

    url: str
    console_errors: list[str] = field(default_factory=list)
    requests: list[str] = field(default_factory=list)  # every URL other than the page and data: URIs
    images: list[list[Any]] = field(default_factory=list)  # [naturalWidth, naturalHeight, src prefix]
    layout: dict[str, Any] = field(default_factory=dict)
    screenshot: bytes = b""


class Chromium:
    """One headless browser; ``load(path)`` opens a page and reports on it. Use as a context."""

    def __init__(self, executable: str | None = None, timeout: float = 60.0) -> None:
        exe = executable or find_chromium()
        if exe is None:
            raise FileNotFoundError("no chromium executable on PATH")
        self.timeout = timeout
        self._profile = tempfile.mkdtemp(prefix="convlens-chromium-")
        to_child_r, self._to_child = os.pipe()
        self._from_child, from_child_w = os.pipe()

        def wire() -> None:  # in the child: the protocol pipes become fds 3 and 4
            # copy first: a pipe may itself sit on fd 3 or 4, and dup2 onto itself keeps close-on-exec
            r, w = os.dup(to_child_r), os.dup(from_child_w)
            os.dup2(r, 3)
            os.dup2(w, 4)

        self.proc = subprocess.Popen(
            [
                exe, "--headless", "--no-sandbox", "--disable-gpu", "--remote-debugging-pipe",
                f"--user-data-dir={self._profile}", "--no-first-run", "--no-default-browser-check",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--disable-extensions", "--disable-default-apps", "--mute-audio", "--hide-scrollbars",
                "--disable-dev-shm-usage", "about:blank",
            ],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            preexec_fn=wire, close_fds=False,  # close_fds would close 3 and 4 after wire() ran
        )
        os.close(to_child_r)
        os.close(from_child_w)
        self._buf = b""
        self._id = 0
        self._events: list[dict[str, Any]] = []
        target = self.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        self.session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Page", "Runtime", "Log", "Network"):
            self.send(f"{domain}.enable", session=True)

    # -- protocol ------------------------------------------------------------------------
    def _read(self, deadline: float) -> dict[str, Any]:
        while b"\0" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("chromium did not answer in time")
            ready, _, _ = select.select([self._from_child], [], [], left)
            if ready:
                chunk = os.read(self._from_child, 1 << 20)
                if not chunk:
                    raise RuntimeError("chromium closed the DevTools pipe")
                self._buf += chunk
        raw, self._buf = self._buf.split(b"\0", 1)
        return json.loads(raw)

    def send(self, method: str, params: dict[str, Any] | None = None, *, session: bool = False) -> dict[str, Any]:
        self._id += 1
        msg: dict[str, Any] = {"id": self._id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = self.session
        os.write(self._to_child, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + self.timeout
        while True:
            reply = self._read(deadline)
            if reply.get("id") == self._id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self._events.append(reply)

    def wait_for(self, method: str) -> dict[str, Any]:
        deadline = time.monotonic() + self.timeout
        for i, ev in enumerate(self._events):
            if ev.get("method") == method:
                return self._events.pop(i)
        while True:
            ev = self._read(deadline)
            if ev.get("method") == method:
                return ev
            self._events.append(ev)

    def evaluate(self, expression: str) -> Any:
        r = self.send("Runtime.evaluate", {"expression": expression, "awaitPromise": True, "returnByValue": True},
                      session=True)
        if "exceptionDetails" in r:
            raise RuntimeError(f"evaluation failed: {r['exceptionDetails'].get('text')}")
        return r["result"].get("value")

    # -- the checks ------------------------------------------------------------------------
    def load(self, path: str | os.PathLike[str], *, width: int = 1280, height: int = 900, mobile: bool = False,
             full_page: bool = False, settle: float = 0.3) -> PageResult:
        """Open ``path`` at a viewport of ``width`` x ``height`` and collect what happened."""
        url = Path(path).resolve().as_uri()
        self._events.clear()
        self.send("Emulation.setDeviceMetricsOverride",
                  {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": mobile}, session=True)
        self.send("Page.navigate", {"url": url}, session=True)
        self.wait_for("Page.loadEventFired")
        result = PageResult(url=url)
        result.images = self.evaluate(IMAGES_JS) or []
        time.sleep(settle)  # late console messages (CSP reports) arrive asynchronously
        result.layout = self.evaluate(LAYOUT_JS) or {}
        params: dict[str, Any] = {"format": "png"}
        if full_page:
            h = int(result.layout.get("scrollHeight", height))
            params.update(captureBeyondViewport=True, clip={"x": 0, "y": 0, "width": width, "height": h, "scale": 1})
        result.screenshot = base64.b64decode(self.send("Page.captureScreenshot", params, session=True)["data"])
        for ev in self._events:
            m, p = ev.get("method"), ev.get("params", {})
            if m == "Network.requestWillBeSent":
                u = p.get("request", {}).get("url", "")
                if u != url and not u.startswith("data:"):
                    result.requests.append(u)
            elif m == "Runtime.exceptionThrown":
                result.console_errors.append(str(p.get("exceptionDetails", {}).get("text")))
            elif m == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert", "warning"):
                result.console_errors.append(" ".join(str(a.get("value", a.get("description"))) for a in p["args"]))
            elif m == "Log.entryAdded" and p.get("entry", {}).get("level") in ("error", "warning"):
                result.console_errors.append(p["entry"].get("text", ""))
        return result

    def close(self) -> None:
        try:
            self.send("Browser.close")
        except Exception:  # noqa: BLE001 -- it may already be gone
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        for fd in (self._to_child, self._from_child):
            try:
                os.close(fd)
            except OSError:
                pass
        shutil.rmtree(self._profile, ignore_errors=True)

    def __enter__(self) -> Chromium:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Screenshot an HTML file with headless Chromium.")
    ap.add_argument("html")
    ap.add_argument("png")
    ap.add_argument("--width", type=int, default=1280)
    ap.add_argument("--height", type=int, default=1500)
    ap.add_argument("--full-page", action="store_true")
    args = ap.parse_args(argv)
    with Chromium() as browser:
        page = browser.load(args.html, width=args.width, height=args.height, full_page=args.full_page)
    Path(args.png).parent.mkdir(parents=True, exist_ok=True)
    Path(args.png).write_bytes(page.screenshot)
    problems = page.console_errors + [f"request: {u}" for u in page.requests]
    for p in problems:
        sys.stderr.write(f"{p}\n")
    sys.stderr.write(f"{len(page.images)} images, layout {page.layout}\n")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
