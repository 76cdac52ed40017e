"""The one map of out/: every path leanvm writes or reads there.

The shell scripts get their per-VM paths from the VM's values file (`values`), which holds
them relative to out/, so that out/ stays relocatable.
"""

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Layout:
    out: Path

    # --- doit's own files, and the cluster's scripts ------------------------------------
    @property
    def lock(self) -> Path:
        return self.out / ".lock"

    @property
    def doit_db(self) -> Path:
        return self.out / ".doit.db"

    def script(self, name: str) -> Path:
        """lib.sh, cluster.sh, libvirt.sh."""
        return self.out / name

    # --- releases ---------------------------------------------------------------------
    def release_images(self, release: str) -> Path:
        return self.out / "images" / release

    def images(self, release: str, version: str) -> Path:
        """The published kernel, initrd and usr.img of one release version."""
        return self.release_images(release) / version

    def image_dirs(self) -> list[Path]:
        return sorted(p for p in (self.out / "images").glob("*/*") if p.is_dir())

    def current_version(self, release: str, stream: str = "current") -> Path:
        """The version a stream (`current`, `current-2024`) resolved to last."""
        return self.release_images(release) / f".{stream}-version"

    def cache(self, release: str, version: str) -> Path:
        """Downloads and their signatures, before they are verified and published."""
        return self.out / "cache" / release / version

    # --- VMs --------------------------------------------------------------------------
    @property
    def vms(self) -> Path:
        return self.out / "vms"

    def vm(self, name: str) -> Path:
        return self.vms / name

    def run_sh(self, name: str) -> Path:
        return self.vm(name) / "run.sh"

    def user_data(self, name: str) -> Path:
        """The user_data the config drive holds, as a plain file beside it (what was put there)."""
        return self.vm(name) / "config" / "openstack" / "latest" / "user_data"

    def config_drive(self, name: str) -> Path:
        """The config drive: an ISO 9660 image labelled config-2 holding openstack/latest/user_data."""
        return self.vm(name) / "config.iso"

    def ignition(self, name: str) -> Path:
        return self.vm(name) / "ignition.json"

    def domain_xml(self, name: str) -> Path:
        """The libvirt domain `leanvm libvirt` defined last for the VM (define and start write it)."""
        return self.vm(name) / "domain.xml"

    @property
    def values_dir(self) -> Path:
        return self.out / "state" / "vms"

    def values(self, name: str) -> Path:
        """The VM's values file (identity, boot arguments, paths): kept by `doit clean`."""
        return self.values_dir / f"{name}.env"

    @property
    def owner(self) -> Path:
        """The cluster file this out/ belongs to."""
        return self.out / "state" / "cluster-file"

    # --- shared by the VMs ------------------------------------------------------------
    @property
    def ssh(self) -> Path:
        return self.out / "ssh"

    @property
    def libvirt(self) -> Path:
        return self.out / "libvirt"

    @property
    def bundles(self) -> Path:
        return self.out / "bundles"

    @property
    def snapshots(self) -> Path:
        """cluster.sh snapshot's: SNAP/{manifest,B3SUMS,NAME/...} (VM state: `doit clean` keeps them)."""
        return self.out / "snapshots"

    def snapshot(self, name: str) -> Path:
        return self.snapshots / name
