"""ssh into a VM of an out/ with the cluster key (out/ssh/id_ed25519), as LEANVM_SSH_USER
(default core). Host keys are kept in out/ssh/known_hosts under the alias leanvm-NAME. ssh
runs in out/ssh and is given both files by their plain names: ssh splits
UserKnownHostsFile at spaces and expands % and ~ in both, so an out/ path holding a space, a
quote or a % would otherwise send host keys elsewhere."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

from leanvm.errors import LeanvmError
from leanvm.proc import run
from leanvm.state.layout import Names


def ssh_argv(port: str, name: str, command: list[str]) -> list[str]:
    """ssh's argv, to run in out/ssh."""
    user = os.environ.get("LEANVM_SSH_USER") or "core"
    return ["ssh", "-i", f"./{Names.SSH_KEY}", "-p", port, "-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes",
            "-o", "LogLevel=ERROR", "-o", f"UserKnownHostsFile=./{Names.SSH_KNOWN_HOSTS}",
            "-o", "StrictHostKeyChecking=accept-new", "-o", f"HostKeyAlias=leanvm-{name}",
            "-o", "HashKnownHosts=no", "-o", "ConnectTimeout=10", f"{user}@127.0.0.1", *command]


def answers(out: Path, port: str, name: str, command: list[str], timeout: float = 30) -> bool:
    """True if `command` ran on the VM over ssh and succeeded."""
    try:
        result = run(ssh_argv(port, name, command), cwd=out / Names.OUT_SSH, check=False, timeout=timeout)
    except LeanvmError:
        return False
    return result.returncode == 0


def set_clock(out: Path, port: str, name: str, tries: int, still_running: Callable[[], bool] | None = None) -> bool:
    """Set the VM's clock to this host's over ssh (sudo date), trying once a second; a paused or
    restored guest lives in the past. False if it could not within `tries` tries."""
    for attempt in range(tries):
        if answers(out, port, name, ["sudo", "date", "-u", "-s", f"@{int(time.time())}"]):
            return True
        if still_running is not None and not still_running():
            return False
        if attempt + 1 < tries:
            time.sleep(1)
    return False
