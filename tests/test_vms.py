"""Root disk, config drive and launcher per VM; incremental, relocatable, VM state safe."""

import os
import re
import socket
import subprocess
from pathlib import Path

import pytest
import yaml
from support import Mirror, Project, paths_in, printed, run, sh, usr_partition

THREE = {"core1": {"ssh_port": 2222}, "core2": {"ssh_port": 2223}, "core3": {}}


@pytest.fixture
def cluster(project: Project) -> Project:
    (project.root / "core1.yaml").write_text("#cloud-config\nhostname: first\n")
    vms = {**THREE, "core1": {"ssh_port": 2222, "user_data": "core1.yaml"}}
    project.write_cluster(vms)
    result = project.doit()
    assert result.returncode == 0, result.stderr
    return project


def test_tcg_code_cache_is_capped_only_when_asked_and_only_under_tcg(cluster: Project):
    run_sh = cluster.vm("core1") / "run.sh"
    argv = printed(run_sh, {"LEANVM_ACCEL": "tcg"})
    assert argv[argv.index("-accel") + 1] == "tcg"  # QEMU's own cache size unless asked
    argv = printed(run_sh, {"LEANVM_ACCEL": "tcg", "LEANVM_TCG_CACHE": "32"})
    assert argv[argv.index("-accel") + 1] == "tcg,tb-size=32"
    argv = printed(run_sh, {"LEANVM_ACCEL": "kvm", "LEANVM_TCG_CACHE": "32"})
    assert argv[argv.index("-accel") + 1] == "kvm"  # KVM has no code cache
    for bad in ("32M", "0", "-1", " "):
        result = run([run_sh, "--print"], capture_output=True, text=True, timeout=30,
                     env={**os.environ, "LEANVM_ACCEL": "tcg", "LEANVM_TCG_CACHE": bad})
        assert result.returncode == 1 and result.stdout == "", result.stdout
        assert result.stderr == f"run.sh: LEANVM_TCG_CACHE must be a size in MiB such as 64, not '{bad}'\n"


def test_files_modes_and_shell_checks(cluster: Project):
    for name in THREE:
        vm = cluster.vm(name)
        run_sh = vm / "run.sh"
        assert run_sh.stat().st_mode & 0o777 == 0o755
        assert (vm / "rootfs.img").is_file()
        user_data = (vm / "config/openstack/latest/user_data").read_text()
        assert user_data.startswith("#cloud-config")
        subprocess.run(["sh", "-n", str(run_sh)], check=True)
        subprocess.run(["shellcheck", "-s", "sh", str(run_sh)], check=True)
    assert "hostname: first" in (cluster.vm("core1") / "config/openstack/latest/user_data").read_text()
    generated = yaml.safe_load((cluster.vm("core2") / "config/openstack/latest/user_data").read_text())
    assert generated["hostname"] == "core2"
    # every VM gets a cluster address (assigned from 10.77.0.11 on, in name order)
    (unit,) = generated["coreos"]["units"]
    assert "Address=10.77.0.12/24" in unit["content"]


def test_print_shows_distinct_macs_ports_and_existing_paths(cluster: Project):
    macs, ports = set(), set()
    for name in THREE:
        argv = printed(cluster.vm(name) / "run.sh", {"LEANVM_ACCEL": "tcg"})
        text = " ".join(argv)
        macs.add(re.search(r"mac=([0-9a-f:]{17})", text).group(1))
        ports.add(re.search(r"hostfwd=tcp:127.0.0.1:(\d+)-:22", text).group(1))
        assert "-cpu max" in text and "-accel tcg " in text
        assert argv.index("-name") + 1 == argv.index(name)
        usr = next(a for a in argv if "serial=usr.readonly" in a)
        root = next(a for a in argv if "serial=rootfs" in a)
        oem = next(a for a in argv if "serial=oem" in a)
        assert argv.index(usr) < argv.index(root) < argv.index(oem)
        drives = [a for a in argv if a.startswith("if=none,")]
        assert "readonly=on" in drives[0] and drives[0].endswith("/usr.img")
        assert drives[1].endswith("/rootfs.img") and drives[2].endswith("/oem.img")
        for path in paths_in(argv):
            assert path.exists() or path.name == "qemu.pid", path
        assert len([p for p in paths_in(argv) if p.name != "qemu.pid"]) == 5
    assert len(macs) == 3 and len(ports) == 3 and {"2222", "2223"} <= ports


def test_copied_out_dir_launchers_point_into_the_copy(cluster: Project, tmp_path: Path):
    copy = tmp_path / "moved, with space"
    sh("cp", "-a", "--sparse=always", cluster.out, copy)
    for name in THREE:
        for path in paths_in(printed(copy / "vms" / name / "run.sh")):
            assert str(path).startswith(str(copy)), path
            assert path.exists() or path.name == "qemu.pid"


def test_bad_accel_and_missing_qemu_are_one_line(cluster: Project):
    run_sh = str(cluster.vm("core1") / "run.sh")
    bad = subprocess.run([run_sh], capture_output=True, text=True, env={**os.environ, "LEANVM_ACCEL": "fast"})
    assert bad.returncode != 0 and bad.stderr.count("\n") == 1 and "LEANVM_ACCEL" in bad.stderr
    env = {**os.environ, "LEANVM_QEMU": "qemu-system-nonexistent"}
    missing = subprocess.run([run_sh], capture_output=True, text=True, env=env)
    assert missing.returncode != 0 and missing.stderr.count("\n") == 1
    assert "qemu-system-nonexistent not found" in missing.stderr


def test_root_disk_is_sparse(project: Project):
    project.write_cluster({"big": {"disk": "4G"}})
    assert project.doit().returncode == 0
    disk = project.vm("big") / "rootfs.img"
    assert disk.stat().st_size == 4 << 30
    assert disk.stat().st_blocks * 512 < 3 << 20
    assert fs_size(disk) == 4 << 30
    sh("e2fsck", "-n", "-f", disk)


def test_second_run_executes_nothing_and_ports_are_stable(cluster: Project):
    port = re.search(r"hostfwd=tcp:127.0.0.1:(\d+)", " ".join(printed(cluster.vm("core3") / "run.sh"))).group(1)
    result = cluster.doit()
    assert result.returncode == 0 and result.executed == set()
    cluster.doit("forget")
    assert cluster.doit().returncode == 0
    assert f"127.0.0.1:{port}-" in " ".join(printed(cluster.vm("core3") / "run.sh"))


def test_editing_user_data_reruns_only_that_configdrive(cluster: Project):
    (cluster.root / "core1.yaml").write_text("#cloud-config\nhostname: renamed\n")
    result = cluster.doit()
    assert result.executed == {"configdrive:core1"}
    assert "renamed" in (cluster.vm("core1") / "config/openstack/latest/user_data").read_text()


def test_adding_a_vm_runs_only_its_three_tasks_and_names_it_to_the_others(cluster: Project):
    cluster.write_cluster({**THREE, "core1": {"ssh_port": 2222, "user_data": "core1.yaml"}, "core4": {}})
    result = cluster.doit()
    # the other VMs' config drives only: their /etc/hosts now names core4 (no disk, no launcher)
    assert result.executed == {"rootfs:core4", "configdrive:core4", "launcher:core4"} | {
        f"configdrive:{name}" for name in THREE}
    hosts = yaml.safe_load((cluster.vm("core1") / "config/openstack/latest/user_data").read_text())["write_files"]
    assert "core4" in next(f["content"] for f in hosts if f["path"] == "/etc/hosts")


def test_changing_memory_rerenders_only_that_launcher(cluster: Project):
    cluster.write_cluster({**THREE, "core1": {"ssh_port": 2222, "user_data": "core1.yaml"},
                           "core2": {"ssh_port": 2223, "memory": 512}})
    result = cluster.doit()
    assert result.executed == {"launcher:core2"}
    assert "-m 512" in " ".join(printed(cluster.vm("core2") / "run.sh"))


def test_new_release_version_builds_new_images_and_keeps_root_disks(cluster: Project, mirror: Mirror):
    disk = cluster.vm("core2") / "rootfs.img"
    sh("debugfs", "-w", "-R", f"write {cluster.cluster_file} marker", disk)
    mirror.add_version("101.0.0")
    result = cluster.doit()
    assert result.returncode == 0, result.stderr
    assert usr_partition(cluster.images("101.0.0") / "usr.img") == mirror.squashfs("101.0.0").read_bytes()
    assert {f"launcher:{n}" for n in THREE} <= result.executed
    assert not any(t.startswith("rootfs:") for t in result.executed)
    assert "images/test/101.0.0" in " ".join(printed(cluster.vm("core1") / "run.sh"))
    assert sh("debugfs", "-R", "cat marker", disk) == cluster.cluster_file.read_bytes()


def fs_size(disk: Path) -> int:
    header = sh("dumpe2fs", "-h", disk).decode()
    count = int(re.search(r"^Block count:\s+(\d+)", header, re.M).group(1))
    return count * int(re.search(r"^Block size:\s+(\d+)", header, re.M).group(1))


def test_disk_grow_keeps_data_and_shrink_is_refused(project: Project):
    project.write_cluster({"core1": {"disk": "64M"}})
    assert project.doit().returncode == 0
    disk = project.vm("core1") / "rootfs.img"
    payload = project.root / "payload"
    payload.write_bytes(os.urandom(50_000))
    sh("debugfs", "-w", "-R", f"write {payload} kept", disk)
    project.write_cluster({"core1": {"disk": "128M"}})
    grown = project.doit()
    assert grown.executed == {"rootfs:core1"}, grown.stderr
    assert disk.stat().st_size == 128 << 20
    assert fs_size(disk) == 128 << 20
    assert sh("debugfs", "-R", "cat kept", disk) == payload.read_bytes()
    assert project.doit().executed == set()  # a rebuild does not touch it

    project.write_cluster({"core1": {"disk": "64M"}})
    shrink = project.doit()
    assert shrink.returncode != 0
    assert "smaller than the existing root disk" in shrink.stderr and "reset:core1" in shrink.stderr
    assert len(shrink.stderr.strip().splitlines()) == 1
    assert disk.stat().st_size == 128 << 20
    assert sh("debugfs", "-R", "cat kept", disk) == payload.read_bytes()


def test_a_disk_whose_errors_e2fsck_corrects_grows_and_one_it_cannot_fix_is_one_line(project: Project):
    project.write_cluster({"core1": {"disk": "64M"}})
    assert project.doit().returncode == 0
    disk = project.vm("core1") / "rootfs.img"
    sh("debugfs", "-w", "-R", "ssv free_blocks_count 12345", disk)  # wrong counts, as a force-stopped VM leaves
    assert b"Free blocks count wrong" in run(["e2fsck", "-f", "-n", disk], capture_output=True, timeout=60).stdout
    project.write_cluster({"core1": {"disk": "96M"}})
    grown = project.doit()  # e2fsck -p corrects it (exit code 1): the grow goes on
    assert grown.returncode == 0 and grown.executed == {"rootfs:core1"}, grown.stderr
    assert fs_size(disk) == 96 << 20
    with open(disk, "r+b") as f:  # no ext4 left at all (no superblock, no backup): e2fsck cannot fix that
        f.truncate(0)
        f.truncate(96 << 20)
    project.write_cluster({"core1": {"disk": "128M"}})
    failed = project.doit()
    (line,) = failed.stderr.strip().splitlines()
    assert failed.returncode != 0 and "e2fsck -f -p found errors it could not fix" in line, failed.stderr
    assert f"e2fsck -f {disk}" in line and disk.stat().st_size == 96 << 20  # not grown


def test_clean_keeps_root_disks_and_reset_recreates(cluster: Project):
    disk = cluster.vm("core1") / "rootfs.img"
    sh("debugfs", "-w", "-R", f"write {cluster.cluster_file} kept", disk)
    assert cluster.doit("clean").returncode == 0
    assert not (cluster.vm("core1") / "run.sh").exists()
    assert sh("debugfs", "-R", "cat kept", disk) == cluster.cluster_file.read_bytes()
    assert cluster.doit("forget").returncode == 0
    assert disk.exists()
    assert cluster.doit("reset:core1").returncode == 0
    assert b"File not found" in subprocess.run(["debugfs", "-R", "cat kept", str(disk)],
                                               capture_output=True).stderr


def identity_of(project: Project, name: str) -> dict[str, str]:
    text = (project.out / "state" / "vms" / f"{name}.env").read_text()
    return dict(line.split("=", 1) for line in text.splitlines() if "=" in line and not line.startswith("#"))


def test_auto_port_never_moves_when_a_colliding_vm_is_added(project: Project):
    # vm09 and extra4 hash to the same auto port (25414); extra4 sorts first.
    project.write_cluster({"vm09": {}})
    assert project.doit().returncode == 0
    assert identity_of(project, "vm09")["ssh_port"] == "25414"
    project.write_cluster({"vm09": {}, "extra4": {}})
    result = project.doit()
    assert result.executed == {"rootfs:extra4", "configdrive:extra4", "launcher:extra4", "configdrive:vm09"}
    assert identity_of(project, "vm09")["ssh_port"] == "25414"
    assert identity_of(project, "extra4")["ssh_port"] == "25415"
    before = {name: identity_of(project, name) for name in ("vm09", "extra4")}

    # clean deletes the launchers, not the identities: nothing moves (issue 12, defect 2)
    assert project.doit("clean").returncode == 0
    assert not (project.vm("vm09") / "run.sh").exists()
    assert project.doit("forget").returncode == 0
    assert project.doit().returncode == 0
    assert {name: identity_of(project, name) for name in ("vm09", "extra4")} == before
    assert "hostfwd=tcp:127.0.0.1:25414-:22" in " ".join(printed(project.vm("vm09") / "run.sh"))

    # a retired VM keeps its entry and its port; a new VM does not take it
    project.write_cluster({"extra4": {}, "vm09b": {}})
    assert project.doit().returncode == 0
    assert identity_of(project, "vm09") == before["vm09"]
    assert identity_of(project, "vm09b")["ssh_port"] not in ("25414", "25415")
    project.write_cluster({"vm09": {}, "extra4": {}, "vm09b": {}})
    assert project.doit().returncode == 0
    assert identity_of(project, "vm09") == before["vm09"]


def test_auto_ports_avoid_other_clusters_and_ports_in_use(project: Project, tmp_path: Path):
    # Two out/ directories with a VM of the same name: the second picks another port.
    project.write_cluster({"core1": {}, "core2": {}})
    assert project.doit().returncode == 0
    first = identity_of(project, "core1")["ssh_port"]
    other = tmp_path / "other-out"
    assert project.doit(out=other).returncode == 0
    second = (other / "state" / "vms" / "core1.env").read_text()
    assert f"ssh_port={first}\n" not in second
    # A port in use at build time is skipped too.
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 25414))  # vm09's derived port
        busy.listen()
        project.write_cluster({"core1": {}, "core2": {}, "vm09": {}})
        assert project.doit().returncode == 0
    assert identity_of(project, "vm09")["ssh_port"] == "25415"


def test_parallel_build_with_doit_n_2(project: Project, mirror: Mirror):
    project.write_cluster({"p1": {}, "p2": {}, "p3": {}})
    result = project.doit("-n", "2")
    assert result.returncode == 0, result.stderr
    assert usr_partition(project.images() / "usr.img") == mirror.squashfs("100.0.0").read_bytes()
    assert all((project.vm(n) / "run.sh").exists() for n in ("p1", "p2", "p3"))
    assert project.doit("-n", "2").executed == set()


def test_removed_vm_is_retired_from_cluster_sh_and_keeps_its_disk(cluster: Project):
    disk = cluster.vm("core2") / "rootfs.img"
    payload = cluster.root / "payload"
    payload.write_bytes(os.urandom(20_000))
    sh("debugfs", "-w", "-R", f"write {payload} kept", disk)
    cluster.write_cluster({"core1": {"ssh_port": 2222, "user_data": "core1.yaml"}, "core3": {}})
    result = cluster.doit()
    assert result.executed == {"retire", "configdrive:core1", "configdrive:core3"}  # their /etc/hosts
    assert "core2 is no longer in the cluster file" in result.stderr
    assert not (cluster.vm("core2") / "run.sh").exists() and (cluster.vm("core2") / "run.sh.retired").exists()
    status = subprocess.run([str(cluster.out / "cluster.sh"), "status"], capture_output=True, text=True).stdout
    assert "core1" in status and "core2" not in status
    assert cluster.doit().executed == set()
    cluster.write_cluster(THREE | {"core1": {"ssh_port": 2222, "user_data": "core1.yaml"}})
    assert cluster.doit().executed == {"launcher:core2", "configdrive:core1", "configdrive:core3"}
    assert sh("debugfs", "-R", "cat kept", disk) == payload.read_bytes()
