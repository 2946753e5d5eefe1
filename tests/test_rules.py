"""convlens._scaling.minmax and convlens.checks.choose: one rule each for min-max scaling and names."""

from __future__ import annotations

import numpy as np
import torch

from convlens._scaling import minmax


def test_numpy_whole_array_and_constant():
    a = np.array([[2.0, 4.0], [6.0, 10.0]], dtype=np.float32)
    np.testing.assert_array_equal(minmax(a), np.array([[0.0, 0.25], [0.5, 1.0]], dtype=np.float32))
    assert minmax(a).dtype == np.float32
    np.testing.assert_array_equal(minmax(np.full((2, 3), 7.0)), np.zeros((2, 3)))


def test_torch_per_image_with_a_constant_image():
    x = torch.tensor([[[[1.0, 3.0]]], [[[5.0, 5.0]]]])  # (2, 1, 1, 2): the second image is constant
    out = minmax(x, (1, 2, 3))
    assert torch.equal(out, torch.tensor([[[[0.0, 1.0]]], [[[0.0, 0.0]]]]))
    assert not torch.isnan(out).any()


def test_dims_scale_each_slice_on_its_own():
    a = np.array([[0.0, 2.0], [10.0, 30.0]])
    np.testing.assert_array_equal(minmax(a, 1), np.array([[0.0, 1.0], [0.0, 1.0]]))
    np.testing.assert_array_equal(minmax(a, 0), np.array([[0.0, 0.0], [1.0, 1.0]]))


def test_names_are_checked_by_one_rule():
    import pytest

    from convlens.checks import choose

    allowed = ("gradcam", "occlusion", "trust")
    assert choose(" occlusion, gradcam,occlusion ", allowed, "technique") == ("occlusion", "gradcam")
    assert choose("all", allowed, "technique") == allowed
    assert choose(["trust"], allowed, "technique") == ("trust",)
    with pytest.raises(ValueError, match=r"^unknown technique 'gradcma'; choose from gradcam, occlusion, trust$"):
        choose("gradcma", allowed, "technique")
    with pytest.raises(KeyError, match="unknown methods 'a', 'b'"):
        choose(["a", "b", "gradcam"], allowed, "method", error=KeyError)
    with pytest.raises(ValueError, match="none given"):
        choose(" , ", allowed, "technique")
