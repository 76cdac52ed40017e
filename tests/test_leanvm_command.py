"""Leanvm from your own repository: the `leanvm` command, profile lookup, one cluster per out/."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from leanvm.config.load import load_cluster
from leanvm.errors import LeanvmError
from support import ENV, PROJECT, Project, doit, run, sh


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """leanvm installed non-editable (`pip install .`) into a fresh venv."""
    venv = tmp_path_factory.mktemp("venv")
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    build = tmp_path_factory.mktemp("build")  # a copy, so that no build files land in the checkout
    skip = {".venv", "out", ".git", "build", "leanvm.egg-info"}
    subprocess.run(["cp", "-r", *(str(p) for p in PROJECT.iterdir() if p.name not in skip), str(build)], check=True)
    subprocess.run([str(venv / "bin" / "pip"), "install", "-q", "--disable-pip-version-check", str(build)],
                   check=True, capture_output=True)
    return venv / "bin" / "leanvm"


def leanvm(exe: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    return run([str(exe), *args], cwd=cwd, capture_output=True, text=True, env=env, timeout=300)


def test_leanvm_from_a_directory_holding_only_a_cluster_file(installed: Path, mini: Path, tmp_path: Path):
    mine = tmp_path / "myrepo"
    mine.mkdir()
    (mine / "cluster.yaml").write_text(yaml.safe_dump(
        {"release": str(mini / "mini.yaml"), "defaults": {"memory": 256, "disk": "128M"}, "vms": {"mine": {}}}))
    built = leanvm(installed, mine)
    assert built.returncode == 0, built.stderr
    assert ".  launcher:mine" in built.stdout
    run_sh = mine / "out" / "vms" / "mine" / "run.sh"
    assert "Usage:" in sh(run_sh, "--help").decode() and (mine / "out" / "cluster.sh").exists()
    assert leanvm(installed, mine).stdout.count("-- ") >= 5  # a no-op second run
    listing = leanvm(installed, mine, "list")
    assert listing.returncode == 0 and "launcher" in listing.stdout
    # doit's lock and database are the project's, in its out/, not in site-packages
    assert (mine / "out" / ".doit.db").exists() and (mine / "out" / ".lock").exists()
    assert not list((installed.parent.parent / "lib").glob("python*/site-packages/out"))
    env = {**ENV, "LEANVM_STOP_TIMEOUT": "5"}
    try:  # a running VM: `leanvm clean` is refused and touches nothing
        assert run([mine / "out" / "cluster.sh", "up"], env=env, capture_output=True, timeout=120).returncode == 0
        refused = leanvm(installed, mine, "clean")
        assert refused.returncode != 0 and "cannot `leanvm clean` while VMs of" in refused.stderr, refused.stderr
        assert len(refused.stderr.strip().splitlines()) == 1 and run_sh.exists()
    finally:
        run([mine / "out" / "cluster.sh", "down"], env=env, capture_output=True, timeout=120)
    assert leanvm(installed, mine, "clean").returncode == 0 and not run_sh.exists()
    assert (mine / "out" / "vms" / "mine" / "rootfs.img").exists()


@pytest.mark.xdist_group("wheel")  # one worker installs the wheel for both
def test_the_wheel_installs_leanvm_only_and_lists_its_example_from_an_empty_directory(installed: Path, tmp_path: Path):
    python = installed.with_name("python")
    for module, found in (("leanvm", True), ("pipeline", False), ("leanvm_dev", False)):
        probe = run([python, "-c", f"import {module}"], cwd=tmp_path, capture_output=True, timeout=60)
        assert (probe.returncode == 0) == found, (module, probe.stderr)
    empty = tmp_path / "empty"
    empty.mkdir()
    listing = leanvm(installed, empty, "list")
    assert listing.returncode == 0 and "launcher" in listing.stdout, listing.stderr


@pytest.mark.xdist_group("wheel")  # one worker installs the wheel for both
def test_installed_leanvm_finds_the_bundled_flatcar_profiles(installed: Path, tmp_path: Path):
    (tmp_path / "cluster.yaml").write_text("release: flatcar-stable\nvms:\n  core1: {}\n")
    listing = leanvm(installed, tmp_path, "list", "--all")
    assert listing.returncode == 0, listing.stderr
    assert "download:flatcar-stable:kernel" in listing.stdout and "launcher:core1" in listing.stdout


def test_every_task_has_a_one_line_doc(project: Project):
    result = project.doit("list")
    assert result.returncode == 0
    lines = result.stdout.strip().splitlines()
    assert len(lines) >= 12
    assert all(len(line.split(None, 1)) == 2 for line in lines), lines


def test_a_bare_profile_name_is_found_beside_the_cluster_file_then_in_leanvm(project: Project, tmp_path: Path):
    cluster = tmp_path / "elsewhere" / "cluster.yaml"
    cluster.parent.mkdir()
    cluster.write_text("release: flatcar-beta\nvms:\n  a: {}\n")
    assert load_cluster(cluster).release.path == PROJECT / "configs" / "releases" / "flatcar-beta.yaml"
    (cluster.parent / "releases").mkdir()
    (cluster.parent / "releases" / "flatcar-beta.yaml").write_text(project.profile_file.read_text().replace(
        "signing_key: ../signing-key.asc", f"signing_key: {project.root / 'signing-key.asc'}"))
    assert load_cluster(cluster).release.path == cluster.parent / "releases" / "flatcar-beta.yaml"
    cluster.write_text("release: nosuch\nvms:\n  a: {}\n")
    with pytest.raises(LeanvmError) as error:
        load_cluster(cluster)
    message = str(error.value)
    assert str(cluster.parent / "releases" / "nosuch.yaml") in message
    assert str(PROJECT / "configs" / "releases" / "nosuch.yaml") in message


def test_another_cluster_file_cannot_take_over_an_out_dir(project: Project):
    project.write_cluster({"core1": {}, "core2": {}})
    assert project.doit().returncode == 0
    other = project.root / "other.yaml"
    other.write_text(yaml.safe_dump({"release": "test", "vms": {"x": {}}}))
    result = doit(f"config={other}", f"out={project.out}")
    lines = result.stderr.strip().splitlines()
    assert result.returncode != 0 and len(lines) == 1, result.stderr
    assert str(other) in lines[0] and str(project.cluster_file) in lines[0] and "out=DIR" in lines[0]
    assert (project.vm("core1") / "run.sh").exists() and (project.vm("core2") / "run.sh").exists()
    assert doit(f"config={other}", f"out={project.root / 'other-out'}").returncode == 0


def test_cluster_sh_help_is_its_own(project: Project):
    assert project.doit().returncode == 0
    helped = subprocess.run([str(project.out / "cluster.sh"), "help"], capture_output=True, text=True)
    assert helped.returncode == 0 and "up [--wait [SECONDS]]" in helped.stdout and "QEMU emulator" not in helped.stdout
    run_help = subprocess.run([str(project.vm("core1") / "run.sh"), "--help"], capture_output=True, text=True)
    assert run_help.returncode == 0 and "--detach" in run_help.stdout and "QEMU emulator" not in run_help.stdout
