"""Starting, watching and stopping the bench's VMs: what sections 6-9 share."""

import os
import time
from pathlib import Path

from support import run


def accel_env(**extra: str) -> dict[str, str]:
    """The environment for run.sh and cluster.sh: TCG unless the caller chose (KVM hangs here)."""
    return {**os.environ, "LEANVM_ACCEL": os.environ.get("LEANVM_ACCEL", "tcg"), **extra}


def cluster_sh(out: Path, *args: str, **env: str) -> str:
    """out/cluster.sh ARGS; what it printed."""
    return run([out / "cluster.sh", *args], check=True, capture_output=True, text=True, timeout=600,
               env=accel_env(**env)).stdout


def down(out: Path) -> None:
    cluster_sh(out, "down", LEANVM_STOP_TIMEOUT="60")


def wait_console(out: Path, text: str, names: list[str] | None = None, timeout: float = 600) -> None:
    """Wait until the console of every VM (or of `names`) shows `text`; a kernel panic fails at once."""
    deadline = time.monotonic() + timeout
    logs = [out / "vms" / n / "console.log" for n in names] if names else sorted(out.glob("vms/*/console.log"))
    for log in logs:
        while text not in (console := log.read_text(errors="replace") if log.exists() else ""):
            if "Kernel panic" in console:
                raise RuntimeError(f"{log}: the guest's kernel panicked")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{log}: no {text!r} within {timeout} s")
            time.sleep(0.2)


def pids(out: Path) -> list[int]:
    """The QEMU pids of out/'s running VMs, in VM name order."""
    return [int(p.read_text()) for p in sorted(out.glob("vms/*/qemu.pid"))]


def qemu_rss(out: Path) -> int:
    """Total resident memory of the QEMUs of out/'s VMs."""
    total = 0
    for pid in pids(out):
        status = Path(f"/proc/{pid}/status").read_text()
        total += int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS:"))) * 1024
    return total
