"""Resolve `version: current` and download files: streamed, resumable, retried, atomic."""

import errno
import os
import re
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar
from urllib.parse import urljoin, urlparse
from urllib.request import url2pathname

import requests
import urllib3

from leanvm.config.keys import RELEASE_NAME
from leanvm.config.types import Release
from leanvm.errors import LeanvmError, warn
from leanvm.fsutil import write_atomic

T = TypeVar("T")

CHUNK = 1 << 20
CONNECT_TIMEOUT = 10


def read_timeout() -> float:
    """Seconds without a byte before a download is retried (LEANVM_TIMEOUT, default 30)."""
    value = os.environ.get("LEANVM_TIMEOUT", "30")
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not 0 < seconds < float("inf"):
        raise LeanvmError(f"LEANVM_TIMEOUT={value!r} is not a number of seconds", "set it to seconds, e.g. 30")
    return max(seconds, 0.1)
ATTEMPTS = 6
RETRYABLE_STATUS = {408, 429, 500, 502, 503, 504}


def url_for(release: Release, version: str, filename: str) -> str:
    return urljoin(release.base_url, f"{version}/{filename}")


def _local_path(url: str) -> Path:
    return Path(url2pathname(urlparse(url).path))


def _session() -> requests.Session:
    session = requests.Session()
    session.headers["Accept-Encoding"] = "identity"
    session.headers["User-Agent"] = "leanvm"
    return session


def _backoff(attempt: int) -> None:
    time.sleep(min(0.2 * 2**attempt, 5.0))


def _retrying(attempts: int, once: Callable[[], T]) -> T:
    """once() until it returns; a _Retry or a network error is retried with backoff.
    Raises _Retry with the last reason when every attempt failed."""
    last = ""
    for attempt in range(attempts):
        try:
            return once()
        except _Retry as e:
            last = str(e)
        except (requests.RequestException, urllib3.exceptions.HTTPError) as e:
            last = type(e).__name__
        _backoff(attempt)
    raise _Retry(last)


def fetch_small(url: str, attempts: int = 4) -> str:
    """A small text file (version.txt), with retries."""
    if url.startswith("file:"):
        try:
            return _local_path(url).read_text()
        except OSError as e:
            raise LeanvmError(f"{url}: {e.strerror}", "check base_url") from None
    with _session() as session:

        def once() -> str:
            response = session.get(url, timeout=(CONNECT_TIMEOUT, read_timeout()))
            if response.status_code == 200:
                return response.text
            if response.status_code in RETRYABLE_STATUS:
                raise _Retry(f"HTTP {response.status_code}")
            raise LeanvmError(f"{url}: HTTP {response.status_code}", "check base_url and the network")

        try:
            return _retrying(attempts, once)
        except _Retry as e:
            raise LeanvmError(f"{url}: {e}", "check base_url and the network") from None


def parse_version(text: str, key: str, url: str) -> str:
    for line in text.splitlines():
        name, sep, value = line.partition("=")
        if sep and name.strip() == key:
            version = value.strip().strip("\"'")
            if RELEASE_NAME.fullmatch(version):
                return version
            raise LeanvmError(f"{url}: {key}={version!r} is not a usable version", "check version_key")
    raise LeanvmError(f"{url}: no {key}= line", "check version_file and version_key in the profile")


def is_stream(version: str) -> bool:
    """`current`, or a pinned stream such as Flatcar LTS's `current-2024`: a directory on the
    release server whose version file names the version it holds today."""
    return version == "current" or re.fullmatch(r"current-\d{4}", version) is not None


def resolve_version(release: Release, state_file: Path, online: bool) -> str:
    """The concrete version: pinned, freshly resolved, or the last one resolved into out/."""
    if not is_stream(release.version):
        return release.version
    cached = state_file.read_text().strip() if state_file.is_file() else None
    if not online:
        return cached or release.version
    read_timeout()  # a bad LEANVM_TIMEOUT is the user's to fix, not a mirror that cannot be reached
    url = urljoin(release.base_url, f"{release.version}/{release.version_file}")
    try:
        version = parse_version(fetch_small(url), str(release.version_key), url)
    except LeanvmError as e:
        if cached is None:
            raise
        warn(f"{e}; using the last resolved version {cached}")
        return cached
    if version != cached:
        write_atomic(state_file, f"{version}\n".encode())
    return version


class _Progress:
    """A progress line on stderr, only when stderr is a terminal."""

    def __init__(self, name: str, total: int | None) -> None:
        self.name, self.total = name, total
        self.enabled = sys.stderr.isatty()
        self.last = 0.0

    def update(self, done: int, force: bool = False) -> None:
        now = time.monotonic()
        if not self.enabled or (now - self.last < 0.2 and not force):
            return
        self.last = now
        if self.total:
            bar = "#" * (30 * done // self.total)
            sys.stderr.write(f"\r{self.name} [{bar:<30}] {done >> 20}/{self.total >> 20} MiB")
        else:
            sys.stderr.write(f"\r{self.name} {done >> 20} MiB")
        if force:
            sys.stderr.write("\n")
        sys.stderr.flush()


# Errors of writing a download, never a sign of a wrong URL.
WRITE_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG}


def _copy_local(url: str, dest: Path, part: Path) -> None:
    source = _local_path(url)
    try:
        shutil.copyfile(source, part)
        os.replace(part, dest)
    except OSError as e:
        part.unlink(missing_ok=True)  # a local copy starts over: nothing to resume
        if e.errno in WRITE_ERRORS or e.filename == str(part):
            raise LeanvmError(f"{part}: cannot write: {e.strerror}", "free disk space and run again") from None
        raise LeanvmError(f"{url}: {e.strerror}", "check base_url and version in the profile") from None


def _get_once(session: requests.Session, url: str, part: Path, progress: _Progress | None) -> None:
    """One attempt: resume `part` if it has bytes; raise _Retry or LeanvmError on failure."""
    try:
        _stream_to(session, url, part, progress)
    except OSError as e:
        if isinstance(e, requests.RequestException):
            raise
        raise LeanvmError(f"{part}: cannot write: {e.strerror}", "free disk space and retry") from None


def _stream_to(session: requests.Session, url: str, part: Path, progress: _Progress | None) -> None:
    have = part.stat().st_size if part.exists() else 0
    headers = {"Range": f"bytes={have}-"} if have else {}
    with session.get(url, headers=headers, stream=True, timeout=(CONNECT_TIMEOUT, read_timeout())) as r:
        if r.status_code == 416 and have:
            part.unlink()  # our partial file is not a prefix of theirs: start over
            raise _Retry("range not satisfiable")
        if r.status_code in RETRYABLE_STATUS:
            raise _Retry(f"HTTP {r.status_code}")
        if r.status_code not in (200, 206):
            raise LeanvmError(f"{url}: HTTP {r.status_code}", "check base_url and version in the profile")
        mode, offset = "wb", 0
        if r.status_code == 206:
            start = r.headers.get("Content-Range", "").removeprefix("bytes ").split("-")[0]
            if start != str(have):
                part.unlink()
                raise _Retry(f"unexpected Content-Range {r.headers.get('Content-Range')!r}")
            mode, offset = "ab", have
        length = r.headers.get("Content-Length")
        expected = offset + int(length) if length and length.isdigit() else None
        if progress:
            progress.total = expected
        done = offset
        with open(part, mode) as f:
            # read1: write whatever has arrived, so a stalled or cut connection loses nothing.
            while chunk := r.raw.read1(CHUNK):
                f.write(chunk)
                done += len(chunk)
                if progress:
                    progress.update(done)
            f.flush()
            os.fsync(f.fileno())
        if expected is not None and done != expected:
            raise _Retry(f"got {done} of {expected} bytes")


class _Retry(Exception):
    pass


def download(url: str, dest: Path) -> None:
    """Download url to dest via dest.part; dest appears only when complete."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    if url.startswith("file:"):
        _copy_local(url, dest, part)
        return
    progress = _Progress(dest.name, None)
    with _session() as session:
        try:
            _retrying(ATTEMPTS, lambda: _get_once(session, url, part, progress))
        except _Retry as e:
            raise LeanvmError(f"{url}: download failed after {ATTEMPTS} attempts ({e})",
                              "check the network and retry") from None
    progress.update(part.stat().st_size, force=True)
    os.replace(part, dest)
