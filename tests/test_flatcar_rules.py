"""Rules from Flatcar's own sources that a leanvm VM follows, each with its source:
root disks its oldest supported e2fsck can check, flatcar-reset's request for a first boot,
the Ignition specs each release accepts, the config drive, and the drop-ins a VM booted from
a PXE /usr (.noupdate) needs."""

import json
import os
import subprocess
import urllib.parse
from pathlib import Path

import pytest
import yaml
from leanvm.vm import disks
from support import ENV, build_cluster, sh


def features(disk: Path) -> set[str]:
    line = next(line for line in sh("dumpe2fs", "-h", disk).decode().splitlines()
                if line.startswith("Filesystem features"))
    return set(line.split(":", 1)[1].split())


def test_root_disks_ignore_the_hosts_mke2fs_conf(tmp_path: Path, monkeypatch):
    """e2fsprogs >= 1.47 turns on orphan_file in its mke2fs.conf; Flatcar LTS 2023 ships
    e2fsprogs 1.46.5, whose e2fsck refuses features it does not know."""
    plain = tmp_path / "plain.img"
    disks.create(plain, 128 << 20)
    newer = tmp_path / "mke2fs.conf"
    newer.write_text("[defaults]\n blocksize = 1024\n inode_size = 128\n[fs_types]\n ext4 = {\n"
                     "  features = has_journal,extent,huge_file,flex_bg,metadata_csum,64bit,dir_nlink,"
                     "extra_isize,orphan_file\n }\n")
    monkeypatch.setenv("MKE2FS_CONFIG", str(newer))
    made = tmp_path / "made.img"
    disks.create(made, 128 << 20)
    assert features(made) == features(plain) == set(disks.EXT4_FEATURES)
    assert "orphan_file" not in features(made)
    for disk in (plain, made):
        header = sh("dumpe2fs", "-h", disk).decode()
        assert "Block size:               4096" in header and "Inode size:	          256" in header


def test_a_root_disk_holding_selective_os_reset_boots_as_a_first_boot(mini: Path, tmp_path: Path):
    """flatcar-reset writes /selective-os-reset on the root filesystem and asks for a first
    boot (flatcar/init bin/flatcar-reset, 32982439c691b6de6446f82b8713edb09451d97b)."""
    out = build_cluster(tmp_path, mini / "mini.yaml", {"r1": {}})
    disk = out / "vms" / "r1" / "rootfs.img"
    (tmp_path / "result.json").write_text("{}\n")
    (tmp_path / "reset").write_text("/etc/keep-me\n")
    sh("debugfs", "-w", "-R", "mkdir /etc", disk)
    sh("debugfs", "-w", "-R", f"write {tmp_path / 'result.json'} /etc/.ignition-result.json", disk)

    def printed() -> str:
        result = subprocess.run([out / "vms" / "r1" / "run.sh", "--print"], capture_output=True, text=True,
                                env={**os.environ, **ENV})
        assert result.returncode == 0, result.stderr
        return result.stdout.splitlines()[0]

    assert "not a first boot" in printed() and "flatcar.first_boot=1" not in printed()
    sh("debugfs", "-w", "-R", f"write {tmp_path / 'reset'} /selective-os-reset", disk)
    line = printed()
    assert line.startswith("# VM r1: first boot:") and "/selective-os-reset" in line, line


def test_each_bundled_release_accepts_the_specs_its_ignition_does():
    """Ignition per Flatcar branch (flatcar/scripts sys-apps/ignition): 3033 0.36.1, 3510
    2.14.0, 4081 2.19.0, 4593 (stable) 2.24.0; each with Flatcar's 2.x conversion patch."""
    from leanvm.config.load import load_profile
    from leanvm.config.types import accepted_specs, spec_ranges
    from leanvm.resources import PROFILES
    for arch in ("", "-arm64"):
        lts = load_profile(PROFILES / f"flatcar-lts{arch}.yaml")
        assert spec_ranges(accepted_specs(lts, "3510.2.8")) == "2.0.0-2.4.0, 3.0.0-3.3.0"
        assert spec_ranges(accepted_specs(lts, "4081.3.6")) == "2.0.0-2.4.0, 3.0.0-3.4.0"
        assert accepted_specs(lts, "3033.3.18") is None
        for channel in ("stable", "beta", "alpha"):
            release = load_profile(PROFILES / f"flatcar-{channel}{arch}.yaml")
            assert spec_ranges(accepted_specs(release, "4593.2.0")) == "2.0.0-2.4.0, 3.0.0-3.5.0"


def build_spec(project, spec: str, profile_extra: str = ""):
    import json
    project.profile_file.write_text(project.profile_file.read_text() + "ignition_fw_cfg: opt/org.flatcar-linux/config\n"
                                    + profile_extra)
    (project.root / "vm.ign").write_text(json.dumps({"ignition": {"version": spec}}))
    project.write_cluster({"core1": {"ignition": "vm.ign"}})
    result = project.doit()
    lines = result.stderr.strip().splitlines()
    assert result.returncode != 0 and len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert not (project.out / "vms" / "core1" / "ignition.json").exists()
    return lines[0]


def test_a_spec_the_release_does_not_accept_fails_the_build_naming_vm_spec_release_and_range(project):
    line = build_spec(project, "3.4.0", "ignition_specs: {default: 3.0.0-3.3.0}\n")
    assert "VM core1" in line and "spec 3.4.0 is not one that release test 100.0.0 accepts (3.0.0-3.3.0)" in line


def test_a_2x_config_is_refused_with_how_to_move_to_3x(project):
    line = build_spec(project, "2.4.0")
    assert "spec 2.4.0 (2.x)" in line and "move the config to spec 3" in line, line


def test_a_release_whose_ignition_writes_no_result_file_is_refused(project):
    line = build_spec(project, "3.3.0", "ignition_specs: {'100': none}\n")
    assert "release test 100.0.0 ships an Ignition that writes no /etc/.ignition-result.json" in line, line


def test_the_config_drive_is_an_iso_labelled_config_2_holding_user_data(mini: Path, tmp_path: Path):
    """The OpenStack form Flatcar's 90-configdrive.rules mounts (flatcar/coreos-cloudinit
    units/): a block device labelled config-2, iso9660 (or udf or vfat); no 9p share."""
    import io

    import pycdlib
    out = build_cluster(tmp_path, mini / "mini.yaml", {"cc": {"user_data": "alpha.yaml"}})
    drive = out / "vms" / "cc" / "config.iso"
    probe = sh("blkid", "-p", "-o", "export", drive).decode()
    assert "TYPE=iso9660" in probe and "LABEL=config-2" in probe, probe
    iso = pycdlib.PyCdlib()
    iso.open(str(drive))
    got = io.BytesIO()
    iso.get_file_from_iso_fp(got, rr_path="/openstack/latest/user_data")
    iso.close()
    assert got.getvalue() == (out / "vms" / "cc" / "config/openstack/latest/user_data").read_bytes()
    assert b"hostname: alpha-from-user-data" in got.getvalue()
    printed = sh(out / "vms" / "cc" / "run.sh", "--print").decode()
    assert "virtio-9p" not in printed and "file=" + str(drive) in printed and "serial=config-2" in printed


def section_lines(text: str, section: str) -> list[str]:
    """The lines of a unit file's [section], in order."""
    current, lines = "", []
    for line in text.splitlines():
        if line.startswith("["):
            current = line.strip()
        elif current == section and line.strip() and not line.startswith("#"):
            lines.append(line.strip())
    return lines


def test_every_vm_config_carries_the_drop_ins_a_pxe_usr_needs(mini: Path, tmp_path: Path):
    """Flatcar's PXE usr.squashfs carries /usr/.noupdate (flatcar/scripts build_library/
    vm_image_util.sh). (1) The real root's oem.mount (usr-share-oem.mount on LTS 2023) has
    ConditionPathExists=!/usr/.noupdate (flatcar/init systemd/system/), and the initrd mounts
    the OEM disk only for Ignition's files stage (bootengine ignition-files.service): a drop-in
    for each whose [Unit] empties ConditionPathExists= keeps /oem mounted. (2)
    update-engine-stub.service (ExecStart=/usr/sbin/update_engine_stub, flatcar/update_engine
    systemd/) fails when the update server is unreachable: a drop-in whose [Service] empties
    ExecStart= and gives it again with the "-" prefix keeps a VM without internet from going
    degraded. A file of the user's at the same path wins."""
    oem = ("/etc/systemd/system/oem.mount.d/", "/etc/systemd/system/usr-share-oem.mount.d/")
    stub = "/etc/systemd/system/update-engine-stub.service.d/"
    (tmp_path / "ig.ign").write_text(json.dumps({"ignition": {"version": "3.3.0"}, "storage": {"files": [
        {"path": oem[0] + "10-leanvm-oem.conf", "contents": {"source": "data:,%23%20mine%0A"}}]}}))
    out = build_cluster(tmp_path, mini / "mini.yaml", {"cc": {"user_data": "alpha.yaml"}, "ig": {"ignition": "ig.ign"}})
    cloud = yaml.safe_load((out / "vms" / "cc" / "config/openstack/latest/user_data").read_text())
    cloud_files = {f["path"]: f["content"] for f in cloud["write_files"]}
    ignition = json.loads((out / "vms" / "ig" / "ignition.json").read_text())
    ignition_files = {f["path"]: urllib.parse.unquote(f["contents"]["source"].removeprefix("data:,"))
                      for f in ignition["storage"]["files"]}
    assert ignition_files[oem[0] + "10-leanvm-oem.conf"] == "# mine\n"  # the user's own file wins
    for files, units in ((cloud_files, oem), (ignition_files, oem[1:])):
        for unit in units:
            (text,) = [text for path, text in files.items() if path.startswith(unit)]
            assert section_lines(text, "[Unit]") == ["ConditionPathExists="], text
    for files in (cloud_files, ignition_files):
        (text,) = [text for path, text in files.items() if path.startswith(stub)]
        assert section_lines(text, "[Service]") == ["ExecStart=", "ExecStart=-/usr/sbin/update_engine_stub"]


@pytest.mark.slow  # two boots (~45 s): in CI's slow run, keeping the main suite under its 10 minutes
def test_a_failed_first_boot_is_said_at_once_and_stops_only_that_vm(mini: Path, tmp_path: Path):
    """Flatcar's failed initrd boot waits 300 s at its emergency prompt, then reboots (bootengine
    dracut/99emergency-timeout); the mini release does the same, so run.sh must tell the failure
    from the console, not start the VM again as a first boot, in a loop."""
    import json
    import re
    import time

    from support import HOLD, cluster_sh
    tmp_path.mkdir(exist_ok=True)
    (tmp_path / "bad.ign").write_text(json.dumps({  # valid, and fails at boot: useradd has no such group
        "ignition": {"version": "3.3.0"}, "passwd": {"users": [{"name": "bob", "primaryGroup": "nosuchgroup"}]}}))
    out = build_cluster(tmp_path, mini / "mini.yaml", {"bad": {"ignition": "bad.ign"}, "good": {}})
    env = {**HOLD, "LEANVM_APPEND": "leanvm.hold leanvm.emergency_timeout=600"}
    started = time.monotonic()
    try:
        up = cluster_sh(out, "up", "--wait", "300", env=env)
        took = time.monotonic() - started
        assert up.returncode != 0 and took < 150, (took, up.stdout + up.stderr)
        (line,) = up.stderr.strip().splitlines()
        assert 'VM bad: its boot failed ("Ignition has failed. Please ensure your config is valid.")' in line, line
        console = (out / "vms" / "bad" / "console.log").read_text(errors="replace")
        assert "Press Enter for emergency shell or wait 10 minutes for reboot." in console
        assert console.count("leanvm: first boot: yes") == 1 and "Rebooting." not in console
        run_log = (out / "vms" / "bad" / "run.log").read_text()
        assert "its boot failed" in run_log and "starting it again" not in run_log
        status = cluster_sh(out, "status", env=env).stdout
        assert re.search(r"^bad\s+stopped", status, re.M) and re.search(r"^good\s+running", status, re.M), status
    finally:
        cluster_sh(out, "down", env={**ENV, "LEANVM_STOP_TIMEOUT": "5"})
