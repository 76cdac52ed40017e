"""No ordinary command may break, orphan or wipe a VM (real QEMU, mini release)."""

import os
import shlex
import subprocess
from pathlib import Path

import pytest
import yaml
from support import (
    ENV,
    build_cluster,
    doit,
    finish,
    printed,
    qemu_pids,
    run,
    sh,
    start,
    switch_processes,
    wait_for_text,
)


def run_doit(root: Path, *args: str) -> subprocess.CompletedProcess:
    return doit(f"config={root / 'cluster.yaml'}", f"out={root / 'out'}", *args)


def detach_paused(vm: Path) -> int:
    """Start the VM's real QEMU detached with its CPUs stopped (-S): it runs, it does not boot."""
    result = run([str(vm / "run.sh"), "--detach", "-S"], capture_output=True, text=True, env=ENV,
                 timeout=60)
    assert result.returncode == 0, result.stderr
    return int((vm / "qemu.pid").read_text())


def one_line(result) -> str:
    lines = result.stderr.strip().splitlines()
    assert result.returncode != 0 and len(lines) == 1, result.stderr
    return lines[0]


@pytest.fixture
def trio(mini: Path, tmp_path: Path):
    out = build_cluster(tmp_path, mini / "mini.yaml", {"d1": {}, "d2": {}, "d3": {}})
    yield tmp_path, out
    run([str(out / "cluster.sh"), "down"], capture_output=True, env={**ENV, "LEANVM_STOP_TIMEOUT": "1"},
        timeout=120)


def test_bare_reset_is_refused_and_touches_no_disk(trio):
    root, out = trio
    inodes = {p: p.stat().st_ino for p in out.glob("vms/*/*.img")}
    line = one_line(run_doit(root, "reset"))
    assert "doit reset:NAME" in line
    assert {p: p.stat().st_ino for p in out.glob("vms/*/*.img")} == inodes


def test_a_task_of_a_vm_that_does_not_exist_is_one_line_naming_those_that_do(trio):
    root, out = trio
    line = one_line(run_doit(root, "reset:nosuch"))
    assert "has no VM named 'nosuch' (task reset:nosuch)" in line and "the VMs are: d1, d2, d3" in line


def test_a_cluster_file_that_fails_to_load_does_not_claim_an_out_dir(mini: Path, tmp_path: Path):
    typo = tmp_path / "clustr.yaml"
    typo.write_text("release: nosuch-profile\nvms:\n  a: {}\n")
    assert doit(f"config={typo}", f"out={tmp_path / 'out'}").returncode != 0
    assert not (tmp_path / "out" / "state" / "cluster-file").exists()
    out = build_cluster(tmp_path, mini / "mini.yaml", {"a": {}})  # the right file is not refused
    assert (out / "state" / "cluster-file").read_text().strip() == str(tmp_path / "cluster.yaml")
    assert "no release profile 'nosuch-profile'" in one_line(doit(f"config={typo}", f"out={out}"))
    typo.write_text(f"release: {mini / 'mini.yaml'}\nvms:\n  a: {{}}\n")  # another file, once claimed: one line
    line = one_line(doit(f"config={typo}", f"out={out}"))
    assert f"holds the cluster of {tmp_path / 'cluster.yaml'}" in line and "remove " in line


def test_clean_forget_prune_and_retire_refuse_while_a_vm_runs(trio):
    root, out = trio
    pid = detach_paused(out / "vms" / "d2")
    for verb in ("clean", "forget", "prune"):
        line = one_line(run_doit(root, verb))
        assert f"d2 (pid {pid})" in line and "stop them first" in line, (verb, line)
    assert (out / "vms" / "d2" / "run.sh").exists() and (out / "cluster.sh").exists()
    # removing the running VM from the cluster file: refused, it stays manageable
    doc = yaml.safe_load((root / "cluster.yaml").read_text())
    del doc["vms"]["d2"]
    (root / "cluster.yaml").write_text(yaml.safe_dump(doc))
    result = run_doit(root)
    assert result.returncode != 0 and "VM d2 is running" in result.stderr and "stop it first" in result.stderr
    assert (out / "vms" / "d2" / "run.sh").exists()
    status = subprocess.run([str(out / "cluster.sh"), "status"], capture_output=True, text=True).stdout
    assert "d2" in status and "running" in status


def test_clean_keeps_the_verified_images_and_rebuilds_without_the_mirror(trio):
    root, out = trio
    images = sorted(p.name for p in out.glob("images/*/*/*"))
    assert "usr.img" in images
    assert run_doit(root, "clean").returncode == 0
    assert sorted(p.name for p in out.glob("images/*/*/*")) == images
    assert not (out / "vms" / "d1" / "run.sh").exists()
    mirror = Path(yaml.safe_load((root / "cluster.yaml").read_text())["release"]).parent / "mirror"
    hidden = mirror.with_name("mirror.unreachable")
    mirror.rename(hidden)
    try:
        result = run_doit(root)
    finally:
        hidden.rename(mirror)
    assert result.returncode == 0, result.stderr
    assert (out / "vms" / "d1" / "run.sh").exists()


def test_a_readded_vm_has_no_stale_retired_launcher(trio):
    root, out = trio
    full = (root / "cluster.yaml").read_text()
    doc = yaml.safe_load(full)
    del doc["vms"]["d3"]
    (root / "cluster.yaml").write_text(yaml.safe_dump(doc))
    assert run_doit(root).returncode == 0
    assert (out / "vms" / "d3" / "run.sh.retired").exists()
    (root / "cluster.yaml").write_text(full)
    assert run_doit(root).returncode == 0
    assert sorted(p.name for p in (out / "vms" / "d3").glob("run.sh*")) == ["run.sh"]
    for runtime in ("run.log", "run.lock", "console.log", "forced-stop"):
        (out / "vms" / "d1" / runtime).write_text("this host's run\n")
    assert run_doit(root, "bundle").returncode == 0
    listing = sh("tar", "-tzf", next((out / "bundles").glob("*.tar.gz"))).decode()
    assert "run.sh.retired" not in listing and "vms/d1/rootfs.img" in listing
    assert not any(runtime in listing for runtime in ("run.log", "run.lock", "console.log", "forced-stop"))


@pytest.mark.slow  # ~12 s: in CI's slow run (the main suite stays under its 10 minutes)
def test_a_refused_second_start_leaves_the_running_vm_intact(trio):
    _, out = trio
    vm = out / "vms" / "d1"
    env = {**ENV, "LEANVM_APPEND": "leanvm.hold"}
    assert subprocess.run([str(vm / "run.sh"), "--detach"], env=env, capture_output=True).returncode == 0
    sockets = {p.name: p.stat().st_ino for p in vm.glob("*.sock")}
    assert sockets
    again = subprocess.run([str(vm / "run.sh"), "--detach"], env=env, capture_output=True, text=True)
    assert "already running" in one_line(again)
    assert {p.name: p.stat().st_ino for p in vm.glob("*.sock")} == sockets
    wait_for_text(vm / "console.log", "holding (leanvm.hold)")
    down = run([str(out / "cluster.sh"), "down"], capture_output=True, text=True, env=env, timeout=120)
    assert down.returncode == 0 and "did not power off" not in down.stdout, down.stdout
    assert "leanvm: power button pressed" in (vm / "console.log").read_text()


@pytest.mark.slow  # a boot (~17 s): in CI's slow run, keeping the main suite under its 10 minutes
def test_printed_command_runs_when_pasted_elsewhere_with_no_other_vm_up(trio):
    _, out = trio
    assert qemu_pids(out) == [] and not (out / "net").exists()  # no VM has run: no switch, no out/net
    line = subprocess.run([str(out / "vms" / "d2" / "run.sh"), "--print"], capture_output=True, text=True,
                          check=True, env=ENV).stdout
    words = shlex.split(line, comments=True)
    assert words[:3] == ["mkdir", "-p", str(out / "net")]
    pasted = run(["sh", "-c", line.strip()], stdin=subprocess.DEVNULL, capture_output=True, cwd="/", timeout=120)
    console = pasted.stdout.decode(errors="replace")
    assert pasted.returncode == 0, console[-2000:] + pasted.stderr.decode()
    assert "leanvm: ready" in console and "leanvm: cluster network: eth1" in console, console[-3000:]
    assert printed(out / "vms" / "d2" / "run.sh")[0] == "qemu-system-x86_64"
    down = run([str(out / "cluster.sh"), "down"], capture_output=True, text=True, timeout=60)
    assert down.returncode == 0 and switch_processes(out) == [], down.stderr


def test_a_run_sh_stopped_by_a_signal_stops_its_switch(trio):
    _, out = trio
    proc = subprocess.Popen([str(out / "vms" / "d1" / "run.sh"), "-S"], stdin=subprocess.PIPE,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=ENV, start_new_session=True)
    wait = run(["sh", "-c", f"while [ ! -s '{out}/vms/d1/qemu.pid' ]; do sleep 0.1; done"], timeout=30)
    assert wait.returncode == 0 and switch_processes(out)
    os.killpg(proc.pid, 15)  # as `timeout` does: the whole process group
    proc.wait(timeout=30)
    assert switch_processes(out) == [] and qemu_pids(out) == []
    assert list((out / "net" / "users").iterdir()) == []


def test_a_foreground_vm_stopped_by_force_says_so(trio):
    _, out = trio
    env = {**ENV, "LEANVM_APPEND": "leanvm.shell", "LEANVM_STOP_TIMEOUT": "2"}  # ignores the button
    proc = start([out / "vms" / "d3" / "run.sh"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                 stderr=subprocess.PIPE, env=env)
    try:
        run(["sh", "-c", f"while [ ! -s '{out}/vms/d3/qemu.pid' ]; do sleep 0.1; done"], timeout=60)
        down = run([str(out / "cluster.sh"), "down"], capture_output=True, text=True, env=env,
                   timeout=120)
        assert "d3: did not power off within 2s" in down.stdout
    finally:
        _, err = finish(proc)
    assert proc.returncode != 0 and "stopped by force" in err.decode()


def test_verification_and_the_mini_release_leave_no_gpg_agent(mini: Path, trio):
    agents = subprocess.run(["pgrep", "-af", "gpg-agent"], capture_output=True, text=True).stdout
    assert "leanvm-gpg-" not in agents  # every verification's private GNUPGHOME
    assert str(mini / "gnupg") not in agents
