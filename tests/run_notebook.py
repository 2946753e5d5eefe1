"""Execute a notebook in a real Jupyter kernel (nbclient + ipykernel), render it, screenshot it.

The kernel is this interpreter (``sys.executable -m ipykernel_launcher``) through a private kernel
spec and IPython profile, so a ``python3`` kernel spec or a startup file elsewhere on the machine
is never picked up; it imports the checkout's ``src`` (put first on ``PYTHONPATH``, the same code
an editable install points at) and runs with ``OMP_NUM_THREADS=1``. Used by ``tests/test_notebook.py`` and to make
``docs/images/notebook.png``::

    python tests/run_notebook.py docs/tour.ipynb --html tour.html --png docs/images/notebook.png
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import nbformat
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import KernelManager
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parent.parent
KERNEL = "convlens-test"


def kernel_env() -> dict[str, str]:
    """Variables the kernel adds to this process's environment: the checkout's src first on the
    path, one OpenMP thread that sleeps when idle (the build machines' cores are shared)."""
    path = os.pathsep.join(p for p in (str(ROOT / "src"), os.environ.get("PYTHONPATH", "")) if p)
    return {"PYTHONPATH": path, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}


def execute(nb: nbformat.NotebookNode, *, cwd: str | os.PathLike[str], timeout: int = 300) -> nbformat.NotebookNode:
    """Run every cell of ``nb`` (in place) in a fresh kernel started in ``cwd``; raises
    ``nbclient.exceptions.CellExecutionError`` on the first cell that fails. Returns ``nb``."""
    with tempfile.TemporaryDirectory(prefix="convlens-kernels-") as kdir:
        spec = {
            "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
            "display_name": "convlens (test)",
            "language": "python",
            # a private IPython profile: no startup files or config of the machine's user run in it
            "env": {**kernel_env(), "IPYTHONDIR": str(Path(kdir) / "ipython")},
        }
        (Path(kdir) / KERNEL).mkdir()
        (Path(kdir) / KERNEL / "kernel.json").write_text(json.dumps(spec))
        ksm = KernelSpecManager(kernel_dirs=[kdir], ensure_native_kernel=False)
        km = KernelManager(kernel_name=KERNEL, kernel_spec_manager=ksm, connection_file=str(Path(kdir) / "conn.json"))
        client = NotebookClient(nb, km=km, timeout=timeout, resources={"metadata": {"path": str(cwd)}})
        client.execute()
    return nb


def to_html(nb: nbformat.NotebookNode) -> str:
    """The executed notebook as one HTML page (nbconvert's lab template, no MathJax: the page
    must not reach the network)."""
    from nbconvert import HTMLExporter

    exporter = HTMLExporter(template_name="lab")
    exporter.mathjax_url = ""
    html, _ = exporter.from_notebook_node(nb)
    # the template loads require.js from a CDN for widgets; this page has none and stays offline
    return html.replace(f'<script src="{exporter.require_js_url}"></script>', "")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Execute a notebook in a fresh kernel; write HTML and a screenshot.")
    ap.add_argument("notebook")
    ap.add_argument("--html", help="write the rendered notebook here")
    ap.add_argument("--png", help="screenshot the rendered notebook here (headless Chromium)")
    ap.add_argument("--width", type=int, default=1100)
    ap.add_argument("--height", type=int, default=1400)
    ap.add_argument("--full-page", action="store_true")
    args = ap.parse_args(argv)
    path = Path(args.notebook)
    nb = nbformat.read(path, as_version=4)
    with tempfile.TemporaryDirectory(prefix="convlens-nb-") as work:
        execute(nb, cwd=work)
    html_path = Path(args.html) if args.html else Path(tempfile.mkdtemp(prefix="convlens-nb-")) / "tour.html"
    html_path.write_text(to_html(nb), encoding="utf-8")
    if args.png:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from headless import Chromium

        with Chromium() as browser:
            page = browser.load(html_path, width=args.width, height=args.height, full_page=args.full_page, settle=1.0)
        Path(args.png).write_bytes(page.screenshot)
        sys.stderr.write(f"{len(page.images)} images, layout {page.layout}, requests {page.requests}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
