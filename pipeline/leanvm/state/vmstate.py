"""Is a VM running? (Its launcher's QEMU pidfile, out/vms/NAME/qemu.pid.)

A pid file is trusted only if the process it names is this VM's QEMU: its command line
names this very pid file (`-pidfile DIR/qemu.pid`). A QEMU killed with SIGKILL, or a host
that lost power, leaves the file behind, and by then its pid may belong to anything.
lib.sh's running_pid applies the same rule in the shell.
"""

import os
import subprocess
from pathlib import Path


def _command_line(pid: int) -> list[str] | None:
    """The process's argv, from /proc (Linux) or ps (elsewhere, joined into one word)."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except FileNotFoundError:
        if Path("/proc/self").exists():
            return None  # Linux: the process is gone
        result = subprocess.run(["ps", "-o", "args=", "-p", str(pid)], capture_output=True, text=True)
        return [result.stdout.strip()] if result.returncode == 0 else None
    except OSError:
        return None
    return raw.decode(errors="replace").split("\0")


def is_vm_qemu(pid: int, vm_dir: Path) -> bool:
    """True if process `pid` is the QEMU that run.sh started for the VM in `vm_dir`."""
    argv = _command_line(pid)
    if argv is None:
        return False
    pidfile = str(vm_dir.resolve() / "qemu.pid")
    return pidfile in argv if len(argv) > 1 else f"-pidfile {pidfile}" in argv[0]


def running_pid(vm_dir: Path) -> int | None:
    """The pid of the QEMU that run.sh started for this VM, if it is still alive."""
    try:
        pid = int((vm_dir / "qemu.pid").read_text().strip())
        os.kill(pid, 0)
        stat = Path(f"/proc/{pid}/stat")
        state = stat.read_text().rsplit(")", 1)[1].split()[0] if Path("/proc/self").exists() else "?"
    except (OSError, ValueError, IndexError):
        return None
    if state == "Z":  # a zombie: killed, not yet reaped by init
        return None
    return pid if is_vm_qemu(pid, vm_dir) else None
