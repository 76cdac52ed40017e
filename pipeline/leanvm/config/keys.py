"""The tables of allowed keys (one `Key` shape for profile, cluster, VM and network keys)
and the value checkers they name: each takes (value, where) and returns the parsed value,
or raises an error naming the file and the key path, and how to fix it (as doit checks
task fields against a table)."""

import ipaddress
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from leanvm.arch import Arch
from leanvm.config.types import IGNITION_SPECS
from leanvm.errors import LeanvmError

VM_NAME = re.compile(r"[a-z][a-z0-9-]{0,62}")  # every pattern here is used with fullmatch
RELEASE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
FINGERPRINT = re.compile(r"[0-9A-F]{40}")
SIZE = re.compile(r"([1-9][0-9]*)([KMGT])")
SIZE_UNITS = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
MIN_DISK = 64 << 20
MAX_DISK = 1 << 60  # 1 EiB: ext4's largest filesystem (4 KiB blocks)


class Where:
    """The file and key path an error is about."""

    def __init__(self, file: Path, key: str = "") -> None:
        self.file, self.key = file, key

    def __truediv__(self, key: str) -> "Where":
        return Where(self.file, f"{self.key}.{key}" if self.key else key)

    def error(self, problem: str, hint: str) -> LeanvmError:
        key = self.key if self.key.isprintable() else repr(self.key)  # a name with a newline stays one line
        where = f"{self.file}: {key}" if key else str(self.file)
        return LeanvmError(f"{where}: {problem}", hint)


# --- value checkers: each takes (value, where) and returns the parsed value ----------

def text_value(value: Any, where: Where) -> str:
    if not isinstance(value, str) or not value.strip():
        raise where.error(f"expected a non-empty string, got {value!r}", "write a string")
    return value


def _optional_string(value: Any, where: Where) -> str | None:
    return None if value is None else text_value(value, where)


def _filename(value: Any, where: Where) -> str:
    name = text_value(value, where)
    if "/" in name or name in (".", ".."):
        raise where.error(f"{name!r} is not a plain file name", "give a file name without '/'")
    return name


def _int_at_least(minimum: int) -> Callable[[Any, Where], int]:
    def check(value: Any, where: Where) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise where.error(f"expected an integer, got {value!r}", f"write an integer >= {minimum}")
        if value < minimum:
            raise where.error(f"{value} is too small", f"use an integer >= {minimum}")
        return value

    return check


def _port(value: Any, where: Where) -> int:
    port = _int_at_least(1)(value, where)
    if not 1024 <= port <= 65535:
        raise where.error(f"{port} is not a usable host port", "use a port from 1024 to 65535")
    return port


def _guest_port(value: int, where: Where) -> int:
    if not 1 <= value <= 65535:
        raise where.error(f"{value} is not a TCP port", "use a guest port from 1 to 65535")
    return value


def _size(value: Any, where: Where) -> int:
    match = SIZE.fullmatch(value) if isinstance(value, str) else None
    if not match:
        raise where.error(f"cannot parse size {value!r}", "write an integer with K, M, G or T, e.g. 4G")
    size = int(match.group(1)) * SIZE_UNITS[match.group(2)]
    if size < MIN_DISK:
        raise where.error(f"{value} is smaller than 64M", "use a size of at least 64M")
    if size > MAX_DISK:
        raise where.error(f"{value} is larger than ext4's largest filesystem (1 EiB)", "use a smaller size")
    return size


def _string_list(value: Any, where: Where) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise where.error(f"expected a list, got {value!r}", "write a YAML list of strings")
    return tuple(text_value(item, where / str(i)) for i, item in enumerate(value))


def _fingerprints(value: Any, where: Where) -> tuple[str, ...]:
    prints = _string_list(value, where)
    if not prints:
        raise where.error("the list is empty", "pin at least one primary-key fingerprint")
    for i, fp in enumerate(prints):
        if not FINGERPRINT.fullmatch(fp.replace(" ", "").upper()):
            raise (where / str(i)).error(
                f"{fp!r} is not a 40-hex-digit fingerprint", "copy it from `gpg --show-keys KEYFILE`"
            )
    return tuple(fp.replace(" ", "").upper() for fp in prints)


def _base_url(value: Any, where: Where) -> str:
    url = text_value(value, where)
    parsed = urlparse(url)
    if parsed.scheme not in ("http", "https", "file") or (parsed.scheme != "file" and not parsed.netloc):
        raise where.error(f"{url!r} is not an http, https or file URL", "use e.g. https://host/path/")
    return url if url.endswith("/") else url + "/"


def _version(value: Any, where: Where) -> str:
    version = text_value(str(value) if isinstance(value, (int, float)) else value, where)
    if not RELEASE_NAME.fullmatch(version):
        raise where.error(f"{version!r} is not a version", "write 'current' or e.g. 4081.2.0")
    return version


def _forward_pairs(value: Any, where: Where) -> tuple[tuple[int, int], ...]:
    pairs = []
    for i, item in enumerate(_string_list(value, where)):
        host, sep, guest = item.partition(":")
        if not (sep and host.isdigit() and guest.isdigit()):
            raise (where / str(i)).error(f"{item!r} is not HOST:GUEST", "write e.g. '8080:80'")
        pairs.append((_port(int(host), where / str(i)), _guest_port(int(guest), where / str(i))))
    return tuple(pairs)


def _ipv4(value: Any, where: Where) -> str:
    try:
        return str(ipaddress.IPv4Address(text_value(value, where)))
    except ipaddress.AddressValueError:
        raise where.error(f"{value!r} is not an IPv4 address", "write e.g. 10.77.0.11") from None


# QEMU's user-mode network, every VM's first NIC (ssh, forwards, the way out): the guest
# routes 10.0.2.0/24 there, so a cluster network overlapping it would lose packets to one.
USER_NETWORK = ipaddress.IPv4Network("10.0.2.0/24")


def _subnet(value: Any, where: Where) -> str:
    try:
        subnet = ipaddress.IPv4Network(text_value(value, where))
    except ValueError:
        raise where.error(f"{value!r} is not an IPv4 network", "write e.g. 10.77.0.0/24") from None
    if subnet.overlaps(USER_NETWORK):
        raise where.error(f"{subnet} overlaps {USER_NETWORK}, QEMU's user-mode network (each VM's first NIC)",
                          "pick another private range, e.g. 10.77.0.0/24")
    return str(subnet)



@dataclass(frozen=True)
class Key:
    """A key a mapping may have: how to check its value, whether it must be there, its value
    when it is not (`default`), and the dataclass field it fills (`dest`: the key's own name
    unless given; "" for a key that fills none directly)."""

    check: Callable[[Any, Where], Any]
    required: bool = False
    default: Any = None
    dest: str | None = None


def fields_from(values: dict[str, Any], table: dict[str, Key]) -> dict[str, Any]:
    """The dataclass fields a checked mapping fills: each key's value, or its default."""
    return {spec.dest or key: values.get(key, spec.default) for key, spec in table.items() if spec.dest != ""}


def _spec_list(value: Any, where: Where) -> tuple[str, ...] | None:
    """'3.0.0-3.3.0', '2.0.0-2.4.0 3.0.0-3.5.0', a list of those, or `none`."""
    if value == "none":
        return None
    items = value if isinstance(value, list) else [value]
    words = [w for item in items for w in text_value(str(item), where).split()]
    specs: list[str] = []
    for word in words:
        first, _, last = word.partition("-")
        if first not in IGNITION_SPECS or (last and last not in IGNITION_SPECS):
            raise where.error(f"{word!r} is not an Ignition spec or range of specs",
                              f"write e.g. 3.0.0-3.3.0 (specs: {', '.join(IGNITION_SPECS)}), or none")
        specs += IGNITION_SPECS[IGNITION_SPECS.index(first):IGNITION_SPECS.index(last or first) + 1]
    return tuple(spec for spec in IGNITION_SPECS if spec in specs)


def _ignition_specs(value: Any, where: Where) -> tuple[tuple[str, tuple[str, ...] | None], ...]:
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


def _words(value: Any, where: Where) -> str:
    """Kernel arguments: the words of a string, one space apart (YAML's folded lines too)."""
    return " ".join(text_value(value, where).split())


def _usr_member(value: Any, where: Where) -> str:
    member = text_value(value, where)
    return member.lstrip("./") or member


def _arch(value: Any, where: Where) -> Arch:
    try:
        return Arch(value)
    except ValueError:
        raise where.error(f"unknown arch {value!r}", f"use one of: {', '.join(a.value for a in Arch)}") from None


def _as_is(value: Any, where: Where) -> Any:
    return value  # checked where it is used (a nested mapping, a profile reference)


def _optional(check: Callable[[Any, Where], Any]) -> Callable[[Any, Where], Any]:
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
    "signature_suffix": Key(text_value, default=".sig"),
    "signing_key": Key(text_value, required=True),
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
    "user_data": Key(text_value),
    "ssh_authorized_keys": Key(_string_list, default=()),
    "ignition": Key(text_value),
    "kernel_args": Key(text_value, default=""),
    "release": Key(text_value),
}
CLUSTER_KEYS = {
    "release": Key(_as_is, required=True),
    "defaults": Key(_as_is),
    "vms": Key(_as_is, required=True),
    "network": Key(_as_is),
}
NETWORK_KEYS = {"subnet": Key(_subnet)}
HINTS = {"release": "add `release: PROFILE-NAME`", "vms": "add `vms: {core1: {}}`"}


def checked(value: Any, where: Where, table: dict[str, Key]) -> dict[str, Any]:
    """A mapping checked against its table: unknown keys, missing required keys and bad
    values are errors naming the key; returns the parsed values of the keys present."""
    data = mapping(value, where, table)
    for key, spec in table.items():
        if spec.required and key not in data:
            raise (where / key).error("missing", HINTS.get(key, f"add `{key}:`"))
    return {key: table[key].check(item, where / key) for key, item in data.items()}



def mapping(value: Any, where: Where, allowed: set[str] | dict[str, Any]) -> dict[str, Any]:
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


