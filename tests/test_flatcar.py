"""VMs shaped the way Flatcar's initrd needs them (GPT usr disk, labels, first boot)."""

import json
import re
from pathlib import Path

import blake3
import pytest
from leanvm.release.usrdisk import BASE_DISK_GUID
from support import Project, boot, build_cluster, doit, marker, printed, sh, usr_partition

USR_TYPE = "5DFBF5F4-2848-4BAC-AA5E-0D9A20B745A6"


def test_usr_disk_is_a_gpt_whose_usr_a_partition_holds_the_verified_squashfs(project: Project, mirror):
    assert project.doit().returncode == 0
    usr_img = project.images() / "usr.img"
    table = json.loads(sh("sfdisk", "--json", usr_img))["partitiontable"]
    assert table["label"] == "gpt"
    assert table["id"].upper() != BASE_DISK_GUID
    (part,) = table["partitions"]
    assert part["name"] == "USR-A" and part["type"].upper() == USR_TYPE
    assert part["start"] * 512 == 1 << 20  # aligned
    assert usr_partition(usr_img) == mirror.squashfs("100.0.0").read_bytes()
    # the recorded digest is the whole disk's, and nothing else in out/ holds /usr a second time
    recorded = json.loads((usr_img.parent / ".usr.img.digest").read_text())["blake3"]
    assert recorded == blake3.blake3(usr_img.read_bytes()).hexdigest()
    squash = mirror.squashfs("100.0.0").read_bytes()[:4096]
    others = [p for p in project.out.rglob("*") if p.is_file() and p != usr_img and p.stat().st_size >= 4096]
    assert not [p for p in others if squash in p.read_bytes()]


def test_root_and_oem_disks_carry_their_labels_and_stay_sparse(project: Project):
    assert project.doit().returncode == 0
    vm = project.vm("core1")
    assert sh("e2label", vm / "rootfs.img").decode().strip() == "ROOT"
    assert sh("e2label", vm / "oem.img").decode().strip() == "OEM"
    oem = (vm / "oem.img").stat()
    assert oem.st_size == 128 << 20 and oem.st_blocks * 512 < 16 << 20


def test_a_missing_oem_disk_is_made_again_and_an_existing_one_kept(project: Project):
    assert project.doit().returncode == 0
    oem = project.vm("core1") / "oem.img"
    inode = oem.stat().st_ino
    assert project.doit().executed == set()
    assert oem.stat().st_ino == inode
    oem.unlink()
    result = project.doit()
    assert "rootfs:core1" in result.executed and oem.exists()


def boot_rule(run_sh: Path) -> str:
    out = sh(str(run_sh), "--print").decode()
    comment = out.splitlines()[0]
    assert comment.startswith("# VM ")
    return comment


def ignition_result(rootfs: Path) -> dict | None:
    text = sh("debugfs", "-R", "cat /etc/.ignition-result.json", rootfs).decode()
    return json.loads(text) if text.strip() else None


@pytest.mark.slow  # ~55 s, three boots: in CI's slow run (the main suite stays under its 10 minutes)
def test_first_boot_rule_follows_the_root_disk_through_boots_and_reset(mini: Path, tmp_path: Path):
    tmp_path.mkdir(exist_ok=True)
    (tmp_path / "config.ign").write_text(json.dumps({"ignition": {"version": "3.3.0"}, "storage": {}}))
    out = build_cluster(tmp_path, mini / "mini.yaml", {"ign": {"ignition": "config.ign"}})
    vm = out / "vms" / "ign"
    run_sh = vm / "run.sh"
    assert "name=opt/org.flatcar-linux/config,file=" in " ".join(printed(run_sh))

    # A fresh disk: the first-boot argument is on the command line, Ignition's config is seen.
    assert "first boot" in boot_rule(run_sh) and "flatcar.first_boot=1" in " ".join(printed(run_sh))
    console = boot(run_sh)
    assert marker(console, "first boot") == "yes (flatcar.first_boot=1)"
    assert marker(console, "ignition") == "opt/org.flatcar-linux/config version 3.3.0"
    assert ignition_result(vm / "rootfs.img")["userConfigProvided"] is True

    # The guest wrote its result: the next boot is not a first boot, Ignition does not run.
    assert "not a first boot" in boot_rule(run_sh)
    assert "flatcar.first_boot" not in " ".join(printed(run_sh))
    console = boot(run_sh)
    assert marker(console, "first boot") == "no"
    assert not re.search(r"^leanvm: ignition", console, re.M)

    # reset:NAME makes both disks anew: a first boot again.
    result = doit(f"config={tmp_path / 'cluster.yaml'}", f"out={out}", "reset:ign")
    assert result.returncode == 0, result.stderr
    assert ignition_result(vm / "rootfs.img") is None
    assert sh("e2label", vm / "oem.img").decode().strip() == "OEM"
    assert "first boot" in boot_rule(run_sh) and "not a first boot" not in boot_rule(run_sh)
    console = boot(run_sh)
    assert marker(console, "first boot") == "yes (flatcar.first_boot=1)"
    assert marker(console, "ignition") == "opt/org.flatcar-linux/config version 3.3.0"
