"""Real arm64 boots (qemu-system-aarch64 under TCG on this x86 host) of the arm64 mini release,
built from Debian's arm64 packages: through the same run.sh, in a cluster of their own and
beside an amd64 VM. Each arm64 boot is emulated (about 17 s here), so they are slow tests."""

from pathlib import Path

import pytest
from leanvm.arch import Arch
from leanvm_dev import minirelease
from support import ENV, boot, build_cluster, cluster_sh, marker, on_vm, printed, qemu_pids

pytestmark = [pytest.mark.slow, pytest.mark.vm]


@pytest.fixture(scope="module")
def mini_arm64(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return minirelease.build(tmp_path_factory.mktemp("mini-arm64"), arch=Arch.ARM64) / "mini-arm64.yaml"



def test_the_arm64_mini_release_boots_to_ready_through_run_sh(mini_arm64: Path, tmp_path: Path):
    out = build_cluster(tmp_path, mini_arm64, {"arm1": {}})
    run_sh = out / "vms" / "arm1" / "run.sh"
    assert printed(run_sh, ENV)[0] == "qemu-system-aarch64"
    console = boot(run_sh)
    assert "Booting Linux on physical CPU" in console and "Machine model: linux,dummy-virt" in console
    assert marker(console, "usr mounted").startswith("/dev/vda1 /sysroot/usr squashfs ro")
    assert marker(console, "first boot") == "yes (flatcar.first_boot=1)"
    assert "reboot: Power down" in console


def test_arm64_vms_ping_each_other_and_an_amd64_vm_in_one_cluster(mini: Path, mini_arm64: Path, tmp_path: Path):
    out = build_cluster(tmp_path, mini / "mini.yaml", {
        "x1": {"cluster_ip": "10.77.0.11"},
        "a1": {"cluster_ip": "10.77.0.21", "release": str(mini_arm64)},
        "a2": {"cluster_ip": "10.77.0.22", "release": str(mini_arm64)}})
    try:
        up = cluster_sh(out, "up", "--wait", "300")
        assert up.returncode == 0, up.stdout + up.stderr
        assert on_vm(out, "a1", "uname -m").strip() == on_vm(out, "a2", "uname -m").strip() == "aarch64"
        assert on_vm(out, "x1", "uname -m").strip() == "x86_64"
        assert "0% packet loss" in on_vm(out, "a1", "ping -c 1 -W 5 a2")
        assert "0% packet loss" in on_vm(out, "x1", "ping -c 1 -W 5 a1")
        status = cluster_sh(out, "status")
        states = {line.split()[0]: line.split()[1] for line in status.stdout.splitlines()[1:4]}
        assert states == {"a1": "running", "a2": "running", "x1": "running"}, status.stdout
        down = cluster_sh(out, "down")
        assert down.returncode == 0 and "did not power off" not in down.stdout, down.stdout + down.stderr
        # Flatcar's arm64 kernel (no KEYBOARD_GPIO) ignores the virt machine's GPIO power key,
        # and so does the arm64 mini release: down asks over ssh (sudo systemctl poweroff)
        for name in ("a1", "a2"):
            console = (out / "vms" / name / "console.log").read_text(errors="replace")
            assert "no power button" in console and "power-off requested" in console, console[-1500:]
        assert "power button pressed" in (out / "vms" / "x1" / "console.log").read_text(errors="replace")
    finally:
        cluster_sh(out, "down")
    assert qemu_pids(out) == []
