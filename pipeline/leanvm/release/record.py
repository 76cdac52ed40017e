"""Digests recorded beside published files, so a restored or tampered file is never trusted.

Each published file NAME gets a sidecar `.NAME.digest` (JSON): its BLAKE3 digest and the stat
it had when written (size, mtime, ctime, inode). While the stat still matches, the file is
trusted without re-hashing, so no-op runs stay cheap for big files. Anything else (restored
from a CI cache, copied, modified) is hashed in full and trusted only if the digest
matches; the stat is then refreshed, as git refreshes its index. An older out/'s sidecar
(`.NAME.sha256`, a sha256) is checked in full once, whatever its stat says, and replaced.
"""

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import blake3

from leanvm.fsutil import write_atomic

ALGORITHM = "blake3"
BLOCK = 1 << 20


def sidecar(path: Path) -> Path:
    return path.with_name(f".{path.name}.digest")


def legacy_sidecar(path: Path) -> Path:
    """The sidecar of leanvm before BLAKE3: a sha256, re-checked once."""
    return path.with_name(f".{path.name}.sha256")


def file_digest(path: Path) -> str:
    """BLAKE3 of the file, on every core (memory-mapped)."""
    digest = blake3.blake3(max_threads=blake3.blake3.AUTO)
    if os.path.getsize(path):
        digest.update_mmap(path)
    return digest.hexdigest()


def _stat(path: Path) -> dict[str, int]:
    st = os.stat(path)
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns, "inode": st.st_ino}


def record(path: Path, digest: str, signer: str | None = None, source: str | None = None) -> None:
    """Record `path`'s BLAKE3 digest, stat, the fingerprint of the key whose signature it
    passed and the URL it came from."""
    saved = {ALGORITHM: digest, "signer": signer, "source": source, **_stat(path)}
    write_atomic(sidecar(path), json.dumps(saved).encode())
    legacy_sidecar(path).unlink(missing_ok=True)


def _read(sidecar_path: Path) -> dict[str, Any] | None:
    try:
        saved = json.loads(sidecar_path.read_text())
    except (OSError, ValueError):
        return None
    return saved if isinstance(saved, dict) else None


def recorded(path: Path, key: str) -> str | None:
    """What the record says of `key` (signer, source); None if it says nothing."""
    saved = _read(sidecar(path))
    return saved.get(key) if saved else None


def recorded_signer(path: Path) -> str | None:
    return recorded(path, "signer")


def _legacy_intact(path: Path) -> bool:
    """An older record (sha256): the file is read in full, both digests on the way; if the
    sha256 matches, a BLAKE3 record replaces it."""
    saved = _read(legacy_sidecar(path))
    if not saved or not isinstance(saved.get("sha256"), str):
        return False
    old, new = hashlib.sha256(), blake3.blake3()
    with open(path, "rb") as f:
        while block := f.read(BLOCK):
            old.update(block)
            new.update(block)
    if old.hexdigest() != saved["sha256"]:
        return False
    record(path, new.hexdigest(), saved.get("signer"), saved.get("source"))
    return True


def intact(path: Path) -> bool:
    """True if `path` holds exactly the bytes recorded when it was published."""
    if not path.is_file():
        return False
    saved = _read(sidecar(path))
    if saved is None:
        return _legacy_intact(path)
    if not isinstance(saved.get(ALGORITHM), str):
        return False
    current = _stat(path)
    if all(saved.get(key) == value for key, value in current.items()):
        return True
    if current["size"] != saved.get("size") or file_digest(path) != saved[ALGORITHM]:
        return False
    record(path, saved[ALGORITHM], saved.get("signer"), saved.get("source"))
    return True
