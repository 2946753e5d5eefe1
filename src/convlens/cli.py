"""The ``convlens`` command: parses arguments, calls the API, prints and writes files.

Every subcommand is a ``(add_arguments, run)`` pair registered in :data:`COMMANDS`. Bad input
(``ValueError``/``OSError`` from the API) ends with a one-line message and exit code 2; a
traceback only with ``--debug``.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from .cli_args import (  # the names cli.py held before the split
    _add_activations,
    _add_compare,
    _add_explain,
    _add_filters,
    _add_gradcam,
    _add_layers,
    _add_occlusion,
    _add_predict,
    _add_report,
    _add_serve,
    add_model_args,  # noqa: F401
    deprecated,
)
from .cli_support import (
    PLUGINS_ENV,
    _evidence,
    _version,
    load_plugins,
    printable,
)

__all__ = ["main"]


EXIT_USAGE = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report it (143 for SIGTERM)
EXIT_PIPE = 141  # 128 + SIGPIPE: the reader of stdout went away
MAX_TOP = 50  # gradcam --top: one figure per class


def load_classifier(args: argparse.Namespace):
    """The classifier named by the shared model options. With ``--labels`` one forward of a blank
    image checks that they name every output, and a ``--target`` is checked against the names:
    a mismatch is a usage error before any image is done."""
    from .models import load_model

    if args.num_classes is not None and args.num_classes < 1:
        raise ValueError("--num-classes must be at least 1")
    clf = load_model(args.model, weights=args.weights, device=args.device, labels=args.labels,
                     num_classes=args.num_classes, multi_label=args.multi_label)
    if args.labels is not None:
        clf.outputs(clf.preprocess(_blank(clf)))  # raises: N outputs but M labels
    targets = getattr(args, "target", None)
    for t in [targets] if isinstance(targets, str) else targets or []:
        clf.class_index(t)
    return clf


def image_list(images: Sequence[str]) -> list[str | Path]:
    """The images named on the command line, or the bundled sample when none is."""
    from .images import sample_image_path

    return list(images) if images else [sample_image_path()]


def image_files(images: Sequence[str]) -> list[str | Path]:
    """:func:`image_list` with each folder replaced by its image files (sorted, not recursive; what
    is skipped is logged, as for ``explain``): predict, activations, gradcam and occlusion."""
    from .inputs import collect_images

    out: list[str | Path] = []
    for src in image_list(images):
        if not Path(src).is_dir():
            out.append(src)
            continue
        found = [path for _, path in collect_images([src])[0]]
        if not found:
            raise ValueError(f"{printable(src)}: the folder holds no image files")
        out += found
    return out


def _existing_images(args: argparse.Namespace) -> list[str | Path]:
    """The per-image commands' images (:func:`image_files`); a missing one is a usage error, before any work."""
    paths = image_files(args.images)
    for path in paths:
        if not Path(path).exists():
            raise ValueError(f"{path}: no such file")
    return paths


def _exit_for(failed: int, total: int) -> int:
    """The per-image commands' last line and exit code: 1 when any image failed (each was listed)."""
    if failed:
        print(f"{failed} of {total} images failed")
    return 1 if failed else 0


def _run_predict(args: argparse.Namespace) -> int:
    if args.top < 1:
        raise ValueError("--top must be at least 1")
    from .checks import NonFiniteError
    from .images import ImageError

    paths = _existing_images(args)
    clf = load_classifier(args)
    kind = ", multi-label: independent sigmoids" if clf.multi_label else ""
    failed = 0
    for path in paths:
        name = printable(Path(path).name)
        try:
            preds = clf.predict(clf.preprocess(path), top=args.top)[0]
        except (ImageError, NonFiniteError) as e:  # an unreadable image fails alone, as in _per_image
            print(f"{name}: FAILED: {printable(e)}")
            failed += 1
            continue
        print(f"{name}  ({clf.name}{kind})")
        for rank, p in enumerate(preds, 1):
            print(f"  {rank}. {printable(p.label):<32} {p.probability:7.2%}  [{p.index}]")
    return _exit_for(failed, len(paths))


def _run_layers(args: argparse.Namespace) -> int:
    import fnmatch

    from .layers import cam_layer_reason, default_cam_layer, layer_table

    clf = load_classifier(args)
    x = clf.preprocess(_blank(clf))
    table = layer_table(clf.model, x)
    auto = default_cam_layer(clf.model, x, table)
    rows = [r for r in table if args.filter is None or fnmatch.fnmatchcase(r.name, args.filter)]
    if not rows:
        raise ValueError(f"no layer matches {args.filter!r}")
    width = max(len(r.name) for r in rows)
    print(f"{'name':<{width}}  {'type':<22} {'output shape':<22} {'layout':<15} {'params':>10} {'calls':>5}")
    for r in rows:
        shape = "x".join(map(str, r.shape[1:])) if r.shape else "-"
        mark = "  <- Grad-CAM default" if r.name == auto else ""
        layout = r.layout or "-"
        print(f"{r.name:<{width}}  {r.type:<22} {shape:<22} {layout:<15} {r.params:>10,} {r.calls:>5}{mark}")
    why = cam_layer_reason(clf.model, auto)
    print(f"\ninput {tuple(x.shape)}; automatic Grad-CAM layer: {auto}" + (f" ({why})" if why else ""))
    if any(r.layout == "?" for r in rows):
        print("layout ?: convlens cannot tell how that output lies on the image; give layout= or reshape= to use it")
    if any(r.calls > 1 for r in rows):
        print("a module that runs several times: its name means its last call (shape shown), NAME#k its k-th")
    return 0


def _blank(clf):
    from PIL import Image

    h, w = clf.target_size(224, 224)
    return Image.new("RGB", (w, h), (128, 128, 128))


def run_settings(args: argparse.Namespace) -> dict:
    """The command's options as the manifest records them (inputs, --out and --force aside)."""
    skip = ("run", "images", "out", "force", "debug", "verbose", "details")
    return {k: v for k, v in vars(args).items() if k not in skip}


def _per_image(
    args: argparse.Namespace, command: str, compute: Callable, files: Callable, show: Callable, prepare=None
) -> int:
    """The shared loop of activations/gradcam/occlusion: check --out (before any work), load the
    model, then per image read it once (``compute(clf, x)`` and the evidence get the model-ready
    tensor), compute, stage its files and move its folder into place. An image that cannot be read
    or gives NaN/inf fails alone (exit 1)."""
    from .checks import NonFiniteError
    from .images import ImageError
    from .outputs import RunWriter, image_keys

    paths = _existing_images(args)
    keys = image_keys([Path(p).name for p in paths], paths)
    run = RunWriter(args.out, command, keys=keys, inputs=paths, force=args.force, settings=run_settings(args))
    clf = load_classifier(args)
    if prepare is not None:
        prepare(clf)
    failed = 0
    with run:
        for path, key in zip(paths, keys):
            name = printable(Path(path).name)
            try:
                x = clf.preprocess(path)  # read once: the map and its evidence share it
                result = compute(clf, x)
            except (ImageError, NonFiniteError) as e:
                print(f"{name}: FAILED: {printable(e)}")
                run.commit_image(key, name=Path(path).name, source=path, ok=False)
                failed += 1
                continue
            for p, w in files(result):
                run.write(key, p.name, w)
            written = run.commit_image(key, name=Path(path).name, source=path)
            show(clf, name, result, [run.root / f for f in written])
            if getattr(args, "evidence", False):
                for line in _evidence(clf, x, result):
                    print(f"  {line}")
        run.finish()
    return _exit_for(failed, len(paths))


def _run_activations(args: argparse.Namespace) -> int:
    from .methods.activations import activations
    from .outputs import activations_files

    if args.per_layer < 1:
        raise ValueError("--per-layer must be at least 1")
    channels: str | list[int] = args.pick if args.channels is None else args.channels
    if channels in ("top", "first"):  # the old --channels top|first
        if args.channels is not None:
            deprecated(f"--channels {channels}", f"--pick {channels}")
    else:
        try:
            channels = [int(c) for c in args.channels.split(",") if c.strip()]
        except ValueError:
            raise ValueError(f"--channels takes channel indices like 0,5,9, not {args.channels!r}") from None
        if not channels or min(channels) < 0:
            raise ValueError(f"--channels takes non-negative indices, not {args.channels!r}")
    layers = "stages" if args.layers == ["stages"] else args.layers

    def compute(clf, x):
        result = activations(clf, x, layers)
        if isinstance(channels, list):  # known only now: checked before anything is written
            for name, m in result.maps.items():
                if max(channels) >= m.shape[1]:
                    raise ValueError(f"--channels {max(channels)} is out of range: {name} has {m.shape[1]} channels")
        return result

    def show(clf, name, result, written):
        print(f"{name}  ({clf.name})")
        for layer, m in result.maps.items():
            print(f"  {layer:<24} {'x'.join(map(str, m.shape[1:]))}")
        print(f"  wrote {len(written)} files to {printable(written[0].parent)}")

    def files(result):
        return activations_files(result, "", channels=channels, k=args.per_layer)

    def prepare(clf):  # an unknown layer is a usage error before any image is read
        if layers != "stages":
            from .layers import resolve_layers

            resolve_layers(clf.model, layers)

    return _per_image(args, "activations", compute, files, show, prepare=prepare)


def _run_gradcam(args: argparse.Namespace) -> int:
    from .methods.cam import grad_cam
    from .outputs import saliency_files

    if args.target and args.top:
        raise ValueError("give either --target or --top, not both")
    if args.top is not None and not 1 <= args.top <= MAX_TOP:
        raise ValueError(f"--top must be from 1 to {MAX_TOP} (each class writes a figure), not {args.top}")
    if not 0.0 <= args.alpha <= 1.0:
        raise ValueError("--alpha must be between 0 and 1")
    target = None if not args.target else [args.target]
    stem = args.method.replace("+", "p")

    def prepare(clf):  # an unknown layer is a usage error before any image is done (a class: load_classifier)
        if args.layer is not None:
            from .layers import resolve_layer

            resolve_layer(clf.model, args.layer)

    def compute(clf, x):
        return grad_cam(clf, x, target=target, layer=args.layer, method=args.method, top=args.top)

    def show(clf, name, result, written):
        print(f"{name}  ({clf.name}, {args.method} at {result.layer})")
        for i, (idx, label) in enumerate(zip(result.target, result.labels)):
            print(f"  {printable(label)} [{idx}] -> {printable(written[2 * i])}, {printable(written[2 * i + 1].name)}")

    return _per_image(
        args, "gradcam", compute, lambda r: saliency_files(r, stem, alpha=args.alpha), show, prepare=prepare
    )


def _run_occlusion(args: argparse.Namespace) -> int:
    from .methods.occlusion import occlusion
    from .outputs import saliency_files

    if args.batch_size is not None and args.batch_size < 1:
        raise ValueError("--batch-size must be at least 1")

    def compute(clf, x):
        return occlusion(
            clf, x, target=args.target, patch=args.patch, stride=args.stride,
            baseline=args.baseline, blur_sigma=args.blur_sigma, score=args.score, batch_size=args.batch_size,
            progress=not args.no_progress and sys.stderr.isatty(), mode=args.mode, refine=args.refine,
        )

    def show(clf, name, res, written):
        ny, nx = res.settings["windows"]
        print(f"{name}: {printable(res.labels[0])} [{res.target[0]}], {ny * nx} windows, "
              f"max drop {float(res.raw.max()):.4f}, {res.settings['mode']}"
              f"{', refined' if res.settings['refine'] else ''}, work {res.settings['work']:.0%} of full forwards")
        for w in written:
            print(f"  wrote {printable(w)}")

    return _per_image(args, "occlusion", compute, lambda r: saliency_files(r, "occlusion"), show)


def _run_filters(args: argparse.Namespace) -> int:
    from .methods.featureviz import feature_visualization

    if args.objective != "class" and not args.layer:
        raise ValueError("--layer is required (see `convlens layers`)")
    items = [c.strip() for c in args.channels.split(",") if c.strip()]
    if not items:
        raise ValueError("--channels is empty")
    if args.objective != "class":
        if not all(c.isdigit() for c in items):
            raise ValueError(f"--channels takes non-negative integers, not {args.channels!r}")
        units: list = [int(c) for c in items]
    else:
        units = [int(c) if c.isdigit() else c for c in items]
    for name in ("steps", "size"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise ValueError(f"--{name} must be at least 1")
    from .methods.featureviz import MAX_SIZE
    from .outputs import RunWriter, feature_files, safe_key

    if args.size is not None and not 16 <= args.size <= MAX_SIZE:
        raise ValueError(f"--size must be from 16 to {MAX_SIZE} pixels, not {args.size}")
    key = safe_key(args.layer if args.objective != "class" else "class")[0]
    run = RunWriter(args.out, "filters", keys=[key], force=args.force, settings=run_settings(args))  # before work
    clf = load_classifier(args)
    options = {k: getattr(args, k) for k in ("steps", "size", "lr") if getattr(args, k) is not None}
    res = feature_visualization(
        clf, args.layer, len(units) if args.objective == "layer" else units, objective=args.objective,
        param=args.param, transforms=() if args.no_transforms else "standard", diversity=args.diversity,
        seed=args.seed, progress=sys.stderr.isatty(), cache=not args.no_cache, **options,
    )
    with run:
        for p, w in feature_files(res, key):
            run.write(key, p.name, w)
        paths = [run.root / f for f in run.commit_image(key, name=key)]
        run.finish()
    by_name = {p.name: p for p in paths}
    for i, label in enumerate(res.labels):
        dead = "  (dead unit)" if res.dead[i] else ""
        png = next(p for n, p in by_name.items() if n.startswith(f"{key}_{i}_"))
        print(f"{printable(label):<28} {res.kind} = {float(res.objective[i]):9.4g}  -> {printable(png)}{dead}")
    print(f"grid: {printable(by_name[key + '_grid.png'])}   arrays: {printable(by_name[key + '.npy'])}")
    return 0


def _run_explain(args: argparse.Namespace) -> int:
    from types import SimpleNamespace

    from .checks import choose
    from .explain import METHODS, ExplainError, explain, plan, run_writer, settings_tier, shard_folder

    methods = choose(args.techniques, METHODS, "technique")
    if args.resume and args.force:
        raise ValueError("--resume keeps an earlier run and --force replaces it: choose one")
    sources = image_list(args.images)
    missing = [str(s) for s in sources if not Path(s).exists()]
    if missing:  # a typo on the command line is a usage error, not a failed image in a report
        raise ValueError(f"{missing[0]}: no such file or folder")
    try:
        planned, _ = plan(sources, args.shard, warn=False)  # only to name the outputs; explain() warns
    except ExplainError as e:
        if args.shard is not None and "holds no image" in str(e):  # more shards than images: nothing to do
            print(f"shard {args.shard[0]}/{args.shard[1]}: {e}; nothing to do")
            return 0
        raise
    run = run_writer(  # checked before any work
        shard_folder(args.out, args.shard), [SimpleNamespace(key=k, path=s) for _, s, k in planned],
        force=args.force, resume=args.resume, settings=run_settings(args),
    )
    import time

    tier = settings_tier(len(planned), fast=args.fast, full=args.full, shard=args.shard)
    print(f"settings: {tier['name']}. {tier['said']}" + (
        "" if tier["name"] == "full" else f" Full settings: {tier['command']}"), flush=True)
    t0 = time.perf_counter()
    clf = load_classifier(args)
    load_s = time.perf_counter() - t0
    report = explain(
        sources, clf, target=args.target, techniques=methods, fast=args.fast, progress=True, layer=args.layer,
        cache=not args.no_cache, shard=args.shard, out=run, full=args.full,  # each image lands as soon as it is done
    )
    report.timings["load_model_s"] = load_s
    for im in report.images:
        if "image" in im.errors:
            print(f"{im.name}: FAILED: {im.errors['image']}")
            continue
        top = im.predictions[0] if im.predictions else None
        line = f"{im.name}: {printable(top)}" if top else im.name
        for tech, msg in im.errors.items():
            line += f"\n  {tech} failed: {msg}"
        print(line)
    for s in report.skipped:
        print(f"skipped {s['path']}: {s['reason']}")
    n_bad = len(report.failed)
    n_files = sum(len(f) for f in report._files.values())
    kept = sum(im.reused for im in report.images)
    again = f", {kept} kept from the earlier run" if args.resume else ""
    print(
        f"wrote {printable(run.root / 'report.html')}, summary.json, summary.csv and {n_files} other files "
        f"({len(report.images)} image{'' if len(report.images) == 1 else 's'}{again}, {n_bad} with errors, "
        f"{len(report.skipped)} skipped, "
        f"{report.timings['total_s']:.1f} s)"
    )
    return 1 if n_bad else 0


# -- compare ------------------------------------------------------------------------------
COMPARE_FILES = ("compare.csv", "compare.json", "compare.png", "compare.html")


def _run_compare(args: argparse.Namespace) -> int:
    from .checks import choose
    from .explain import collect_images
    from .images import ImageError, load_image
    from .methods.registry import map_methods
    from .metrics.compare import compare, merge

    methods = list(choose(args.methods, map_methods(), "method"))
    if args.steps < 1:
        raise ValueError("--steps must be at least 1")
    sources = image_list(args.images)
    missing = [str(s) for s in sources if not Path(s).exists()]
    if missing:
        raise ValueError(f"{missing[0]}: no such file or folder")
    items, _ = collect_images(sources)
    if not items:
        raise ValueError("no image files to compare")
    from .outputs import RunWriter

    run = RunWriter(args.out, "compare", files=COMPARE_FILES, force=args.force, settings=run_settings(args),
                    inputs=[s for _, s in items])  # refused before any work
    import time

    t0 = time.perf_counter()
    clf = load_classifier(args)
    parts, failed = [], 0
    for i, (name, src) in enumerate(items, 1):
        try:
            x = clf.preprocess(load_image(src))
        except (ImageError, OSError, ValueError) as e:
            print(f"{printable(name)}: skipped: {printable(e)}", file=sys.stderr)
            failed += 1
            continue
        if len(items) > 1:
            print(f"[{i}/{len(items)}] {printable(name)}", file=sys.stderr, flush=True)
        parts.append(compare(clf, x, methods, target=args.target, steps=args.steps, baseline=args.baseline,
                             blur_sigma=args.blur_sigma, sanity=not args.no_sanity, names=[name]))
    if not parts:
        raise ValueError("none of the images could be read")
    result = merge(parts)
    with run:  # staged, then moved into place together (an earlier comparison replaced as a whole)
        written = [run.root / run.add(None, p.name) for p in result.save(run.folder())]
        run.finish()
    print(f"{clf.name}: {len(parts)} image{'s' if len(parts) != 1 else ''}, target "
          f"{', '.join(dict.fromkeys(result.labels))}\n")
    print(result.format_table(verbose=args.details or args.verbose))
    print(f"\nwrote {', '.join(printable(p) for p in written)} ({time.perf_counter() - t0:.1f} s)")
    errors = any(r.error for r in result.rows)
    return 1 if failed or errors else 0


def _run_serve(args: argparse.Namespace) -> int:
    from .serve import MissingExtra, is_loopback, require_extra

    try:
        require_extra()  # before loading a model: the one-line install hint
    except MissingExtra as e:
        print(f"convlens: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    if not 0 <= args.port <= 65535:
        raise ValueError("--port must be between 0 and 65535")
    missing = [s for s in args.images if not Path(s).exists()]
    if missing:
        raise ValueError(f"{missing[0]}: no such file or folder")
    from .serve import Server
    from .serve.explorer import Explorer

    if not is_loopback(args.host):
        print(f"convlens serve: warning: listening on {args.host}: anyone who can reach this machine on that "
              "network can use the explorer and run your model", file=sys.stderr)
    explorer = Explorer(load_classifier(args), image_list(args.images))
    bad = [e for e in explorer.images() if e.error]
    for e in bad:
        print(f"convlens serve: {e.name}: {e.error}", file=sys.stderr)
    if len(bad) == len(explorer.images()):
        raise ValueError("none of the images could be read")
    server = Server(explorer, args.host, args.port, allow_hosts=args.allow_host)
    n = len(explorer.images())
    print(f"convlens explorer: {server.url}  ({n} image{'' if n == 1 else 's'}, {explorer.clf.name}; Ctrl-C stops)",
          flush=True)
    import signal

    # Ctrl-C is how a server is stopped, not an interrupted run: uvicorn shuts down and hands the
    # signal on, which the plain handler turns into the KeyboardInterrupt caught here (exit 0);
    # SIGTERM keeps the CLI's meaning (143)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        server.run()
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGINT, previous)
    print("convlens serve: stopped", file=sys.stderr)
    return 0


def _run_report(args: argparse.Namespace) -> int:
    from .runs import merge_runs

    for r in args.runs:
        if not Path(r).exists():
            raise ValueError(f"{printable(r)}: no such folder")
    summary = merge_runs(args.runs, args.out, force=args.force)
    n, bad = len(summary["images"]), sum(1 for im in summary["images"] if not im.get("ok"))
    print(f"merged {len(summary['merged_from'])} run(s): {n} images, {bad} with errors -> "
          f"{printable(Path(args.out) / 'report.html')}, summary.json, summary.csv")
    for r in summary["incomplete"]:
        print(f"note: {r} is not complete (interrupted or still running): only its finished images are in; "
              "finish it with --resume and merge again")
    return 1 if bad else 0


COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]] = {
    "explain": ("every technique on images, with an HTML report", _add_explain, _run_explain),
    "predict": ("top-k classes for images", _add_predict, _run_predict),
    "layers": ("the model's layers with output shapes", _add_layers, _run_layers),
    "activations": ("what each layer sees: channel maps per layer", _add_activations, _run_activations),
    "gradcam": ("Grad-CAM family heatmaps: which regions drive a class", _add_gradcam, _run_gradcam),
    "occlusion": ("occlusion sensitivity maps (PNG + .npy)", _add_occlusion, _run_occlusion),
    "filters": ("feature visualisation: images that excite chosen channels", _add_filters, _run_filters),
    "report": ("merge explain runs or shards into one report and summary (nothing recomputed)",
               _add_report, _run_report),
    "compare": ("which map to believe: faithfulness, class sensitivity and sanity of every method",
                _add_compare, _run_compare),
    "serve": ("explore a model in the browser: a local web page (needs convlens[serve])", _add_serve, _run_serve),
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
    parser.add_argument(
        "--plugin", action="append", default=[], metavar="MODULE",
        help=f"import MODULE first (repeatable; also ${PLUGINS_ENV}, comma-separated): a module that calls "
        "convlens.register_cam adds its CAM methods to --method and --methods",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (summary, add, run) in COMMANDS.items():
        p = sub.add_parser(name, help=summary, description=summary[0].upper() + summary[1:] + ".")
        add(p)
        p.set_defaults(run=run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``convlens`` command; returns the exit code (0 ok, 1 some images failed or an
    internal error, 2 bad input, 130 interrupted, 141 stdout closed)."""
    try:
        return _main(argv)
    except KeyboardInterrupt:  # also while parsing or cleaning up
        print("convlens: interrupted", file=sys.stderr)
        return 128 + interrupt_signal()


def interrupt_signal() -> int:
    """The signal that ended the run: SIGTERM when ``kill`` stopped it, else SIGINT (Ctrl-C)."""
    from .outputs import last_signal

    return last_signal()


def _main(argv: Sequence[str] | None) -> int:
    try:
        load_plugins(argv)
    except ValueError as e:
        if "--debug" in (sys.argv[1:] if argv is None else argv):
            raise
        print(f"convlens: error: {printable(str(e))}", file=sys.stderr)
        return EXIT_USAGE
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return EXIT_USAGE
    logging.basicConfig(
        level=logging.INFO if args.verbose or args.debug else logging.WARNING,
        format="convlens: %(message)s",
    )
    from .outputs import check_interrupt, interruptible

    try:
        threads = getattr(args, "threads", None)
        if threads is not None and threads < 0:
            raise ValueError("--threads must be 0 (PyTorch's default) or a positive number")
        from ._cpu import configure_threads

        configure_threads(threads)  # before any work: a busy machine gets fewer, non-spinning threads
        with interruptible():
            rc = args.run(args)
            sys.stdout.flush()  # a closed pipe shows here, not at exit
            check_interrupt()  # a Ctrl-C that some library swallowed still ends the run as interrupted
            return rc
    except KeyboardInterrupt:
        print("convlens: interrupted", file=sys.stderr)
        return 128 + interrupt_signal()
    except BrokenPipeError:  # `convlens predict | head`: the reader left; stop quietly
        with contextlib.suppress(OSError, ValueError, AttributeError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_PIPE
    except (ValueError, OSError, TypeError) as e:
        if args.debug:
            raise
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:  # not bad input: exit 1, naming the path
            print(f"convlens: error: {printable(e.filename or '')}: no space left on the device", file=sys.stderr)
            return 1
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"convlens: error: {printable(msg)}", file=sys.stderr)
        return EXIT_USAGE
    except Exception as e:
        if args.debug:
            raise
        first = printable((str(e).strip().splitlines() or [""])[0][:300])
        print(f"convlens: internal error: {type(e).__name__}: {first} (--debug shows the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
