"""Flatcar LTS's dracut initrd, on leanvm's kernel command lines: the two rules of its own
generators that decide how /usr, the root and the OEM partition are mounted (stated here,
each with its source), with this host's systemd 252 fstab generator (LTS 2023/2024 ship
systemd 252 too) writing the mount units as in that initrd; the /usr options they end up
with are mounted for real: a squashfs on a read-only loop device, as QEMU's readonly=on
disk is."""

import re
import subprocess
from pathlib import Path

import pytest
import yaml
from support import PROJECT, Project, run, sh

RELEASES = PROJECT / "configs" / "releases"
FSTAB_GENERATOR = Path("/usr/lib/systemd/system-generators/systemd-fstab-generator")
AMD64_BUILT_IN = "rootflags=rw mount.usrflags=ro"  # Flatcar's amd64 CONFIG_CMDLINE, before -append's words
# Where the LTS initrd mounts the OEM partition: bootengine dracut/10diskless-generator/
# diskless-generator, flatcar-3510-backport @ d33a8f0e8ba16a9da632652a1ca152d4777cd575 (LTS
# 2023: /usr/share/oem) and flatcar-master @ 6c2fba412dbce9a011535a9e57332e1307072855 (LTS 2024: /oem).
OEM_AT = {"lts-2023": "/sysroot/usr/share/oem", "lts-2024": "/sysroot/oem"}
OEM_MOUNT = {"lts-2023": "sysroot-usr-share-oem.mount", "lts-2024": "sysroot-oem.mount"}

# systemd's fstab generator as the initrd runs it, in a mount namespace of its own (/proc/cmdline
# is the given line); it writes sysroot.mount (root=) and sysusr-usr.mount (mount.usr=).
FSTAB = r"""
set -eu
printf '%s\n' "$CMDLINE" >"$WORK/cmdline"
mount --bind "$WORK/cmdline" /proc/cmdline
SYSTEMD_IN_INITRD=1 SYSTEMD_PROC_CMDLINE="$CMDLINE" "$FSTAB_GENERATOR" "$UNITS" "$UNITS" "$UNITS" 2>/dev/null
"""


def last_value(cmdline: str, name: str, default: str) -> str:
    """The value of the last NAME= on the command line (how bootengine's generators read it)."""
    values = [word.split("=", 1)[1] for word in cmdline.split() if word.split("=", 1)[0] == name and "=" in word]
    return values[-1] if values else default


def bootengine_rules(cmdline: str, stream: str, units: Path) -> None:
    """The LTS initrd's own generators, as rules (same commits as OEM_AT; the usr rule is the
    same in both, and on master since c1ae115, 2023-01):
    - usr-generator (dracut/10usr-generator): with `mount.usr=` (no `usr=`), when the last
      `mount.usrflags=` (default `ro`) holds the item `ro`, a drop-in
      sysusr-usr.mount.d/10-norecovery.conf sets Options= to that value plus `,norecovery`,
      replacing the options systemd's fstab generator gave the unit.
    - diskless-generator: with `mount.usr=` and `root=` given it writes no root or /usr unit
      (systemd's fstab generator does), only the OEM mount: What=/dev/disk/by-label/OEM at
      OEM_AT[stream], Type=auto, Options=nodev."""
    flags = last_value(cmdline, "mount.usrflags", "ro")
    if "ro" in flags.split(","):
        drop_in = units / "sysusr-usr.mount.d"
        drop_in.mkdir()
        (drop_in / "10-norecovery.conf").write_text(f"[Mount]\nOptions={flags},norecovery\n")
    (units / OEM_MOUNT[stream]).write_text(
        f"[Mount]\nWhat=/dev/disk/by-label/OEM\nWhere={OEM_AT[stream]}\nType=auto\nOptions=nodev\n")


def profile_args(name: str) -> tuple[str, str]:
    profile = yaml.safe_load((RELEASES / f"{name}.yaml").read_text())
    return " ".join(profile["kernel_args"].split()), profile.get("arch", "amd64")


def command_line(name: str) -> str:
    """What the kernel sees: the amd64 built-in line, then what leanvm passes with -append."""
    args, arch = profile_args(name)
    return f"{AMD64_BUILT_IN} {args}" if arch == "amd64" else args


def generate(stream: str, cmdline: str, work: Path) -> Path:
    units = work / "units"
    units.mkdir(parents=True)
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "CMDLINE": cmdline, "WORK": str(work), "UNITS": str(units),
           "FSTAB_GENERATOR": str(FSTAB_GENERATOR)}
    result = run(["unshare", "--mount", "--propagation", "private", "sh", "-c", FSTAB], env=env,
                 capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    bootengine_rules(cmdline, stream, units)
    return units


def setting(unit: Path, key: str) -> str | None:
    found = re.findall(rf"^{key}=(.*)$", unit.read_text(), re.M)
    return found[-1] if found else None


def usr_options(units: Path) -> str:
    """/sysusr/usr's mount options as systemd applies them: the unit, then its drop-ins."""
    options = setting(units / "sysusr-usr.mount", "Options")
    for drop_in in sorted((units / "sysusr-usr.mount.d").glob("*.conf")):
        options = setting(drop_in, "Options") or options
    assert options is not None
    return options


def mount_squashfs(options: str, work: Path) -> subprocess.CompletedProcess:
    """Mount a real squashfs from a read-only loop device with `options`; the mount line if it worked."""
    (work / "tree").mkdir()
    (work / "tree" / "os-release").write_text("ID=flatcar\n")
    sh("mksquashfs", work / "tree", work / "usr.squashfs", "-quiet", "-noappend")
    (work / "mnt").mkdir()
    script = ('dev=$(losetup --read-only --find --show "$1"); trap \'losetup -d "$dev"\' EXIT; '
              'mount -t squashfs -o "$2" "$dev" "$3" && grep " $3 " /proc/mounts && umount "$3"')
    return run(["unshare", "--mount", "sh", "-c", script, "sh", str(work / "usr.squashfs"), options,
                str(work / "mnt")], capture_output=True, text=True, timeout=60)


pytestmark = pytest.mark.skipif(not FSTAB_GENERATOR.exists(), reason="needs systemd's fstab generator (systemd)")


@pytest.mark.parametrize("stream", ["lts-2023", "lts-2024"])
def test_todays_flatcar_arguments_would_give_squashfs_norecovery_on_lts(stream: str, tmp_path: Path):
    """Why LTS has its own profile: with the stable profile's `mount.usrflags=ro` the LTS
    initrd mounts /usr with `norecovery`, which squashfs refuses."""
    units = generate(stream, command_line("flatcar-stable"), tmp_path)
    assert "norecovery" in usr_options(units).split(",")
    refused = mount_squashfs(usr_options(units), tmp_path)
    assert refused.returncode != 0, refused.stdout


@pytest.mark.parametrize("profile", ["flatcar-lts", "flatcar-lts-arm64"])
@pytest.mark.parametrize("stream", ["lts-2023", "lts-2024"])
def test_the_lts_profiles_mount_usr_read_only_with_options_squashfs_accepts(stream: str, profile: str,
                                                                             tmp_path: Path):
    units = generate(stream, command_line(profile), tmp_path)
    options = usr_options(units)
    assert "norecovery" not in options and "ro" in options.split(","), options
    assert setting(units / "sysusr-usr.mount", "What") == "/dev/disk/by-partlabel/USR-A"
    assert setting(units / "sysusr-usr.mount", "Type") == "squashfs"
    mounted = mount_squashfs(options, tmp_path)
    assert mounted.returncode == 0, mounted.stderr
    fstype, mount_options = mounted.stdout.split()[2:4]
    assert fstype == "squashfs" and mount_options.split(",")[0] == "ro", mounted.stdout  # read-only, as asked


@pytest.mark.parametrize("stream", ["lts-2023", "lts-2024"])
def test_the_lts_initrd_finds_leanvms_root_and_oem_disks_by_label(stream: str, project: Project, tmp_path: Path):
    units = generate(stream, command_line("flatcar-lts"), tmp_path / "gen")
    assert setting(units / "sysroot.mount", "What") == "/dev/disk/by-label/ROOT"  # not the diskless tmpfs root
    assert setting(units / OEM_MOUNT[stream], "What") == "/dev/disk/by-label/OEM"
    assert not (units / "sysroot-usr.mount").exists() or "usr.squashfs" not in (units / "sysroot-usr.mount").read_text()
    assert project.doit().returncode == 0
    vm = project.vm("core1")
    labels = {disk: sh("blkid", "-p", "-s", "LABEL", "-o", "value", vm / disk).decode().strip()
              for disk in ("rootfs.img", "oem.img")}
    assert labels == {"rootfs.img": "ROOT", "oem.img": "OEM"}
    table = sh("sfdisk", "--json", project.images() / "usr.img").decode()
    assert '"name":"USR-A"' in table.replace(" ", "")
