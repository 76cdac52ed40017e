"""Cluster files and release profiles -> validated, frozen dataclasses.

Every key is checked against a table (as doit checks task fields); an error names the
file and the key path and says how to fix it.
"""

import ipaddress
import json
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import yaml

from leanvm.arch import Arch
from leanvm.errors import LeanvmError
from leanvm.resources import PROFILES

VM_NAME = re.compile(r"[a-z][a-z0-9-]{0,62}")  # every pattern here is used with fullmatch
RELEASE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
FINGERPRINT = re.compile(r"[0-9A-F]{40}")
SIZE = re.compile(r"([1-9][0-9]*)([KMGT])")
SIZE_UNITS = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
MIN_DISK = 64 << 20
MAX_DISK = 1 << 60  # 1 EiB: ext4's largest filesystem (4 KiB blocks)


@dataclass(frozen=True)
class Release:
    name: str
    path: Path
    base_url: str
    version: str
    version_file: str | None
    version_key: str | None
    kernel: str
    initrd: str | None
    image: str
    usr_member: str
    signature_suffix: str
    signing_key: Path
    fingerprints: tuple[str, ...]
    kernel_args: str
    ignition_fw_cfg: str | None = None
    first_boot_args: str | None = None  # kernel args for boots whose root has no Ignition result
    arch: Arch = Arch.AMD64
    # The Ignition specs the release's own Ignition accepts, by the release's major version
    # ("default" for any other): (major, specs), specs None for an Ignition that writes no
    # /etc/.ignition-result.json (every boot would be a first boot).
    ignition_specs: tuple[tuple[str, tuple[str, ...] | None], ...] = ()


# Every Ignition spec version there is (coreos/ignition config/ and Flatcar's 2.x fork, which
# adds 2.4.0), in order: what a range in a profile's ignition_specs spans.
IGNITION_SPECS = ("2.0.0", "2.1.0", "2.2.0", "2.3.0", "2.4.0",
                  "3.0.0", "3.1.0", "3.2.0", "3.3.0", "3.4.0", "3.5.0", "3.6.0")
# Flatcar stable's (Ignition 2.24: 3.0.0-3.5.0; 2.x translated by Flatcar's patch): the
# default of a profile that gives no ignition_specs.
DEFAULT_IGNITION_SPECS = ("2.0.0", "2.1.0", "2.2.0", "2.3.0", "2.4.0", "3.0.0", "3.1.0", "3.2.0", "3.3.0",
                          "3.4.0", "3.5.0")


def accepted_specs(release: Release, version: str) -> tuple[str, ...] | None:
    """The Ignition specs release `release` at `version` accepts (None: its Ignition writes no
    result file), from the profile's entry for the version's major number, else its default."""
    table = dict(release.ignition_specs)
    major = version.split(".", 1)[0]
    return table[major] if major in table else table.get("default", DEFAULT_IGNITION_SPECS)


def spec_ranges(specs: tuple[str, ...]) -> str:
    """'3.0.0-3.3.0' for the specs from 3.0.0 to 3.3.0 (runs of IGNITION_SPECS, comma-separated)."""
    runs: list[list[str]] = []
    for spec in IGNITION_SPECS:
        if spec not in specs:
            continue
        if runs and IGNITION_SPECS.index(runs[-1][-1]) == IGNITION_SPECS.index(spec) - 1 \
                and runs[-1][-1][0] == spec[0]:
            runs[-1].append(spec)
        else:
            runs.append([spec])
    return ", ".join(run[0] if len(run) == 1 else f"{run[0]}-{run[-1]}" for run in runs)


@dataclass(frozen=True)
class VM:
    """A VM as its cluster file asks for it. Its identity (ports, MACs, cluster address) is
    not here: the DAG assigns it and keeps it beside the VMs (leanvm.dag.tasks.Context)."""

    name: str
    memory: int
    cpus: int
    disk_size: int  # bytes of the sparse root disk (the cluster file's `disk`)
    user_data: Path | None
    ssh_authorized_keys: tuple[str, ...]
    release: Release  # the cluster's, or the VM's own `release` (e.g. an arm64 VM among amd64 ones)
    given_ssh_port: int | None = None  # the file's `ssh_port`, if it gives one
    given_cluster_ip: str | None = None  # the file's `cluster_ip` (no prefix), if it gives one
    forward: tuple[tuple[int, int], ...] = ()  # the `forward` key: extra (host, guest) TCP ports
    ignition: Path | None = None
    kernel_args: str = ""  # appended after the release profile's kernel_args
    # the user_data and Ignition files as read and checked here, once: the config drive uses them as parsed
    user_data_text: str | None = None
    user_data_doc: dict | None = field(default=None, compare=False, hash=False)  # None: a '#!' script
    ignition_doc: dict | None = field(default=None, compare=False, hash=False)  # None: Butane (transpiled at build)

    @property
    def cluster_ip_given(self) -> bool:  # the cluster file gives the address
        return self.given_cluster_ip is not None


def kernel_args(vm: VM) -> str:
    """VM vm's kernel command line: its release profile's arguments, then the VM's own."""
    return " ".join(filter(None, (vm.release.kernel_args, vm.kernel_args)))


@dataclass(frozen=True)
class Cluster:
    path: Path
    release: Release  # the cluster file's `release`: every VM's unless it names its own
    vms: tuple[VM, ...]
    subnet: str = "10.77.0.0/24"

    @property
    def releases(self) -> tuple[Release, ...]:
        """Every release a VM of the cluster runs, the cluster's own first."""
        found = {self.release.name: self.release}
        for vm in self.vms:
            found.setdefault(vm.release.name, vm.release)
        return tuple(found.values())


class _Where:
    """The file and key path an error is about."""

    def __init__(self, file: Path, key: str = "") -> None:
        self.file, self.key = file, key

    def __truediv__(self, key: str) -> "_Where":
        return _Where(self.file, f"{self.key}.{key}" if self.key else key)

    def error(self, problem: str, hint: str) -> LeanvmError:
        key = self.key if self.key.isprintable() else repr(self.key)  # a name with a newline stays one line
        where = f"{self.file}: {key}" if key else str(self.file)
        return LeanvmError(f"{where}: {problem}", hint)


# --- value checkers: each takes (value, where) and returns the parsed value ----------

def _string(value: Any, where: _Where) -> str:
    if not isinstance(value, str) or not value.strip():
        raise where.error(f"expected a non-empty string, got {value!r}", "write a string")
    return value


def _optional_string(value: Any, where: _Where) -> str | None:
    return None if value is None else _string(value, where)


def _filename(value: Any, where: _Where) -> str:
    name = _string(value, where)
    if "/" in name or name in (".", ".."):
        raise where.error(f"{name!r} is not a plain file name", "give a file name without '/'")
    return name


def _int_at_least(minimum: int) -> Callable[[Any, _Where], int]:
    def check(value: Any, where: _Where) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise where.error(f"expected an integer, got {value!r}", f"write an integer >= {minimum}")
        if value < minimum:
            raise where.error(f"{value} is too small", f"use an integer >= {minimum}")
        return value

    return check


def _port(value: Any, where: _Where) -> int:
    port = _int_at_least(1)(value, where)
    if not 1024 <= port <= 65535:
        raise where.error(f"{port} is not a usable host port", "use a port from 1024 to 65535")
    return port


def _guest_port(value: int, where: _Where) -> int:
    if not 1 <= value <= 65535:
        raise where.error(f"{value} is not a TCP port", "use a guest port from 1 to 65535")
    return value


def _size(value: Any, where: _Where) -> int:
    match = SIZE.fullmatch(value) if isinstance(value, str) else None
    if not match:
        raise where.error(f"cannot parse size {value!r}", "write an integer with K, M, G or T, e.g. 4G")
    size = int(match.group(1)) * SIZE_UNITS[match.group(2)]
    if size < MIN_DISK:
        raise where.error(f"{value} is smaller than 64M", "use a size of at least 64M")
    if size > MAX_DISK:
        raise where.error(f"{value} is larger than ext4's largest filesystem (1 EiB)", "use a smaller size")
    return size


def _string_list(value: Any, where: _Where) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise where.error(f"expected a list, got {value!r}", "write a YAML list of strings")
    return tuple(_string(item, where / str(i)) for i, item in enumerate(value))


def _fingerprints(value: Any, where: _Where) -> tuple[str, ...]:
    prints = _string_list(value, where)
    if not prints:
        raise where.error("the list is empty", "pin at least one primary-key fingerprint")
    for i, fp in enumerate(prints):
        if not FINGERPRINT.fullmatch(fp.replace(" ", "").upper()):
            raise (where / str(i)).error(
                f"{fp!r} is not a 40-hex-digit fingerprint", "copy it from `gpg --show-keys KEYFILE`"
            )
    return tuple(fp.replace(" ", "").upper() for fp in prints)


def _base_url(value: Any, where: _Where) -> str:
    url = _string(value, where)
    parsed = urlparse(url)
    if parsed.scheme not in ("http", "https", "file") or (parsed.scheme != "file" and not parsed.netloc):
        raise where.error(f"{url!r} is not an http, https or file URL", "use e.g. https://host/path/")
    return url if url.endswith("/") else url + "/"


def _version(value: Any, where: _Where) -> str:
    version = _string(str(value) if isinstance(value, (int, float)) else value, where)
    if not RELEASE_NAME.fullmatch(version):
        raise where.error(f"{version!r} is not a version", "write 'current' or e.g. 4081.2.0")
    return version


def _forward_pairs(value: Any, where: _Where) -> tuple[tuple[int, int], ...]:
    pairs = []
    for i, item in enumerate(_string_list(value, where)):
        host, sep, guest = item.partition(":")
        if not (sep and host.isdigit() and guest.isdigit()):
            raise (where / str(i)).error(f"{item!r} is not HOST:GUEST", "write e.g. '8080:80'")
        pairs.append((_port(int(host), where / str(i)), _guest_port(int(guest), where / str(i))))
    return tuple(pairs)


def _ipv4(value: Any, where: _Where) -> str:
    try:
        return str(ipaddress.IPv4Address(_string(value, where)))
    except ipaddress.AddressValueError:
        raise where.error(f"{value!r} is not an IPv4 address", "write e.g. 10.77.0.11") from None


# QEMU's user-mode network, every VM's first NIC (ssh, forwards, the way out): the guest
# routes 10.0.2.0/24 there, so a cluster network overlapping it would lose packets to one.
USER_NETWORK = ipaddress.IPv4Network("10.0.2.0/24")


def _subnet(value: Any, where: _Where) -> str:
    try:
        subnet = ipaddress.IPv4Network(_string(value, where))
    except ValueError:
        raise where.error(f"{value!r} is not an IPv4 network", "write e.g. 10.77.0.0/24") from None
    if subnet.overlaps(USER_NETWORK):
        raise where.error(f"{subnet} overlaps {USER_NETWORK}, QEMU's user-mode network (each VM's first NIC)",
                          "pick another private range, e.g. 10.77.0.0/24")
    return str(subnet)


def _ignition(path: Path, where: _Where) -> dict | None:
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
    return doc


def _ignition_shape(doc: dict, path: Path, where: _Where) -> None:
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

@dataclass(frozen=True)
class Key:
    """A key a mapping may have: how to check its value, whether it must be there, its value
    when it is not (`default`), and the dataclass field it fills (`dest`: the key's own name
    unless given; "" for a key that fills none directly)."""

    check: Callable[[Any, _Where], Any]
    required: bool = False
    default: Any = None
    dest: str | None = None


def fields_from(values: dict[str, Any], table: dict[str, Key]) -> dict[str, Any]:
    """The dataclass fields a checked mapping fills: each key's value, or its default."""
    return {spec.dest or key: values.get(key, spec.default) for key, spec in table.items() if spec.dest != ""}


def _spec_list(value: Any, where: _Where) -> tuple[str, ...] | None:
    """'3.0.0-3.3.0', '2.0.0-2.4.0 3.0.0-3.5.0', a list of those, or `none`."""
    if value == "none":
        return None
    words = [w for item in (value if isinstance(value, list) else [value]) for w in _string(str(item), where).split()]
    specs: list[str] = []
    for word in words:
        first, _, last = word.partition("-")
        if first not in IGNITION_SPECS or (last and last not in IGNITION_SPECS):
            raise where.error(f"{word!r} is not an Ignition spec or range of specs",
                              f"write e.g. 3.0.0-3.3.0 (specs: {', '.join(IGNITION_SPECS)}), or none")
        specs += IGNITION_SPECS[IGNITION_SPECS.index(first):IGNITION_SPECS.index(last or first) + 1]
    return tuple(spec for spec in IGNITION_SPECS if spec in specs)


def _ignition_specs(value: Any, where: _Where) -> tuple[tuple[str, tuple[str, ...] | None], ...]:
    """major version (or `default`) -> the specs that release's Ignition accepts."""
    if not isinstance(value, dict):
        raise where.error(f"expected a mapping, got {value!r}",
                          "write e.g. {default: 3.0.0-3.5.0, '3510': 3.0.0-3.3.0}")
    pairs = []
    for major, specs in value.items():
        key = str(major)
        if key != "default" and not key.isdigit():
            raise (where / key).error("is neither `default` nor a major version", "write e.g. '3510'")
        pairs.append((key, _spec_list(specs, where / key)))
    return tuple(pairs)


def _words(value: Any, where: _Where) -> str:
    """Kernel arguments: the words of a string, one space apart (YAML's folded lines too)."""
    return " ".join(_string(value, where).split())


def _usr_member(value: Any, where: _Where) -> str:
    member = _string(value, where)
    return member.lstrip("./") or member


def _arch(value: Any, where: _Where) -> Arch:
    try:
        return Arch(value)
    except ValueError:
        raise where.error(f"unknown arch {value!r}", f"use one of: {', '.join(a.value for a in Arch)}") from None


def _as_is(value: Any, where: _Where) -> Any:
    return value  # checked where it is used (a nested mapping, a profile reference)


def _optional(check: Callable[[Any, _Where], Any]) -> Callable[[Any, _Where], Any]:
    return lambda value, where: None if value is None else check(value, where)


PROFILE_KEYS = {
    "base_url": Key(_base_url, required=True),
    "version": Key(_version, required=True),
    "version_file": Key(_optional(_filename)),
    "version_key": Key(_optional_string),
    "kernel": Key(_filename, required=True),
    "initrd": Key(_optional(_filename)),
    "image": Key(_filename, required=True),
    "usr_member": Key(_usr_member, required=True),
    "signature_suffix": Key(_string, default=".sig"),
    "signing_key": Key(_string, required=True),
    "fingerprints": Key(_fingerprints, required=True),
    "kernel_args": Key(_words, required=True),
    "ignition_fw_cfg": Key(_optional_string),
    "first_boot_args": Key(_optional(_words)),
    "arch": Key(_arch, default=Arch.AMD64),
    "ignition_specs": Key(_ignition_specs, default=()),
}
VM_KEYS = {
    "memory": Key(_int_at_least(128), default=1024),
    "cpus": Key(_int_at_least(1), default=1),
    "disk": Key(_size, default=4 << 30, dest="disk_size"),
    "ssh_port": Key(_port, dest="given_ssh_port"),  # the identity the DAG assigns starts from these
    "cluster_ip": Key(_ipv4, dest="given_cluster_ip"),
    "forward": Key(_forward_pairs, default=()),
    "user_data": Key(_string),
    "ssh_authorized_keys": Key(_string_list, default=()),
    "ignition": Key(_string),
    "kernel_args": Key(_string, default=""),
    "release": Key(_string),
}
CLUSTER_KEYS = {
    "release": Key(_as_is, required=True),
    "defaults": Key(_as_is),
    "vms": Key(_as_is, required=True),
    "network": Key(_as_is),
}
NETWORK_KEYS = {"subnet": Key(_subnet)}
HINTS = {"release": "add `release: PROFILE-NAME`", "vms": "add `vms: {core1: {}}`"}


def _checked(value: Any, where: _Where, table: dict[str, Key]) -> dict[str, Any]:
    """A mapping checked against its table: unknown keys, missing required keys and bad
    values are errors naming the key; returns the parsed values of the keys present."""
    data = _mapping(value, where, table)
    for key, spec in table.items():
        if spec.required and key not in data:
            raise (where / key).error("missing", HINTS.get(key, f"add `{key}:`"))
    return {key: table[key].check(item, where / key) for key, item in data.items()}


def yaml_problem(error: yaml.YAMLError) -> str:
    """'line N: PROBLEM' for a YAML error, as users see it in their editor."""
    mark = getattr(error, "problem_mark", None)
    line = f"line {mark.line + 1}: " if mark else ""
    return line + (getattr(error, "problem", None) or "invalid YAML")


class _DuplicateKey(yaml.MarkedYAMLError):
    pass


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, except that a key given twice in one mapping is an error (YAML
    1.2 says keys are unique; PyYAML would keep the last one silently: two `vms:` blocks
    would drop every VM of the first)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: set = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            try:
                duplicate = key in seen
                seen.add(key)
            except TypeError:  # an unhashable key: PyYAML says so itself
                continue
            if duplicate and key != "<<":
                raise _DuplicateKey(problem=f"key {key!r} appears twice (the second would replace the first)",
                                    problem_mark=key_node.start_mark)
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: Path) -> Any:
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise LeanvmError(f"{path}: no such file", "check the path") from None
    except (OSError, UnicodeDecodeError) as e:
        raise LeanvmError(f"{path}: cannot read: {e}", "check the file") from None
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader)
    except _DuplicateKey as e:
        raise LeanvmError(f"{path}: {yaml_problem(e)}", "keep one of them") from None
    except yaml.YAMLError as e:
        raise LeanvmError(f"{path}: YAML syntax error: {yaml_problem(e)}", "fix the YAML") from None


def read_user_data(path: Path, needs_merge: bool) -> tuple[str, dict | None]:
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
    coreos = (doc or {}).get("coreos") or {}
    units = coreos.get("units") or [] if isinstance(coreos, dict) else None
    if not isinstance(units, list) or not all(isinstance(u, dict) for u in units):
        raise LeanvmError(f"{path}: coreos.units must be a list of units (name:, content:, ...)",
                          "fix the #cloud-config")
    return text, doc or {}


def _mapping(value: Any, where: _Where, allowed: set[str] | dict) -> dict:
    if value is None:
        value = {}
    if not isinstance(value, dict):
        raise where.error(f"expected a mapping, got {value!r}", "write KEY: VALUE lines")
    for key in value:
        if key not in allowed:
            raise (where / str(key)).error(
                "unknown key", f"allowed keys: {', '.join(sorted(allowed))}"
            )
    return value


def _check_key_file(path: Path, where: _Where) -> None:
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
    where = _Where(path)
    values = _checked(read_yaml(path), where, PROFILE_KEYS)
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


def _release_path(value: Any, where: _Where, cluster_file: Path) -> Path:
    """A path as given, or a bare profile NAME: releases/NAME.yaml beside the cluster file,
    else leanvm's own configs/releases/NAME.yaml."""
    ref = _string(value, where)
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


def _vm_settings(raw: Any, where: _Where, cluster_file: Path) -> dict[str, Any]:
    settings = {}
    for key, value in _checked(raw, where, VM_KEYS).items():
        settings[key] = value
        if key in ("user_data", "ignition"):
            path = (cluster_file.parent / settings[key]).resolve()
            if not path.exists():
                raise (where / key).error(f"{path} does not exist", f"point {key} at a file")
            if not path.is_file():
                raise (where / key).error(f"{path} is not a regular file", f"point {key} at a file")
            if key == "ignition":
                settings["ignition_doc"] = _ignition(path, where / key)
            settings[key] = path
    return settings


def load_cluster(path: Path) -> Cluster:
    """Load and check a cluster file: the VMs as it asks for them (only reads; the DAG gives
    each VM its identity)."""
    path = path.resolve()
    where = _Where(path)
    data = _checked(read_yaml(path), where, CLUSTER_KEYS)
    release = load_profile(_release_path(data["release"], where / "release", path))
    network = _checked(data.get("network"), where / "network", NETWORK_KEYS)
    subnet = ipaddress.IPv4Network(network.get("subnet", "10.77.0.0/24"))
    per_vm = _parse_vms(data, where, path, release, subnet)
    _check_unique(per_vm, where)
    vms = tuple(_vm(name, per_vm[name]) for name in sorted(per_vm))
    return Cluster(path=path, release=release, vms=vms, subnet=str(subnet))


def _vm_release(settings: dict[str, Any], where: _Where, path: Path, default: Release) -> Release:
    """The VM's own `release` (a profile name or path, as the cluster's), else the cluster's.
    Two profiles of one name would share out/images/NAME: refused."""
    if "release" not in settings:
        return default
    release = load_profile(_release_path(settings["release"], where / "release", path))
    if release.name == default.name and release.path != default.path:
        raise (where / "release").error(f"{release.path} has the name of the cluster's release {default.path}",
                                        "rename one of the profile files")
    return release


def _parse_vms(data: dict, where: _Where, path: Path, release: Release,
               subnet: ipaddress.IPv4Network) -> dict[str, dict[str, Any]]:
    """Each VM's settings, defaults applied, every key checked; "release" holds the VM's."""
    raw_defaults = _mapping(data.get("defaults"), where / "defaults", VM_KEYS)  # checked below
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


def _check_release_names(per_vm: dict[str, dict[str, Any]], where: _Where) -> None:
    seen: dict[str, Release] = {}
    for name, settings in per_vm.items():
        release = settings["release"]
        other = seen.setdefault(release.name, release)
        if other.path != release.path:
            raise (where / "vms" / name / "release").error(
                f"{release.path} and {other.path} have one name", "rename one of the profile files")


def _check_unique(per_vm: dict[str, dict[str, Any]], where: _Where) -> None:
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


def _check_vm(settings: dict[str, Any], where: _Where, release: Release, subnet: ipaddress.IPv4Network) -> None:
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
