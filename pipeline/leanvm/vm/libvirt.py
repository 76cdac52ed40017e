"""The cluster for libvirt (`doit libvirt`): out/vms/NAME/domain.xml, out/libvirt/network.xml.

A domain uses the files run.sh uses: the shared usr.img (read-only, shareable), the VM's
root and OEM disks, its config drive (a read-only disk), its Ignition config through fw_cfg,
the same kernel command line, all from the VM's values file (out/state/vms/NAME.env).
`leanvm libvirt` (libvirtctl.py) renders each domain complete for the boot it starts (the
paths where out/ lies on the libvirt host, KVM or TCG, the first-boot arguments or not) and
defines and starts it with virsh; domain.xml is the same rendering for out/ itself.

The user-mode NIC (ssh and `forward` ports on 127.0.0.1) is QEMU's own user network,
passed with <qemu:commandline>: libvirt 9.0 (Debian 12) rejects the passt backend (9.2
added it), and its plain <interface type='user'> cannot forward ports.
"""

import hashlib
import sys
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Mapping
from pathlib import Path
from shlex import quote

from leanvm.errors import LeanvmError
from leanvm.runtime import qemu
from leanvm.runtime.vmfiles import VMFiles
from leanvm.state import valuesfile
from leanvm.state.layout import Layout, Names

QEMU_NS = "http://libvirt.org/schemas/domain/qemu/1.0"
ET.register_namespace("qemu", QEMU_NS)


def prefix(out: Path) -> str:
    """Names of this out/'s domains and network start with it, so two clusters coexist."""
    return "leanvm-" + hashlib.sha256(str(out).encode()).hexdigest()[:8]


def _sub(parent: ET.Element, tag: str, text: str | None = None, **attrs: str) -> ET.Element:
    element = ET.SubElement(parent, tag, attrs)
    element.text = text
    return element


def _disk(devices: ET.Element, spec: qemu.Disk) -> None:
    shared = spec.id == qemu.SHARED_DISK
    disk = _sub(devices, "disk", type="file", device="disk")
    _sub(disk, "driver", name="qemu", type="raw", **({} if spec.readonly else {"discard": "unmap"}))
    source = _sub(disk, "source", file=str(spec.file))
    if shared:  # libvirt would chown the image shared by every VM to its QEMU user, and leave it so
        _sub(source, "seclabel", model="dac", relabel="no")
    _sub(disk, "target", dev=spec.target, bus="virtio")
    _sub(disk, "serial", spec.serial)
    if spec.readonly:
        _sub(disk, "readonly")
    if shared:
        _sub(disk, "shareable")


def _devices(domain: ET.Element, values: Mapping[str, str], vm: VMFiles, network: str) -> None:
    """The disks of the runtime's device table (the ones run.sh gives QEMU), the cluster NIC, the console."""
    devices = _sub(domain, "devices")
    for disk in qemu.disks(vm, dict(values)):
        _disk(devices, disk)
    vm_dir = vm.dir
    cluster = _sub(devices, "interface", type="network")
    _sub(cluster, "mac", address=values["cluster_mac"])
    _sub(cluster, "source", network=network)
    _sub(cluster, "model", type="virtio")
    serial = _sub(devices, "serial", type="pty")
    _sub(serial, "log", file=str(vm_dir / Names.VM_CONSOLE), append="off")
    _sub(devices, "console", type="pty")
    _sub(devices, "memballoon", model="virtio", freePageReporting="on")


def _user_network(domain: ET.Element, values: Mapping[str, str]) -> None:
    """NIC 1 as in run.sh; on pcie.0 slot 0x10, clear of the root ports libvirt puts on slots 1-2."""
    args = ["-netdev", values["user_netdev"],
            "-device", f"virtio-net-pci,netdev=net0,mac={values['mac']},bus=pcie.0,addr=0x10"]
    commandline = _sub(domain, f"{{{QEMU_NS}}}commandline")
    for arg in args:
        _sub(commandline, f"{{{QEMU_NS}}}arg", value=arg)


def _boot(domain: ET.Element, values: Mapping[str, str], vm_dir: Path, images: Path, cmdline: str) -> None:
    if values["ignition_fw_cfg"]:
        sysinfo = _sub(domain, "sysinfo", type="fwcfg")
        _sub(sysinfo, "entry", name=values["ignition_fw_cfg"], file=str(vm_dir / Names.VM_IGNITION))
    os_ = _sub(domain, "os")
    _sub(os_, "type", "hvm", arch=values["cpu_arch"], machine=values["machine"].split(",")[0])
    _sub(os_, "kernel", str(images / Names.IMAGE_KERNEL))
    if values["initrd"]:
        _sub(os_, "initrd", str(images / Names.IMAGE_INITRD))
    _sub(os_, "cmdline", cmdline)


def domain_xml(name: str, values: Mapping[str, str], base: Path, prefix: str, accel: str, cmdline: str) -> str:
    """VM `name`'s domain, complete: its files under `base` (where out/ is on the libvirt
    host), `accel` kvm or tcg, kernel command line `cmdline`."""
    layout = Layout(base)
    vm_dir, images = layout.vm(name), base / values["image_dir"]
    domain = ET.Element("domain", type="kvm" if accel == "kvm" else "qemu")
    _sub(domain, "name", f"{prefix}-{name}")
    _sub(domain, "uuid", str(uuid.uuid5(uuid.NAMESPACE_URL, f"leanvm:{prefix}:{name}")))
    _sub(domain, "memory", values["memory"], unit="MiB")
    _sub(domain, "vcpu", values["cpus"])
    _boot(domain, values, vm_dir, images, cmdline)
    if values["arch"] == "amd64":  # arm64: ACPI needs UEFI; a -kernel boot describes the machine with a device tree
        _sub(_sub(domain, "features"), "acpi")
    _sub(domain, "cpu", mode="host-passthrough" if accel == "kvm" else "maximum")
    _sub(domain, "on_poweroff", "destroy")
    _devices(domain, values, VMFiles(base, name), f"{prefix}-cluster")
    _user_network(domain, values)
    return _text(domain)


def network_xml(out: Path) -> str:
    """An isolated bridge, no host address, no DHCP: the VMs set their own cluster addresses."""
    network = ET.Element("network")
    _sub(network, "name", f"{prefix(out)}-cluster")
    _sub(network, "uuid", str(uuid.uuid5(uuid.NAMESPACE_URL, f"leanvm:{out}:cluster-network")))
    _sub(network, "bridge", name="lv" + prefix(out).removeprefix("leanvm-"), stp="off", delay="0")
    return _text(network)


def _text(root: ET.Element) -> str:
    ET.indent(root)
    return ET.tostring(root, encoding="unicode") + "\n"


def cluster_env(out: Path) -> str:
    """out/libvirt/cluster.env: the names, and the Python that renders the domains."""
    return (f"# leanvm: read by out/libvirt.sh; written by `doit libvirt`\n"
            f"prefix={quote(prefix(out))}\n"
            f"network={quote(prefix(out) + '-cluster')}\n"
            f"python={quote(sys.executable)}\n")


def read_values(out: Path, name: str) -> dict[str, str]:
    path = Layout(out).values(name)
    try:
        values = valuesfile.parse(path.read_text())
    except OSError as e:
        raise LeanvmError(f"{path}: cannot read VM {name}'s values: {e.strerror}", "run doit again") from None
    if values is None or "user_netdev" not in values:
        raise LeanvmError(f"{path}: not a values file of this leanvm", "run doit again to rewrite it")
    return values
