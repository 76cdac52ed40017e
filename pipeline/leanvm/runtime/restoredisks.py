"""A restore's disks. A snapshot's disks are copied in beside a VM's (*.restoring), then
swapped in; the VM's own stay as *.before-restore until the restore is kept (drop_old) or
not (put_old_back). The root disk goes first in every step, so that its *.before-restore is
the mark of a restore not yet kept: while it is there, the VM's own disks are the
*.before-restore files (and the disks not yet swapped). No step overwrites a
*.before-restore, and each is safe to repeat."""

from __future__ import annotations

import fcntl
import os
import sys
from pathlib import Path

from leanvm.errors import LeanvmError
from leanvm.proc import run
from leanvm.state.layout import Names

RESTORED_DISKS = (Names.VM_ROOT_DISK, Names.VM_OEM_DISK)
COPY_DEADLINE = 3600.0


def _with(disk_path: Path, suffix: str) -> Path:
    return disk_path.with_name(disk_path.name + suffix)


def copy_in(vm_dir: Path, snapshot_vm_dir: Path) -> None:
    """The snapshot's disks copied beside the VM's; nothing copied is left if one fails."""
    try:
        for disk in RESTORED_DISKS:
            run(["cp", "--sparse=always", "--reflink=auto", snapshot_vm_dir / disk,
                 _with(vm_dir / disk, ".restoring")], timeout=COPY_DEADLINE)
    except LeanvmError:
        discard_copies(vm_dir)
        raise


def discard_copies(vm_dir: Path) -> None:
    for disk in RESTORED_DISKS:
        _with(vm_dir / disk, ".restoring").unlink(missing_ok=True)


def swap_in(vm_dir: Path) -> bool:
    """False, with nothing swapped, unless every disk has its copy and no *.before-restore is
    there; false after a partial swap too (put_old_back undoes it)."""
    for disk in RESTORED_DISKS:
        path = vm_dir / disk
        if not (_with(path, ".restoring").is_file() and path.is_file()) or _with(path, ".before-restore").exists():
            return False
    try:
        for disk in RESTORED_DISKS:
            path = vm_dir / disk
            os.rename(path, _with(path, ".before-restore"))
            os.rename(_with(path, ".restoring"), path)
    except OSError:
        return False
    return True


def old_kept(vm_dir: Path) -> bool:
    return _with(vm_dir / Names.VM_ROOT_DISK, ".before-restore").is_file()


def drop_old(vm_dir: Path) -> None:
    """The restore is kept: the VM's disks from before go, the root disk's first."""
    for disk in RESTORED_DISKS:
        _with(vm_dir / disk, ".before-restore").unlink(missing_ok=True)


def put_old_back(vm_dir: Path) -> None:
    """The restore is not kept: each disk from before goes back where its *.before-restore is
    (a disk not yet swapped stays), and the snapshot's copies go. Once the restore was kept
    (the root disk's *.before-restore gone), only what dropping it left is removed."""
    if old_kept(vm_dir):
        for disk in RESTORED_DISKS:
            old = _with(vm_dir / disk, ".before-restore")
            if old.is_file():
                os.replace(old, vm_dir / disk)
    drop_old(vm_dir)
    discard_copies(vm_dir)


def recover_locked(vm_dir: Path, command: str) -> None:
    """A restore that ended before it was kept or undone (its command was killed): the VM's
    own disks back, said in one line naming `command`. By the holder of the VM's run.lock."""
    if not old_kept(vm_dir):
        put_old_back(vm_dir)  # only copies or remnants left
        return
    put_old_back(vm_dir)
    print(f"{command}: VM {vm_dir.name}: its own disks were put back (a restore of it had been interrupted)",
          file=sys.stderr)


def recover(vm_dir: Path, command: str) -> None:
    """The same, only while no launcher holds the VM's run.lock (a running restore's files are its own)."""
    if not any(p.name.endswith((".restoring", ".before-restore")) for p in vm_dir.iterdir()):
        return
    fd = os.open(vm_dir / Names.VM_RUN_LOCK, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return
        recover_locked(vm_dir, command)
    finally:
        os.close(fd)
