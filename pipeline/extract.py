"""Stream one member out of a (gzip'd cpio) image into a file, atomically."""

import hashlib
import os
from pathlib import Path

import libarchive
import libarchive.exception

from .errors import LeanvmError
from .fsutil import temp_path

BLOCK = 1 << 20


def _normalise(name: str) -> str:
    while name.startswith("./"):
        name = name[2:]
    return name


def extract_member(archive: Path, member: str, dest: Path) -> str:
    """Write `member` of `archive` to `dest`; only a complete, regular member lands there.

    Returns the sha256 of what was written (computed on the way, not by re-reading)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(dest)
    try:
        with libarchive.file_reader(str(archive)) as entries:
            for entry in entries:
                if _normalise(entry.pathname) != member:
                    continue
                if not entry.isreg:
                    raise LeanvmError(f"{archive}: member {member} is not a regular file", "check usr_member")
                written, digest = 0, hashlib.sha256()
                with open(tmp, "wb") as out:
                    for block in entry.get_blocks(BLOCK):
                        out.write(block)
                        digest.update(block)
                        written += len(block)
                    out.flush()
                    os.fsync(out.fileno())
                if entry.size is not None and written != entry.size:
                    raise LeanvmError(f"{archive}: member {member} is truncated", "the image is corrupt")
                os.replace(tmp, dest)
                return digest.hexdigest()
    except libarchive.exception.ArchiveError as e:
        raise LeanvmError(f"{archive}: corrupt archive: {e.msg}", "delete it and download again") from None
    except OSError as e:
        raise LeanvmError(f"{dest}: cannot write: {e.strerror}", "free disk space and retry") from None
    finally:
        tmp.unlink(missing_ok=True)
    raise LeanvmError(f"{archive}: has no member {member}", "check usr_member in the profile")
