"""Build a tiny release that boots the way Flatcar does, from Debian parts (offline demo).

Kernel and modules come from Debian's linux-image-ARCH; the initrd is busybox plus the
modules for virtio, squashfs, ext4 and isofs (resolved through modules.dep); usr.squashfs holds
busybox, Debian's dropbear sshd with its libraries, and an os-release; the image is a
gzip'd newc cpio holding it, like Flatcar's PXE image. Every file is signed by a demo key
made locally, published as a file:// mirror with release profiles that point at it.

For the host's arch (amd64 here) the programs are the host's own; for arm64 they come from
Debian's arm64 packages (debroot), so the arm64 release is built here too, offline but for
apt: mini.yaml and mini-vdx.yaml (amd64), mini-arm64.yaml (arm64).

    python -m leanvm_dev.minirelease [--out DIR] [--pad-mb N] [--arch amd64|arm64]
"""

import argparse
import hashlib
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import libarchive
import yaml
from leanvm.arch import Arch
from leanvm.errors import LeanvmError, report
from leanvm.fsutil import temp_path, write_atomic
from leanvm.proc import run, stop_gpg_agent
from libarchive.entry import FileType

from leanvm_dev import CHECKOUT, debroot, kmod
from leanvm_dev.debroot import Root

INIT_SCRIPT = Path(__file__).with_name("init.sh")
# loop: for PXE-style boots that mount /usr from a squashfs file held in the initramfs.
# qemu_fw_cfg: Ignition configs passed with -fw_cfg; button, evdev: the ACPI power button;
# virtio_balloon: free page reporting.
WANTED_MODULES = ("virtio_pci", "virtio_blk", "virtio_net", "squashfs", "ext4", "isofs", "loop",
                  "qemu_fw_cfg", "button", "evdev", "virtio_balloon")
# arm64: QEMU's virt machine has no ACPI power button without firmware; its power key is a
# GPIO key (PL061) described by the device tree, which needs gpio_keys (CONFIG_KEYBOARD_GPIO).
# Flatcar's arm64 kernel has no KEYBOARD_GPIO (flatcar/scripts coreos-modules
# arm64_defconfig-6.12 and commonconfig-6.12, branch flatcar-4593 @ a60da141), so it ignores
# that button: the arm64 mini release does too (cluster.sh down asks over ssh instead).
ARCH_MODULES: dict[Arch, tuple[str, ...]] = {Arch.AMD64: (), Arch.ARM64: ()}
# `sudo systemctl poweroff|reboot`, as core runs it on Flatcar (passwordless sudo): the mini
# release's stand-ins hand the request to its init through a FIFO that init reads as root.
POWER_SCRIPTS = {
    "sudo": '#!/bin/sh\n# leanvm mini release: core may (as on Flatcar, without a password). Setting the\n'
            '# clock (date -u -s @SECONDS) goes through init\'s FIFO, as root; the rest runs as the user.\n'
            'case $* in "date -u -s @"*) echo "clock ${4#@}" >/run/leanvm-power && exit 0 ;; esac\nexec "$@"\n',
    "systemctl": '#!/bin/sh\n# leanvm mini release: systemctl poweroff|reboot only, through init\'s FIFO\n'
                 'case ${1-} in poweroff|reboot) echo "$1" >/run/leanvm-power ;; *) echo "systemctl: $1: not in the '
                 'mini release" >&2; exit 1 ;; esac\n',
}
BUSYBOX = Path("/bin/busybox")  # Debian's busybox-static
# The Debian packages holding the programs, for a root of another arch (debroot.unpacked).
PACKAGES = ["busybox-static", "dropbear-bin", "ignition", "passwd"]
KERNEL, INITRD, IMAGE = "mini.vmlinuz", "mini.initrd.cpio.gz", "mini_image.cpio.gz"
DROPBEAR = Path("/usr/sbin/dropbear")  # Debian's dropbear-bin: the mini release's sshd
PROGRAMS = {DROPBEAR: "sbin/dropbear"}  # host file -> place in /usr
# The initrd runs the real Ignition (Debian's ignition, CoreOS Ignition 2.14), which creates
# users and groups with Debian's useradd, usermod and groupadd (passwd) under --root.
IGNITION = Path("/usr/lib/dracut/modules.d/30ignition/ignition")
INITRD_PROGRAMS = {IGNITION: "usr/bin/ignition", Path("/usr/sbin/useradd"): "usr/sbin/useradd",
                   Path("/usr/sbin/usermod"): "usr/sbin/usermod", Path("/usr/sbin/groupadd"): "usr/sbin/groupadd"}
# Debian's Ignition relabels what it wrote for SELinux; the mini release has no SELinux, so
# its initrd gives it a setfiles that does nothing (and a SELINUXTYPE=none config meanwhile).
SETFILES_STUB = b"#!/bin/sh\n# leanvm mini release: no SELinux, nothing to relabel\nexit 0\n"
# The Flatcar profiles' arguments, word for word; and the same disks named by /dev/vdX.
FLATCAR_ARGS = (
    "mount.usr=PARTLABEL=USR-A mount.usrfstype=squashfs mount.usrflags=ro "
    "root=LABEL=ROOT rootflags=rw console=ttyS0,115200n8 flatcar.autologin"
)
VDX_ARGS = "mount.usr=/dev/vda1 mount.usrfstype=squashfs mount.usrflags=ro root=/dev/vdb rootflags=rw console=ttyS0"
CONSOLES = {Arch.AMD64: "ttyS0", Arch.ARM64: "ttyAMA0"}
FIRST_BOOT_ARGS = "flatcar.first_boot=1"


@dataclass(frozen=True)
class Kernel:
    vmlinuz: Path
    modules: Path  # lib/modules/VERSION, with modules.dep made by depmod
    version: str


# --- kernel --------------------------------------------------------------------------

def kernel_package(arch: Arch) -> str:
    """The versioned package that linux-image-ARCH currently depends on."""
    for attempt in range(2):
        out = run(["apt-cache", "depends", debroot.apt_name(f"linux-image-{arch}", arch)], check=False).stdout.decode()
        for line in out.splitlines():
            name = line.strip().removeprefix("Depends:").strip()
            if line.strip().startswith("Depends:") and name.startswith("linux-image-"):
                return debroot.apt_name(name.split(":")[0], arch)
        if attempt == 0:
            run(["apt-get", "update", "-q"])  # a fresh machine may have no package lists yet
    raise LeanvmError(f"apt-cache knows no linux-image-{arch}", "check /etc/apt/sources.list and the network")


def _apt_download(package: str, where: Path) -> Path:
    try:
        run(["apt-get", "download", package], cwd=where)
    except LeanvmError:
        run(["apt-get", "update", "-q"])
        run(["apt-get", "download", package], cwd=where)
    return next(where.glob(f"{package.split(':')[0]}_*.deb"))


def wanted_modules(arch: Arch) -> tuple[str, ...]:
    return WANTED_MODULES + ARCH_MODULES[arch]


def fetch_kernel(cache: Path, arch: Arch) -> Kernel:
    """Download and unpack Debian's kernel once; later calls reuse the cache.

    Only the kernel, the modules.* indexes and the modules the initrd needs are kept (a few
    MB instead of the package's ~400 MB); the cache is made again if that set changes.
    """
    done = cache / "kernel.ready"
    wanted = " ".join(wanted_modules(arch))
    if not done.exists() or done.read_text().split("\n")[1:2] != [wanted]:
        shutil.rmtree(cache, ignore_errors=True)
        (cache / "deb").mkdir(parents=True)
        debroot.add_architecture(arch)
        deb = _apt_download(kernel_package(arch), cache / "deb")
        run(["dpkg-deb", "-x", deb, cache / "root"])
        shutil.rmtree(cache / "deb")
        version = next((cache / "root" / "lib" / "modules").iterdir()).name
        run(["depmod", "-b", cache / "root", version])
        kmod.keep_only(cache / "root" / "lib" / "modules" / version, kmod.resolve_modules(
            cache / "root" / "lib" / "modules" / version, wanted_modules(arch)))
        done.write_text(f"{version}\n{wanted}\n")
    version = done.read_text().split("\n")[0]
    root = cache / "root"
    return Kernel(root / "boot" / f"vmlinuz-{version}", root / "lib" / "modules" / version, version)


# --- archives ------------------------------------------------------------------------

def _file_blocks(path: Path) -> Iterator[bytes]:
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            yield block


def write_cpio_gz(dest: Path, files: dict[str, Path | bytes], mode: dict[str, int] | None = None) -> None:
    """A gzip'd newc cpio (the initramfs format) with parent directories, via libarchive."""
    mode = mode or {}
    dirs = sorted({str(Path(name).parents[i]) for name in files for i in range(len(Path(name).parents) - 1)})
    tmp = temp_path(dest)
    with libarchive.file_writer(str(tmp), "cpio_newc", "gzip") as archive:
        for d in dirs:
            archive.add_file_from_memory(d, 0, b"", filetype=FileType.DIRECTORY, permission=0o755)
        for name, content in files.items():
            if isinstance(content, Path):
                size, data = content.stat().st_size, _file_blocks(content)
            else:
                size, data = len(content), content
            archive.add_file_from_memory(name, size, data, permission=mode.get(name, 0o644))
    os.replace(tmp, dest)


def make_initrd(dest: Path, kernel: Kernel, root: Root) -> None:
    order = kmod.resolve_modules(kernel.modules, wanted_modules(root.arch))
    files: dict[str, Path | bytes] = {
        "init": INIT_SCRIPT.read_bytes(),
        "bin/busybox": root.file(BUSYBOX),
        "lib/modules/load.order": "".join(f"{m}\n" for m in order).encode(),
    }
    files.update({f"lib/modules/{m}": kernel.modules / m for m in order})
    for empty in ("dev", "proc", "sys", "sysroot", "mnt/config", "run"):
        files[f"{empty}/.keep"] = b""
    files["usr/sbin/setfiles"] = SETFILES_STUB
    for program, place in INITRD_PROGRAMS.items():
        files[place] = debroot.real_path(root, root.file(program))
        files.update(debroot.shared_libraries(root, root.file(program)))
    loaders = {name for name in files if Path(name).name.startswith("ld-linux")}  # the kernel execs them
    executable = {"init", "bin/busybox", "usr/sbin/setfiles", *INITRD_PROGRAMS.values(), *loaders}
    write_cpio_gz(dest, files, {name: 0o755 for name in executable})


def applets() -> list[str]:
    """busybox's applets. The host's busybox-static lists them (a foreign one cannot run
    here); Debian builds every arch's busybox-static from one source and config."""
    return [a for a in run([BUSYBOX, "--list"]).stdout.decode().split() if a != "busybox"]


def make_usr(dest: Path, root: Root, version: str, pad_mb: int) -> None:
    """usr.squashfs: busybox and its applets, Debian's dropbear sshd with the libraries it
    loads, an os-release, .noupdate and optional incompressible padding."""
    tree = dest.with_name("usr-tree")
    shutil.rmtree(tree, ignore_errors=True)
    for d in ("bin", "sbin", "lib64", f"lib/{root.triplet}"):
        (tree / d).mkdir(parents=True)
    shutil.copy2(root.file(BUSYBOX), tree / "bin" / "busybox")
    for applet in applets():
        (tree / "bin" / applet).symlink_to("busybox")
    for name, text in POWER_SCRIPTS.items():
        (tree / "bin" / name).write_text(text)
        (tree / "bin" / name).chmod(0o755)
    # busybox sh runs its own applets, ping included, in-process: core's shell needs raw
    # sockets for ping, as Flatcar's ping has (squashfs keeps the capability xattr).
    run(["setcap", "cap_net_raw+ep", tree / "bin" / "busybox"])
    for program, place in PROGRAMS.items():
        shutil.copy2(debroot.real_path(root, root.file(program)), tree / place)
        for lib_place, lib in debroot.shared_libraries(root, root.file(program)).items():
            (tree / lib_place).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(lib, tree / lib_place)
    # as Flatcar's PXE usr.squashfs (flatcar/scripts build_library/vm_image_util.sh): it
    # turns update-engine and the real root's OEM mount off
    (tree / ".noupdate").write_text("")
    (tree / ".noupdate").chmod(0o444)
    (tree / "lib" / "os-release").write_text(
        f'NAME="leanvm mini"\nID=leanvm-mini\nVERSION_ID={version}\nPRETTY_NAME="leanvm mini release {version}"\n'
    )
    if pad_mb:
        (tree / "share").mkdir()
        with open(tree / "share" / "padding", "wb") as f:
            for _ in range(pad_mb):
                f.write(os.urandom(1 << 20))
    run(["mksquashfs", tree, dest, "-noappend", "-quiet", "-all-root"])
    shutil.rmtree(tree)


# --- signing and publishing ----------------------------------------------------------

def gpg(home: Path) -> list[str | Path]:
    """gpg on a GNUPGHOME of ours, never prompting (the demo key has no passphrase)."""
    return ["gpg", "--homedir", home, "--batch", "--yes", "--pinentry-mode", "loopback", "--passphrase", ""]


@contextmanager
def gnupg_home(keep: Path) -> Iterator[Path]:
    """A GNUPGHOME at a short temporary path holding the demo key kept in `keep`. gpg-agent's
    socket lives in the home, and a Unix socket path has at most 107 bytes: signing from a
    checkout at a deep path would fail with "No agent running"."""
    keep.mkdir(parents=True, exist_ok=True, mode=0o700)
    transient = shutil.ignore_patterns("S.*", "*.lock", ".#*")  # sockets and locks
    with tempfile.TemporaryDirectory(prefix="leanvm-gpg-") as tmp:
        home = Path(tmp)
        shutil.copytree(keep, home, dirs_exist_ok=True, ignore=transient)
        try:
            yield home
        finally:
            stop_gpg_agent(home)
        shutil.copytree(home, keep, dirs_exist_ok=True, ignore=transient)


def demo_key(home: Path) -> str:
    """The fingerprint of the local demo signing key, made on first use."""
    listing = run([*gpg(home), "--with-colons", "--list-secret-keys"], check=False).stdout.decode()
    if "fpr:" not in listing:
        run([*gpg(home), "--quick-gen-key", "leanvm mini release demo key", "ed25519", "sign", "0"])
        listing = run([*gpg(home), "--with-colons", "--list-secret-keys"]).stdout.decode()
    return next(line.split(":")[9] for line in listing.splitlines() if line.startswith("fpr:"))


def sign(home: Path, fingerprint: str, path: Path) -> None:
    run([*gpg(home), "--local-user", fingerprint, "--detach-sign", "--output", f"{path}.sig", path])


def write_profile(dest: Path, mirror: Path, key: Path, fingerprint: str, kernel_args: str, arch: Arch) -> None:
    profile = {
        "arch": arch.value,
        "base_url": mirror.as_uri() + "/",
        "version": "current",
        "version_file": "version.txt",
        "version_key": "MINI_VERSION",
        "kernel": KERNEL,
        "initrd": INITRD,
        "image": IMAGE,
        "usr_member": "usr.squashfs",
        "signature_suffix": ".sig",
        "signing_key": os.path.relpath(key, dest.parent),
        "fingerprints": [fingerprint],
        "kernel_args": kernel_args,
        "ignition_fw_cfg": "opt/org.flatcar-linux/config",
        "first_boot_args": FIRST_BOOT_ARGS,
        # the mini release runs Debian's Ignition 2.14: spec 3.0.0-3.3.0, no 2.x translation
        "ignition_specs": {"default": "3.0.0-3.3.0"},
    }
    header = "# leanvm mini release (generated by python -m leanvm_dev.minirelease)\n"
    write_atomic(dest, (header + yaml.safe_dump(profile, sort_keys=False)).encode())


def publish_version(work: Path, vdir: Path, kernel: Kernel, root: Root, pad_mb: int,
                    sign_file: Callable[[Path], None]) -> None:
    """Write and sign one version of the mini release into the mirror directory vdir."""
    work.mkdir(parents=True, exist_ok=True)
    make_usr(work / "usr.squashfs", root, vdir.name, pad_mb)
    vdir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(kernel.vmlinuz, vdir / KERNEL)
    make_initrd(vdir / INITRD, kernel, root)
    write_cpio_gz(vdir / IMAGE, {"usr.squashfs": work / "usr.squashfs"})
    (work / "usr.squashfs").unlink()
    for name in (KERNEL, INITRD, IMAGE):
        sign_file(vdir / name)


def program_root(out: Path, arch: Arch) -> Root:
    """The programs of the release: the host's (checked to be there), or Debian's of `arch`."""
    if arch is not debroot.host_arch():
        return debroot.unpacked(PACKAGES, arch, out / f"root-{arch}")
    for program, package in ((DROPBEAR, "dropbear-bin"), (IGNITION, "ignition"), (Path("/usr/sbin/useradd"), "passwd"),
                             (BUSYBOX, "busybox-static")):
        if not program.exists():
            raise LeanvmError(f"{program}: not found", f"install it: apt-get install {package}")
    return Root(Path("/"), arch)


def suffix(arch: Arch) -> str:
    """What names the arch's files: nothing for amd64 (mini.yaml, mirror/), -arm64 else."""
    return "" if arch is Arch.AMD64 else f"-{arch}"


def build(out: Path, pad_mb: int = 0, arch: Arch = Arch.AMD64) -> Path:
    """Build the mini release for `arch` under `out`; returns the directory holding its
    profiles (mini.yaml and mini-vdx.yaml for amd64, mini-arm64.yaml for arm64)."""
    kernel = fetch_kernel(out / f"kernel{suffix(arch)}", arch)
    root = program_root(out, arch)
    programs = b"".join(hashlib.sha256(debroot.real_path(root, root.file(p)).read_bytes()).digest()
                        for p in [BUSYBOX, *PROGRAMS, *INITRD_PROGRAMS])
    inputs = (Path(__file__).read_bytes() + INIT_SCRIPT.read_bytes() + programs
              + f"{kernel.version}/{pad_mb}/{arch}".encode())
    version = f"1.{pad_mb}.{hashlib.sha256(inputs).hexdigest()[:8]}"
    mirror = out / f"mirror{suffix(arch)}"
    vdir = mirror / version
    key = out / "demo-signing-key.asc"
    with gnupg_home(out / "gnupg") as home:
        fingerprint = demo_key(home)
        if not (vdir / f"{IMAGE}.sig").exists():
            publish_version(out / f"work{suffix(arch)}", vdir, kernel, root, pad_mb,
                            lambda path: sign(home, fingerprint, path))
        key.write_bytes(run([*gpg(home), "--armor", "--export", fingerprint]).stdout)
    write_atomic(mirror / "current" / "version.txt", f"MINI_VERSION={version}\n".encode())
    console = CONSOLES[arch]
    write_profile(out / f"mini{suffix(arch)}.yaml", mirror, key, fingerprint,
                  FLATCAR_ARGS.replace("console=ttyS0", f"console={console}"), arch)
    if arch is Arch.AMD64:
        write_profile(out / "mini-vdx.yaml", mirror, key, fingerprint, VDX_ARGS, arch)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m leanvm_dev.minirelease", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=CHECKOUT / "out" / "minirelease")
    parser.add_argument("--pad-mb", type=int, default=0, help="pad /usr with N MiB of random data")
    parser.add_argument("--arch", type=Arch, choices=list(Arch), default=Arch.AMD64)
    args = parser.parse_args(argv)
    try:
        out = build(args.out.resolve(), args.pad_mb, args.arch)
    except LeanvmError as e:
        return report(e)
    print(f"mini release profile: {out / f'mini{suffix(args.arch)}.yaml'} (Flatcar's arguments)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
