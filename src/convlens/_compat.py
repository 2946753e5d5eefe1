"""Renamed keyword arguments keep working for one release, with a DeprecationWarning naming the new one."""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from typing import Any, TypeVar

F = TypeVar("F", bound=Callable[..., Any])

# the keyword names every public function uses for the model and the images (docs/api.md)
MODEL, IMAGES = "model", "images"


def renamed(**old: str | tuple[str, Callable[[Any], Any]]) -> Callable[[F], F]:
    """Accept old keyword spellings: ``old_name="new_name"``, or ``old_name=("new_name", convert)``
    when the value changes shape too (``occlusion={...}`` -> ``options={"occlusion": {...}}``).

    A call with an old keyword warns (``DeprecationWarning``, naming the new keyword) and runs as if
    the new one were given; both at once is a ``TypeError``. The signature stays the new one.

    Example::

        @renamed(model_or_classifier="model", x="images")
        def grad_cam(model, images, *, target=None): ...
    """

    def wrap(fn: F) -> F:
        @functools.wraps(fn)
        def call(*args: Any, **kwargs: Any) -> Any:
            for name, spec in old.items():
                if name not in kwargs:
                    continue
                new, convert = (spec, None) if isinstance(spec, str) else spec
                if new in kwargs:
                    raise TypeError(f"{fn.__name__}() got both {name}= and {new}=; {name}= is the old name of {new}=")
                warnings.warn(
                    f"{fn.__name__}(): {name}= is deprecated and will be removed in the next release; use {new}=",
                    DeprecationWarning, stacklevel=2,
                )
                value = kwargs.pop(name)
                kwargs[new] = convert(value) if convert else value
            return fn(*args, **kwargs)

        call.renamed = dict(old)  # type: ignore[attr-defined]  # read by the tests and the docs
        return call  # type: ignore[return-value]

    return wrap


# the old spellings of the model and the images arguments, for the functions that had them
MODEL_AND_IMAGES = {"model_or_classifier": MODEL, "x": IMAGES}


def method_options(method: Any, options: dict[str, Any] | None) -> dict[str, Any]:
    """The options of one map ``method`` out of ``options={"occlusion": {...}, "gradcam": {...}}``,
    the one way per-method options are passed (``explain``, ``compare``, ``sanity_check``,
    ``class_sensitivity``). A flat dict for a named method (``options={"patch": 32}``) is the old
    spelling: it warns and is used as it is. A callable method gets ``options`` as given.

    Example::

        method_options("occlusion", {"occlusion": {"patch": 32}})   # {"patch": 32}
    """
    if not options:
        return {}
    if not isinstance(method, str):
        return dict(options)
    if all(isinstance(v, dict) for v in options.values()):  # keyed (an option's value is never a dict)
        return dict(options.get(method) or {})
    warnings.warn(
        f"options= for one method is deprecated and will be removed in the next release; key it by the method: "
        f"options={{{method!r}: {dict(options)!r}}}",
        DeprecationWarning, stacklevel=3,
    )
    return dict(options)


def deprecated(old: str, new: str, *, stacklevel: int = 3) -> None:
    """Warn (``DeprecationWarning``) that the calling form ``old`` goes away in the next release; use ``new``."""
    warnings.warn(f"{old} is deprecated and will be removed in the next release; use {new}", DeprecationWarning,
                  stacklevel=stacklevel)


def index_keyword(fn: F) -> F:
    """``plot(0)``, the old positional image index, keeps working as ``plot(index=0)`` with a warning.

    Example::

        @index_keyword
        def plot(self, *, index=0, title=None): ...
    """

    @functools.wraps(fn)
    def call(self: Any, *args: Any, **kwargs: Any) -> Any:
        if args:
            if len(args) > 1 or "index" in kwargs:
                raise TypeError(f"{fn.__name__}() takes the image as index=, and its other arguments by keyword")
            deprecated(f"{type(self).__name__}.{fn.__name__}({args[0]!r}), a positional index,",
                       f"{fn.__name__}(index={args[0]!r})")
            kwargs["index"] = args[0]
        return fn(self, **kwargs)

    return call  # type: ignore[return-value]


def old_save_form(result: Any, path: Any, old: dict[str, Any], new: str) -> bool:
    """True (with a warning) when ``save(path, ...)`` is the old form: ``path`` ends in ``.png`` or
    ``.npy`` (the old files' stem) or an old keyword is given (``index=``, ``prefix=``, plot arguments)."""
    import os

    suffix = os.path.splitext(os.fspath(path))[1].lower()
    if not old and suffix not in (".png", ".npy"):
        return False
    how = f"keyword(s) {', '.join(sorted(old))}" if old else f"a {suffix} path"
    deprecated(f"{type(result).__name__}.save() with {how} (the old files <path>.png, <path>.npy)",
               f"{new}, which writes <folder>/<name>.png, .npy and .json", stacklevel=4)
    return True
