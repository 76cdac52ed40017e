"""VM identity: ssh port, MACs and cluster address, assigned once and then kept.

Each VM's identity lives in its values file, out/state/vms/NAME.env (sh-sourceable
KEY=VALUE lines, each value shell-quoted), beside what run.sh, cluster.sh and libvirt.sh need
of the VM (boot arguments, hardware, paths). `clean` and `forget` never delete it, and a VM
removed from the cluster file keeps its file, so its port and addresses come back with it.

Auto ports are derived from the VM name, then moved on past ports this cluster uses, ports
another leanvm out/ on this host has recorded (a registry of out/ directories under
$XDG_STATE_HOME/leanvm), and ports in use at build time.
"""

import hashlib
import ipaddress
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from leanvm import host
from leanvm.errors import LeanvmError, tool
from leanvm.fsutil import write_atomic
from leanvm.state import valuesfile
from leanvm.state.layout import Layout

AUTO_PORT_BASE = 22000
AUTO_PORT_SPAN = 10000
FIRST_AUTO_HOST = 11  # cluster addresses .1-.10 are left to the user (gateways, hand-made VMs)


@dataclass(frozen=True)
class Identity:
    ssh_port: int
    mac: str
    cluster_mac: str
    cluster_ip: str  # with prefix, e.g. 10.77.0.11/24
    host_ports: tuple[int, ...] = ()  # ssh and forwarded ports on 127.0.0.1
    image_dir: str = ""  # images/RELEASE/VERSION, relative to out/: what the VM was last built for


def _parse(text: str) -> Identity | None:
    values = valuesfile.parse(text)
    if values is None:
        return None
    try:
        return Identity(
            ssh_port=int(values["ssh_port"]),
            mac=values["mac"],
            cluster_mac=values["cluster_mac"],
            cluster_ip=values["cluster_ip"],
            host_ports=tuple(int(p) for p in values.get("host_ports", "").split()),
            image_dir=values.get("image_dir", ""),
        )
    except (KeyError, ValueError):
        return None


def load(out: Path) -> dict[str, Identity]:
    """Every VM's recorded identity in `out`, retired VMs included."""
    found = {}
    for path in sorted(Layout(out).values_dir.glob("*.env")):
        try:
            identity = _parse(path.read_text())
        except OSError:
            identity = None
        if identity is not None:
            found[path.stem] = identity
    return found


def as_values(identity: Identity) -> dict[str, str]:
    return {"ssh_port": str(identity.ssh_port), "mac": identity.mac, "cluster_mac": identity.cluster_mac,
            "cluster_ip": identity.cluster_ip, "host_ports": " ".join(map(str, identity.host_ports)),
            "image_dir": identity.image_dir}


def save(out: Path, name: str, values: Mapping[str, str]) -> None:
    """Write VM `name`'s values file: its identity (as_values) and what else the scripts need."""
    write_atomic(Layout(out).values(name), valuesfile.render(name, values).encode())


# --- one cluster per out/ ------------------------------------------------------------

def check_owner(out: Path, cluster_file: Path, record: bool) -> None:
    """out/ holds one cluster: building another cluster file into it is refused (it would
    retire every VM of the first). `record`: remember `cluster_file` as the owner."""
    owner = Layout(out).owner
    try:
        recorded = owner.read_text().strip()
    except OSError:
        recorded = ""
    if recorded and recorded != str(cluster_file):
        raise LeanvmError(f"{out} holds the cluster of {recorded}, not of {cluster_file}",
                          f"build this cluster file into its own directory with out=DIR (for example "
                          f"{tool(f'out={out.name}-{cluster_file.stem}')}), or, if it replaces {recorded} "
                          f"(its VMs that it lacks are retired), remove {owner}")
    if record and not recorded:
        write_atomic(owner, f"{cluster_file}\n".encode())


# --- the host's other clusters -------------------------------------------------------

def registry() -> Path:
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "leanvm" / "outs"


def register(out: Path) -> None:
    """Record `out` in the host registry so that other clusters avoid its ports."""
    known = _registered()
    if str(out) not in known:
        path = registry()
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as f:
            f.write(f"{out}\n")


def _registered() -> list[str]:
    try:
        return registry().read_text().splitlines()
    except OSError:
        return []


def ports_of_other_outs(out: Path) -> set[int]:
    """Host ports recorded by every other leanvm out/ on this host that still exists."""
    taken: set[int] = set()
    for other in set(_registered()) - {str(out)}:
        for identity in load(Path(other)).values():
            taken |= {identity.ssh_port, *identity.host_ports}
    return taken


def port_in_use(port: int) -> bool:
    """The rule run.sh applies before it starts a VM: something listens on it."""
    return host.port_in_use(port)


# --- assignment ----------------------------------------------------------------------

def mac_for(name: str, taken: set[str], prefix: str = "52:54:00") -> str:
    """A locally administered MAC derived from the VM name; re-hashed on a collision."""
    salt = 0
    while True:
        digest = hashlib.sha256(f"{prefix}/{name}/{salt}".encode()).digest()
        mac = f"{prefix}:" + ":".join(f"{b:02x}" for b in digest[:3])
        if mac not in taken:
            return mac
        salt += 1


def auto_port(name: str, unavailable: Callable[[int], bool]) -> int:
    """A port derived from the VM name, moved on past unavailable ones."""
    digest = int.from_bytes(hashlib.sha256(name.encode()).digest()[:4], "big")
    port = AUTO_PORT_BASE + digest % AUTO_PORT_SPAN
    for _ in range(AUTO_PORT_SPAN):
        if not unavailable(port):
            return port
        port = AUTO_PORT_BASE + (port - AUTO_PORT_BASE + 1) % AUTO_PORT_SPAN
    raise RuntimeError("no free port")  # 10000 ports all taken: not a user's situation


def _free_address(subnet: ipaddress.IPv4Network, taken: set[str]) -> str:
    hosts = list(subnet.hosts())
    start = FIRST_AUTO_HOST - 1 if len(hosts) > 2 * FIRST_AUTO_HOST else 0
    for address in hosts[start:] + hosts[:start]:
        if str(address) not in taken:
            return str(address)
    raise ValueError(f"no free address left in {subnet}")


@dataclass
class Wanted:
    """What the cluster file says of one VM's identity."""

    name: str
    ssh_port: int | None
    cluster_ip: str | None  # without prefix
    forward_ports: tuple[int, ...] = ()


def assign(wanted: Iterable[Wanted], previous: dict[str, Identity], subnet: ipaddress.IPv4Network,
           avoid: set[int], in_use: Callable[[int], bool]) -> dict[str, Identity]:
    """Identities for `wanted` VMs: explicit values first, then what they had, then new ones.

    Ports and addresses recorded for VMs not in `wanted` (retired ones) stay reserved.
    """
    wanted = sorted(wanted, key=lambda w: w.name)
    names = {w.name for w in wanted}
    retired = [i for n, i in previous.items() if n not in names]
    ports = {p for w in wanted for p in ((w.ssh_port,) if w.ssh_port else ()) + w.forward_ports}
    ports |= {i.ssh_port for i in retired}
    addresses = {w.cluster_ip for w in wanted if w.cluster_ip} | {i.cluster_ip.split("/")[0] for i in retired}
    kept_ports, kept_ips = {}, {}
    for w in wanted:  # what a VM had is kept unless the cluster file now gives it to another
        old = previous.get(w.name)
        if old and not w.ssh_port and old.ssh_port not in ports:
            kept_ports[w.name] = old.ssh_port
            ports.add(old.ssh_port)
        if old and not w.cluster_ip and _kept_address(old.cluster_ip, subnet, addresses):
            kept_ips[w.name] = old.cluster_ip.split("/")[0]
            addresses.add(kept_ips[w.name])
    macs = {m for i in previous.values() for m in (i.mac, i.cluster_mac)}
    result = {}
    for w in wanted:
        port = w.ssh_port or kept_ports.get(w.name)
        if port is None:
            port = auto_port(w.name, lambda p: p in ports or p in avoid or in_use(p))
            ports.add(port)
        ip = w.cluster_ip or kept_ips.get(w.name) or _free_address(subnet, addresses)
        addresses.add(ip)
        old = previous.get(w.name)
        mac = old.mac if old else mac_for(w.name, macs)
        cluster_mac = old.cluster_mac if old else mac_for(w.name, macs | {mac}, prefix="52:54:01")
        macs |= {mac, cluster_mac}
        result[w.name] = Identity(port, mac, cluster_mac, f"{ip}/{subnet.prefixlen}", (port, *w.forward_ports))
    return result


def _kept_address(recorded: str, subnet: ipaddress.IPv4Network, taken: set[str]) -> bool:
    address = recorded.split("/")[0]
    try:
        return ipaddress.IPv4Address(address) in subnet and address not in taken
    except ValueError:
        return False
