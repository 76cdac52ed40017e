"""How leanvm runs inside doit: the command in use, the out/ lock, one-line user errors."""

import fcntl
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

from doit import get_initial_workdir, get_var
from doit.exceptions import TaskFailed
from doit.reporter import ConsoleReporter

from .errors import LeanvmError

PROJECT = Path(__file__).resolve().parent.parent
# doit commands that never touch the network, and those that do not even write to out/.
OFFLINE_COMMANDS = {"list", "info", "clean", "forget", "ignore", "dumpdb", "help", "tabcompletion", "reset-dep"}
READ_ONLY_COMMANDS = {"list", "info", "dumpdb", "help", "tabcompletion"}


class UserFailed(TaskFailed):
    """A task failed because of something the user can fix: report one line, no traceback."""


class Reporter(ConsoleReporter):
    def add_failure(self, task: Any, failure: Any) -> None:
        if isinstance(failure, UserFailed):
            sys.stderr.write(f"leanvm: error: {task.name}: {failure.message}\n")
        else:
            super().add_failure(task, failure)


def _guarded(step: Callable[..., None], *args: Any) -> UserFailed | None:
    try:
        step(*args)
    except LeanvmError as e:
        return UserFailed(str(e))
    return None


def action(step: Callable[..., None], *args: Any) -> tuple:
    return (_guarded, [step, *args])


def var_path(name: str, default: Path) -> Path:
    value = get_var(name, None)
    return default if value is None else Path(get_initial_workdir(), value).resolve()


def out_dir() -> Path:
    return var_path("out", PROJECT / "out")


def fail(error: LeanvmError) -> NoReturn:
    sys.stderr.write(f"leanvm: error: {error}\n")
    sys.exit(2)


_lock_fd: int | None = None


def lock_out(out: Path) -> None:
    """Hold an exclusive lock on out/ for this process's life; a second run refuses at once.

    flock is released by the kernel when its holder dies, so a stale lock file left by a
    killed run is simply taken over.
    """
    global _lock_fd
    fd = os.open(out / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        fail(LeanvmError(f"{out} is in use by another doit run (pid {holder})", "wait for it to finish or stop it"))
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    _lock_fd = fd


def doit_config(default_tasks: list[str]) -> dict:
    out = out_dir()
    out.mkdir(parents=True, exist_ok=True)
    if _command(sys.argv[1:]) not in READ_ONLY_COMMANDS:
        lock_out(out)
    return {
        "default_tasks": default_tasks,
        "check_file_uptodate": "timestamp",  # never re-hash big images on a no-op run
        "dep_file": str(out / ".doit.db"),
        "backend": "sqlite3",
        "reporter": Reporter,
    }


def _command(argv: list[str]) -> str:
    """The doit command, found as doit finds it: after loader options, ignoring VAR=VALUE."""
    words = [a for a in argv if "=" not in a or a.startswith("-")]
    while words and words[0] in ("-f", "--file", "-d", "--dir", "-k", "--seek-file"):
        words = words[1:] if words[0] in ("-k", "--seek-file") else words[2:]
    while words and words[0].startswith(("--file=", "--dir=")):
        words = words[1:]
    return words[0] if words else "run"


def building() -> bool:
    return _command(sys.argv[1:]) not in OFFLINE_COMMANDS
