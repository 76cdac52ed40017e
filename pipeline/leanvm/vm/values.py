"""A VM's values file, out/state/vms/NAME.env (what its run.sh reads), and its run.sh.

run.sh is the same file for every VM (resources/run.sh, a real shell file that
shellcheck reads); it finds its VM by its own directory and reads everything it needs of
the VM from the VM's values file, out/state/vms/NAME.env (`values`, written with the
identity by identity.save). `leanvm libvirt` renders its domains from the same values.
"""

from dataclasses import replace
from pathlib import Path

from leanvm.config.types import VM, kernel_args
from leanvm.fsutil import write_atomic
from leanvm.resources import RUN_SH
from leanvm.state import identity
from leanvm.state.layout import Layout, Names


def user_netdev(name: str, netdev_id: str, ssh_port: int, forward: tuple[tuple[int, int], ...]) -> str:
    """NIC 1's QEMU netdev: user networking, ssh (and any extra forwards) on 127.0.0.1 only."""
    forwards = "".join(f",hostfwd=tcp:127.0.0.1:{host}-:{guest}" for host, guest in forward)
    return f"user,id={netdev_id},hostfwd=tcp:127.0.0.1:{ssh_port}-:22{forwards},hostname={name}"


def values(vm: VM, ident: identity.Identity, version: str) -> dict[str, str]:
    """Everything run.sh, cluster.sh and leanvm libvirt read of the VM: its identity (`ident`,
    given by the DAG), hardware, boot arguments and image directory (relative to out/), for
    `version` of its release."""
    release = vm.release
    image_dir = Layout(Path("")).images(release.name, version)
    return {
        **identity.as_values(replace(ident, image_dir=str(image_dir))),
        "release": release.name,
        "version": version,
        "arch": release.arch.value,
        "cpu_arch": release.arch.facts.cpu_name,
        "qemu": release.arch.facts.qemu,
        "qemu_package": release.arch.facts.qemu_package,
        "machine": release.arch.facts.machine,
        "cpus": str(vm.cpus),
        "memory": str(vm.memory),
        "user_netdev": user_netdev(vm.name, "net0", ident.ssh_port, vm.forward),
        "kernel_args": kernel_args(vm),
        "first_boot_args": release.first_boot_args or "",
        "initrd": "yes" if release.initrd else "",
        "ignition_fw_cfg": release.ignition_fw_cfg if vm.ignition and release.ignition_fw_cfg else "",
    }


def write(vm: VM, ident: identity.Identity, version: str, out: Path) -> None:
    """The values file first (run.sh needs it), then run.sh."""
    identity.save(out, vm.name, values(vm, ident, version))
    dest = Layout(out).run_sh(vm.name)
    write_atomic(dest, RUN_SH.read_bytes(), mode=0o755)
    dest.with_name(f"{Names.VM_RUN_SH}.retired").unlink(missing_ok=True)  # a VM added back is no longer retired
