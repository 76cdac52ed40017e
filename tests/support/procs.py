"""Running processes the way leanvm does: every timed call stops its whole session."""

import os
import subprocess
from collections.abc import Callable
from pathlib import Path

from leanvm.proc import stop_session

PROJECT = Path(__file__).resolve().parent.parent.parent


def sh(*argv: str | Path, cwd: Path | None = None, input: bytes | None = None) -> bytes:
    return subprocess.run([str(a) for a in argv], cwd=cwd, input=input, check=True, capture_output=True).stdout


def run(args: list, *, timeout: float, input: bytes | str | None = None, capture_output: bool = False,
        check: bool = False, **popen: object) -> subprocess.CompletedProcess:
    """subprocess.run in a session of its own: a timeout stops the whole session (a run.sh and
    its QEMU, a cluster.sh and its ssh probes), not only the direct child."""
    if capture_output:
        popen.update(stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    if input is not None:
        popen["stdin"] = subprocess.PIPE
    with subprocess.Popen([str(a) for a in args], start_new_session=True, **popen) as proc:
        try:
            stdout, stderr = proc.communicate(input, timeout=timeout)
        except subprocess.TimeoutExpired:
            stop_session(proc)
            raise
    result = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
    if check:
        result.check_returncode()
    return result


def start(args: list, **popen: object) -> subprocess.Popen:
    """subprocess.Popen in a session of its own; end it with finish() (or stop_session)."""
    return subprocess.Popen([str(a) for a in args], start_new_session=True, **popen)


def finish(proc: subprocess.Popen, input: bytes | None = None, timeout: float = 60) -> tuple:
    """communicate() with a started process; if it does not end in time, its whole session
    is stopped and the timeout raised."""
    try:
        return proc.communicate(input, timeout=timeout)
    except subprocess.TimeoutExpired:
        stop_session(proc)
        raise


# --- GPG ---------------------------------------------------------------------------


def processes(match: Callable[[bytes], bool]) -> list[int]:
    """Pids of the processes whose command line (NUL-separated bytes) matches."""
    pids = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            cmdline = (proc / "cmdline").read_bytes()
        except OSError:
            continue
        if match(cmdline):
            pids.append(int(proc.name))
    return pids


def stand_in_qemu(vm_dir: Path, seconds: int = 60) -> subprocess.Popen:
    """A process that counts as VM vm_dir's running QEMU for leanvm's checks, without booting
    one: its command line names the VM's pid file (as QEMU's `-pidfile` does) and its pid is
    in that file. End it with .kill() and .wait()."""
    pidfile = vm_dir.resolve() / "qemu.pid"
    proc = subprocess.Popen(["sh", "-c", f"sleep {seconds}", "stand-in-qemu", "-pidfile", str(pidfile)])
    pidfile.write_text(f"{proc.pid}\n")
    return proc


def slow_mkfs(work: Path) -> tuple[dict, Path]:
    """An environment whose mkfs.ext4 waits a minute before it runs (a wrapper first on PATH),
    and the file that appears once it has started."""
    wrappers = work / "bin"
    wrappers.mkdir()
    marker = work / "mkfs-started"
    slow = wrappers / "mkfs.ext4"
    slow.write_text(f'#!/bin/sh\ntouch "{marker}"\nsleep 60\nexec /usr/sbin/mkfs.ext4 "$@"\n')
    slow.chmod(0o755)
    return {"PATH": f"{wrappers}:{os.environ['PATH']}"}, marker
