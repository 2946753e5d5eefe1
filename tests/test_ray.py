"""convlens[ray]: shards as Ray tasks on a local Ray (this machine's cores), merged like the CLI."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import ray  # in the test extra (and convlens[ray])

from convlens.parallel import explain_on_ray

HERE = Path(__file__).parent


def make_tiny():
    sys.path.insert(0, str(HERE))
    from test_outputs import tiny

    return tiny()


def test_shards_as_ray_tasks_equal_one_run(tmp_path: Path) -> None:
    import convlens
    from test_resume import photos, same_images

    photos(tmp_path / "in", 5)
    kwargs = {"techniques": ["gradcam", "occlusion"], "options": {"occlusion": {"patch": 16, "stride": 16}}}
    convlens.explain(tmp_path / "in", make_tiny(), out=tmp_path / "one", **kwargs)
    src = str(Path(convlens.__file__).parents[1])
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False,
             runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join([src, str(HERE)]), "OMP_NUM_THREADS": "1"}})
    try:
        merged = explain_on_ray(tmp_path / "in", tmp_path / "run", shards=3, make_model=make_tiny, **kwargs)
    finally:
        ray.shutdown()
    assert sorted(p.name for p in (tmp_path / "run").iterdir() if p.is_dir()) == [
        "shard-1-of-3", "shard-2-of-3", "shard-3-of-3"]
    one = json.loads((tmp_path / "one" / "summary.json").read_text())
    same_images(merged["images"], one["images"])
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["images"] == json.loads(
        json.dumps(merged["images"]))
