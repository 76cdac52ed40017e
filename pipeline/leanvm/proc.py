"""The one helper through which every external command runs (as mkosi/run.py does)."""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

from leanvm.errors import LeanvmError, debug

# Debian package that provides each external command we call.
PACKAGES = {
    "gpg": "gnupg",
    "gpgconf": "gnupg",
    "ssh-keygen": "openssh-client",
    "setcap": "libcap2-bin",
    "mkfs.ext4": "e2fsprogs",
    "e2fsck": "e2fsprogs",
    "resize2fs": "e2fsprogs",
    "chattr": "e2fsprogs",
    "debugfs": "e2fsprogs",
    "sfdisk": "fdisk",
    "mksquashfs": "squashfs-tools",
    "cpio": "cpio",
    "qemu-system-x86_64": "qemu-system-x86",
    "apt-get": "apt",
    "apt-cache": "apt",
    "depmod": "kmod",
    "dpkg-deb": "dpkg",
    "ignition-validate": "ignition",
    "virsh": "libvirt-clients",
    "b3sum": "b3sum",
    "vde_switch": "vde2",
    "ssh": "openssh-client",
}
# Every program gets a deadline: one that has none of its own gets this one (an hour: the
# longest job, a copy of a large disk, fits in it), and a program past it is stopped whole.
DEADLINE = 3600.0


class Timeout(LeanvmError):
    """A program did not finish within its deadline (it was stopped, with what it started)."""


def run(
    argv: Sequence[str | Path],
    *,
    check: bool = True,
    input: bytes | None = None,
    cwd: Path | None = None,
    capture: bool = True,
    timeout: float = DEADLINE,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[bytes]:
    """Run argv (output captured unless `capture` is False); a missing binary, a failure or a
    timeout becomes a LeanvmError (Timeout). The command runs in a session of its own, which
    the timeout, or an interruption of ours, stops whole (stop_session)."""
    args = [str(a) for a in argv]
    debug(f"+ {shlex.join(args)}")
    pipe = subprocess.PIPE if capture else None
    try:
        proc = subprocess.Popen(
            args, stdin=subprocess.DEVNULL if input is None else subprocess.PIPE, stdout=pipe, stderr=pipe,
            cwd=cwd, env=env, start_new_session=True,
        )
    except FileNotFoundError:
        package = PACKAGES.get(args[0], args[0])
        raise LeanvmError(f"{args[0]}: command not found", f"install it: apt-get install {package}") from None
    with proc:
        try:
            stdout, stderr = proc.communicate(input, timeout=timeout)
        except subprocess.TimeoutExpired:
            stop_session(proc)
            raise Timeout(f"{shlex.join(args)} did not finish within {timeout:.0f} s") from None
        except BaseException:  # Ctrl-C (leanvm's SIGINT handler exits): never wait for a command that goes on
            stop_session(proc, grace=2)
            raise
    result = subprocess.CompletedProcess(args, proc.returncode, stdout, stderr)
    if check and result.returncode != 0:
        lines = (result.stderr or b"").decode(errors="replace").strip().splitlines()
        detail = lines[-1] if lines else "no error output"
        raise LeanvmError(f"{shlex.join(args)} failed with exit code {result.returncode}: {detail}")
    return result


def stop_session(proc: subprocess.Popen[bytes], grace: float = 15) -> None:
    """SIGTERM to every process of proc's session (a run.sh passes it on to its QEMU and
    clears up), then SIGKILL to whatever of it is still there after `grace` seconds."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while session_alive(proc) and time.monotonic() < deadline:
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def session_alive(proc: subprocess.Popen[bytes]) -> bool:
    """True while a process of proc's process group runs (zombies do not count)."""
    proc.poll()  # reap the leader itself
    proc_dir = Path("/proc")
    if not proc_dir.is_dir():  # not Linux: ask the kernel, zombies included
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            return False
        return True
    for stat in proc_dir.glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if fields[0] != "Z" and int(fields[2]) == proc.pid:
                return True
    return False


def stop_gpg_agent(home: Path | str) -> None:
    """Stop the gpg-agent that gpg started for a GNUPGHOME of ours (it outlives gpg)."""
    run(["gpgconf", "--homedir", home, "--kill", "gpg-agent"], check=False)
