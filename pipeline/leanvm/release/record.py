"""Digests recorded beside published files, so a restored or tampered file is never trusted.

Each published file NAME gets a sidecar `.NAME.sha256` (JSON): its sha256 and the stat it
had when written (size, mtime, ctime, inode). While the stat still matches, the file is
trusted without re-hashing, so no-op runs stay cheap for big files. Anything else (restored
from a CI cache, copied, modified) is hashed in full and trusted only if the digest
matches; the stat is then refreshed, as git refreshes its index.
"""

import hashlib
import json
import os
from pathlib import Path

from leanvm.fsutil import write_atomic


def sidecar(path: Path) -> Path:
    return path.with_name(f".{path.name}.sha256")


def sha256_file(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _stat(path: Path) -> dict[str, int]:
    st = os.stat(path)
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns, "inode": st.st_ino}


def record(path: Path, digest: str, signer: str | None = None, source: str | None = None) -> None:
    """Record `path`'s digest, stat, the fingerprint of the key whose signature it passed and
    the URL it came from."""
    saved = {"sha256": digest, "signer": signer, "source": source, **_stat(path)}
    write_atomic(sidecar(path), json.dumps(saved).encode())


def recorded(path: Path, key: str) -> str | None:
    """What the record says of `key` (signer, source); None if it says nothing."""
    try:
        return json.loads(sidecar(path).read_text()).get(key)
    except (OSError, ValueError, AttributeError):
        return None


def recorded_signer(path: Path) -> str | None:
    return recorded(path, "signer")


def recorded_digest(path: Path) -> str | None:
    try:
        return json.loads(sidecar(path).read_text())["sha256"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def intact(path: Path) -> bool:
    """True if `path` holds exactly the bytes recorded when it was published."""
    try:
        saved = json.loads(sidecar(path).read_text())
        current = _stat(path)
    except (OSError, ValueError):
        return False
    if not isinstance(saved, dict) or "sha256" not in saved:
        return False
    if all(saved.get(key) == value for key, value in current.items()):
        return True
    if current["size"] != saved.get("size") or sha256_file(path) != saved["sha256"]:
        return False
    record(path, saved["sha256"], saved.get("signer"), saved.get("source"))
    return True
