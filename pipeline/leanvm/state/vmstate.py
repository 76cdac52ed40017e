"""Is a VM running? (Its launcher's QEMU pidfile, out/vms/NAME/qemu.pid.)"""

import os
from pathlib import Path


def running_pid(vm_dir: Path) -> int | None:
    """The pid of the QEMU that run.sh started for this VM, if it is still alive."""
    try:
        pid = int((vm_dir / "qemu.pid").read_text().strip())
        os.kill(pid, 0)
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, ValueError, IndexError):
        return None
    return None if state == "Z" else pid  # a zombie: killed, not yet reaped by init
