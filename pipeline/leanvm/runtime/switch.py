"""The private cluster network: a rootless VDE switch in out/net shared by the VMs of an out/.

Starting and stopping it happen under one lock (out/net/lock). Every VM that uses it has an
entry in out/net/users/ (the pid of its launcher); the last one to leave stops it.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import signal
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

from leanvm.errors import LeanvmError
from leanvm.host import alive, qemu_pid, read_pid
from leanvm.proc import run
from leanvm.state.layout import Names

# vde_switch names its control socket by its absolute path, and a unix socket's path holds at
# most 107 bytes: under a longer out/net, out/net/switch links to a short directory in TMPDIR
LONG_NET_PATH = 90


@contextlib.contextmanager
def locked(net: Path) -> Iterator[None]:
    """out/net/lock held (by this process, never inherited by what it starts)."""
    (net / Names.NET_USERS).mkdir(parents=True, exist_ok=True)
    fd = os.open(net / Names.NET_LOCK, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def short_dir(net: Path) -> Path:
    """The short directory for the switch of out/net `net` (its path's checksum in its name)."""
    tmp = os.environ.get("TMPDIR") or "/tmp"
    return Path(tmp, f"leanvm-switch-{os.getuid()}-{zlib.crc32(os.fsencode(net))}")


def switch_alive(net: Path) -> bool:
    return alive(read_pid(net / Names.NET_SWITCH_PID)) and (net / Names.NET_SWITCH / "ctl").is_socket()


def stop(net: Path) -> None:
    """Stop the switch of out/net `net` and clear what it left; the caller holds the lock."""
    pid = read_pid(net / Names.NET_SWITCH_PID)
    if alive(pid) and pid:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 5
        while alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
    switch = net / Names.NET_SWITCH
    if switch.is_symlink():
        shutil.rmtree(short_dir(net), ignore_errors=True)
        switch.unlink()
    shutil.rmtree(switch, ignore_errors=True)
    (net / Names.NET_SWITCH_PID).unlink(missing_ok=True)


def join(net: Path, name: str) -> None:
    """VM `name` uses the switch: started if none runs. The caller holds the lock."""
    (net / Names.NET_USERS / name).write_text(f"{os.getpid()}\n")
    start(net)


def start(net: Path) -> None:
    """The switch started if none runs. The caller holds the lock."""
    if switch_alive(net):
        return
    stop(net)  # whatever a dead or half-started switch left behind
    if len(os.fsencode(net)) > LONG_NET_PATH:
        short = short_dir(net)
        shutil.rmtree(short, ignore_errors=True)  # (one a killed switch left; another user's stays)
        try:
            short.mkdir(mode=0o700)
            (net / Names.NET_SWITCH).symlink_to(short)
        except OSError:
            raise LeanvmError(f"cannot make the cluster switch's directory {short} (TMPDIR)") from None
    run(["vde_switch", "--sock", Names.NET_SWITCH, "--pidfile", net / Names.NET_SWITCH_PID, "--daemon"],
        cwd=net, check=False, capture=False, timeout=30)
    deadline = time.monotonic() + 5
    while not switch_alive(net):
        if time.monotonic() > deadline:
            raise LeanvmError(f"cannot start the cluster network switch in {net} (vde_switch)")
        time.sleep(0.05)


def user_alive(net: Path, name: str) -> bool:
    """True if VM `name` (an entry in users/) still runs or is still starting."""
    vm_pidfile = net.parent / Names.OUT_VMS / name / Names.VM_QEMU_PID
    return alive(read_pid(net / Names.NET_USERS / name)) or qemu_pid(vm_pidfile) is not None


def leave(net: Path, name: str) -> None:
    """VM `name` no longer uses the switch; it stops once no VM does. The caller holds the lock."""
    (net / Names.NET_USERS / name).unlink(missing_ok=True)
    stop_if_unused(net)


def stop_if_unused(net: Path) -> None:
    """The switch stops once no VM uses it (dead users' entries go). The caller holds the lock."""
    users = net / Names.NET_USERS
    for entry in sorted(users.iterdir()) if users.is_dir() else []:
        if user_alive(net, entry.name):
            return
        entry.unlink(missing_ok=True)
    stop(net)
