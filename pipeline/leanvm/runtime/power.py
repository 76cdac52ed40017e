"""Powering VMs off: how long a guest gets before its QEMU is stopped."""

from __future__ import annotations

import os

from leanvm.errors import LeanvmError

DEFAULT_STOP_TIMEOUT = 60


def stop_timeout() -> int:
    """LEANVM_STOP_TIMEOUT (seconds, default 60), or one line for anything else."""
    given = os.environ.get("LEANVM_STOP_TIMEOUT", "")
    if not given:
        return DEFAULT_STOP_TIMEOUT
    if not given.isdigit():
        raise LeanvmError(f"LEANVM_STOP_TIMEOUT must be a number of seconds, not '{given}'; nothing was stopped")
    return int(given)
