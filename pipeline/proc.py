"""The one helper through which every external command runs (as mkosi/run.py does)."""

import logging
import shlex
import subprocess
from collections.abc import Sequence
from pathlib import Path

from .errors import LeanvmError

log = logging.getLogger("leanvm")

# Debian package that provides each external command we call.
PACKAGES = {
    "gpg": "gnupg",
    "mkfs.ext4": "e2fsprogs",
    "e2fsck": "e2fsprogs",
    "resize2fs": "e2fsprogs",
    "chattr": "e2fsprogs",
    "mksquashfs": "squashfs-tools",
    "cpio": "cpio",
    "qemu-system-x86_64": "qemu-system-x86",
    "apt-get": "apt",
    "dpkg-deb": "dpkg",
}


def run(
    argv: Sequence[str | Path],
    *,
    check: bool = True,
    input: bytes | None = None,
    cwd: Path | None = None,
) -> subprocess.CompletedProcess[bytes]:
    """Run argv, capturing output; a missing binary or a failure becomes a LeanvmError."""
    args = [str(a) for a in argv]
    log.debug("+ %s", shlex.join(args))
    try:
        result = subprocess.run(args, input=input, capture_output=True, cwd=cwd)
    except FileNotFoundError:
        package = PACKAGES.get(args[0], args[0])
        raise LeanvmError(
            f"{args[0]}: command not found", f"install it: apt-get install {package}"
        ) from None
    if check and result.returncode != 0:
        lines = result.stderr.decode(errors="replace").strip().splitlines()
        detail = lines[-1] if lines else "no error output"
        raise LeanvmError(
            f"{shlex.join(args)} failed with exit code {result.returncode}: {detail}"
        )
    return result
