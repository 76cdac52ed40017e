"""arm64 VMs: the profile's arch picks QEMU's binary, machine and accelerator; a cluster may
mix arches; bundles carry their arch. The boots of the arm64 mini release are behind the
slow marker (test_arm64_boot.py)."""

import json
import shutil
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import yaml
from support import PROJECT, Mirror, MirrorServer, Project, printed, rendered_domain, run


def add_arm64_profile(project: Project) -> None:
    """releases/test-arm64.yaml: the test mirror's release as an arm64 one."""
    profile = yaml.safe_load(project.profile_file.read_text())
    profile["arch"] = "arm64"
    profile["kernel_args"] = profile["kernel_args"].replace("console=ttyS0", "console=ttyAMA0")
    (project.profile_file.parent / "test-arm64.yaml").write_text(yaml.safe_dump(profile))


@pytest.fixture
def mixed(project: Project) -> Project:
    add_arm64_profile(project)
    project.write_cluster({"x1": {}, "a1": {"release": "test-arm64"}})
    result = project.doit()
    assert result.returncode == 0, result.stderr
    return project


def test_each_vm_runs_on_the_qemu_of_its_arch(mixed: Project):
    a1, x1 = (printed(mixed.vm(name) / "run.sh", {"LEANVM_ACCEL": "tcg"}) for name in ("a1", "x1"))
    assert a1[0] == "qemu-system-aarch64" and a1[a1.index("-machine") + 1] == "virt,gic-version=max"
    assert a1[a1.index("-accel") + 1] == "tcg"
    assert a1[a1.index("-cpu") + 1] == "max" and "console=ttyAMA0" in a1[a1.index("-append") + 1]
    assert a1[a1.index("-kernel") + 1] == str(mixed.out / "images" / "test-arm64" / "100.0.0" / "vmlinuz")
    assert x1[0] == "qemu-system-x86_64" and x1[x1.index("-machine") + 1] == "q35"
    assert x1[x1.index("-accel") + 1] == "tcg"
    # each release is downloaded, verified and extracted once, into its own images directory
    for release in ("test", "test-arm64"):
        assert (mixed.out / "images" / release / "100.0.0" / "usr.img").is_file()


def test_auto_never_picks_kvm_for_a_guest_of_another_arch(mixed: Project):
    """/dev/kvm exists here, and this host is x86_64: an arm64 guest is emulated (TCG)."""
    a1 = printed(mixed.vm("a1") / "run.sh", {"LEANVM_ACCEL": "auto"})
    assert a1[a1.index("-accel") + 1] == "tcg" and a1[a1.index("-cpu") + 1] == "max"
    forced = run([str(mixed.vm("a1") / "run.sh"), "--print"], env={"LEANVM_ACCEL": "kvm", "PATH": "/usr/bin:/bin"},
                 capture_output=True, text=True, timeout=30)
    assert forced.returncode == 1 and forced.stderr.count("\n") == 1, forced.stderr
    assert "LEANVM_ACCEL=kvm cannot run VM a1 (arm64) on this amd64 host" in forced.stderr


def test_a_missing_qemu_names_the_package_of_the_arch(mixed: Project):
    result = run([str(mixed.vm("a1") / "run.sh")], env={"LEANVM_ACCEL": "tcg", "LEANVM_QEMU": "no-such-qemu",
                                                        "PATH": "/usr/bin:/bin"},
                 capture_output=True, text=True, timeout=30)
    assert result.returncode == 1 and "apt-get install qemu-system-arm" in result.stderr, result.stderr


def test_libvirt_domains_follow_the_arch(mixed: Project):
    assert mixed.doit("libvirt").returncode == 0
    a1_xml = rendered_domain(mixed.out, "a1", "tcg")
    a1, x1 = ET.parse(a1_xml).getroot(), ET.parse(rendered_domain(mixed.out, "x1")).getroot()
    assert a1.find("os/type").get("arch") == "aarch64" and a1.find("os/type").get("machine") == "virt"
    assert a1.find("features") is None  # no ACPI on an arm64 -kernel boot: a device tree describes the machine
    assert x1.find("os/type").get("arch") == "x86_64" and x1.find("os/type").get("machine") == "q35"
    check = subprocess.run(["virt-xml-validate", str(a1_xml)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr


def test_an_arm64_bundle_refuses_to_unbundle_as_amd64(project: Project, tmp_path: Path):
    add_arm64_profile(project)
    project.write_cluster({"a1": {}}, release="test-arm64")
    assert project.doit().returncode == 0
    assert project.doit("bundle").returncode == 0
    (archive,) = project.out.glob("bundles/*.tar.gz")

    def unbundle(*args: str) -> subprocess.CompletedProcess:
        return run([str(PROJECT / ".venv" / "bin" / "python"), "-m", "leanvm.ship.bundle", "unbundle", *args],
                   capture_output=True, text=True, timeout=120)

    refused = unbundle("--arch", "amd64", str(archive), str(tmp_path / "amd64"))
    assert refused.returncode != 0 and refused.stderr.count("\n") == 1, refused.stderr
    assert "holds VMs of arch arm64, not amd64" in refused.stderr
    assert not (tmp_path / "amd64").exists()  # refused before anything was written
    unpacked = unbundle("--arch", "arm64", str(archive), str(tmp_path / "arm64"))
    assert unpacked.returncode == 0, unpacked.stderr
    manifest = json.loads((tmp_path / "arm64" / "MANIFEST.json").read_text())
    assert manifest["arches"] == ["arm64"] and manifest["releases"] == {"test-arm64": "100.0.0"}
    assert printed(tmp_path / "arm64" / "vms" / "a1" / "run.sh", {"LEANVM_ACCEL": "tcg"})[0] == "qemu-system-aarch64"


def test_two_profiles_of_one_name_and_a_bad_arch_are_one_line(project: Project):
    add_arm64_profile(project)
    (project.root / "elsewhere").mkdir()
    (project.root / "elsewhere" / "test.yaml").write_text(project.profile_file.read_text())
    project.write_cluster({"x1": {}, "a1": {"release": "elsewhere/test.yaml"}})
    clash = project.doit("list")
    assert clash.returncode != 0 and clash.stderr.count("\n") == 1, clash.stderr
    assert "vms.a1.release: " in clash.stderr and "rename one of the profile files" in clash.stderr
    profile = yaml.safe_load(project.profile_file.read_text())
    project.profile_file.write_text(yaml.safe_dump({**profile, "arch": "riscv"}))
    project.write_cluster({"x1": {}})
    bad = project.doit("list")
    assert bad.returncode != 0 and bad.stderr.count("\n") == 1, bad.stderr
    assert "test.yaml: arch: unknown arch 'riscv'; use one of: amd64, arm64" in bad.stderr


def test_images_of_one_version_from_another_arch_url_are_fetched_again(project: Project, mirror: Mirror,
                                                                       server: MirrorServer):
    """Flatcar's amd64 and arm64 releases share version numbers: a profile switched to
    arm64-usr/ under the same name must not be served the amd64 images (a CI cache keyed on
    the profile name would restore them)."""
    assert project.doit().returncode == 0
    shutil.copytree(mirror.root / "100.0.0", mirror.root / "arm64-usr" / "100.0.0")
    shutil.copytree(mirror.root / "current", mirror.root / "arm64-usr" / "current")
    project.write_profile(server.url + "arm64-usr/", arch="arm64")
    again = project.doit()
    assert again.returncode == 0, again.stderr
    assert {"download:test:kernel", "download:test:image", "extract:test"} <= again.executed
    assert "came from " + server.url + "100.0.0/" in again.stderr
    assert project.doit().executed.isdisjoint({"download:test:kernel", "extract:test"})  # and then kept
