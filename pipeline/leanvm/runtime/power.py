"""Powering VMs off: the one loop that presses the power button (cluster.sh down and
`leanvm libvirt stop`), and how long a guest gets before its QEMU is stopped."""

from __future__ import annotations

import os
import time
from collections.abc import Callable

from leanvm.errors import LeanvmError

DEFAULT_STOP_TIMEOUT = 60
BUTTON_EVERY = 5.0  # a guest that is still booting watches the power button only once booted
LOOK_EVERY = 0.2  # how often the loop looks whether the VMs are off: it returns soon after the last


def power_off(running: Callable[[], list[str]], press: Callable[[list[str], int], None], timeout: float) -> list[str]:
    """Press the power button of the VMs that `running` lists, every 5 s (press(names, count),
    count being 1 for the first press), until none is left or `timeout` seconds have passed;
    the VMs still running then."""
    started, presses, next_press = time.monotonic(), 0, 0.0
    while True:
        names = running()
        elapsed = time.monotonic() - started
        if not names or elapsed >= timeout:
            return names
        if elapsed >= next_press:
            presses += 1
            press(names, presses)
            next_press = elapsed + BUTTON_EVERY
        time.sleep(LOOK_EVERY)


def stop_timeout() -> int:
    """LEANVM_STOP_TIMEOUT (seconds, default 60), or one line for anything else."""
    given = os.environ.get("LEANVM_STOP_TIMEOUT", "")
    if not given:
        return DEFAULT_STOP_TIMEOUT
    if not given.isdigit():
        raise LeanvmError(f"LEANVM_STOP_TIMEOUT must be a number of seconds, not '{given}'; nothing was stopped")
    return int(given)
