"""The first-boot rule: is the next boot of a VM a first boot (Ignition runs)?

Ignition runs only while the root disk has no /etc/.ignition-result.json, or while it holds
/selective-os-reset, which flatcar-reset writes to ask for a first boot (flatcar/init
bin/flatcar-reset, 32982439; Flatcar's GRUB gets /boot/flatcar/first_boot, which a leanvm VM
has not). The disk is read host side with debugfs, read-only. A disk whose VM stopped
uncleanly (kill -9, a host that lost power) needs journal recovery and may fail its bitmap
checksums until e2fsck runs: its journal is replayed first (e2fsck -E journal_only, so that a
file only the journal holds counts), and debugfs reads in catastrophic mode (-c: inodes and
directories, no bitmaps).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from leanvm.errors import LeanvmError
from leanvm.proc import run

TYPE_CHECKING = False
RESET_FLAG = "/selective-os-reset"
IGNITION_RESULT = "/etc/.ignition-result.json"
DEBUGFS_REQUESTS = f"features\nstat {RESET_FLAG}\nstat {IGNITION_RESULT}\n".encode()
DEADLINE = 120.0


class Verdict:
    def __init__(self, first: bool, why: str, note: str = "") -> None:
        self.first = first
        self.why = why  # what the disk holds, as "has no /etc/.ignition-result.json"
        self.note = note  # about journal recovery, if the disk needed it


class DiskFacts:
    def __init__(self, readable: bool, needs_recovery: bool, found: frozenset[str], problem: str) -> None:
        self.readable, self.needs_recovery, self.found = readable, needs_recovery, found
        self.problem = problem  # debugfs's line saying why it could not read the disk


if TYPE_CHECKING:  # (typing is not imported at run time: it costs a VM's launcher half a megabyte)
    # debugfs's stdin requests, the disk; (stdout, stderr) of `debugfs -c -f - DISK`
    Debugfs = Callable[[bytes, str], tuple[str, str]]


def local_debugfs(requests: bytes, disk: str) -> tuple[str, str]:
    result = run(["debugfs", "-c", "-f", "-", disk], input=requests, check=False, timeout=DEADLINE,
                 env={**os.environ, "DEBUGFS_PAGER": "__none__"})
    return result.stdout.decode(errors="replace"), result.stderr.decode(errors="replace")


def parse(stdout: str, stderr: str) -> DiskFacts:
    """What debugfs said: its features line, and each stat request answered with an inode."""
    found, current, features = set(), "", ""
    for line in stdout.splitlines():
        if line.startswith("debugfs: stat "):
            current = line.removeprefix("debugfs: stat ").strip()
        elif line.startswith("debugfs: "):
            current = ""
        elif line.startswith("Filesystem features:"):
            features = line
        elif line.startswith("Inode:") and current:
            found.add(current)
    problems = [line for line in stderr.splitlines() if " while " in line] or stderr.strip().splitlines()[-1:]
    return DiskFacts(bool(features), "needs_recovery" in features, frozenset(found), "".join(problems[:1]))


def replay_journal(disk: Path) -> None:
    result = run(["e2fsck", "-E", "journal_only", "-p", disk], check=False, timeout=DEADLINE)
    if result.returncode > 2:  # 1 or 2: it corrected something, fine
        said = (result.stdout + result.stderr).decode(errors="replace").strip().splitlines()
        raise LeanvmError(f"{disk} needs journal recovery and e2fsck could not replay it ({''.join(said[-1:])})",
                          f"repair it with: e2fsck -f '{disk}'")


def decide(disk: Path, print_only: bool = False, debugfs: Debugfs = local_debugfs) -> Verdict:
    """The rule for root disk `disk`. With print_only (run.sh --print) nothing is written, and
    a disk that needs journal recovery is read as it is, said in the note."""
    facts = parse(*debugfs(DEBUGFS_REQUESTS, str(disk)))
    note = ""
    if facts.readable and facts.needs_recovery:
        if print_only:
            note = (" (its VM stopped uncleanly: run.sh replays the disk's journal before booting, "
                    "which may change this)")
        else:
            replay_journal(disk)
            note = " (its VM had stopped uncleanly: the disk's journal was replayed)"
            facts = parse(*debugfs(DEBUGFS_REQUESTS, str(disk)))
    if not facts.readable:
        raise LeanvmError(f"cannot read {disk} with debugfs ({facts.problem}): the disk is damaged",
                          f"repair it with: e2fsck -f '{disk}'")
    if RESET_FLAG in facts.found:
        return Verdict(True, f"holds {RESET_FLAG} (flatcar-reset asked for a first boot)", note)
    if IGNITION_RESULT in facts.found:
        return Verdict(False, f"has {IGNITION_RESULT}", note)
    return Verdict(True, f"has no {IGNITION_RESULT}", note)
