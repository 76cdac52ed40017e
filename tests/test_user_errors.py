"""Bad input and bad luck, third pass: each is one line (never a traceback), and nothing is
left half-done: duplicate keys, odd names, empty out=, a disk too large, a disk that fills,
Ctrl-C at any step."""

import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest
from leanvm.dag.cli import default_args
from leanvm.errors import LeanvmError
from leanvm.resources import DEFAULT_CLUSTER
from support import DOIT_CWD, IMAGE, Mirror, MirrorServer, Project, doit_argv, sh, slow_mkfs


def one_line(result) -> str:
    lines = result.stderr.strip().splitlines()
    assert result.returncode != 0 and len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    return lines[0]


def temp_files(root: Path) -> list[Path]:
    return [p for p in root.rglob(".*.tmp")]


@pytest.mark.parametrize(("text", "expected"), [
    ("release: test\nvms:\n  c1: {}\n  c1: {memory: 512}\n", "line 4: key 'c1' appears twice"),
    ("release: test\nvms:\n  c1: {}\nvms:\n  c2: {}\n", "line 4: key 'vms' appears twice"),
    ("release: test\nvms:\n  c1: {memory: 256, memory: 512}\n", "key 'memory' appears twice"),
    ('release: test\nvms:\n  "c1\\n": {}\n', "bad VM name"),
    ("release: test\nnetwork: {subnet: 10.0.0.0/16}\nvms:\n  c1: {}\n", "overlaps 10.0.2.0/24"),
    ("release: test\nvms:\n  c1: {disk: 2000000T}\n", "vms.c1.disk"),
])
def test_a_bad_cluster_file_is_one_line_and_leaves_no_out_dir(project: Project, text: str, expected: str):
    project.cluster_file.write_text(text)
    line = one_line(project.doit())
    assert str(project.cluster_file) in line and expected in line, line
    assert not project.out.exists()


def test_a_profile_with_a_duplicate_key_is_one_line(project: Project):
    project.profile_file.write_text(project.profile_file.read_text() + "kernel: other\n")
    line = one_line(project.doit())
    assert str(project.profile_file) in line and "key 'kernel' appears twice" in line


def test_an_empty_out_or_config_is_refused(project: Project):
    before = sorted(DOIT_CWD.iterdir())
    for args in ([f"config={project.cluster_file}", "out="], ["config= ", f"out={project.out}"]):
        result = subprocess.run(doit_argv(*args), cwd=DOIT_CWD, capture_output=True, text=True)
        assert "is empty" in one_line(result)
    assert sorted(DOIT_CWD.iterdir()) == before and not project.out.exists()


def test_leanvm_without_a_cluster_yaml(tmp_path: Path):
    (tmp_path / "cluster.yml").write_text("release: flatcar-stable\nvms: {a: {}}\n")
    with pytest.raises(LeanvmError) as error:
        default_args([], tmp_path)
    assert "cluster.yml" in str(error.value) and "rename it to cluster.yaml" in str(error.value)
    (tmp_path / "cluster.yml").unlink()
    assert default_args(["list"], tmp_path) == ["list", f"config={DEFAULT_CLUSTER}", f"out={tmp_path / 'out'}"]
    assert not (tmp_path / "cluster.yaml").exists()  # a command that only reads writes nothing
    args = default_args([], tmp_path)
    assert args == [f"config={tmp_path / 'cluster.yaml'}", f"out={tmp_path / 'out'}"]
    assert (tmp_path / "cluster.yaml").read_bytes() == DEFAULT_CLUSTER.read_bytes()
    assert "site-packages" not in " ".join(args)


def test_a_disk_larger_than_the_host_can_hold_is_one_line_and_leaves_no_temp_file(project: Project):
    project.write_cluster({"core1": {"disk": "100T"}})
    line = one_line(project.doit())
    assert "rootfs:core1" in line and "100T" in line and "set a smaller `disk`" in line, line
    assert not (project.vm("core1") / "rootfs.img").exists() and temp_files(project.out) == []


def test_leanvm_timeout_that_is_not_a_number_is_said_as_such(project: Project):
    line = one_line(project.doit(env={"LEANVM_TIMEOUT": "abc"}))
    assert "LEANVM_TIMEOUT='abc' is not a number of seconds" in line and "last resolved" not in line


@pytest.fixture
def small_disk(tmp_path: Path):
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    small = tmp_path / "small"
    small.mkdir()

    def mount(size: int) -> Path:
        sh("mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", small)
        return small

    yield mount
    subprocess.run(["umount", small], capture_output=True)


def test_a_disk_that_fills_during_a_download_is_one_line(project: Project, mirror: Mirror, small_disk):
    mirror.add_version("300.0.0", payload_size=3 << 20)
    image_size = (mirror.root / "300.0.0" / IMAGE).stat().st_size
    out = small_disk(image_size // 2) / "out"
    result = subprocess.run(doit_argv(f"config={project.cluster_file}", f"out={out}"), cwd=DOIT_CWD,
                            capture_output=True, text=True)
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert all(line.startswith("leanvm: error: ") for line in lines), lines
    assert any("No space left on device" in line and IMAGE in line for line in lines), lines
    assert not any("base_url" in line for line in lines), lines
    assert temp_files(out) == []


def test_doit_database_on_a_full_disk_is_one_line(project: Project, small_disk):
    out = small_disk(1 << 20) / "out"
    out.mkdir()
    filler = out.parent / "filler"
    subprocess.run(["dd", "if=/dev/zero", f"of={filler}", "bs=64k"], capture_output=True)  # until full
    result = subprocess.run(doit_argv(f"config={project.cluster_file}", f"out={out}"), cwd=DOIT_CWD,
                            capture_output=True, text=True)
    line = one_line(result)
    assert str(out) in line and "disk is full" in line, line


def start(project: Project, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen(doit_argv(f"config={project.cluster_file}", f"out={project.out}"), cwd=DOIT_CWD,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env={**os.environ, **(env or {})})


def interrupt(proc: subprocess.Popen, ready, timeout: float = 60) -> tuple[str, str]:
    """Ctrl-C, as a terminal sends it (SIGINT to the process group), once `ready()` holds."""
    deadline = time.monotonic() + timeout
    while not ready():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGINT)
    return proc.communicate(timeout=60)


def test_ctrl_c_during_a_download_exits_130_in_one_line(project: Project, mirror: Mirror, server: MirrorServer):
    size = (mirror.root / "100.0.0" / IMAGE).stat().st_size
    release = threading.Event()
    server.stall[f"/100.0.0/{IMAGE}"] = (size // 2, release, 60)
    part = project.out / "cache" / "test" / "100.0.0" / f"{IMAGE}.part"
    proc = start(project)
    try:
        _, err = interrupt(proc, lambda: part.exists() and part.stat().st_size >= size // 2)
    finally:
        release.set()
    assert proc.returncode == 130 and err.strip().splitlines() == ["leanvm: interrupted"], err
    assert temp_files(project.out) == []
    assert project.doit().returncode == 0  # resumes and completes


def test_ctrl_c_during_mkfs_exits_130_and_leaves_no_temp_disk(project: Project, tmp_path: Path):
    env, marker = slow_mkfs(tmp_path)
    proc = start(project, env)
    _, err = interrupt(proc, marker.exists)
    assert proc.returncode == 130 and err.strip().splitlines()[-1] == "leanvm: interrupted", err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert temp_files(project.out) == [] and not (project.vm("core1") / "rootfs.img").exists()
