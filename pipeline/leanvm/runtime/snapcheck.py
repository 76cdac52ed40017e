"""What a restore checks of a snapshot (out/snapshots/SNAP/: manifest, B3SUMS,
NAME/{memory,rootfs.img,oem.img,values.env}) before it touches a disk: each check a one-line
refusal that says why and what to do."""

from __future__ import annotations

import os
import re
from pathlib import Path

from leanvm.errors import LeanvmError
from leanvm.host import cpu_model, resolve_accel
from leanvm.proc import run
from leanvm.runtime.restoredisks import RESTORED_DISKS
from leanvm.state import valuesfile
from leanvm.state.layout import Names

# a plain word (leanvm.ship.bundle.SNAPSHOT_NAME is the same rule; README, Snapshot and restore)
SNAPSHOT_NAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,62}")
# The values of a VM that a snapshot is tied to: another value means another VM (or cluster).
IDENTITY = ("ssh_port", "mac", "cluster_mac", "cluster_ip", "host_ports", "image_dir", "release", "version",
            "arch", "machine", "cpus", "memory", "user_netdev")
DIGEST_DEADLINE = 3600.0


def check_name(name: str) -> None:
    if len(name) > 63 and SNAPSHOT_NAME.fullmatch(name[:63]):
        raise LeanvmError(f"'{name}' is not a snapshot name: at most 63 characters")
    if not SNAPSHOT_NAME.fullmatch(name):
        raise LeanvmError(f"'{name}' is not a snapshot name: use a plain word of lower-case letters, digits, "
                          ". _ -, starting with a letter or digit, such as ready")


def manifest(snapshot: Path) -> dict[str, str]:
    """The snapshot's manifest, KEY=VALUE lines (read, never sourced: it may come from a bundle)."""
    found: dict[str, str] = {}
    for line in (snapshot / Names.SNAPSHOT_MANIFEST).read_text().splitlines():
        key, sep, value = line.partition("=")
        if sep and not line.startswith("#"):
            found.setdefault(key, value)
    return found


def saved_accel(snapshot: Path, name: str) -> str:
    """The accelerator to restore VM `name` under: the snapshot's, which LEANVM_ACCEL=auto
    takes; another LEANVM_ACCEL is refused."""
    saved = manifest(snapshot).get(f"{name}.accel", "")
    chosen = os.environ.get("LEANVM_ACCEL") or "auto"
    if chosen not in ("auto", saved):
        raise LeanvmError(f"snapshot {snapshot.name}: VM {name} was saved under {saved}, and LEANVM_ACCEL={chosen}; "
                          "a running VM's state moves only to the same accelerator",
                          "unset LEANVM_ACCEL, or boot it cold (cluster.sh up)")
    return saved


def identity_difference(was: dict[str, str], now: dict[str, str]) -> str:
    """The first identity value in which two values files differ, as "KEY was 'A', is now 'B'"."""
    for key in IDENTITY:
        if was.get(key, "") != now.get(key, ""):
            return f"{key} was '{was.get(key, '')}', is now '{now.get(key, '')}'"
    return ""


def check_files(snapshot: Path, name: str) -> None:
    """B3SUMS is there and lists each file of VM `name` a restore needs, and each is there."""
    digests = snapshot / Names.SNAPSHOT_DIGESTS
    if not digests.is_file():
        raise LeanvmError(f"snapshot {snapshot.name} has no {Names.SNAPSHOT_DIGESTS} ({digests}): "
                          "it is incomplete or damaged", "take a new one")
    listed = {line.partition("  ")[2] for line in digests.read_text().splitlines()}
    for file in (Names.SNAPSHOT_MEMORY, *RESTORED_DISKS, Names.SNAPSHOT_VALUES):
        if f"{name}/{file}" not in listed:
            raise LeanvmError(f"snapshot {snapshot.name}: {Names.SNAPSHOT_DIGESTS} lists no {name}/{file}: "
                              "the snapshot is incomplete or damaged", "take a new one")
        if not (snapshot / name / file).is_file():
            raise LeanvmError(f"snapshot {snapshot.name}: {snapshot / name / file} is missing: "
                              "the snapshot is incomplete or damaged", "take a new one")


def check_host(snapshot: Path, name: str, qemu: str) -> None:
    """This host runs what was saved: the QEMU version, the accelerator and the CPU model."""
    saved = manifest(snapshot)
    was = saved.get(f"{name}.qemu_version", "")
    said = run([qemu, "--version"], check=False, timeout=30).stdout.decode(errors="replace").splitlines()
    now = "".join(said[:1])
    if was != now:
        raise LeanvmError(f"snapshot {snapshot.name} was saved by '{was}', this host runs '{now}': QEMU loads only "
                          f"its own version's state", f"boot VM {name} cold (cluster.sh up {name})")
    if saved_accel(snapshot, name) == "kvm" and resolve_accel("auto") != "kvm":
        raise LeanvmError(f"snapshot {snapshot.name}: VM {name} was saved under KVM, which this host cannot run",
                          f"boot it cold (cluster.sh up {name})")
    if saved.get(f"{name}.cpu") == "host" and saved.get(f"{name}.cpu_model", "") != cpu_model():
        raise LeanvmError(f"snapshot {snapshot.name}: VM {name} was saved under KVM with -cpu host on "
                          f"'{saved.get(f'{name}.cpu_model', '')}', this host's CPU is '{cpu_model()}'",
                          f"boot it cold (cluster.sh up {name})")


def checked_stat(snapshot: Path, name: str) -> str:
    """The stat (size, mtime, ctime, inode) of VM `name`'s files and the manifest: .checked-NAME
    holds it from the last time they matched B3SUMS (or were written), so that an unchanged
    snapshot is not read in full again; any change to a file changes its ctime."""
    files = [snapshot / Names.SNAPSHOT_MANIFEST, snapshot / Names.SNAPSHOT_DIGESTS,
             *(p for p in (snapshot / name).rglob("*") if p.is_file())]
    lines = []
    for path in files:
        st = path.stat()
        lines.append(f"{st.st_size} {int(st.st_mtime)} {int(st.st_ctime)} {st.st_ino} {path.relative_to(snapshot)}")
    return "".join(f"{line}\n" for line in sorted(lines, key=lambda line: line.split(" ", 4)[4]))


def check_digests(snapshot: Path, name: str) -> None:
    marker = snapshot / f".checked-{name}"
    stat = checked_stat(snapshot, name)
    if marker.is_file() and marker.read_text() == stat:
        return
    wanted = [line for line in (snapshot / Names.SNAPSHOT_DIGESTS).read_text().splitlines()
              if line.partition("  ")[2] == Names.SNAPSHOT_MANIFEST or line.partition("  ")[2].startswith(f"{name}/")]
    checked = run(["b3sum", "-c", "--quiet", "-"], input="\n".join(wanted).encode() + b"\n", cwd=snapshot,
                  check=False, timeout=DIGEST_DEADLINE)
    for line in (checked.stdout + checked.stderr).decode(errors="replace").splitlines():
        bad = re.match(r"(.*): (FAILED|No such)", line)
        if bad:
            raise LeanvmError(f"snapshot {snapshot.name}: {snapshot / bad.group(1)} differs from its digest in "
                              f"{Names.SNAPSHOT_DIGESTS}: the snapshot is damaged", "take a new one")
    try:
        marker.write_text(stat)
    except OSError:
        pass


def check(snapshot: Path, name: str, values_file: Path, qemu: str) -> None:
    """Refuse to restore VM `name` from `snapshot` unless this host would run what was saved:
    the same VM (its identity values), QEMU version, machine, accelerator and CPU model, and
    every file of the VM as the snapshot's B3SUMS lists it."""
    if not (snapshot / Names.SNAPSHOT_MANIFEST).is_file():
        raise LeanvmError(f"no snapshot {snapshot.name} in {snapshot.parent} (no manifest)", "see cluster.sh snapshot")
    held = manifest(snapshot).get("vms", "")
    if name not in held.split():
        raise LeanvmError(f"snapshot {snapshot.name} holds no VM {name} (it holds: {held})")
    check_files(snapshot, name)
    differs = identity_difference(valuesfile.read(snapshot / name / Names.SNAPSHOT_VALUES) or {},
                                  valuesfile.read(values_file) or {})
    if differs:
        raise LeanvmError(f"snapshot {snapshot.name}: VM {name}'s {differs}: the snapshot belongs to another "
                          "cluster, out/ or set-up of this VM", f"boot it cold (cluster.sh up {name})")
    check_host(snapshot, name, qemu)
    check_digests(snapshot, name)
