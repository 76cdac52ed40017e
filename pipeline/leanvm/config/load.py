"""Cluster files and release profiles -> validated, frozen dataclasses (`types.py`).

Every key is checked against its table (`keys.py`); an error names the file and the key
path and says how to fix it. A VM's user_data and Ignition are read once, here
(`provisioning.py`), and kept on the VM."""

import ipaddress
from pathlib import Path
from typing import Any

from leanvm.config.keys import (
    CLUSTER_KEYS,
    NETWORK_KEYS,
    PROFILE_KEYS,
    RELEASE_NAME,
    VM_KEYS,
    VM_NAME,
    Where,
    checked,
    fields_from,
    mapping,
    text_value,
)
from leanvm.config.provisioning import read_ignition, read_user_data
from leanvm.config.types import VM, Cluster, Release
from leanvm.config.yamlfile import read_yaml
from leanvm.errors import LeanvmError
from leanvm.resources import PROFILES


def _check_key_file(path: Path, where: Where) -> None:
    """Cheap sanity check; gpg does the real parsing when verifying."""
    try:
        head = path.read_bytes()[:1 << 16]
    except OSError as e:
        raise where.error(f"cannot read {path}: {e.strerror}", "point it at an armored public key") from None
    armored = b"-----BEGIN PGP PUBLIC KEY BLOCK-----" in head
    binary = bool(head) and head[0] in (0x98, 0x99, 0x9A, 0xC6)  # public-key packet tags
    if not (armored or binary):
        raise where.error(f"{path} holds no OpenPGP public key", "export one with `gpg --armor --export FPR`")


def load_profile(path: Path) -> Release:
    where = Where(path)
    values = checked(read_yaml(path), where, PROFILE_KEYS)
    if values["version"].startswith("current") and not (values.get("version_file") and values.get("version_key")):
        raise (where / "version").error(
            f"'{values['version']}' needs version_file and version_key", "add them, or pin a version"
        )
    key_path = (path.parent / values["signing_key"]).resolve()
    _check_key_file(key_path, where / "signing_key")
    name = path.stem
    if not RELEASE_NAME.fullmatch(name):
        raise where.error(f"profile name {name!r} is not usable", "rename the file to letters, digits, . _ -")
    return Release(name=name, path=path, **{**fields_from(values, PROFILE_KEYS), "signing_key": key_path})


def _release_path(value: Any, where: Where, cluster_file: Path) -> Path:
    """A path as given, or a bare profile NAME: releases/NAME.yaml beside the cluster file,
    else leanvm's own configs/releases/NAME.yaml."""
    ref = text_value(value, where)
    if "/" in ref or ref.endswith((".yaml", ".yml")):
        path = (cluster_file.parent / ref).resolve()
        if not path.is_file():
            raise where.error(f"release profile {path} does not exist", "give the path of a profile file")
        return path
    if not RELEASE_NAME.fullmatch(ref):
        raise where.error(f"{ref!r} is not a profile name", "name a profile in releases/ or give a path")
    places = [(cluster_file.parent / "releases" / f"{ref}.yaml").resolve(), PROFILES / f"{ref}.yaml"]
    found = next((p for p in places if p.is_file()), None)
    if found is None:
        raise where.error(f"no release profile {ref!r}: looked for {places[0]} and {places[1]}",
                          "name one of those, or give a path")
    return found


def _vm_settings(raw: Any, where: Where, cluster_file: Path) -> dict[str, Any]:
    settings = {}
    for key, value in checked(raw, where, VM_KEYS).items():
        settings[key] = value
        if key in ("user_data", "ignition"):
            path = (cluster_file.parent / settings[key]).resolve()
            if not path.exists():
                raise (where / key).error(f"{path} does not exist", f"point {key} at a file")
            if not path.is_file():
                raise (where / key).error(f"{path} is not a regular file", f"point {key} at a file")
            if key == "ignition":
                settings["ignition_doc"] = read_ignition(path, where / key)
            settings[key] = path
    return settings


def load_cluster(path: Path) -> Cluster:
    """Load and check a cluster file: the VMs as it asks for them (only reads; the DAG gives
    each VM its identity)."""
    path = path.resolve()
    where = Where(path)
    data = checked(read_yaml(path), where, CLUSTER_KEYS)
    release = load_profile(_release_path(data["release"], where / "release", path))
    network = checked(data.get("network"), where / "network", NETWORK_KEYS)
    subnet = ipaddress.IPv4Network(network.get("subnet", "10.77.0.0/24"))
    per_vm = _parse_vms(data, where, path, release, subnet)
    _check_unique(per_vm, where)
    vms = tuple(_vm(name, per_vm[name]) for name in sorted(per_vm))
    return Cluster(path=path, release=release, vms=vms, subnet=str(subnet))


def _vm_release(settings: dict[str, Any], where: Where, path: Path, default: Release) -> Release:
    """The VM's own `release` (a profile name or path, as the cluster's), else the cluster's.
    Two profiles of one name would share out/images/NAME: refused."""
    if "release" not in settings:
        return default
    release = load_profile(_release_path(settings["release"], where / "release", path))
    if release.name == default.name and release.path != default.path:
        raise (where / "release").error(f"{release.path} has the name of the cluster's release {default.path}",
                                        "rename one of the profile files")
    return release


def _parse_vms(data: dict[str, Any], where: Where, path: Path, release: Release,
               subnet: ipaddress.IPv4Network) -> dict[str, dict[str, Any]]:
    """Each VM's settings, defaults applied, every key checked; "release" holds the VM's."""
    raw_defaults = mapping(data.get("defaults"), where / "defaults", VM_KEYS)  # checked below
    if "ssh_port" in raw_defaults:
        raise (where / "defaults" / "ssh_port").error(
            "a port cannot be a default: every VM needs its own", "set ssh_port per VM, or leave it out to assign one")
    defaults = _vm_settings(raw_defaults, where / "defaults", path)
    vms_raw = data.get("vms")
    if not isinstance(vms_raw, dict) or not vms_raw:
        raise (where / "vms").error("expected a mapping of at least one VM", "add `vms: {core1: {}}`")
    per_vm: dict[str, dict[str, Any]] = {}
    for name, raw in vms_raw.items():
        vm_where = where / "vms" / str(name)
        if not isinstance(name, str) or not VM_NAME.fullmatch(name):
            raise vm_where.error("bad VM name", "use lower-case letters, digits and '-', starting with a letter")
        per_vm[name] = {**defaults, **_vm_settings(raw, vm_where, path)}
        where_release = vm_where if "release" in (raw or {}) else where / "defaults"
        per_vm[name]["release"] = _vm_release(per_vm[name], where_release, path, release)
        _check_vm(per_vm[name], vm_where, per_vm[name]["release"], subnet)
    _check_release_names(per_vm, where)
    return per_vm


def _check_release_names(per_vm: dict[str, dict[str, Any]], where: Where) -> None:
    seen: dict[str, Release] = {}
    for name, settings in per_vm.items():
        release = settings["release"]
        other = seen.setdefault(release.name, release)
        if other.path != release.path:
            raise (where / "vms" / name / "release").error(
                f"{release.path} and {other.path} have one name", "rename one of the profile files")


def _check_unique(per_vm: dict[str, dict[str, Any]], where: Where) -> None:
    """No host port or cluster address is given to two VMs."""
    ports: dict[int, str] = {}
    addresses: dict[str, str] = {}
    for name, settings in per_vm.items():
        vm_where = where / "vms" / name
        wanted = [(settings["ssh_port"], "ssh_port")] if "ssh_port" in settings else []
        wanted += [(host, "forward") for host, _ in settings.get("forward", ())]
        for port, key in wanted:
            if port in ports:
                raise (vm_where / key).error(
                    f"host port {port} is also used by VM {ports[port]}", "give each forward its own host port"
                )
            ports[port] = name
        ip = settings.get("cluster_ip")
        if ip in addresses:
            raise (vm_where / "cluster_ip").error(f"{ip} is also used by VM {addresses[ip]}", "give each VM its own")
        if ip:
            addresses[ip] = name


def _vm(name: str, settings: dict[str, Any]) -> VM:
    fields = fields_from(settings, VM_KEYS)
    text, doc = settings.get("user_data_read", (None, None))
    return VM(name=name, user_data_text=text, user_data_doc=doc, ignition_doc=settings.get("ignition_doc"), **fields)


def _check_vm(settings: dict[str, Any], where: Where, release: Release, subnet: ipaddress.IPv4Network) -> None:
    if settings.get("ignition") and settings.get("user_data"):
        raise where.error("has both ignition and user_data", "give a VM one of them")
    if settings.get("user_data"):
        extras = bool(settings.get("ssh_authorized_keys") or settings.get("cluster_ip"))
        try:
            settings["user_data_read"] = read_user_data(settings["user_data"], extras)  # kept: read once
        except LeanvmError as e:
            raise (where / "user_data").error(e.message, e.hint) from None
    if settings.get("ignition") and not release.ignition_fw_cfg:
        raise (where / "ignition").error(
            f"release profile {release.path} has no ignition_fw_cfg", "add it, e.g. opt/org.flatcar-linux/config"
        )
    ip = settings.get("cluster_ip")
    if ip and (ipaddress.IPv4Address(ip) not in subnet or ip in (str(subnet.network_address),
                                                                   str(subnet.broadcast_address))):
        raise (where / "cluster_ip").error(f"{ip} is not a host address in {subnet}", "pick one inside network.subnet")
