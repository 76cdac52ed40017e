"""Download -> verify -> extract against a signed mirror on loopback."""

import itertools
from pathlib import Path

import yaml
from leanvm.config.load import load_profile
from support import IMAGE, KERNEL, Mirror, MirrorServer, Project, usr_partition


def test_clean_build_is_byte_identical_and_second_run_executes_nothing(project: Project, mirror: Mirror):
    first = project.doit()
    assert first.returncode == 0, first.stderr
    images = project.images()
    assert (images / "vmlinuz").read_bytes() == (mirror.root / "100.0.0" / KERNEL).read_bytes()
    assert usr_partition(images / "usr.img") == mirror.squashfs("100.0.0").read_bytes()
    assert {"download:test:kernel", "verify:test:image", "extract:test"} <= first.executed
    second = project.doit()
    assert second.returncode == 0, second.stderr
    assert second.executed == set()


def test_flipped_byte_fails_names_file_and_fixed_mirror_builds(project: Project, mirror: Mirror, server):
    image = mirror.root / "100.0.0" / IMAGE
    good = image.read_bytes()
    image.write_bytes(good[:1000] + bytes([good[1000] ^ 0xFF]) + good[1001:])
    bad = project.doit()
    assert bad.returncode != 0
    lines = bad.stderr.strip().splitlines()
    assert len(lines) == 1 and IMAGE in lines[0], bad.stderr
    assert "Traceback" not in bad.stderr + bad.stdout
    # Only the (correctly signed) kernel may have been published; nothing from the image.
    published = {p.name for p in (project.out / "images").rglob("*") if p.is_file() and p.name[0] != "."}
    assert published <= {"vmlinuz"}
    assert not list(project.out.rglob(f"verified/{IMAGE}"))
    image.write_bytes(good)
    fixed = project.doit()
    assert fixed.returncode == 0, fixed.stderr
    assert usr_partition(project.images() / "usr.img") == mirror.squashfs("100.0.0").read_bytes()


def test_signature_by_other_key_in_same_keyring_is_rejected(project: Project, mirror: Mirror, other: str):
    # The profile's key file holds both keys; only the signer's fingerprint is pinned.
    key = project.keyring.export(project.root / "signing-key.asc", project.signer, other)
    assert key.exists()
    mirror.keyring.sign(mirror.root / "100.0.0" / KERNEL, other)
    result = project.doit()
    assert result.returncode != 0
    assert "not pinned" in result.stderr and KERNEL in result.stderr
    assert not (project.images() / "vmlinuz").exists()


def test_a_changed_pin_unpublishes_and_rechecks_every_image_verified_under_the_old_one(
        project: Project, mirror: Mirror, other: str):
    assert project.doit().returncode == 0
    published = [project.images() / "vmlinuz", project.images() / "usr.img"]
    assert all(p.exists() for p in published)
    project.keyring.export(project.root / "signing-key.asc", project.signer, other)
    profile = yaml.safe_load(project.profile_file.read_text())
    project.profile_file.write_text(yaml.safe_dump({**profile, "fingerprints": [other]}))  # a new pin
    assert project.doit("forget").returncode == 0  # the check does not rest on doit's database
    result = project.doit()
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("leanvm: error:")]
    assert len(errors) == 1 and "not pinned" in errors[0] and KERNEL in errors[0], result.stderr
    for path in published:
        assert f"{path} was verified by key {project.signer}, which is not pinned" in result.stderr
        assert not path.exists()  # never booted again
    project.profile_file.write_text(yaml.safe_dump(profile))  # back to the signer's pin: checked afresh
    rebuilt = project.doit()
    assert rebuilt.returncode == 0, rebuilt.stderr
    assert usr_partition(project.images() / "usr.img") == mirror.squashfs("100.0.0").read_bytes()


def test_missing_signature_is_rejected(project: Project, mirror: Mirror):
    (mirror.root / "100.0.0" / f"{KERNEL}.sig").unlink()
    result = project.doit()
    assert result.returncode != 0
    assert f"{KERNEL}.sig" in result.stderr and "404" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (project.images() / "vmlinuz").exists()


def test_cut_download_resumes_with_range(project: Project, mirror: Mirror, server: MirrorServer):
    size = (mirror.root / "100.0.0" / IMAGE).stat().st_size
    server.cut[f"/100.0.0/{IMAGE}"] = size // 2
    result = project.doit()
    assert result.returncode == 0, result.stderr
    assert size <= server.served(IMAGE) < 1.6 * size
    assert usr_partition(project.images() / "usr.img") == mirror.squashfs("100.0.0").read_bytes()


def test_server_errors_are_retried(project: Project, server: MirrorServer):
    server.fail_next = 2
    result = project.doit()
    assert result.returncode == 0, result.stderr
    assert (project.images() / "usr.img").exists()


def test_file_mirror_and_current_resolves_from_version_txt(project: Project, mirror: Mirror):
    mirror.add_version("101.0.0")
    project.write_profile(mirror.root.as_uri())
    result = project.doit()
    assert result.returncode == 0, result.stderr
    assert usr_partition(project.images("101.0.0") / "usr.img") == mirror.squashfs("101.0.0").read_bytes()
    assert not project.images("100.0.0").exists()


def test_pinned_version_needs_no_network(project: Project, server: MirrorServer):
    project.write_profile(server.url, version="100.0.0")
    assert project.doit().returncode == 0
    server.shutdown()
    server.server_close()
    project.vm("core1").joinpath("run.sh").unlink()
    again = project.doit()
    assert again.returncode == 0, again.stderr
    assert again.executed == {"launcher:core1"}


def test_unreachable_mirror_uses_last_resolved_version_with_warning(project: Project, server: MirrorServer):
    assert project.doit().returncode == 0
    server.shutdown()
    server.server_close()
    again = project.doit()
    assert again.returncode == 0, again.stderr
    assert "warning" in again.stderr and "100.0.0" in again.stderr
    assert again.executed == set()


def test_list_info_clean_need_no_network(project: Project, server: MirrorServer):
    server.shutdown()
    server.server_close()
    for args in (["list", "--all"], ["clean"]):
        result = project.doit(*args)
        assert result.returncode == 0, (args, result.stderr)
    info = project.doit("info", "rootfs:core1")  # exits 1 when the task would run, as doit does
    assert info.stderr == "" and "status     : run" in info.stdout


def test_real_flatcar_profiles_pin_the_real_key():
    configs = Path(__file__).resolve().parent.parent / "configs"
    for channel, arch in itertools.product(("stable", "beta", "alpha"), ("amd64", "arm64")):
        name = f"flatcar-{channel}" + ("-arm64" if arch == "arm64" else "")
        profile = yaml.safe_load((configs / "releases" / f"{name}.yaml").read_text())
        assert load_profile(configs / "releases" / f"{name}.yaml").arch == arch
        assert profile["fingerprints"] == ["F88CFEDEFF29A5B4D9523864E25D9AED0593B34A"]
        assert profile["base_url"] == f"https://{channel}.release.flatcar-linux.net/{arch}-usr/"
        console = "ttyS0" if arch == "amd64" else "ttyAMA0"  # the PL011 UART of QEMU's virt machine
        assert profile["kernel_args"].split() == [
            "mount.usr=PARTLABEL=USR-A", "mount.usrfstype=squashfs", "mount.usrflags=ro", "root=LABEL=ROOT",
            "rootflags=rw", f"console={console},115200n8", "flatcar.autologin"]
        assert profile["first_boot_args"] == "flatcar.first_boot=1"
        key = (configs / "releases" / profile["signing_key"]).resolve()
        assert "BEGIN PGP PUBLIC KEY BLOCK" in key.read_text()
    for arch, name in (("amd64", "flatcar-lts"), ("arm64", "flatcar-lts-arm64")):  # its kernel_args: test_lts.py
        release = load_profile(configs / "releases" / f"{name}.yaml")
        assert release.base_url == f"https://lts.release.flatcar-linux.net/{arch}-usr/" and release.arch == arch
        assert list(release.fingerprints) == ["F88CFEDEFF29A5B4D9523864E25D9AED0593B34A"]
        key = release.signing_key
        assert "BEGIN PGP PUBLIC KEY BLOCK" in key.read_text()


def test_a_pinned_stream_like_lts_current_2024_resolves_from_its_own_directory(project: Project, mirror: Mirror,
                                                                                server: MirrorServer):
    mirror.add_version("200.0.0")  # `current` moves on
    (mirror.root / "current-2024").mkdir()
    (mirror.root / "current-2024" / "version.txt").write_text("TEST_VERSION=100.0.0\n")
    project.write_profile(server.url, version="current-2024")
    result = project.doit()
    assert result.returncode == 0, result.stderr
    assert (project.images("100.0.0") / "usr.img").is_file() and not project.images("200.0.0").exists()
    assert (project.out / "images" / "test" / ".current-2024-version").read_text() == "100.0.0\n"
