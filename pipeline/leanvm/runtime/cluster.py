"""The VMs of one out/ as cluster.sh drives them: which run, starting them detached, waiting
for their sshd, and stopping them (the power button, then QEMU quit, SIGTERM, SIGKILL)."""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from leanvm.errors import LeanvmError
from leanvm.runtime import launch, power, sshvm, switch
from leanvm.runtime.qmp import QMP, QMPError
from leanvm.runtime.vmfiles import VMFiles, vm_names
from leanvm.state.layout import Names

# Seconds after which a VM that printed nothing on its serial console under KVM counts as
# hung: a KVM guest prints its first kernel line within a second or two.
KVM_SILENCE = 20


def say(message: str) -> None:
    print(f"cluster.sh: {message}", file=sys.stderr, flush=True)


class Cluster:
    def __init__(self, out: Path) -> None:
        self.out = out
        self.net = out / Names.OUT_NET

    def vm(self, name: str) -> VMFiles:
        return VMFiles(self.out, name)

    def names(self) -> list[str]:
        return vm_names(self.out)

    def check_vm(self, name: str) -> VMFiles:
        vm = self.vm(name)
        if not vm.exists():
            raise LeanvmError(f"no VM named '{name}' in {self.out / Names.OUT_VMS}")
        return vm

    def ssh_port(self, name: str) -> str:
        try:
            return self.vm(name).values().get("ssh_port", "")
        except LeanvmError:
            return ""

    # --- running, starting, stopped -----------------------------------------------------
    def launcher_active(self, name: str) -> bool:
        """True while VM name's launcher holds its run.lock: from before QEMU starts until it has
        cleared up, across the relaunch after a guest reboot (when no QEMU runs for a moment)."""
        lock = self.vm(name).path(Names.VM_RUN_LOCK)
        try:
            fd = os.open(lock, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            return False
        except BlockingIOError:
            return True
        finally:
            os.close(fd)

    def active(self, name: str) -> bool:
        """VM name runs: its QEMU, or its launcher between two launches."""
        return self.vm(name).pid() is not None or self.launcher_active(name)

    def clear_stale_pid(self, name: str) -> None:
        """A qemu.pid that names no QEMU of this VM goes, said in one line (only while no
        launcher holds the VM's run.lock: a starting QEMU writes the file)."""
        vm = self.vm(name)
        pidfile = vm.path(Names.VM_QEMU_PID)
        if not pidfile.is_file() or vm.pid() or self.launcher_active(name):
            return
        stale = pidfile.read_text().strip()
        pidfile.unlink(missing_ok=True)
        print(f"{name}: removed a stale qemu.pid (pid {stale} is not this VM's QEMU)", file=sys.stderr)

    def stop_switch_if_unused(self) -> None:
        if not self.net.is_dir():
            return
        with switch.locked(self.net):
            if not any(self.vm(name).pid() for name in self.names()):
                switch.stop_if_unused(self.net)

    def start(self, name: str, resume: str = "") -> bool:
        """run.sh --detach [--resume SNAP] of VM name; its own line if it did not start."""
        try:
            return launch.run(self.out, name, ["--detach", *(["--resume", resume] if resume else [])]) == 0
        except LeanvmError as e:
            print(f"run.sh: {e}", file=sys.stderr, flush=True)
            return False

    # --- the monitor ----------------------------------------------------------------------
    def qmp(self, name: str, timeout: float) -> QMP:
        return QMP(self.vm(name).path(Names.VM_QMP), timeout)

    def send(self, command: str, names: list[str], timeout: float = 2) -> None:
        """QMP command to each running VM of names, at once, never waiting long on one."""
        def one(name: str) -> None:
            with contextlib.suppress(OSError, QMPError), self.qmp(name, timeout) as qmp:
                qmp.execute(command)
        threads = [threading.Thread(target=one, args=(name,)) for name in names if self.vm(name).pid()]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()

    # --- stopping ---------------------------------------------------------------------
    def wait_for_launchers(self, timeout: float = 10) -> None:
        """Until the launcher of each VM whose QEMU has ended has cleared up."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not any(self.launcher_active(name) and not self.vm(name).pid() for name in self.names()):
                return
            time.sleep(0.1)

    def force_stop(self, names: list[str]) -> None:
        """QEMU quit, then SIGTERM, then SIGKILL. Then wait (up to 15 s in all) for each VM's
        launcher to end: one that was between two launches (a guest reboot) starts QEMU again,
        which is stopped too; the launcher finds forced-stop then and ends."""
        if not names:
            return
        self.send("quit", names)
        for sig in (signal.SIGTERM, signal.SIGKILL):
            deadline = time.monotonic() + 1
            while any(self.vm(name).pid() for name in names) and time.monotonic() < deadline:
                time.sleep(0.1)
            for name in names:
                pid = self.vm(name).pid()
                if pid:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, sig)
        deadline = time.monotonic() + 15
        for name in names:
            while self.launcher_active(name) and time.monotonic() < deadline:
                pid = self.vm(name).pid()
                if pid:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGTERM)
                time.sleep(0.1)

    def power_off(self, names: list[str], timeout: int) -> list[str]:
        """The power button of the VMs (power.power_off); at the third press (10 s without a
        power-off) each is also asked over ssh, as its user would (`sudo systemctl poweroff`):
        a kernel may ignore the button (Flatcar's arm64 kernel has no KEYBOARD_GPIO for the virt
        machine's GPIO key). The VMs still running then."""
        def press(running: list[str], count: int) -> None:
            self.send("system_powerdown", running)
            if count == 3:
                for name in running:
                    self.in_background(self.poweroff_over_ssh, name)

        return power.power_off(lambda: [name for name in names if self.active(name)], press, timeout)

    def in_background(self, work: Callable[..., object], *args: str) -> threading.Thread:
        thread = threading.Thread(target=work, args=args, daemon=True)
        thread.start()
        return thread

    def poweroff_over_ssh(self, name: str) -> None:
        self.ssh_quietly(name, ["sudo", "systemctl", "poweroff"])

    def ssh_quietly(self, name: str, command: list[str]) -> bool:
        port = self.ssh_port(name)
        return bool(port) and sshvm.answers(self.out, port, name, command)
