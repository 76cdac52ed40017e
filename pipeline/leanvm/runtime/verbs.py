"""cluster.sh's verbs up, down, status, console and ssh (snapshot and restore: snapshot.py,
restore.py). Each refusal is one line, `cluster.sh: ...`."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

from leanvm.errors import LeanvmError
from leanvm.host import chosen_accel, pss_mib
from leanvm.proc import run
from leanvm.runtime import power, snapshot, sshvm
from leanvm.runtime.cluster import KVM_SILENCE, Cluster, say
from leanvm.runtime.console import size
from leanvm.runtime.qmp import QMP, QMPError
from leanvm.state import valuesfile
from leanvm.state.layout import Names


def up(cluster: Cluster, names: list[str]) -> list[str]:
    """Start each VM detached; the VMs that did not start."""
    snapshot.recover(cluster)
    failed = []
    for name in names:
        cluster.clear_stale_pid(name)
        pid = cluster.vm(name).pid()
        if pid:
            print(f"{name}: already running (pid {pid})", flush=True)
        elif cluster.launcher_active(name):
            print(f"{name}: already starting (its run.sh runs; QEMU is not up yet, or restarts after a guest reboot)",
                  flush=True)
        elif cluster.start(name):
            started = cluster.vm(name).pid() or "-"
            print(f"{name}: started (pid {started}, ssh 127.0.0.1:{cluster.ssh_port(name)})", flush=True)
        else:
            failed.append(name)
    return failed


def wait_for_ssh(cluster: Cluster, names: list[str], seconds: int, accel: str) -> None:
    """Until every VM's sshd answers, at most `seconds`; one line naming those that did not.
    Fails at once if a VM's QEMU has ended, and deals with a KVM that hangs (kvm_hung)."""
    started = time.monotonic()
    pending = list(names)
    while True:
        pending = [name for name in pending if not answers_ssh(cluster, name)]
        if not pending:
            break
        if accel == "kvm" and time.monotonic() - started >= KVM_SILENCE and silent(cluster, pending):
            accel = kvm_hung(cluster, pending)
            started = time.monotonic()
        if time.monotonic() - started >= seconds:
            raise LeanvmError(f"no sshd answered within {seconds} s on: {' '.join(pending)}")
        time.sleep(0.5)
    print("every VM answers ssh", flush=True)


def answers_ssh(cluster: Cluster, name: str) -> bool:
    if cluster.ssh_quietly(name, ["true"]):
        return True
    if cluster.active(name):
        return False
    cluster.stop_switch_if_unused()
    vm = cluster.vm(name)
    failed = vm.path(Names.VM_BOOT_FAILED)
    if failed.is_file():
        raise LeanvmError(f'VM {name}: its boot failed ("{failed.read_text().strip()}"): '
                          f"see {vm.path(Names.VM_CONSOLE)}")
    raise LeanvmError(f"VM {name} stopped before its sshd answered: see {vm.path(Names.VM_CONSOLE)}")


def silent(cluster: Cluster, names: list[str]) -> bool:
    """No VM of names has printed anything on its serial console."""
    return all(not size(cluster.vm(name).path(Names.VM_CONSOLE)) for name in names)



def kvm_hung(cluster: Cluster, names: list[str]) -> str:
    """The VMs printed nothing under KVM: KVM hangs on this machine (nested virtualisation does
    that). Under LEANVM_ACCEL=auto they are stopped and started again under TCG; with
    LEANVM_ACCEL=kvm they are stopped and the wait fails. One line either way."""
    cluster.force_stop(names)
    why = (f"no VM printed anything on its console within {KVM_SILENCE} s under KVM: KVM hangs on this "
           "machine (nested virtualisation?)")
    if (os.environ.get("LEANVM_ACCEL") or "auto") != "auto":
        cluster.wait_for_launchers()
        cluster.stop_switch_if_unused()
        raise LeanvmError(f"{why}; the VMs are stopped: start them with LEANVM_ACCEL=tcg")
    say(f"{why}; starting them under TCG (LEANVM_ACCEL=tcg skips the KVM try)")
    os.environ["LEANVM_ACCEL"] = "tcg"
    for name in names:
        if not cluster.start(name):
            raise LeanvmError(f"VM {name} did not start under TCG")
    return "tcg"


def up_verb(cluster: Cluster, names: list[str], wait: int | None) -> int:
    accel = chosen_accel()
    failed = up(cluster, names)
    if wait is not None:
        if failed:
            raise LeanvmError(f"VMs that did not start: {' '.join(failed)}; not waiting for ssh")
        wait_for_ssh(cluster, names, wait, accel)
    return 1 if failed else 0


def down(cluster: Cluster, names: list[str]) -> None:
    timeout = power.stop_timeout()
    snapshot.recover(cluster)  # a VM an interrupted snapshot left paused would not see the button
    for name in names:
        cluster.clear_stale_pid(name)
    stubborn = cluster.power_off(names, timeout)
    for name in stubborn:
        print(f"{name}: did not power off within {timeout}s; stopping QEMU", flush=True)
        cluster.vm(name).path(Names.VM_FORCED_STOP).write_text(f"cluster.sh down: no power-off within {timeout}s\n")
    cluster.force_stop(stubborn)
    cluster.wait_for_launchers()
    cluster.stop_switch_if_unused()
    for name in names:
        print(f"{name}: stopped", flush=True)


MONITOR_TIMEOUT = 10.0  # seconds for a monitor command's answer


# --- status -----------------------------------------------------------------------------
def libvirt_running(cluster: Cluster, name: str) -> bool:
    """VM name's libvirt domain runs (out/libvirt/cluster.env names it; LIBVIRT_DEFAULT_URI)."""
    env = valuesfile.read(cluster.out / Names.OUT_LIBVIRT / Names.LIBVIRT_ENV)
    if not env or "prefix" not in env:
        return False
    try:
        said = run(["virsh", "-q", "domstate", f"{env['prefix']}-{name}"], check=False, timeout=20)
    except LeanvmError:
        return False
    return said.stdout.decode(errors="replace").strip() == "running"


def ksm_line(pids: list[int]) -> str | None:
    """One line on KSM (Linux's same-page merging): how much of these VMs' memory it merged, or,
    when it is off, how to turn it on. None where the host has no KSM."""
    try:
        on = Path("/sys/kernel/mm/ksm/run").read_text().strip() == "1"
    except OSError:
        return None
    if not on:
        return ("KSM: off: the pages these VMs hold alike (kernel, the /usr they read) are kept once per VM; merge "
                "them with: echo 1 | sudo tee /sys/kernel/mm/ksm/run (3 idle 256 MiB VMs: 320 -> 227 MiB each, "
                "see README, Memory)")
    pages = 0
    for pid in pids:
        try:
            pages += int(Path(f"/proc/{pid}/ksm_merging_pages").read_text())
        except (OSError, ValueError):
            pass
    merged = pages * os.sysconf("SC_PAGESIZE") // 1048576
    return f"KSM: on: {merged} MiB of these VMs' memory merged with identical pages"


def status(cluster: Cluster) -> None:
    snapshot.recover(cluster)
    row = "{:<24} {:<17} {:<8} {:<22} {}"
    print(row.format("VM", "STATE", "PID", "SSH", "HOST MEMORY (PSS)"))
    pids = []
    for name in cluster.names():
        cluster.clear_stale_pid(name)
        pid, memory = cluster.vm(name).pid(), "-"
        if pid:
            state, memory = "running", pss_mib(pid)
            pids.append(pid)
        elif cluster.launcher_active(name):
            state = "reboot"
        elif libvirt_running(cluster, name):
            state = "running (libvirt)"
        else:
            state = "stopped"
        print(row.format(name, state, pid or "-", f"127.0.0.1:{cluster.ssh_port(name)}", memory), flush=True)
    line = ksm_line(pids) if pids else None
    if line:
        print(line)


# --- console, monitor and ssh -------------------------------------------------------------
def monitor(cluster: Cluster, name: str, commands: Iterable[str]) -> None:
    """Each monitor (HMP) command through VM name's QMP socket, its answer printed."""
    vm = cluster.check_vm(name)
    try:
        qmp = QMP(vm.path(Names.VM_QMP), MONITOR_TIMEOUT)
    except (FileNotFoundError, ConnectionRefusedError):
        raise LeanvmError(f"VM {name} is not running: start it with {cluster.out / 'cluster.sh'} up {name}") from None
    try:
        with qmp:
            for command in commands:
                print(qmp.hmp(command).replace("\r\n", "\n"), end="", flush=True)  # HMP ends lines with CR LF
    except QMPError as e:
        raise LeanvmError(f"monitor: {e}") from None


def stdin_commands() -> Iterator[str]:
    if sys.stdin.isatty():
        print("one monitor command a line (info status, info block, ...); Ctrl-d ends", file=sys.stderr)
    for line in sys.stdin:
        if line.strip():
            yield line.strip()



def console(cluster: Cluster, name: str) -> None:
    """Follow a VM's serial console (console.log) from its start; Ctrl-c stops following."""
    path = cluster.check_vm(name).path(Names.VM_CONSOLE)
    if not path.is_file():
        raise LeanvmError(f"VM {name} has no console.log: start it with 'cluster.sh up'")
    with open(path, "rb") as log:
        while True:
            chunk = log.read(65536)
            if chunk:
                sys.stdout.buffer.write(chunk)
                sys.stdout.flush()
            else:
                time.sleep(0.2)


def ssh(cluster: Cluster, name: str, command: list[str]) -> None:
    """ssh into the VM (exec: its exit status is the remote command's)."""
    cluster.check_vm(name)
    if not cluster.active(name) and not libvirt_running(cluster, name):
        raise LeanvmError(f"VM {name} is not running: start it with {cluster.out / 'cluster.sh'} up {name}")
    port = cluster.ssh_port(name)
    if not port:
        raise LeanvmError(f"VM {name} has no recorded ssh port: run doit")
    if not (cluster.out / Names.OUT_SSH / Names.SSH_KEY).is_file():
        raise LeanvmError(f"no cluster key {cluster.out / Names.OUT_SSH / Names.SSH_KEY}: run doit")
    os.chdir(cluster.out / Names.OUT_SSH)
    argv = sshvm.ssh_argv(port, name, command)
    try:
        os.execvp(argv[0], argv)
    except OSError:
        raise LeanvmError("ssh not found", "install it (apt-get install openssh-client)") from None
