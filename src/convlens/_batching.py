"""How many images go through the model in one forward: one policy for every technique that runs
many forwards (occlusion's windows, Score-CAM's masked copies, deletion / insertion steps).

On a CPU the batch is a measured constant per kind of work (a larger batch of full forwards is
slower on few cores), within a memory budget; on a GPU it is what half the free memory holds,
from the measured peak of one forward.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .hooks import forward_hooks

__all__ = ["default_batch", "forward_peak", "memory_budget"]

#: rough bytes of activations alive at once per image in a forward, per input element: ResNet-50's
#: largest activation is 5.3x its input and a few of them are alive at a time
ACTIVATION_BYTES_PER_INPUT_ELEMENT = 64 * 4
#: the most items per forward on a GPU
GPU_CAP = 256


def memory_budget() -> int:
    """Bytes a batch may hold on a CPU: a quarter of the available RAM, at most 2 GiB."""
    avail = 8 << 30
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) * 1024
                    break
    except OSError:
        pass
    return min(avail // 4, 2 << 30)


def forward_peak(model: nn.Module, x: Tensor) -> int:
    """Bytes a forward of ``x`` allocates on CUDA above what was allocated before: the largest
    ``memory_allocated`` seen after any module finished. Read through forward hooks instead of
    ``reset_peak_memory_stats``, which would wipe the caller's own peak statistics.

    Args:
        model: the model (its forward runs once, without autograd; hooks are removed after).
        x: one input batch on a CUDA device.
    Returns:
        The peak in bytes (0 when nothing was allocated).
    """
    base = torch.cuda.memory_allocated(x.device)
    peak = [base]

    def hook(module: nn.Module, args: object, out: object) -> None:
        peak[0] = max(peak[0], torch.cuda.memory_allocated(x.device))

    with forward_hooks() as add, torch.no_grad():
        for m in model.modules():
            add(m, hook)
        model(x)
    return peak[0] - base


def default_batch(
    model: nn.Module, x: Tensor, n: int, *, cpu: int = 1, budget: int | None = None,
    bytes_per_item: int | None = None,
) -> int:
    """Items per forward for ``n`` forwards of inputs shaped like one image of ``x``.

    Args:
        model: the model the forwards run through (on CUDA its forward of ``x[:1]`` is measured).
        x: (N, C, H, W) input; only its first image's size, dtype and device matter.
        n: how many items there are in all (the batch never exceeds it).
        cpu: the batch on a CPU before the memory cap (1 for full forwards: measured fastest on
            2 cores for ResNet-50, 6.2 s for 101 single forwards vs 7.4 s in chunks of 16).
        budget: bytes the batch may hold on a CPU (default :func:`memory_budget`).
        bytes_per_item: memory per item on a CPU (default: ``ACTIVATION_BYTES_PER_INPUT_ELEMENT``
            times the elements of one image).
    Returns:
        A batch size in ``[1, max(1, n)]``. On CUDA: as many as half the free memory holds, from
        the measured peak of one forward, at most ``GPU_CAP``; ``budget`` caps it there too.
    """
    n = max(1, int(n))
    if x.device.type == "cuda":
        per_item = max(1, forward_peak(model, x[:1]))
        free, _ = torch.cuda.mem_get_info(x.device)
        room = free // 2 if budget is None else min(free // 2, budget)
        return int(max(1, min(GPU_CAP, n, room // per_item)))
    per_item = bytes_per_item or ACTIVATION_BYTES_PER_INPUT_ELEMENT * x[0].numel()
    room = memory_budget() if budget is None else budget
    return int(max(1, min(cpu, n, room // per_item)))
