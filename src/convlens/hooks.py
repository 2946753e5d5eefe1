"""The one hook mechanism every method uses, and the guard that leaves the user's model as it was.

Rules (see design.md): forward hooks only, registered per call inside try/finally; gradients come
from ``torch.autograd.grad`` on captured tensors; the forward pass stops after the last layer a
method needs; the model's flags, weights, ``.grad`` and the caller's grad mode survive any call,
also one that raises or is interrupted.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator, Mapping

import torch
from torch import Tensor, nn

__all__ = ["LayerCapture", "StopForward", "model_guard", "count_hooks", "forward_hooks", "unhooked_copy"]


class StopForward(Exception):
    """Raised inside a forward hook to end the pass once every needed layer has run."""


@contextlib.contextmanager
def model_guard(model: nn.Module, *, eval_mode: bool = True, freeze: bool = False) -> Iterator[nn.Module]:
    """Put ``model`` in eval mode for the call and restore everything on the way out.

    Restored: every module's ``training`` flag and ``inplace`` attribute, every parameter's
    ``requires_grad`` and ``.grad`` (the tensor object itself), and the caller's grad mode.
    Weights are never written by convlens, so they are not copied (the tests check them).
    ``freeze=True`` also turns ``requires_grad`` off on every parameter for the call, so autograd
    records activations only (a backward to a captured layer then touches no weight gradient).

    Args:
        model: the model (any device).
        eval_mode: put it in eval mode for the call.
        freeze: turn ``requires_grad`` off on its parameters for the call.
    Yields:
        ``model`` itself (not a copy).

    Example::

        with model_guard(model):
            out = model(x)
    """
    modules = list(model.modules())
    training = [(m, m.training) for m in modules]
    # read from the instance dict: getattr on a module without the attribute raises inside
    # nn.Module.__getattr__, which costs milliseconds over a few hundred modules per call
    inplace = [(m, m.__dict__["inplace"]) for m in modules if isinstance(m.__dict__.get("inplace"), bool)]
    params = [(p, p.requires_grad, p.grad) for p in model.parameters()]
    grad_mode = torch.is_grad_enabled()
    try:
        if eval_mode and any(flag for _, flag in training):
            model.eval()
        if freeze:
            for p, requires_grad, _ in params:
                if requires_grad:
                    p.requires_grad_(False)
        yield model
    finally:
        torch.set_grad_enabled(grad_mode)
        # only what changed is written back: nn.Module.__setattr__ is slow, and this runs per call
        for m, flag in training:
            if m.training != flag:
                m.training = flag
        for m, flag in inplace:
            if m.inplace != flag:
                m.inplace = flag
        for p, requires_grad, grad in params:
            if p.requires_grad != requires_grad:
                p.requires_grad_(requires_grad)
            if p.grad is not grad:
                p.grad = grad


@contextlib.contextmanager
def forward_hooks() -> Iterator[Callable[..., None]]:
    """The scope of hand-made forward hooks (a pass that records every module's calls, shapes or
    memory): yields ``add(module, hook, *, pre=False)``, which registers a forward hook (a forward
    pre-hook with ``pre=True``); every hook added is removed on the way out, also when the block
    raises or is interrupted. :class:`LayerCapture` is the scope for capturing layer outputs.

    Example::

        with forward_hooks() as add:
            for m in model.modules():
                add(m, lambda m, args, out: shapes.append(tuple(out.shape)))
            model(x)
    """
    handles: list[torch.utils.hooks.RemovableHandle] = []

    def add(module: nn.Module, hook: Callable[..., object], *, pre: bool = False) -> None:
        handles.append(module.register_forward_pre_hook(hook) if pre else module.register_forward_hook(hook))

    try:
        yield add
    finally:
        while handles:
            handles.pop().remove()


class LayerCapture:
    """Forward hooks that capture the outputs of named layers for one call.

    A key ``"name"`` captures the module's **last** call in the pass, ``"name#k"`` its k-th call
    (from 1), as :mod:`convlens.layers` defines layer names. ``calls`` (module name -> how often it
    runs, :func:`convlens.layers.call_counts`) lets ``stop_early`` end the pass at a last call;
    without it a last-call layer keeps the pass running to the end. ``counts`` holds, after
    :meth:`run`, how often each captured module ran.

    ``grad`` names the layers whose outputs will be differentiated: the pass runs without
    autograd up to the first of them, their output becomes a fresh leaf that requires grad,
    and autograd records only from there on, so ``torch.autograd.grad(score, capture[name])``
    costs a backward down to that layer and no further. ``stop_early`` ends the pass with
    :class:`StopForward` as soon as every layer has fired once. The module's output is
    replaced by a clone when the pass continues, so a later in-place op (``ReLU(inplace=True)``)
    cannot overwrite what was captured. Removal is idempotent. With grad layers, autograd stays
    on after :meth:`run` (so the score can be computed and differentiated) until the ``with``
    block ends, which restores the caller's grad mode, ``torch.no_grad()`` included.

    Args:
        layers: key (``"name"`` or ``"name#k"``) -> module to capture.
        grad: keys whose outputs will be differentiated.
        stop_early: end the pass once every layer has fired.
        calls: module name -> how often it runs in one pass.
    Raises:
        ValueError: a grad key that is not among ``layers``, or a bad ``#k``.

    After :meth:`run`, ``capture[key]`` is the layer's output tensor, on the model's device in
    its dtype (a leaf that requires grad for a grad layer).

    Example::

        with LayerCapture({"layer4": model.layer4}, grad=["layer4"]) as cap:
            logits = cap.run(model, x)
            g, = torch.autograd.grad(logits[:, 3].sum(), cap["layer4"])
    """

    def __init__(
        self,
        layers: Mapping[str, nn.Module],
        *,
        grad: tuple[str, ...] | list[str] = (),
        stop_early: bool = False,
        calls: Mapping[str, int] | None = None,
    ) -> None:
        unknown = set(grad) - set(layers)
        if unknown:
            raise ValueError(f"grad layers {sorted(unknown)} are not among the captured layers")
        self.layers = dict(layers)
        self.grad = frozenset(grad)
        self.stop_early = stop_early
        self.want: dict[str, int | None] = {}
        for key in self.layers:
            base, sep, k = key.rpartition("#")
            if sep and not (k.isdigit() and int(k) >= 1):
                raise ValueError(f"{key!r}: a call is written name#k with k = 1, 2, ...")
            # a last call is known only with the module's call count; else it is never "done"
            self.want[key] = int(k) if sep else (calls or {}).get(key)
        self.outputs: dict[str, Tensor] = {}
        self.counts: dict[str, int] = {}
        self._done: set[str] = set()
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._grad_mode: bool | None = None

    def __getitem__(self, name: str) -> Tensor:
        return self.outputs[name]

    def _hook(self, name: str):
        want = self.want[name]

        def hook(module: nn.Module, args: object, output: object) -> Tensor | None:
            n = self.counts[name] = self.counts.get(name, 0) + 1
            if name in self._done or (want is not None and n != want):
                return None
            if not isinstance(output, Tensor):
                raise TypeError(
                    f"layer {name!r} returns {type(output).__name__}, not a tensor; "
                    "choose one of its submodules (see `convlens layers`)"
                )
            if name in self.grad:
                torch.set_grad_enabled(True)  # until the with-block ends
                output = output.detach().requires_grad_(True)
            self.outputs[name] = output  # a later call of a last-call layer replaces it
            if want is not None:
                self._done.add(name)
            if self.stop_early and len(self._done) == len(self.layers):
                raise StopForward
            # the rest of the network works on a copy; the captured tensor stays intact
            return output.clone()

        return hook

    def __enter__(self) -> LayerCapture:
        self._grad_mode = torch.is_grad_enabled()
        try:
            for name, module in self.layers.items():
                self._handles.append(module.register_forward_hook(self._hook(name)))
        except BaseException:
            self.remove()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()
        if self._grad_mode is not None:
            torch.set_grad_enabled(self._grad_mode)

    def remove(self) -> None:
        """Remove every hook; safe to call more than once."""
        while self._handles:
            self._handles.pop().remove()

    def run(self, model: nn.Module, x: Tensor, *, input_grad: bool = False) -> Tensor | None:
        """Run ``model(x)`` with the hooks in place; ``None`` when the pass stopped early.

        Without grad layers the whole pass runs without autograd; with them, only the part
        before the first grad layer does, and autograd stays on afterwards (see the class doc).
        ``input_grad=True`` records the whole pass (for gradients down to ``x``, as feature
        visualisation needs) and leaves autograd on until the ``with`` block ends; then list no
        grad layers.

        Args:
            model: the model the layers belong to.
            x: (N, C, H, W) model-ready input on the model's device, in its dtype.
            input_grad: record the whole pass.
        Returns:
            The model's raw output, or None when the pass stopped early.
        Raises:
            RuntimeError: used outside its ``with`` block.
            ValueError: ``input_grad`` with grad layers.
            TypeError: a captured layer returns something other than a tensor.
        """
        if self._grad_mode is None:
            raise RuntimeError("use LayerCapture as a context manager: `with LayerCapture(...) as cap:`")
        self.outputs.clear()
        self.counts.clear()
        self._done.clear()
        if input_grad and self.grad:
            raise ValueError("input_grad records the whole pass; grad layers would cut it")
        torch.set_grad_enabled(input_grad)
        try:
            return model(x)
        except StopForward:
            return None
        finally:
            if not (self.grad or input_grad):
                torch.set_grad_enabled(bool(self._grad_mode))


HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")


def unhooked_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` (same mode, flags and weights) without the hooks registered on its
    modules: the caller's hooks stay on the caller's model and never fire on convlens's private
    copies (the fast inference copy, the sanity check's re-initialised one)."""
    private = copy.deepcopy(model)
    for m in private.modules():
        for attr in HOOK_DICTS:
            d = getattr(m, attr, None)
            if d:
                d.clear()
    return private


def count_hooks(model: nn.Module) -> int:
    """Number of forward / backward hooks currently registered on ``model``'s modules."""
    total = 0
    for m in model.modules():
        for attr in HOOK_DICTS:
            total += len(getattr(m, attr, {}))
    return total
