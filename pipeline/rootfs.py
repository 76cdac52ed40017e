"""Sparse ext4 root disks. They are VM state: created once, grown in place, never shrunk."""

import os
from pathlib import Path

from .errors import LeanvmError
from .fsutil import temp_path
from .proc import run
from .vmstate import running_pid

MKFS_OPTIONS = "lazy_itable_init=1,lazy_journal_init=1,nodiscard"


def human(size: int) -> str:
    for unit, shift in (("T", 40), ("G", 30), ("M", 20), ("K", 10)):
        if size % (1 << shift) == 0:
            return f"{size >> shift}{unit}"
    return f"{size} bytes"


def create(path: Path, size: int) -> None:
    """A sparse file, copy-on-write off where supported, with an ext4 filesystem."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    tmp.unlink(missing_ok=True)
    tmp.touch()
    run(["chattr", "+C", tmp], check=False)  # only btrfs and friends support it
    os.truncate(tmp, size)
    try:
        run(["mkfs.ext4", "-q", "-F", "-L", "ROOT", "-E", MKFS_OPTIONS, tmp])
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


def reset(path: Path, size: int, vm: str) -> None:
    """Recreate the disk empty (explicit `reset:NAME` only)."""
    _refuse_if_running(path, vm, "reset")
    path.unlink(missing_ok=True)
    create(path, size)
