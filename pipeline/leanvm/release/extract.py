"""Stream the /usr member of a (gzip'd cpio) image into the partition of usr.img, atomically.

Three steps run at once, each in a thread of its own, so that extraction takes about as long
as the slowest of them rather than their sum (each releases the GIL while it works): ISA-L
decodes the gzip (several times faster than zlib) and libarchive reads the cpio from the
decoded stream, a writer writes the member into the partition, and BLAKE3 hashes the
bytes in file order. An image that is not gzip (xz,
zstd, plain cpio) is read by libarchive alone, as `decoder="libarchive"` does for any image.
"""

import ctypes
import os
import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

import blake3
import libarchive
import libarchive.exception
from isal import igzip

from leanvm.errors import LeanvmError
from leanvm.fsutil import temp_path
from leanvm.release.usrdisk import UsrDisk, write_table

BLOCK = 1 << 20
GZIP_MAGIC = b"\x1f\x8b"


def _normalise(name: str) -> str:
    while name.startswith("./"):
        name = name[2:]
    return name


class _Decoded:
    """The decoded bytes of a gzip file for libarchive's stream reader. A decoding error is
    kept (a ctypes callback cannot raise) and libarchive is told to stop."""

    def __init__(self, archive: Path) -> None:
        self.file = igzip.open(archive, "rb")  # type: ignore[no-untyped-call]  # (isal has no types)
        self.error: Exception | None = None

    def readinto(self, buffer: Any) -> int:
        try:
            return int(self.file.readinto(buffer))
        except Exception as e:  # BadGzipFile, IsalError, EOFError: whatever the decoder raises
            self.error = e
            return -30  # ARCHIVE_FATAL

    def seekable(self) -> bool:
        return False

    def check(self, archive: Path) -> None:
        """Raise the decoding error, if there was one (libarchive may just stop reading)."""
        if self.error is not None:
            raise LeanvmError(f"{archive}: corrupt gzip: {self.error}", "delete it and download again")


@contextmanager
def _entries(archive: Path, decoder: str) -> Iterator[tuple[Any, Callable[[], None]]]:
    """The archive's entries, and a check that the bytes read so far decoded cleanly; a gzip
    image is decoded by ISA-L unless `decoder` is libarchive."""
    with open(archive, "rb") as f:
        gzipped = f.read(2) == GZIP_MAGIC
    if decoder == "libarchive" or not gzipped:
        with libarchive.file_reader(str(archive)) as entries:
            yield entries, lambda: None
        return
    decoded = _Decoded(archive)
    try:
        with libarchive.stream_reader(decoded, "all", "none", block_size=BLOCK) as entries:
            yield entries, lambda: decoded.check(archive)
    except (libarchive.exception.ArchiveError, LeanvmError):  # e.g. "truncated": say why
        decoded.check(archive)
        raise
    finally:
        decoded.file.close()


class _Worker(threading.Thread):
    """Applies `step` to each block put to it, in order, in a thread of its own; an error is
    kept and raised by `finish` (the blocks after it are dropped)."""

    def __init__(self, step: Callable[[bytes], object]) -> None:
        super().__init__(daemon=True)
        self.step = step
        self.blocks: queue.Queue[bytes | None] = queue.Queue(maxsize=16)
        self.error: BaseException | None = None
        self.start()

    def run(self) -> None:
        while (block := self.blocks.get()) is not None:
            if self.error is None:
                try:
                    self.step(block)
                except BaseException as e:  # raised again in the caller's thread by finish()
                    self.error = e

    def finish(self) -> None:
        self.blocks.put(None)
        self.join()
        if self.error is not None:
            raise self.error


def _libc_sync_file_range() -> Callable[[int, int, int, int], int] | None:
    """Linux's sync_file_range(2), which Python's os module lacks; None where libc has none."""
    function = getattr(ctypes.CDLL(None, use_errno=True), "sync_file_range", None)
    if function is not None:
        function.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    return function


_SYNC_FILE_RANGE = _libc_sync_file_range()
_SYNC_FILE_RANGE_WRITE = 2  # start writing the range's dirty pages; do not wait


def _start_writeback(fd: int, start: int, length: int) -> None:
    """Start writing bytes [start, start + length) of `fd` to disk, without waiting: Linux's
    sync_file_range, elsewhere posix_fadvise(DONTNEED), which starts it too. A hint only:
    the fsync at the end is what makes the file durable."""
    if _SYNC_FILE_RANGE is not None:
        _SYNC_FILE_RANGE(fd, start, length, _SYNC_FILE_RANGE_WRITE)
    elif hasattr(os, "posix_fadvise"):
        os.posix_fadvise(fd, start, length, os.POSIX_FADV_DONTNEED)


class _Flushing:
    """Writes whose write-back to disk starts as they go: every FLUSH bytes the range just
    written is handed to the kernel, so the disk writes while the next bytes are decoded and
    the fsync at the end finds little left to do. Waiting there (fdatasync) would leave the
    disk idle between ranges; not starting it would leave it idle until the fsync (measured
    in bench/RESULTS.md, section 1)."""

    FLUSH = 32 << 20

    def __init__(self, out: BinaryIO) -> None:
        self.out, self.start, self.pending = out, out.tell(), 0

    def write(self, block: bytes) -> None:
        self.out.write(block)
        self.pending += len(block)
        if self.pending >= self.FLUSH:
            self.out.flush()
            _start_writeback(self.out.fileno(), self.start, self.pending)
            self.start += self.pending
            self.pending = 0


def _stream_into(out: BinaryIO, blocks: Iterable[bytes], disk: UsrDisk, digest: Any) -> int:
    """Write the member at the partition's offset and hash usr.img's bytes in file order,
    the writing and the hashing each in a thread of its own beside the reading."""
    out.seek(0)
    digest.update(out.read(disk.offset))  # the primary GPT, already written
    out.seek(disk.offset)
    writer, hasher = _Worker(_Flushing(out).write), _Worker(digest.update)
    written = 0
    try:
        for block in blocks:
            writer.blocks.put(block)
            hasher.blocks.put(block)
            written += len(block)
    finally:
        writer.finish()
        hasher.finish()
    if written == disk.member_size:
        tail = disk.backup_offset - disk.offset - written  # the partition's zero tail
        for start in range(0, tail, BLOCK):
            digest.update(bytes(min(BLOCK, tail - start)))
        out.seek(disk.backup_offset)
        digest.update(out.read())  # the backup GPT
    return written


def _write_member(entry: Any, tmp: Path, archive: Path, member: str) -> str:
    if not entry.isreg:
        raise LeanvmError(f"{archive}: member {member} is not a regular file", "check usr_member")
    if not entry.size:
        raise LeanvmError(f"{archive}: member {member} is empty", "the image is corrupt")
    disk = UsrDisk(entry.size)
    with open(tmp, "wb") as out:
        out.truncate(disk.size)
    write_table(tmp, disk)
    digest = blake3.blake3()
    with open(tmp, "r+b") as out:
        written = _stream_into(out, entry.get_blocks(BLOCK), disk, digest)
        out.flush()
        os.fsync(out.fileno())
    if written != disk.member_size:
        raise LeanvmError(f"{archive}: member {member} is truncated", "the image is corrupt")
    return digest.hexdigest()


def extract_usr_disk(archive: Path, member: str, dest: Path, decoder: str = "isal") -> str:
    """Write `member` of `archive` as the USR-A partition of the GPT disk `dest`; only a
    complete, regular member lands there. Returns the BLAKE3 digest of `dest`, computed on the way.
    `decoder`: isal (ISA-L for gzip images), or libarchive (its own zlib, for comparison)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(dest)
    try:
        with _entries(archive, decoder) as (entries, decoded_cleanly):
            for entry in entries:
                if _normalise(entry.pathname) == member:
                    digest = _write_member(entry, tmp, archive, member)
                    for _rest in entries:  # read to the end: gzip's CRC is checked there
                        pass
                    decoded_cleanly()
                    os.replace(tmp, dest)
                    return digest
            decoded_cleanly()
    except libarchive.exception.ArchiveError as e:
        raise LeanvmError(f"{archive}: corrupt archive: {e.msg}", "delete it and download again") from None
    except OSError as e:
        raise LeanvmError(f"{dest}: cannot write: {e.strerror}", "free disk space and retry") from None
    finally:
        tmp.unlink(missing_ok=True)
    raise LeanvmError(f"{archive}: has no member {member}", "check usr_member in the profile")
