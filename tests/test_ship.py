"""Portable bundles, CI caching of out/images, pruning unused versions."""

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from leanvm.release.record import file_digest
from support import (
    ENV,
    Mirror,
    MirrorServer,
    Project,
    build_cluster,
    doit,
    paths_in,
    printed,
    run,
    sh,
    stand_in_qemu,
    usr_partition,
)


def bundle_of(project: Project) -> Path:
    result = project.doit("bundle")
    assert result.returncode == 0, result.stderr
    (archive,) = (project.out / "bundles").glob("*.tar.gz")
    return archive


def printed_paths(run_sh: Path) -> list[Path]:
    return [p for p in paths_in(printed(run_sh)) if p.name != "qemu.pid"]


@pytest.mark.slow  # ~25 s: in CI's slow run, keeping the main suite under its 10 minutes
def test_bundle_unpacked_with_tar_elsewhere_is_complete_sparse_and_matches(project: Project, tmp_path: Path):
    project.write_cluster({"big": {"disk": "4G", "ssh_port": 2701}, "small": {}})
    assert project.doit().returncode == 0
    archive = bundle_of(project)
    assert archive.stat().st_size < 10 << 20
    unpacked = tmp_path / "elsewhere"
    unpacked.mkdir()
    sh("tar", "-xf", archive, "-C", unpacked)
    manifest = json.loads((unpacked / "MANIFEST.json").read_text())
    assert manifest["release"] == "test" and manifest["version"] == "100.0.0"
    assert "images/test/100.0.0/usr.img" in manifest["files"] and "vms/big/rootfs.img" in manifest["files"]
    assert "ssh/id_ed25519" in manifest["files"] and "ssh/known_hosts" not in manifest["files"]
    assert oct((unpacked / "ssh" / "id_ed25519").stat().st_mode & 0o777) == "0o600"  # ssh accepts it
    for rel, digest in manifest["files"].items():
        assert file_digest(unpacked / rel) == digest, rel
    for vm in ("big", "small"):
        paths = printed_paths(unpacked / "vms" / vm / "run.sh")
        assert len(paths) == 5
        for path in paths:
            assert path.exists() and str(path).startswith(str(unpacked)), path
    disk = unpacked / "vms" / "big" / "rootfs.img"
    assert disk.stat().st_size == 4 << 30 and disk.stat().st_blocks * 512 < 3 << 20


def test_unbundle_takes_paths_relative_to_where_it_is_run(project: Project, tmp_path: Path):
    archive = bundle_of(project)
    result = subprocess.run([sys.executable, "-m", "leanvm.ship.bundle", "unbundle",
                             os.path.relpath(archive, tmp_path), "unpacked"],
                            capture_output=True, text=True, cwd=tmp_path,
                            env={**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)})
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "unpacked" / "vms" / "core1" / "run.sh").exists()
    assert (tmp_path / "unpacked" / "state" / "vms" / "core1.env").exists()
    assert printed_paths(tmp_path / "unpacked" / "vms" / "core1" / "run.sh")


def test_unbundle_checks_the_manifest(project: Project, tmp_path: Path):
    archive = bundle_of(project)
    result = subprocess.run([sys.executable, "-m", "leanvm.ship.bundle", "unbundle", str(archive), str(tmp_path / "a")],
                            capture_output=True, text=True, cwd=Path(__file__).parent.parent)
    assert result.returncode == 0, result.stderr
    assert "match the manifest" in result.stdout
    damaged = tmp_path / "a" / "vms" / "core1" / "run.sh"
    damaged.write_text(damaged.read_text() + "# changed\n")
    from leanvm.errors import LeanvmError
    from leanvm.ship.bundle import check_manifest
    try:
        check_manifest(tmp_path / "a")
    except LeanvmError as e:
        assert "run.sh" in str(e)
    else:
        raise AssertionError("a damaged file passed the manifest check")


def unbundle(archive: Path, dest: Path) -> subprocess.CompletedProcess:
    return run([sys.executable, "-m", "leanvm.ship.bundle", "unbundle", str(archive), str(dest)],
               capture_output=True, text=True, cwd=Path(__file__).parent.parent, timeout=120)


def test_unbundle_never_replaces_a_running_vm_or_anything_already_there(mini: Path, tmp_path: Path):
    out = build_cluster(tmp_path / "src", mini / "mini.yaml", {"a": {}})
    built = doit(f"config={tmp_path / 'src' / 'cluster.yaml'}", f"out={out}", "bundle")
    assert built.returncode == 0, built.stderr
    (archive,) = (out / "bundles").glob("*.tar.gz")
    dest = tmp_path / "there"
    assert unbundle(archive, dest).returncode == 0
    disk = dest / "vms" / "a" / "rootfs.img"
    inode = disk.stat().st_ino
    started = run([dest / "vms" / "a" / "run.sh", "--detach", "-S"], capture_output=True, text=True, env=ENV,
                  timeout=60)  # the real QEMU, CPUs stopped
    assert started.returncode == 0, started.stderr
    pid = (dest / "vms" / "a" / "qemu.pid").read_text().strip()
    try:
        refused = unbundle(archive, dest)
        (line,) = refused.stderr.strip().splitlines()
        assert refused.returncode != 0 and f"while its VMs run: a (pid {pid})" in line, refused.stderr
    finally:
        run([dest / "cluster.sh", "down"], capture_output=True, env={**ENV, "LEANVM_STOP_TIMEOUT": "1"}, timeout=60)
    assert disk.stat().st_ino == inode  # the running VM's disk was not replaced
    refused = unbundle(archive, dest)  # stopped: still not over what is there
    assert refused.returncode != 0 and "is not empty" in refused.stderr and disk.stat().st_ino == inode


def test_bundle_refused_while_a_vm_runs(project: Project):
    assert project.doit().returncode == 0
    sleeper = stand_in_qemu(project.vm("core1"))
    try:
        result = project.doit("bundle")
        assert result.returncode != 0 and "VM core1 is running" in result.stderr
    finally:
        sleeper.kill()
        sleeper.wait()


def restore_images_only(project: Project, target: Path) -> None:
    """What a CI cache does: out/images/ comes back (new inodes), nothing else."""
    target.mkdir()
    shutil.copytree(project.out / "images", target / "images")


def test_ci_cache_restore_without_doit_db_needs_no_mirror(project: Project, server: MirrorServer, tmp_path: Path):
    assert project.doit().returncode == 0
    restored = tmp_path / "restored"
    restore_images_only(project, restored)
    server.shutdown()
    server.server_close()
    requests_before = len(server.requests)
    result = project.doit(out=restored)
    assert result.returncode == 0, result.stderr
    assert not {t for t in result.executed if t.split(":")[0] in ("download", "verify", "extract")}
    assert {"rootfs:core1", "configdrive:core1", "launcher:core1"} <= result.executed
    bundled = project.doit("bundle", out=restored)
    assert bundled.returncode == 0, bundled.stderr
    assert list((restored / "bundles").glob("*.tar.gz"))
    assert len(server.requests) == requests_before


def test_corrupted_cached_squashfs_is_detected_and_rebuilt(project: Project, mirror: Mirror, tmp_path: Path):
    assert project.doit().returncode == 0
    restored = tmp_path / "restored"
    restore_images_only(project, restored)
    squash = restored / "images" / "test" / "100.0.0" / "usr.img"
    data = bytearray(squash.read_bytes())
    data[len(data) // 2] ^= 0xFF
    squash.write_bytes(bytes(data))
    stat = (project.images() / "usr.img").stat()
    os.utime(squash, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # same size and mtime: only the digest tells
    result = project.doit(out=restored)
    assert result.returncode == 0, result.stderr
    assert {"download:test:image", "verify:test:image", "extract:test"} <= result.executed
    assert "download:test:kernel" not in result.executed
    assert usr_partition(squash) == mirror.squashfs("100.0.0").read_bytes()


def test_no_op_run_does_not_rehash_published_images(project: Project):
    assert project.doit().returncode == 0
    squash = project.images() / "usr.img"
    sidecar = squash.with_name(".usr.img.digest")
    before = sidecar.stat().st_mtime_ns
    assert project.doit().executed == set()
    assert sidecar.stat().st_mtime_ns == before


def legacy_record(published: Path) -> None:
    """The sidecar an out/ of leanvm before BLAKE3 has: .NAME.sha256, with the file's stat."""
    record = json.loads(published.with_name(f".{published.name}.digest").read_text())
    record["sha256"] = hashlib.sha256(published.read_bytes()).hexdigest()
    del record["blake3"]
    published.with_name(f".{published.name}.digest").unlink()
    published.with_name(f".{published.name}.sha256").write_text(json.dumps(record))


def test_an_older_sha256_record_is_checked_in_full_once_then_replaced(project: Project, mirror: Mirror):
    assert project.doit().returncode == 0
    usr = project.images() / "usr.img"
    legacy_record(usr)
    assert project.doit().executed == set()  # matched in full: trusted, and recorded anew
    assert not usr.with_name(".usr.img.sha256").exists()
    assert json.loads(usr.with_name(".usr.img.digest").read_text())["blake3"] == file_digest(usr)

    legacy_record(usr)
    stat = usr.stat()
    data = bytearray(usr.read_bytes())
    data[len(data) // 2] ^= 0xFF
    usr.write_bytes(bytes(data))
    os.utime(usr, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # same size and mtime: never trusted blindly
    result = project.doit()
    assert result.returncode == 0, result.stderr
    assert "extract:test" in result.executed
    assert usr_partition(usr) == mirror.squashfs("100.0.0").read_bytes()


def test_prune_removes_versions_no_vm_uses(project: Project, mirror: Mirror):
    assert project.doit().returncode == 0
    mirror.add_version("101.0.0")
    assert project.doit().returncode == 0
    assert project.images("100.0.0").exists() and project.images("101.0.0").exists()
    result = project.doit("prune")
    assert result.returncode == 0, result.stderr
    assert not project.images("100.0.0").exists()
    assert (project.images("101.0.0") / "usr.img").exists()
    assert project.doit().executed == set()
