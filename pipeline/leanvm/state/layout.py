"""The one map of out/: every path leanvm writes or reads there.

Each name is spelled once, in `Names`; Layout joins them for Python (the build and out/'s
runtime alike). The entry points run.sh, cluster.sh and libvirt.sh name only what they hand
over to (a lint test holds them to it). Paths stay relative to out/ in what is recorded there,
so that out/ stays relocatable.
"""

from pathlib import Path


class Names:
    """Every name in out/: OUT_* relative to out/, VM_* in a VM's directory (out/vms/NAME),
    IMAGE_* in a release version's images, SNAPSHOT_* in a snapshot, NET_* in out/net (the
    cluster switch), SSH_* in out/ssh, LIBVIRT_* in out/libvirt."""

    OUT_VMS = "vms"
    OUT_VALUES = "state/vms"  # NAME.env: a VM's values file
    OUT_IMAGES = "images"
    OUT_CACHE = "cache"
    OUT_SSH = "ssh"
    OUT_NET = "net"
    OUT_LIBVIRT = "libvirt"
    OUT_BUNDLES = "bundles"
    OUT_SNAPSHOTS = "snapshots"
    OUT_RUNTIME = "leanvm-runtime.pyz"  # the runtime (leanvm.runtime) as a zipapp for python3
    VM_RUN_SH = "run.sh"
    VM_ROOT_DISK = "rootfs.img"
    VM_OEM_DISK = "oem.img"
    VM_CONFIG_DRIVE = "config.iso"
    VM_IGNITION = "ignition.json"
    VM_DOMAIN_XML = "domain.xml"
    VM_QEMU_PID = "qemu.pid"  # QEMU's -pidfile
    VM_RUN_LOCK = "run.lock"  # held by run.sh while it runs the VM
    VM_CONSOLE = "console.log"
    VM_RUN_LOG = "run.log"  # a detached run.sh's own messages
    VM_QMP = "qmp.sock"  # QEMU's QMP socket (cluster.sh and cluster.sh monitor talk to QEMU there)
    VM_FORCED_STOP = "forced-stop"  # why the VM was stopped by force
    VM_BOOT_FAILED = "boot-failed"  # the console line of a failed boot
    VM_RESTORED = "restored"  # run.sh's line once a restored VM runs
    VM_RESUMED = "resumed"  # written once a restored VM's QEMU runs the snapshot's state
    IMAGE_KERNEL = "vmlinuz"
    IMAGE_INITRD = "initrd"
    IMAGE_USR = "usr.img"
    SNAPSHOT_MANIFEST = "manifest"
    SNAPSHOT_DIGESTS = "B3SUMS"
    SNAPSHOT_MEMORY = "memory"  # in SNAP/NAME/, beside the VM's disks
    SNAPSHOT_VALUES = "values.env"  # in SNAP/NAME/
    SNAPSHOT_OWNER = "owner"  # in .SNAP.part/ and .restoring-SNAP/: the pid of the command at work
    SNAPSHOT_PAUSED = "paused"  # in .SNAP.part/: the VMs it may have paused
    NET_SWITCH = "switch"
    NET_SWITCH_PID = "switch.pid"
    NET_LOCK = "lock"
    NET_USERS = "users"  # one file per VM using the switch
    SSH_KEY = "id_ed25519"
    SSH_KNOWN_HOSTS = "known_hosts"
    LIBVIRT_ENV = "cluster.env"


def names() -> dict[str, str]:
    """Every name of `Names`, by its variable name (what the shell gets)."""
    return {key: value for key, value in vars(Names).items() if key.isupper()}


class Layout:
    """Paths under out/. (A plain class: out/'s runtime imports it, and dataclasses costs a VM's
    launcher a megabyte.)"""

    def __init__(self, out: Path) -> None:
        self.out = out

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Layout) and other.out == self.out

    def __hash__(self) -> int:
        return hash(self.out)

    # --- doit's own files, and the cluster's scripts ------------------------------------
    @property
    def lock(self) -> Path:
        return self.out / ".lock"

    @property
    def doit_db(self) -> Path:
        return self.out / ".doit.db"

    def script(self, name: str) -> Path:
        """cluster.sh, libvirt.sh, leanvm-runtime.pyz."""
        return self.out / name

    # --- releases ---------------------------------------------------------------------
    def release_images(self, release: str) -> Path:
        return self.out / Names.OUT_IMAGES / release

    def images(self, release: str, version: str) -> Path:
        """The published kernel, initrd and usr.img of one release version."""
        return self.release_images(release) / version

    def image_dirs(self) -> list[Path]:
        return sorted(p for p in (self.out / Names.OUT_IMAGES).glob("*/*") if p.is_dir())

    def current_version(self, release: str, stream: str = "current") -> Path:
        """The version a stream (`current`, `current-2024`) resolved to last."""
        return self.release_images(release) / f".{stream}-version"

    def cache(self, release: str, version: str) -> Path:
        """Downloads and their signatures, before they are verified and published."""
        return self.out / Names.OUT_CACHE / release / version

    # --- VMs --------------------------------------------------------------------------
    @property
    def vms(self) -> Path:
        return self.out / Names.OUT_VMS

    def vm(self, name: str) -> Path:
        return self.vms / name

    def run_sh(self, name: str) -> Path:
        return self.vm(name) / Names.VM_RUN_SH

    def user_data(self, name: str) -> Path:
        """The user_data the config drive holds, as a plain file beside it (what was put there)."""
        return self.vm(name) / "config" / "openstack" / "latest" / "user_data"

    def config_drive(self, name: str) -> Path:
        """The config drive: an ISO 9660 image labelled config-2 holding openstack/latest/user_data."""
        return self.vm(name) / Names.VM_CONFIG_DRIVE

    def ignition(self, name: str) -> Path:
        return self.vm(name) / Names.VM_IGNITION

    def root_disk(self, name: str) -> Path:
        return self.vm(name) / Names.VM_ROOT_DISK

    def qemu_pid(self, name: str) -> Path:
        return self.vm(name) / Names.VM_QEMU_PID

    def domain_xml(self, name: str) -> Path:
        """The libvirt domain `leanvm libvirt` defined last for the VM (define and start write it)."""
        return self.vm(name) / Names.VM_DOMAIN_XML

    @property
    def values_dir(self) -> Path:
        return self.out / Names.OUT_VALUES

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
        return self.out / Names.OUT_SSH

    @property
    def libvirt(self) -> Path:
        return self.out / Names.OUT_LIBVIRT

    @property
    def bundles(self) -> Path:
        return self.out / Names.OUT_BUNDLES

    @property
    def snapshots(self) -> Path:
        """cluster.sh snapshot's: SNAP/{manifest,B3SUMS,NAME/...} (VM state: `doit clean` keeps them)."""
        return self.out / Names.OUT_SNAPSHOTS

    def snapshot(self, name: str) -> Path:
        return self.snapshots / name
