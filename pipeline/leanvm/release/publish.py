"""Publishing into out/images/RELEASE/VERSION/: what the download, verify and extract tasks do.

The proof that a stage is done is its published file with a matching recorded digest
(record.py): then download, verify and extract are all up to date, with or without doit's
database (a CI cache restores only out/images/). Raw downloads in out/cache/ are removed
once their bytes are published, so each /usr exists once on disk. Unverified bytes are
never published: a file whose signature fails is moved aside as *.rejected. Each published
file records the pinned key that verified it: once that key is no longer pinned, the file is
unpublished and checked again against the new pin.
"""

import os
from pathlib import Path

from leanvm.config.types import Release
from leanvm.errors import LeanvmError, note
from leanvm.fsutil import temp_path
from leanvm.release import extract, fetch, record, verify


def done_when(pins: tuple[str, ...], source: str, published: Path, *alternatives: Path) -> bool:
    """Up to date if the published file is intact, verified by a key pinned now (`pins`) and
    came from `source` (its URL: a profile now pointing elsewhere, e.g. at arm64-usr/ instead
    of amd64-usr/ for the same version, is not served the old bytes), or all the intermediate
    files exist. Any other published file is unpublished (never booted again) and so fetched
    and checked again."""
    intact = record.intact(published)
    signer = record.recorded_signer(published)
    came_from = record.recorded(published, "source")
    if intact and signer not in pins:
        remove(published)
        note(f"{published} was verified by key {signer or '(not recorded)'}, which is not pinned in fingerprints "
             "now: removed, to be downloaded and checked against the pin again")
        intact = False
    elif intact and came_from not in (None, source):  # None: recorded before sources were
        remove(published)
        note(f"{published} came from {came_from}, not from {source} as the profile says now: removed, "
             "to be downloaded and checked again")
        intact = False
    return intact or (bool(alternatives) and all(p.exists() for p in alternatives))


def remove(*paths: Path) -> None:
    for path in paths:
        path.unlink(missing_ok=True)
        record.sidecar(path).unlink(missing_ok=True)
        record.legacy_sidecar(path).unlink(missing_ok=True)


def download_pair(url: str, dest: Path, suffix: str) -> None:
    fetch.download(url + suffix, dest.with_name(dest.name + suffix))
    fetch.download(url, dest)


def _link(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(target)
    tmp.unlink(missing_ok=True)
    try:
        os.link(source, tmp)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def verify_and_publish(data: Path, sig: Path, release: Release, target: Path, final: bool, source: str) -> None:
    """Check the signature, then publish by hard link; rejected files are moved aside.

    A kernel or initrd is final once published (its raw download is removed); the image
    goes to cache/verified/ for extraction.
    """
    try:
        signer = verify.check_signature(data, sig, release.signing_key, release.fingerprints)
    except LeanvmError:
        for path in (data, sig):
            if path.exists():
                os.replace(path, path.with_name(path.name + ".rejected"))
        raise
    _link(data, target)
    if final:
        remove(data, sig)
        record.record(target, record.file_digest(target), signer, source)
    else:
        signer_file(target).write_text(signer)


def signer_file(verified: Path) -> Path:
    """Beside a verified image waiting for extraction: the fingerprint that verified it."""
    return verified.with_name(f".{verified.name}.signer")


def extract_and_publish(image: Path, member: str, target: Path, raw: tuple[Path, Path], source: str) -> None:
    digest = extract.extract_usr_disk(image, member, target)
    signer = signer_file(image).read_text().strip() if signer_file(image).exists() else None
    remove(image, signer_file(image), *raw)  # the verified image is no longer needed: one copy of /usr on disk
    record.record(target, digest, signer, source)
