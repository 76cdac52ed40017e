"""Starting, watching and stopping the bench's VMs (sections 6-10), on the tests' own helpers
(tests/support: running a command, waiting for console text, a process's memory)."""

import os
import time
from pathlib import Path

import support
from support import process_memory, wait_for_text


def accel_env(**extra: str) -> dict[str, str]:
    """The environment for run.sh and cluster.sh: TCG unless the caller chose (KVM hangs here)."""
    return {**os.environ, "LEANVM_ACCEL": os.environ.get("LEANVM_ACCEL", "tcg"), **extra}


def cluster_sh(out: Path, *args: str, **env: str) -> str:
    """out/cluster.sh ARGS (the tests' helper) in the bench's environment; what it printed."""
    result = support.cluster_sh(out, *args, env=accel_env(**env), timeout=600)
    if result.returncode != 0:
        raise RuntimeError(f"cluster.sh {' '.join(args)} failed: {result.stderr.strip()}")
    return result.stdout


def down(out: Path) -> None:
    cluster_sh(out, "down", LEANVM_STOP_TIMEOUT="60")


def wait_console(out: Path, text: str, names: list[str] | None = None, timeout: float = 600) -> None:
    """Wait until the console of every VM (or of `names`) shows `text`; a kernel panic fails at once."""
    deadline = time.monotonic() + timeout
    logs = [out / "vms" / n / "console.log" for n in names] if names else sorted(out.glob("vms/*/console.log"))
    for log in logs:
        wait_for_text(log, text, timeout=max(deadline - time.monotonic(), 1))


def pids(out: Path) -> list[int]:
    """The QEMU pids of out/'s running VMs, in VM name order."""
    return [int(p.read_text()) for p in sorted(out.glob("vms/*/qemu.pid"))]


def qemu_rss(out: Path) -> int:
    """Total resident memory of the QEMUs of out/'s VMs."""
    return sum(process_memory(pid, "Rss") for pid in pids(out))
