"""cluster.sh restore: the VMs of snapshots/SNAP (or those named) back, running as saved.

Every check comes before any disk is touched. Then the snapshot's disks are put beside each
VM's and swapped in, every VM's launcher started at once with --resume, and the disks from
before dropped once every VM runs the snapshot, or all put back if one does not."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

from leanvm.errors import LeanvmError
from leanvm.runtime import restoredisks, snapcheck, snapshot
from leanvm.runtime.cluster import Cluster, say
from leanvm.runtime.launch import Options, last_word, start_supervisor, started_yet
from leanvm.runtime.signals import handle
from leanvm.runtime.verbs import wait_for_ssh
from leanvm.state.layout import Names


class Restore:
    def __init__(self, cluster: Cluster, names: list[str], name: str, wait: int | None) -> None:
        self.cluster, self.names, self.name, self.wait = cluster, names, name, wait
        self.dir = cluster.out / Names.OUT_SNAPSHOTS / name
        self.caught = 0

    def on_signal(self, signum: int, _frame: object) -> None:
        self.caught = 128 + signum

    def check(self) -> None:
        snapcheck.check_name(self.name)
        if not (self.dir / Names.SNAPSHOT_MANIFEST).is_file():
            raise LeanvmError(f"no snapshot {self.name} in {self.dir.parent}: list them with ls {self.dir.parent}")
        if not self.names:
            self.names = snapcheck.manifest(self.dir).get("vms", "").split()
        named_once("restore", self.names)
        snapshot.recover(self.cluster)
        for vm in self.names:
            files = self.cluster.check_vm(vm)
            self.cluster.clear_stale_pid(vm)
            if self.cluster.active(vm):
                raise LeanvmError(f"VM {vm} is running: stop it first ({self.cluster.out / 'cluster.sh'} down {vm}); "
                                  "a restore replaces its disks and memory")
            restoredisks.recover(files.dir, "cluster.sh")
            qemu = os.environ.get("LEANVM_QEMU") or files.values()["qemu"]
            snapcheck.check(self.dir, vm, files.values_file, qemu)

    def put_back_disks(self) -> None:
        """Copied beside each VM's disks first, then swapped in; the old ones stay as
        *.before-restore until every VM runs the snapshot, or go back if one does not."""
        dirs = {vm: self.cluster.vm(vm).dir for vm in self.names}
        for vm in self.names:
            try:
                restoredisks.copy_in(dirs[vm], self.dir / vm)
            except LeanvmError:
                for gone in self.names:
                    restoredisks.discard_copies(dirs[gone])
                raise LeanvmError(f"restore {self.name}: cannot copy the disks of {self.dir / vm}; every VM's "
                                  "disks are as they were") from None
        for vm in self.names:
            if not restoredisks.swap_in(dirs[vm]):
                for gone in self.names:
                    restoredisks.put_old_back(dirs[gone])
                raise LeanvmError(f"restore {self.name}: cannot swap in the disks of {self.dir / vm}; every VM's "
                                  "disks are as they were")

    def undo(self, why: str) -> LeanvmError:
        """The restore failed: stop what started; once each launcher has cleared up (putting its
        disks from before back), any disk left swapped goes back too."""
        self.cluster.force_stop(self.names)
        self.cluster.wait_for_launchers(30)
        self.cluster.stop_switch_if_unused()
        for vm in self.names:
            restoredisks.recover(self.cluster.vm(vm).dir, "cluster.sh")
        return LeanvmError(f"restore {self.name}: {why}; every VM's disks are as they were before")

    def start_all(self) -> None:
        """Every VM's launcher started at once (--resume); each has to run the snapshot."""
        starts = self.cluster.out / Names.OUT_SNAPSHOTS / f".restoring-{self.name}"
        shutil.rmtree(starts, ignore_errors=True)
        starts.mkdir(parents=True)
        (starts / Names.SNAPSHOT_OWNER).write_text(f"{os.getpid()}\n")
        try:
            options = Options(mode="detach", resume=self.name)
            launchers = {}
            for vm in self.names:
                self.cluster.vm(vm).path(Names.VM_RESTORED).unlink(missing_ok=True)
                launchers[vm] = start_supervisor(self.cluster.vm(vm), options)
            for vm, launcher in launchers.items():
                why = self.started(vm, launcher, options)
                if why is not None:
                    raise self.undo(f"VM {vm} did not start from the snapshot ({why})")
        finally:
            shutil.rmtree(starts, ignore_errors=True)

    def started(self, vm: str, launcher: subprocess.Popen[bytes], options: Options) -> str | None:
        """None once VM vm runs the snapshot; why not, otherwise."""
        files = self.cluster.vm(vm)
        begun = time.monotonic()
        while not started_yet(files, options, False, time.monotonic() - begun):
            if launcher.poll() is not None:
                return last_word(files).removeprefix("run.sh: ")
            if time.monotonic() - begun > 300:
                return f"it did not run it within 300 s: see {files.path(Names.VM_RUN_LOG)}"
            time.sleep(0.05)
        return None

    def run(self) -> int:
        self.check()
        begun = time.monotonic()
        handle(self.on_signal)  # the restores run to their end
        self.put_back_disks()
        self.start_all()
        for vm in self.names:  # every VM runs the snapshot: kept
            restoredisks.drop_old(self.cluster.vm(vm).dir)
        for vm in self.names:
            pid = self.cluster.vm(vm).pid() or "-"
            print(f"{vm}: restored from {self.name} (pid {pid}, ssh 127.0.0.1:{self.cluster.ssh_port(vm)})", flush=True)
        if self.caught:
            say(f"restore {self.name} interrupted once every VM was restored: they run; not waiting for ssh")
            return self.caught
        handle(signal.SIG_DFL)
        if self.wait is not None:
            self.wait_restored(begun)
            print(f"restored in {time.monotonic() - begun:.1f} s", flush=True)
        return 0

    def wait_restored(self, begun: float) -> None:
        """Each launcher says once its VM runs again and its clock is set over ssh (restored).
        Only then is ssh tried here: a connection made while QEMU still loads the snapshot waits
        out TCP's retransmissions (seconds) once the guest runs."""
        assert self.wait is not None
        deadline = begun + self.wait
        unproven = []
        for vm in self.names:
            restored = self.cluster.vm(vm).path(Names.VM_RESTORED)
            while not _text(restored) and self.cluster.active(vm) and time.monotonic() < deadline:
                time.sleep(0.05)
            if "clock set to this host" not in _text(restored):  # its launcher set the clock over ssh
                unproven.append(vm)
        if unproven:
            wait_for_ssh(self.cluster, unproven, max(1, int(deadline - time.monotonic())), "snapshot")
        else:
            print("every VM answers ssh", flush=True)
        for vm in self.names:
            line = _text(self.cluster.vm(vm).path(Names.VM_RESTORED)).strip()
            print(line or f"{vm}: running; its clock was not set yet", flush=True)


def named_once(command: str, names: list[str]) -> None:
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise LeanvmError(f"{command}: VM {name} is named twice; name each VM once")
        seen.add(name)


def _text(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""
