"""The mini release runs the real Ignition (Debian's 2.14) and is never kinder than
Flatcar: the cluster network comes up on a first boot only through what Flatcar honours
(Ignition's storage.files, cloud-config's coreos.units), never from write_files."""

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from leanvm.vm.configdrive import write_drive
from support import (
    HOLD,
    DoitResult,
    Project,
    boot,
    build_cluster,
    cluster_sh,
    marker,
    on_vm,
    printed,
    qemu_pids,
    run,
    sh,
    wait_for_text,
)

UNIT = "[Unit]\nDescription=hello\n[Service]\nExecStart=/bin/true\n[Install]\nWantedBy=multi-user.target\n"


def debugfs_cat(disk: Path, path: str) -> str:
    return sh("debugfs", "-R", f"cat {path}", disk).decode()


@pytest.mark.slow  # ~47 s, two boots: in CI's slow run (the main suite stays under its 10 minutes)
def test_ignition_provisions_on_the_first_boot_and_a_guest_reboot_is_no_first_boot(mini: Path, tmp_path: Path):
    key = tmp_path / "mine"
    sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "mine", "-f", key)
    mine = key.with_name("mine.pub").read_text().strip()
    tmp_path.mkdir(exist_ok=True)
    (tmp_path / "prov.ign").write_text(json.dumps({
        "ignition": {"version": "3.3.0"},
        "passwd": {"users": [{"name": "core", "sshAuthorizedKeys": [mine]},
                             {"name": "root", "sshAuthorizedKeys": [mine]},  # to run `reboot` over ssh
                             {"name": "alice", "groups": ["docker", "builders"]}],
                   "groups": [{"name": "builders", "gid": 4242}]},
        "storage": {"files": [{"path": "/etc/leanvm/hello.txt", "mode": 0o604,
                               "contents": {"source": "data:,written%20by%20Ignition"}},
                              {"path": "/etc/hostname", "mode": 0o644, "contents": {"source": "data:,mine-by-ign"}}]},
        "systemd": {"units": [{"name": "hello.service", "enabled": True, "contents": UNIT}]},
    }))
    out = build_cluster(tmp_path, mini / "mini.yaml", {"prov": {"ignition": "prov.ign"}})
    # QEMU runs with -no-reboot, and run.sh (the supervisor of this --detach VM) starts it
    # again after a guest reboot, deciding the first-boot rule afresh. The second launch
    # starts 3 s late (a slow host): `up --wait` must not take the moment between two
    # launches for a stopped VM.
    slow = tmp_path / "slow-relaunch"
    slow.write_text(f'#!/bin/sh\n[ ! -e "{tmp_path}/launched" ] || sleep 3\n: >"{tmp_path}/launched"\n'
                    'exec qemu-system-x86_64 "$@"\n')
    slow.chmod(0o755)
    env = {**HOLD, "LEANVM_QEMU": str(slow)}
    port = re.search(r"^ssh_port=(\d+)$", (out / "state" / "vms" / "prov.env").read_text(), re.M)[1]

    def as_root(command: str) -> subprocess.CompletedProcess:
        return run(["ssh", "-i", key, "-p", port, "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=no",
                    "-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR", "-o", "ConnectTimeout=10",
                    "root@127.0.0.1", command], capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=60)

    try:
        up = cluster_sh(out, "up", "--wait", env=env)
        assert up.returncode == 0, up.stdout + up.stderr
        console = (out / "vms" / "prov" / "console.log").read_text(errors="replace")
        assert marker(console, "first boot") == "yes (flatcar.first_boot=1)"
        result = as_root("cat /etc/.ignition-result.json")
        assert result.returncode == 0 and "provisioningBootID" in result.stdout, result.stderr
        as_root("reboot")  # the guest reboots itself during its first boot
        wait_for_text(out / "vms" / "prov" / "run.log", "VM prov rebooted: starting it again", timeout=60)
        again = cluster_sh(out, "up", "--wait", env=env)  # between two launches: still running
        assert again.returncode == 0 and "prov: already" in again.stdout, again.stdout + again.stderr  # or starting
        console = (out / "vms" / "prov" / "console.log").read_text(errors="replace")
        assert console.index("leanvm: reboot requested") < console.index("leanvm: first boot: no")
        # the config drive (a disk now) overrides nothing Ignition wrote, on either boot: the
        # hostname is Ignition's /etc/hostname, and the drive's cloud-config is skipped
        # (userConfigProvided), as Flatcar's user-configdrive.service does
        assert re.findall(r"^leanvm: hostname: (.*?)\r?$", console, re.M) == ["mine-by-ign", "mine-by-ign"]
        assert console.count("leanvm: config drive: skipped (Ignition had a user config") == 2
        assert console.count("leanvm: first boot: yes") == 1 and console.count("leanvm: ignition: result written") == 1
        qemu = (out / "vms" / "prov" / "qemu.pid").read_text().strip()
        assert "flatcar.first_boot" not in Path(f"/proc/{qemu}/cmdline").read_text()
        assert as_root("cat /etc/.ignition-result.json").stdout == result.stdout  # Ignition did not run again
        assert "alice:x:1000:" in on_vm(out, "prov", "cat /etc/passwd")
        groups = on_vm(out, "prov", "cat /etc/group")
        assert "builders:x:4242:alice" in groups and "docker:x:233:core,alice" in groups
        assert on_vm(out, "prov", "cat /etc/leanvm/hello.txt") == "written by Ignition"
        assert on_vm(out, "prov", "stat -c %a /etc/leanvm/hello.txt").strip() == "604"
        assert on_vm(out, "prov", "cat /etc/systemd/system/hello.service") == UNIT
        assert "enable hello.service" in on_vm(out, "prov", "cat /etc/systemd/system-preset/20-ignition.preset")
        assert mine in on_vm(out, "prov", "cat /home/core/.ssh/authorized_keys.d/ignition")
        assert on_vm(out, "prov", "stat -c '%a %U' /etc/.ignition-result.json").strip() == "600 root"
    finally:
        down = cluster_sh(out, "down", env=env)
    assert down.returncode == 0 and "did not power off" not in down.stdout and qemu_pids(out) == []
    result = json.loads(debugfs_cat(out / "vms" / "prov" / "rootfs.img", "/etc/.ignition-result.json"))
    assert result["userConfigProvided"] is True and "provisioningBootID" in result  # Ignition's own fields


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["cloud-config", "ignition"])
def test_a_two_vm_cluster_has_its_addresses_and_names_on_the_first_boot(mini: Path, tmp_path: Path, kind: str):
    """cloud-config: the unit under coreos.units, /etc/hosts in write_files; Ignition: both
    in storage.files. Each VM pings the other by name over the cluster network."""
    tmp_path.mkdir(exist_ok=True)
    (tmp_path / "ig.ign").write_text(json.dumps({"ignition": {"version": "3.3.0"}}))
    config = {"user_data": "alpha.yaml"} if kind == "cloud-config" else {"ignition": "ig.ign"}
    out = build_cluster(tmp_path, mini / "mini.yaml", {
        "one": {"cluster_ip": "10.77.0.11", **config}, "two": {"cluster_ip": "10.77.0.12", **config}})
    try:
        up = cluster_sh(out, "up", "--wait")
        assert up.returncode == 0, up.stdout + up.stderr
        for name, own, peer in (("one", "10.77.0.11", "two"), ("two", "10.77.0.12", "one")):
            console = (out / "vms" / name / "console.log").read_text(errors="replace")
            assert marker(console, "first boot").startswith("yes")
            assert f"leanvm: cluster network: eth1 {own}/24 (50-leanvm-cluster.network)" in console
            assert ("restarting networkd" in console) == (kind == "cloud-config")
            assert f"{own} {name}" in on_vm(out, name, "cat /etc/hosts")
            assert "0% packet loss" in on_vm(out, name, f"ping -c 1 -W 5 {peer}")
    finally:
        cluster_sh(out, "down")
    assert qemu_pids(out) == []


@pytest.mark.slow  # ~12 s: in CI's slow run (the main suite stays under its 10 minutes)
def test_a_network_unit_only_in_write_files_gets_no_address_as_on_flatcar(mini: Path, tmp_path: Path):
    out = build_cluster(tmp_path, mini / "mini.yaml", {"wf": {}})
    vm = out / "vms" / "wf"
    mac = (out / "state" / "vms" / "wf.env").read_text().split("cluster_mac=")[1].split()[0]
    hand_written = (  # as a user might write it, with no coreos.units
        "#cloud-config\nhostname: wf\nwrite_files:\n- path: /etc/systemd/network/60-mine.network\n  content: |\n"
        f"    [Match]\n    MACAddress={mac}\n\n    [Network]\n    Address=10.77.0.99/24\n")
    write_drive(vm / "config.iso", hand_written.encode())
    console = boot(vm / "run.sh")
    assert "cloud-config: wrote /etc/systemd/network/60-mine.network" in console  # written, as coreos-cloudinit does
    assert "cluster network:" not in console and "restarting networkd" not in console


@pytest.fixture
def ign_project(project: Project) -> Project:
    profile = project.profile_file.read_text() + "ignition_fw_cfg: opt/org.flatcar-linux/config\n"
    project.profile_file.write_text(profile)
    return project


def build_with(project: Project, config: str | dict, name: str = "vm.ign") -> DoitResult:
    (project.root / name).write_text(config if isinstance(config, str) else json.dumps(config))
    project.write_cluster({"core1": {"ignition": name}})
    return project.doit()


@pytest.mark.parametrize("config, expected", [
    ({"ignition": {"version": "3.3.0"}, "storage": {"files": [{"path": "relative/path"}]}},
     "Ignition config {file}: Error at $.storage.files.0.path"),
    ({"ignition": {"version": "3.3.0"}, "kernelArguments": {"shouldExist": ["quiet"]}}, "kernelArguments"),
    ({"ignition": {"version": "9.9.9"}}, "spec 9.9.9 is not one that release test 100.0.0 accepts (2.0.0-2.4.0, "
                                         "3.0.0-3.5.0)"),
    ("variant: flatcar\nversion: 1.0.0\n", "is a Butane config, and butane is not installed"),
    ({"ignition": {"version": "3.3.0"}, "passwd": {"users": [{"name": "core", "sshAuthorizedKeys": "ssh-ed25519 A"}]}},
     "passwd.users.0.sshAuthorizedKeys must be a list of keys, not str 'ssh-ed25519 A'"),
    ({"ignition": {"version": "3.3.0"}, "storage": {"files": {"path": "/etc/x"}}}, "storage.files must be a list"),
], ids=["relative-path", "kernelArguments", "unknown-spec", "butane", "keys-not-a-list", "files-not-a-list"])
def test_bad_ignition_configs_fail_the_build_in_one_line(ign_project: Project, config, expected: str):
    if "butane" in expected and shutil.which("butane"):
        pytest.skip("butane is installed here: the Butane file would be transpiled")
    result = build_with(ign_project, config)
    assert result.returncode != 0
    (line,) = [line for line in result.stderr.splitlines() if line.strip()]
    assert line.startswith("leanvm: error: ") and "Traceback" not in result.stderr
    assert expected.format(file=ign_project.root / "vm.ign") in line, line
    assert not list(ign_project.out.glob("vms/core1/*ignition*"))  # nothing half-written


def test_a_warning_names_the_vm_and_a_newer_spec_is_built_with_a_note(ign_project: Project):
    result = build_with(ign_project, {"ignition": {"version": "3.3.0"}, "storage": {"filez": []}})
    assert result.returncode == 0, result.stderr
    assert "leanvm: warning: VM core1: Ignition config" in result.stderr and "Unused key filez" in result.stderr
    result = build_with(ign_project, {"ignition": {"version": "3.5.0"}})
    assert result.returncode == 0, result.stderr
    (line,) = [line for line in result.stderr.splitlines() if "3.5.0" in line]
    assert "built without validation" in line and "VM core1" in line and "newer than" in line
    result = build_with(ign_project, {"ignition": {"version": "3.5.0"}})
    merged = json.loads((ign_project.vm("core1") / "ignition.json").read_text())
    assert merged["ignition"]["version"] == "3.5.0"
    assert merged["storage"]["files"][0]["path"] == "/etc/systemd/network/50-leanvm-cluster.network"


def test_a_flatcar_only_oem_url_builds_with_a_warning_naming_it(ign_project: Project):
    result = build_with(ign_project, {"ignition": {"version": "3.3.0"}, "storage": {"files": [
        {"path": "/etc/from-oem", "contents": {"source": "oem:///files/x.txt"}}]}})
    assert result.returncode == 0, result.stderr
    (line,) = [line for line in result.stderr.splitlines() if "oem://" in line]
    assert line.startswith("leanvm: warning: VM core1") and "$.storage.files.0.contents.source" in line, line
    merged = json.loads((ign_project.vm("core1") / "ignition.json").read_text())
    assert merged["storage"]["files"][0]["contents"]["source"] == "oem:///files/x.txt"
    bad = build_with(ign_project, {"ignition": {"version": "3.3.0"}, "storage": {"files": [
        {"path": "/etc/x", "contents": {"source": "gopher://x"}}]}})
    assert bad.returncode != 0 and "invalid url scheme" in bad.stderr  # only oem:// is Flatcar's


def test_per_vm_kernel_args_follow_the_profiles(ign_project: Project):
    ign_project.write_cluster({"core1": {"kernel_args": "systemd.unit=rescue.target quiet"}, "core2": {}})
    assert ign_project.doit().returncode == 0
    one, two = (" ".join(printed(ign_project.vm(n) / "run.sh")) for n in ("core1", "core2"))
    assert "console=ttyS0 systemd.unit=rescue.target quiet" in one and "systemd.unit" not in two

