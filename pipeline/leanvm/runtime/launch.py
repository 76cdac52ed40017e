"""out/vms/NAME/run.sh's verb: start VM NAME in the foreground, detached, or print its command.

Everything it needs of the VM is in the VM's values file (out/state/vms/NAME.env). Errors
are one line, `run.sh: ...`, and exit status 1."""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from leanvm.errors import LeanvmError
from leanvm.host import chosen_accel, host_arch
from leanvm.runtime import qemu, restoredisks, snapcheck
from leanvm.runtime.console import size
from leanvm.runtime.supervise import KVM_FALLBACK, Supervisor, accel_auto_kvm, say
from leanvm.runtime.vmfiles import VMFiles
from leanvm.state.layout import Names

USAGE = """\
Usage: {run_sh} [--print | --detach | --help] [--restore SNAP] [QEMU ARGS...]
Start VM {name} ({release} {version}).
  (no option)  foreground, serial console on this terminal (Ctrl-a x quits)
  --print      print the QEMU command line (runnable as printed) instead of running it
  --detach     run in the background: console in console.log
  --restore SNAP
               start it as snapshot SNAP saved it (out/snapshots/SNAP, made by
               cluster.sh snapshot): its disks put back, its memory loaded, its clock set
QEMU's monitor (QMP) is the socket qmp.sock beside run.sh: cluster.sh monitor talks to it.
  --help       this text
Environment: LEANVM_ACCEL=auto|kvm|hvf|tcg (default auto), LEANVM_QEMU=BINARY,
  LEANVM_APPEND="ARGS" (extra kernel arguments), LEANVM_BALLOON=on|off (default on),
  LEANVM_TCG_CACHE=MiB (TCG's translated-code cache; default QEMU's, 1 GiB at most),
  LEANVM_PYTHON=PYTHON (the python3 that runs this launcher)"""


class Options:
    def __init__(self, mode: str = "foreground", restore: str = "", resume: str = "") -> None:
        self.mode = mode  # print, detach, supervise (internal: the session a --detach VM runs in)
        self.restore = restore  # --restore SNAP
        self.resume = resume  # the snapshot whose state QEMU loads (--restore, or cluster.sh restore's --resume)
        self.qemu_args: list[str] = []


MODES = {"--print": "print", "--detach": "detach", "--supervise": "supervise", "--help": "help", "-h": "help"}


def parse(given: list[str]) -> Options:
    options, argv = Options(), list(given)
    if argv and argv[0] in MODES:
        options.mode = MODES[argv.pop(0)]
    if argv and argv[0] in ("--restore", "--resume"):
        if len(argv) < 2 or not argv[1]:
            raise LeanvmError("usage: run.sh [--detach] --restore SNAP")
        if options.mode == "print":
            raise LeanvmError("--print does not take --restore")
        if argv[0] == "--restore":
            options.restore = argv[1]
        options.resume = argv[1]
        argv = argv[2:]
    options.qemu_args = argv
    return options


def accel_of(vm: VMFiles, values: dict[str, str], options: Options) -> qemu.Accel:
    accel = chosen_accel(values["arch"])
    if accel != "tcg" and values["arch"] != host_arch():
        raise LeanvmError(f"LEANVM_ACCEL={accel} cannot run VM {vm.name} ({values['arch']}) on this {host_arch()} "
                          "host: use LEANVM_ACCEL=tcg or auto")
    if not options.resume:
        return qemu.accel_for(accel)
    # a restore runs as the snapshot saved it: the same accelerator and CPU
    snapshot = vm.layout.snapshot(options.resume)
    saved = qemu.accel_for(snapcheck.saved_accel(snapshot, vm.name))
    was = snapcheck.manifest(snapshot).get(f"{vm.name}.cpu", "")
    if was != saved.cpu:
        raise LeanvmError(f"snapshot {options.resume}: VM {vm.name} was saved with -cpu {was}, this run.sh uses "
                          f"-cpu {saved.cpu}", "boot it cold")
    return saved


def check_snapshot_exists(vm: VMFiles, name: str) -> None:
    snapcheck.check_name(name)
    if not (vm.layout.snapshot(name) / Names.SNAPSHOT_MANIFEST).is_file():
        snapshots = vm.out / Names.OUT_SNAPSHOTS
        raise LeanvmError(f"no snapshot {name} in {snapshots}: take one with {vm.out / 'cluster.sh'} snapshot "
                          f"{name}, or see the ones there with: ls {snapshots}")


def print_command(supervisor: Supervisor) -> None:
    """The QEMU command as one line that runs as printed in a shell, the switch started first."""
    import shlex  # (only here: what a VM's launcher imports, it holds while the VM runs)

    vm = supervisor.vm
    print(f"# VM {vm.name}: {supervisor.decide_boot(False, print_only=True)}")
    start_switch = [sys.executable, "-I", "-S", str(vm.out / Names.OUT_RUNTIME), "start-switch", str(vm.out)]
    net = shlex.quote(str(supervisor.net))
    print(f"mkdir -p {net} && cd {net} && {shlex.join(start_switch)} && {shlex.join(supervisor.qemu_argv(None, None))}")


def cluster_net(mode: str, name: str) -> bool:
    """NIC 2 needs vde_switch (Debian: vde2); without it the VM still starts, with a warning."""
    if mode == "print" or shutil.which("vde_switch"):
        return True
    say(f"warning: vde_switch not found (apt-get install vde2): VM {name} starts without the cluster network")
    return False


def run(out: Path, name: str, argv: list[str]) -> int:
    vm = VMFiles(out, name)
    options = parse(argv)
    values = vm.values()
    if options.mode == "help":
        print(USAGE.format(run_sh=vm.path(Names.VM_RUN_SH), name=name, release=values.get("release", ""),
                           version=values.get("version", "")))
        return 0
    if options.resume:
        check_snapshot_exists(vm, options.resume)
    if options.mode == "detach":
        return detach(vm, values, options)
    accel = accel_of(vm, values, options)
    supervisor = Supervisor(vm, values, accel, options.qemu_args, options.mode == "supervise", options.restore,
                            options.resume, cluster_net(options.mode, name))
    if options.mode == "print":
        print_command(supervisor)
        return 0
    return supervisor.run()


# --- detach: the VM runs under a launcher in a session of its own -------------------------
def start_supervisor(vm: VMFiles, options: Options) -> subprocess.Popen[bytes]:
    """The launcher of the VM in a session of its own (so that a guest reboot relaunches QEMU
    there too), its messages in run.log."""
    again = ["--restore", options.restore] if options.restore else []
    if options.resume and not options.restore:
        again = ["--resume", options.resume]
    argv = [sys.executable, "-I", "-S", str(vm.out / Names.OUT_RUNTIME), "run", str(vm.out), vm.name, "--supervise",
            *again, *options.qemu_args]
    with open(vm.path(Names.VM_RUN_LOG), "wb") as log:
        return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log,
                                start_new_session=True)


def detach(vm: VMFiles, values: dict[str, str], options: Options) -> int:
    """Start the VM's launcher detached; return once QEMU runs (a restore: once QEMU runs the
    snapshot's state, said in resumed), or say the launcher's last word."""
    pid = vm.pid()
    if pid:
        raise LeanvmError(f"VM {vm.name} is already running (pid {pid}); stop it before starting it again")
    if options.restore or not options.resume:  # (here, so that its line is seen)
        restoredisks.recover(vm.dir, "run.sh")
    launcher = start_supervisor(vm, options)
    started = time.monotonic()
    watch_kvm = not options.resume and accel_auto_kvm(values["arch"])
    while not started_yet(vm, options, watch_kvm, time.monotonic() - started):
        if launcher.poll() is not None:
            print(last_word(vm), file=sys.stderr)
            return 1
        if time.monotonic() - started > 60:
            raise LeanvmError(f"VM {vm.name} did not start within 60 s: see {vm.path(Names.VM_RUN_LOG)}")
        time.sleep(0.1)
    for line in read_log(vm):
        if KVM_FALLBACK in line:
            print(line, file=sys.stderr)
    return 0


def started_yet(vm: VMFiles, options: Options, watch_kvm: bool, elapsed: float) -> bool:
    """QEMU runs (a restore: runs the snapshot). Under a KVM that auto chose, QEMU counts as
    started once its guest printed on the console, or 3 s after start, or once it fell back to TCG."""
    if not vm.pid():
        return False
    if options.resume:
        return vm.path(Names.VM_RESUMED).is_file()
    if not watch_kvm or elapsed >= 3 or size(vm.path(Names.VM_CONSOLE)) > 0:
        return True
    return any(KVM_FALLBACK in line for line in read_log(vm))


def read_log(vm: VMFiles) -> list[str]:
    try:
        return vm.path(Names.VM_RUN_LOG).read_text(errors="replace").splitlines()
    except OSError:
        return []


def last_word(vm: VMFiles) -> str:
    """Why a detached launcher ended before QEMU ran: its own last line, or QEMU's first error
    line. Read once it has cleared up (its run.lock free): a retry at once finds the VM stopped."""
    fd = os.open(vm.path(Names.VM_RUN_LOCK), os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            time.sleep(0.05)
    os.close(fd)
    lines = read_log(vm)
    last = lines[-1] if lines else ""
    if last.startswith("run.sh:"):
        return last
    qemu_error = next((line for line in lines if "qemu-system" in line or "qemu:" in line), last)
    return f"run.sh: VM {vm.name}: QEMU ended at once: {qemu_error}; see {vm.path(Names.VM_RUN_LOG)}"
