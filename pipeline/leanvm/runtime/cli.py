"""The runtime's verbs, as cluster.sh hands them over: `monitor OUT NAME [COMMAND]`.

Errors are one line on stderr, `cluster.sh monitor: ...`, and exit status 1."""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from pathlib import Path

from leanvm.runtime.qmp import QMP, QMPError
from leanvm.state.layout import Names

QMP_TIMEOUT = 10.0  # seconds for a monitor command's answer
USAGE = "usage: cluster.sh monitor NAME [COMMAND]  (such as 'info status'; none: one command a line from stdin)"


class Refusal(Exception):
    """A one-line refusal: the user's command cannot be done as given."""


def monitor(out: Path, name: str, commands: Iterable[str]) -> None:
    """Each monitor (HMP) command through VM name's QMP socket, its answer printed."""
    vm_dir = out / Names.OUT_VMS / name
    if not (vm_dir / Names.VM_RUN_SH).is_file():
        raise Refusal(f"no VM named '{name}' in {out / Names.OUT_VMS}")
    try:
        qmp = QMP(vm_dir / Names.VM_QMP, QMP_TIMEOUT)
    except (FileNotFoundError, ConnectionRefusedError):
        raise Refusal(f"VM {name} is not running: start it with {out / 'cluster.sh'} up {name}") from None
    with qmp:
        for command in commands:
            print(qmp.hmp(command).replace("\r\n", "\n"), end="", flush=True)  # HMP ends lines with CR LF


def stdin_commands() -> Iterator[str]:
    if sys.stdin.isatty():
        print("one monitor command a line (info status, info block, ...); Ctrl-d ends", file=sys.stderr)
    for line in sys.stdin:
        if line.strip():
            yield line.strip()


def main(argv: list[str]) -> int:
    if len(argv) < 3 or argv[0] != "monitor":
        print(f"cluster.sh monitor: {USAGE}", file=sys.stderr)
        return 2
    out, name, given = Path(argv[1]), argv[2], argv[3:]
    try:
        monitor(out, name, [" ".join(given)] if given else stdin_commands())
    except (Refusal, QMPError) as e:
        print(f"cluster.sh monitor: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0
