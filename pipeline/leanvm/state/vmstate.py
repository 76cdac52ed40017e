"""Is a VM running? lib.sh's running_pid decides (the rule run.sh and cluster.sh use): the
QEMU named by out/vms/NAME/qemu.pid counts only if its command line names that very pid
file (`-pidfile DIR/qemu.pid`), since a QEMU killed with SIGKILL, or a host that lost
power, leaves the file behind, and by then its pid may belong to anything."""

from pathlib import Path

from leanvm.state.shellfacts import ask


def running_pid(vm_dir: Path) -> int | None:
    """The pid of the QEMU that run.sh started for this VM, if it is still alive."""
    said = ask("running_pid", vm_dir.resolve())
    return int(said.stdout) if said.returncode == 0 and said.stdout.strip().isdigit() else None
