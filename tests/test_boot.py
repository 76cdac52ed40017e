"""The generated launchers boot a real kernel (the mini release) under QEMU/TCG."""

import re
import subprocess
from pathlib import Path

import pytest
from support import BOOT_TIMEOUT, ENV, boot, build_cluster, finish, marker, run, sh, start, wait_for_text


def assert_lean_boot(console: str, hostname: str) -> None:
    usr = marker(console, "usr mounted").split()
    assert usr[1:3] == ["/sysroot/usr", "squashfs"] and usr[3].split(",")[0] == "ro", usr
    assert usr[0] == "/dev/vda1"  # the USR-A partition of the usr disk, attached first
    root = marker(console, "root mounted").split()
    assert root[:3] == ["/dev/vdb", "/sysroot", "ext4"] and root[3].split(",")[0] == "rw", root
    assert marker(console, "oem mounted").split()[:3] == ["/dev/vdc", "/sysroot/oem", "ext4"]
    assert marker(console, "usr writable") == "no"
    assert marker(console, "root writable") == "yes"
    assert marker(console, "hostname") == hostname
    assert "leanvm mini release" in marker(console, "release")


def boot_log(disk: Path) -> list[str]:
    return sh("debugfs", "-R", "cat /var/log/leanvm-boots.log", disk).decode().splitlines()




def test_two_vms_boot_together_with_shared_readonly_usr_and_persistent_state(mini: Path, tmp_path: Path):
    out = build_cluster(tmp_path, mini / "mini.yaml",
                        {"alpha": {"user_data": "alpha.yaml", "ssh_port": 2401}, "beta": {"ssh_port": 2402}})
    alpha, beta = out / "vms" / "alpha", out / "vms" / "beta"

    # alpha stays up (leanvm.shell) while beta boots: both run at the same time.
    console = tmp_path / "alpha-console.txt"
    with open(console, "wb") as log:
        first = start([alpha / "run.sh"], stdin=subprocess.PIPE, stdout=log, stderr=log,
                      env={**ENV, "LEANVM_APPEND": "leanvm.shell"})
    try:
        wait_for_text(console, "shell requested", proc=first)
        assert_lean_boot(console.read_text(errors="replace"), "alpha-from-user-data")

        assert_lean_boot(boot(beta / "run.sh"), "beta")
        assert first.poll() is None

        again = run([str(alpha / "run.sh")], stdin=subprocess.DEVNULL, capture_output=True, text=True,
                    env=ENV, timeout=30)
        assert again.returncode != 0
        assert "already running" in again.stderr and len(again.stderr.strip().splitlines()) == 1
        assert first.poll() is None
    finally:
        finish(first, b"exit\n", timeout=BOOT_TIMEOUT)
    assert first.returncode == 0
    assert "powering off" in console.read_text(errors="replace")

    # Distinct MACs and ports, as the running pair had.
    shown = [sh(str(vm / "run.sh"), "--print").decode() for vm in (alpha, beta)]
    macs = {re.search(r"mac=([0-9a-f:]+)", p).group(1) for p in shown}
    assert len(macs) == 2 and "127.0.0.1:2401-:22" in shown[0] and "127.0.0.1:2402-:22" in shown[1]

    # Boot alpha a second time: its root disk remembers the first boot, and the OEM disk is
    # mounted again (the drop-in its config wrote resets oem.mount's .noupdate condition).
    second = boot(alpha / "run.sh")
    assert marker(second, "boots logged") == "2" and marker(second, "first boot") == "no"
    assert marker(second, "oem mounted").split()[:2] == ["/dev/vdc", "/sysroot/oem"]
    log = boot_log(alpha / "rootfs.img")
    assert len(log) == 2 and all("alpha-from-user-data booted" in line for line in log)


@pytest.mark.slow  # ~36 s: in CI's slow run, keeping the main suite well under its 10 minutes
def test_vdx_profile_boots(mini: Path, tmp_path: Path):
    out = build_cluster(tmp_path, mini / "mini-vdx.yaml", {"plain": {}})
    run_sh = out / "vms" / "plain" / "run.sh"
    assert "mount.usr=/dev/vda1" in sh(str(run_sh), "--print").decode()
    console = boot(run_sh)
    assert_lean_boot(console, "plain")
    disk = out / "vms" / "plain" / "rootfs.img"
    assert boot_log(disk)[0].endswith("plain booted")
    # Without the drop-in, a later boot leaves /oem empty, as Flatcar's PXE /usr (.noupdate) does.
    sh("debugfs", "-w", "-R", "rm /etc/systemd/system/oem.mount.d/10-leanvm-oem.conf", disk)
    assert marker(boot(run_sh), "oem").startswith("not mounted (/usr/.noupdate")
