"""The guest architectures leanvm runs, and what each needs of QEMU and libvirt."""

from __future__ import annotations

from enum import Enum


class ArchFacts:
    """(A plain class, not a dataclass: out/'s runtime imports this module, and dataclasses
    costs a VM's launcher a megabyte.)"""

    def __init__(self, qemu: str, qemu_package: str, machine: str, cpu_name: str) -> None:
        self.qemu = qemu  # the QEMU binary
        self.qemu_package = qemu_package  # Debian's package holding it
        self.machine = machine  # QEMU's machine; arm64's `virt` lets QEMU choose the GIC for the accelerator
        self.cpu_name = cpu_name  # `uname -m` on a host of this arch, and libvirt's arch name


class Arch(str, Enum):  # noqa: UP042
    """A release profile's `arch`: Flatcar's amd64-usr and arm64-usr. (str and Enum rather than
    StrEnum: out/'s runtime imports this module on python3 3.9 and newer.)"""

    AMD64 = "amd64"
    ARM64 = "arm64"

    def __str__(self) -> str:
        return str(self.value)

    @property
    def facts(self) -> ArchFacts:
        return FACTS[self]


FACTS = {
    Arch.AMD64: ArchFacts("qemu-system-x86_64", "qemu-system-x86", "q35", "x86_64"),
    Arch.ARM64: ArchFacts("qemu-system-aarch64", "qemu-system-arm", "virt,gic-version=max", "aarch64"),
}
