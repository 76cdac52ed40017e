"""Running leanvm's doit DAG from tests (the one way: `doit`), and a project directory to run it on."""

import os
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

from .mirror import IMAGE, KERNEL, Keyring
from .procs import PROJECT, run


@dataclass
class DoitResult:
    returncode: int
    stdout: str
    stderr: str

    @property
    def executed(self) -> set[str]:
        return {line[3:].strip() for line in self.stdout.splitlines() if line.startswith(".  ")}


# doit runs in the checkout, as the README says: its pyproject.toml names leanvm's task loader
DOIT_CWD = PROJECT


def doit_argv(*args: str | Path) -> list[str]:
    """The command line that runs leanvm's DAG (the checkout's dodo.py) with `args`, in DOIT_CWD."""
    return [sys.executable, "-m", "doit", "-f", str(PROJECT / "dodo.py"), *map(str, args)]


def doit(*args: str, env: dict | None = None, timeout: float = 300) -> DoitResult:
    proc = run(doit_argv(*args), cwd=DOIT_CWD,
               capture_output=True, text=True, env={**os.environ, **(env or {})}, timeout=timeout)
    return DoitResult(proc.returncode, proc.stdout, proc.stderr)


# --- booting and watching VMs --------------------------------------------------------


@dataclass
class Project:
    """A config directory (cluster file, profile, key) and an out/ directory."""

    root: Path
    keyring: Keyring
    signer: str

    @property
    def out(self) -> Path:
        return self.root / "out"

    @property
    def cluster_file(self) -> Path:
        return self.root / "cluster.yaml"

    @property
    def profile_file(self) -> Path:
        return self.root / "releases" / "test.yaml"

    def write_profile(self, base_url: str, **overrides: object) -> None:
        self.profile_file.parent.mkdir(exist_ok=True)
        key = self.keyring.export(self.root / "signing-key.asc", self.signer)
        profile = {
            "base_url": base_url,
            "version": "current",
            "version_file": "version.txt",
            "version_key": "TEST_VERSION",
            "kernel": KERNEL,
            "image": IMAGE,
            "usr_member": "usr.squashfs",
            "signing_key": f"../{key.name}",
            "fingerprints": [self.signer],
            "kernel_args": "mount.usr=/dev/vda mount.usrfstype=squashfs root=/dev/vdb console=ttyS0",
            **overrides,
        }
        self.profile_file.write_text(yaml.safe_dump(profile))

    def write_cluster(self, vms: dict, **extra: object) -> None:
        doc = {"release": "test", "defaults": {"disk": "64M", "memory": 256}, "vms": vms, **extra}
        self.cluster_file.write_text(yaml.safe_dump(doc))

    def doit(self, *args: str, out: Path | None = None, **kw: object) -> DoitResult:
        return doit(*args, f"config={self.cluster_file}", f"out={out or self.out}", **kw)

    def images(self, version: str = "100.0.0") -> Path:
        return self.out / "images" / "test" / version

    def vm(self, name: str) -> Path:
        return self.out / "vms" / name
