"""unbundle never writes outside its directory: crafted archives (tarfile, as an attacker
would make them) are refused in one line before anything of theirs is kept."""

import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def unbundle(*args: object) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "leanvm.ship.bundle", "unbundle", *map(str, args)],
                          capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO / "pipeline")})


def member(name: str, data: bytes = b"", kind: bytes = tarfile.REGTYPE, link: str = "") -> tuple:
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.size, info.mode = kind, link, len(data), 0o644
    return info, io.BytesIO(data)


def manifest(files: dict[str, bytes]) -> tuple:
    listed = {name: hashlib.sha256(data).hexdigest() for name, data in files.items()}
    return member("MANIFEST.json", json.dumps({"release": "t", "version": "1", "files": listed}).encode())


def archive(path: Path, *members: tuple) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for info, data in members:
            tar.addfile(info, data if info.size else None)
    return path


def one_line(result: subprocess.CompletedProcess) -> str:
    lines = result.stderr.strip().splitlines()
    assert result.returncode != 0 and len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    return lines[0]


def test_a_plain_bundle_unpacks(tmp_path: Path):
    files = {"vms/a/run.sh": b"#!/bin/sh\n", "state/vms/a.env": b"ssh_port=2222\n"}
    good = archive(tmp_path / "good.tar.gz", manifest(files), *(member(n, d) for n, d in files.items()))
    result = unbundle(good, tmp_path / "dir")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "dir" / "vms" / "a" / "run.sh").read_bytes() == files["vms/a/run.sh"]


def crafted(tmp_path: Path) -> dict[str, list[tuple]]:
    """Each attack as its members; the manifest lists every file so that only the path or
    the kind of member can stop it (except the unlisted one)."""
    outside = tmp_path / "outside"
    evil = b"escaped\n"
    return {
        "dotdot": [manifest({"../escaped.txt": evil}), member("../escaped.txt", evil)],
        "dotdot deeper": [manifest({"vms/../../escaped.txt": evil}), member("vms/../../escaped.txt", evil)],
        "absolute": [manifest({str(outside / "abs.txt"): evil}), member(str(outside / "abs.txt"), evil)],
        "dotdot unlisted": [manifest({}), member("../escaped.txt", evil)],
        "absolute unlisted": [manifest({}), member(str(outside / "abs.txt"), evil)],
        "symlink then file": [manifest({"link/abs.txt": evil}), member("link", kind=tarfile.SYMTYPE, link=str(outside)),
                              member("link/abs.txt", evil)],
        "hard link outside": [manifest({"hl": b""}), member("hl", kind=tarfile.LNKTYPE, link=str(outside / "target"))],
        "unlisted member": [manifest({"vms/a/run.sh": b"x"}), member("vms/a/run.sh", b"x"),
                            member("vms/a/extra", b"y")],
        "device": [manifest({"dev": b""}), member("dev", kind=tarfile.CHRTYPE)],
        "manifest not first": [member("vms/a/run.sh", b"x"), manifest({"vms/a/run.sh": b"x"})],
    }


@pytest.mark.parametrize("case", list(crafted(Path("/x"))))
@pytest.mark.parametrize("dir_exists", [False, True])
def test_a_crafted_archive_is_refused_and_dir_left_as_it_was(tmp_path: Path, case: str, dir_exists: bool):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "target").write_text("do not touch\n")
    work = tmp_path / "work"
    work.mkdir()
    evil = archive(tmp_path / "evil.tar.gz", *crafted(tmp_path)[case])
    dest = work / "dir"
    if dir_exists:
        dest.mkdir()
    line = one_line(unbundle(evil, dest))
    assert str(evil) in line and "do not use it" in line or "MANIFEST" in line, line
    assert sorted(p.name for p in outside.iterdir()) == ["target"]
    assert (outside / "target").read_text() == "do not touch\n"
    assert not (tmp_path / "escaped.txt").exists() and not (work / "escaped.txt").exists()
    assert sorted(work.iterdir()) == ([dest] if dir_exists else [])
    assert not dir_exists or list(dest.iterdir()) == []


def test_unbundle_into_a_file_or_from_a_missing_archive_is_one_line_and_makes_nothing(tmp_path: Path):
    good = archive(tmp_path / "good.tar.gz", manifest({"a": b"a"}), member("a", b"a"))
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    assert "is not a directory" in one_line(unbundle(good, a_file))
    assert a_file.read_text() == "x"
    line = one_line(unbundle(tmp_path / "missing.tar.gz", tmp_path / "new"))
    assert "missing.tar.gz: no such file" in line
    assert not (tmp_path / "new").exists()
