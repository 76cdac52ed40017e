"""A VM's own disks, sparse ext4: the root disk (label ROOT) and the OEM disk (label OEM).

They are VM state: created once, the root disk grown in place, never shrunk. Flatcar's
initrd mounts both by label (root=LABEL=ROOT, /oem from /dev/disk/by-label/OEM).
"""

import os
from dataclasses import dataclass
from pathlib import Path

from leanvm.errors import LeanvmError, tool
from leanvm.fsutil import temp_path
from leanvm.proc import run
from leanvm.state.vmstate import running_pid

MKFS_OPTIONS = "lazy_itable_init=1,lazy_journal_init=1,nodiscard"
# The disks' ext4 features, spelled out rather than taken from the host's mke2fs.conf:
# e2fsprogs >= 1.47 (Fedora, Arch, Homebrew) adds orphan_file there, which the e2fsck of
# Flatcar LTS 2023 (e2fsprogs 1.46.5) refuses as unknown, ending its boot in the emergency
# shell. These are ext4's defaults that 1.46.5 knows (mke2fs.conf of e2fsprogs 1.46/1.47).
EXT4_FEATURES = ("has_journal", "ext_attr", "resize_inode", "dir_index", "filetype", "extent", "64bit", "flex_bg",
                 "sparse_super", "large_file", "huge_file", "dir_nlink", "extra_isize", "metadata_csum")
# mke2fs reads no mke2fs.conf (its built-in one instead) with these, and sizes blocks and
# inodes as it does for every ext4 of 512 MiB and more, whatever the disk's size.
MKFS_ARGS = ("-T", "default", "-b", "4096", "-I", "256", "-O", ",".join(("none", *EXT4_FEATURES)))
MKFS_ENV = {"MKE2FS_CONFIG": "/dev/null"}
OEM_SIZE = 128 << 20  # Flatcar's OEM partition is 128 MiB


@dataclass(frozen=True)
class Disks:
    """One VM's two disks, as both rootfs:NAME and reset:NAME see them."""

    vm: str
    root: Path
    oem: Path
    size: int  # the root disk's size (the `disk` key)


def human(size: int) -> str:
    for unit, shift in (("T", 40), ("G", 30), ("M", 20), ("K", 10)):
        if size % (1 << shift) == 0:
            return f"{size >> shift}{unit}"
    return f"{size} bytes"


def create(path: Path, size: int, label: str = "ROOT") -> None:
    """A sparse file, copy-on-write off where supported, with an ext4 filesystem."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    tmp.unlink(missing_ok=True)
    try:
        tmp.touch()
        run(["chattr", "+C", tmp], check=False)  # only btrfs and friends support it
        try:
            os.truncate(tmp, size)
        except OSError as e:  # EFBIG: larger than the host filesystem's largest file
            raise LeanvmError(f"{path}: cannot make a {human(size)} disk file here: {e.strerror}",
                              "set a smaller `disk` for this VM (the disk is sparse: only what the guest writes "
                              "takes space)") from None
        run(["mkfs.ext4", "-q", "-F", *MKFS_ARGS, "-L", label, "-E", MKFS_OPTIONS, tmp], env={**os.environ, **MKFS_ENV})
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _refuse_if_running(path: Path, vm: str, doing: str) -> None:
    pid = running_pid(path.parent)
    if pid is not None:
        raise LeanvmError(f"{path}: VM {vm} is running (pid {pid}); cannot {doing} its root disk", "stop it first")


# e2fsck's exit status is a bit mask (e2fsck(8)): 1 = errors corrected, 2 = corrected and
# the system should reboot (nothing to reboot for a disk image); 4 and above = not fixed.
E2FSCK_FIXED = 1 | 2


def check_fs(path: Path) -> None:
    """e2fsck -f -p: corrected errors (a force-stopped VM's disk) are fine, others fail."""
    result = run(["e2fsck", "-f", "-p", path], check=False)
    if result.returncode & ~E2FSCK_FIXED:
        detail = (result.stdout + result.stderr).decode(errors="replace").strip().splitlines()
        raise LeanvmError(f"{path}: e2fsck -f -p found errors it could not fix (exit code {result.returncode}): "
                          f"{detail[-1] if detail else 'no output'}", f"repair it by hand: e2fsck -f {path}")


def grow(path: Path, size: int) -> None:
    check_fs(path)
    os.truncate(path, size)
    run(["resize2fs", path])


def ensure(disks: Disks) -> None:
    """Create missing disks; grow the root disk if `size` grew; refuse to shrink it."""
    if not disks.oem.exists():
        create(disks.oem, OEM_SIZE, "OEM")
    path = disks.root
    if not path.exists():
        create(path, disks.size)
        return
    current = path.stat().st_size
    if disks.size > current:
        _refuse_if_running(path, disks.vm, "grow")
        grow(path, disks.size)
    elif disks.size < current:
        wanted = human(disks.size)
        raise LeanvmError(
            f"vms.{disks.vm}.disk: {wanted} is smaller than the existing root disk {path} ({human(current)})",
            f"shrinking would lose data: set disk back to {human(current)}, or run {tool(f'reset:{disks.vm}')}",
        )


def reset(disks: Disks) -> None:
    """Recreate the root and OEM disks empty (explicit `reset:NAME` only)."""
    _refuse_if_running(disks.root, disks.vm, "reset")
    for disk in (disks.root, disks.oem):
        disk.unlink(missing_ok=True)
    create(disks.root, disks.size)
    create(disks.oem, OEM_SIZE, "OEM")
