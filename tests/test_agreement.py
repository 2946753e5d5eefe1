"""Spearman rank correlation of Grad-CAM and occlusion (at their common grid), stored per image by explain."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import spearmanr

import convlens
from convlens.explain import spearman


def test_spearman_matches_scipy_with_ties():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(30, 40))
    b = a + rng.normal(size=(30, 40))
    tied = np.round(b * 2) / 2  # many ties, as occlusion's window grid gives
    for x, y in ((a, b), (a, tied), (np.round(a), tied)):
        assert spearman(x, y) == pytest.approx(spearmanr(x.ravel(), y.ravel()).statistic, abs=1e-12)
    assert spearman(a, a * 3 + 1) == pytest.approx(1.0) and spearman(a, -a) == pytest.approx(-1.0)
    assert spearman(a, np.exp(a)) == pytest.approx(1.0)  # ranks only: any increasing map agrees fully
    assert spearman(a, np.zeros_like(a)) is None and spearman(a, np.where(a > 0, np.nan, a)) is None
    with pytest.raises(ValueError, match="shapes"):
        spearman(a, a[:, :5])


def test_explain_stores_the_agreement(clf):
    fast = {"occlusion": {"patch": 56, "stride": 28}}
    r = convlens.explain(None, clf, techniques=["gradcam", "occlusion"], options=fast)
    im = r.images[0]
    cam, occ = im.results["gradcam"].to_numpy()[0], im.results["occlusion"].to_numpy()[0]
    rho = im.agreement["gradcam_occlusion_spearman"]
    # at the common grid (the coarser of Grad-CAM's 7 x 7 and occlusion's 7 x 7 windows): 32 px block means
    a, b = (m.reshape(7, 32, 7, 32).mean((1, 3)) for m in (cam, occ))
    assert rho == pytest.approx(spearmanr(a.ravel(), b.ravel()).statistic, abs=1e-6)
    from convlens.report import summary_dict

    assert summary_dict(r)["images"][0]["agreement"] == {"gradcam_occlusion_spearman": rho}
    only = convlens.explain(None, clf, techniques=["gradcam"])
    assert only.images[0].agreement == {}
