"""Faults, hostile input and concurrency — nothing lost, nothing unverified."""

import gzip
import hashlib
import os
import signal
import stat
import subprocess
import threading
import time
from pathlib import Path

import blake3
import pytest
from leanvm.errors import LeanvmError
from leanvm.proc import stop_gpg_agent
from leanvm.release.extract import extract_usr_disk
from leanvm.release.verify import check_signature
from support import (
    DOIT_CWD,
    IMAGE,
    KERNEL,
    Keyring,
    Mirror,
    MirrorServer,
    Project,
    doit_argv,
    newc,
    sh,
    slow_mkfs,
    stand_in_qemu,
    usr_partition,
)


def start_doit(project: Project, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        doit_argv(f"config={project.cluster_file}", f"out={project.out}"), cwd=DOIT_CWD,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
        env={**os.environ, **(env or {})},
    )


def wait_until(condition, proc: subprocess.Popen, timeout: float = 60, poll: float = 0.002) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(poll)


def kill_group(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate()


def final_files(project: Project) -> set[str]:
    return {p.name for p in project.out.rglob("*") if p.is_file()}


def stall_image_download(project: Project, mirror: Mirror, server: MirrorServer) -> tuple[int, threading.Event, Path]:
    """The server sends half the image, then stalls until the returned event is set."""
    size = (mirror.root / "100.0.0" / IMAGE).stat().st_size
    release = threading.Event()
    server.stall[f"/100.0.0/{IMAGE}"] = (size // 2, release, 60)
    return size, release, project.out / "cache" / "test" / "100.0.0" / f"{IMAGE}.part"


# --- interruptions -------------------------------------------------------------------

def test_kill9_during_download_then_rebuild(project: Project, mirror: Mirror, server: MirrorServer):
    size, release, part = stall_image_download(project, mirror, server)
    proc = start_doit(project)
    wait_until(lambda: part.exists() and part.stat().st_size >= size // 2, proc)
    kill_group(proc)
    release.set()
    assert IMAGE not in final_files(project) and "usr.img" not in final_files(project)
    result = project.doit()
    assert result.returncode == 0, result.stderr
    assert usr_partition(project.images() / "usr.img") == mirror.squashfs("100.0.0").read_bytes()


def test_kill9_during_extraction_then_rebuild(project: Project, mirror: Mirror, server: MirrorServer):
    mirror.add_version("200.0.0", payload_size=120 << 20)
    tmp = project.images("200.0.0") / ".usr.img.tmp"
    proc = start_doit(project)
    wait_until(lambda: tmp.exists(), proc, timeout=120)
    os.kill(proc.pid, signal.SIGSTOP)  # freeze it mid-extraction, then kill it there
    assert tmp.exists() and not (project.images("200.0.0") / "usr.img").exists()
    kill_group(proc)
    result = project.doit()
    assert result.returncode == 0, result.stderr
    digest = hashlib.sha256(usr_partition(project.images("200.0.0") / "usr.img")).digest()
    assert digest == hashlib.sha256(mirror.squashfs("200.0.0").read_bytes()).digest()
    assert not tmp.exists()


def test_kill9_during_mkfs_then_rebuild(project: Project, tmp_path: Path):
    env, marker = slow_mkfs(tmp_path)
    proc = start_doit(project, env)
    wait_until(marker.exists, proc)
    kill_group(proc)
    disk = project.vm("core1") / "rootfs.img"
    assert not disk.exists()
    result = project.doit()
    assert result.returncode == 0, result.stderr
    sh("e2fsck", "-n", "-f", disk)


def test_second_concurrent_run_refuses_and_first_finishes(project: Project, mirror: Mirror, server: MirrorServer):
    _, release, part = stall_image_download(project, mirror, server)
    first = start_doit(project)
    try:
        wait_until(part.exists, first)
        started = time.monotonic()
        second = project.doit()
        assert time.monotonic() - started < 10
        assert second.returncode != 0
        lines = second.stderr.strip().splitlines()
        assert len(lines) == 1 and f"pid {first.pid}" in lines[0], second.stderr
    finally:
        release.set()
    out, err = first.communicate(timeout=120)
    assert first.returncode == 0, err
    assert usr_partition(project.images() / "usr.img") == mirror.squashfs("100.0.0").read_bytes()


def test_stale_lock_from_dead_process_is_taken_over(project: Project):
    project.out.mkdir()
    dead = subprocess.Popen(["true"])
    dead.wait()
    (project.out / ".lock").write_text(f"{dead.pid}\n")
    result = project.doit()
    assert result.returncode == 0, result.stderr


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs needs root")
def test_disk_full_while_extracting(project: Project, mirror: Mirror, tmp_path: Path):
    mirror.add_version("300.0.0", payload_size=3 << 20)
    image_size = (mirror.root / "300.0.0" / IMAGE).stat().st_size
    small = tmp_path / "small"
    small.mkdir()
    sh("mount", "-t", "tmpfs", "-o", f"size={image_size + (1 << 20)}", "tmpfs", small)
    try:
        project.root.joinpath("cluster.yaml").write_text(project.cluster_file.read_text())
        result = subprocess.run(doit_argv(f"config={project.cluster_file}", f"out={small / 'out'}"),
                                cwd=DOIT_CWD, capture_output=True, text=True)
        assert result.returncode != 0
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and "No space left on device" in lines[0] and "usr.img" in lines[0], lines
        images = small / "out" / "images" / "test" / "300.0.0"
        assert not (images / "usr.img").exists() and not (images / ".usr.img.tmp").exists()
    finally:
        sh("umount", small)


# --- hostile or broken servers -------------------------------------------------------

def test_404_for_a_file_names_the_url(project: Project, mirror: Mirror):
    (mirror.root / "100.0.0" / KERNEL).unlink()
    result = project.doit()
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and f"/100.0.0/{KERNEL}: HTTP 404" in lines[0]


def test_500_three_times_then_success(project: Project, server: MirrorServer):
    server.fail_next = 3
    result = project.doit()
    assert result.returncode == 0, result.stderr


def test_stalled_connection_times_out_and_resumes(project: Project, mirror: Mirror, server: MirrorServer):
    size = (mirror.root / "100.0.0" / IMAGE).stat().st_size
    server.stall[f"/100.0.0/{IMAGE}"] = (size // 2, threading.Event(), 60)
    started = time.monotonic()
    result = project.doit(env={"LEANVM_TIMEOUT": "1"})
    assert result.returncode == 0, result.stderr
    assert time.monotonic() - started < 40  # the client gave up on the stall; the server would wait 60 s
    assert server.served(IMAGE) < 1.6 * size


def test_html_error_page_instead_of_image_is_caught_by_signature(project: Project, mirror: Mirror):
    (mirror.root / "100.0.0" / IMAGE).write_text("<html><body>502 Bad Gateway</body></html>\n")
    result = project.doit()
    assert result.returncode != 0
    assert IMAGE in result.stderr and "signature check failed" in result.stderr
    assert "usr.img" not in final_files(project)
    assert (project.out / "cache" / "test" / "100.0.0" / f"{IMAGE}.rejected").exists()


def test_redirect_is_followed(project: Project, mirror: Mirror, server: MirrorServer):
    moved = mirror.root / "moved"
    moved.mkdir()
    for name in (IMAGE, f"{IMAGE}.sig"):
        (mirror.root / "100.0.0" / name).rename(moved / name)
        server.redirect[f"/100.0.0/{name}"] = f"/moved/{name}"
    result = project.doit()
    assert result.returncode == 0, result.stderr
    assert usr_partition(project.images() / "usr.img") == mirror.squashfs("100.0.0").read_bytes()


def test_server_that_ignores_range_restarts_cleanly(project: Project, mirror: Mirror, server: MirrorServer):
    size = (mirror.root / "100.0.0" / IMAGE).stat().st_size
    server.honour_range = False
    server.cut[f"/100.0.0/{IMAGE}"] = size // 2
    result = project.doit()
    assert result.returncode == 0, result.stderr
    assert usr_partition(project.images() / "usr.img") == mirror.squashfs("100.0.0").read_bytes()


# --- hostile or broken archives ------------------------------------------------------

SQUASH = b"hsqs" + os.urandom(5000)


def extract_fails(tmp_path: Path, archive_bytes: bytes, expect: str) -> None:
    archive = tmp_path / "image.cpio.gz"
    archive.write_bytes(archive_bytes)
    dest = tmp_path / "out" / "usr.img"
    before = set(tmp_path.rglob("*"))
    with pytest.raises(LeanvmError) as error:
        extract_usr_disk(archive, "usr.squashfs", dest)
    assert expect in str(error.value) and str(archive) in str(error.value)
    assert set(tmp_path.rglob("*")) - before <= {dest.parent}
    assert not dest.exists()


def test_corrupt_gzip(tmp_path: Path):
    good = gzip.compress(newc([("usr.squashfs", SQUASH, 0o100644)]))
    extract_fails(tmp_path, good[:20] + bytes(b ^ 0x55 for b in good[20:200]) + good[200:], "corrupt gzip")


def test_a_gzip_whose_crc_fails_at_its_end_is_corrupt_and_nothing_is_published(tmp_path: Path):
    """ISA-L checks the CRC after the last byte: extraction reads to the end before publishing."""
    good = gzip.compress(newc([("usr.squashfs", SQUASH, 0o100644)]))
    crc = good[-8:-4]
    extract_fails(tmp_path, good[:-8] + bytes(b ^ 0xFF for b in crc) + good[-4:], "corrupt gzip")


@pytest.mark.parametrize("padding", [0, 3 << 20])  # one block and several, a member of odd size
def test_isal_and_libarchive_decoding_give_the_same_disk_and_digest(tmp_path: Path, padding: int):
    squashfs = tmp_path / "usr.squashfs"
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "os-release").write_text("ID=leanvm-test\n")
    (tree / "random").write_bytes(os.urandom(padding + 12345))
    sh("mksquashfs", tree, squashfs, "-quiet", "-noappend")
    archive = tmp_path / "image.cpio.gz"
    archive.write_bytes(gzip.compress(newc([("./usr.squashfs", squashfs.read_bytes(), 0o100644)]), compresslevel=1))
    for decoder in ("isal", "libarchive"):  # each disk has GPT GUIDs of its own: compare each with itself
        disk = tmp_path / decoder / "usr.img"
        digest = extract_usr_disk(archive, "usr.squashfs", disk, decoder=decoder)
        assert digest == blake3.blake3(disk.read_bytes()).hexdigest()
        partition = usr_partition(disk)
        assert partition[:squashfs.stat().st_size] == squashfs.read_bytes()
        assert partition[squashfs.stat().st_size:] == bytes(len(partition) - squashfs.stat().st_size)


def test_truncated_cpio(tmp_path: Path):
    extract_fails(tmp_path, gzip.compress(newc([("usr.squashfs", SQUASH, 0o100644)])[:3000]), "")


def test_missing_member(tmp_path: Path):
    extract_fails(tmp_path, gzip.compress(newc([("etc/os-release", b"x", 0o100644)])), "has no member usr.squashfs")


def test_member_is_symlink_or_directory(tmp_path: Path):
    extract_fails(tmp_path, gzip.compress(newc([("usr.squashfs", b"/etc/shadow", 0o120777)])), "not a regular file")
    extract_fails(tmp_path, gzip.compress(newc([("usr.squashfs", b"", 0o040755)])), "not a regular file")


def test_traversal_and_absolute_names_are_never_written(tmp_path: Path):
    work = tmp_path / "deep" / "work"
    work.mkdir(parents=True)
    members = [("../usr.squashfs", SQUASH, 0o100644), ("/usr.squashfs", SQUASH, 0o100644),
               ("../../evil", b"x", 0o100644)]
    extract_fails(work, gzip.compress(newc(members)), "has no member")
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["deep", "image.cpio.gz", "out", "work"]


def test_declared_size_far_larger_than_archive(tmp_path: Path):
    archive = newc([("usr.squashfs", SQUASH, 0o100644)], declared={"usr.squashfs": 1 << 40})
    extract_fails(tmp_path, gzip.compress(archive), "")


def test_hostile_image_through_the_pipeline(project: Project, mirror: Mirror):
    image = mirror.root / "100.0.0" / IMAGE
    image.write_bytes(gzip.compress(newc([("usr.squashfs", b"/etc/passwd", 0o120777)])))
    mirror.keyring.sign(image, mirror.fingerprint)
    result = project.doit()
    assert result.returncode != 0
    assert "not a regular file" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert "usr.img" not in final_files(project)


# --- keys ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def subkeys(tmp_path_factory: pytest.TempPathFactory):
    """A primary key with two signing subkeys made in 2020: one expired since, one revoked."""
    home = tmp_path_factory.mktemp("subkeys")
    home.chmod(0o700)
    ring = Keyring(home)
    then = ("--faked-system-time", "20200101T000000")
    ring.gpg(*then, "--quick-gen-key", "old release signer <old@leanvm.invalid>", "ed25519", "cert", "0")
    primary = ring.fingerprint("old@leanvm.invalid")
    ring.gpg(*then, "--quick-add-key", primary, "ed25519", "sign", "1y")
    ring.gpg(*then, "--quick-add-key", primary, "ed25519", "sign", "0")
    listing = ring.gpg("--with-colons", "--list-keys", primary).decode().splitlines()
    expiring, revoked = [line.split(":")[9] for line in listing if line.startswith("fpr:")][1:3]
    data = home / "release.bin"
    data.write_bytes(os.urandom(10_000))
    for name, sub in (("expired", expiring), ("revoked", revoked)):
        ring.gpg("--faked-system-time", "20200601T000000", "--local-user", f"{sub}!", "--detach-sign",
                 "--output", home / f"{name}.sig", data)
    subprocess.run(["gpg", "--homedir", str(home), "--batch", "--pinentry-mode", "loopback", "--passphrase", "",
                    "--command-fd", "0", "--edit-key", primary],
                   input=f"key {revoked}\nrevkey\ny\n0\n\ny\nsave\n".encode(), check=True, capture_output=True)
    key = ring.export(home / "key.asc", primary)
    yield ring, primary, data, key, home
    stop_gpg_agent(home)


def test_signature_by_revoked_subkey_is_rejected(subkeys):
    _, primary, data, key, home = subkeys
    with pytest.raises(LeanvmError, match="revoked"):
        check_signature(data, home / "revoked.sig", key, (primary,))


def test_signature_by_since_expired_subkey_made_while_valid_is_accepted_with_warning(subkeys, capsys):
    _, primary, data, key, home = subkeys
    assert check_signature(data, home / "expired.sig", key, (primary,)) == primary
    assert "has expired since" in capsys.readouterr().err
    tampered = home / "tampered.bin"
    tampered.write_bytes(data.read_bytes() + b"x")
    with pytest.raises(LeanvmError):
        check_signature(tampered, home / "expired.sig", key, (primary,))


# --- VM state ------------------------------------------------------------------------

def test_user_data_change_keeps_root_disk_byte_for_byte(project: Project):
    (project.root / "ud.yaml").write_text("#cloud-config\nhostname: one\n")
    project.write_cluster({"core1": {"user_data": "ud.yaml"}})
    assert project.doit().returncode == 0
    disk = project.vm("core1") / "rootfs.img"
    sh("debugfs", "-w", "-R", f"write {project.cluster_file} state", disk)
    before = hashlib.sha256(disk.read_bytes()).hexdigest()
    (project.root / "ud.yaml").write_text("#cloud-config\nhostname: two\n")
    result = project.doit()
    assert result.executed == {"configdrive:core1"}
    assert hashlib.sha256(disk.read_bytes()).hexdigest() == before


def test_reset_and_grow_refused_while_vm_runs(project: Project):
    assert project.doit().returncode == 0
    disk = project.vm("core1") / "rootfs.img"
    runner = stand_in_qemu(project.vm("core1"))
    try:
        reset = project.doit("reset:core1")
        assert reset.returncode != 0 and "is running" in reset.stderr
        project.write_cluster({"core1": {"ssh_port": 2222, "disk": "128M"}})
        grow = project.doit()
        assert grow.returncode != 0 and "is running" in grow.stderr
        assert disk.stat().st_size == 64 << 20
    finally:
        runner.kill()
        runner.wait()
    assert project.doit().returncode == 0
    assert disk.stat().st_size == 128 << 20


def test_out_dir_files_are_never_world_writable(project: Project):
    assert project.doit().returncode == 0
    for path in project.out.rglob("*"):
        assert not path.stat().st_mode & stat.S_IWOTH, path
