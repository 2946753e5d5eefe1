"""What the ``convlens`` commands share besides their options: text made safe for the terminal, the
version line, the evidence lines of ``gradcam`` / ``occlusion --evidence``, and the plugins
(``--plugin``, ``$CONVLENS_PLUGINS``) imported before the parser is built.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence

from .cli_args import (  # the names cli.py held before the split
    add_model_args,  # noqa: F401
    )


def printable(text: object) -> str:
    """``text`` safe for the terminal (see :func:`convlens.outputs.printable`)."""
    from .outputs import printable as _printable

    return _printable(text)


def _version() -> str:
    from ._version import __version__

    return __version__


#: random reference maps per grid in an approximate occlusion map's evidence (the minimum that has a
#: spread): its curves are the first draws of the full evidence's, the map's and the centred
#: Gaussian's are the same numbers; 2 + 4 x 30 step images instead of 2 + 6 x 30 (the default model:
#: 2/3 of the full evidence's forwards, which cost more than the approximate map)
QUICK_DRAWS = 2


def _evidence(clf, x, result) -> list[str]:
    """What a map is worth, in a few lines: its deletion and insertion AUC (the report's and
    ``convlens compare``'s definitions: 16 steps, blurred baseline, the target's probability)
    beside random maps at the map's own grid and a centred Gaussian, and its verdict in words
    (:func:`convlens.metrics.trust.trust_summary`); for a Grad-CAM-family method also whether its
    map changes with the class and the sanity check (the classifier re-initialised). An approximate
    occlusion map gets the quick evidence (:data:`QUICK_DRAWS`), said in its last line."""
    from dataclasses import replace

    from .metrics.trust import TRUST_DRAWS, model_sanity, trust_summary

    rows = list(result.settings.get("image_index", range(result.maps.shape[0])))
    cam = result.method != "occlusion"
    quick = not cam and result.settings.get("mode") == "approximate"
    lines = []
    for r, label in enumerate(result.labels):
        one = replace(result, maps=result.maps[r : r + 1], raw=result.raw[r : r + 1], target=[result.target[r]],
                      images=result.images[r : r + 1], labels=[label], settings={
                          k: v for k, v in result.settings.items() if k != "image_index"})
        xr = x[rows[r] : rows[r] + 1]
        sanity = None
        if cam:
            check = model_sanity(clf, xr, one)
            sanity = {"x": {"passed": check.passed[0], "rho": float(check.spearman[0, 0]), "stage": check.stages[0]}}
        t = trust_summary(clf, xr, {"x": one}, sanity=sanity, class_maps=["x"] if cam else [],
                          draws=QUICK_DRAWS if quick else TRUST_DRAWS)
        auc = t.auc()
        refs = ", ".join(f"{k} {v['deletion']:.3f} / {v['insertion']:.3f}" for k, v in auc.items() if k != "x")
        lines.append(f"evidence [{printable(label)}]: deletion AUC {auc['x']['deletion']:.3f}, insertion AUC "
                     f"{auc['x']['insertion']:.3f} (lower deletion, higher insertion is better; {refs})")
        v = t.verdicts["x"]
        lines.append(f"verdict: {v['level']}. " + " ".join(printable(why) for why in v["reasons"]))
        rho = t.class_rho.get("x")
        if cam and rho is not None and rho >= t.settings["class_threshold"]:
            lines.append(
                f"warning: {result.method} is not class-discriminative here: its map for {printable(label)!r} and "
                f"for {printable(t.other['x'])!r} have rank correlation {rho:.2f}; it shows where the layer is "
                "active, not why the class was chosen (`convlens compare` checks every method)"
            )
    if quick:
        lines.append(f"(quick evidence for an approximate map: the random references from {QUICK_DRAWS} draws, not "
                     f"{TRUST_DRAWS}, so the noise margin is rough; `--mode exact` gives the full evidence)")
    if not cam:
        lines.append("(occlusion's class and sanity checks: `convlens compare`)")
    return lines


#: environment variable naming plugin modules (comma-separated) that the CLI imports, as --plugin
PLUGINS_ENV = "CONVLENS_PLUGINS"


def load_plugins(argv: Sequence[str] | None) -> list[str]:
    """Import the modules named by ``--plugin MODULE`` in ``argv`` and by ``$CONVLENS_PLUGINS``
    before the parser is built, so the CAM methods they register are valid ``--method`` choices.
    Returns the module names; ValueError names a module that cannot be imported."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--plugin", action="append", default=[])
    known, _ = pre.parse_known_args(sys.argv[1:] if argv is None else list(argv))
    names = [n.strip() for n in os.environ.get(PLUGINS_ENV, "").split(",") if n.strip()] + known.plugin
    for name in dict.fromkeys(names):
        try:
            importlib.import_module(name)
        except Exception as e:  # a plugin that fails is bad input: say which and why, in one line
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise ValueError(f"plugin {name!r} could not be imported: {first}") from e
    return names
