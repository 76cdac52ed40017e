"""Stream the /usr member of a (gzip'd cpio) image into the partition of usr.img, atomically."""

import hashlib
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any, BinaryIO

import libarchive
import libarchive.exception

from leanvm.errors import LeanvmError
from leanvm.fsutil import temp_path
from leanvm.release.usrdisk import UsrDisk, write_table

BLOCK = 1 << 20


def _normalise(name: str) -> str:
    while name.startswith("./"):
        name = name[2:]
    return name


def _stream_into(out: BinaryIO, blocks: Iterable[bytes], disk: UsrDisk, digest: Any) -> int:
    """Write the member at the partition's offset; hash usr.img's bytes in file order."""
    out.seek(0)
    digest.update(out.read(disk.offset))  # the primary GPT, already written
    written = 0
    for block in blocks:
        out.write(block)
        digest.update(block)
        written += len(block)
    if written == disk.member_size:
        digest.update(bytes(disk.backup_offset - disk.offset - written))  # the partition's zero tail
        out.seek(disk.backup_offset)
        digest.update(out.read())  # the backup GPT
    return written


def extract_usr_disk(archive: Path, member: str, dest: Path) -> str:
    """Write `member` of `archive` as the USR-A partition of the GPT disk `dest`; only a
    complete, regular member lands there. Returns the sha256 of `dest`, computed on the way."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(dest)
    try:
        with libarchive.file_reader(str(archive)) as entries:
            for entry in entries:
                if _normalise(entry.pathname) != member:
                    continue
                if not entry.isreg:
                    raise LeanvmError(f"{archive}: member {member} is not a regular file", "check usr_member")
                if not entry.size:
                    raise LeanvmError(f"{archive}: member {member} is empty", "the image is corrupt")
                disk = UsrDisk(entry.size)
                with open(tmp, "wb") as out:
                    out.truncate(disk.size)
                write_table(tmp, disk)
                digest = hashlib.sha256()
                with open(tmp, "r+b") as out:
                    out.seek(disk.offset)
                    written = _stream_into(out, entry.get_blocks(BLOCK), disk, digest)
                    out.flush()
                    os.fsync(out.fileno())
                if written != disk.member_size:
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
