"""Shared fixtures: the real default model (loaded once), the bundled sample photo, and the devices;
and the one model-state check every "the user's model is untouched" test uses (``snapshot`` /
``assert_unchanged``; import them with ``from conftest import snapshot, assert_unchanged``)."""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

import convlens
from convlens.hooks import count_hooks

#: every device present: the technique tests run on each (CUDA only where a GPU exists)
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(autouse=True, scope="session")
def _private_cache(tmp_path_factory: pytest.TempPathFactory):
    """Every test runs with its own feature-visualisation cache folder, never the user's."""
    before = os.environ.get("CONVLENS_CACHE")
    os.environ["CONVLENS_CACHE"] = str(tmp_path_factory.mktemp("convlens-cache"))
    yield
    if before is None:
        os.environ.pop("CONVLENS_CACHE", None)
    else:
        os.environ["CONVLENS_CACHE"] = before


@pytest.fixture(scope="session")
def clf() -> convlens.Classifier:
    """The offline default classifier on the CPU. Tests must not change it (the guard tests check)."""
    torch.manual_seed(0)
    return convlens.load_model(device="cpu")


@pytest.fixture(scope="session")
def sample_x(clf: convlens.Classifier) -> torch.Tensor:
    """The bundled sample photo, preprocessed: (1, 3, 224, 224)."""
    return clf.preprocess(convlens.sample_image())


@pytest.fixture(params=DEVICES)
def device(request: pytest.FixtureRequest) -> str:
    """Each device present: ``"cpu"``, and ``"cuda"`` where a GPU is available."""
    return request.param


@pytest.fixture(scope="module")
def one_thread():
    """One OpenMP thread for a module's tests (``pytestmark = pytest.mark.usefixtures("one_thread")``):
    on a shared 2-core machine two spinning threads per process are many times slower than one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def snapshot(model: nn.Module) -> dict:
    """Everything of ``model`` a convlens call must leave as it was, copied now.

    Covers the module tree (the same module objects under the same names: nothing swapped, no
    ``forward`` patched onto an instance), every module's ``training`` and ``inplace`` flag, the
    parameter objects, their ``requires_grad``, their ``.grad`` (the same tensor object, same
    values), the values of the state dict and of every buffer (non-persistent ones too), the
    number of hooks (``convlens.hooks.count_hooks``), and the caller's grad / inference mode.
    """
    modules = list(model.named_modules())
    params = list(model.named_parameters())
    return {
        "modules": [(name, id(m)) for name, m in modules],
        "patched": [name for name, m in modules if "forward" in vars(m)],
        "training": [m.training for _, m in modules],
        "inplace": [getattr(m, "inplace", None) for _, m in modules],
        "params": [(name, id(p)) for name, p in params],
        "requires_grad": [p.requires_grad for _, p in params],
        "grad_ids": [None if p.grad is None else id(p.grad) for _, p in params],
        "grads": [None if p.grad is None else p.grad.detach().clone() for _, p in params],
        "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "buffers": {k: v.detach().clone() for k, v in model.named_buffers()},
        "hooks": count_hooks(model),
        "grad_mode": (torch.is_grad_enabled(), torch.is_inference_mode_enabled()),
    }


def assert_unchanged(model: nn.Module, before: dict) -> None:
    """Assert ``model`` is exactly as ``snapshot(model)`` found it (``before``); values compared exactly."""
    after = snapshot(model)
    for key in ("modules", "patched", "training", "inplace", "params", "requires_grad", "grad_ids", "hooks",
                "grad_mode"):
        assert after[key] == before[key], key
    for (name, _), a, b in zip(after["params"], before["grads"], after["grads"]):
        assert (a is None and b is None) or torch.equal(a, b), f"{name}.grad"
    for key in ("state", "buffers"):
        assert after[key].keys() == before[key].keys(), key
        for name, v in before[key].items():
            assert torch.equal(after[key][name], v), f"{key} {name}"


@pytest.fixture(scope="module")
def small():
    """A small random-BN net and two 64 px images of smooth blobs plus noise (compare, evidence)."""
    from tests.test_occlusion import SmallNet, _randomise_bn

    torch.manual_seed(0)
    net = _randomise_bn(SmallNet()).eval()
    g = torch.Generator().manual_seed(2)
    blobs = torch.nn.functional.interpolate(torch.randn(2, 3, 4, 4, generator=g), size=64, mode="bilinear")
    return net, 2 * blobs + 0.3 * torch.randn(2, 3, 64, 64, generator=g)


def tiny() -> nn.Sequential:
    """A fixed-weight 3-class net of two small convolutions (seed 0), for the API-shape tests."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 5, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(5, 3),
    ).eval()


def tiny_classifier() -> convlens.Classifier:
    """:func:`tiny` as a Classifier of 16 px inputs with labels a, b, c."""
    return convlens.Classifier(tiny(), mean=(0.5,) * 3, std=(0.25,) * 3, size=16, labels=["a", "b", "c"])
