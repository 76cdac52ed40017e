"""Snapshots: cluster.sh snapshot saves running VMs (memory, devices, disks at one paused
instant) into out/snapshots/SNAP; cluster.sh restore and run.sh --restore bring them back
running from that instant. The refusals come before anything changes."""

import hashlib
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from support import ENV, build_cluster, cluster_sh, doit, on_vm, qemu_pids, run, sh, stand_in_qemu, wait_for_text

QEMU_VERSION = sh("qemu-system-x86_64", "--version").decode().splitlines()[0]


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def disks(out: Path, vm: str) -> dict[str, str]:
    return {disk: digest(out / "vms" / vm / disk) for disk in ("rootfs.img", "oem.img")}


def craft_snapshot(out: Path, snap: str, vm: str = "one", *others: str, **manifest: str) -> Path:
    """A snapshot directory as cluster.sh snapshot lays it out, with stand-in contents (the
    refusals read the manifest, the values and the digests, never the memory)."""
    where = out / "snapshots" / snap
    fields = {"snapshot": snap, "vms": " ".join((vm, *others))}
    for name in (vm, *others):
        (where / name).mkdir(parents=True)
        (where / name / "values.env").write_bytes((out / "state" / "vms" / f"{name}.env").read_bytes())
        for file in ("memory", "rootfs.img", "oem.img"):
            (where / name / file).write_bytes(f"{file} of {name}\n".encode())
        fields |= {f"{name}.machine": "q35", f"{name}.accel": "tcg", f"{name}.cpu": "max", f"{name}.memory": "256",
                   f"{name}.append": "console=ttyS0", f"{name}.qemu_version": QEMU_VERSION}
    fields |= manifest
    (where / "manifest").write_text("".join(f"{key}={value}\n" for key, value in fields.items()))
    files = sorted(str(p.relative_to(where)) for p in where.rglob("*") if p.is_file())
    (where / "B3SUMS").write_bytes(sh("b3sum", *files, cwd=where))
    return where


def one_line_refusal(result: subprocess.CompletedProcess, *words: str) -> str:
    assert result.returncode != 0, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def cluster(mini: Path, tmp_path: Path) -> Path:
    return build_cluster(tmp_path / "c", mini / "mini.yaml", {"one": {}, "two": {}})


def test_restore_refuses_in_one_line_before_anything_changes(cluster: Path, tmp_path: Path):
    out = cluster
    before = disks(out, "one")

    def restore(snap: str, *names: str, env: dict = ENV) -> subprocess.CompletedProcess:
        return cluster_sh(out, "restore", *names, snap, env=env)

    one_line_refusal(restore("../x"), "'../x' is not a snapshot name")
    one_line_refusal(restore("nope"), "no snapshot nope")
    craft_snapshot(out, "moved").joinpath("one", "values.env").write_text(
        re.sub(r"(?m)^ssh_port=\d+", "ssh_port=2999",
               (out / "state" / "vms" / "one.env").read_text()))
    one_line_refusal(restore("moved"), "VM one's ssh_port was '2999'", "another cluster", "cluster.sh up one")
    craft_snapshot(out, "old", **{"one.qemu_version": "QEMU emulator version 6.0.0"})
    one_line_refusal(restore("old"), "was saved by 'QEMU emulator version 6.0.0'", QEMU_VERSION, "cold")
    craft_snapshot(out, "kvm", **{"one.accel": "kvm", "one.cpu": "host"})
    one_line_refusal(restore("kvm"), "VM one was saved under kvm, and LEANVM_ACCEL=tcg")
    craft_snapshot(out, "other-cpu", **{"one.accel": "kvm", "one.cpu": "host", "one.cpu_model": "Some Other CPU"})
    auto = {k: v for k, v in ENV.items() if k != "LEANVM_ACCEL"}  # auto takes the snapshot's accelerator
    kvm_usable = os.access("/dev/kvm", os.R_OK | os.W_OK)
    one_line_refusal(restore("other-cpu", env=auto),
                     "with -cpu host on 'Some Other CPU', this host's CPU is" if kvm_usable
                     else "was saved under KVM, which this host cannot run")
    craft_snapshot(out, "tcg")
    one_line_refusal(restore("tcg", "two"), "snapshot tcg holds no VM two")
    newer = tmp_path / "qemu-newer"  # another QEMU on this host: its version differs
    newer.write_text('#!/bin/sh\n[ "$1" != --version ] || { echo "QEMU emulator version 9.2.0"; exit 0; }\n'
                     'exec qemu-system-x86_64 "$@"\n')
    newer.chmod(0o755)
    one_line_refusal(cluster_sh(out, "restore", "tcg", env={**ENV, "LEANVM_QEMU": str(newer)}),
                     "this host runs 'QEMU emulator version 9.2.0'")
    craft_snapshot(out, "damaged").joinpath("one", "memory").write_bytes(b"changed\n")
    one_line_refusal(restore("damaged"), "damaged/one/memory differs from its digest in B3SUMS")
    one_line_refusal(run([out / "vms" / "one" / "run.sh", "--restore", "damaged"], capture_output=True, text=True,
                         env=ENV, timeout=60, stdin=subprocess.DEVNULL), "one/memory differs from its digest")
    stand_in = stand_in_qemu(out / "vms" / "one")
    try:
        one_line_refusal(restore("tcg"), "VM one is running", "down one")
    finally:
        stand_in.kill()
        stand_in.wait()
    assert disks(out, "one") == before
    assert not list((out / "vms" / "one").glob("*.restoring")) and not list((out / "vms" / "one").glob("*.before-*"))


def test_snapshot_refuses_in_one_line_and_keeps_nothing(cluster: Path):
    out = cluster
    one_line_refusal(cluster_sh(out, "snapshot", "ready"), "VM one is not running", "up one")
    for bad in ("re ady", "Ready", ".hidden", "-x", "a" * 64, "a/b"):
        one_line_refusal(cluster_sh(out, "snapshot", "one", bad), f"'{bad}' is not a snapshot name")
    one_line_refusal(cluster_sh(out, "snapshot", "three", "ready"), "no VM named 'three'")
    craft_snapshot(out, "taken")
    one_line_refusal(cluster_sh(out, "snapshot", "taken"), "snapshot taken exists")
    assert sorted(p.name for p in (out / "snapshots").iterdir()) == ["taken"]


def test_reset_retire_and_prune_take_vms_out_of_snapshots_and_clean_keeps_them(mini: Path, tmp_path: Path):
    root = tmp_path / "c"
    out = build_cluster(root, mini / "mini.yaml", {"one": {}, "two": {}, "three": {}})
    both = craft_snapshot(out, "both", "one", "two")
    only_one = craft_snapshot(out, "only-one", "one")
    clean = doit("clean", f"config={root / 'cluster.yaml'}", f"out={out}")
    assert clean.returncode == 0, clean.stderr
    assert (both / "one" / "memory").exists() and (only_one / "manifest").exists()  # VM state: kept
    build = doit(f"config={root / 'cluster.yaml'}", f"out={out}")
    assert build.returncode == 0, build.stderr

    reset = doit("reset:one", f"config={root / 'cluster.yaml'}", f"out={out}")
    assert reset.returncode == 0, reset.stderr
    (line,) = [line for line in reset.stderr.splitlines() if "snapshot" in line]
    assert "VM one was taken out of snapshots both, only-one (its disks were reset)" in line, line
    assert not only_one.exists() and not (both / "one").exists()
    assert "vms=two\n" in (both / "manifest").read_text() and "one." not in (both / "manifest").read_text()
    assert run(["b3sum", "-c", "B3SUMS"], cwd=both, capture_output=True, timeout=60).returncode == 0
    refused = cluster_sh(out, "restore", "one", "both", env=ENV)
    one_line_refusal(refused, "snapshot both holds no VM one")

    cluster = yaml.safe_load((root / "cluster.yaml").read_text())
    del cluster["vms"]["two"]
    (root / "cluster.yaml").write_text(yaml.safe_dump(cluster))
    retired = doit(f"config={root / 'cluster.yaml'}", f"out={out}")
    assert retired.returncode == 0, retired.stderr
    assert "VM two was taken out of snapshot both (it is no longer in the cluster file)" in retired.stderr
    assert not both.exists()  # no VM left in it

    old = craft_snapshot(out, "old", "three")
    values = old / "three" / "values.env"
    values.write_text(re.sub(r"(?m)^image_dir=.*", "image_dir=images/mini/0.9", values.read_text()))
    kept = craft_snapshot(out, "kept", "three")
    pruned = doit("prune", f"config={root / 'cluster.yaml'}", f"out={out}")
    assert pruned.returncode == 0, pruned.stderr
    assert "pruned snapshot old (saved on images/mini/0.9, which is gone)" in pruned.stderr
    assert not old.exists() and (kept / "manifest").exists()


def vm_ps(out: Path, vm: str, pattern: str) -> str:
    (line,) = [line for line in on_vm(out, vm, "ps").splitlines() if pattern in line]
    return line.split()[0]


@pytest.mark.slow  # two boots and a restore; in the slow run and every CI round
def test_a_restored_cluster_runs_on_from_the_instant_it_was_saved(cluster: Path, tmp_path: Path):
    out = cluster
    try:
        up = cluster_sh(out, "up", "--wait")
        assert up.returncode == 0, up.stdout + up.stderr
        on_vm(out, "one", "echo kept >/home/core/note; (sleep 100000 >/dev/null 2>&1 &)")
        sleeper = vm_ps(out, "one", "sleep 100000")
        uptime_before = float(on_vm(out, "one", "cat /proc/uptime").split()[0])

        taken = cluster_sh(out, "snapshot", "ready")
        assert taken.returncode == 0, taken.stdout + taken.stderr
        assert taken.stdout.startswith("snapshot ready: one two saved in "), taken.stdout
        snap = out / "snapshots" / "ready"
        manifest = dict(line.split("=", 1) for line in (snap / "manifest").read_text().splitlines()
                        if not line.startswith("#"))
        assert manifest["vms"] == "one two" and manifest["one.qemu_version"] == QEMU_VERSION
        assert manifest["one.accel"] == "tcg" and manifest["one.cpu"] == "max" and manifest["one.memory"] == "256"
        assert run(["b3sum", "-c", "B3SUMS"], cwd=snap, capture_output=True, timeout=60).returncode == 0
        assert {p.name for p in (snap / "one").iterdir()} == {"memory", "rootfs.img", "oem.img", "values.env"}
        assert (snap / "one" / "rootfs.img").stat().st_blocks * 512 < 64 << 20  # copied sparse
        assert vm_ps(out, "one", "sleep 100000") == sleeper  # resumed, not restarted

        down = cluster_sh(out, "down")
        assert down.returncode == 0, down.stderr
        bundled = doit("bundle", "snapshot=ready", f"config={tmp_path / 'c' / 'cluster.yaml'}", f"out={out}")
        assert bundled.returncode == 0, bundled.stderr
        (archive,) = (out / "bundles").glob("*-snapshot-ready.tar.gz")
        elsewhere = tmp_path / "elsewhere"
        unpacked = run([sys.executable, "-m", "leanvm.ship.bundle", "unbundle", archive, elsewhere],
                       capture_output=True, text=True, timeout=300)
        assert unpacked.returncode == 0, unpacked.stderr
        (tmp_path / "junk").write_text("written after the snapshot\n")
        sh("debugfs", "-w", "-R", f"write {tmp_path / 'junk'} /junk", out / "vms" / "one" / "rootfs.img")

        started = time.monotonic()
        restored = cluster_sh(out, "restore", "--wait", "120", "ready")
        assert restored.returncode == 0, restored.stdout + restored.stderr
        since = time.monotonic() - started
        for vm in ("one", "two"):
            assert f"VM {vm} restored from snapshot ready and running; its clock set" in restored.stdout
        assert on_vm(out, "one", "cat /home/core/note") == "kept\n"
        assert "No such file" in on_vm(out, "one", "ls /junk 2>&1 || true")
        assert vm_ps(out, "one", "sleep 100000") == sleeper
        uptime = float(on_vm(out, "one", "cat /proc/uptime").split()[0])
        assert uptime >= uptime_before and uptime > since, (uptime, uptime_before, since)
        assert "Linux version" not in (out / "vms" / "one" / "console.log").read_text(errors="replace")
        assert "0% packet loss" in on_vm(out, "one", "ping -c 1 -W 5 two")
        assert abs(int(on_vm(out, "one", "date +%s")) - time.time()) <= 3

        # A restore that fails once QEMU runs (a memory file QEMU cannot load, its digest
        # updated so that every check passes) leaves the disks as they were.
        assert cluster_sh(out, "down").returncode == 0
        before = disks(out, "one")
        (snap / "one" / "memory").write_bytes(b"not a migration stream\n")
        sums = [line for line in (snap / "B3SUMS").read_text().splitlines() if not line.endswith("  one/memory")]
        (snap / "B3SUMS").write_text("\n".join(sums) + "\n" + sh("b3sum", "one/memory", cwd=snap).decode())
        failed = cluster_sh(out, "restore", "--wait", "60", "one", "ready")
        line = one_line_refusal(failed, "restore ready: VM one did not start from the snapshot",
                                "QEMU could not load snapshot ready", "every VM's disks are as they were")
        assert "qemu-system" in line, line  # QEMU's own words
        assert disks(out, "one") == before

        # One VM in the foreground's way (--detach here), and the bundle's copy where it was unpacked.
        alone = run([out / "vms" / "two" / "run.sh", "--detach", "--restore", "ready"], capture_output=True,
                    text=True, env=ENV, timeout=120, stdin=subprocess.DEVNULL)
        assert alone.returncode == 0, alone.stderr
        wait_for_text(out / "vms" / "two" / "restored", "restored from snapshot ready and running", timeout=120)
        assert on_vm(out, "two", "hostname") == "two\n"
        assert cluster_sh(out, "down").returncode == 0
        there = cluster_sh(elsewhere, "restore", "--wait", "120", "ready")
        assert there.returncode == 0, there.stdout + there.stderr
        assert on_vm(elsewhere, "one", "cat /home/core/note") == "kept\n"
        assert vm_ps(elsewhere, "one", "sleep 100000") == sleeper
    finally:
        cluster_sh(out, "down")
        if (tmp_path / "elsewhere" / "cluster.sh").exists():
            cluster_sh(tmp_path / "elsewhere", "down")
    assert qemu_pids(out) == [] and qemu_pids(tmp_path / "elsewhere") == []
