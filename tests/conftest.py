"""Shared fixtures: the real default model (loaded once), the bundled sample photo, and the devices."""

from __future__ import annotations

import os

import pytest
import torch

import convlens

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
