"""The options of each ``convlens`` command: the ``_add_<command>(parser)`` functions registered in
:data:`convlens.cli.COMMANDS`, the options several commands share (the model, ``--out``, the blur
sigma, the cache), and the argument types that turn a bad value into a usage error (exit 2) before
anything is loaded.
"""

from __future__ import annotations

import argparse
import sys


# -- shared options -----------------------------------------------------------------------
class _Renamed(argparse.Action):
    """The old spelling of a flag, kept for one release: a note on stderr naming the new flag, then
    the value goes where the new flag's does (hidden from --help)."""

    def __init__(self, option_strings: list[str], dest: str, new: str, **kwargs) -> None:
        self.new = new
        super().__init__(option_strings, dest, default=argparse.SUPPRESS, help=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        deprecated(option_string, self.new)
        setattr(namespace, self.dest, values)


def deprecated(old: str | None, new: str) -> None:
    """The one deprecation note of the command line, on stderr."""
    print(f"convlens: {old} is deprecated and will be removed in the next release; use {new}", file=sys.stderr)


def add_model_args(p: argparse.ArgumentParser) -> None:
    """--model, --weights, --labels, --num-classes, --multi-label and --device, shared by every
    command that loads a model."""
    g = p.add_argument_group("model")
    g.add_argument(
        "--model", "-m", default=None, metavar="NAME",
        help="torchvision name (resnet50, vgg16, ...) or timm:NAME; default: the bundled "
        "EfficientNet-Lite0 with ImageNet weights (offline)",
    )
    g.add_argument("--weights", "-w", default=None, metavar="FILE",
                   help="local .pth/.pt/.safetensors state dict; a fine-tuned head is built at the checkpoint's size")
    g.add_argument("--labels", default=None, metavar="FILE",
                   help="class names: one per line, a JSON list or a JSON {index: name} (one per model output)")
    g.add_argument("--num-classes", type=int, default=None, metavar="N",
                   help="the head size of the --weights checkpoint (default: read from it)")
    g.add_argument("--multi-label", action="store_true",
                   help="the outputs are independent sigmoids (one yes/no per class), not one softmax")
    g.add_argument("--device", default="auto", type=_device_arg, metavar="D",
                   help="auto (default), cpu, cuda, cuda:N or mps")
    g.add_argument(
        "--threads", type=int, default=None, metavar="N",
        help="CPU threads for PyTorch; default: the CPUs not busy with other work, measured at start "
        "(OMP_NUM_THREADS, when set, is kept); 0: PyTorch's own default",
    )


def _device_arg(text: str) -> str:
    import re

    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?|mps", text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a device convlens runs on; use auto, cpu, cuda, cuda:N, mps")
    return text


# -- predict ------------------------------------------------------------------------------
def _add_predict(p: argparse.ArgumentParser) -> None:
    p.add_argument("images", nargs="*", metavar="IMAGE",
                   help="image files or folders of images (default: the bundled sample photo)")
    add_model_args(p)
    p.add_argument("--top", "-k", type=int, default=5, metavar="K", help="how many classes to show (default 5)")


# -- layers -------------------------------------------------------------------------------
def _add_layers(p: argparse.ArgumentParser) -> None:
    add_model_args(p)
    p.add_argument("--filter", "-f", default=None, metavar="PATTERN", help="only names matching a glob, e.g. 'layer4*'")


# -- activations / gradcam ----------------------------------------------------------------
def _add_out(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--out", "-o", default="convlens-out", metavar="DIR",
        help="folder for the results, one subfolder per image named after its whole file name "
        "(default ./convlens-out); an earlier run there is kept unless --force",
    )
    p.add_argument(
        "--force", action="store_true",
        help="replace the earlier run in --out as a whole (and files in the way of this run's outputs)",
    )


def _add_evidence(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--no-evidence", dest="evidence", action="store_false",
        help="skip the faithfulness numbers printed under each map (deletion/insertion AUC beside a random "
        "map's, and for CAM methods whether the map changes with the class; about 70 extra forwards)",
    )


def _add_activations(p: argparse.ArgumentParser) -> None:
    p.add_argument("images", nargs="*", metavar="IMAGE",
                   help="image files or folders of images (default: the bundled sample photo)")
    add_model_args(p)
    p.add_argument(
        "--layers", "-l", nargs="+", default=["stages"], metavar="L",
        help="layer names or glob patterns, or 'stages' (default: the stage outputs found automatically)",
    )
    p.add_argument(
        "--channels", "-c", default=None, metavar="LIST",
        help="comma-separated channel indices to show (default: as --pick chooses)",
    )
    p.add_argument(
        "--pick", default="top", choices=("top", "first"),
        help="without --channels, which channels the figure shows: the most active (top, default) or the first",
    )
    p.add_argument("--per-layer", type=int, default=8, metavar="K", help="channels per layer in the figure (default 8)")
    p.add_argument("-k", dest="per_layer", type=int, action=_Renamed, new="--per-layer")
    _add_out(p)


def _add_gradcam(p: argparse.ArgumentParser) -> None:
    from .methods.registry import cam_methods

    p.add_argument("images", nargs="*", metavar="IMAGE",
                   help="image files or folders of images (default: the bundled sample photo)")
    add_model_args(p)
    p.add_argument("--method", default="gradcam", choices=cam_methods(),
                   help="CAM variant (default gradcam; --plugin adds others)")
    p.add_argument(
        "--layer", "-l", default=None, metavar="L", help="layer name (default: the last spatial map, logged)"
    )
    p.add_argument(
        "--target", "-t", action="append", default=None, metavar="T",
        help="class index or name; repeat for several classes (default: the top-1 class)",
    )
    p.add_argument("--top", "-k", type=int, default=None, metavar="K", help="explain the K most likely classes")
    p.add_argument("--alpha", type=float, default=0.5, help="heatmap opacity in the overlay (default 0.5)")
    _add_evidence(p)
    _add_out(p)


# -- occlusion ----------------------------------------------------------------------------
def _int_pair(text: str) -> int | tuple[int, int]:
    """``40`` or ``40x30`` / ``40,30`` (height, width)."""
    parts = text.lower().replace(",", "x").split("x")
    try:
        values = [int(p) for p in parts]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected N or HxW, got {text!r}") from None
    if len(values) == 1:
        return values[0]
    if len(values) == 2:
        return values[0], values[1]
    raise argparse.ArgumentTypeError(f"expected N or HxW, got {text!r}")


def _baseline_arg(text: str) -> float | str:
    if text in ("mean", "blur"):
        return text
    from .methods.occlusion import MAX_BASELINE

    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"baseline is a number, 'mean' or 'blur', not {text!r}") from None
    if not abs(value) <= MAX_BASELINE:  # also NaN
        raise argparse.ArgumentTypeError(
            f"baseline {text} is no colour: a number in normalised space from -{MAX_BASELINE:g} to {MAX_BASELINE:g}")
    return value


def _blur_sigma_arg(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 < value < float("inf"):  # also NaN
        raise argparse.ArgumentTypeError(f"--blur-sigma is a positive number of pixels, not {text!r}")
    return value


def _add_blur_sigma(p: argparse.ArgumentParser, default: str) -> None:
    p.add_argument("--blur-sigma", type=_blur_sigma_arg, default=None, metavar="PX",
                   help=f"the blur baseline's Gaussian sigma in pixels (default {default})")


def _add_occlusion(p: argparse.ArgumentParser) -> None:
    p.add_argument("images", nargs="*", metavar="IMAGE",
                   help="image files or folders of images (default: the bundled sample photo)")
    add_model_args(p)
    p.add_argument("--patch", "-p", type=_int_pair, default=40, metavar="P", help="window size, N or HxW (default 40)")
    p.add_argument("--stride", "-s", type=_int_pair, default=20, metavar="S", help="window step, N or HxW (default 20)")
    p.add_argument(
        "--baseline", "-b", type=_baseline_arg, default=0.0, metavar="B",
        help="what hides a window: a number in normalised space (default 0, the mean colour), mean or blur",
    )
    _add_blur_sigma(p, "patch / 4")
    p.add_argument("--target", "-t", default=None, metavar="T", help="class index or name (default: top-1 per image)")
    p.add_argument("--score", choices=("probability", "logit"), default="probability", help="drop measured in")
    p.add_argument(
        "--batch-size", type=int, default=None, metavar="N", help="windows per forward (default: per device)",
    )
    p.add_argument(
        "--mode", choices=("exact", "approximate"), default="exact",
        help="exact: equal to one full forward per window; approximate: recompute only the central part "
             "of each layer's reach (faster, a close map; see the README)",
    )
    p.add_argument(
        "--refine", type=_share_arg, nargs="?", const=True, default=None, metavar="SHARE",
        help="adaptive refinement, in either mode: a coarse lattice of windows first, then the full stride "
             "only in the top SHARE of its cells by |drop| (default 0.3: about half the windows at "
             "--patch 16 --stride 8), the other windows interpolated",
    )
    _add_evidence(p)
    _add_out(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _share_arg(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"expected a share in (0, 1], got {text!r}")
    return value


# -- filters (feature visualisation) --------------------------------------------------------
def _add_no_cache(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--no-cache", action="store_true",
        help="neither read nor write the feature-visualisation cache (default: the user cache folder, "
        "$CONVLENS_CACHE overrides, $CONVLENS_CACHE_MB bounds it, 500 MB)",
    )


def _add_filters(p: argparse.ArgumentParser) -> None:
    add_model_args(p)
    p.add_argument("--layer", "-l", default=None, metavar="L", help="layer name (see `convlens layers`)")
    p.add_argument(
        "--channels", "-c", default="0,1,2,3", metavar="LIST",
        help="comma-separated channels (class indices/names for --objective class); default 0,1,2,3",
    )
    p.add_argument(
        "--objective", default="channel", choices=["channel", "neuron", "layer", "class"],
        help="what to maximise: a channel's mean (default), its centre neuron, the whole layer, a class logit",
    )
    p.add_argument("--steps", type=int, default=None, metavar="N", help="optimisation steps (default 128)")
    p.add_argument("--size", type=int, default=None, metavar="S", help="image side in pixels (default 128)")
    p.add_argument("--lr", type=float, default=None, help="step size (default 0.05)")
    p.add_argument("--param", default="fourier", choices=["fourier", "pixel"], help="image parameterisation")
    p.add_argument("--no-transforms", action="store_true", help="no robustness transforms")
    p.add_argument(
        "--diversity", type=float, default=0.0, metavar="W", help="diversity weight between repeated channels"
    )
    p.add_argument("--seed", type=int, default=0, help="random seed; the same seed gives the same images (default 0)")
    _add_no_cache(p)
    _add_out(p)


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
        "--techniques", default=",".join(METHODS), metavar="LIST",
        help=f"comma-separated techniques (default: {','.join(METHODS)})",
    )
    p.add_argument("--methods", dest="techniques", action=_Renamed, new="--techniques")
    _add_out(p)
    p.add_argument(
        "--fast", action="store_true", help="lighter settings: coarser occlusion, fewer and smaller feature images"
    )
    p.add_argument(
        "--full", action="store_true",
        help="several images: give each the settings of an image alone (by default a folder run draws only the "
        "feature visualisations its images share most, at most two per five images, and a shorter trust check)",
    )
    _add_no_cache(p)
    p.add_argument(
        "--resume", action="store_true",
        help="continue an earlier (interrupted or finished) run in --out: images it finished with the same model, "
        "weights, settings and file content are kept, the rest are explained, the report covers all",
    )
    p.add_argument(
        "--shard", type=_shard_arg, default=None, metavar="I/N",
        help="explain only part I of N (1-based) of the images, by sorted file name, into --out/shard-I-of-N: "
        "N processes or machines share one folder (e.g. a Slurm array --array=1-N: --shard "
        "$SLURM_ARRAY_TASK_ID/N); merge them with `convlens report`",
    )


def _shard_arg(text: str) -> tuple[int, int]:
    from .explain import parse_shard

    try:
        return parse_shard(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _add_compare(p: argparse.ArgumentParser) -> None:
    from .methods.registry import map_methods
    from .metrics.compare import DEFAULT_METHODS

    p.add_argument(
        "images", nargs="*", metavar="IMAGE|DIR",
        help="image files or folders of images (default: the bundled sample photo)",
    )
    add_model_args(p)
    p.add_argument(
        "--methods", default=",".join(DEFAULT_METHODS), metavar="LIST",
        help=f"comma-separated methods, or 'all' ({','.join(map_methods())}); default: {','.join(DEFAULT_METHODS)} "
        "(Score-CAM costs one forward per channel: minutes on a CPU)",
    )
    p.add_argument("--target", "-t", default=None, metavar="T", help="class index or name (default: top-1 per image)")
    p.add_argument("--steps", type=int, default=16, metavar="N", help="deletion/insertion steps (default 16)")
    p.add_argument(
        "--baseline", "-b", type=_baseline_arg, default="blur", metavar="B",
        help="what replaces removed pixels: blur (default), mean, or a number in normalised space",
    )
    _add_blur_sigma(p, "max(H, W) / 22.4, 10 px at 224 px")
    p.add_argument("--no-sanity", action="store_true", help="skip the sanity check (model randomisation)")
    p.add_argument("--verbose", "-v", dest="details", action="store_true",
                   help="a wider table: the spread over the images, the sanity rho, seconds per map, each image's AUCs")
    p.add_argument(
        "--out", "-o", default="convlens-compare", metavar="DIR",
        help="folder for compare.csv/.json/.png/.html (default ./convlens-compare); kept unless --force",
    )
    p.add_argument("--force", action="store_true", help="replace the outputs of an earlier comparison in --out")


# -- serve (the local browser explorer) -----------------------------------------------------
def _add_serve(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "images", nargs="*", metavar="IMAGE|DIR",
        help="image files or folders of images (default: the bundled sample photo)",
    )
    add_model_args(p)
    p.add_argument("--port", type=int, default=8000, metavar="N", help="port (default 8000; 0 picks a free one)")
    p.add_argument(
        "--host", default="127.0.0.1", metavar="H",
        help="address to listen on (default 127.0.0.1: this machine only; anything else warns)",
    )
    p.add_argument(
        "--allow-host", action="append", default=[], metavar="NAME",
        help="also answer requests whose Host header is NAME (a reverse proxy's name; repeatable)",
    )


# -- report -------------------------------------------------------------------------------
def _add_report(p: argparse.ArgumentParser) -> None:
    p.add_argument("runs", nargs="+", metavar="OUT",
                   help="explain outputs to merge: a run's --out, or a folder holding shard-I-of-N runs")
    p.add_argument("--out", "-o", required=True, metavar="MERGED",
                   help="folder for the merged report.html, summary.json and summary.csv (may be the folder "
                   "that holds the shards); an earlier merge there is kept unless --force")
    p.add_argument("--force", action="store_true", help="replace an earlier merge in --out")
