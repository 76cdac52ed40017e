"""A VM's own disks, sparse ext4: the root disk (label ROOT) and the OEM disk (label OEM).

They are VM state: created once, the root disk grown in place, never shrunk. Flatcar's
initrd mounts both by label (root=LABEL=ROOT, /oem from /dev/disk/by-label/OEM).
"""

import os
from pathlib import Path

from .errors import LeanvmError
from .fsutil import temp_path
from .proc import run
from .vmstate import running_pid

MKFS_OPTIONS = "lazy_itable_init=1,lazy_journal_init=1,nodiscard"
OEM_SIZE = 128 << 20  # Flatcar's OEM partition is 128 MiB


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
    tmp.touch()
    run(["chattr", "+C", tmp], check=False)  # only btrfs and friends support it
    os.truncate(tmp, size)
    try:
        run(["mkfs.ext4", "-q", "-F", "-L", label, "-E", MKFS_OPTIONS, tmp])
    except LeanvmError:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)


def _refuse_if_running(path: Path, vm: str, doing: str) -> None:
    pid = running_pid(path.parent)
    if pid is not None:
        raise LeanvmError(f"{path}: VM {vm} is running (pid {pid}); cannot {doing} its root disk", "stop it first")


def grow(path: Path, size: int) -> None:
    run(["e2fsck", "-f", "-p", path])
    os.truncate(path, size)
    run(["resize2fs", path])


def ensure(path: Path, size: int, vm: str) -> None:
    """Create the disk if missing, grow it if `size` grew; refuse to shrink it."""
    if not path.exists():
        create(path, size)
        return
    current = path.stat().st_size
    if size > current:
        _refuse_if_running(path, vm, "grow")
        grow(path, size)
    elif size < current:
        raise LeanvmError(
            f"vms.{vm}.disk: {human(size)} is smaller than the existing root disk {path} ({human(current)})",
            f"shrinking would lose data: set disk back to {human(current)}, or run `doit reset:{vm}`",
        )


def ensure_oem(path: Path) -> None:
    """Create the OEM disk if missing (it has a fixed size)."""
    if not path.exists():
        create(path, OEM_SIZE, "OEM")


def reset(path: Path, size: int, oem: Path, vm: str) -> None:
    """Recreate the root and OEM disks empty (explicit `reset:NAME` only)."""
    _refuse_if_running(path, vm, "reset")
    for disk in (path, oem):
        disk.unlink(missing_ok=True)
    create(path, size)
    create(oem, OEM_SIZE, "OEM")
