"""The guest architectures leanvm runs, and what each needs of QEMU and libvirt."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


@dataclass(frozen=True)
class ArchFacts:
    qemu: str  # the QEMU binary
    qemu_package: str  # Debian's package holding it
    machine: str  # QEMU's machine; arm64's `virt` lets QEMU choose the GIC for the accelerator
    cpu_name: str  # `uname -m` on a host of this arch, and libvirt's arch name


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
