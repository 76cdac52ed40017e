"""cluster.sh snapshot: every running VM (or those named) saved at one paused instant into
out/snapshots/SNAP (manifest, B3SUMS, NAME/{memory,rootfs.img,oem.img,values.env}), then
resumed (or stopped, with --stop). A snapshot is written as snapshots/.SNAP.part and renamed
once complete; one whose command was killed is cleared by the next command (recover)."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import time
from pathlib import Path

from leanvm.errors import LeanvmError
from leanvm.host import alive, cpu_model, read_pid
from leanvm.proc import run
from leanvm.runtime import snapcheck
from leanvm.runtime.cluster import Cluster, say
from leanvm.runtime.console import size
from leanvm.runtime.qmp import QMP, QMPError
from leanvm.runtime.restoredisks import RESTORED_DISKS
from leanvm.runtime.signals import Interrupted, handle, raise_interrupted
from leanvm.state.layout import Names

BUSY_MIGRATION = ("setup", "active", "cancelling", "device", "pre-switchover")
SAVE_DEADLINE = 600.0
COPY_DEADLINE = 3600.0


def resume_paused(cluster: Cluster, name: str) -> bool:
    """Resume VM name that a snapshot left paused: the migration it may still run cancelled and
    waited out (a cont during one would leave it paused once it completes), then cont."""
    try:
        with cluster.qmp(name, 15) as qmp:
            qmp.execute("migrate_cancel")
            deadline = time.monotonic() + 10
            while qmp.execute("query-migrate").get("status") in BUSY_MIGRATION and time.monotonic() < deadline:
                time.sleep(0.1)
            qmp.execute("cont")
            return bool(qmp.execute("query-status")["status"] == "running")
    except (OSError, QMPError):
        return False


def recover(cluster: Cluster) -> None:
    """A snapshot whose command was killed (its owner's pid gone) left snapshots/.SNAP.part: the
    VMs it paused are resumed and the directory goes; one line. A restore's leftover goes too."""
    snapshots = cluster.out / Names.OUT_SNAPSHOTS
    if not snapshots.is_dir():
        return
    for leftover in sorted(snapshots.glob(".*")):
        if not leftover.is_dir() or alive(read_pid(leftover / Names.SNAPSHOT_OWNER)):
            continue
        if leftover.name.startswith(".restoring-"):
            shutil.rmtree(leftover, ignore_errors=True)
            continue
        if not leftover.name.endswith(".part"):
            continue
        listed = leftover / Names.SNAPSHOT_PAUSED
        paused = listed.read_text().split() if listed.is_file() else []
        resumed = [name for name in paused if cluster.vm(name).pid() and resume_paused(cluster, name)]
        shutil.rmtree(leftover, ignore_errors=True)
        leftover.with_name(leftover.name + ".B3SUMS").unlink(missing_ok=True)
        name = leftover.name[1:].removesuffix(".part")
        said = f", and VMs {' '.join(resumed)} resumed" if resumed else ""
        say(f"snapshot {name} had been interrupted: its partial files were removed{said}")


class Snapshot:
    def __init__(self, cluster: Cluster, names: list[str], name: str, stop_after: bool) -> None:
        self.cluster, self.names, self.name, self.stop_after = cluster, names, name, stop_after
        self.snapshots = cluster.out / Names.OUT_SNAPSHOTS
        self.part = self.snapshots / f".{name}.part"
        self.digests = self.snapshots / f".{name}.part.B3SUMS"

    def check(self) -> None:
        snapcheck.check_name(self.name)
        if self.cluster.vm(self.name).exists():
            raise LeanvmError(f"snapshot: '{self.name}' is a VM's name; give the snapshot's name last (usage: "
                              f"cluster.sh snapshot [--stop] [NAME...] SNAP), such as: "
                              f"{self.cluster.out / 'cluster.sh'} snapshot {self.name} ready")
        if (self.snapshots / self.name).exists():
            raise LeanvmError(f"snapshot {self.name} exists ({self.snapshots / self.name}): "
                              "remove it or pick another name")
        if not shutil.which("b3sum"):
            raise LeanvmError("b3sum not found: install it (apt-get install b3sum)")
        recover(self.cluster)
        for vm in self.names:
            self.cluster.clear_stale_pid(vm)
            if not self.cluster.vm(vm).pid():
                raise LeanvmError(f"VM {vm} is not running: a snapshot saves running VMs (start it with "
                                  f"{self.cluster.out / 'cluster.sh'} up {vm})")

    def failed(self, why: str) -> LeanvmError:
        """A snapshot that failed: the VMs run on (or stop, with --stop), nothing is left."""
        self.release_paused()
        self.remove_part()
        return LeanvmError(f"snapshot {self.name}: {why}; the VMs were resumed and nothing was kept")

    def remove_part(self) -> None:
        shutil.rmtree(self.part, ignore_errors=True)
        self.digests.unlink(missing_ok=True)

    def interrupted(self, status: int) -> int:
        """A signal while VMs may be paused: each is resumed (its migration cancelled first),
        nothing is kept; one line."""
        handle(signal.SIG_IGN)
        for vm in self.names:
            if not (self.cluster.vm(vm).pid() and resume_paused(self.cluster, vm)):
                say(f"warning: VM {vm} could not be resumed; see {self.cluster.vm(vm).path(Names.VM_RUN_LOG)}")
        self.remove_part()
        say(f"snapshot {self.name} interrupted: the VMs run on as before and nothing was kept")
        return status

    # --- the verb -------------------------------------------------------------------------
    def take(self) -> int:
        self.check()
        shutil.rmtree(self.part, ignore_errors=True)
        try:
            self.part.mkdir(parents=True)
        except OSError:
            raise LeanvmError(f"cannot make {self.part}") from None
        (self.part / Names.SNAPSHOT_OWNER).write_text(f"{os.getpid()}\n")
        (self.part / Names.SNAPSHOT_PAUSED).write_text(" ".join(self.names) + "\n")
        started = time.monotonic()
        try:
            handle(raise_interrupted)
            for vm in self.names:  # every VM paused at one instant: the cluster saved as one moment
                self.pause(vm)
            lines = [line for vm in self.names for line in self.save(vm)]
            handle(signal.SIG_IGN)  # from here on it is completed
        except Interrupted as e:
            return self.interrupted(e.status)
        self.release_paused()
        paused = time.monotonic() - started
        clocks = None if self.stop_after else self.cluster.in_background(self.set_clocks)
        self.complete(lines)
        if self.stop_after:
            self.wait_stopped()
        elif clocks:
            clocks.join()
        size = du(self.snapshots / self.name)
        print(f"snapshot {self.name}: {' '.join(self.names)} saved in {time.monotonic() - started:.1f} s, paused "
              f"{paused:.1f} s ({size} in {self.snapshots / self.name})", flush=True)
        return 0

    def complete(self, lines: list[str]) -> None:
        """The manifest and B3SUMS written, and .SNAP.part renamed to SNAP."""
        for name in (Names.SNAPSHOT_OWNER, Names.SNAPSHOT_PAUSED):
            (self.part / name).unlink(missing_ok=True)
        created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        head = ["# leanvm snapshot (read by cluster.sh restore and run.sh --restore, never sourced)",
                f"snapshot={self.name}", f"created={created}", f"vms={' '.join(self.names)}"]
        (self.part / Names.SNAPSHOT_MANIFEST).write_text("\n".join(head + lines) + "\n")
        files = sorted(str(p.relative_to(self.part)) for p in self.part.rglob("*") if p.is_file())
        try:
            sums = run(["b3sum", *files], cwd=self.part, timeout=COPY_DEADLINE).stdout
        except LeanvmError:
            self.remove_part()
            raise LeanvmError(f"snapshot {self.name}: cannot compute the digests (b3sum)") from None
        self.digests.write_bytes(sums)
        os.replace(self.digests, self.part / Names.SNAPSHOT_DIGESTS)
        for vm in self.names:  # as written: no need to read them again
            (self.part / f".checked-{vm}").write_text(snapcheck.checked_stat(self.part, vm))
        os.replace(self.part, self.snapshots / self.name)

    def set_clocks(self) -> None:
        """The VMs' clocks set to this host's over ssh (a paused guest lives in the past)."""
        for vm in self.names:
            if not self.cluster.ssh_quietly(vm, ["sudo", "date", "-u", "-s", f"@{int(time.time())}"]):
                say(f"warning: could not set VM {vm}'s clock over ssh (sudo date); it runs behind by the time "
                    "it was paused")

    def wait_stopped(self) -> None:
        """Stopped once each launcher has cleared up too (it holds run.lock until then): a
        restore or an up right after finds the VM stopped, not "running"."""
        deadline = time.monotonic() + 15
        for vm in self.names:
            while self.cluster.active(vm) and time.monotonic() < deadline:
                time.sleep(0.05)
        self.cluster.wait_for_launchers()
        self.cluster.stop_switch_if_unused()

    # --- pause and save -----------------------------------------------------------------
    def pause(self, vm: str) -> None:
        """Paused exactly (a VM that an interrupted snapshot left "postmigrate" cannot be migrated
        again: it is resumed first, said in one line)."""
        try:
            with self.cluster.qmp(vm, 10) as qmp:
                state = qmp.execute("query-status")["status"]
        except (OSError, QMPError):
            raise self.failed(f"VM {vm}'s QEMU did not answer on its monitor") from None
        if state not in ("running", "paused"):
            if not resume_paused(self.cluster, vm):
                raise self.failed(f"VM {vm} is stuck in '{state}'")
            say(f"VM {vm} was left paused ({state}) by an interrupted snapshot: resumed it first")
        try:
            with self.cluster.qmp(vm, 10) as qmp:
                qmp.execute("stop")
                state = qmp.execute("query-status")["status"]
        except (OSError, QMPError):
            raise self.failed(f"VM {vm}'s QEMU did not pause") from None
        if state != "paused":
            raise self.failed(f"VM {vm}'s QEMU did not pause ({state})")

    def save(self, vm: str) -> list[str]:
        """VM vm (paused) into .SNAP.part/vm: its RAM and devices (QEMU's migration to a file,
        not throttled), its root and OEM disks as they are at that instant, and its values.
        Only a migration this command started and saw complete counts. Its manifest lines."""
        pid = self.cluster.vm(vm).pid()
        if not pid:
            raise self.failed(f"VM {vm} stopped")
        dest = self.part / vm
        dest.mkdir(parents=True, exist_ok=True)
        status = self.migrate(vm, dest / Names.SNAPSHOT_MEMORY)
        if status != "completed":
            raise self.failed(f"QEMU could not save VM {vm} (migration {status})")
        if not size(dest / Names.SNAPSHOT_MEMORY):
            raise self.failed(f"QEMU could not save VM {vm} (it wrote no memory file)")
        vm_dir = self.cluster.vm(vm).dir
        for disk in RESTORED_DISKS:
            try:
                run(["cp", "--sparse=always", "--reflink=auto", vm_dir / disk, dest / disk], timeout=COPY_DEADLINE)
            except LeanvmError:
                raise self.failed(f"cannot copy {vm_dir / disk}") from None
        shutil.copyfile(self.cluster.vm(vm).values_file, dest / Names.SNAPSHOT_VALUES)
        return manifest_lines(vm, pid)

    def migrate(self, vm: str, memory: Path) -> str:
        quoted = "'" + str(memory).replace("'", "'\\''") + "'"
        try:
            with self.cluster.qmp(vm, SAVE_DEADLINE) as qmp:
                qmp.execute("migrate-set-capabilities", {"capabilities": [{"capability": "events", "state": True}]})
                qmp.execute("migrate-set-parameters", {"max-bandwidth": 64 << 30})
                qmp.execute("migrate", {"uri": f"exec:cat > {quoted}"})
                return wait_migration(qmp)
        except (OSError, QMPError) as e:
            raise self.failed(f"VM {vm}'s QEMU did not answer on its monitor ({e})") from None

    def release_paused(self) -> None:
        """Resume (or, with --stop, quit) the VMs that the snapshot paused."""
        for vm in self.names:
            pid = self.cluster.vm(vm).pid()
            if not pid:
                continue
            if self.stop_after:
                self.cluster.send("quit", [vm])
                deadline = time.monotonic() + 5
                while alive(pid) and time.monotonic() < deadline:
                    time.sleep(0.05)
            else:
                with contextlib.suppress(OSError, QMPError), self.cluster.qmp(vm, 10) as qmp:
                    qmp.execute("cont")


def wait_migration(qmp: QMP) -> str:
    while True:
        status = str(qmp.wait_event("MIGRATION")["data"]["status"])
        if status in ("completed", "failed", "cancelled"):
            return status


def manifest_lines(vm: str, pid: int) -> list[str]:
    """What a restore needs to run VM vm as saved, read off its QEMU's command line."""
    words = [w.decode(errors="replace") for w in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")]

    def option(flag: str) -> str:
        return words[words.index(flag) + 1] if flag in words[:-1] else ""

    cpu = option("-cpu")
    version = run([os.readlink(f"/proc/{pid}/exe"), "--version"], check=False, timeout=30).stdout
    lines = [f"{vm}.machine={option('-machine')}", f"{vm}.accel={option('-accel').split(',')[0]}", f"{vm}.cpu={cpu}"]
    if cpu == "host":
        lines.append(f"{vm}.cpu_model={cpu_model()}")
    lines += [f"{vm}.memory={option('-m')}", f"{vm}.append={option('-append')}",
              f"{vm}.qemu_version={version.decode(errors='replace').splitlines()[0]}"]
    return lines


def du(path: Path) -> str:
    """The disk space the files under path take, as `du -sh` says it (sparse files count what they use)."""
    used = float(sum(p.lstat().st_blocks * 512 for p in path.rglob("*")))
    for unit in ("", "K", "M", "G"):
        if used < 1024 or unit == "G":
            return f"{used:.0f}{unit}" if unit in ("", "K") or used >= 10 else f"{used:.1f}{unit}"
        used /= 1024
    return f"{used:.1f}T"


