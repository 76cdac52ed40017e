"""A VM's serial console as the launcher reads it: console.log, from where a launch began."""

from __future__ import annotations

from pathlib import Path

# A failed boot: Ignition's failure, or the prompt of Flatcar's emergency target, which reboots
# after 300 s (bootengine dracut/99emergency-timeout): the VM is stopped rather than waited out
# and started again, a first boot once more, in a loop.
BOOT_FAILED = (b"Ignition has failed", b"Press Enter for emergency shell")


class ConsoleWatch:
    """What the console of one launch has printed since its start (byte `offset` of the file)."""

    def __init__(self, path: Path, offset: int) -> None:
        self.path = path
        self.offset = offset
        self._partial = b""

    def printed(self) -> bool:
        try:
            return self.path.stat().st_size > self.offset
        except OSError:
            return False

    def failed_boot(self) -> str | None:
        """The console line of a failed boot, if one came since the last call."""
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                chunk = f.read()
        except OSError:
            return None
        self.offset += len(chunk)
        lines = (self._partial + chunk).split(b"\n")
        self._partial = lines.pop()
        for line in [*lines, self._partial]:
            if any(mark in line for mark in BOOT_FAILED):
                return line.decode(errors="replace").replace("\r", "").rstrip()
        return None


def size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0
