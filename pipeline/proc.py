"""The one helper through which every external command runs (as mkosi/run.py does)."""

import shlex
import subprocess
from collections.abc import Sequence
from pathlib import Path

from .errors import LeanvmError, debug

# Debian package that provides each external command we call.
PACKAGES = {
    "gpg": "gnupg",
    "gpgconf": "gnupg",
    "ssh-keygen": "openssh-client",
    "setcap": "libcap2-bin",
    "mkfs.ext4": "e2fsprogs",
    "e2fsck": "e2fsprogs",
    "resize2fs": "e2fsprogs",
    "chattr": "e2fsprogs",
    "debugfs": "e2fsprogs",
    "sfdisk": "fdisk",
    "mksquashfs": "squashfs-tools",
    "cpio": "cpio",
    "qemu-system-x86_64": "qemu-system-x86",
    "apt-get": "apt",
    "apt-cache": "apt",
    "depmod": "kmod",
    "dpkg-deb": "dpkg",
}


def run(
    argv: Sequence[str | Path],
    *,
    check: bool = True,
    input: bytes | None = None,
    cwd: Path | None = None,
    capture: bool = True,
    timeout: float | None = None,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[bytes]:
    """Run argv (output captured unless `capture` is False); a missing binary, a failure or a
    timeout becomes a LeanvmError."""
    args = [str(a) for a in argv]
    debug(f"+ {shlex.join(args)}")
    try:
        result = subprocess.run(
            args,
            input=input,
            capture_output=capture,
            cwd=cwd,
            timeout=timeout,
            env=env,
            stdin=subprocess.DEVNULL if input is None else None,
        )
    except subprocess.TimeoutExpired:
        raise LeanvmError(f"{shlex.join(args)} did not finish within {timeout:.0f} s") from None
    except FileNotFoundError:
        package = PACKAGES.get(args[0], args[0])
        raise LeanvmError(
            f"{args[0]}: command not found", f"install it: apt-get install {package}"
        ) from None
    if check and result.returncode != 0:
        lines = (result.stderr or b"").decode(errors="replace").strip().splitlines()
        detail = lines[-1] if lines else "no error output"
        raise LeanvmError(
            f"{shlex.join(args)} failed with exit code {result.returncode}: {detail}"
        )
    return result


def stop_gpg_agent(home: Path | str) -> None:
    """Stop the gpg-agent that gpg started for a GNUPGHOME of ours (it outlives gpg)."""
    run(["gpgconf", "--homedir", home, "--kill", "gpg-agent"], check=False)
