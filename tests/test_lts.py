"""Flatcar LTS's dracut initrd, on leanvm's kernel command lines: bootengine's own generators
(tests/data/bootengine, see SOURCE.md) and this host's systemd 252 fstab generator (LTS
2023/2024 ship systemd 252 too) write the mount units, and the /usr options they end up with
are mounted for real: a squashfs on a read-only loop device, as QEMU's readonly=on disk is."""

import re
import subprocess
from pathlib import Path

import pytest
import yaml
from support import PROJECT, Project, run, sh

BOOTENGINE = PROJECT / "tests" / "data" / "bootengine"
RELEASES = PROJECT / "configs" / "releases"
FSTAB_GENERATOR = Path("/usr/lib/systemd/system-generators/systemd-fstab-generator")
AMD64_BUILT_IN = "rootflags=rw mount.usrflags=ro"  # Flatcar's amd64 CONFIG_CMDLINE, before -append's words
OEM_MOUNT = {"lts-2023": "sysroot-usr-share-oem.mount", "lts-2024": "sysroot-oem.mount"}

# Run the generators as the initrd would, in a mount namespace of their own: /proc/cmdline is
# the given line, /run a fresh tmpfs (usr-generator writes a unit there), $1 the unit directory.
GENERATE = r"""
set -eu
printf '%s\n' "$CMDLINE" >"$WORK/cmdline"
mount --bind "$WORK/cmdline" /proc/cmdline
mount -t tmpfs tmpfs /run
SYSTEMD_IN_INITRD=1 SYSTEMD_PROC_CMDLINE="$CMDLINE" "$FSTAB_GENERATOR" "$UNITS" "$UNITS" "$UNITS" 2>/dev/null
USR_GENERATOR_CMDLINE="$CMDLINE" bash "$STREAM/usr-generator" "$UNITS"
bash "$STREAM/diskless-generator" "$UNITS"
"""


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
           "STREAM": str(BOOTENGINE / stream), "FSTAB_GENERATOR": str(FSTAB_GENERATOR)}
    result = run(["unshare", "--mount", "--propagation", "private", "sh", "-c", GENERATE], env=env,
                 capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
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
