"""Checks every technique shares: non-finite numbers are errors, constant maps are warnings."""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import Tensor

__all__ = ["NonFiniteError", "choose", "require_finite", "warn_constant", "check_maps"]


def choose(
    names: str | Iterable[str], allowed: Sequence[str], what: str, *, error: type[Exception] = ValueError,
) -> tuple[str, ...]:
    """The names asked for, checked against ``allowed``: the one rule for method and technique
    names in the CLI and the library.

    Args:
        names: a comma-separated string (``"gradcam, occlusion"``) or an iterable of names;
            ``"all"`` means every allowed name.
        allowed: the valid names, in their canonical order.
        what: what a name is, for the message (``"technique"``, ``"method"``).
        error: the exception type to raise.
    Returns:
        The names without repeats, in the order given.
    Raises:
        ``error`` (``ValueError`` by default) naming the unknown names and the allowed ones, also
        when no name is given.
    """
    if isinstance(names, str):
        names = list(allowed) if names.strip() == "all" else [n.strip() for n in names.split(",") if n.strip()]
    picked = tuple(dict.fromkeys(names))
    bad = [n for n in picked if n not in allowed]
    if bad or not picked:
        if not bad:
            unknown = f"{what}: none given"
        elif len(bad) == 1:
            unknown = f"{what} {bad[0]!r}"
        else:
            unknown = f"{what}s " + ", ".join(map(repr, bad))
        raise error(f"unknown {unknown}; choose from {', '.join(allowed)}")
    return picked


class NonFiniteError(ValueError):
    """NaN or infinity in a model's output or in a map: the result would be meaningless."""


def require_finite(t: Tensor, what: str) -> Tensor:
    """Return ``t`` when all its values are finite, else raise :class:`NonFiniteError` saying
    what holds how many NaN/inf values (a checkpoint with NaN weights, an overflowing baseline).

    Args:
        t: any tensor, any device.
        what: what ``t`` is, for the message.
    Returns:
        ``t`` itself.
    Raises:
        NonFiniteError: NaN or infinity in ``t`` (a ``ValueError``).

    Example::

        logits = require_finite(model(x), "the model's output")
    """
    bad = ~torch.isfinite(t.detach())
    if bool(bad.any()):
        nan = int(torch.isnan(t.detach()).sum())
        raise NonFiniteError(
            f"{what} holds {nan} NaN and {int(bad.sum()) - nan} infinite values of {t.numel()}"
            " (broken weights or an extreme input?)"
        )
    return t


def warn_constant(maps: Tensor, method: str, why: str = "nothing supports the target") -> list[int]:
    """Warn (``RuntimeWarning``) when a row of ``maps`` holds one value only: such a map says
    nothing.

    Args:
        maps: (N, ...) tensor, any device.
        method: the map's name, for the message.
        why: the likely reason, for the message.
    Returns:
        The indices of the constant rows.

    Example::

        warn_constant(result.raw, "occlusion")
    """
    flat = maps.detach().flatten(1)
    constant = ((flat.amax(1) - flat.amin(1)) <= 0).nonzero()[:, 0].tolist()
    if constant:
        _constant_warning(method, constant, float(flat[constant[0], 0]), why)
    return constant


def _constant_warning(method: str, rows: list[int], value: float, why: str) -> None:
    warnings.warn(
        f"{method} map is constant (all {value:g}) for rows {rows}: {why}",
        RuntimeWarning,
        stacklevel=5,  # the warning's helper <- its check <- the technique <- its @renamed wrapper <- the caller
    )


def check_maps(maps: Mapping[str, Tensor], what: str, method: str, why: str) -> None:
    """:func:`require_finite` and :func:`warn_constant` for several maps in one pass each and one
    device read for all: per map and row its lowest and highest value (a NaN shows at both ends, an
    infinity at one), so a non-finite map raises (``what`` and ``method`` with
    ``{name}`` for the map's name) and a row whose ends are equal warns.

    Example::

        check_maps({"layer1": a, "layer2": b}, "the output of {name}", "activations of {name}",
                   "every channel holds one value")
    """
    if not maps:
        return
    # amin and amax, not aminmax: the latter is ~10x slower over one long row on a CPU
    ends = torch.stack([torch.stack([f(t.detach().flatten(1), 1) for f in (torch.amin, torch.amax)])
                        for t in maps.values()])
    for (name, t), (lo, hi) in zip(maps.items(), ends.tolist()):
        if not all(map(math.isfinite, lo + hi)):
            require_finite(t, what.format(name=name))  # raises, counting the NaN and infinite values
        rows = [i for i, (a, b) in enumerate(zip(lo, hi)) if b - a <= 0]
        if rows:
            _constant_warning(method.format(name=name), rows, lo[rows[0]], why)
