"""Thread choice on a busy CPU (convlens._cpu) and the CLI's --threads option."""

from __future__ import annotations

import pytest
import torch

from convlens import _cpu
from convlens.cli import main

STAT = """cpu  {a} 0 {b} {idle} {io} 0 0 0 0 0
cpu0 {a} 0 0 {idle} {io} 0 0 0 0 0
cpu1 0 0 {b} {idle} 0 0 0 0 0 0
intr 1 2 3
"""


@pytest.fixture()
def keep_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def test_choose_threads():
    assert _cpu.choose_threads(2, 0.0) == 2
    assert _cpu.choose_threads(2, 0.4) == 2
    assert _cpu.choose_threads(2, 0.6) == 1
    assert _cpu.choose_threads(2, 1.0) == 1
    assert _cpu.choose_threads(2, 3.0) == 1
    assert _cpu.choose_threads(16, 4.2) == 12
    assert _cpu.choose_threads(4, None) == 4


def test_cpu_times_reads_only_the_given_cpus(tmp_path):
    f = tmp_path / "stat"
    f.write_text(STAT.format(a=30, b=50, idle=100, io=20))
    # cpu0: busy 30 of 150 (iowait counts as idle); cpu1: busy 50 of 150
    assert _cpu._cpu_times({0}, str(f)) == (30, 150)
    assert _cpu._cpu_times({1}, str(f)) == (50, 150)
    assert _cpu._cpu_times(None, str(f)) == (80, 300)
    assert _cpu._cpu_times(None, str(tmp_path / "missing")) is None


def test_busy_cpus_is_the_busy_share_times_the_cpus(monkeypatch):
    samples = iter([(100, 1000), (250, 1200)])
    monkeypatch.setattr(_cpu, "_cpu_times", lambda cpus: next(samples))
    monkeypatch.setattr(_cpu.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    monkeypatch.setattr(_cpu.time, "sleep", lambda s: None)
    assert _cpu.busy_cpus() == pytest.approx(150 / 200 * 2)


def test_busy_cpus_on_this_machine_is_in_range():
    busy = _cpu.busy_cpus(0.05)
    assert busy is None or 0.0 <= busy <= _cpu.available_cpus() + 1e-6


def test_configure_threads(monkeypatch, keep_threads):
    assert _cpu.configure_threads(1) == 1 and torch.get_num_threads() == 1
    torch.set_num_threads(2)
    assert _cpu.configure_threads(0) is None and torch.get_num_threads() == 2
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert _cpu.configure_threads(None) is None and torch.get_num_threads() == 2
    monkeypatch.delenv("OMP_NUM_THREADS")
    monkeypatch.setattr(_cpu, "busy_cpus", lambda: 5.0)
    assert _cpu.configure_threads(None) == 1 and torch.get_num_threads() == 1
    monkeypatch.setattr(_cpu, "busy_cpus", lambda: 0.0)
    monkeypatch.setattr(_cpu, "available_cpus", lambda: 2)
    assert _cpu.configure_threads(None) == 2 and torch.get_num_threads() == 2


def test_cli_threads_option(capsys, keep_threads):
    assert main(["predict", "--threads", "1", "-k", "1"]) == 0
    assert torch.get_num_threads() == 1 and "Egyptian cat" in capsys.readouterr().out
    assert main(["layers", "--threads", "-1"]) == 2
    assert "--threads" in capsys.readouterr().err
