"""The task DAG: one generator per stage, wired from the cluster file.

    download -> verify -> extract -> (per VM) rootfs, configdrive, launcher; cluster.sh
    explicit only: bundle, libvirt, prune, reset:NAME
"""

import ipaddress
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from enum import StrEnum
from functools import cache
from pathlib import Path
from typing import Any

from doit import get_var
from doit.tools import config_changed

from leanvm.config.load import load_cluster
from leanvm.config.types import VM, Cluster, Release, accepted_specs
from leanvm.dag import doitenv
from leanvm.dag.doitenv import action, building, command_words, config_file, fail, out_dir, writing
from leanvm.errors import LeanvmError, tool, warn
from leanvm.fsutil import write_atomic
from leanvm.release import fetch, prune, publish
from leanvm.resources import CLUSTER_SCRIPT, LIBVIRT_SCRIPT, RUN_SH
from leanvm.ship import bundle, runtime
from leanvm.state import identity, snapshots
from leanvm.state.layout import Layout, Names
from leanvm.state.vmstate import running_pid
from leanvm.vm import configdrive, disks, libvirt, sshkey, values

BUILD_TASKS = ["download", "verify", "extract", "rootfs", "sshkey", "configdrive", "launcher", "cluster", "retire"]


@dataclass(frozen=True)
class Context:
    """The loaded cluster, the version of each release it runs, and where things go."""

    cluster: Cluster
    versions: dict[str, str]  # release name -> the version it is built for
    layout: Layout
    identities: dict[str, identity.Identity]  # VM name -> the identity the DAG gave it, in cluster order

    def identity_of(self, vm: VM) -> identity.Identity:
        return self.identities[vm.name]

    @property
    def out(self) -> Path:
        return self.layout.out

    def version(self, release: Release) -> str:
        return self.versions[release.name]

    def images(self, release: Release) -> Path:
        return self.layout.images(release.name, self.version(release))

    def cache(self, release: Release) -> Path:
        return self.layout.cache(release.name, self.version(release))

    def all_images(self) -> list[Path]:
        return [self.images(release) for release in self.cluster.releases]

    def vm_disks(self, vm: VM) -> disks.Disks:
        vm_dir = self.layout.vm(vm.name)
        return disks.Disks(vm.name, vm_dir / Names.VM_ROOT_DISK, vm_dir / Names.VM_OEM_DISK, vm.disk_size)


def _not_checked(port: int) -> bool:
    return False


PER_VM_TASKS = ("rootfs", "configdrive", "launcher", "reset")


def check_task_names(cluster: Cluster) -> None:
    """`reset:NOSUCH` (any per-VM task of a VM not in the cluster file): one line naming the
    VMs there are, instead of doit's "Invalid parameter"."""
    names = [vm.name for vm in cluster.vms]
    for word in command_words():
        task, _, vm = word.partition(":")
        if task in PER_VM_TASKS and vm and vm not in names:
            raise LeanvmError(f"{cluster.path}: has no VM named {vm!r} (task {word})",
                              f"the VMs are: {', '.join(names)}")


def assign_identities(cluster: Cluster, previous: dict[str, identity.Identity], avoid: set[int],
                      in_use: Callable[[int], bool]) -> dict[str, identity.Identity]:
    """Each VM's identity, by name in cluster order (identity.assign): what the cluster file
    gives first, then what `previous` recorded; new ports avoid `avoid` and ports `in_use`."""
    wanted = [identity.Wanted(vm.name, vm.given_ssh_port, vm.given_cluster_ip, tuple(host for host, _ in vm.forward))
              for vm in cluster.vms]
    try:
        given = identity.assign(wanted, previous, ipaddress.IPv4Network(cluster.subnet), avoid, in_use)
    except ValueError as e:
        raise LeanvmError(f"{cluster.path}: network.subnet: {e}", "use a larger subnet") from None
    return {vm.name: given[vm.name] for vm in cluster.vms}


def check_result_file(release: Release, version: str) -> None:
    """leanvm tells a first boot by Ignition's result file: a release whose Ignition writes
    none (Flatcar 3033, Ignition 0.36.1) would provision every boot anew."""
    if accepted_specs(release, version) is None:
        raise LeanvmError(f"{release.path}: release {release.name} {version} ships an Ignition that writes no "
                          "/etc/.ignition-result.json (ignition_specs: none), so every boot would be a first boot",
                          "use a newer version or stream (Flatcar LTS: current-2023 or later)")


@cache
def cluster_file() -> Cluster:
    """The cluster file, loaded and checked once per doit run, before doit creates anything
    in out/ (a bad file leaves no out/ behind); a user error ends doit with one line."""
    try:
        return load_cluster(config_file())
    except LeanvmError as e:
        fail(e)


@cache
def context() -> Context:
    """The cluster with its identities, once per doit run; a user error ends doit with one line."""
    try:
        out = out_dir()
        config = config_file()
        if writing():
            identity.check_owner(out, config, record=False)
        claims = building()  # only a build claims ports, so only it checks them against the host
        avoid, in_use = (identity.ports_of_other_outs(out), identity.port_in_use) if claims else (set(), _not_checked)
        cluster = cluster_file()
        identities = assign_identities(cluster, identity.load(out), avoid, in_use)
        check_task_names(cluster)
        if claims:  # only a cluster file that loads claims out/
            identity.check_owner(out, config, record=True)
            identity.register(out)
        versions = {release.name: fetch.resolve_version(
                        release, Layout(out).current_version(release.name, release.version), online=claims)
                    for release in cluster.releases}
        for release in cluster.releases:
            check_result_file(release, versions[release.name])
    except LeanvmError as e:
        fail(e)
    return Context(cluster, versions, Layout(out), identities)


# --- release stages (what "done" means for them: publish.py) -------------------------

class Kind(StrEnum):
    """What a release file is; also the last part of its task names (download:RELEASE:KIND)."""

    KERNEL = "kernel"
    INITRD = "initrd"
    IMAGE = "image"


@dataclass(frozen=True)
class Artifact:
    kind: Kind
    upstream: str  # file name on the mirror
    published: Path  # what it becomes in out/images/RELEASE/VERSION/


def artifacts(release: Release, images: Path) -> list[Artifact]:
    found = [Artifact(Kind.KERNEL, release.kernel, images / Names.IMAGE_KERNEL)]
    if release.initrd:
        found.append(Artifact(Kind.INITRD, release.initrd, images / Names.IMAGE_INITRD))
    found.append(Artifact(Kind.IMAGE, release.image, images / Names.IMAGE_USR))
    return found


def _raw(ctx: Context, release: Release, artifact: Artifact) -> tuple[Path, Path]:
    data = ctx.cache(release) / artifact.upstream
    return data, data.with_name(data.name + release.signature_suffix)


def _verified_image(ctx: Context, release: Release) -> Path:
    return ctx.cache(release) / "verified" / release.image


def _release_artifacts(ctx: Context) -> Iterator[tuple[Release, Artifact, str]]:
    """Each artifact of each release, with its URL on the release's mirror."""
    for release in ctx.cluster.releases:
        for artifact in artifacts(release, ctx.images(release)):
            yield release, artifact, fetch.url_for(release, ctx.version(release), artifact.upstream)


def task_download() -> Iterator[dict[str, Any]]:
    """download each release's kernel, initrd and image, each with its signature"""
    ctx = context()
    for release, artifact, url in _release_artifacts(ctx):
        data, sig = _raw(ctx, release, artifact)
        yield {
            "name": f"{release.name}:{artifact.kind}",
            "doc": f"download {artifact.upstream} and its signature",
            "actions": [action(publish.download_pair, url, data, release.signature_suffix)],
            "uptodate": [(publish.done_when, [release.fingerprints, url, artifact.published, data, sig])],
            "clean": [(publish.remove, [data, sig])],
        }


def task_verify() -> Iterator[dict[str, Any]]:
    """check each download's signature against the pinned key; publish it into out/images"""
    ctx = context()
    for release, artifact, url in _release_artifacts(ctx):
        data, sig = _raw(ctx, release, artifact)
        final = artifact.kind is not Kind.IMAGE
        target = artifact.published if final else _verified_image(ctx, release)
        yield {
            "name": f"{release.name}:{artifact.kind}",
            "doc": f"check the signature of {artifact.upstream}",
            "actions": [action(publish.verify_and_publish, data, sig, release, target, final, url)],
            "task_dep": [f"download:{release.name}:{artifact.kind}"],
            "uptodate": [(publish.done_when, [release.fingerprints, url, artifact.published,
                                              *([] if final else [target])])],
            # published images are kept by `doit clean`: `doit prune` removes unused versions
            "clean": [] if final else [(publish.remove, [target])],
        }


def task_extract() -> Iterator[dict[str, Any]]:
    """write the verified usr.squashfs into the USR-A partition of out/images/.../usr.img"""
    ctx = context()
    for release, image, url in _release_artifacts(ctx):
        if image.kind is not Kind.IMAGE:
            continue
        yield {
            "name": release.name,
            "doc": f"write {release.usr_member} of the verified image into the USR-A partition of usr.img",
            "actions": [action(publish.extract_and_publish, _verified_image(ctx, release), release.usr_member,
                               image.published, _raw(ctx, release, image), url)],
            "task_dep": [f"verify:{release.name}:image"],
            "uptodate": [(publish.done_when, [release.fingerprints, url, image.published])],
        }


# --- per-VM stages -------------------------------------------------------------------

def task_rootfs() -> Iterator[dict[str, Any]]:
    """per VM: create or grow its root disk (ROOT) and create its OEM disk; never recreated"""
    ctx = context()
    for vm in ctx.cluster.vms:
        vm_disks = ctx.vm_disks(vm)
        yield {
            "name": vm.name,
            "doc": "create or grow the sparse ext4 root disk (ROOT) and the OEM disk (VM state: never recreated)",
            "actions": [action(disks.ensure, vm_disks)],
            "targets": [vm_disks.root, vm_disks.oem],
            "uptodate": [config_changed({"disk": vm.disk_size})],
        }


def task_configdrive() -> Iterator[dict[str, Any]]:
    """per VM: write its config drive (config.iso, label config-2: user_data, keys, network) and Ignition config"""
    ctx = context()
    hosts = configdrive.hosts(ctx.identities)
    for vm in ctx.cluster.vms:
        dest = ctx.layout.user_data(vm.name)
        drive = ctx.layout.config_drive(vm.name)
        ignition = ctx.layout.ignition(vm.name)
        given = ctx.identity_of(vm)
        inputs = {"name": vm.name, "keys": list(vm.ssh_authorized_keys), "ip": given.cluster_ip,
                  "mac": given.cluster_mac, "ip_given": vm.cluster_ip_given, "ignition": str(vm.ignition),
                  "hosts": hosts, "specs": accepted_specs(vm.release, ctx.version(vm.release))}
        yield {
            "name": vm.name,
            "doc": "write the config drive (config.iso, label config-2) and the Ignition config",
            "actions": [action(configdrive.write, vm, given, dest, drive, ignition, sshkey.public_key(ctx.out), hosts,
                               ctx.version(vm.release))],
            "file_dep": [p for p in (vm.user_data, vm.ignition) if p] + [sshkey.public_key(ctx.out)],
            "targets": [dest, drive, ignition] if vm.ignition else [dest, drive],
            "uptodate": [config_changed(inputs)],
            "clean": True,
        }


def task_sshkey() -> dict[str, Any]:
    """out/ssh/id_ed25519: made once per out/, authorized in every VM; clean keeps it."""
    out = context().out
    return {
        "doc": "make the cluster's ssh key out/ssh/id_ed25519 once (kept by clean)",
        "actions": [action(sshkey.create, out)],
        "targets": [sshkey.private_key(out), sshkey.public_key(out)],
        "uptodate": [(os.path.exists, [sshkey.private_key(out)]), (os.path.exists, [sshkey.public_key(out)])],
    }


def task_launcher() -> Iterator[dict[str, Any]]:
    """per VM: install run.sh and write its values file out/state/vms/NAME.env"""
    ctx = context()
    for vm in ctx.cluster.vms:
        vm_values = values.values(vm, ctx.identity_of(vm), ctx.version(vm.release))
        yield {
            "name": vm.name,
            "doc": "install run.sh and write the VM's values (identity, boot) in out/state/vms/NAME.env",
            "actions": [action(values.write, vm, ctx.identity_of(vm), ctx.version(vm.release), ctx.out)],
            "file_dep": [RUN_SH],
            "targets": [ctx.layout.run_sh(vm.name)],  # not the values: clean never deletes them
            "uptodate": [config_changed(vm_values), (os.path.exists, [ctx.layout.values(vm.name)])],
            "clean": True,
        }


def install_script(source: Path, dest: Path) -> None:
    write_atomic(dest, source.read_bytes(), mode=0o755)


def task_cluster() -> dict[str, Any]:
    """out/cluster.sh (up, down, status, console, ssh, snapshot, restore, monitor for every VM;
    static: it finds the VMs) and out/leanvm-runtime.pyz, the runtime that it and every run.sh
    hand over to."""
    layout = context().layout
    return {
        "doc": "install out/cluster.sh (up, down, status, console, ssh, snapshot, restore, monitor) and its runtime",
        "actions": [action(install_script, CLUSTER_SCRIPT, layout.script("cluster.sh")),
                    action(runtime.write, layout.script(Names.OUT_RUNTIME)),
                    action(remove_lib_sh, layout.script("lib.sh"))],
        "file_dep": [CLUSTER_SCRIPT, *runtime.SOURCES],
        "targets": [layout.script("cluster.sh"), layout.script(Names.OUT_RUNTIME)],
        "clean": True,
    }


def remove_lib_sh(path: Path) -> None:
    """An out/ built before the runtime moved to Python has out/lib.sh, which nothing reads now."""
    path.unlink(missing_ok=True)


def retire(vm_dirs: list[Path], config: Path) -> None:
    """VMs gone from the cluster file keep their disks, but lose their launcher, so that
    cluster.sh no longer starts them; adding a VM back renders it again. A running VM is
    not retired: cluster.sh could no longer stop it."""
    for vm_dir in vm_dirs:
        pid = running_pid(vm_dir)
        if pid is not None:
            raise LeanvmError(f"VM {vm_dir.name} is running (pid {pid}) but is no longer in {config}",
                              f"stop it first ({vm_dir / 'run.sh'} or cluster.sh down), or put it back")
    for vm_dir in vm_dirs:
        os.replace(vm_dir / Names.VM_RUN_SH, vm_dir / f"{Names.VM_RUN_SH}.retired")
        warn(f"VM {vm_dir.name} is no longer in the cluster file: its launcher is now "
             f"{vm_dir / 'run.sh.retired'}; its root disk is kept")
        drop_from_snapshots(vm_dir.parent.parent, vm_dir.name, "it is no longer in the cluster file")


def drop_from_snapshots(out: Path, name: str, why: str) -> None:
    """VM `name` taken out of out/'s snapshots, said in one line: restoring it from them would
    bring back a VM that `why` says is gone."""
    touched = snapshots.drop_vm(out, name)
    if touched:
        warn(f"VM {name} was taken out of snapshot{'s' if len(touched) > 1 else ''} {', '.join(touched)} "
             f"({why}); their other VMs can still be restored")


def task_retire() -> dict[str, Any]:
    ctx = context()
    current = {vm.name for vm in ctx.cluster.vms}
    stale = sorted(d for d in ctx.layout.vms.glob("*") if ctx.layout.run_sh(d.name).exists() and d.name not in current)
    return {
        "doc": "retire the launchers of VMs removed from the cluster file (their disks stay)",
        "actions": [action(retire, stale, ctx.cluster.path)],
        "uptodate": [not stale],
    }


def write_files(files: dict[Path, str]) -> None:
    for dest, text in files.items():
        write_atomic(dest, text.encode(), mode=0o755 if dest.suffix == ".sh" else 0o644)


def task_libvirt() -> dict[str, Any]:
    """The cluster for libvirt (explicit: `doit libvirt`); out/libvirt.sh drives virsh.

    No domain is written here: its accelerator depends on the libvirt host, which `leanvm
    libvirt define` and `start` ask; they write out/vms/NAME/domain.xml as they defined it."""
    layout = context().layout
    files = {layout.libvirt / "network.xml": libvirt.network_xml(layout.out),
             layout.libvirt / "cluster.env": libvirt.cluster_env(layout.out),
             layout.script("libvirt.sh"): LIBVIRT_SCRIPT.read_text()}
    return {
        "doc": "write out/libvirt/network.xml and out/libvirt.sh (define|start|stop|...): domains come at define",
        "actions": [action(write_files, files)],
        "task_dep": BUILD_TASKS,
        "targets": list(files),
        "uptodate": [config_changed({str(path): text for path, text in files.items()})],
        "clean": True,
    }


def task_bundle() -> dict[str, Any]:
    """One archive of the whole built cluster (explicit: `doit bundle`)."""
    ctx = context()
    layout, cluster = ctx.layout, ctx.cluster
    dest = layout.bundles / f"{cluster.path.stem}-{cluster.release.name}-{ctx.version(cluster.release)}.tar.gz"
    meta = {"release": cluster.release.name, "version": ctx.version(cluster.release), "cluster": cluster.path.name,
            "releases": {r.name: ctx.version(r) for r in cluster.releases},
            "arches": sorted({r.arch.value for r in cluster.releases})}
    names = [vm.name for vm in cluster.vms]
    snapshot = get_var("snapshot", None)
    if snapshot is not None:
        try:
            bundle.check_snapshot_name(snapshot)
        except LeanvmError as e:
            fail(e)
        dest = dest.with_name(dest.name.removesuffix(".tar.gz") + f"-snapshot-{snapshot}.tar.gz")
        meta = {**meta, "snapshot": snapshot}
    return {
        "doc": "write out/bundles/CLUSTER-RELEASE-VERSION[-snapshot-SNAP].tar.gz (images once, every VM, "
               "snapshot=SNAP's files, MANIFEST.json)",
        "actions": [action(bundle.write_bundle, layout.out, ctx.all_images(), names, dest, meta, snapshot)],
        "task_dep": BUILD_TASKS,
        "uptodate": [False],
    }


def task_prune() -> dict[str, Any]:
    """Remove image versions no VM's launcher uses any more (explicit: `doit prune`)."""
    ctx = context()
    return {
        "doc": "remove out/images/RELEASE/VERSION directories that no VM uses any more",
        "actions": [action(doitenv.refuse_while_running, ctx.out, tool("prune")),
                    action(prune.prune, ctx.out, set(ctx.all_images()))],
        "uptodate": [False],
    }


def task_reset() -> Iterator[dict[str, Any]]:
    """reset:NAME recreates VM NAME's root and OEM disks EMPTY (bare `reset` is refused)"""
    ctx = context()
    for vm in ctx.cluster.vms:
        yield {
            "name": vm.name,
            "doc": "recreate the root and OEM disks EMPTY (explicit only; all VM state is lost)",
            "actions": [action(disks.reset, ctx.vm_disks(vm)),
                        action(sshkey.forget_host, ctx.out, vm.name),
                        action(drop_from_snapshots, ctx.out, vm.name, "its disks were reset")],
            "uptodate": [False],
        }
