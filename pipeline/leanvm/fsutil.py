"""Atomic writes: nothing half-written ever sits at a final path."""

import os
from pathlib import Path


def temp_path(path: Path) -> Path:
    """The temporary sibling a file is written to before being renamed into place."""
    return path.with_name(f".{path.name}.tmp")


def write_atomic(path: Path, data: bytes, mode: int = 0o644) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)  # anything but a complete write (ENOSPC, Ctrl-C) leaves nothing
