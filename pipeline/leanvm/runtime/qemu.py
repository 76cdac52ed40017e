"""A VM's QEMU command line, built from one table of its devices.

QEMU runs in out/net (the cluster switch is ./switch there, and the QMP socket
../vms/NAME/qmp.sock: short socket paths wherever out/ is); every other path is absolute.
"""

from __future__ import annotations

import os
from pathlib import Path

from leanvm.errors import LeanvmError
from leanvm.runtime.vmfiles import VMFiles
from leanvm.state.layout import Names


class Disk:
    """A virtio disk: the guest sees it as /dev/vdX (target) and /dev/disk/by-id/virtio-SERIAL.
    (The runtime's records are plain classes: dataclasses and typing cost a VM's launcher
    more than a megabyte.)"""

    def __init__(self, id: str, file: Path, serial: str, readonly: bool, target: str) -> None:
        self.id, self.file, self.serial, self.readonly, self.target = id, file, serial, readonly, target


SHARED_DISK = "usr"  # the one disk every VM of the release shares


def disks(vm: VMFiles, values: dict[str, str]) -> list[Disk]:
    """In the guest's order: vda /usr (shared, read-only), vdb ROOT, vdc OEM, vdd the config drive."""
    images = vm.out / values["image_dir"]
    return [Disk(SHARED_DISK, images / Names.IMAGE_USR, "usr.readonly", True, "vda"),
            Disk("root", vm.path(Names.VM_ROOT_DISK), "rootfs", False, "vdb"),
            Disk("oem", vm.path(Names.VM_OEM_DISK), "oem", False, "vdc"),
            Disk("config", vm.path(Names.VM_CONFIG_DRIVE), "config-2", True, "vdd")]


def qpath(path: Path | str) -> str:
    """A path inside a QEMU option value: QEMU writes a literal comma as ',,'."""
    return str(path).replace(",", ",,")


class Accel:
    """QEMU's -accel value and -cpu for an accelerator."""

    def __init__(self, name: str, options: str, cpu: str) -> None:
        self.name, self.options, self.cpu = name, options, cpu


def accel_for(name: str, environ: dict[str, str] | os._Environ[str] = os.environ) -> Accel:
    """TCG keeps the code it translated in a cache QEMU sizes at 1 GiB; the host holds every page
    of it that fills (~100 MiB for an idle mini VM). LEANVM_TCG_CACHE (MiB) caps it."""
    if name != "tcg":
        return Accel(name, name, "host")
    cache = environ.get("LEANVM_TCG_CACHE", "")
    if cache and (not cache.isdigit() or cache.startswith("0")):
        raise LeanvmError(f"LEANVM_TCG_CACHE must be a size in MiB such as 64, not '{cache}'")
    return Accel("tcg", f"tcg,tb-size={cache}" if cache else "tcg", "max")


def machine_args(vm: VMFiles, values: dict[str, str], accel: Accel) -> list[str]:
    return ["-name", vm.name, "-machine", values["machine"], "-accel", accel.options, "-cpu", accel.cpu,
            "-smp", values["cpus"], "-m", values["memory"], "-pidfile", str(vm.path(Names.VM_QEMU_PID))]


def device_args(vm: VMFiles, values: dict[str, str]) -> list[str]:
    args = ["-netdev", values["user_netdev"], "-device", f"virtio-net-pci,netdev=net0,mac={values['mac']}"]
    for disk in disks(vm, values):
        mode = "readonly=on" if disk.readonly else "discard=unmap"
        args += ["-drive", f"if=none,id={disk.id},format=raw,{mode},file={qpath(disk.file)}",
                 "-device", f"virtio-blk-pci,drive={disk.id},serial={disk.serial}"]
    if values.get("ignition_fw_cfg"):
        args += ["-fw_cfg", f"name={values['ignition_fw_cfg']},file={qpath(vm.path(Names.VM_IGNITION))}"]
    return args


def boot_args(vm: VMFiles, values: dict[str, str], append: str) -> list[str]:
    images = vm.out / values["image_dir"]
    args = ["-kernel", str(images / Names.IMAGE_KERNEL)]
    if values.get("initrd"):
        args += ["-initrd", str(images / Names.IMAGE_INITRD)]
    return [*args, "-append", append]


def cluster_args(values: dict[str, str]) -> list[str]:
    """NIC 2, the private cluster network: the switch of out/net (vde_switch)."""
    return ["-netdev", f"vde,id=cluster,sock={Names.NET_SWITCH}",
            "-device", f"virtio-net-pci,netdev=cluster,mac={values['cluster_mac']}"]


def balloon_args(environ: dict[str, str] | os._Environ[str] = os.environ) -> list[str]:
    """Free page reporting hands the pages a guest frees back to the host (Flatcar's kernel has
    virtio_balloon with it): an idle VM's host RAM shrinks once its page cache is dropped."""
    balloon = environ.get("LEANVM_BALLOON", "on") or "on"
    if balloon not in ("on", "off"):
        raise LeanvmError(f"LEANVM_BALLOON must be on or off, not '{balloon}'")
    return ["-device", "virtio-balloon-pci,free-page-reporting=on"] if balloon == "on" else []


def console_args(vm: VMFiles, detached: bool) -> list[str]:
    """The serial console into console.log (appended across the relaunches of one run); in the
    foreground it is this terminal too, the monitor multiplexed on it (Ctrl-a x, Ctrl-a c)."""
    console = qpath(vm.path(Names.VM_CONSOLE))
    if detached:
        return ["-display", "none", "-chardev", f"file,id=console,path={console},append=on",
                "-serial", "chardev:console"]
    return ["-nographic", "-chardev", f"stdio,id=console,mux=on,logfile={console},logappend=on",
            "-serial", "chardev:console", "-mon", "chardev=console,mode=readline"]


def qmp_args(vm: VMFiles) -> list[str]:
    """The QMP socket that cluster.sh talks to, named from out/net (QEMU's working directory)."""
    return ["-qmp", f"unix:{qpath(Path('..', Names.OUT_VMS, vm.name, Names.VM_QMP))},server=on,wait=off"]


def argv(vm: VMFiles, values: dict[str, str], accel: Accel, append: str, extra: list[str]) -> list[str]:
    """The whole command: QEMU, the machine, its devices, the kernel, then `extra` (console,
    monitors, networks, the user's own QEMU arguments). A guest reboot ends QEMU (-no-reboot):
    the runtime starts it again with the first-boot rule decided afresh, as Flatcar's GRUB does
    with its flag file (QEMU would keep a first boot's -append)."""
    qemu = os.environ.get("LEANVM_QEMU") or values["qemu"]
    return [qemu, *machine_args(vm, values, accel), *device_args(vm, values), *boot_args(vm, values, append),
            "-no-reboot", *extra]
