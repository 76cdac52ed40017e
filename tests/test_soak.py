"""Soak and load on real TCG boots (slow: .ci/run runs them with -m slow)."""

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from support import ENV, build_cluster, qemu_pids, run, sh, wait_for_text

pytestmark = pytest.mark.slow
HOLD = {**ENV, "LEANVM_APPEND": "leanvm.hold", "LEANVM_STOP_TIMEOUT": "90"}
NAMES = ("s1", "s2", "s3")


def cluster(cmd: str, out: Path) -> subprocess.CompletedProcess:
    return run([str(out / "cluster.sh"), cmd], capture_output=True, text=True, env=HOLD, timeout=240)


def assert_nothing_left(out: Path) -> None:
    assert qemu_pids(out) == []
    leftovers = [p for p in out.rglob("*") if p.is_socket() or p.is_fifo() or p.name in ("qemu.pid", "switch.pid")]
    assert leftovers == []
    for name in NAMES:
        sh("e2fsck", "-n", "-f", out / "vms" / name / "rootfs.img")
        sh("e2fsck", "-n", "-f", out / "vms" / name / "oem.img")


def wait_all_holding(out: Path) -> None:
    for name in NAMES:
        wait_for_text(out / "vms" / name / "console.log", "holding (leanvm.hold)", timeout=240)


def cluster_args(out: Path, *args: str) -> subprocess.CompletedProcess:
    return run([str(out / "cluster.sh"), *args], capture_output=True, text=True, env=HOLD, timeout=240)


def test_four_up_down_cycles_then_six_snapshot_stop_restore_cycles_of_a_three_vm_cluster(mini: Path, tmp_path: Path):
    out = build_cluster(tmp_path, mini / "mini.yaml", {name: {} for name in NAMES})
    for cycle in range(4):
        up = cluster("up", out)
        assert up.returncode == 0, (cycle, up.stdout, up.stderr)
        wait_all_holding(out)
        down = cluster("down", out)
        assert down.returncode == 0 and "did not power off" not in down.stdout, (cycle, down.stdout, down.stderr)
        assert qemu_pids(out) == [], cycle
    assert_nothing_left(out)
    log = sh("debugfs", "-R", "cat /var/log/leanvm-boots.log", out / "vms" / "s1" / "rootfs.img").decode()
    assert len(log.splitlines()) == 4

    up = cluster_args(out, "up", "--wait")
    assert up.returncode == 0, up.stdout + up.stderr
    for cycle in range(6):
        taken = cluster_args(out, "snapshot", "--stop", f"c{cycle}")
        assert taken.returncode == 0 and qemu_pids(out) == [], (cycle, taken.stdout, taken.stderr)
        restored = cluster_args(out, "restore", "--wait", "120", f"c{cycle}")
        assert restored.returncode == 0, (cycle, restored.stdout, restored.stderr)
        assert restored.stdout.count("and running; its clock set") == 3, (cycle, restored.stdout)
        sh("rm", "-rf", out / "snapshots" / f"c{cycle}")
    down = cluster("down", out)
    assert down.returncode == 0 and "did not power off" not in down.stdout, down.stdout
    assert_nothing_left(out)
    log = sh("debugfs", "-R", "cat /var/log/leanvm-boots.log", out / "vms" / "s1" / "rootfs.img").decode()
    assert len(log.splitlines()) == 5  # restores are no boots


def test_down_while_booting_and_kill9_during_boot(mini: Path, tmp_path: Path):
    out = build_cluster(tmp_path, mini / "mini.yaml", {name: {} for name in NAMES})
    # down right after up: the guests are still booting; down keeps pressing the button
    assert cluster("up", out).returncode == 0
    time.sleep(2)
    down = cluster("down", out)
    assert down.returncode == 0 and "did not power off" not in down.stdout, down.stdout
    assert_nothing_left(out)
    # kill -9 one QEMU mid-boot: the next up starts it again, next to the two still running
    assert cluster("up", out).returncode == 0
    time.sleep(3)
    os.kill(int((out / "vms" / "s2" / "qemu.pid").read_text()), signal.SIGKILL)
    time.sleep(1)
    up = cluster("up", out)
    assert up.returncode == 0, up.stdout + up.stderr
    assert "s2: started" in up.stdout and "s1: already running" in up.stdout
    wait_all_holding(out)
    down = cluster("down", out)
    assert down.returncode == 0 and "did not power off" not in down.stdout, down.stdout
    assert_nothing_left(out)
