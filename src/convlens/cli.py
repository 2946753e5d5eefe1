"""The ``convlens`` command: parses arguments, calls the API, prints and writes files.

Every subcommand is a ``(add_arguments, run)`` pair registered in :data:`COMMANDS`. Bad input
(``ValueError``/``OSError`` from the API) ends with a one-line message and exit code 2; a
traceback only with ``--debug``.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

__all__ = ["main"]

log = logging.getLogger("convlens")

EXIT_USAGE = 2


def _version() -> str:
    from . import __version__

    return __version__


# -- shared options -----------------------------------------------------------------------
def add_model_args(p: argparse.ArgumentParser) -> None:
    """--model, --weights and --device, shared by every command that loads a model."""
    g = p.add_argument_group("model")
    g.add_argument(
        "--model", "-m", default=None, metavar="NAME",
        help="torchvision name (resnet50, vgg16, ...) or timm:NAME; default: the bundled "
        "EfficientNet-Lite0 with ImageNet weights (offline)",
    )
    g.add_argument("--weights", "-w", default=None, metavar="FILE", help="local .pth/.pt/.safetensors state dict")
    g.add_argument("--device", default="auto", metavar="D", help="auto (default), cpu, cuda or cuda:N")


def load_classifier(args: argparse.Namespace):
    """The classifier named by the shared model options."""
    from .models import load_model

    return load_model(args.model, weights=args.weights, device=args.device)


def image_list(images: Sequence[str]) -> list[str | Path]:
    """The images named on the command line, or the bundled sample when none is."""
    from .images import sample_image_path

    return list(images) if images else [sample_image_path()]


# -- predict ------------------------------------------------------------------------------
def _add_predict(p: argparse.ArgumentParser) -> None:
    p.add_argument("images", nargs="*", metavar="IMAGE", help="image files (default: the bundled sample photo)")
    add_model_args(p)
    p.add_argument("--top", "-k", type=int, default=5, metavar="K", help="how many classes to show (default 5)")


def _run_predict(args: argparse.Namespace) -> int:
    if args.top < 1:
        raise ValueError("--top must be at least 1")
    clf = load_classifier(args)
    for path in image_list(args.images):
        preds = clf.predict(clf.preprocess(path), top=args.top)[0]
        print(f"{Path(path).name}  ({clf.name})")
        for rank, p in enumerate(preds, 1):
            print(f"  {rank}. {p.label:<32} {p.probability:7.2%}  [{p.index}]")
    return 0


# -- layers -------------------------------------------------------------------------------
def _add_layers(p: argparse.ArgumentParser) -> None:
    add_model_args(p)
    p.add_argument("--filter", "-f", default=None, metavar="PATTERN", help="only names matching a glob, e.g. 'layer4*'")


def _run_layers(args: argparse.Namespace) -> int:
    import fnmatch

    from .layers import default_cam_layer, layer_table

    clf = load_classifier(args)
    x = clf.preprocess(_blank(clf))
    table = layer_table(clf.model, x)
    auto = default_cam_layer(clf.model, x, table)
    rows = [r for r in table if args.filter is None or fnmatch.fnmatchcase(r.name, args.filter)]
    if not rows:
        raise ValueError(f"no layer matches {args.filter!r}")
    width = max(len(r.name) for r in rows)
    print(f"{'name':<{width}}  {'type':<22} {'output shape':<22} {'params':>10}")
    for r in rows:
        shape = "x".join(map(str, r.shape[1:])) if r.shape else "-"
        mark = "  <- Grad-CAM default" if r.name == auto else ""
        print(f"{r.name:<{width}}  {r.type:<22} {shape:<22} {r.params:>10,}{mark}")
    print(f"\ninput {tuple(x.shape)}; automatic Grad-CAM layer: {auto}")
    return 0


def _blank(clf):
    from PIL import Image

    side = clf.size or 224
    return Image.new("RGB", (side, side), (128, 128, 128))


# -- explain ------------------------------------------------------------------------------
def _add_explain(p: argparse.ArgumentParser) -> None:
    from .explain import METHODS

    p.add_argument(
        "images", nargs="*", metavar="IMAGE|DIR",
        help="image files or folders of images (default: the bundled sample photo)",
    )
    add_model_args(p)
    p.add_argument("--target", "-t", default=None, metavar="T", help="class index or name to explain (default: top-1)")
    p.add_argument("--layer", "-l", default=None, metavar="L", help="Grad-CAM layer (default: automatic)")
    p.add_argument(
        "--methods", default=",".join(METHODS), metavar="LIST",
        help=f"comma-separated techniques (default: {','.join(METHODS)})",
    )
    p.add_argument("--out", "-o", default="convlens-out", metavar="DIR", help="output folder (default ./convlens-out)")
    p.add_argument(
        "--fast", action="store_true", help="lighter settings: coarser occlusion, fewer and smaller feature images"
    )
    p.add_argument("--force", action="store_true", help="replace outputs of an earlier run in --out")


def _run_explain(args: argparse.Namespace) -> int:
    from .explain import METHODS, check_outputs, collect_images, explain, image_keys

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in methods if m not in METHODS]
    if bad or not methods:
        raise ValueError(f"unknown technique(s) {', '.join(bad) or '(none)'}; choose from {','.join(METHODS)}")
    sources = image_list(args.images)
    items, _ = collect_images(sources, warn=False)  # only to name the outputs; explain() warns
    if not items:
        raise ValueError("no image files to explain")
    out = Path(args.out)
    check_outputs(out, image_keys([name for name, _ in items]), force=args.force)  # before any work
    import time

    t0 = time.perf_counter()
    clf = load_classifier(args)
    load_s = time.perf_counter() - t0
    report = explain(
        sources, clf, target=args.target, methods=methods, fast=args.fast, progress=True, layer=args.layer
    )
    report.timings["load_model_s"] = load_s
    written = report.save(out, force=args.force)
    for im in report.images:
        if "image" in im.errors:
            print(f"{im.name}: FAILED: {im.errors['image']}")
            continue
        top = im.predictions[0] if im.predictions else None
        line = f"{im.name}: {top}" if top else im.name
        for tech, msg in im.errors.items():
            line += f"\n  {tech} failed: {msg}"
        print(line)
    n_bad = len(report.failed)
    print(
        f"wrote {out / 'report.html'} and {len(written) - 1} other files "
        f"({len(report.images)} images, {n_bad} with errors, {report.timings['total_s']:.1f} s)"
    )
    return 1 if n_bad else 0


COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]] = {
    "predict": ("top-k classes for images", _add_predict, _run_predict),
    "layers": ("the model's layers with output shapes", _add_layers, _run_layers),
    "explain": ("every technique on images, with an HTML report", _add_explain, _run_explain),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="convlens",
        description="See what a convolutional image classifier sees and why it decides as it does.",
        epilog="Run 'convlens COMMAND --help' for a command's options. Without a model, the bundled "
        "EfficientNet-Lite0 (ImageNet) is used; without an image, the bundled sample photo.",
    )
    parser.add_argument("--version", action="version", version=f"convlens {_version()}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    parser.add_argument("--verbose", "-v", action="store_true", help="log what convlens chooses (layers, batch sizes)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (summary, add, run) in COMMANDS.items():
        p = sub.add_parser(name, help=summary, description=summary[0].upper() + summary[1:] + ".")
        add(p)
        p.set_defaults(run=run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return EXIT_USAGE
    logging.basicConfig(
        level=logging.INFO if args.verbose or args.debug else logging.WARNING,
        format="convlens: %(message)s",
    )
    try:
        return args.run(args)
    except KeyboardInterrupt:
        print("convlens: interrupted", file=sys.stderr)
        return 130
    except (ValueError, OSError, TypeError) as e:
        if args.debug:
            raise
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"convlens: error: {msg}", file=sys.stderr)
        return EXIT_USAGE
    except Exception as e:
        if args.debug:
            raise
        print(f"convlens: internal error: {type(e).__name__}: {e} (rerun with --debug for details)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
