"""The local browser explorer: ``convlens serve`` / :func:`serve`.

A thin HTTP layer (Starlette + uvicorn, the optional extra ``convlens[serve]``) over the public
API, and a page whose every asset ships in this package. The state and caches live in
:class:`~convlens.serve.explorer.Explorer` (no HTTP there); the routes in ``app.py``.
"""

from __future__ import annotations

import contextlib
import html
import ipaddress
import logging
import socket
import threading
from collections.abc import Callable, Sequence
from typing import Any

from .._compat import MODEL, renamed

__all__ = ["serve", "Server", "MissingExtra", "require_extra", "allowed_hosts", "interface_addresses", "is_loopback"]

log = logging.getLogger(__name__)

HINT = "convlens serve needs the optional web server: pip install 'convlens[serve]'"


class MissingExtra(ImportError):
    """Starlette or uvicorn is not installed."""


def require_extra() -> None:
    """Check that the extra ``convlens[serve]`` is installed.

    Raises:
        MissingExtra: Starlette or uvicorn is missing (the message is the one-line install hint).
    """
    import importlib.util

    missing = [m for m in ("starlette", "uvicorn") if importlib.util.find_spec(m) is None]
    if missing:
        raise MissingExtra(f"{HINT} ({', '.join(missing)} not installed)")


def is_loopback(host: str) -> bool:
    """True for 127.x.x.x, ::1 (also in brackets) and ``localhost``; False for anything else,
    names included."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def allowed_hosts(host: str, allow: Sequence[str] = ()) -> set[str]:
    """The names a request's Host header may carry for a server bound to ``host``: the loopback
    names, ``host`` itself, ``allow`` (``--allow-host``: a reverse proxy's name), and for a
    wildcard address this machine's names and the addresses of its network interfaces.

    Args:
        host: the address the server binds to (``"127.0.0.1"``, ``"0.0.0.0"``, ``"::"``, a name).
        allow: more names to accept (lower-cased; a port is ignored).
    Returns:
        The allowed host names and addresses (without ports).

    Example::

        "192.168.1.20" in allowed_hosts("0.0.0.0")   # True on a machine with that address
    """
    names = {"127.0.0.1", "localhost", "::1", host.strip("[]")}
    names.update(a.strip().lower() for a in allow)
    if host in ("0.0.0.0", "::", ""):
        for name in {socket.gethostname(), socket.getfqdn()}:
            names.add(name)
            try:
                names.update(str(info[4][0]) for info in socket.getaddrinfo(name, None))
            except OSError:
                pass
        names.update(interface_addresses())
    return {n.split("%", 1)[0].lower() for n in names if n}


def interface_addresses() -> set[str]:
    """The addresses of this machine's network interfaces, from the standard library only: IPv4
    by ``SIOCGIFADDR`` per interface (Linux), IPv6 from ``/proc/net/if_inet6``, and the address
    the machine would use to reach another (a UDP socket's local address; nothing is sent)."""
    found: set[str] = set()
    with contextlib.suppress(OSError, ImportError, AttributeError):
        import fcntl
        import struct

        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            for _, name in socket.if_nameindex():
                with contextlib.suppress(OSError):
                    raw = fcntl.ioctl(s.fileno(), 0x8915, struct.pack("256s", name.encode()[:15]))  # SIOCGIFADDR
                    found.add(socket.inet_ntoa(raw[20:24]))
    with contextlib.suppress(OSError, ValueError), open("/proc/net/if_inet6", encoding="ascii") as f:
        for line in f:
            found.add(str(ipaddress.IPv6Address(bytes.fromhex(line.split()[0]))))
    for family, probe in ((socket.AF_INET, "192.0.2.1"), (socket.AF_INET6, "2001:db8::1")):
        with contextlib.suppress(OSError), socket.socket(family, socket.SOCK_DGRAM) as s:
            s.connect((probe, 9))  # picks the outgoing interface; a UDP connect sends nothing
            found.add(s.getsockname()[0])
    return found


def _in_notebook() -> bool:
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    ip = get_ipython()
    return ip is not None and "IPKernelApp" in getattr(ip, "config", {})


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host.strip("[]") else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host.strip("[]"), port))
    except OSError as e:
        sock.close()
        hint = "; pass another --port (0 picks a free one)" if port else ""
        raise OSError(f"cannot listen on {host}:{port} ({e.strerror or e}){hint}") from None
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


class Server:
    """A running (or ready) explorer: ``url``, ``explorer``, :meth:`run` (blocking),
    :meth:`start` (background thread), :meth:`stop`. In a notebook it shows itself inline.

    Example::

        srv = convlens.serve(clf, ["cat.jpg"], block=False)
        srv.url; srv.stop()

    Args:
        explorer: the :class:`~convlens.serve.explorer.Explorer` to serve.
        host: the address to listen on.
        port: the port (0: a free one).
    Raises:
        MissingExtra: the extra ``convlens[serve]`` is not installed.
        OSError: the address cannot be bound (the message suggests another port).
    """

    def __init__(self, explorer: Any, host: str = "127.0.0.1", port: int = 8000, *,
                 allow_hosts: Sequence[str] = ()) -> None:
        require_extra()
        import uvicorn

        from .app import create_app

        self.explorer = explorer
        self.host = host
        self.app = create_app(explorer, allowed_hosts(host, allow_hosts))
        self._sock = _bind(host, port)
        self.port = self._sock.getsockname()[1]
        shown = "127.0.0.1" if host in ("0.0.0.0", "") else ("localhost" if host == "::" else host)
        shown = f"[{shown}]" if ":" in shown else shown
        self.url = f"http://{shown}:{self.port}/"
        config = uvicorn.Config(self.app, log_level="warning", lifespan="off", access_log=False,
                                timeout_graceful_shutdown=2)
        self._server = uvicorn.Server(config)
        self._thread: threading.Thread | None = None

    def run(self) -> None:
        """Serve until Ctrl-C or :meth:`stop` (blocking)."""
        try:
            self._server.run(sockets=[self._sock])
        finally:
            self.explorer.close()
            self._sock.close()

    def start(self) -> Server:
        """Serve from a background thread; returns ``self`` once the server accepts requests."""
        self._thread = threading.Thread(target=self.run, name="convlens-serve", daemon=True)
        self._thread.start()
        for _ in range(500):
            if self._server.started or not self._thread.is_alive():
                break
            threading.Event().wait(0.01)
        return self

    def stop(self) -> None:
        """Stop serving and cancel running jobs."""
        self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=10)
        self.explorer.close()

    def __repr__(self) -> str:
        return f"<convlens explorer at {self.url}>"

    def _repr_html_(self) -> str:
        url = html.escape(self.url, quote=True)
        return (f'<iframe src="{url}" title="convlens explorer" width="100%" height="860" '
                f'style="border:1px solid #ccc;border-radius:4px"></iframe>'
                f'<div style="font:12px sans-serif">convlens explorer: <a href="{url}" target="_blank">{url}</a>'
                f" (<code>.stop()</code> ends it)</div>")


@renamed(classifier=MODEL)
def serve(
    model: Any = None,
    images: Any = None,
    *,
    host: str = "127.0.0.1",
    port: int | None = None,
    block: bool | None = None,
    on_ready: Callable[[Server], None] | None = None,
    allow_hosts: Sequence[str] = (),
) -> Server:
    """Explore ``model`` on ``images`` in the browser: top-k, any class's Grad-CAM family
    map, layers and their channels, feature visualisation, occlusion.

    ``model``: a :class:`~convlens.Classifier` or ``nn.Module`` (default: the bundled model);
    ``images``: paths, folders, PIL images, arrays or tensors (default: the bundled sample).
    ``host``: 127.0.0.1 unless you mean it (any other address warns: anyone on that network can
    use it). ``port``: default 8000 when blocking, a free one in the background. ``block``:
    default True, except in a notebook, where the server runs in a background thread and the
    returned :class:`Server` shows the page inline. The model is left as it came.

    Args:
        model: a :class:`~convlens.Classifier` or ``nn.Module`` (on any device; the
            explorer computes there), or None for the bundled model.
        images: one image source or folder, or a list of them; None for the sample photo.
            An image that cannot be read is listed with its error.
        host: the address to listen on.
        port: the port (0: a free one).
        block: serve in this thread until Ctrl-C (True) or in a background thread (False).
        on_ready: called with the :class:`Server` once it is bound, before serving (the CLI
            prints the URL there).
        allow_hosts: more names the Host header may carry (a reverse proxy's; ``--allow-host``).
    Returns:
        The :class:`Server` (after it stopped, when blocking; running, in the background).
    Raises:
        MissingExtra: the extra ``convlens[serve]`` is not installed (an ``ImportError``).
        OSError: the address cannot be bound.
        TypeError: ``model`` is neither a Classifier nor an ``nn.Module``.
        ModelError: the default model cannot be loaded.

    Example::

        srv = convlens.serve(convlens.load_model(), ["cat.jpg"])   # in a notebook: the page
        srv.stop()
    """
    require_extra()
    from ..models import as_classifier, load_model
    from .explorer import Explorer

    clf = load_model() if model is None else as_classifier(model)
    if images is None:
        from ..images import sample_image_path

        images = [sample_image_path()]
    elif isinstance(images, (str, bytes)) or not isinstance(images, Sequence):
        images = [images]
    block = not _in_notebook() if block is None else block
    if not is_loopback(host):
        log.warning("listening on %s: anyone who can reach this machine on that network can use the "
                    "explorer and run your model", host)
    explorer = Explorer(clf, list(images))
    server = Server(explorer, host, (8000 if block else 0) if port is None else port, allow_hosts=allow_hosts)
    if on_ready is not None:
        on_ready(server)
    elif block:
        log.warning("convlens explorer at %s (Ctrl-C stops it)", server.url)
    if block:
        server.run()
        return server
    return server.start()
