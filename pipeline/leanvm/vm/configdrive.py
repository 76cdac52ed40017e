"""The config drive's user_data (the VM's own file, or a generated #cloud-config) and the
VM's Ignition config when it has one, each carrying the cluster network's systemd-networkd
unit the way Flatcar applies it on a first boot (Ignition: storage.files; cloud-config:
coreos.units), /etc/hosts naming every VM of the cluster and the systemd drop-ins a VM
booted from a PXE /usr needs (Ignition: storage.files; cloud-config: write_files). The cluster key
joins the user's keys in both."""

import io
import json
import os
import urllib.parse
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pycdlib
import yaml

from leanvm.config.types import VM
from leanvm.fsutil import temp_path, write_atomic
from leanvm.state.identity import Identity
from leanvm.vm import ignitioncheck

CLOUD_CONFIG = "#cloud-config"
NETWORK_UNIT_NAME = "50-leanvm-cluster.network"
NETWORK_UNIT = f"/etc/systemd/network/{NETWORK_UNIT_NAME}"
HOSTS = "/etc/hosts"
HOSTNAME = "/etc/hostname"
CONFIG_DRIVE_LABEL = "config-2"
# What an Ignition VM's config drive holds: nothing that could override what its Ignition
# wrote (Flatcar skips it anyway once Ignition had a user config: user-configdrive.service's
# ExecCondition on userConfigProvided, flatcar/coreos-cloudinit units/, 8df59e8f).
IGNITION_VM_USER_DATA = CLOUD_CONFIG + "\n# provisioned by Ignition (ignition.json): nothing to apply here\n"

# Flatcar's PXE usr.squashfs carries /usr/.noupdate (flatcar/scripts build_library/
# vm_image_util.sh), and every VM's config carries these drop-ins for what follows from it:
# - The real root's OEM mount has ConditionPathExists=!/usr/.noupdate (flatcar/init
#   systemd/system/oem.mount; usr-share-oem.mount on LTS 2023, flatcar-3510-backport), and
#   the initrd mounts the OEM disk only for Ignition's files stage (bootengine dracut/
#   30ignition/ignition-files.service): /oem would be empty after the first boot. Resetting
#   the condition mounts it on every boot, as on a Flatcar disk image (a drop-in for a unit
#   a release does not have does nothing).
# - update-engine-stub.timer runs update-engine-stub.service 7 min after boot and every 41
#   min (flatcar/update_engine systemd/, 73826410); its script fails when the update server
#   cannot be reached (set -e around curl), and a failed unit leaves the VM `degraded`. The
#   drop-in keeps the check-in but lets it fail quietly (ExecStart's "-" prefix).
DROP_INS = {
    **{f"/etc/systemd/system/{unit}.d/10-leanvm-oem.conf":
       "# written by leanvm: mount the OEM disk on every boot (the PXE /usr's .noupdate\n"
       "# would skip it after the first boot)\n[Unit]\nConditionPathExists=\n"
       for unit in ("oem.mount", "usr-share-oem.mount")},
    "/etc/systemd/system/update-engine-stub.service.d/10-leanvm-offline.conf":
       "# written by leanvm: an unreachable update server does not leave the VM degraded\n"
       "[Service]\nExecStart=\nExecStart=-/usr/sbin/update_engine_stub\n",
}


class _Dumper(yaml.SafeDumper):
    """Multi-line strings as literal blocks (`|`), as people write unit contents."""


_Dumper.add_representer(str, lambda dumper, text: dumper.represent_scalar(
    "tag:yaml.org,2002:str", text, style="|" if "\n" in text else None))


def network_unit(ident: Identity) -> str:
    """The cluster network's systemd-networkd unit: the NIC with the cluster MAC gets the address."""
    return f"[Match]\nMACAddress={ident.cluster_mac}\n\n[Network]\nAddress={ident.cluster_ip}\n"


def hosts(identities: Mapping[str, Identity]) -> str:
    """/etc/hosts for a cluster: localhost, then each VM's name at its cluster address."""
    lines = ["127.0.0.1 localhost", "::1 localhost"]
    lines += [f"{ident.cluster_ip.split('/')[0]} {name}" for name, ident in identities.items() if ident.cluster_ip]
    return "# written by leanvm: the VMs of this cluster on its private network\n" + "\n".join(lines) + "\n"


def _merge(doc: dict[str, Any], vm: VM, ident: Identity, keys: tuple[str, ...], hosts_text: str) -> dict[str, Any]:
    """ssh_authorized_keys, /etc/hosts and leanvm's DROP_INS (each unless the user writes
    that file) and, for a VM without Ignition, the cluster network unit, merged into a
    #cloud-config document. The unit goes under coreos.units: coreos-cloudinit restarts
    networkd only for network units listed there, not for write_files."""
    files = list(doc.get("write_files") or [])
    ours = [(HOSTS, hosts_text)] if hosts_text and not vm.ignition else []
    ours += list(DROP_INS.items())
    added = [{"path": path, "permissions": "0644", "content": text} for path, text in ours
             if all(f.get("path") != path for f in files)]
    if added:
        doc = {**doc, "write_files": [*files, *added]}
    if keys:
        have = list(doc.get("ssh_authorized_keys") or [])
        doc = {**doc, "ssh_authorized_keys": have + [k for k in keys if k not in have]}
    if ident.cluster_ip and not vm.ignition:
        coreos = dict(doc.get("coreos") or {})
        units = [u for u in coreos.get("units") or [] if u.get("name") != NETWORK_UNIT_NAME]
        coreos["units"] = [*units, {"name": NETWORK_UNIT_NAME, "content": network_unit(ident)}]
        doc = {**doc, "coreos": coreos}
    return doc


def _dump(doc: dict[str, Any]) -> str:
    # width: a key stays on one line, as cloud-init readers and the mini release expect
    dumped = yaml.dump(doc, Dumper=_Dumper, sort_keys=False, default_flow_style=False, width=1 << 16)
    return CLOUD_CONFIG + "\n" + str(dumped)


def _keys(vm: VM, cluster_key: str | None) -> tuple[str, ...]:
    """The user's keys, then the cluster key."""
    return tuple(vm.ssh_authorized_keys) + ((cluster_key,) if cluster_key else ())


def render(vm: VM, ident: Identity, cluster_key: str | None = None, hosts_text: str = "") -> str:
    """VM vm's user_data, at the cluster address its identity gives."""
    keys = _keys(vm, cluster_key)
    if vm.user_data is None:
        return _dump(_merge({"hostname": vm.name}, vm, ident, keys, hosts_text))
    assert vm.user_data_text is not None, "the cluster file's loader reads every user_data it names"
    doc = vm.user_data_doc  # as the loader read and checked it (a '#!' script: None, taken as it is)
    return vm.user_data_text if doc is None else _dump(_merge(doc, vm, ident, keys, hosts_text))


def write_drive(dest: Path, user_data: bytes) -> None:
    """The config drive: an ISO 9660 image (Rock Ridge and Joliet names) labelled config-2
    holding openstack/latest/user_data, the OpenStack form that Flatcar's 90-configdrive.rules
    mounts on /media/configdrive (flatcar/coreos-cloudinit units/). A disk, not a 9p share:
    QEMU cannot save a VM while a 9p export is mounted in it."""
    iso = pycdlib.PyCdlib()
    iso.new(interchange_level=3, rock_ridge="1.09", joliet=3, vol_ident=CONFIG_DRIVE_LABEL)
    for iso_dir, name, joliet in (("/OPENSTAC", "openstack", "/openstack"),
                                  ("/OPENSTAC/LATEST", "latest", "/openstack/latest")):
        iso.add_directory(iso_dir, rr_name=name, joliet_path=joliet)
    iso.add_fp(io.BytesIO(user_data), len(user_data), "/OPENSTAC/LATEST/USER_DAT.;1", rr_name="user_data",
               joliet_path="/openstack/latest/user_data")
    tmp = temp_path(dest)
    try:
        iso.write(str(tmp))
        iso.close()
        os.chmod(tmp, 0o444)  # read-only, as QEMU attaches it
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


def _ignition_file(path: str, text: str) -> dict[str, Any]:
    return {"path": path, "mode": 0o644, "overwrite": True,
            "contents": {"source": "data:," + urllib.parse.quote(text)}}


def ignition_with_network(config: dict[str, Any], vm: VM, ident: Identity, hosts_text: str = "") -> dict[str, Any]:
    """The Ignition config with the cluster network unit, /etc/hosts and /etc/hostname (each
    of the last two unless the config writes it) in storage.files: Ignition writes them in the
    initramfs, before networkd starts, so the address and the names are there on a first boot
    (an Ignition VM's config drive sets nothing)."""
    if not ident.cluster_ip:
        return config
    storage = dict(config.get("storage") or {})
    files = [f for f in storage.get("files") or [] if f.get("path") != NETWORK_UNIT]
    files.append(_ignition_file(NETWORK_UNIT, network_unit(ident)))
    if hosts_text and all(f.get("path") != HOSTS for f in files):
        files.append(_ignition_file(HOSTS, hosts_text))
    if all(f.get("path") != HOSTNAME for f in files):
        files.append(_ignition_file(HOSTNAME, vm.name + "\n"))
    return {**config, "storage": {**storage, "files": files}}


def ignition_with_drop_ins(config: dict[str, Any]) -> dict[str, Any]:
    """The Ignition config with leanvm's DROP_INS in storage.files (each unless it writes it)."""
    storage = dict(config.get("storage") or {})
    files = list(storage.get("files") or [])
    files += [_ignition_file(path, text) for path, text in DROP_INS.items()
              if all(f.get("path") != path for f in files)]
    return {**config, "storage": {**storage, "files": files}}


def ignition_with_keys(config: dict[str, Any], keys: tuple[str, ...]) -> dict[str, Any]:
    """The Ignition config with `keys` in passwd.users -> core -> sshAuthorizedKeys; all else kept."""
    passwd = dict(config.get("passwd") or {})
    users = [dict(u) for u in passwd.get("users") or []]
    core = next((u for u in users if u.get("name") == "core"), None)
    if core is None:
        core = {"name": "core"}
        users.append(core)
    have = list(core.get("sshAuthorizedKeys") or [])
    core["sshAuthorizedKeys"] = have + [k for k in keys if k not in have]
    return {**config, "passwd": {**passwd, "users": users}}


def write(vm: VM, ident: Identity, dest: Path, drive: Path, ignition_dest: Path,
          cluster_key_file: Path | None = None, hosts_text: str = "", version: str = "") -> None:
    """VM vm's user_data and config drive, and its merged Ignition config if it has one (its
    release at `version` decides which specs are accepted); `ident` is the identity the DAG gave it."""
    cluster_key = cluster_key_file.read_text().strip() if cluster_key_file else None
    user_data = (IGNITION_VM_USER_DATA if vm.ignition else render(vm, ident, cluster_key, hosts_text)).encode()
    write_atomic(dest, user_data)
    write_drive(drive, user_data)
    if vm.ignition:
        config = vm.ignition_doc if vm.ignition_doc is not None else ignitioncheck.transpile(vm.ignition)
        ignitioncheck.check_spec(vm.name, vm.ignition, config, vm.release, version)
        merged = ignition_with_drop_ins(
            ignition_with_network(ignition_with_keys(config, _keys(vm, cluster_key)), vm, ident, hosts_text))
        tmp = temp_path(ignition_dest)
        write_atomic(tmp, (json.dumps(merged, indent=2) + "\n").encode())
        try:
            ignitioncheck.validate(vm.name, tmp, vm.ignition)
            os.replace(tmp, ignition_dest)
        finally:
            tmp.unlink(missing_ok=True)
    else:
        ignition_dest.unlink(missing_ok=True)
