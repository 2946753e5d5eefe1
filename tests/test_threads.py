"""Thread choice on a busy CPU (convlens._cpu) and the CLI's --threads option."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

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
    assert _cpu.choose_threads(2, 0.0) == (2, False)  # idle: every CPU, default wait policy
    assert _cpu.choose_threads(2, 0.4, 0) == (2, False)
    assert _cpu.choose_threads(2, 0.6, 1) == (1, True)  # busy: the CPUs left free, passive waits
    assert _cpu.choose_threads(2, 1.0, 2) == (1, True)
    assert _cpu.choose_threads(2, 2.0, 3.9) == (1, True)
    assert _cpu.choose_threads(2, 2.0, 4) == (2, True)  # oversubscribed: a thread per CPU, passive
    assert _cpu.choose_threads(16, 4.2, 5) == (12, True)
    assert _cpu.choose_threads(4, None) == (4, False)  # unknown load


def test_proc_files_are_read_for_the_given_cpus(tmp_path):
    f = tmp_path / "stat"
    f.write_text(STAT.format(a=30, b=50, idle=100, io=20))
    # cpu0: busy 30 of 150 (iowait counts as idle); cpu1: busy 50 of 150
    assert _cpu._cpu_times({0}, str(f)) == (30, 150)
    assert _cpu._cpu_times({1}, str(f)) == (50, 150)
    assert _cpu._cpu_times(None, str(f)) == (80, 300)
    assert _cpu._cpu_times(None, str(tmp_path / "missing")) is None
    (tmp_path / "loadavg").write_text("7.53 8.29 7.93 9/131 3727\n")
    assert _cpu._runnable(str(tmp_path / "loadavg")) == 9
    assert _cpu._runnable(str(tmp_path / "missing")) is None


def test_busy_cpus_is_the_busy_share_times_the_cpus(monkeypatch):
    samples = iter([(100, 1000), (250, 1200)])
    monkeypatch.setattr(_cpu, "_cpu_times", lambda cpus: next(samples))
    monkeypatch.setattr(_cpu, "_runnable", lambda: 4)
    monkeypatch.setattr(_cpu.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    monkeypatch.setattr(_cpu.time, "sleep", lambda s: None)
    assert _cpu._measure() == (pytest.approx(150 / 200 * 2), 3.0)  # this process is not "other"


def test_busy_cpus_on_this_machine_is_in_range():
    busy = _cpu.busy_cpus(0.05)
    assert busy is None or 0.0 <= busy <= _cpu.available_cpus() + 1e-6


def test_threads_option_and_environment(monkeypatch):
    assert _cpu._threads_option(["explain", "--threads", "3"]) == 3
    assert _cpu._threads_option(["explain", "--threads=0"]) == 0
    assert _cpu._threads_option(["explain", "--threads", "x"]) is None
    assert _cpu._threads_option(["explain"]) is None
    env: dict[str, str] = {}
    assert _cpu.prepare_environment(["predict", "--threads", "3"], env) == (3, "3 (--threads)")
    assert env == {"OMP_NUM_THREADS": "3"}
    env = {}
    assert _cpu.prepare_environment(["predict", "--threads", "0"], env) is None and env == {}
    env = {"OMP_NUM_THREADS": "2"}
    assert _cpu.prepare_environment(["predict"], env) is None and env == {"OMP_NUM_THREADS": "2"}
    monkeypatch.setattr(_cpu, "available_cpus", lambda: 2)
    monkeypatch.setattr(_cpu, "_measure", lambda: (1.0, 1.0))
    env = {}
    assert _cpu.prepare_environment(["predict"], env)[0] == 1
    assert env == {"OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    monkeypatch.setattr(_cpu, "_measure", lambda: (0.1, 0.0))
    env = {"OMP_WAIT_POLICY": "ACTIVE"}
    assert _cpu.prepare_environment(["predict"], env)[0] == 2
    assert env == {"OMP_NUM_THREADS": "2", "OMP_WAIT_POLICY": "ACTIVE"}  # the user's policy is kept


def test_configure_threads(monkeypatch, keep_threads):
    monkeypatch.setattr(_cpu, "PREPARED", None)
    assert _cpu.configure_threads(1) == 1 and torch.get_num_threads() == 1
    torch.set_num_threads(2)
    assert _cpu.configure_threads(0) is None and torch.get_num_threads() == 2
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert _cpu.configure_threads(None) is None and torch.get_num_threads() == 2
    monkeypatch.delenv("OMP_NUM_THREADS")
    monkeypatch.setattr(_cpu, "_measure", lambda: (2.0, 1.0))
    assert _cpu.configure_threads(None) == 1 and torch.get_num_threads() == 1
    monkeypatch.setattr(_cpu, "_measure", lambda: (0.0, 0.0))
    monkeypatch.setattr(_cpu, "available_cpus", lambda: 2)
    assert _cpu.configure_threads(None) == 2 and torch.get_num_threads() == 2


def test_the_command_decides_before_torch_loads():
    """In the `convlens` command the environment is set before `import torch` (the wait policy
    is read only then); a library import leaves the environment alone."""
    code = (
        "import os, sys\n"
        "sys.argv = {argv!r}\n"
        "import convlens, torch\n"
        "print(os.environ.get('OMP_NUM_THREADS'), torch.get_num_threads(), convlens._cpu.PREPARED is not None)\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("OMP_")}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1] / "src")
    out = subprocess.run([sys.executable, "-c", code.format(argv=["convlens", "layers", "--threads", "1"])],
                         env=env, capture_output=True, text=True, timeout=300, check=True).stdout.split()
    assert out == ["1", "1", "True"]
    out = subprocess.run([sys.executable, "-c", code.format(argv=["my_script.py"])],
                         env=env, capture_output=True, text=True, timeout=300, check=True).stdout.split()
    assert out[0] == "None" and out[2] == "False"


def test_convlens_threads_env_applies_the_policy_in_python():
    """CONVLENS_THREADS in the environment of a plain Python process: `import convlens` decides
    before torch loads, as the command does (a number: that many threads; a busy machine under
    "auto": the wait policy too); a bad value is ignored with a warning."""
    code = "import os, convlens, torch\nprint(os.environ.get('OMP_NUM_THREADS'), torch.get_num_threads())\n"
    env = {k: v for k, v in os.environ.items() if not k.startswith("OMP_")}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1] / "src")
    run = lambda value: subprocess.run(  # noqa: E731
        [sys.executable, "-c", code], env={**env, "CONVLENS_THREADS": value},
        capture_output=True, text=True, timeout=300, check=True)
    assert run("1").stdout.split() == ["1", "1"]
    n = int(run("auto").stdout.split()[0])
    assert 1 <= n <= _cpu.available_cpus()
    bad = run("lots")
    assert bad.stdout.split()[0] == "None" and "CONVLENS_THREADS" in bad.stderr


def test_threads_in_a_running_python(monkeypatch, keep_threads):
    monkeypatch.setattr(_cpu, "available_cpus", lambda: 2)
    monkeypatch.setattr(_cpu, "_measure", lambda: (1.0, 1.0))  # one CPU busy with other work
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    got = _cpu.threads("auto")
    assert got.count == 1 and torch.get_num_threads() == 1
    assert got.wait_policy == "default" and "CONVLENS_THREADS=auto" in got.reason  # too late to change it
    monkeypatch.setattr(_cpu, "_measure", lambda: (0.1, 0.0))  # idle now: every CPU
    assert _cpu.threads("auto").count == 2 and torch.get_num_threads() == 2
    assert _cpu.threads(1) == (1, "default", "as asked") and torch.get_num_threads() == 1
    for bad in (0, "many"):
        with pytest.raises(ValueError, match="threads"):
            _cpu.threads(bad)


def test_cli_threads_option(capsys, keep_threads):
    assert main(["predict", "--threads", "1", "-k", "1"]) == 0
    assert torch.get_num_threads() == 1 and "Egyptian cat" in capsys.readouterr().out
    assert main(["layers", "--threads", "-1"]) == 2
    assert "--threads" in capsys.readouterr().err
