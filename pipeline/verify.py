"""Check a detached signature against the profile's key and pinned fingerprints only."""

import tempfile
from pathlib import Path

import gnupg

from .errors import LeanvmError


def check_signature(data: Path, signature: Path, key_file: Path, fingerprints: tuple[str, ...]) -> str:
    """Return the primary-key fingerprint that made a good signature, or raise.

    gpg runs in a private, throw-away GNUPGHOME holding only the profile's key, so
    nothing in the user's keyring can make a signature count.
    """
    if not signature.is_file():
        raise LeanvmError(f"{data}: signature {signature.name} is missing", "the mirror must serve it")
    with tempfile.TemporaryDirectory(prefix="leanvm-gpg-") as home:
        gpg = gnupg.GPG(gnupghome=home)
        imported = gpg.import_keys_file(str(key_file))
        if not imported.fingerprints:
            raise LeanvmError(f"{key_file}: holds no usable public key", "point signing_key at an armored key")
        result = gpg.verify_file(str(signature), str(data))
    primary = (result.pubkey_fingerprint or "").upper()
    if not result.valid:
        reason = result.status or "unreadable signature"
        raise LeanvmError(f"{data}: signature check failed ({reason})", "the file will be downloaded again")
    if primary not in fingerprints:
        raise LeanvmError(
            f"{data}: signed by key {primary}, which is not pinned in fingerprints",
            "the file will be downloaded again",
        )
    return primary
