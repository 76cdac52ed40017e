"""A VM's values file, out/state/vms/NAME.env: KEY=VALUE lines, each value shell-quoted, so
that a shell may still source it. This is its one reader and its one writer. Standard
library only: out/'s runtime reads it."""

from __future__ import annotations

import shlex
from collections.abc import Mapping
from pathlib import Path


def parse(text: str) -> dict[str, str] | None:
    """The file's values, or None if it is not such a file (a quote left open)."""
    try:
        words = shlex.split(text, comments=True)
    except ValueError:
        return None
    return dict(word.split("=", 1) for word in words if "=" in word)


def read(path: Path) -> dict[str, str] | None:
    """The values of the file at path; None if it is missing or unreadable."""
    try:
        return parse(path.read_text())
    except OSError:
        return None


def render(name: str, values: Mapping[str, str]) -> str:
    lines = [f"# leanvm values of VM {name}: kept by `doit clean`/`forget`; written by `doit`",
             *(f"{key}={shlex.quote(value)}" for key, value in values.items())]
    return "\n".join(lines) + "\n"
