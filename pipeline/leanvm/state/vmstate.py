"""Is a VM running? The QEMU named by out/vms/NAME/qemu.pid counts only if its command line
names that very pid file (`-pidfile DIR/qemu.pid`): a QEMU killed with SIGKILL, or a host
that lost power, leaves the file behind, and by then its pid may belong to anything. The
runtime asks the same rule (leanvm.host.qemu_pid)."""

from __future__ import annotations

from pathlib import Path

from leanvm.host import qemu_pid
from leanvm.state.layout import Names


def running_pid(vm_dir: Path) -> int | None:
    """The pid of the QEMU that run.sh started for this VM, if it is still alive."""
    return qemu_pid(vm_dir.resolve() / Names.VM_QEMU_PID)
