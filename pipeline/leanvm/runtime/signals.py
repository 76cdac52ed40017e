"""The signals that stop a runtime verb (SIGHUP, SIGINT, SIGTERM: a closed terminal, Ctrl-C,
a CI runner's stop), their exit statuses as a shell gives them, and a handler that turns one
into an exception where the verb is still free to end at once."""

from __future__ import annotations

import signal
from collections.abc import Callable

STOPPING = {signal.SIGHUP: 129, signal.SIGINT: 130, signal.SIGTERM: 143}


class Interrupted(Exception):
    """A signal: the exit status it gives."""

    def __init__(self, status: int) -> None:
        super().__init__(status)
        self.status = status


def raise_interrupted(signum: int, _frame: object) -> None:
    raise Interrupted(STOPPING[signal.Signals(signum)])


def handle(handler: Callable[[int, object], None] | int) -> None:
    """Each stopping signal to `handler` (a function, or signal.SIG_IGN / SIG_DFL)."""
    for sig in STOPPING:
        signal.signal(sig, handler)
