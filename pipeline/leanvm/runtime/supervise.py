"""The launcher's run of one VM: QEMU never outlives it.

QEMU runs as a child that the launcher watches over a QMP channel of its own (a socketpair
given to QEMU as a monitor): the events say whether the guest reset, powered off or was
stopped. SIGTERM, SIGINT and SIGHUP are passed on to QEMU as SIGTERM (QEMU's clean exit:
disks flushed), and the launcher clears up once QEMU is gone. SIGKILL cannot be caught: QEMU
then gets SIGTERM from the kernel (setpriv --pdeathsig, util-linux) and a keeper process
(forked before anything is touched, holding the VM's run.lock with it) clears up.
"""

from __future__ import annotations

import contextlib
import fcntl
import gc
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

from leanvm.errors import LeanvmError
from leanvm.host import alive, port_in_use, resolve_accel
from leanvm.runtime import firstboot, qemu, restoredisks, snapcheck, sshvm, switch
from leanvm.runtime.console import ConsoleWatch, size
from leanvm.runtime.qmp import QMP, QMPError
from leanvm.runtime.signals import STOPPING, Interrupted, handle, raise_interrupted
from leanvm.runtime.vmfiles import VMFiles
from leanvm.state.layout import Names

# A QEMU that fails at once under a KVM that auto chose (nested virtualisation: "failed to set
# MSR", an assertion) is started again under TCG, said in one line that holds this text.
KVM_FALLBACK = "failed under KVM"
# QEMU's SHUTDOWN reasons for a reset, which -no-reboot turns into an exit: the guest's own
# reboot, or a system_reset asked on a monitor (cluster.sh monitor NAME system_reset)
RESETS = ("guest-reset", "host-qmp-system-reset")
LOAD_DEADLINE = 300.0  # seconds for QEMU to load a snapshot's memory


def say(message: str) -> None:
    print(f"run.sh: {message}", file=sys.stderr, flush=True)


class Launch:
    """One QEMU process of the run, and what came of it."""

    def __init__(self, proc: subprocess.Popen[bytes], qmp: QMP | None, console: ConsoleWatch, incoming: bool) -> None:
        self.proc = proc
        self.qmp = qmp  # None if QEMU ended before its monitor answered
        self.console, self.incoming = console, incoming
        self.resumed = False
        self.shutdown = ""  # the reason of QEMU's SHUTDOWN event: guest-reset, guest-shutdown, host-signal, ...


class Supervisor:
    def __init__(self, vm: VMFiles, values: dict[str, str], accel: qemu.Accel, extra: list[str],
                 detached: bool, restore: str, resume: str, cluster_net: bool) -> None:
        self.vm, self.values, self.accel, self.extra = vm, values, accel, extra
        self.detached, self.restore, self.resume, self.cluster_net = detached, restore, resume, cluster_net
        # the disks a restore swaps are this launcher's to keep or put back, except under
        # cluster.sh restore (--resume): cluster.sh keeps them once every VM runs the snapshot
        self.disks_are_mine = bool(restore) or not resume
        self.snapshot = vm.layout.snapshot(resume) if resume else None
        self.net = vm.out / Names.OUT_NET
        self.caught = 0
        self.child: subprocess.Popen[bytes] | None = None
        self.keeper_pid = 0
        self.append = ""

    # --- checks, before anything is touched ---------------------------------------------
    def refuse_if_running(self) -> None:
        pid = self.vm.pid()
        if pid:
            raise LeanvmError(f"VM {self.vm.name} is already running (pid {pid}); stop it before starting it again")

    def take_lock(self) -> int:
        """The VM's run.lock (one launcher at a time per VM; never inherited by QEMU)."""
        fd = os.open(self.vm.path(Names.VM_RUN_LOCK), os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        deadline = time.monotonic() + 15
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return fd
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise LeanvmError(f"VM {self.vm.name} is starting or stopping in another run.sh",
                                      "try again") from None
                time.sleep(0.1)

    def check(self) -> None:
        binary = os.environ.get("LEANVM_QEMU") or self.values["qemu"]
        if not shutil.which(binary):
            raise LeanvmError(f"{binary} not found",
                              f"install it (apt-get install {self.values['qemu_package']}) or set LEANVM_QEMU")
        self.refuse_if_running()
        self.lock = self.take_lock()
        self.refuse_if_running()
        pidfile = self.vm.path(Names.VM_QEMU_PID)
        if pidfile.exists():  # not this VM's QEMU: left by a QEMU that died
            stale = pidfile.read_text().strip()
            say(f"warning: removed a stale qemu.pid (pid {stale} is not VM {self.vm.name}'s QEMU)")
            pidfile.unlink(missing_ok=True)
        if self.disks_are_mine:  # a restore that a SIGKILL ended: the VM's own disks first
            restoredisks.recover_locked(self.vm.dir, "run.sh")
        for port in self.values.get("host_ports", "").split():
            if port_in_use(int(port)):
                raise LeanvmError(f"VM {self.vm.name}: host port {port} (127.0.0.1) is already in use",
                                  "stop what uses it or change the VM's ports")

    # --- the boot -------------------------------------------------------------------------
    def decide_boot(self, incoming: bool, print_only: bool = False) -> str:
        """The kernel command line (self.append), with the first-boot arguments on a first boot;
        returns the rule that decided it."""
        if incoming and self.snapshot:
            self.append = snapcheck.manifest(self.snapshot).get(f"{self.vm.name}.append", "")
            return f"restored from snapshot {self.resume}"
        args, kernel_args = self.values.get("first_boot_args", ""), self.values["kernel_args"]
        root = self.vm.path(Names.VM_ROOT_DISK)
        if not args:
            rule, self.append = "not a first boot", kernel_args
        else:
            verdict = firstboot.decide(root, print_only)
            if verdict.first:
                rule, self.append = f"first boot: {root} {verdict.why}, so '{args}' is added", f"{kernel_args} {args}"
            else:
                rule, self.append = f"not a first boot: {root} {verdict.why}", kernel_args
            rule += verdict.note
        extra = os.environ.get("LEANVM_APPEND", "")
        if extra:
            self.append += f" {extra}"
        return rule

    def qemu_argv(self, monitor_fd: int | None, incoming_fd: int | None) -> list[str]:
        extra = qemu.console_args(self.vm, self.detached) + qemu.qmp_args(self.vm)
        if monitor_fd is not None:
            extra += ["-chardev", f"socket,id=supervisor,fd={monitor_fd}", "-mon", "chardev=supervisor,mode=control"]
        if incoming_fd is not None:
            extra += ["-incoming", "defer"]
        extra += qemu.balloon_args()
        if self.cluster_net:
            extra += qemu.cluster_args(self.values)
        return qemu.argv(self.vm, self.values, self.accel, self.append, extra + self.extra)

    # --- signals and the keeper -----------------------------------------------------------
    def on_signal(self, signum: int, _frame: object) -> None:
        self.caught = STOPPING[signal.Signals(signum)]
        if self.child and self.child.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.child.send_signal(signal.SIGTERM)

    def start_keeper(self) -> None:
        """A process beside the launcher, holding its run.lock: once the launcher is gone
        without clearing up (SIGKILL), it stops QEMU if the parent-death signal did not, and
        clears up. It learns of the launcher's end from a pipe only the launcher writes to."""
        read_end, write_end = os.pipe()
        gc.freeze()  # the collector leaves what both have alone: the keeper's pages stay shared
        pid = os.fork()
        if pid:
            os.close(read_end)
            self.keeper_pid, self.keeper_pipe = pid, write_end
            return
        try:
            handle(signal.SIG_IGN)
            os.close(write_end)
            null = os.open(os.devnull, os.O_RDWR)
            for fd in (0, 1, 2):
                os.dup2(null, fd)
            while os.read(read_end, 1):
                pass
            pid_now = self.vm.pid()
            if pid_now:
                stop_process(pid_now, 10)
            self.release()
        finally:
            os._exit(0)

    def stop_keeper(self) -> None:
        if self.keeper_pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.keeper_pid, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(self.keeper_pid, 0)
            self.keeper_pid = 0

    # --- clearing up ------------------------------------------------------------------
    def release(self) -> None:
        """What a run holds: its status files, a pid file QEMU did not remove, the switch entry,
        and (a restore that was not kept: interrupted, or its QEMU stopped first) the disks it swapped."""
        for name in (Names.VM_RESUMED, Names.VM_RESTORED, Names.VM_QMP):
            self.vm.path(name).unlink(missing_ok=True)
        if not self.vm.pid():
            self.vm.path(Names.VM_QEMU_PID).unlink(missing_ok=True)
        if self.resume and restoredisks.old_kept(self.vm.dir):
            restoredisks.put_old_back(self.vm.dir)
            say(f"VM {self.vm.name}: its restore from snapshot {self.resume} ended before it was kept: "
                "its own disks are as they were")
        if self.resume:
            restoredisks.discard_copies(self.vm.dir)
        if self.cluster_net:
            with switch.locked(self.net):
                switch.leave(self.net, self.vm.name)


    # --- one launch of QEMU ---------------------------------------------------------------
    def launch(self, incoming: bool) -> Launch:
        """QEMU started (loading the snapshot's memory if `incoming`), its QMP channel open."""
        ours, theirs = socket.socketpair()
        memory = os.open(self.snapshot / self.vm.name / Names.SNAPSHOT_MEMORY, os.O_RDONLY) \
            if incoming and self.snapshot else None
        fds = [theirs.fileno()] + ([memory] if memory is not None else [])
        offset = size(self.vm.path(Names.VM_CONSOLE))
        try:
            proc = subprocess.Popen([*setpriv(), *self.qemu_argv(theirs.fileno(), memory)], pass_fds=fds,
                                    stdin=None if not self.detached else subprocess.DEVNULL)
        finally:
            theirs.close()
        self.child = proc
        channel: QMP | None = None
        with contextlib.suppress(QMPError):
            channel = QMP(None, 60, sock=ours)
        launch = Launch(proc, channel, ConsoleWatch(self.vm.path(Names.VM_CONSOLE), offset), incoming)
        if memory is not None:
            launch.resumed = bool(channel) and self.resume_guest(launch, memory)
            os.close(memory)
            if not launch.resumed:  # (a QEMU that could not load it has ended)
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)
        return launch

    def resume_guest(self, launch: Launch, memory_fd: int) -> bool:
        """Load the snapshot's memory and run it: resumed is written, and (run.sh --restore;
        cluster.sh restore does it once every VM runs) the disks from before are dropped. It
        runs here, not beside the launcher, so that a signal stops it between two steps and no
        other process drops or puts back a disk. False if QEMU did not run the snapshot."""
        qmp = launch.qmp
        assert qmp
        try:
            qmp.within(LOAD_DEADLINE)
            qmp.execute("migrate-set-capabilities", {"capabilities": [{"capability": "events", "state": True}]})
            qmp.execute("migrate-incoming", {"uri": f"fd:{memory_fd}"})
            while True:
                event = qmp.wait_event("MIGRATION")
                if event["data"]["status"] in ("completed", "failed", "cancelled"):
                    break
            if event["data"]["status"] != "completed" or self.caught:
                return False
            qmp.within(30).execute("cont")
            if qmp.execute("query-status")["status"] != "running" or self.caught:
                return False
        except QMPError:
            return False
        if self.disks_are_mine:
            restoredisks.drop_old(self.vm.dir)
        self.vm.path(Names.VM_RESUMED).write_text(f"{launch.proc.pid}\n")
        threading.Thread(target=self.set_restored_clock, args=(launch.proc,), daemon=True).start()
        return True

    def set_restored_clock(self, proc: subprocess.Popen[bytes]) -> None:
        """The clock of a restored guest (it lives at the moment it was saved), set over ssh;
        one line, in restored as well."""
        def running() -> bool:
            return proc.poll() is None

        clock = "its clock could not be set over ssh (sudo date): it runs behind by the time since the snapshot"
        if sshvm.set_clock(self.vm.out, self.values["ssh_port"], self.vm.name, 30, running):
            clock = "its clock set to this host's over ssh"
        if not running():
            return
        line = f"run.sh: VM {self.vm.name} restored from snapshot {self.resume} and running; {clock}"
        self.vm.path(Names.VM_RESTORED).write_text(line + "\n")
        print(line, file=sys.stderr, flush=True)

    def watch(self, launch: Launch) -> int:
        """Until QEMU ends: its events kept, its console read for a failed boot once a second.
        Its exit status, as a shell gives it."""
        qmp, kill_at = launch.qmp, 0.0
        while qmp:
            try:
                event = qmp.next_event(1.0)
            except QMPError:
                break
            if event and event["event"] == "SHUTDOWN":
                launch.shutdown = str(event.get("data", {}).get("reason", ""))
            failed = launch.console.failed_boot()
            if failed:
                self.vm.path(Names.VM_BOOT_FAILED).write_text(failed + "\n")
                with contextlib.suppress(ProcessLookupError):
                    launch.proc.send_signal(signal.SIGTERM)
            if self.caught and not kill_at:
                kill_at = time.monotonic() + 10  # a QEMU that a SIGTERM did not end in 10 s is killed
            if kill_at and time.monotonic() > kill_at:
                launch.proc.kill()
        if qmp:
            qmp.close()
        status = launch.proc.wait()
        return 128 - status if status < 0 else status

    # --- the run ----------------------------------------------------------------------
    def run(self) -> int:
        """Checks first, where a signal ends the launcher at once (and the program it waits on:
        proc.run stops it); from the keeper's start on, a signal stops QEMU and clears up."""
        handle(raise_interrupted)
        try:
            self.check()
            if self.restore and self.snapshot:
                binary = os.environ.get("LEANVM_QEMU") or self.values["qemu"]
                snapcheck.check(self.snapshot, self.vm.name, self.vm.values_file, binary)
        except Interrupted as e:
            return e.status
        handle(self.on_signal)
        self.start_keeper()
        try:
            if self.restore and self.snapshot:
                self.put_snapshot_disks_back()
            if self.caught:
                return self.caught
            return self.launches()
        finally:
            handle(signal.SIG_IGN)
            self.stop_keeper()
            self.release()

    def put_snapshot_disks_back(self) -> None:
        assert self.snapshot
        try:
            restoredisks.copy_in(self.vm.dir, self.snapshot / self.vm.name)
        except LeanvmError:
            raise LeanvmError(f"cannot copy the disks of {self.snapshot / self.vm.name}; "
                              f"VM {self.vm.name}'s disks are as they were") from None
        if not restoredisks.swap_in(self.vm.dir):
            restoredisks.put_old_back(self.vm.dir)
            raise LeanvmError(f"cannot swap in the disks of {self.snapshot / self.vm.name}; "
                              f"VM {self.vm.name}'s disks are as they were")

    def launches(self) -> int:
        """QEMU launched, and launched again after each guest reboot, until it ends for good."""
        incoming = bool(self.resume)
        self.decide_boot(incoming)
        if self.cluster_net:
            with switch.locked(self.net):
                switch.join(self.net, self.vm.name)
        for name in (Names.VM_FORCED_STOP, Names.VM_BOOT_FAILED):
            self.vm.path(name).unlink(missing_ok=True)
        self.vm.path(Names.VM_CONSOLE).write_bytes(b"")
        self.net.mkdir(parents=True, exist_ok=True)
        os.chdir(self.net)  # QEMU finds the switch as ./switch, its QMP socket as ../vms/NAME/qmp.sock
        while True:
            if self.caught:
                return self.caught
            launch = self.launch(incoming)
            status = self.watch(launch)
            if self.caught:
                return self.caught
            verdict = self.after(launch, status)
            if verdict is not None:
                return self.forced(verdict)
            incoming = False

    def after(self, launch: Launch, status: int) -> int | None:
        """What QEMU's end means: the run's exit status, or None to launch again."""
        if launch.incoming and not launch.resumed and restoredisks.old_kept(self.vm.dir):
            restoredisks.put_old_back(self.vm.dir)
            say(f"VM {self.vm.name}: QEMU could not load snapshot {self.resume} ({self.qemu_error('see run.log')}): "
                "its disks are as they were")
            return 1
        failed = self.vm.path(Names.VM_BOOT_FAILED)
        if failed.exists():
            say(f'VM {self.vm.name}: its boot failed ("{failed.read_text().strip()}"): stopped instead of started '
                f"again; see {self.vm.path(Names.VM_CONSOLE)}")
            return 1
        forced = self.vm.path(Names.VM_FORCED_STOP).exists()
        if status != 0 and self.kvm_failed(launch, forced):
            say(f"VM {self.vm.name}: QEMU {KVM_FALLBACK} ({self.qemu_error(f'exit status {status}')}): "
                "starting it under TCG (LEANVM_ACCEL=tcg skips the KVM try)")
            self.accel = qemu.accel_for("tcg")
            return None
        if forced or status != 0 or launch.shutdown not in RESETS:
            return status
        say(f"VM {self.vm.name} rebooted: starting it again")
        self.decide_boot(False)
        return None

    def kvm_failed(self, launch: Launch, forced: bool) -> bool:
        """QEMU failed under a KVM that LEANVM_ACCEL=auto chose before its guest printed anything
        (and nobody stopped it)."""
        return (not launch.incoming and self.accel.name == "kvm" and not forced
                and (os.environ.get("LEANVM_ACCEL") or "auto") == "auto" and not launch.console.printed())

    def qemu_error(self, otherwise: str) -> str:
        """QEMU's first error line in run.log (detached); in the foreground its words are above."""
        if not self.detached:
            return "its error is above" if otherwise == "see run.log" else otherwise
        with contextlib.suppress(OSError):
            for line in self.vm.path(Names.VM_RUN_LOG).read_text(errors="replace").splitlines():
                if "qemu-system" in line:
                    return line
        return otherwise

    def forced(self, status: int) -> int:
        """QEMU exits 0 after a monitor quit or a SIGTERM: a stop by force is said, and fails."""
        forced = self.vm.path(Names.VM_FORCED_STOP)
        if not forced.exists():
            return status
        say(f"VM {self.vm.name} was stopped by force: {forced.read_text().strip()}")
        forced.unlink(missing_ok=True)
        return status or 143

def stop_process(pid: int, grace: float) -> None:
    """SIGTERM to pid, and SIGKILL if it is still there after `grace` seconds."""
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


def setpriv() -> list[str]:
    """QEMU gets SIGTERM when its launcher dies (util-linux's setpriv); without setpriv (macOS)
    the keeper stops it within a second."""
    return ["setpriv", "--pdeathsig", "TERM", "--"] if shutil.which("setpriv") else []


def accel_auto_kvm(arch: str) -> bool:
    return (os.environ.get("LEANVM_ACCEL") or "auto") == "auto" and resolve_accel("auto", arch) == "kvm"

