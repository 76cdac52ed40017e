"""A VM's user_data and Ignition config, read and checked once, at load: what leanvm merges
into them must have the types it expects, so a bad file is refused, not mangled."""

import json
import re
import shutil
from pathlib import Path
from typing import Any

import yaml

from leanvm.config.keys import Where
from leanvm.config.yamlfile import yaml_problem
from leanvm.errors import LeanvmError


def read_ignition(path: Path, where: Where) -> dict[str, Any] | None:
    """An Ignition config (JSON with ignition.version), checked and returned, or a Butane
    config (YAML with `variant:`), which the build transpiles with butane: None."""
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise where.error(f"cannot read {path}: {e}", "point ignition at a readable JSON file") from None
    if is_butane(text):
        if shutil.which("butane") is None:
            raise where.error(f"{path} is a Butane config, and butane is not installed",
                              f"install butane, or transpile it: butane --strict {path} > config.ign")
        return None
    try:
        doc = json.loads(text)
    except ValueError as e:
        raise where.error(f"{path} is not valid JSON: {e}", "fix the Ignition config") from None
    version = doc.get("ignition", {}).get("version") if isinstance(doc, dict) else None
    if not isinstance(version, str):
        raise where.error(f"{path} has no ignition.version", 'write {"ignition": {"version": "3.3.0"}, ...}')
    _ignition_shape(doc, path, where)
    if "kernelArguments" in doc:
        raise where.error(
            f"{path} sets kernelArguments: Flatcar's ignition-kargs-helper needs an EFI-SYSTEM partition, which a "
            "leanvm VM has not (the boot would end in the emergency shell)",
            "give the VM a kernel_args key in the cluster file instead")
    return dict(doc)


def _ignition_shape(doc: dict[str, Any], path: Path, where: Where) -> None:
    """The parts of an Ignition config that leanvm merges into (the cluster key, network unit,
    /etc/hosts) must have Ignition's types: refused, not mangled."""
    def expect(value: object, kind: type, key: str, what: str) -> None:
        if not isinstance(value, kind):
            raise where.error(f"{path}: {key} must be {what}, not {type(value).__name__} {value!r:.40}",
                              "fix the Ignition config (spec: coreos.github.io/ignition/configuration-v3_3)")

    expect(doc.get("passwd", {}), dict, "passwd", "an object")
    expect(doc.get("storage", {}), dict, "storage", "an object")
    users = doc.get("passwd", {}).get("users", [])
    expect(users, list, "passwd.users", "a list")
    for i, user in enumerate(users):
        expect(user, dict, f"passwd.users.{i}", "an object")
        expect(user.get("name"), str, f"passwd.users.{i}.name", "a string")
        keys = user.get("sshAuthorizedKeys", [])
        expect(keys, list, f"passwd.users.{i}.sshAuthorizedKeys", "a list of keys")
        for j, key in enumerate(keys):
            expect(key, str, f"passwd.users.{i}.sshAuthorizedKeys.{j}", "a string")
    files = doc.get("storage", {}).get("files", [])
    expect(files, list, "storage.files", "a list")
    for i, entry in enumerate(files):
        expect(entry, dict, f"storage.files.{i}", "an object")


def is_butane(text: str) -> bool:
    """True for a Butane config: YAML whose mapping names a `variant` (e.g. flatcar)."""
    if text.lstrip().startswith("{"):
        return False
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError:
        return False
    return isinstance(doc, dict) and "variant" in doc


# --- tables of allowed keys: one shape for all four ------------------------------


# systemd's hostname_is_valid (src/basic/hostname-util.c), which hostnamectl applies when
# coreos-cloudinit sets the hostname: labels of ASCII letters, digits and '-', joined by
# single dots, at most 64 characters (HOST_NAME_MAX).
HOSTNAME_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?")


def check_names(path: Path, doc: dict[str, Any]) -> None:
    """A hostname systemd would refuse, and write_files paths that are not ASCII (the guest
    writes them under an escaped name), are refused at build time."""
    hostname = doc.get("hostname")
    if hostname is not None and not (isinstance(hostname, str) and len(hostname) <= 64
                                     and all(HOSTNAME_LABEL.fullmatch(label) for label in hostname.split("."))):
        raise LeanvmError(f"{path}: hostname {hostname!r} is not a hostname systemd accepts",
                          "use ASCII letters, digits and '-' in dot-separated labels, at most 64 characters")
    for entry in doc.get("write_files") or []:
        where = entry.get("path") if isinstance(entry, dict) else None
        if isinstance(where, str) and not where.isascii():
            raise LeanvmError(f"{path}: write_files path {where!r} is not ASCII",
                              "name the file with ASCII letters, digits and . _ - /")


def read_user_data(path: Path, needs_merge: bool) -> tuple[str, dict[str, Any] | None]:
    """A user_data file's text and, for a #cloud-config, its document (None for a '#!' script).
    `needs_merge`: keys or a given cluster address must be merged in, which a script cannot take."""
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise LeanvmError(f"{path}: cannot read user_data: {e}", "check the file") from None
    if text.startswith("#!"):
        if needs_merge:
            raise LeanvmError(
                f"{path}: ssh_authorized_keys and cluster_ip cannot be merged into a '#!' script",
                "configure them in the script, or use a #cloud-config file",
            )
        return text, None
    if not text.startswith("#cloud-config"):
        raise LeanvmError(f"{path}: user_data is neither '#cloud-config' nor a '#!' script", "fix its first line")
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise LeanvmError(f"{path}: #cloud-config is not valid YAML: {yaml_problem(e)}", "fix the YAML") from None
    if doc is not None and not isinstance(doc, dict):
        raise LeanvmError(f"{path}: #cloud-config must be a YAML mapping", "write KEY: VALUE lines")
    if not isinstance((doc or {}).get("write_files", []), list):
        raise LeanvmError(f"{path}: write_files must be a list", "fix the #cloud-config")
    check_names(path, doc or {})
    coreos = (doc or {}).get("coreos") or {}
    units = coreos.get("units") or [] if isinstance(coreos, dict) else None
    if not isinstance(units, list) or not all(isinstance(u, dict) for u in units):
        raise LeanvmError(f"{path}: coreos.units must be a list of units (name:, content:, ...)",
                          "fix the #cloud-config")
    return text, doc or {}


