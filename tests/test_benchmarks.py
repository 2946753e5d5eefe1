"""The benchmark harness: discovery, skipping, table formatting and the report, on fake bench modules.

No timing is asserted: the fake modules return fixed rows, so every number in the markdown is known.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from benchmarks import run, sweep
from benchmarks.common import (
    NO_FLOOR,
    Row,
    agreement,
    compare_maps,
    fill_ratios,
    floor_cases,
    markdown_table,
    measure,
    peak_memory_mb,
    spread_pct,
)
from benchmarks.report import INTRO

FAKE = '''
from benchmarks.common import Row

def tables(quick, device):
    n = 2 if quick else 8
    rows = [
        Row("floor: forward", "tiny", n, 0.5),
        Row("ours", "tiny", n, 0.75, peak_mb=12.4, extra={"r vs peer": 0.98765}),
        Row("peer", "tiny", n, 2.0, extra={"max|Δ| vs x": 1.5e-07}),
    ]
    return [(f"Fake on {device}", rows)]
'''


@pytest.fixture
def bench_dir(tmp_path: Path) -> Path:
    (tmp_path / "bench_fake.py").write_text(FAKE)
    (tmp_path / "bench_broken.py").write_text("import convlens_no_such_module\n")
    (tmp_path / "bench_raises.py").write_text("def tables(quick, device):\n    raise RuntimeError('boom\\nline 2')\n")
    (tmp_path / "helper.py").write_text("x = 1\n")  # not a bench module
    return tmp_path


def test_discover_finds_bench_modules_only_and_filters(bench_dir: Path) -> None:
    assert list(run.discover(bench_dir)) == ["broken", "fake", "raises"]
    assert list(run.discover(bench_dir, ["fake", "bench_raises"])) == ["fake", "raises"]
    with pytest.raises(ValueError, match="no benchmark named nope"):
        run.discover(bench_dir, ["nope"])


def test_run_module_fills_ratios_and_formats_exact_values(bench_dir: Path) -> None:
    s = run.run_module("fake", bench_dir / "bench_fake.py", quick=True, device="cpu")
    assert s.note is None and not s.failed
    (title, rows), = s.tables
    assert title == "Fake on cpu"
    assert [r.ratio for r in rows] == [1.0, 1.5, 4.0]  # seconds / the floor row's 0.5
    lines = run.render_section(s).splitlines()
    assert lines[0] == "### Fake on cpu"
    assert lines[2] == "| method | model | batch | median s | x floor | peak MB | r vs peer | max\\|Δ\\| vs x |"
    assert lines[4] == "| floor: forward | tiny | 2 | 0.5000 | 1.00 | - | - | - |"
    assert lines[5] == "| ours | tiny | 2 | 0.7500 | 1.50 | 12 | 0.988 | - |"
    assert lines[6] == "| peer | tiny | 2 | 2.0000 | 4.00 | - | - | 1.5e-07 |"


def test_import_failure_is_skipped_and_errors_are_reported(bench_dir: Path) -> None:
    broken = run.run_module("broken", bench_dir / "bench_broken.py", quick=True, device="cpu")
    assert broken.tables == [] and not broken.failed
    assert broken.note.startswith("skipped: import failed (ModuleNotFoundError")
    raises = run.run_module("raises", bench_dir / "bench_raises.py", quick=True, device="cpu")
    assert raises.failed and raises.note == "failed: RuntimeError: boom line 2"
    assert run.render_section(raises) == "_bench_raises: failed: RuntimeError: boom line 2_\n"


def test_report_has_header_tables_and_a_reading_built_from_the_ratios(bench_dir: Path, tmp_path: Path) -> None:
    sections = [run.run_module(n, p, quick=False, device="cpu") for n, p in run.discover(bench_dir).items()]
    sections[1].tables[0][1][1].ratios = {"x peer": "peer"}  # "ours" declares a comparison with "peer"
    fill_ratios(sections[1].tables[0][1])
    info = {"torch": "9.9", "cores": 2}
    loads = {"load average (1, 5, 15 min)": "0.10, 0.20, 0.30 before; 1.90, 1.00, 0.50 after",
             "thread settings tried": "`2 default`, `2 passive`, `1`"}
    out = tmp_path / "out" / "BENCHMARKS.md"
    text = run.render_report(sections, command="python -m benchmarks", info=info, date="2030-01-01", run=loads,
                             total_seconds=12.4)
    run.write_report(out, text)
    written = out.read_text()
    for piece in ("- torch: 9.9", "- cores: 2", "0.10, 0.20, 0.30 before; 1.90, 1.00, 0.50 after",
                  "- thread settings tried: `2 default`, `2 passive`, `1`", "```bash\npython -m benchmarks\n```",
                  "- date: 2030-01-01 (whole run: 12 s)", "- devices: CPU only", "## fake",
                  "| ours | tiny | 8 | 0.7500 | 1.50 | 12 | 0.988 | - | 2.67 |",  # x peer = 2.0 / 0.75
                  "_bench_broken: skipped: import failed", "**Rule: every row is shown at its best thread setting**"):
        assert piece in written
    assert written.rstrip().endswith("- Fake on cpu: ours (-) is 2.67x faster than peer (`x peer`).")
    assert "## Tables" not in written and "second round" not in written
    assert list(out.parent.iterdir()) == [out]  # no temporary file left behind


def test_merge_keeps_each_row_at_its_best_setting_then_fills_ratios_between_best_settings() -> None:
    def rows(brute: float, ours: float, primary: bool) -> list[tuple[str, list[Row]]]:
        extra = {"r vs exact": 0.99} if primary else {"r vs exact": None}  # computed once, in the primary
        return [("occlusion", [Row("brute force", "m", 1, brute, floor=NO_FLOOR),
                               Row("ours", "m", 1, ours, extra={**extra, "IQR %": ours}, floor=NO_FLOOR,
                                   peak_mb=5.0 if primary else None, ratios={"x brute force": "brute force"})])]

    runs = {"2 default": rows(8.0, 2.0, True), "2 passive": rows(9.0, 1.0, False), "1": rows(6.0, 3.0, False)}
    ((title, merged),) = sweep.merge(runs)
    fill_ratios(merged)
    brute, ours = merged
    assert (brute.setting, brute.seconds, ours.setting, ours.seconds) == ("1", 6.0, "2 passive", 1.0)
    assert ours.extra == {"r vs exact": 0.99, "IQR %": 1.0, "x brute force": 6.0}  # correctness from the primary
    assert ours.peak_mb == 5.0 and brute.ratio is None and ours.ratio is None
    assert runs["2 passive"][0][1][1].extra == {"r vs exact": None, "IQR %": 1.0}  # the inputs are not changed
    md = markdown_table(title, merged)
    assert "| method | model | batch | threads | median s | peak MB | r vs exact | IQR % | x brute force |" in md
    assert "| ours | m | 1 | 2 passive | 1.0000 | 5 | 0.99 | 1 | 6 |" in md
    own = Row("cli", "m", 1, 4.0, setting="own policy")
    assert sweep.merge({"1": [("t", [own])]})[0][1][0].setting == "own policy"


def test_fill_ratios_declared_columns_and_no_floor() -> None:
    rows = [Row("floor: f", "a", 1, 2.0), Row("peer", "a", 1, 6.0), Row("ours", "a", 1, 3.0, ratios={"x": "peer"}),
            Row("alone", "a", 1, 5.0, floor=NO_FLOOR, ratios={"y": "missing"})]
    fill_ratios(rows)
    assert [r.ratio for r in rows] == [1.0, 3.0, 1.5, None]
    assert rows[2].extra == {"x": 2.0} and rows[3].extra == {"y": None}
    rows[2].seconds = 1.0  # recomputed after the seconds change (the harness does so after merging)
    assert fill_ratios(rows)[2].extra["x"] == 6.0 and rows[2].ratio == 0.5


def test_settings_and_their_worker_environments() -> None:
    assert [s.name for s in sweep.settings(2)] == ["2 default", "2 passive", "1"]
    assert [s.name for s in sweep.settings(1)] == ["1"]
    assert sweep.pick("1, 2 passive", sweep.settings(2)) == [sweep.Setting(1), sweep.Setting(2, True)]
    with pytest.raises(ValueError, match="no thread setting 3; have: 2 default, 2 passive, 1"):
        sweep.pick("3", sweep.settings(2))
    base = {"OMP_WAIT_POLICY": "ACTIVE", "OMP_NUM_THREADS": "7", "CONVLENS_THREADS": "auto", "HOME": "/h"}
    env = sweep.Setting(2).env(base, primary=True)
    assert (env["OMP_NUM_THREADS"], env["CONVLENS_BENCH_PRIMARY"], env["HOME"]) == ("2", "1", "/h")
    assert "OMP_WAIT_POLICY" not in env and "CONVLENS_THREADS" not in env
    env = sweep.Setting(2, passive=True).env(base, primary=False)
    assert (env["OMP_WAIT_POLICY"], env["CONVLENS_BENCH_PRIMARY"]) == ("PASSIVE", "0")


def _fake_swept(name, path, settings, args, device):
    section = run.run_module(name, path, quick=args.quick, device=device)
    for _, rows in section.tables:
        for r in rows:
            r.setting = settings[0].name
    return section


def test_busy_machine_prints_the_tables_but_does_not_write(tmp_path: Path, monkeypatch, capsys) -> None:
    (tmp_path / "bench_fake.py").write_text(FAKE)
    monkeypatch.setattr(run, "HERE", tmp_path)
    monkeypatch.setattr(run, "run_swept", _fake_swept)
    monkeypatch.setattr(run.sweep, "wait_policy_check", lambda: "same work")
    monkeypatch.setattr(run, "_load", lambda: (0.9, 0.4, 0.3))
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "B.md"
    assert run.main(["--out", str(out)]) == 3
    captured = capsys.readouterr()
    assert "| peer | tiny | 8 | 2 default | 2.0000 | 4.00 |" in captured.out
    assert "load average 0.90 (1 min) is above 0.5" in captured.err and not out.exists()
    assert run.main(["--out", str(out), "--force"]) == 0
    text = out.read_text()
    assert "0.90, 0.40, 0.30 before" in text and "written with --force above the limit" in text
    assert "- wait policy at 1 thread: same work" in text
    monkeypatch.setattr(run, "_load", lambda: (0.2, 0.4, 0.3))
    assert run.main(["--quick", "--only", "fake"]) == 0 and not (tmp_path / "BENCHMARKS.md").exists()
    assert run.main([]) == 0 and (tmp_path / "BENCHMARKS.md").exists()  # a full run writes the default file


def test_main_runs_a_worker_per_setting_and_exits_1_when_a_module_failed(tmp_path: Path, monkeypatch,
                                                                         capsys) -> None:
    (tmp_path / "bench_fake.py").write_text(FAKE)
    monkeypatch.setattr(run, "HERE", tmp_path)
    monkeypatch.setattr(run, "_load", lambda: (0.0, 0.0, 0.0))
    out = tmp_path / "B.md"
    assert run.main(["--quick", "--settings", "1", "--out", str(out)]) == 0  # one real worker process
    assert "| peer | tiny | 2 | 1 | 2.0000 | 4.00 |" in capsys.readouterr().out
    assert "python -m benchmarks --quick --settings 1 --out" in out.read_text()
    (tmp_path / "bench_raises.py").write_text("def tables(quick, device):\n    raise RuntimeError('boom')\n")
    monkeypatch.setattr(run, "run_swept", _fake_swept)
    assert run.main(["--no-write"]) == 1


def test_the_committed_report_is_one_generated_run() -> None:
    text = (Path(__file__).resolve().parents[1] / "BENCHMARKS.md").read_text()
    assert text.startswith("# convlens benchmarks\n\n" + INTRO)
    titles = [line for line in text.splitlines() if line.startswith("### ")]
    assert len(titles) == len(set(titles))  # one table per topic
    for stale in ("second round", "third round", "## Tables", "Measured on branch", "pasted"):
        assert stale not in text
    assert "- thread settings tried:" in text and "- rule:" in text and "## Reading" in text


def test_fill_ratios_per_model_and_batch() -> None:
    rows = [Row("floor", "a", 1, 2.0), Row("m", "a", 1, 3.0), Row("floor", "b", 4, 10.0), Row("m", "b", 4, 5.0)]
    assert [r.ratio for r in fill_ratios(rows)] == [1.0, 1.5, 1.0, 0.5]
    assert "| m | b | 4 | 5.0000 | 0.50 | - |" in markdown_table("t", rows)


def test_spread_pct_is_iqr_over_median() -> None:
    assert spread_pct([1.0, 2.0, 3.0, 4.0, 5.0]) == pytest.approx(100 * (4.0 - 2.0) / 3.0)
    assert spread_pct([1.0]) is None


def test_compare_maps_resizes_normalises_and_flags_disagreement() -> None:
    g = torch.Generator().manual_seed(0)
    a = torch.rand(2, 7, 7, generator=g)
    up = torch.nn.functional.interpolate(a[:, None], size=(28, 28), mode="bilinear", align_corners=False)
    diff, r = compare_maps(a, up)  # the coarse map is resized to 28x28 exactly like `up` was
    assert diff < 1e-6 and r == pytest.approx(1.0, abs=1e-9)
    diff, r = compare_maps(a, 3 * a + 1, normalise=True)  # min-max scaling removes the affine change
    assert diff < 1e-6 and r == pytest.approx(1.0, abs=1e-9)
    assert compare_maps(a, 3 * a + 1)[0] == pytest.approx(float((2 * a + 1).max()), rel=1e-6)
    cols = agreement("peer", a.numpy(), -a)
    assert cols["r vs peer"] == pytest.approx(-1.0)
    assert cols["max abs diff vs peer"] == pytest.approx(float(2 * a.max()))
    b = a.clone()
    b[1] = torch.rand(7, 7, generator=g)  # one wrong image: min over the batch shows it
    assert compare_maps(a, b)[1] < 0.9
    assert compare_maps(torch.ones(5, 5), a[0])[1] != compare_maps(torch.ones(5, 5), a[0])[1]  # NaN
    with pytest.raises(ValueError, match="batch sizes differ"):
        compare_maps(a, a[:1])


def test_floor_cases_and_peak_memory_on_a_tiny_net() -> None:
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(inplace=True), torch.nn.Flatten(), torch.nn.Linear(4 * 6 * 6, 3)
    ).eval()
    x = torch.randn(2, 3, 8, 8)
    cases = floor_cases(net, x, "0")
    assert list(cases) == ["floor: forward", "floor: forward + backward to 0"]
    before = [p.clone() for p in net.parameters()]
    samples: dict[str, list[float]] = {}
    secs = measure(cases, repeats=3, warmup=0, samples=samples)
    assert set(secs) == set(cases) and all(v > 0 for v in secs.values())
    assert all(len(samples[k]) == 3 and sorted(samples[k])[1] == secs[k] for k in cases)
    assert all(p.grad is None for p in net.parameters())  # autograd.grad to the layer, no .grad
    assert all(torch.equal(a, b) for a, b in zip(before, net.parameters()))
    assert not any(m._forward_hooks for m in net.modules())  # the hook is gone
    assert torch.is_grad_enabled()
    # a fresh 64 MiB tensor: the profiler-based peak sees exactly its size
    assert peak_memory_mb(lambda: torch.ones(16 * 2**20)) == pytest.approx(64.0, abs=0.01)

