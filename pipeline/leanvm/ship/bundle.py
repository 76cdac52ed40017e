"""Ship: one archive of a built cluster, and unpacking it with its manifest checked.

A bundle is a pax tar (gzip) of the self-contained out/: the shared images once, every
VM's directory, out/cluster.sh and MANIFEST.json (BLAKE3 of every file, release,
version). Root disks are stored sparse (libarchive finds the holes), so a 4G disk stays
a few MB in the archive and after `tar -xf` (GNU tar or bsdtar) or `unbundle`.

    python -m leanvm.ship.bundle unbundle [--arch ARCH] ARCHIVE DIR   # unpack sparse, check the manifest

The manifest records the arch of the bundle's VMs (`arches`): `--arch` refuses, before
anything is written, a bundle whose VMs are of another arch.
"""

import argparse
import hashlib
import json
import os
import shutil
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path, PurePosixPath
from typing import Any

import libarchive
import libarchive.exception
from libarchive.entry import ArchiveEntry
from libarchive.extract import EXTRACT_PERM, EXTRACT_SPARSE, EXTRACT_TIME, PREVENT_ESCAPE, extract_entries

from leanvm.arch import Arch
from leanvm.errors import LeanvmError, interrupted, note, report, tool
from leanvm.fsutil import temp_path
from leanvm.release.record import file_digest
from leanvm.runtime.snapcheck import SNAPSHOT_NAME
from leanvm.state.layout import Layout, Names
from leanvm.state.vmstate import running_pid

MANIFEST = "MANIFEST.json"
CLUSTER_FILES = ("cluster.sh", Names.OUT_RUNTIME, "libvirt.sh", "libvirt/network.xml", "libvirt/cluster.env")
# What a run leaves beside a VM's disks: never shipped (a lock, a pid, a log of this host's runs).
RUNTIME_FILES = {Names.VM_QEMU_PID, Names.VM_CONSOLE, Names.VM_QMP,
                 f"{Names.VM_RUN_SH}.retired", Names.VM_RUN_LOG, Names.VM_RUN_LOCK, Names.VM_FORCED_STOP,
                 Names.VM_BOOT_FAILED, Names.VM_RESTORED, Names.VM_RESUMED}
RUNTIME_SUFFIXES = (".before-restore", ".restoring")  # a restore under way (run.sh --restore)
# libarchive's own guards (no '..', no absolute path, nothing through a symlink) on top of the
# check of every member against the manifest before it is written.
UNPACK_FLAGS = EXTRACT_SPARSE | EXTRACT_PERM | EXTRACT_TIME | PREVENT_ESCAPE


def cluster_files(out: Path, images: list[Path], vm_names: list[str], snapshot: str | None = None) -> list[Path]:
    """The files a bundle carries, relative to out/: with `snapshot`, that snapshot's too."""
    # The images of every release with their recorded digests (.NAME.digest), so an unpacked
    # bundle is also a ready out/images cache.
    files = [p for d in images for p in sorted(d.iterdir())
             if p.is_file() and (not p.name.startswith(".") or p.name.endswith(".digest"))]
    files += [out / script for script in CLUSTER_FILES if (out / script).exists()]
    # The cluster key travels: whoever unpacks the bundle logs in with `cluster.sh ssh`, as
    # here. known_hosts does not: host keys are learnt anew where the VMs run.
    layout = Layout(out)
    files += [p for p in (layout.ssh / Names.SSH_KEY, layout.ssh / f"{Names.SSH_KEY}.pub") if p.exists()]
    for name in vm_names:
        files += sorted(p for p in layout.vm(name).rglob("*") if p.is_file() and p.name not in RUNTIME_FILES
                        and not p.name.endswith(RUNTIME_SUFFIXES))
        files.append(layout.values(name))
    if snapshot is not None:
        # (not .checked-NAME: what this host last found matching, by stat)
        files += sorted(p for p in layout.snapshot(snapshot).rglob("*") if p.is_file() and not p.name.startswith("."))
    return [p.relative_to(out) for p in files]


def check_snapshot_name(snapshot: str) -> None:
    """snapshot= is a plain word: lower-case letters, digits, . _ - (cluster.sh's rule)."""
    if not SNAPSHOT_NAME.fullmatch(snapshot):
        raise LeanvmError(f"snapshot={snapshot!r} is not a snapshot name",
                          "give a plain word, as cluster.sh snapshot took, such as snapshot=ready")


def check_snapshot(out: Path, snapshot: str) -> None:
    """A snapshot= a bundle can carry: a plain name of a complete snapshot in out/snapshots."""
    check_snapshot_name(snapshot)
    where = Layout(out).snapshot(snapshot)
    if not (where / Names.SNAPSHOT_MANIFEST).is_file() or not (where / Names.SNAPSHOT_DIGESTS).is_file():
        raise LeanvmError(f"no snapshot {snapshot} in {where.parent}",
                          f"take one with {out / 'cluster.sh'} snapshot {snapshot}, or leave snapshot= out")


def write_bundle(out: Path, images: list[Path], vm_names: list[str], dest: Path, meta: dict[str, str],
                 snapshot: str | None = None) -> None:
    if snapshot is not None:
        check_snapshot(out, snapshot)
    for name in vm_names:
        pid = running_pid(Layout(out).vm(name))
        if pid is not None:
            raise LeanvmError(f"VM {name} is running (pid {pid}); its root disk would be inconsistent",
                              "stop it (out/cluster.sh down) before bundling")
    files = cluster_files(out, images, vm_names, snapshot)
    manifest = {**meta, "digest": "blake3", "files": {str(rel): file_digest(out / rel) for rel in files}}
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(dest)
    data = json.dumps(manifest, indent=1, sort_keys=True).encode()
    try:
        with libarchive.file_writer(str(tmp), "pax", "gzip") as archive:
            archive.add_file_from_memory(MANIFEST, len(data), data, permission=0o644)
            for rel in files:
                archive.add_files(str(out / rel), pathname=str(rel), recursive=False)
        os.replace(tmp, dest)
    except libarchive.exception.ArchiveError as e:
        raise LeanvmError(f"{dest}: cannot write the bundle: {e.msg}", "check free space and retry") from None
    finally:
        tmp.unlink(missing_ok=True)
    note(f"bundle {dest} ({dest.stat().st_size >> 20} MiB, {len(files)} files)")


def _plain_relative(path: str) -> bool:
    """A path inside the directory it is unpacked in: relative, no '..', '.' or empty parts."""
    parts = PurePosixPath(path).parts
    return bool(parts) and not path.startswith("/") and all(p not in ("..", ".", "") for p in parts) \
        and "\\" not in path


def listed_files(where: Path | str, manifest: dict[str, Any]) -> dict[str, str]:
    """The manifest's files (relative path -> digest), each a plain relative path."""
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict):
        raise LeanvmError(f"{where}: {MANIFEST} has no list of files", f"unpack a bundle made by {tool('bundle')}")
    for rel in files:
        if not isinstance(rel, str) or not _plain_relative(rel) or rel == MANIFEST:
            raise LeanvmError(f"{where}: {MANIFEST} lists {rel!r}, which is not a plain relative path",
                              "the bundle was not made by leanvm or was altered: do not use it")
    return files


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


# How a manifest's digests were made: BLAKE3 (its "digest" key), or sha256 (bundles made
# before leanvm moved to BLAKE3 carry no "digest" key).
DIGESTS = {"blake3": file_digest, "sha256": _sha256}


def check_manifest(root: Path) -> dict[str, Any]:
    """Every file the manifest names exists in `root` with its digest."""
    try:
        manifest = json.loads((root / MANIFEST).read_text())
    except (OSError, ValueError) as e:
        raise LeanvmError(f"{root / MANIFEST}: unreadable manifest: {e}", "unpack a complete bundle") from None
    algorithm = manifest.get("digest", "sha256") if isinstance(manifest, dict) else "sha256"
    if algorithm not in DIGESTS:
        raise LeanvmError(f"{root / MANIFEST}: unknown digest {algorithm!r}", "unpack it with the leanvm that made it")
    digest_of = DIGESTS[algorithm]
    for rel, digest in listed_files(root / MANIFEST, manifest).items():
        path = root / rel
        if not path.is_file() or digest_of(path) != digest:
            raise LeanvmError(f"{path}: does not match {MANIFEST}", "the bundle is damaged; copy it again")
    return dict(manifest)


def check_dest(dest: Path) -> None:
    """Unpacking replaces files: never under a running VM (its QEMU would go on writing to a
    deleted disk), and never over anything else that is there."""
    if dest.exists() and not dest.is_dir():
        raise LeanvmError(f"{dest} is not a directory", "give a new or empty directory to unpack into")
    running = [f"{vm.name} (pid {pid})" for vm in sorted(dest.glob("vms/*")) if (pid := running_pid(vm))]
    if running:
        raise LeanvmError(f"cannot unpack into {dest} while its VMs run: {', '.join(running)}",
                          f"stop them first ({dest / 'cluster.sh'} down), or unpack into a new directory")
    if dest.exists() and any(dest.iterdir()):
        raise LeanvmError(f"{dest} is not empty: unpacking would replace what is there (VM disks too)",
                          "unpack into a new or empty directory")


def read_manifest(archive: Path) -> dict[str, Any]:
    """The manifest, read from the archive itself (its first member) before unpacking."""
    if not archive.is_file():
        raise LeanvmError(f"{archive}: no such file", "give the path of a bundle (out/bundles/*.tar.gz)")
    try:
        with libarchive.file_reader(str(archive)) as entries:
            for entry in entries:
                if entry.pathname == MANIFEST:
                    found: dict[str, Any] = json.loads(b"".join(entry.get_blocks()))
                    return found
                break
    except (libarchive.exception.ArchiveError, ValueError) as e:
        raise LeanvmError(f"{archive}: not a leanvm bundle: {e}", f"make one with {tool('bundle')}") from None
    raise LeanvmError(f"{archive}: not a leanvm bundle (no {MANIFEST} first)", f"make one with {tool('bundle')}")


def check_arch(archive: Path, manifest: dict[str, Any], arch: str) -> None:
    arches = manifest.get("arches", ["amd64"])  # bundles made before arm64 were amd64
    if arches != [arch]:
        raise LeanvmError(f"{archive} holds VMs of arch {', '.join(arches)}, not {arch}",
                          "unpack it where those VMs are to run, with --arch set to theirs (or no --arch)")


def _member_problem(entry: ArchiveEntry, listed: set[str]) -> str | None:
    if entry.islnk:
        return f"is a hard link to {entry.linkpath!r}"
    if entry.issym:
        return f"is a symbolic link to {entry.linkpath!r}"
    if not entry.isreg:
        return "is not a regular file (a directory, device or FIFO)"
    if not _plain_relative(entry.pathname):
        return "is not a plain relative path"
    if entry.pathname not in listed:
        return f"is not listed in {MANIFEST}"
    return None


def checked_members(entries: Iterable[ArchiveEntry], archive: Path, listed: set[str]) -> Iterator[ArchiveEntry]:
    """The archive's members, each checked before it is written: a regular file the manifest
    lists (MANIFEST.json first), once."""
    seen: set[str] = set()
    for entry in entries:
        name = entry.pathname
        problem = _member_problem(entry, listed | {MANIFEST}) or ("appears twice" if name in seen else None)
        if not seen and name != MANIFEST:
            problem = f"comes before {MANIFEST}"
        if problem:
            raise LeanvmError(f"{archive}: member {name!r} {problem}; nothing was unpacked",
                              "the bundle was not made by leanvm or was altered: do not use it")
        seen.add(name)
        yield entry


def _restore(dest: Path, made: bool) -> None:
    """Leave `dest` as it was before unpacking: absent if this run made it, else empty."""
    if made:
        shutil.rmtree(dest, ignore_errors=True)
        return
    for child in dest.iterdir():
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child, ignore_errors=True)
        else:
            child.unlink(missing_ok=True)


def unbundle(archive: Path, dest: Path, arch: str | None = None) -> dict[str, Any]:
    """Unpack a bundle (keeping holes) into `dest` and check it against its manifest; with
    `arch`, only a bundle whose VMs are all of that arch. Any failure leaves `dest` as it was."""
    archive = archive.resolve()  # before changing into dest: a relative path means the caller's
    manifest = read_manifest(archive)
    listed = set(listed_files(archive, manifest))
    if arch is not None:
        check_arch(archive, manifest, arch)
    check_dest(dest)
    made = not dest.exists()
    dest.mkdir(parents=True, exist_ok=True)
    cwd = os.getcwd()
    try:
        os.chdir(dest)
        with libarchive.file_reader(str(archive)) as entries:
            extract_entries(checked_members(entries, archive, listed), flags=UNPACK_FLAGS)
        os.chdir(cwd)
        return check_manifest(dest)
    except libarchive.exception.ArchiveError as e:
        os.chdir(cwd)
        _restore(dest, made)
        raise LeanvmError(f"{archive}: cannot unpack into {dest}: {e.msg}; nothing was kept",
                          "check the file and the free space") from None
    except BaseException:
        os.chdir(cwd)
        _restore(dest, made)
        raise


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m leanvm.ship.bundle", description="unpack a leanvm bundle")
    sub = parser.add_subparsers(dest="command", required=True)
    unpack = sub.add_parser("unbundle", help="unpack ARCHIVE into DIR and check its manifest")
    unpack.add_argument("--arch", choices=[a.value for a in Arch], help="refuse a bundle of VMs of another arch")
    unpack.add_argument("archive", type=Path)
    unpack.add_argument("dir", type=Path)
    args = parser.parse_args(argv)
    try:
        manifest = unbundle(args.archive, args.dir, args.arch)
    except LeanvmError as e:
        return report(e)
    except OSError as e:
        return report(LeanvmError(f"cannot unpack {args.archive} into {args.dir}: {e.strerror or e}",
                                  "check the directory and the free space"))
    except KeyboardInterrupt:
        return interrupted()
    arches = ", ".join(manifest.get("arches", ["amd64"]))
    print(f"{args.dir}: {len(manifest['files'])} files match the manifest ({manifest.get('release')} "
          f"{manifest.get('version')}, {arches}); start a VM with {args.dir}/vms/NAME/run.sh")
    return 0


if __name__ == "__main__":
    sys.exit(main())
