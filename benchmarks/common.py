"""Shared timing helpers: interleaved repeats in one process, medians, ratios, markdown tables.

Every table is measured with :func:`measure`: all its cases run round-robin (case A, B, C, A,
B, C, ...) after a warm-up, so a noisy neighbour slows every row alike and the ratios hold.

Building a table::

    cases = {**floor_cases(model, x, layer="layer4"), "ours": lambda: ours(model, x)}
    rows = table_rows(cases, model="resnet50", batch=len(x), device="cpu", repeats=5)
    rows[-1].extra.update(agreement("captum", ours_map, captum_map))
"""

from __future__ import annotations

import contextlib
import os
import platform
import statistics
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

#: ``Row.floor`` value for a row that has no ``x floor``
NO_FLOOR = "-"
#: True in the worker that computes the correctness columns and the untimed tables (the first thread
#: setting; see :mod:`benchmarks.sweep`); the others time the cases only. True when a module runs alone.
PRIMARY = os.environ.get("CONVLENS_BENCH_PRIMARY", "1") != "0"


@dataclass
class Row:
    """One measured row of a table.

    Ratios are declared, not computed, by the bench modules: the harness fills them with
    :func:`fill_ratios` once each row's best thread setting is known. ``floor``: the method of the
    row ``x floor`` divides by (default: the table's first row whose method starts with "floor";
    :data:`NO_FLOOR`: none). ``ratios``: ``{column: method of another row of the table}``, each
    filled with that row's seconds / this row's (a speed-up, e.g. ``{"x brute force": "brute force"}``).
    ``setting``: the thread setting the seconds were measured at (set by the harness, or by a module
    whose rows choose their own, e.g. the CLI's own policy).
    """

    method: str
    model: str
    batch: int
    seconds: float  # median over repeats
    ratio: float | None = None  # to the table's floor row
    peak_mb: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # correctness columns etc.
    floor: str | None = None
    ratios: dict[str, str] = field(default_factory=dict)
    setting: str | None = None


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_memory_mb(fn: Callable[[], Any], device: torch.device | str = "cpu") -> float:
    """Peak torch-tensor memory of one call of ``fn`` above what was live when it started (MiB).

    CUDA: the caching allocator's ``max_memory_allocated`` peak. CPU: the same quantity from the
    profiler's allocation/free events (``profile_memory=True``): the running sum of every op's
    net allocation, in time order, maximised. Deterministic, and comparable between rows, unlike
    an RSS delta, which after the first call shows mostly glibc's cached pages (resnet50 forward +
    backward, batch 4: RSS delta 480 MB on the first call, then 50 and 24 MB; this: 336 MB each
    time). Not counted: numpy / Python memory (use :func:`peak_rss_mb` for a process view).
    Falls back to :func:`peak_rss_mb` when the profiler cannot run (e.g. one already active).
    """
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return max(0.0, (torch.cuda.max_memory_allocated(device) - base) / 2**20)
    try:
        return _profiled_peak_mb(fn)
    except RuntimeError:
        return peak_rss_mb(fn)


def _profiled_peak_mb(fn: Callable[[], Any]) -> float:
    from torch.profiler import ProfilerActivity, profile

    prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
    with _quiet_stderr():  # kineto logs profiler_start/stop lines straight to fd 2
        prof.__enter__()
    try:
        fn()
    finally:
        with _quiet_stderr():
            prof.__exit__(None, None, None)
    # self_cpu_memory_usage: an op's own net allocation (children excluded), frees outside ops
    # arrive as "[memory]" events with a negative amount; ordering by start time gives the curve
    events = sorted(
        (e for e in prof.events() if e.self_cpu_memory_usage), key=lambda e: e.time_range.start
    )
    live = peak = 0
    for e in events:
        live += e.self_cpu_memory_usage
        peak = max(peak, live)
    return peak / 2**20


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def peak_rss_mb(fn: Callable[[], Any]) -> float:
    """Peak resident-set growth during one call of ``fn`` (MiB), sampled every 2 ms.

    Only meaningful on a fresh process or for fresh large allocations: freed memory that the C
    allocator keeps cached makes later calls read low.
    """
    base = _rss_mb()
    peak = [base]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], _rss_mb())
            time.sleep(0.002)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    try:
        fn()
    finally:
        stop.set()
        t.join()
    return max(0.0, max(peak[0], _rss_mb()) - base)


def measure(
    cases: dict[str, Callable[[], Any]],
    *,
    repeats: int = 5,
    warmup: int = 1,
    device: str | torch.device = "cpu",
    samples: dict[str, list[float]] | None = None,
) -> dict[str, float]:
    """Median seconds per case, with the cases interleaved round-robin after ``warmup`` rounds.

    ``samples``, when given, receives every case's timed repeats (for a spread column).
    """
    device = torch.device(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times: dict[str, list[float]] = {name: [] for name in cases}
    for r in range(warmup + repeats):
        for name, fn in cases.items():
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            if r >= warmup:
                times[name].append(time.perf_counter() - t0)
    if samples is not None:
        samples.update(times)
    return {name: statistics.median(ts) for name, ts in times.items()}


def spread_pct(times: list[float]) -> float | None:
    """Interquartile range of repeated timings as a percentage of their median (noise indicator)."""
    if len(times) < 2:
        return None
    q1, _, q3 = statistics.quantiles(times, n=4, method="inclusive")
    return 100 * (q3 - q1) / statistics.median(times)


FLOOR_FORWARD = "floor: forward"
FLOOR_BACKWARD = "floor: forward + backward to {layer}"


def floor_cases(
    model: torch.nn.Module, x: torch.Tensor, layer: str | None = None, *, target: int | None = None
) -> dict[str, Callable[[], Any]]:
    """The floor rows of a table: a bare forward, and (with ``layer``) forward + backward to it.

    The forward runs under ``no_grad``. The backward case runs the model without autograd up to
    ``layer`` (a name from ``model.named_modules()``), records from that layer on, and takes
    ``torch.autograd.grad`` of the summed target logit (default: class 0) with respect to the
    layer's output: the least work any gradient-at-a-layer method (Grad-CAM family) must do.
    The model should already be in eval mode.

    Example::

        cases = floor_cases(model, x, "layer4")   # {"floor: forward": f, "floor: forward + backward to layer4": g}
    """
    cases: dict[str, Callable[[], Any]] = {}

    def forward() -> None:
        with torch.no_grad():
            model(x)

    cases[FLOOR_FORWARD] = forward
    if layer is not None:
        module = dict(model.named_modules())[layer]
        cls = 0 if target is None else target
        captured: list[torch.Tensor] = []

        def hook(_m: torch.nn.Module, _a: object, out: torch.Tensor) -> torch.Tensor:
            torch.set_grad_enabled(True)
            leaf = out.detach().requires_grad_(True)
            captured.append(leaf)
            return leaf.clone()  # later in-place ops (ReLU(inplace)) must not touch the leaf

        def backward() -> None:
            captured.clear()
            handle = module.register_forward_hook(hook)
            try:
                with torch.no_grad():  # the hook turns autograd on at the layer
                    logits = model(x)
                    torch.autograd.grad(logits[:, cls].sum(), captured[0])
            finally:
                handle.remove()

        cases[FLOOR_BACKWARD.format(layer=layer)] = backward
    return cases


def input_backward_case(model: torch.nn.Module, x: torch.Tensor, *, target: int | None = None) -> Callable[[], Any]:
    """Forward + backward all the way to the input (floor for input-gradient methods, feature vis)."""
    cls = 0 if target is None else target

    def run() -> None:
        xx = x.detach().requires_grad_(True)
        with torch.enable_grad():
            torch.autograd.grad(model(xx)[:, cls].sum(), xx)

    return run


def fill_ratios(rows: list[Row], floor: str | None = None) -> list[Row]:
    """Fill every ratio of a table from its rows' seconds (in place; returns ``rows``).

    ``ratio`` (``x floor``) = seconds / the floor row's seconds. The floor row: the row's own
    ``floor``, else ``floor`` given here, else the first row whose method starts with ``"floor"``;
    none: ``ratio`` stays None. Rows of another model or batch use their own floor when one exists
    with that method. Each ``ratios`` column = the named row's seconds / this row's (same model and
    batch first, else the first row of that method). The one place any ratio column is computed.
    """
    default = floor or next((r.method for r in rows if r.method.startswith("floor")), None)

    def find(method: str | None, like: Row) -> Row | None:
        same = [r for r in rows if r.method == method]
        return next((r for r in same if (r.model, r.batch) == (like.model, like.batch)), same[0] if same else None)

    for r in rows:
        name = default if r.floor is None else r.floor
        base = None if name == NO_FLOOR else find(name, r)
        r.ratio = r.seconds / base.seconds if base and base.seconds else None
        for column, method in r.ratios.items():
            ref = find(method, r)
            r.extra[column] = ref.seconds / r.seconds if ref and r.seconds else None
    return rows


def table_rows(
    cases: dict[str, Callable[[], Any]],
    *,
    model: str,
    batch: int,
    device: str | torch.device = "cpu",
    repeats: int = 5,
    warmup: int = 1,
    memory: bool = True,
    floor: str | None = None,
    extra: dict[str, dict[str, Any]] | None = None,
) -> list[Row]:
    """Time ``cases`` side by side with :func:`measure`, add peak memory and ratios: one Row each.

    Peak memory is measured in the :data:`PRIMARY` worker only (it does not depend on threads).

    Each row gets ``extra[case]`` (correctness columns etc.), then ``extra["IQR %"]``, the spread
    of its repeats (see :func:`spread_pct`), so a reader sees when the machine was too noisy for a
    ratio to mean much.
    """
    extra = extra or {}
    samples: dict[str, list[float]] = {}
    secs = measure(cases, repeats=repeats, warmup=warmup, device=device, samples=samples)
    rows = [
        Row(
            name,
            model,
            batch,
            secs[name],
            peak_mb=peak_memory_mb(fn, device) if memory and PRIMARY else None,
            extra={**extra.get(name, {}), "IQR %": spread_pct(samples[name])},
            floor=floor,
        )
        for name, fn in cases.items()
    ]
    return fill_ratios(rows)


def _as_maps(a: Any) -> torch.Tensor:
    """(H,W) / (N,H,W) / (N,1,H,W) tensor or array -> float64 (N,1,H,W) on the CPU."""
    t = torch.as_tensor(a.copy() if hasattr(a, "flags") else a).detach().to("cpu", torch.float64)
    if t.dim() == 2:
        t = t[None]
    if t.dim() == 3:
        t = t[:, None]
    if t.dim() != 4 or t.shape[1] != 1:
        raise ValueError(f"expected a map of shape (H,W), (N,H,W) or (N,1,H,W), got {tuple(t.shape)}")
    return t


def compare_maps(a: Any, b: Any, *, normalise: bool = False) -> tuple[float, float]:
    """(max |a - b|, Pearson r) of two saliency maps on the same input(s).

    Both become (N,1,H,W); the smaller is bilinearly resized to the larger's size. With
    ``normalise`` each image's map is min-max scaled to [0, 1] first (for peers that return
    normalised maps, e.g. pytorch-grad-cam). r = cov(a, b) / (std a * std b) per image; the
    minimum over the batch is returned, so one wrong image shows. r is NaN for a constant map.

    Example::

        diff, r = compare_maps(ours.maps, captum_attr.squeeze(1))   # (0.0, 1.0) when identical
    """
    x, y = _as_maps(a), _as_maps(b)
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"batch sizes differ: {x.shape[0]} vs {y.shape[0]}")
    if x.shape[-2:] != y.shape[-2:]:
        size = max(x.shape[-2:], y.shape[-2:], key=lambda s: s[0] * s[1])
        resize = torch.nn.functional.interpolate
        x = x if x.shape[-2:] == size else resize(x, size=size, mode="bilinear", align_corners=False)
        y = y if y.shape[-2:] == size else resize(y, size=size, mode="bilinear", align_corners=False)
    x, y = x.flatten(1), y.flatten(1)
    if normalise:
        x, y = (_minmax(t) for t in (x, y))
    diff = float((x - y).abs().max())
    xc, yc = x - x.mean(1, keepdim=True), y - y.mean(1, keepdim=True)
    denom = xc.norm(dim=1) * yc.norm(dim=1)
    r = torch.where(denom > 0, (xc * yc).sum(1) / denom.clamp_min(1e-300), torch.full_like(denom, float("nan")))
    return diff, float(r.min()) if not torch.isnan(r).any() else float("nan")


def _minmax(t: torch.Tensor) -> torch.Tensor:
    lo, hi = t.min(1, keepdim=True).values, t.max(1, keepdim=True).values
    return (t - lo) / (hi - lo).clamp_min(1e-12)


def agreement(peer: str, ours: Any, theirs: Any, *, normalise: bool = False) -> dict[str, float]:
    """Correctness columns for a table: ``{"max abs diff vs PEER": d, "r vs PEER": r}`` (see compare_maps)."""
    diff, r = compare_maps(ours, theirs, normalise=normalise)
    return {f"max abs diff vs {peer}": diff, f"r vs {peer}": r}


PEERS = ("torchvision", "timm", "captum", "grad-cam", "torchcam", "torch-lucent", "quantus")


def machine_info() -> dict[str, Any]:
    """What the numbers were measured on: CPU, cores, RAM, GPU when there is one, versions."""
    from importlib.metadata import PackageNotFoundError, version

    cpu = platform.processor() or platform.machine()
    ram = None
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
        with open("/proc/meminfo") as f:
            ram = next((int(line.split()[1]) / 2**20 for line in f if line.startswith("MemTotal:")), None)
    except OSError:
        pass
    info: dict[str, Any] = {"cpu": cpu, "cores": os.cpu_count(), "RAM": None if ram is None else f"{ram:.0f} GiB"}
    if torch.cuda.is_available():
        info["gpu"] = f"{torch.cuda.get_device_name(0)} (CUDA {torch.version.cuda})"
    info["python"] = platform.python_version()
    info["torch"] = torch.__version__
    peers = []
    for name in PEERS:
        with contextlib.suppress(PackageNotFoundError):
            peers.append(f"{name} {version(name)}")
    info["peers"] = ", ".join(peers) or "none installed"
    return info


def markdown_table(title: str, rows: list[Row]) -> str:
    """Rows as a markdown table under a heading, extra columns appended (declared ratio columns last).

    ``threads`` (the setting each row's seconds come from) appears when any row has one; ``x floor``
    when any row has a floor.
    """
    extra_keys: list[str] = []
    for r in rows:
        extra_keys += [k for k in r.extra if k not in extra_keys]
    ratio_keys = {k for r in rows for k in r.ratios}
    extra_keys = [k for k in extra_keys if k not in ratio_keys] + [k for k in extra_keys if k in ratio_keys]
    threads = any(r.setting for r in rows)
    floor = any(r.ratio is not None for r in rows)
    head = ["method", "model", "batch", *(["threads"] * threads), "median s", *(["x floor"] * floor), "peak MB",
            *extra_keys]
    head = [_cell(h) for h in head]
    lines = [f"### {title}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [
            r.method,
            r.model,
            str(r.batch),
            *([r.setting or "-"] * threads),
            f"{r.seconds:.4f}",
            *(["-" if r.ratio is None else f"{r.ratio:.2f}"] * floor),
            "-" if r.peak_mb is None else f"{r.peak_mb:.0f}",
            *[_fmt(r.extra.get(k)) for k in extra_keys],
        ]
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


def _cell(text: str) -> str:
    """A table cell: a literal ``|`` would split the column, so it is escaped."""
    return text.replace("|", "\\|").replace("\n", " ")


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3g}"
    return str(v)
