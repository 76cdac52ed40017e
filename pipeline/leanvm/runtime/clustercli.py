"""out/cluster.sh COMMAND: its words read, each VM named checked, the verb run. Errors are one
line, `cluster.sh: ...`, and exit status 1."""

from __future__ import annotations

import sys
from pathlib import Path

from leanvm.errors import LeanvmError
from leanvm.host import chosen_accel
from leanvm.runtime import verbs
from leanvm.runtime.cluster import Cluster
from leanvm.runtime.restore import Restore, named_once
from leanvm.runtime.snapshot import Snapshot

USAGE = """\
Usage: {me} COMMAND
  up [--wait [SECONDS]] [NAME...]
                         start every VM (or those named) detached (console in
                         vms/NAME/console.log); with --wait, return once their sshd answers
                         (default 300 s)
  down [NAME...]         power every VM (or those named) off (ACPI button, pressed every 5 s),
                         then stop QEMU after LEANVM_STOP_TIMEOUT seconds (60)
  status                 which VMs run (here or under libvirt), their pids and ssh ports
  console NAME           follow a detached VM's serial console (Ctrl-c stops following)
  snapshot [--stop] [NAME...] SNAP
                         save every running VM (or those named) into snapshots/SNAP: memory,
                         devices and disks at one paused instant, then resume them (or stop
                         them, with --stop) and set their clocks over ssh
  restore [--wait [SECONDS]] [NAME...] SNAP
                         bring the VMs of snapshots/SNAP (or those named) back running as
                         they were saved; with --wait, return once their sshd answers and
                         their clocks are set
  ssh NAME [-- CMD...]   ssh into a VM as LEANVM_SSH_USER (default core) with the cluster key
                         (ssh/id_ed25519); the remote command's exit status is passed through
  monitor NAME [COMMAND] send a QEMU monitor command ('info status', 'info block', ...) to a
                         running VM through its QMP socket and print the answer; without
                         COMMAND, one command a line from stdin
  help                   this text
cluster.sh runs out/leanvm-runtime.pyz with python3 (or LEANVM_PYTHON).
LEANVM_ACCEL and LEANVM_APPEND are passed on to each run.sh."""


def parse_wait(cluster: Cluster, command: str, args: list[str]) -> tuple[int | None, list[str]]:
    """--wait [SECONDS] at the start of args: the seconds (300 without a number), the rest."""
    if not args or args[0] != "--wait":
        return None, args
    given = args[1] if len(args) > 1 else ""
    if not given or given.startswith("-"):
        return 300, args[1:]
    if not given.isdigit():  # a VM name (they start with a letter), or a mistyped number
        if given[0].isdigit():
            raise LeanvmError(f"{command} --wait takes a whole number of seconds, not '{given}'")
        if not cluster.vm(given).exists() and command != "restore":
            raise LeanvmError(f"{command} --wait: '{given}' is neither a number of seconds nor a VM in "
                              f"{cluster.out / 'vms'} (usage: {command} --wait [SECONDS] [NAME...])")
        return 300, args[1:]
    if int(given) < 1:
        raise LeanvmError(f"{command} --wait: SECONDS must be at least 1, not '{given}'")
    return int(given), args[2:]


def select(cluster: Cluster, command: str, names: list[str]) -> list[str]:
    """The VMs named (each must exist, named once), or every VM."""
    for name in names:
        cluster.check_vm(name)
    named_once(command, names)
    return names or cluster.names()


def up(cluster: Cluster, args: list[str]) -> int:
    wait, names = parse_wait(cluster, "up", args)
    if names and names[0].startswith("-"):
        raise LeanvmError(f"up: unknown option '{names[0]}' (usage: cluster.sh up [--wait [SECONDS]] [NAME...])")
    return verbs.up_verb(cluster, select(cluster, "up", names), wait)


def snapshot(cluster: Cluster, args: list[str]) -> int:
    stop_after = bool(args) and args[0] == "--stop"
    args = args[1:] if stop_after else args
    if not args or args[0].startswith("-"):
        raise LeanvmError("usage: cluster.sh snapshot [--stop] [NAME...] SNAP")
    names = select(cluster, "snapshot", args[:-1])
    return Snapshot(cluster, names, args[-1], stop_after).take()


def restore(cluster: Cluster, args: list[str]) -> int:
    wait, args = parse_wait(cluster, "restore", args)
    if not args or args[0].startswith("-"):
        raise LeanvmError("usage: cluster.sh restore [--wait [SECONDS]] [NAME...] SNAP")
    for name in args[:-1]:
        cluster.check_vm(name)
    named_once("restore", args[:-1])
    chosen_accel()
    return Restore(cluster, args[:-1], args[-1], wait).run()


def ssh(cluster: Cluster, args: list[str]) -> int:
    if not args:
        raise LeanvmError("usage: cluster.sh ssh NAME [-- CMD...]")
    command = args[1:]
    if command and command[0] == "--":
        command = command[1:]
    verbs.ssh(cluster, args[0], command)
    return 255


def dispatch(cluster: Cluster, me: str, command: str, args: list[str]) -> int:
    if command == "up":
        return up(cluster, args)
    if command == "down":
        verbs.down(cluster, select(cluster, "down", args))
    elif command == "status":
        verbs.status(cluster)
    elif command == "snapshot":
        return snapshot(cluster, args)
    elif command == "restore":
        return restore(cluster, args)
    elif command == "ssh":
        return ssh(cluster, args)
    elif command == "monitor":
        if not args:
            raise LeanvmError("usage: cluster.sh monitor NAME [COMMAND]")
        verbs.monitor(cluster, args[0], [" ".join(args[1:])] if args[1:] else verbs.stdin_commands())
    elif command == "console":
        if len(args) != 1:
            raise LeanvmError("usage: cluster.sh console NAME")
        verbs.console(cluster, args[0])
    elif command in ("help", "--help", "-h"):
        print(USAGE.format(me=me))
    else:
        raise LeanvmError(f"unknown command '{command}': see {me} help")
    return 0


def main(out: Path, me: str, argv: list[str]) -> int:
    if not argv:
        print(USAGE.format(me=me), file=sys.stderr)
        return 1
    try:
        return dispatch(Cluster(out), me, argv[0], argv[1:])
    except LeanvmError as e:
        print(f"cluster.sh: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
