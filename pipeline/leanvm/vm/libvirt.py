"""The cluster for libvirt (`doit libvirt`): out/vms/NAME/domain.xml, out/libvirt/network.xml.

A domain uses the files run.sh uses: the shared usr.img (read-only, shareable), the VM's
root and OEM disks, its config drive as 9p, its Ignition config through fw_cfg, the same
kernel command line. out/libvirt.sh defines and starts them with virsh; it adds the
first-boot arguments at start (the XML is static) and swaps KVM for TCG where asked.

The user-mode NIC (ssh and `forward` ports on 127.0.0.1) is QEMU's own user network,
passed with <qemu:commandline>: libvirt 9.0 (Debian 12) rejects the passt backend (9.2
added it), and its plain <interface type='user'> cannot forward ports.
"""

import hashlib
import uuid
import xml.etree.ElementTree as ET
from pathlib import Path
from shlex import quote

from leanvm.config.cluster import VM, Release, kernel_args
from leanvm.errors import LeanvmError

QEMU_NS = "http://libvirt.org/schemas/domain/qemu/1.0"
ET.register_namespace("qemu", QEMU_NS)
XML_SPECIAL = set("&<>'\"")


def prefix(out: Path) -> str:
    """Names of this out/'s domains and network start with it, so two clusters coexist."""
    return "leanvm-" + hashlib.sha256(str(out).encode()).hexdigest()[:8]


def check_path(out: Path) -> None:
    """libvirt.sh moves out/ paths inside the XML by plain text: keep them free of XML escapes."""
    if XML_SPECIAL & set(str(out)):
        raise LeanvmError(f"{out}: the out/ path holds one of & < > ' \" which libvirt.sh cannot carry",
                          "use an out= directory without them")


def _sub(parent: ET.Element, tag: str, text: str | None = None, **attrs: str) -> ET.Element:
    element = ET.SubElement(parent, tag, attrs)
    element.text = text
    return element


def _disk(devices: ET.Element, path: Path, target: str, serial: str, shared: bool) -> None:
    disk = _sub(devices, "disk", type="file", device="disk")
    _sub(disk, "driver", name="qemu", type="raw", **({} if shared else {"discard": "unmap"}))
    source = _sub(disk, "source", file=str(path))
    if shared:  # libvirt would chown the image shared by every VM to its QEMU user, and leave it so
        _sub(source, "seclabel", model="dac", relabel="no")
    _sub(disk, "target", dev=target, bus="virtio")
    _sub(disk, "serial", serial)
    if shared:
        _sub(disk, "readonly")
        _sub(disk, "shareable")


def _devices(domain: ET.Element, vm: VM, vm_dir: Path, images: Path, network: str) -> None:
    devices = _sub(domain, "devices")
    _disk(devices, images / "usr.img", "vda", "usr.readonly", shared=True)
    _disk(devices, vm_dir / "rootfs.img", "vdb", "rootfs", shared=False)
    _disk(devices, vm_dir / "oem.img", "vdc", "oem", shared=False)
    config = _sub(devices, "filesystem", type="mount", accessmode="squash")
    _sub(config, "source", dir=str(vm_dir / "config"))
    _sub(config, "target", dir="config-2")
    _sub(config, "readonly")
    cluster = _sub(devices, "interface", type="network")
    _sub(cluster, "mac", address=vm.cluster_mac)
    _sub(cluster, "source", network=network)
    _sub(cluster, "model", type="virtio")
    serial = _sub(devices, "serial", type="pty")
    _sub(serial, "log", file=str(vm_dir / "console.log"), append="off")
    _sub(devices, "console", type="pty")
    _sub(devices, "memballoon", model="virtio", freePageReporting="on")


def _user_network(domain: ET.Element, vm: VM) -> None:
    """NIC 1 as in run.sh; on pcie.0 slot 0x10, clear of the root ports libvirt puts on slots 1-2."""
    forwards = "".join(f",hostfwd=tcp:127.0.0.1:{host}-:{guest}" for host, guest in vm.forward)
    args = ["-netdev", f"user,id=leanvm-user,hostfwd=tcp:127.0.0.1:{vm.ssh_port}-:22{forwards},hostname={vm.name}",
            "-device", f"virtio-net-pci,netdev=leanvm-user,mac={vm.mac},bus=pcie.0,addr=0x10"]
    commandline = _sub(domain, f"{{{QEMU_NS}}}commandline")
    for arg in args:
        _sub(commandline, f"{{{QEMU_NS}}}arg", value=arg)


def domain_xml(vm: VM, release: Release, out: Path, images: Path) -> str:
    """The domain as written: KVM, and the kernel command line of a boot that is not a first boot."""
    vm_dir = out / "vms" / vm.name
    domain = ET.Element("domain", type="kvm")
    _sub(domain, "name", f"{prefix(out)}-{vm.name}")
    _sub(domain, "uuid", str(uuid.uuid5(uuid.NAMESPACE_URL, f"leanvm:{out}:{vm.name}")))
    _sub(domain, "memory", str(vm.memory), unit="MiB")
    _sub(domain, "vcpu", str(vm.cpus))
    if vm.ignition and release.ignition_fw_cfg:
        sysinfo = _sub(domain, "sysinfo", type="fwcfg")
        _sub(sysinfo, "entry", name=release.ignition_fw_cfg, file=str(vm_dir / "ignition.json"))
    os_ = _sub(domain, "os")
    _sub(os_, "type", "hvm", arch="x86_64", machine="q35")
    _sub(os_, "kernel", str(images / "vmlinuz"))
    if release.initrd:
        _sub(os_, "initrd", str(images / "initrd"))
    _sub(os_, "cmdline", kernel_args(vm, release))
    _sub(_sub(domain, "features"), "acpi")
    _sub(domain, "cpu", mode="host-passthrough")
    _sub(domain, "on_poweroff", "destroy")
    _devices(domain, vm, vm_dir, images, f"{prefix(out)}-cluster")
    _user_network(domain, vm)
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


def vm_env(vm: VM, release: Release) -> str:
    """out/vms/NAME/libvirt.env: what libvirt.sh needs to build a boot's command line."""
    return (f"# leanvm: read by out/libvirt.sh; written by `doit libvirt`\n"
            f"kernel_args={quote(kernel_args(vm, release))}\n"
            f"first_boot_args={quote(release.first_boot_args or '')}\n")


def cluster_env(out: Path) -> str:
    """out/libvirt/cluster.env: the names, and the out/ path the XML was written for."""
    return (f"# leanvm: read by out/libvirt.sh; written by `doit libvirt`\n"
            f"prefix={quote(prefix(out))}\n"
            f"network={quote(prefix(out) + '-cluster')}\n"
            f"built_out={quote(str(out))}\n")
