"""Shared fixtures: the real default model (loaded once), the bundled sample photo, and the devices."""

from __future__ import annotations

import pytest
import torch

import convlens

#: every device present: the technique tests run on each (CUDA only where a GPU exists)
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


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
