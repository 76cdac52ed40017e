"""The one user-error type and the one place that writes leanvm's lines on stderr.

A user error is one line plus how to fix it, never a traceback; `report` writes it and gives
the exit status (2) every entry point returns. Warnings and notes go through `warn`/`note`.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports Ctrl-C

def command() -> str:
    """The command that runs leanvm's tasks, as the user typed it, for hints ("run `doit
    reset:core1`" or "run `leanvm reset:core1`"): the program running, if it is `leanvm`."""
    return "leanvm" if Path(sys.argv[0]).name == "leanvm" else "doit"


def tool(args: str) -> str:
    """`args` as a command line of the command in use, e.g. tool("prune") -> "`doit prune`"."""
    return f"`{command()} {args}`"


class LeanvmError(Exception):
    """A mistake the user can fix (bad config, bad signature, missing tool, ...)."""

    def __init__(self, message: str, hint: str = "") -> None:
        self.message = message
        self.hint = hint
        super().__init__(str(self))

    def __str__(self) -> str:
        return f"{self.message}; {self.hint}" if self.hint else self.message


def report(error: LeanvmError | str) -> int:
    """Write `leanvm: error: ...` (one line) and return the exit status for it."""
    sys.stderr.write(f"leanvm: error: {error}\n")
    return EXIT_USER_ERROR


def interrupted() -> int:
    """Ctrl-C: one line, the shell's exit status for SIGINT (temp files were removed on the way out)."""
    sys.stderr.write("leanvm: interrupted\n")
    return EXIT_INTERRUPTED


def warn(message: str) -> None:
    sys.stderr.write(f"leanvm: warning: {message}\n")


def note(message: str) -> None:
    sys.stderr.write(f"leanvm: {message}\n")


def debug(message: str) -> None:
    """Only with LEANVM_DEBUG set (e.g. every external command line)."""
    if os.environ.get("LEANVM_DEBUG"):
        sys.stderr.write(f"leanvm: debug: {message}\n")
