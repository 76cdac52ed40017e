"""Facts of this host that the runtime and the build both ask: is a process alive, is it a
VM's QEMU, is a TCP port taken, which architecture and accelerator. Standard library only:
out/'s runtime imports it."""

from __future__ import annotations

import os
from pathlib import Path

from leanvm.arch import FACTS
from leanvm.errors import LeanvmError
from leanvm.proc import run

PROC = Path("/proc")
ACCELS = ("auto", "kvm", "hvf", "tcg")


def alive(pid: int | None) -> bool:
    """True if process pid runs: a zombie (killed, not yet reaped) does not count."""
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    try:
        stat = (PROC / str(pid) / "stat").read_text()
    except FileNotFoundError:
        return PROC.is_dir() is False  # no /proc (macOS): kill 0 is all there is
    except OSError:
        return True
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"


def read_pid(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def qemu_pid(pidfile: Path) -> int | None:
    """The pid in a VM's QEMU pid file if that process runs and is the QEMU that wrote it:
    its command line names this very pid file (-pidfile). A QEMU killed with SIGKILL, or a
    host that lost power, leaves the file behind, and by then its pid may be anything's."""
    pid = read_pid(pidfile)
    if pid is None or not alive(pid):
        return None
    try:
        words = (PROC / str(pid) / "cmdline").read_bytes().split(b"\0")
    except FileNotFoundError:
        return None
    except OSError:
        return pid
    return pid if os.fsencode(str(pidfile)) in words else None


def port_in_use(port: int) -> bool:
    """True if something on this host listens on TCP port `port` (any address). A socket only
    bound, never listening, does not count (QEMU then fails to forward it, in one line)."""
    wanted = f":{port:04X}"
    for table in ("tcp", "tcp6"):
        try:
            lines = (PROC / "net" / table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) > 3 and fields[3] == "0A" and fields[1].endswith(wanted):
                return True
    return False


def host_arch() -> str:
    """This host's architecture in leanvm's names (amd64, arm64), or the machine's own name."""
    machine = os.uname().machine
    for arch, facts in FACTS.items():
        if machine in (facts.cpu_name, arch.value):
            return arch.value
    return machine


def resolve_accel(chosen: str, arch: str | None = None) -> str | None:
    """The accelerator for LEANVM_ACCEL `chosen` and a guest of `arch` (default: this host's):
    auto is KVM on Linux when /dev/kvm is usable, HVF on macOS when the kernel offers it, TCG
    otherwise (and always for a guest of another arch). None for a value that is no accelerator."""
    if chosen not in ACCELS:
        return None
    if chosen != "auto":
        return chosen
    if (arch or host_arch()) != host_arch():
        return "tcg"
    if os.uname().sysname == "Darwin":
        return "hvf" if _sysctl("kern.hv_support") == "1" else "tcg"
    kvm = "/dev/kvm"
    return "kvm" if os.path.exists(kvm) and os.access(kvm, os.R_OK | os.W_OK) else "tcg"


def chosen_accel(arch: str | None = None) -> str:
    """LEANVM_ACCEL's accelerator for a guest of `arch` (resolve_accel), or one line for a value
    that is no accelerator."""
    accel = resolve_accel(os.environ.get("LEANVM_ACCEL") or "auto", arch)
    if accel is None:
        raise LeanvmError(f"LEANVM_ACCEL must be auto, kvm, hvf or tcg, not '{os.environ.get('LEANVM_ACCEL', '')}'")
    return accel


def _sysctl(name: str) -> str:
    try:
        return run(["sysctl", "-n", name], check=False, timeout=10).stdout.decode().strip()
    except LeanvmError:
        return ""


def cpu_model() -> str:
    """This host's CPU model (what -cpu host hands a KVM guest)."""
    try:
        for line in (PROC / "cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def pss_mib(pid: int) -> str:
    """The host memory of process pid as PSS (a page shared by N processes counts 1/N), or -."""
    try:
        for line in (PROC / str(pid) / "smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return f"{int(line.split()[1]) // 1024} MiB"
    except (OSError, ValueError):
        pass
    return "-"
