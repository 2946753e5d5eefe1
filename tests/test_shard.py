"""`--shard I/N`: a deterministic, disjoint, covering split of the images by sorted name."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import convlens
from convlens.cli import main
from convlens.explain import ExplainError, collect_images, explain, parse_shard, select_shard


def test_parse_shard_values_and_errors():
    assert parse_shard("1/4") == (1, 4) and parse_shard(" 3 / 3 ") == (3, 3) and parse_shard((2, 5)) == (2, 5)
    for bad in ("0/4", "5/4", "1/0", "a/b", "1-4", "1/4/2", "-1/4", ""):
        with pytest.raises(ValueError, match="shard"):
            parse_shard(bad)


def test_select_shard_round_robin_over_sorted_names():
    names = ["e.jpg", "a.jpg", "g.jpg", "c.jpg", "b.jpg", "f.jpg", "d.jpg"]
    items = [(n, f"/some/where/{n}") for n in names]
    parts = [[n for n, _ in select_shard(items, f"{i}/3")] for i in (1, 2, 3)]
    # sorted: a b c d e f g -> shard 1: a d g, shard 2: b e, shard 3: c f (kept in the input order)
    assert parts == [["a.jpg", "g.jpg", "d.jpg"], ["e.jpg", "b.jpg"], ["c.jpg", "f.jpg"]]
    assert select_shard(items, None) == items and select_shard(items, "1/1") == items
    # another machine: another folder name, another listing order -> the same split
    other = [(n, f"/mnt/x/{n}") for n in sorted(names, reverse=True)]
    assert [sorted(n for n, _ in select_shard(other, f"{i}/3")) for i in (1, 2, 3)] == [sorted(p) for p in parts]


def test_select_shard_duplicate_names_and_more_shards_than_items():
    items = [("cat.jpg", "a/cat.jpg"), ("cat.jpg", "b/cat.jpg"), ("ant.jpg", "b/ant.jpg")]
    # ranked: ant, cat (a/), cat (b/): equal names keep their order in the list
    assert select_shard(items, "1/2") == [("cat.jpg", "b/cat.jpg"), ("ant.jpg", "b/ant.jpg")]
    assert select_shard(items, "2/2") == [("cat.jpg", "a/cat.jpg")]
    assert [len(select_shard(items, f"{i}/5")) for i in range(1, 6)] == [1, 1, 1, 0, 0]


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("shard-photos")
    img = convlens.sample_image().resize((96, 80))
    for i, name in enumerate(["d.png", "a.png", "c.png", "b.png", "e.png"]):
        img.rotate(15 * i).save(d / name)
    return d


def test_explain_api_shard(photos: Path, clf: convlens.Classifier):
    items, _ = collect_images([photos])
    assert [n for n, _ in items] == ["a.png", "b.png", "c.png", "d.png", "e.png"]
    r = explain(photos, clf, techniques=["gradcam"], shard="2/2")
    assert [im.name for im in r.images] == ["b.png", "d.png"] and r.settings["shard"] == "2/2"
    with pytest.raises(ExplainError, match="holds no image"):
        explain(photos, clf, techniques=["gradcam"], shard=(6, 6))
    with pytest.raises(ExplainError, match="shard"):
        explain(photos, clf, techniques=["gradcam"], shard="0/2")


def test_cli_shards_cover_the_folder_once(photos: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    names = []
    for i in (1, 2):
        out = tmp_path / f"out{i}"
        assert main(["explain", str(photos), "--techniques", "gradcam", "--shard", f"{i}/2", "--out", str(out),
                     "--device", "cpu"]) == 0
        s = json.loads((out / f"shard-{i}-of-2" / "summary.json").read_text())  # a shard writes into its own folder
        names.append([im["name"] for im in s["images"]])
    assert names == [["a.png", "c.png", "e.png"], ["b.png", "d.png"]]
    capsys.readouterr()
    assert main(["explain", str(photos), "--shard", "6/6", "--out", str(tmp_path / "x")]) == 0
    assert "holds no image" in capsys.readouterr().out and not (tmp_path / "x").exists()
    with pytest.raises(SystemExit) as e:
        main(["explain", str(photos), "--shard", "3/2", "--out", str(tmp_path / "y")])
    assert e.value.code == 2 and "1 <= I <= N" in capsys.readouterr().err
