"""Check a detached signature against the profile's key and pinned fingerprints only."""

import tempfile
import time
from pathlib import Path
from typing import Any

import gnupg

from leanvm.errors import LeanvmError, warn
from leanvm.proc import stop_gpg_agent

EXPIRED_KEY = "signing key has expired"


def _date(timestamp: int) -> str:
    return time.strftime("%Y-%m-%d", time.gmtime(timestamp))


def _signing_key_record(gpg: gnupg.GPG, fingerprint: str) -> dict[str, Any]:
    for key in gpg.list_keys():
        if key["fingerprint"] == fingerprint:
            return dict(key)
        for sub in key.get("subkey_info", {}).values():
            if sub.get("fingerprint") == fingerprint:
                return dict(sub)
    return {}


def _signed_while_valid(gpg: gnupg.GPG, result: gnupg.Verify) -> bool:
    """True for a good signature by a key that has expired since, made while it was valid.

    gpg judges key validity at verification time; old releases were signed by subkeys that
    have expired since, so the signature time is compared with the key's own lifetime. A
    revoked key never passes.
    """
    if result.key_status != EXPIRED_KEY or result.status != "signature valid" or not result.fingerprint:
        return False
    key = _signing_key_record(gpg, result.fingerprint)
    signed, created = int(result.sig_timestamp or 0), int(key.get("date") or 0)
    expires = int(key.get("expires") or 0)
    return key.get("trust") != "r" and expires > 0 and created <= signed < expires


def check_signature(data: Path, signature: Path, key_file: Path, fingerprints: tuple[str, ...]) -> str:
    """Return the primary-key fingerprint that made a good signature, or raise.

    gpg runs in a private, throw-away GNUPGHOME holding only the profile's key, so
    nothing in the user's keyring can make a signature count.
    """
    if not signature.is_file():
        raise LeanvmError(f"{data}: signature {signature.name} is missing", "the mirror must serve it")
    with tempfile.TemporaryDirectory(prefix="leanvm-gpg-") as home:
        try:
            gpg = gnupg.GPG(gnupghome=home)
            imported = gpg.import_keys_file(str(key_file))
            if not imported.fingerprints:
                raise LeanvmError(f"{key_file}: holds no usable public key", "point signing_key at an armored key")
            result = gpg.verify_file(str(signature), str(data))
            expired_but_valid = not result.valid and _signed_while_valid(gpg, result)
        finally:
            stop_gpg_agent(home)
    primary = (result.pubkey_fingerprint or "").upper()
    if not result.valid and not expired_but_valid:
        reason = result.key_status or result.status or "unreadable signature"
        raise LeanvmError(f"{data}: signature check failed ({reason})", "the file will be downloaded again")
    if primary not in fingerprints:
        raise LeanvmError(
            f"{data}: signed by key {primary}, which is not pinned in fingerprints",
            "the file will be downloaded again",
        )
    if expired_but_valid:
        warn(
            f"{data.name}: signed on {_date(int(result.sig_timestamp))} by subkey "
            f"{result.fingerprint}, which has expired since; accepted (it was valid then)"
        )
    return primary
