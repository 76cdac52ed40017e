"""The guest architectures leanvm runs, and what each needs of QEMU and libvirt."""

from enum import StrEnum


class Arch(StrEnum):
    """A release profile's `arch`: Flatcar's amd64-usr and arm64-usr."""

    AMD64 = "amd64"
    ARM64 = "arm64"

    @property
    def qemu(self) -> str:
        return {Arch.AMD64: "qemu-system-x86_64", Arch.ARM64: "qemu-system-aarch64"}[self]

    @property
    def qemu_package(self) -> str:
        """Debian's package holding `qemu`."""
        return {Arch.AMD64: "qemu-system-x86", Arch.ARM64: "qemu-system-arm"}[self]

    @property
    def machine(self) -> str:
        """QEMU's machine: arm64's `virt` lets QEMU choose the GIC for the accelerator."""
        return {Arch.AMD64: "q35", Arch.ARM64: "virt,gic-version=max"}[self]

    @property
    def cpu_name(self) -> str:
        """`uname -m` on a host of this arch, and libvirt's arch name."""
        return {Arch.AMD64: "x86_64", Arch.ARM64: "aarch64"}[self]
