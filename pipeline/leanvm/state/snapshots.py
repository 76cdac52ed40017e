"""The snapshots in out/snapshots that `cluster.sh snapshot` writes: which there are, the VMs
each holds, and a VM dropped from them once its disks start afresh (reset:NAME, a VM removed
from the cluster file) or its release version is gone (prune).

A snapshot is SNAP/manifest (key=value lines; cluster.sh and run.sh read them with awk and
never source them), SNAP/B3SUMS (b3sum's format) and SNAP/NAME/ per VM."""

import shutil
from pathlib import Path

import blake3

from leanvm.fsutil import write_atomic
from leanvm.state.layout import Layout, Names


def manifest(snapshot: Path) -> dict[str, str]:
    lines = (snapshot / Names.SNAPSHOT_MANIFEST).read_text().splitlines()
    return dict(line.split("=", 1) for line in lines if "=" in line and not line.startswith("#"))


def complete(out: Path) -> list[Path]:
    """The snapshots of out/ (one being written, .SNAP.part, is not one)."""
    where = Layout(out).snapshots
    return sorted(s for s in where.glob("[!.]*")
                  if (s / Names.SNAPSHOT_MANIFEST).is_file() and (s / Names.SNAPSHOT_DIGESTS).is_file())


def vms(snapshot: Path) -> list[str]:
    return manifest(snapshot).get("vms", "").split()


def image_dirs(snapshot: Path) -> set[str]:
    """The image versions (image_dir, relative to out/) the snapshot's VMs were saved on."""
    dirs = set()
    for name in vms(snapshot):
        for line in (snapshot / name / Names.SNAPSHOT_VALUES).read_text().splitlines():
            if line.startswith("image_dir="):
                dirs.add(line.split("=", 1)[1].strip("'"))
    return dirs


def remove(snapshot: Path) -> None:
    """A snapshot gone: its manifest first, so that it is never read half-removed."""
    (snapshot / Names.SNAPSHOT_MANIFEST).unlink(missing_ok=True)
    shutil.rmtree(snapshot)


def drop_vm(out: Path, name: str) -> list[str]:
    """VM `name` taken out of every snapshot that holds it (a snapshot left with no VM goes);
    the names of those snapshots."""
    touched = []
    for snapshot in complete(out):
        names = vms(snapshot)
        if name not in names:
            continue
        touched.append(snapshot.name)
        rest = [n for n in names if n != name]
        if not rest:
            remove(snapshot)
            continue
        lines = (snapshot / Names.SNAPSHOT_MANIFEST).read_text().splitlines()
        kept = [f"vms={' '.join(rest)}" if line.startswith("vms=") else line
                for line in lines if not line.startswith(f"{name}.")]
        text = ("\n".join(kept) + "\n").encode()
        sums = [line for line in (snapshot / Names.SNAPSHOT_DIGESTS).read_text().splitlines()
                if not line.split("  ", 1)[-1].startswith((f"{name}/", Names.SNAPSHOT_MANIFEST))]
        sums.append(f"{blake3.blake3(text).hexdigest()}  {Names.SNAPSHOT_MANIFEST}")
        sums.sort(key=lambda s: s.split("  ", 1)[1])
        write_atomic(snapshot / Names.SNAPSHOT_DIGESTS, ("\n".join(sums) + "\n").encode())
        write_atomic(snapshot / Names.SNAPSHOT_MANIFEST, text)
        shutil.rmtree(snapshot / name, ignore_errors=True)
        (snapshot / f".checked-{name}").unlink(missing_ok=True)
    return touched
