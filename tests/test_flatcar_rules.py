"""Rules from Flatcar's own sources that a leanvm VM follows, each with its source:
root disks its oldest supported e2fsck can check, and flatcar-reset's request for a first boot."""

import os
import subprocess
from pathlib import Path

from leanvm.vm import rootfs
from support import ENV, build_cluster, sh


def features(disk: Path) -> set[str]:
    line = next(line for line in sh("dumpe2fs", "-h", disk).decode().splitlines()
                if line.startswith("Filesystem features"))
    return set(line.split(":", 1)[1].split())


def test_root_disks_ignore_the_hosts_mke2fs_conf(tmp_path: Path, monkeypatch):
    """e2fsprogs >= 1.47 turns on orphan_file in its mke2fs.conf; Flatcar LTS 2023 ships
    e2fsprogs 1.46.5, whose e2fsck refuses features it does not know."""
    plain = tmp_path / "plain.img"
    rootfs.create(plain, 128 << 20)
    newer = tmp_path / "mke2fs.conf"
    newer.write_text("[defaults]\n blocksize = 1024\n inode_size = 128\n[fs_types]\n ext4 = {\n"
                     "  features = has_journal,extent,huge_file,flex_bg,metadata_csum,64bit,dir_nlink,"
                     "extra_isize,orphan_file\n }\n")
    monkeypatch.setenv("MKE2FS_CONFIG", str(newer))
    made = tmp_path / "made.img"
    rootfs.create(made, 128 << 20)
    assert features(made) == features(plain) == set(rootfs.EXT4_FEATURES)
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
