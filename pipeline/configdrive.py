"""The config drive's user_data (the VM's own file, or a generated #cloud-config), plus
the cluster network's systemd-networkd unit and the VM's Ignition config when it has one."""

from pathlib import Path

import yaml

from .config import VM, read_user_data
from .fsutil import write_atomic

CLOUD_CONFIG = "#cloud-config"
NETWORK_UNIT = "/etc/systemd/network/50-leanvm-cluster.network"


def _merge(doc: dict, vm: VM) -> dict:
    """ssh_authorized_keys and the cluster address, merged into a #cloud-config document."""
    if vm.ssh_authorized_keys:
        keys = list(doc.get("ssh_authorized_keys") or [])
        doc = {**doc, "ssh_authorized_keys": keys + [k for k in vm.ssh_authorized_keys if k not in keys]}
    if vm.cluster_ip:
        unit = f"[Match]\nMACAddress={vm.cluster_mac}\n\n[Network]\nAddress={vm.cluster_ip}\n"
        files = [f for f in doc.get("write_files") or [] if f.get("path") != NETWORK_UNIT]
        doc = {**doc, "write_files": [*files, {"path": NETWORK_UNIT, "permissions": "0644", "content": unit}]}
    return doc


def _script_conflicts(vm: VM) -> bool:
    """A '#!' script cannot take keys or a given address; an assigned address is left out."""
    return bool(vm.ssh_authorized_keys or vm.cluster_ip_given)


def _dump(doc: dict) -> str:
    return CLOUD_CONFIG + "\n" + yaml.safe_dump(doc, sort_keys=False, default_flow_style=False)


def _from_file(path: Path, vm: VM) -> str:
    text, doc = read_user_data(path, _script_conflicts(vm))
    return text if doc is None else _dump(_merge(doc, vm))


def render(vm: VM) -> str:
    if vm.user_data is not None:
        return _from_file(vm.user_data, vm)
    return _dump(_merge({"hostname": vm.name}, vm))


def write(vm: VM, dest: Path, ignition_dest: Path) -> None:
    write_atomic(dest, render(vm).encode())
    if vm.ignition:
        write_atomic(ignition_dest, vm.ignition.read_bytes())
    else:
        ignition_dest.unlink(missing_ok=True)
