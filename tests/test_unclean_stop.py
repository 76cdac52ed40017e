"""What an unclean stop leaves behind never stops a VM or hurts a stranger: a stale qemu.pid
naming another process, a root disk that needs journal recovery (real QEMU, mini release)."""

import fcntl
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from support import ENV, HOLD, build_cluster, cluster_sh, doit, run, sh, wait_for_text


def one_line(result: subprocess.CompletedProcess) -> str:
    lines = result.stderr.strip().splitlines()
    assert result.returncode != 0 and len(lines) == 1, result.stderr
    return lines[0]


def features(disk: Path) -> str:
    return next(line for line in sh("dumpe2fs", "-h", disk).decode().splitlines()
                if line.startswith("Filesystem features"))


@pytest.fixture
def one_vm(mini: Path, tmp_path: Path):
    out = build_cluster(tmp_path, mini / "mini.yaml", {"k1": {}})
    yield tmp_path, out
    cluster_sh(out, "down", env={**ENV, "LEANVM_STOP_TIMEOUT": "1"})


@pytest.mark.slow  # a boot (~20 s): in CI's slow run, keeping the main suite under its 10 minutes
def test_a_stale_pid_file_naming_another_process_is_never_acted_on(one_vm):
    root, out = one_vm
    vm = out / "vms" / "k1"
    stranger = subprocess.Popen(["sleep", "600"])
    try:
        def stale() -> None:
            (vm / "qemu.pid").write_text(f"{stranger.pid}\n")

        stale()
        status = cluster_sh(out, "status")
        assert status.returncode == 0 and "k1" in status.stdout and "stopped" in status.stdout, status.stdout
        assert f"removed a stale qemu.pid (pid {stranger.pid} is not this VM's QEMU)" in status.stderr
        assert not (vm / "qemu.pid").exists()
        stale()
        down = cluster_sh(out, "down")
        assert down.returncode == 0 and stranger.poll() is None, down.stderr
        stale()
        clean = doit(f"config={root / 'cluster.yaml'}", f"out={out}", "clean")
        assert clean.returncode == 0, clean.stderr  # not refused: no VM of this out/ runs
        assert doit(f"config={root / 'cluster.yaml'}", f"out={out}").returncode == 0
        stale()
        up = cluster_sh(out, "up", "--wait", "120")
        assert up.returncode == 0, up.stdout + up.stderr
        assert "k1: started" in up.stdout and "every VM answers ssh" in up.stdout
        assert int((vm / "qemu.pid").read_text()) != stranger.pid
        assert stranger.poll() is None
    finally:
        stranger.kill()
        stranger.wait()


def test_a_root_disk_that_needs_journal_recovery_starts_and_a_damaged_one_says_how_to_repair(one_vm):
    """As a VM killed with SIGKILL right after a first boot can leave it: needs_recovery set
    and a block bitmap whose checksum does not match (plain debugfs: "Filesystem not open")."""
    _, out = one_vm
    vm = out / "vms" / "k1"
    disk = vm / "rootfs.img"
    result = vm.parent.parent / "ignition-result.json"
    result.write_text("{}\n")
    sh("debugfs", "-w", "-R", "mkdir /etc", disk)
    sh("debugfs", "-w", "-R", f"write {result} /etc/.ignition-result.json", disk)
    sh("debugfs", "-w", "-f", "-", disk, input=b"set_bg 0 block_bitmap_csum 0x1234\nfeature needs_recovery\n")
    assert "needs_recovery" in features(disk)
    printed = subprocess.run([vm / "run.sh", "--print"], capture_output=True, text=True, env=ENV)
    assert printed.returncode == 0, printed.stderr
    assert "not a first boot" in printed.stdout and "stopped uncleanly" in printed.stdout
    assert "needs_recovery" in features(disk)  # --print writes nothing
    started = run([vm / "run.sh", "--detach", "-S"], capture_output=True, text=True, env=ENV, timeout=60)
    assert started.returncode == 0, started.stderr
    assert "needs_recovery" not in features(disk)
    cluster_sh(out, "down", env={**ENV, "LEANVM_STOP_TIMEOUT": "1"})
    with open(disk, "r+b") as f:  # the superblock's magic gone: damaged
        f.seek(1024 + 56)
        f.write(b"\0\0")
    for args in (["--print"], ["--detach"]):
        line = one_line(subprocess.run([vm / "run.sh", *args], capture_output=True, text=True, env=ENV))
        assert "the disk is damaged" in line and f"repair it with: e2fsck -f '{disk}'" in line, line


@pytest.mark.slow  # two first boots and two restarts (~75 s)
def test_a_vm_killed_right_after_its_first_boot_starts_again(one_vm):
    root, out = one_vm
    vm = out / "vms" / "k1"
    for delay in (0.0, 2.0):  # as Ignition writes its files, and as the guest settles after it
        assert doit(f"config={root / 'cluster.yaml'}", f"out={out}", "reset:k1").returncode == 0
        assert run([vm / "run.sh", "--detach"], env=HOLD, timeout=60).returncode == 0
        wait_for_text(vm / "console.log", "leanvm: first boot: yes")
        time.sleep(delay)
        os.kill(int((vm / "qemu.pid").read_text()), signal.SIGKILL)
        deadline = time.monotonic() + 30
        while subprocess.run(["flock", "-n", vm / "run.lock", "true"]).returncode != 0:
            assert time.monotonic() < deadline, "run.sh did not clear up after its QEMU was killed"
            time.sleep(0.2)
        up = cluster_sh(out, "up", "--wait", "120")
        assert up.returncode == 0, (delay, up.stdout + up.stderr)
        assert "every VM answers ssh" in up.stdout
        assert cluster_sh(out, "down").returncode == 0


@pytest.mark.slow  # two boots (~35 s)
def test_an_out_dir_with_spaces_commas_and_quotes_works_through_reset(mini: Path, tmp_path: Path):
    root = tmp_path / "sp ace,comma'q%"
    root.mkdir()
    (root / "cluster.yaml").write_text(f"release: {mini / 'mini.yaml'}\ndefaults: {{memory: 256, disk: 128M}}\n"
                                       "vms:\n  q1: {}\n")
    out = root / "o u,t"
    build = doit(f"config={root / 'cluster.yaml'}", f"out={out}")
    assert build.returncode == 0, build.stderr
    try:
        for boot in ("first", "after reset"):
            up = cluster_sh(out, "up", "--wait", "120")
            assert up.returncode == 0, (boot, up.stdout + up.stderr)
            ssh = cluster_sh(out, "ssh", "q1", "--", "hostname")
            assert ssh.returncode == 0 and ssh.stdout.strip() == "q1", (boot, ssh.stderr)
            assert "leanvm-q1" in (out / "ssh" / "known_hosts").read_text()
            assert cluster_sh(out, "down").returncode == 0
            reset = doit(f"config={root / 'cluster.yaml'}", f"out={out}", "reset:q1")
            assert reset.returncode == 0, reset.stderr
        assert sorted(p.name for p in root.iterdir()) == ["cluster.yaml", "o u,t"]
        assert not any(p.name.startswith("sp") for p in tmp_path.iterdir() if p != root)
    finally:
        cluster_sh(out, "down", env={**ENV, "LEANVM_STOP_TIMEOUT": "1"})


def test_up_wait_checks_its_seconds_before_starting_anything(one_vm):
    _, out = one_vm
    for args, said in ((["--wait", "0"], "SECONDS must be at least 1, not '0'"),
                       (["--wait", "12abc"], "takes a whole number of seconds, not '12abc'"),
                       (["--wait", "abc"], "'abc' is neither a number of seconds nor a VM in")):
        result = cluster_sh(out, "up", *args)
        assert said in one_line(result), (args, result.stderr)
        assert not (out / "vms" / "k1" / "qemu.pid").exists() and not (out / "net").exists()


@pytest.mark.slow  # one boot (~15 s)
@pytest.mark.skipif(not os.access("/dev/kvm", os.R_OK | os.W_OK), reason="auto picks KVM only where /dev/kvm is usable")
def test_up_falls_back_to_tcg_when_kvm_fails_at_once_naming_the_vm(one_vm, tmp_path: Path):
    """As KVM fails on these machines (nested virtualisation): QEMU asserts and aborts at its
    first vCPU run. A QEMU that does so whenever it is given KVM stands in for that host, so
    that the test holds wherever /dev/kvm exists; the TCG boot after it is the real QEMU."""
    _, out = one_vm
    qemu = tmp_path / "qemu-kvm-aborts"
    qemu.write_text('#!/bin/sh\nfor arg; do case $arg in kvm*)\n'
                    '  echo "qemu-system-x86_64: error: failed to set MSR 0x10a to 0x69" >&2; kill -ABRT $$ ;;\n'
                    'esac; done\nexec qemu-system-x86_64 "$@"\n')
    qemu.chmod(0o755)
    env = {k: v for k, v in HOLD.items() if k != "LEANVM_ACCEL"}
    up = cluster_sh(out, "up", "--wait", "120", env={**env, "LEANVM_QEMU": str(qemu)})
    assert up.returncode == 0, up.stdout + up.stderr
    (line,) = up.stderr.strip().splitlines()
    assert "VM k1: QEMU failed under KVM (qemu-system-x86_64: error: failed to set MSR" in line, line
    assert "starting it under TCG" in line and "every VM answers ssh" in up.stdout


def test_up_of_a_vm_whose_run_sh_is_starting_says_so(one_vm):
    """A second `cluster.sh up` while the first's run.sh holds run.lock, before its QEMU runs."""
    _, out = one_vm
    vm = out / "vms" / "k1"
    with open(vm / "run.lock", "w") as lock:  # held here, as a starting run.sh holds it
        fcntl.flock(lock, fcntl.LOCK_EX)
        up = cluster_sh(out, "up")
        assert up.returncode == 0 and "k1: already starting" in up.stdout, up.stdout + up.stderr
        assert "already running" not in up.stdout and not (vm / "qemu.pid").exists()
