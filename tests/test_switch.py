"""Issue 12, defect 1: the cluster switch starts and stops race-free, whatever the timing.

Each VM here is a real QEMU started through its run.sh with `-S` (CPUs stopped, so no boot)
and told `quit` on its monitor (Ctrl-a c) once it runs: a start and a stop take a second.
"""

import os
import subprocess
import time
from pathlib import Path

import pytest
from support import ENV, QUIT, build_cluster, finish, switch_processes
from support import start as launch


def start(run_sh: Path) -> subprocess.Popen:
    return launch([run_sh, "-S"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV)


def wait_running(vm: Path, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + 30
    while not (vm / "qemu.pid").exists() or proc.poll() is not None:
        assert proc.poll() is None, proc.communicate()[1].decode()
        assert time.monotonic() < deadline, "QEMU did not start"
        time.sleep(0.05)


def stop(proc: subprocess.Popen) -> str:
    _, err = finish(proc, QUIT, timeout=30)
    assert proc.returncode == 0, err.decode()
    return err.decode()


def assert_switch_gone(out: Path) -> None:
    assert switch_processes(out) == []
    assert not (out / "net" / "switch").exists() and not (out / "net" / "switch.pid").exists()
    assert list((out / "net" / "users").iterdir()) == []


@pytest.fixture
def pair(mini: Path, tmp_path: Path) -> Path:
    return build_cluster(tmp_path, mini / "mini.yaml", {"one": {}, "two": {}})


@pytest.mark.slow
def test_thirty_quick_stop_start_cycles_of_one_vm(pair: Path):
    vm = pair / "vms" / "one"
    for cycle in range(30):
        proc = start(vm / "run.sh")
        wait_running(vm, proc)
        assert len(switch_processes(pair)) == 1, cycle
        err = stop(proc)
        assert "cannot start" not in err, (cycle, err)
        assert_switch_gone(pair)


@pytest.mark.slow  # a repeat test (~20 s): in CI's slow run, keeping the main suite within its 6 minutes
def test_two_vms_started_at_the_same_instant_ten_times(pair: Path):
    vms = [pair / "vms" / "one", pair / "vms" / "two"]
    for cycle in range(10):
        procs = [start(vm / "run.sh") for vm in vms]
        for vm, proc in zip(vms, procs, strict=True):
            wait_running(vm, proc)
        assert len(switch_processes(pair)) == 1, cycle
        assert sorted(os.listdir(pair / "net" / "users")) == ["one", "two"]
        errors = [stop(proc) for proc in procs]
        assert not any("cannot start" in e for e in errors), errors
        assert_switch_gone(pair)


def test_a_stale_switch_directory_is_cleared(pair: Path):
    net = pair / "net"
    (net / "switch").mkdir(parents=True)
    (net / "switch" / "ctl").write_text("left by a switch killed with -9")
    (net / "switch.pid").write_text("999999\n")
    vm = pair / "vms" / "one"
    proc = start(vm / "run.sh")
    wait_running(vm, proc)
    stop(proc)
    assert_switch_gone(pair)


def test_an_out_dir_too_long_for_a_socket_path_has_its_switch_in_a_short_directory(mini: Path, tmp_path: Path):
    """vde_switch names its control socket by its absolute path, which a unix socket holds to 107
    bytes: a longer out/ gets its switch in a short directory, which goes with the switch."""
    out = build_cluster(tmp_path / ("d" * 100), mini / "mini.yaml", {"one": {}, "two": {}})
    assert len(str(out / "net" / "switch" / "ctl")) > 107
    vms = [out / "vms" / "one", out / "vms" / "two"]
    procs = [start(vm / "run.sh") for vm in vms]
    for vm, proc in zip(vms, procs, strict=True):
        wait_running(vm, proc)
    short = (out / "net" / "switch").resolve()
    assert (short / "ctl").is_socket() and len(str(short / "ctl")) <= 107
    assert len(switch_processes(out)) == 1
    errors = [stop(proc) for proc in procs]
    assert not any("cannot start" in e for e in errors), errors
    assert_switch_gone(out)
    assert not short.exists()
