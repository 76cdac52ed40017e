"""How leanvm runs inside doit: the command in use, the out/ lock, one-line user errors."""

import fcntl
import os
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

from doit import get_initial_workdir, get_var
from doit.exceptions import TaskFailed
from doit.reporter import ConsoleReporter

from leanvm.errors import LeanvmError, interrupted, report, tool
from leanvm.resources import DEFAULT_CLUSTER
from leanvm.state.layout import Layout
from leanvm.state.vmstate import running_pid

# doit commands that never touch the network, and those that do not even write to out/.
OFFLINE_COMMANDS = {"list", "info", "clean", "forget", "ignore", "dumpdb", "help", "tabcompletion", "reset-dep"}
READ_ONLY_COMMANDS = {"list", "info", "dumpdb", "help", "tabcompletion"}


class UserFailed(TaskFailed):
    """A task failed because of something the user can fix: report one line, no traceback."""


class Reporter(ConsoleReporter):
    def add_failure(self, task: Any, failure: Any) -> None:
        if isinstance(failure, UserFailed):
            report(f"{task.name}: {failure.message}")
        else:
            super().add_failure(task, failure)


def _guarded(step: Callable[..., None], *args: Any) -> UserFailed | None:
    try:
        step(*args)
    except LeanvmError as e:
        return UserFailed(str(e))
    return None


def action(step: Callable[..., None], *args: Any) -> tuple[Any, ...]:
    return (_guarded, [step, *args])


def var_path(name: str, default: Path) -> Path:
    value = get_var(name, None)
    if value is None:
        return default
    if not value.strip():  # `out=` would mean the current directory: never what was meant
        fail(LeanvmError(f"{name}= is empty", f"give a path ({name}=DIR), or leave {name}= out for {default}"))
    # doit's dodo loader records the directory it started in; the `leanvm` command's loader does not
    return Path(get_initial_workdir() or os.getcwd(), value).resolve()


@dataclass
class DoitRun:
    """What leanvm's doit glue knows of this doit run, in one place."""

    loader_in_use: bool = False  # set by leanvm's loaders (leanvm.dag.loader) before they load dodo.py
    # config= and out= when the command line gives none: set by the entry point (dodo.py: the
    # checkout's configs/cluster.yaml and out/; the `leanvm` command always passes both)
    default_config: Path | None = None
    default_out: Path | None = None
    command: str = "run"  # the doit command of this run
    words: tuple[str, ...] = ()  # and its positional arguments (the task names given)
    lock_fd: int | None = None  # out/.lock, held for the run's life


RUN = DoitRun()


def set_defaults(config: Path, out: Path) -> None:
    RUN.default_config, RUN.default_out = config, out


def config_file() -> Path:
    return var_path("config", RUN.default_config or DEFAULT_CLUSTER)


def out_dir() -> Path:
    return var_path("out", RUN.default_out or Path.cwd() / "out")


def fail(error: LeanvmError) -> NoReturn:
    sys.exit(report(error))


def lock_out(out: Path) -> None:
    """Hold an exclusive lock on out/ for this process's life; a second run refuses at once.

    flock is released by the kernel when its holder dies, so a stale lock file left by a
    killed run is simply taken over.
    """
    fd = os.open(Layout(out).lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        fail(LeanvmError(f"{out} is in use by another {tool('run')} (pid {holder})", "wait for it to end or stop it"))
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    RUN.lock_fd = fd


def running_vms(out: Path) -> list[str]:
    """'NAME (pid N)' for every VM of out/ whose QEMU runs."""
    found = ((vm.name, running_pid(vm)) for vm in sorted(Layout(out).vms.glob("*")))
    return [f"{name} (pid {pid})" for name, pid in found if pid is not None]


def refuse_while_running(out: Path, doing: str) -> None:
    running = running_vms(out)
    if running:
        raise LeanvmError(f"cannot {doing} while VMs of {out} run: {', '.join(running)}",
                          f"stop them first ({out / 'cluster.sh'} down)")


def _interrupted(signum: int, frame: Any) -> NoReturn:
    """Ctrl-C: unwind (every temp file is removed in a `finally` on the way), one line, 130."""
    raise SystemExit(interrupted())


def begin(command: str, words: list[str]) -> None:
    """Called by the loader once doit knows the command: refuse what would break VMs, then
    hold out/'s lock unless the command only reads."""
    signal.signal(signal.SIGINT, _interrupted)
    RUN.command, RUN.words = command, tuple(words)
    out = out_dir()
    try:
        check_command(command, words, out)
    except LeanvmError as e:
        fail(e)
    if writing():
        lock_out(out)


def check_command(command: str, words: list[str], out: Path) -> None:
    """Commands that would break VMs are refused before doit does anything."""
    if "reset" in words:
        raise LeanvmError("`reset` alone would recreate every VM's disks",
                          f"name the VM whose disks to recreate: {tool('reset:NAME')}")
    if command in ("clean", "forget"):
        refuse_while_running(out, tool(command))


def check_info_names(command: str, words: list[str], names: set[str]) -> None:
    """`doit info NOSUCH` would end in a KeyError traceback inside doit: one line instead."""
    if command == "info" and words and words[0] not in names:
        fail(LeanvmError(f"no task named {words[0]!r}", f"see the task names with {tool('list --all')}"))


def doit_config(default_tasks: list[str]) -> dict[str, Any]:
    """doit's settings; out/ must exist before doit opens its database there."""
    out = out_dir()
    out.mkdir(parents=True, exist_ok=True)
    return {
        "default_tasks": default_tasks,
        "check_file_uptodate": "timestamp",  # never re-hash big images on a no-op run
        "dep_file": str(Layout(out).doit_db),
        "backend": "leanvm",  # doit's sqlite3 with one-line errors (leanvm.dag.doitdb)
        "reporter": Reporter,
    }


def command_words() -> list[str]:
    """The words of this command line that may name tasks."""
    return list(RUN.words)


def building() -> bool:
    return RUN.command not in OFFLINE_COMMANDS


def writing() -> bool:
    """True unless the command only reads (list, info, ...)."""
    return RUN.command not in READ_ONLY_COMMANDS
