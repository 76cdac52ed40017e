"""Ssh that just works: a cluster key, `up --wait`, a real sshd in the mini release."""

import json
import re
import subprocess
from pathlib import Path

import pytest
from support import ENV, Project, build_cluster, doit, qemu_pids, run, sh

HOLD = {**ENV, "LEANVM_APPEND": "leanvm.hold", "LEANVM_STOP_TIMEOUT": "60"}


def user_key(tmp_path: Path, name: str) -> tuple[Path, str]:
    key = tmp_path / name
    sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", name, "-f", key)
    return key, key.with_name(name + ".pub").read_text().strip()


def test_cluster_key_is_made_once_kept_by_clean_and_reaches_every_vm(project: Project, tmp_path: Path):
    _, mine = user_key(tmp_path, "mine")
    (project.root / "core2.ign").write_text(json.dumps({
        "ignition": {"version": "3.3.0"},
        "passwd": {"users": [{"name": "core", "groups": ["docker"], "sshAuthorizedKeys": ["ssh-ed25519 AAAAold"]},
                             {"name": "other"}]},
        "storage": {"files": [{"path": "/etc/motd"}]},
    }))
    profile = project.profile_file.read_text() + "ignition_fw_cfg: opt/org.flatcar-linux/config\n"
    project.profile_file.write_text(profile)
    project.write_cluster({"core1": {"ssh_authorized_keys": [mine]}, "core2": {"ignition": "core2.ign"}})
    assert project.doit().returncode == 0
    key = project.out / "ssh" / "id_ed25519"
    cluster_key = key.with_name("id_ed25519.pub").read_text().strip()
    assert cluster_key.startswith("ssh-ed25519 ") and oct(key.stat().st_mode & 0o777) == "0o600"

    cloud = (project.vm("core1") / "config/openstack/latest/user_data").read_text()
    assert f"- {mine}\n" in cloud and f"- {cluster_key}\n" in cloud
    ignition = json.loads((project.vm("core2") / "ignition.json").read_text())
    core = next(u for u in ignition["passwd"]["users"] if u["name"] == "core")
    assert core["groups"] == ["docker"] and core["sshAuthorizedKeys"] == ["ssh-ed25519 AAAAold", cluster_key]
    assert {"name": "other"} in ignition["passwd"]["users"] and ignition["storage"]["files"][0] == {"path": "/etc/motd"}

    before = key.read_bytes()
    assert project.doit("clean").returncode == 0 and key.read_bytes() == before
    assert project.doit().returncode == 0 and key.read_bytes() == before
    # a new key re-runs only the config drives
    key.unlink()
    key.with_name("id_ed25519.pub").unlink()
    assert project.doit().executed == {"sshkey", "configdrive:core1", "configdrive:core2"}
    assert key.read_bytes() != before


def cluster(out: Path, *args: str, env: dict | None = None, timeout: float = 400) -> subprocess.CompletedProcess:
    return run([str(out / "cluster.sh"), *args], capture_output=True, text=True, env=env or HOLD,
               stdin=subprocess.DEVNULL, timeout=timeout)


def known_host(out: Path, name: str) -> str:
    lines = (out / "ssh" / "known_hosts").read_text().splitlines()
    (line,) = [line for line in lines if line.startswith(f"leanvm-{name} ")]
    return line


def assert_wrong_key_refused(tmp_path: Path, out: Path, name: str) -> None:
    wrong, _ = user_key(tmp_path, "wrong")
    port = re.search(r"^ssh_port=(\d+)$", (out / f"state/vms/{name}.env").read_text(), re.M)[1]
    refused = run(["ssh", "-i", str(wrong), "-p", port, "-o", "IdentitiesOnly=yes", "-o",
                   "BatchMode=yes", "-o", "StrictHostKeyChecking=no", "-o",
                   "UserKnownHostsFile=/dev/null", "core@127.0.0.1", "true"],
                  capture_output=True, text=True, timeout=60)
    assert refused.returncode == 255 and "Permission denied" in refused.stderr


def two_vm_cluster(tmp_path: Path, mini: Path) -> Path:
    (tmp_path / "b.ign").write_text(json.dumps({"ignition": {"version": "3.3.0"}}))
    return build_cluster(tmp_path, mini / "mini.yaml", {
        "node-a": {"cluster_ip": "10.77.0.11"},
        "node-b": {"cluster_ip": "10.77.0.12", "ignition": "b.ign"},  # keys through Ignition's passwd
    })


def assert_down_cleanly(out: Path) -> None:
    down = cluster(out, "down")
    assert down.returncode == 0 and "did not power off" not in down.stdout
    assert qemu_pids(out) == []


def test_two_vm_cluster_over_ssh(copy_of_ready: Path, tmp_path: Path):
    """Over ssh into the session's booted pair (restored: booted once, conftest's ready_pair),
    whose VM two got the cluster key through Ignition's passwd on its first boot."""
    out = copy_of_ready
    try:
        restored = cluster(out, "restore", "--wait", "60", "ready")
        assert restored.returncode == 0, restored.stdout + restored.stderr
        mounts = cluster(out, "ssh", "one", "--", "cat", "/proc/mounts")
        assert mounts.returncode == 0, mounts.stderr
        assert re.search(r"^/dev/vda1 /usr squashfs ro[, ]", mounts.stdout, re.M), mounts.stdout
        ping = cluster(out, "ssh", "one", "--", "ping", "-c", "1", "10.77.0.12")
        assert ping.returncode == 0, ping.stdout + ping.stderr
        assert cluster(out, "ssh", "two", "--", "exit 7").returncode == 7  # the remote status, passed through
        assert cluster(out, "ssh", "two", "--", "id", "-un").stdout.strip() == "core"
        # free page reporting: the balloon device is bound to its driver in the guest
        bound = cluster(out, "ssh", "one", "--", "ls", "/sys/bus/virtio/drivers/virtio_balloon")
        assert bound.returncode == 0 and re.search(r"^virtio\d+$", bound.stdout, re.M), bound.stdout + bound.stderr
        status = cluster(out, "status").stdout
        for name in ("one", "two"):  # each running VM's host memory, as PSS
            pss = re.search(rf"^{name}\s+running\s+\d+\s+127\.0\.0\.1:\d+\s+(\d+) MiB$", status, re.M)
            assert pss and 16 < int(pss[1]) < 1024, status
        assert re.search(r"^KSM: (off: .*sudo tee /sys/kernel/mm/ksm/run .*|on: \d+ MiB .*)$", status, re.M), status
        assert_wrong_key_refused(tmp_path, out, "one")
    finally:
        assert_down_cleanly(out)


@pytest.mark.slow  # three boots of two VMs: .ci/run runs it with -m slow
def test_host_keys_survive_a_reboot_and_reset_makes_new_ones(mini: Path, tmp_path: Path):
    out = two_vm_cluster(tmp_path, mini)
    try:
        assert cluster(out, "up", "--wait").returncode == 0  # --wait connects to both: known_hosts filled
        host_a, host_b = known_host(out, "node-a"), known_host(out, "node-b")
        assert cluster(out, "down").returncode == 0

        # a reboot keeps the host keys (on the root disk): ssh connects, known_hosts unchanged
        assert cluster(out, "up", "--wait").returncode == 0
        assert cluster(out, "ssh", "node-a", "--", "true").returncode == 0
        assert known_host(out, "node-a") == host_a
        assert cluster(out, "down").returncode == 0

        # reset:node-b: a new root disk, a new host key; ssh still connects
        reset = doit(f"config={tmp_path / 'cluster.yaml'}", f"out={out}", "reset:node-b")
        assert reset.returncode == 0, reset.stderr
        assert "leanvm-node-b" not in (out / "ssh" / "known_hosts").read_text()
        assert cluster(out, "up", "--wait").returncode == 0
        again = cluster(out, "ssh", "node-b", "--", "ls", "/etc/.ignition-result.json")  # root's, mode 0600
        assert again.returncode == 0, again.stderr
        assert known_host(out, "node-b") != host_b and known_host(out, "node-a") == host_a
    finally:
        assert_down_cleanly(out)


@pytest.mark.slow  # ~25 s: in CI's slow run (the main suite stays under its 10 minutes)
def test_up_wait_names_the_vms_whose_sshd_never_answers(mini: Path, tmp_path: Path):
    out = build_cluster(tmp_path, mini / "mini.yaml", {"quiet": {}})
    paused = tmp_path / "paused-qemu"  # a VM that runs but never boots: its CPUs stay stopped
    paused.write_text('#!/bin/sh\nexec qemu-system-x86_64 "$@" -S\n')
    paused.chmod(0o755)
    try:
        up = cluster(out, "up", "--wait", "15", env={**ENV, "LEANVM_QEMU": str(paused)})
    finally:
        cluster(out, "down", env={**ENV, "LEANVM_STOP_TIMEOUT": "1"})  # a paused guest ignores the button
    assert up.returncode != 0
    assert up.stderr.strip().splitlines() == ["cluster.sh: no sshd answered within 15 s on: quiet"]
