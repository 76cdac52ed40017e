"""Issue 4: the generated launchers boot a real kernel (the mini release) under QEMU/TCG."""

import os
import re
import subprocess
import time
from pathlib import Path

import yaml
from fixtures import doit, sh

BOOT_TIMEOUT = 90
ENV = {**os.environ, "LEANVM_ACCEL": "tcg"}


def build_cluster(root: Path, profile: Path, vms: dict, **extra: object) -> Path:
    """A cluster file (small VMs, plus alpha.yaml user_data beside it) built by doit into root/out."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "alpha.yaml").write_text("#cloud-config\nhostname: alpha-from-user-data\n")
    cluster = {"release": str(profile), "defaults": {"memory": 256, "disk": "128M"}, "vms": vms, **extra}
    (root / "cluster.yaml").write_text(yaml.safe_dump(cluster))
    result = doit(f"config={root / 'cluster.yaml'}", f"out={root / 'out'}")
    assert result.returncode == 0, result.stderr
    return root / "out"


def boot(run_sh: Path, append: str = "") -> str:
    """Boot to power-off; the serial console text."""
    proc = subprocess.run([str(run_sh)], stdin=subprocess.DEVNULL, capture_output=True, timeout=BOOT_TIMEOUT,
                          env={**ENV, "LEANVM_APPEND": append})
    console = proc.stdout.decode(errors="replace")
    assert proc.returncode == 0, console[-2000:] + proc.stderr.decode()
    assert "leanvm: ready" in console, console[-3000:]
    return console


def marker(console: str, name: str) -> str:
    match = re.search(rf"^leanvm: {name}: (.*?)\r?$", console, re.M)
    assert match, f"no '{name}' marker in:\n{console[-3000:]}"
    return match.group(1)


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


def wait_for(path: Path, text: str, proc: subprocess.Popen, timeout: float = BOOT_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and text in path.read_text(errors="replace"):
            return
        assert proc.poll() is None, path.read_text(errors="replace")[-3000:]
        time.sleep(0.2)
    raise AssertionError(f"{text!r} not seen in {path}")


def test_two_vms_boot_together_with_shared_readonly_usr_and_persistent_state(mini: Path, tmp_path: Path):
    out = build_cluster(tmp_path, mini / "mini.yaml",
                        {"alpha": {"user_data": "alpha.yaml", "ssh_port": 2401}, "beta": {"ssh_port": 2402}})
    alpha, beta = out / "vms" / "alpha", out / "vms" / "beta"

    # alpha stays up (leanvm.shell) while beta boots: both run at the same time.
    console = tmp_path / "alpha-console.txt"
    with open(console, "wb") as log:
        first = subprocess.Popen([str(alpha / "run.sh")], stdin=subprocess.PIPE, stdout=log, stderr=log,
                                 env={**ENV, "LEANVM_APPEND": "leanvm.shell"})
    try:
        wait_for(console, "shell requested", first)
        assert_lean_boot(console.read_text(errors="replace"), "alpha-from-user-data")

        assert_lean_boot(boot(beta / "run.sh"), "beta")
        assert first.poll() is None

        again = subprocess.run([str(alpha / "run.sh")], stdin=subprocess.DEVNULL, capture_output=True, text=True,
                               env=ENV, timeout=30)
        assert again.returncode != 0
        assert "already running" in again.stderr and len(again.stderr.strip().splitlines()) == 1
        assert first.poll() is None
    finally:
        first.communicate(b"exit\n", timeout=BOOT_TIMEOUT)
    assert first.returncode == 0
    assert "powering off" in console.read_text(errors="replace")

    # Distinct MACs and ports, as the running pair had.
    printed = [sh(str(vm / "run.sh"), "--print").decode() for vm in (alpha, beta)]
    macs = {re.search(r"mac=([0-9a-f:]+)", p).group(1) for p in printed}
    assert len(macs) == 2 and "127.0.0.1:2401-:22" in printed[0] and "127.0.0.1:2402-:22" in printed[1]

    # Boot alpha a second time: its root disk remembers the first boot.
    assert marker(boot(alpha / "run.sh"), "boots logged") == "2"
    log = boot_log(alpha / "rootfs.img")
    assert len(log) == 2 and all("alpha-from-user-data booted" in line for line in log)


def test_vdx_profile_boots(mini: Path, tmp_path: Path):
    out = build_cluster(tmp_path, mini / "mini-vdx.yaml", {"plain": {}})
    run_sh = out / "vms" / "plain" / "run.sh"
    assert "mount.usr=/dev/vda1" in sh(str(run_sh), "--print").decode()
    console = boot(run_sh)
    assert_lean_boot(console, "plain")
    assert boot_log(out / "vms" / "plain" / "rootfs.img")[0].endswith("plain booted")
