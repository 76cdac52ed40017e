"""The cluster key: out/ssh/id_ed25519, made once per out/ and authorized in every VM.

It is never made again while it exists, and `doit clean` never deletes it. Host keys of the
VMs go in out/ssh/known_hosts under the alias leanvm-NAME; `reset:NAME` forgets the VM's.
"""

import os
from pathlib import Path

from leanvm.fsutil import temp_path
from leanvm.proc import run
from leanvm.state.layout import Layout, Names


def ssh_dir(out: Path) -> Path:
    return Layout(out).ssh


def private_key(out: Path) -> Path:
    return ssh_dir(out) / Names.SSH_KEY


def public_key(out: Path) -> Path:
    return ssh_dir(out) / f"{Names.SSH_KEY}.pub"


def create(out: Path) -> None:
    """Make the key pair (written under temp names, renamed once both are complete)."""
    if private_key(out).exists() and public_key(out).exists():
        return
    ssh_dir(out).mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = temp_path(private_key(out))
    for path in (tmp, tmp.with_name(tmp.name + ".pub")):
        path.unlink(missing_ok=True)
    try:
        run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"leanvm cluster key for {out}", "-f", tmp])
        os.replace(tmp.with_name(tmp.name + ".pub"), public_key(out))
        os.replace(tmp, private_key(out))
    finally:
        for path in (tmp, tmp.with_name(tmp.name + ".pub")):
            path.unlink(missing_ok=True)


def forget_host(out: Path, name: str) -> None:
    """Drop VM `name`'s host key from known_hosts (its new root disk makes a new one)."""
    known = ssh_dir(out) / Names.SSH_KNOWN_HOSTS
    if known.exists():
        run(["ssh-keygen", "-R", f"leanvm-{name}", "-f", known])
        Path(f"{known}.old").unlink(missing_ok=True)
