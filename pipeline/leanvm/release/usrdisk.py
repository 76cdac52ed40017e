"""The shared /usr disk: a GPT whose one partition, USR-A, holds the verified squashfs.

Flatcar's initrd looks for /usr by partition label (`mount.usr=PARTLABEL=USR-A`), and its
disk-uuid.service fails the boot unless some disk has a GPT; it rewrites any disk whose
GUID is Flatcar's base GUID, so ours never has it. The squashfs bytes are written straight
into the partition: one copy of /usr on disk.
"""

import uuid
from dataclasses import dataclass
from pathlib import Path

from leanvm.proc import run

USR_PARTITION_TYPE = "5DFBF5F4-2848-4BAC-AA5E-0D9A20B745A6"  # CoreOS /usr
USR_PARTITION_NAME = "USR-A"
BASE_DISK_GUID = "00000000-0000-0000-0000-000000000001"
SECTOR = 512
FIRST_LBA = 2048  # 1 MiB: the partition starts aligned, after the primary GPT
BACKUP_GPT_SECTORS = 33  # backup partition entries (32 sectors) and header, at the end


@dataclass(frozen=True)
class UsrDisk:
    """Where the squashfs goes inside usr.img."""

    member_size: int

    @property
    def offset(self) -> int:
        return FIRST_LBA * SECTOR

    @property
    def partition_sectors(self) -> int:
        return -(-self.member_size // SECTOR)

    @property
    def backup_offset(self) -> int:
        return (FIRST_LBA + self.partition_sectors) * SECTOR

    @property
    def size(self) -> int:
        return (FIRST_LBA + self.partition_sectors + BACKUP_GPT_SECTORS) * SECTOR


def write_table(path: Path, disk: UsrDisk) -> None:
    """Write the GPT into `path` (already `disk.size` bytes); the partition area is untouched."""
    disk_guid = str(uuid.uuid4()).upper()  # random: never the base GUID
    script = (
        "label: gpt\n"
        f"label-id: {disk_guid}\n"
        f"first-lba: {FIRST_LBA}\n"
        f"start={FIRST_LBA}, size={disk.partition_sectors}, type={USR_PARTITION_TYPE}, "
        f'uuid={str(uuid.uuid4()).upper()}, name="{USR_PARTITION_NAME}"\n'
    )
    run(["sfdisk", "--quiet", "--no-reread", "--no-tell-kernel", "--wipe", "never", path], input=script.encode())
