"""One VM as the runtime sees it: its directory in out/vms, its values and its running QEMU."""

from __future__ import annotations

from pathlib import Path

from leanvm.errors import LeanvmError
from leanvm.host import qemu_pid
from leanvm.state import valuesfile
from leanvm.state.layout import Layout, Names


class VMFiles:
    def __init__(self, out: Path, name: str) -> None:
        self.out, self.name, self.layout = out, name, Layout(out)

    @property
    def dir(self) -> Path:
        return self.layout.vm(self.name)

    def path(self, name: str) -> Path:
        """A file of the VM's directory (Names.VM_*)."""
        return self.dir / name

    @property
    def values_file(self) -> Path:
        return self.layout.values(self.name)

    def values(self) -> dict[str, str]:
        """The VM's values (doit's record of its identity, hardware and boot arguments)."""
        found = valuesfile.read(self.values_file)
        if found is None:
            raise LeanvmError(f"{self.values_file} is missing",
                              f"run doit again to record VM {self.name}'s ports and addresses")
        return found

    def exists(self) -> bool:
        """A VM of this out/ (a retired VM has run.sh.retired, no run.sh)."""
        return (self.dir / Names.VM_RUN_SH).is_file()

    def pid(self) -> int | None:
        """Its QEMU's pid, if its QEMU runs."""
        return qemu_pid(self.dir / Names.VM_QEMU_PID)


def vm_names(out: Path) -> list[str]:
    """The VMs of out/, by name (retired ones left out)."""
    vms = Layout(out).vms
    return sorted(d.name for d in vms.iterdir() if (d / Names.VM_RUN_SH).is_file()) if vms.is_dir() else []
