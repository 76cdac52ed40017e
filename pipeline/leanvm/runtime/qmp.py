"""QEMU's machine protocol (QMP) on a VM's unix socket: one JSON object a line, a greeting,
then `qmp_capabilities`; a command's reply carries the id it was sent with, and events
(STOP, RESUME, SHUTDOWN, ...) may arrive between. Everything waits against one deadline."""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

TYPE_CHECKING = False
if TYPE_CHECKING:  # (typing is not imported at run time: it costs a VM's launcher half a megabyte)
    from typing import Any

# sun_path holds 108 bytes on Linux (104 on macOS): a longer path is reached from its directory
SHORT_SOCKET_PATH = 100


class QMPError(Exception):
    """QEMU refused a command (its error's description), or the socket failed or fell silent."""


class QMPTimeout(QMPError):
    """The deadline passed with no answer."""


class QMP:
    """A QMP session with one QEMU, ready for commands once constructed."""

    def __init__(self, path: Path | None, timeout: float, sock: socket.socket | None = None) -> None:
        """A session on the socket at `path`, or on `sock`, connected already (a socketpair whose
        other end QEMU was given as its monitor)."""
        self.deadline = time.monotonic() + timeout
        self.events: list[dict[str, Any]] = []
        self._buffer = b""
        self._last_id = 0
        self._sock = sock or socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            if path is not None:
                _connect(self._sock, path)
            if "QMP" not in self._read():
                raise QMPError(f"{path or 'the socket'} is not a QMP socket (no QMP greeting)")
            self.execute("qmp_capabilities")
        except BaseException:
            self._sock.close()
            raise

    def within(self, seconds: float) -> QMP:
        """What follows waits at most `seconds` (a new deadline)."""
        self.deadline = time.monotonic() + seconds
        return self

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> QMP:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def execute(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        """The `return` of QEMU's reply to command; QMPError with QEMU's words if it refused."""
        self._last_id += 1
        request: dict[str, Any] = {"execute": command, "id": self._last_id}
        if arguments:
            request["arguments"] = arguments
        try:
            self._sock.sendall(json.dumps(request).encode() + b"\n")
        except OSError as e:
            raise _socket_error(e) from None
        while True:
            message = self._read()
            if "event" in message:
                self.events.append(message)
            elif message.get("id") == self._last_id:
                if "error" in message:
                    raise QMPError(f"{command}: {message['error'].get('desc', message['error'])}")
                return message.get("return")

    def hmp(self, command_line: str) -> str:
        """What the human monitor prints for command_line (QMP's human-monitor-command)."""
        return str(self.execute("human-monitor-command", {"command-line": command_line}))

    def wait_event(self, name: str) -> dict[str, Any]:
        """The first event `name` (one already received counts), within the deadline."""
        while True:
            for index, event in enumerate(self.events):
                if event["event"] == name:
                    return self.events.pop(index)
            message = self._read()
            if "event" in message:
                self.events.append(message)

    def next_event(self, seconds: float) -> dict[str, Any] | None:
        """The next event, or None if none came within `seconds`; QMPError once QEMU closed the socket."""
        if self.events:
            return self.events.pop(0)
        self.within(seconds)
        try:
            message = self._read()
        except QMPTimeout:
            return None
        return message if "event" in message else None

    def _read(self) -> dict[str, Any]:
        while b"\n" not in self._buffer:
            remaining = self.deadline - time.monotonic()
            if remaining <= 0:
                raise QMPTimeout("QEMU did not answer on its QMP socket in time")
            self._sock.settimeout(remaining)
            try:
                chunk = self._sock.recv(65536)
            except socket.timeout:  # noqa: UP041  (python 3.9: not yet TimeoutError)
                continue
            except OSError as e:
                raise _socket_error(e) from None
            if not chunk:
                raise QMPError("QEMU closed its QMP socket")
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        message = json.loads(line)
        if not isinstance(message, dict):
            raise QMPError(f"QMP: not a JSON object: {line[:80]!r}")
        return message


def _socket_error(error: OSError) -> QMPError:
    if isinstance(error, (ConnectionResetError, BrokenPipeError)):
        return QMPError("QEMU closed its QMP socket")
    return QMPError(f"QMP socket: {error.strerror or error}")


def _connect(sock: socket.socket, path: Path) -> None:
    """Connect to socket `path`, from its own directory if the path is too long for sun_path."""
    if len(os.fsencode(path)) < SHORT_SOCKET_PATH:
        sock.connect(str(path))
        return
    here = os.open(".", os.O_RDONLY)
    try:
        os.chdir(path.parent)
        sock.connect(path.name)
    finally:
        os.fchdir(here)
        os.close(here)
