"""The feature-visualisation cache: exact hits, per-channel reuse, keys, size bound, two processes."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import convlens
from convlens import feature_visualization
from convlens.cache import FeatureCache, cache_dir, model_digest, open_cache

OPTS = {"steps": 8, "size": 32}


TINY_SRC = textwrap.dedent('''
    import torch
    from torch import nn


    def _tiny():
        """conv(3->6) relu conv(6->8, stride 2) relu pool fc(8->5), fixed random weights."""
        g = torch.Generator().manual_seed(3)
        net = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 8, 3, stride=2, padding=1),
                            nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5))
        with torch.no_grad():
            for p in net.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.4)
        return net.eval()
    ''')
_ns: dict = {}
exec(TINY_SRC, _ns)  # the same net in this process and in the worker processes below
_tiny = _ns["_tiny"]


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one OpenMP thread per module


def _same(a: convlens.FeatureImages, b: convlens.FeatureImages) -> bool:
    return (torch.equal(a.images, b.images) and torch.equal(a.objective, b.objective)
            and torch.equal(a.history, b.history) and torch.equal(a.inputs, b.inputs) and a.dead == b.dead)


def _entries(folder: Path) -> list[Path]:
    return sorted((folder / "featureviz").glob("*.npz"))


# -- where the cache is --------------------------------------------------------------------------
def test_cache_dir_env_path_off_and_platform_default(monkeypatch, tmp_path):
    import platformdirs

    monkeypatch.setenv("CONVLENS_CACHE", str(tmp_path / "c"))
    assert cache_dir(True) == tmp_path / "c"
    assert cache_dir(tmp_path / "x") == tmp_path / "x" and cache_dir(str(tmp_path)) == tmp_path
    assert cache_dir(False) is None and cache_dir(None) is None
    for off in ("off", "0", "false", "OFF"):
        monkeypatch.setenv("CONVLENS_CACHE", off)
        assert cache_dir(True) is None
    monkeypatch.delenv("CONVLENS_CACHE")
    assert cache_dir(True) == Path(platformdirs.user_cache_dir("convlens"))
    with pytest.raises(ValueError, match="cache is True"):
        cache_dir(3)  # type: ignore[arg-type]


def test_limit_from_env(monkeypatch, tmp_path):
    monkeypatch.setenv("CONVLENS_CACHE_MB", "1.5")
    assert FeatureCache(tmp_path).max_bytes == int(1.5 * 2**20)
    monkeypatch.delenv("CONVLENS_CACHE_MB")
    assert FeatureCache(tmp_path).max_bytes == 500 * 2**20
    for bad in ("lots", "-1", "0", "inf"):
        monkeypatch.setenv("CONVLENS_CACHE_MB", bad)
        with pytest.raises(ValueError, match="CONVLENS_CACHE_MB"):
            FeatureCache(tmp_path)


# -- the model digest ----------------------------------------------------------------------------
def test_model_digest_stable_and_follows_the_weights():
    a, b = _tiny(), _tiny()
    d = model_digest(a)
    assert len(d) == 64 and d == model_digest(b) == model_digest(a)
    with torch.no_grad():
        b[0].weight[0, 0, 0, 0] += 1e-6  # the smallest change of one weight
    assert model_digest(b) != d
    b.load_state_dict(a.state_dict())
    assert model_digest(b) == d
    c = _tiny()
    c[1] = nn.ReLU6()  # same weights, another architecture
    assert model_digest(c) != d


# -- exact hits, per channel -------------------------------------------------------------------
def test_hit_gives_exactly_the_fresh_result(tmp_path):
    net = _tiny()
    fresh = feature_visualization(net, "2", [0, 3, 5], **OPTS)
    first = feature_visualization(net, "2", [0, 3, 5], cache=tmp_path, **OPTS)
    again = feature_visualization(net, "2", [0, 3, 5], cache=tmp_path, **OPTS)
    assert first.settings["cache"]["misses"] == 3 and again.settings["cache"] == {
        "folder": str(tmp_path / "featureviz"), "hits": 3, "misses": 0}
    assert _same(fresh, first) and _same(fresh, again)
    assert len(_entries(tmp_path)) == 3
    assert "cache" not in fresh.settings and not any(tmp_path.glob("featureviz/.tmp-*"))


@pytest.mark.parametrize("param", ["fourier", "pixel"])
def test_only_missing_channels_are_optimised(tmp_path, param, monkeypatch):
    net = _tiny()
    opts = {**OPTS, "param": param}
    some = feature_visualization(net, "2", [3, 6], cache=tmp_path, **opts)
    import convlens.methods.featureviz as fv

    seen: list[list[int]] = []
    real = fv._optimise

    def spy(clf, name, module, kind, units, *a, **k):
        seen.append(list(units))
        return real(clf, name, module, kind, units, *a, **k)

    monkeypatch.setattr(fv, "_optimise", spy)
    mixed = feature_visualization(net, "2", [3, 1, 6], cache=tmp_path, **opts)
    assert seen == [[1]] and mixed.settings["cache"]["hits"] == 2
    alone = feature_visualization(net, "2", [1], **opts)
    for i, j in ((0, 0), (2, 1)):
        assert torch.equal(mixed.images[i], some.images[j]) and torch.equal(mixed.objective[i], some.objective[j])
    assert torch.equal(mixed.images[1], alone.images[0]) and torch.equal(mixed.history[:, 1], alone.history[:, 0])
    # and the channel is what a fresh batch of all three gives (up to float rounding of the batch)
    batch = feature_visualization(net, "2", [3, 1, 6], **opts)
    assert torch.allclose(batch.images, mixed.images, atol=1e-4)


def test_channel_independent_of_batch_with_standard_transforms():
    """Every image draws its transforms from its own generator: the batch does not change it."""
    net = _tiny()
    opts = {"steps": 12, "size": 40}  # the standard transforms (pad, jitter, scale, rotate)
    batch = feature_visualization(net, "2", [0, 2, 5, 2], **opts)
    for i, c in enumerate([0, 2, 5]):
        alone = feature_visualization(net, "2", [c], **opts)
        assert torch.allclose(batch.images[i], alone.images[0], atol=1e-4)
        assert torch.allclose(batch.history[:, i], alone.history[:, 0], rtol=1e-4, atol=1e-5)
    # the second image of channel 2 has its own seed
    assert not torch.allclose(batch.images[1], batch.images[3], atol=1e-2)


def test_key_covers_settings_seed_layer_weights_and_repeats(tmp_path):
    net = _tiny()
    feature_visualization(net, "2", [1], cache=tmp_path, **OPTS)
    for change in ({"seed": 1}, {"steps": 9}, {"lr": 0.04}, {"size": 36}, {"param": "pixel"},
                   {"transforms": ()}, {"objective": "neuron"}):
        res = feature_visualization(net, "2", [1], cache=tmp_path, **{**OPTS, **change})
        assert res.settings["cache"]["misses"] == 1, change
    assert feature_visualization(net, "0", [1], cache=tmp_path, **OPTS).settings["cache"]["misses"] == 1
    twice = feature_visualization(net, "2", [1, 1], cache=tmp_path, **OPTS)  # the 2nd is a new image
    assert twice.settings["cache"] == {"folder": str(tmp_path / "featureviz"), "hits": 1, "misses": 1}
    with torch.no_grad():
        net[2].bias[1] += 0.5
    assert feature_visualization(net, "2", [1], cache=tmp_path, **OPTS).settings["cache"]["misses"] == 1


def test_not_cached_with_diversity_or_callables(tmp_path):
    net = _tiny()
    r = feature_visualization(net, "2", [1, 1], diversity=5.0, cache=tmp_path, **OPTS)
    feature_visualization(net, "2", 1, objective=lambda a: a[:, 0].mean((1, 2)), cache=tmp_path, **OPTS)
    feature_visualization(net, "2", [1], transforms=[lambda x, g: x], cache=tmp_path, **OPTS)
    assert _entries(tmp_path) == [] and "cache" not in r.settings


def test_damaged_entry_is_a_miss_and_is_rewritten(tmp_path):
    net = _tiny()
    first = feature_visualization(net, "2", [4], cache=tmp_path, **OPTS)
    (entry,) = _entries(tmp_path)
    entry.write_bytes(entry.read_bytes()[:100])  # truncated, as a full disk would leave it
    again = feature_visualization(net, "2", [4], cache=tmp_path, **OPTS)
    assert again.settings["cache"]["misses"] == 1 and _same(first, again)
    assert feature_visualization(net, "2", [4], cache=tmp_path, **OPTS).settings["cache"]["hits"] == 1


# -- the size bound ---------------------------------------------------------------------------
def test_size_bound_removes_least_recently_used_first(tmp_path):
    fc = FeatureCache(tmp_path, max_bytes=3 * 4096 + 3 * 1400)  # room for three entries of 4 KiB (+ their proof)
    a = np.arange(1024, dtype=np.float32)
    key = {c: fc.key({"unit": c}) for c in "abcd"}  # entries are named by their keys (64 hex digits)
    for i, c in enumerate("abcd"):
        fc.put(key[c], {"x": a + i})
        os.utime(fc.path(key[c]), (1000 + i, 1000 + i))  # a written before b before c before d
    assert fc.get(key["a"])["x"][0] == 0  # a hit makes "a" the most recently used
    assert fc.prune() == 1
    assert fc.get(key["b"]) is None and all(fc.get(key[c]) is not None for c in "acd")
    assert fc.size() <= fc.max_bytes


def test_feature_visualization_keeps_the_cache_under_its_limit(tmp_path, monkeypatch):
    net = _tiny()
    feature_visualization(net, "2", [0], cache=tmp_path, **OPTS)
    one = _entries(tmp_path)[0].stat().st_size
    monkeypatch.setenv("CONVLENS_CACHE_MB", str(2.5 * one / 2**20))
    feature_visualization(net, "2", [1, 2, 3, 4], cache=tmp_path, **OPTS)
    left = _entries(tmp_path)
    assert len(left) == 2 and sum(p.stat().st_size for p in left) <= 2.5 * one


def test_unwritable_cache_folder_still_gives_the_result(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    net = _tiny()
    res = feature_visualization(net, "2", [1], cache=blocker / "sub", **OPTS)
    assert _same(res, feature_visualization(net, "2", [1], **OPTS))


# -- two processes at once ----------------------------------------------------------------------
def test_two_processes_share_one_cache(tmp_path):
    folder = tmp_path / "cache"
    script = tmp_path / "worker.py"
    script.write_text(TINY_SRC + textwrap.dedent('''
    import sys, numpy as np, torch
    torch.set_num_threads(1)
    from convlens import feature_visualization
    chans = [int(c) for c in sys.argv[2].split(",")]
    for _ in range(3):
        r = feature_visualization(_tiny(), "2", chans, steps=8, size=32, cache=sys.argv[1])
    np.save(sys.argv[3], r.images.numpy())
    '''))
    src = str(Path(convlens.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, str(script), str(folder), chans, str(tmp_path / f"{i}.npy")], env=env)
             for i, chans in enumerate(("0,1,2,3,4,5", "5,4,3,2,1,0"))]
    assert [p.wait(timeout=300) for p in procs] == [0, 0]
    fresh = feature_visualization(_tiny(), "2", [0, 1, 2, 3, 4, 5], **OPTS).images.numpy()
    # each entry may come from either process (their batches differ in order: float rounding)
    assert np.allclose(np.load(tmp_path / "0.npy"), fresh, atol=1e-5)
    assert np.allclose(np.load(tmp_path / "1.npy"), fresh[::-1], atol=1e-5)
    assert len(_entries(folder)) == 6 and not list((folder / "featureviz").glob(".tmp-*"))
    fc = open_cache(folder)
    assert all(fc.get(p.stem) is not None for p in _entries(folder))


# -- explain and the CLI ----------------------------------------------------------------------
def test_explain_second_image_reads_channels_of_the_first(tmp_path, clf, monkeypatch):
    import convlens.methods.featureviz as fv

    folder = tmp_path / "photos"
    folder.mkdir()
    img = convlens.sample_image()
    img.save(folder / "a.png")
    img.transpose(0).save(folder / "b.png")  # mirrored: the same channels fire most
    optimised: list[list[int]] = []
    real = fv._optimise
    monkeypatch.setattr(fv, "_optimise", lambda c, n, m, k, units, *a, **kw: (optimised.append(list(units)),
                                                                               real(c, n, m, k, units, *a, **kw))[1])
    settings = {"filters": {"channels": 3, "steps": 3, "size": 32, "budget": None}}  # every top channel
    r = convlens.explain(folder, clf, techniques=["filters"], options=settings, cache=tmp_path / "c")
    a, b = r.images
    assert r.settings["cache"] == str(tmp_path / "c") and a.ok and b.ok
    shared = set(a.channels["filters"]) & set(b.channels["filters"])
    assert shared and b.channels.get("filters_cached") == len(shared) and "filters_cached" not in a.channels
    rest = [c for c in b.channels["filters"] if c not in shared]  # only these were optimised for b
    assert optimised == [a.channels["filters"]] + ([rest] if rest else [])
    for c in shared:
        i, j = a.channels["filters"].index(c), b.channels["filters"].index(c)
        assert torch.equal(a.results["filters"].images[i], b.results["filters"].images[j])
    off = convlens.explain(folder / "a.png", clf, techniques=["filters"], options=settings, cache=False)
    assert off.settings["cache"] is None and torch.equal(off.images[0].results["filters"].images,
                                                         r.images[0].results["filters"].images)


def test_cli_no_cache(tmp_path, monkeypatch):
    from convlens.cli import main

    monkeypatch.setenv("CONVLENS_CACHE", str(tmp_path / "c"))
    # one thread for both runs: the command otherwise picks its thread count from the machine's load at
    # the time, and two counts sum in another order (a 1-ulp difference seen in CI)
    args = ["filters", "--layer", "blocks.1", "--channels", "0,1", "--steps", "2", "--size", "32", "--device", "cpu",
            "--threads", "1"]
    assert main([*args, "--no-cache", "--out", str(tmp_path / "o1")]) == 0
    assert _entries(tmp_path / "c") == []
    assert main([*args, "--out", str(tmp_path / "o2")]) == 0
    assert len(_entries(tmp_path / "c")) == 2
    assert np.array_equal(np.load(tmp_path / "o1" / "blocks.1" / "blocks.1.npy"),
                          np.load(tmp_path / "o2" / "blocks.1" / "blocks.1.npy"))


def test_bad_cache_settings_are_usage_errors(tmp_path, monkeypatch, capsys):
    from convlens.cli import main
    from convlens.explain import ExplainError

    monkeypatch.setenv("CONVLENS_CACHE_MB", "lots")
    with pytest.raises(ExplainError, match="CONVLENS_CACHE_MB"):
        convlens.explain(None, _tiny(), techniques=["filters"])
    assert main(["explain", "--techniques", "filters", "--out", str(tmp_path / "o"), "--device", "cpu"]) == 2
    assert "CONVLENS_CACHE_MB must be a number" in capsys.readouterr().err and not (tmp_path / "o").exists()
    with pytest.raises(ExplainError, match="cache is True"):
        convlens.explain(None, _tiny(), techniques=["filters"], cache=3)  # type: ignore[arg-type]
