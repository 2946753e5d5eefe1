"""Shared fixtures: the real default model (loaded once) and the bundled sample photo."""

from __future__ import annotations

import pytest
import torch

import convlens


@pytest.fixture(scope="session")
def clf() -> convlens.Classifier:
    """The offline default classifier on the CPU. Tests must not change it (the guard tests check)."""
    torch.manual_seed(0)
    return convlens.load_model(device="cpu")


@pytest.fixture(scope="session")
def sample_x(clf: convlens.Classifier) -> torch.Tensor:
    """The bundled sample photo, preprocessed: (1, 3, 224, 224)."""
    return clf.preprocess(convlens.sample_image())
