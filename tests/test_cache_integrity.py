"""A cache entry proves what it is; pruning touches only the cache's own files (issue 24, cases 6, 7)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
from tests.test_cache import OPTS, _same, _tiny

from convlens import feature_visualization
from convlens.cache import FeatureCache

pytestmark = pytest.mark.usefixtures("one_thread")


def _entries(folder: Path) -> list[Path]:
    return sorted((folder / "featureviz").glob("*.npz"))


def test_swapped_entries_are_never_served(tmp_path, caplog):
    """Case 6: the contents of three entries rotated between their files: the next run gives
    exactly the fresh result (three misses, one warning each), and the entries are rewritten."""
    net = _tiny()
    fresh = feature_visualization(net, "2", [0, 1, 2], cache=False, **OPTS)
    feature_visualization(net, "2", [0, 1, 2], cache=tmp_path, **OPTS)
    files = _entries(tmp_path)
    data = [p.read_bytes() for p in files]
    for p, d in zip(files, data[1:] + data[:1]):
        p.write_bytes(d)
    with caplog.at_level(logging.WARNING, logger="convlens.cache"):
        again = feature_visualization(net, "2", [0, 1, 2], cache=tmp_path, **OPTS)
    assert _same(again, fresh) and again.settings["cache"]["misses"] == 3
    assert sum("another key" in r.getMessage() for r in caplog.records) == 3
    third = feature_visualization(net, "2", [0, 1, 2], cache=tmp_path, **OPTS)
    assert third.settings["cache"]["hits"] == 3 and _same(third, fresh)


def _forge(path: Path, change) -> None:
    """Rewrite an entry with its arrays changed and a proof that matches them (as a careful forger would)."""
    with np.load(path, allow_pickle=False) as z:
        arrays = {n: z[n] for n in z.files}
    meta = json.loads(str(arrays.pop("__convlens__")))
    change(arrays)
    from convlens.cache import _digest

    meta["digest"] = _digest(arrays)
    np.savez(path.with_suffix(".tmp.npz"), **arrays, __convlens__=np.array(json.dumps(meta)))
    path.with_suffix(".tmp.npz").replace(path)


@pytest.mark.parametrize("damage", ["string-dtype", "all-nan", "bytes-changed"])
def test_an_entry_of_the_right_shape_but_wrong_values_is_dropped(tmp_path, damage, caplog):
    """Case 6: a string dtype or all-NaN values with the right shape (and a matching digest), or
    bytes changed under the digest: dropped with one warning, recomputed, rewritten; later runs hit."""
    net = _tiny()
    fresh = feature_visualization(net, "2", [4], cache=False, **OPTS)
    feature_visualization(net, "2", [4], cache=tmp_path, **OPTS)
    (entry,) = _entries(tmp_path)
    if damage == "string-dtype":
        _forge(entry, lambda a: a.update(image=np.full(a["image"].shape, "x")))
    elif damage == "all-nan":
        _forge(entry, lambda a: a.update(image=np.full(a["image"].shape, np.nan, np.float32)))
    else:
        with np.load(entry, allow_pickle=False) as z:
            arrays = {n: z[n] for n in z.files}
        arrays["image"] = arrays["image"] + 1
        np.savez(entry.with_suffix(".tmp.npz"), **arrays)
        entry.with_suffix(".tmp.npz").replace(entry)
    with caplog.at_level(logging.WARNING, logger="convlens.cache"):
        again = feature_visualization(net, "2", [4], cache=tmp_path, **OPTS)
    assert _same(again, fresh) and again.settings["cache"]["misses"] == 1
    assert len([r for r in caplog.records if "dropping" in r.getMessage()]) == 1
    assert feature_visualization(net, "2", [4], cache=tmp_path, **OPTS).settings["cache"]["hits"] == 1


def test_pruning_never_touches_a_folder_without_the_marker(tmp_path, monkeypatch):
    """Case 7: the cache's featureviz folder is a symlink to a user's folder: a tiny size limit
    prunes nothing there (the user's experiment0..2.npz stay), and no marker is written into it."""
    from convlens.cache import MARKER

    user = tmp_path / "experiments"
    user.mkdir()
    for i in range(3):
        np.savez(user / f"experiment{i}.npz", x=np.arange(50_000, dtype=np.float64) + i)
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "featureviz").symlink_to(user)
    monkeypatch.setenv("CONVLENS_CACHE_MB", "0.5")
    feature_visualization(_tiny(), "2", [0, 1], cache=cache, **OPTS)
    assert sorted(p.name for p in user.glob("experiment*.npz")) == [f"experiment{i}.npz" for i in range(3)]
    assert not (user / MARKER).exists()
    # a real folder without the marker holding other files is not pruned either
    fc = FeatureCache(user.parent / "plain", max_bytes=1)
    fc.folder.mkdir(parents=True)
    np.savez(fc.folder / "experiment0.npz", x=np.zeros(10))
    assert fc.prune() == 0 and (fc.folder / "experiment0.npz").exists()


def test_pruning_in_the_cache_removes_only_its_own_entries(tmp_path):
    """In a marked folder, a file named like an entry whose contents are not one (a user's .npz
    renamed into it) is not removed; the cache's own entries are."""
    from convlens.cache import MARKER

    fc = FeatureCache(tmp_path, max_bytes=1)
    k1, k2 = fc.key({"unit": 1}), fc.key({"unit": 2})
    fc.put(k1, {"x": np.zeros(100, np.float32)})
    assert (fc.folder / MARKER).is_file()
    np.savez(fc.folder / f"{k2}.npz", x=np.zeros(100))  # the right name, foreign contents
    (fc.folder / "notes.npz").write_bytes(b"PK\x03\x04 user file")
    assert fc.prune() == 1
    assert not fc.path(k1).exists() and fc.path(k2).exists() and (fc.folder / "notes.npz").exists()
