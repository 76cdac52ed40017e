"""The cluster under libvirt, with a real libvirtd started by the tests."""

import json
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import (
    BOOT_TIMEOUT,
    ENV,
    LIBVIRT_URI,
    build_cluster,
    doit,
    processes,
    rendered_domain,
    run,
    sh,
    start_libvirtd,
    start_ssh_host,
    stop_daemons,
    virsh,
    wait_for_text,
)


@pytest.fixture(scope="module")
def libvirtd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    started = start_libvirtd(tmp_path_factory.mktemp("libvirtd"))
    yield
    stop_daemons(started)


@pytest.fixture
def root() -> Iterator[Path]:
    """A work directory that libvirt's QEMU user (libvirt-qemu) can traverse, unlike pytest's
    0700 tmp_path: under qemu:///system QEMU does not run as root."""
    path = Path(tempfile.mkdtemp(prefix="leanvm-libvirt-", dir="/var/tmp"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def remote(libvirtd: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, dict]]:
    """qemu+ssh:// to this machine through a test sshd: the URI and the client's environment."""
    daemon, target, env = start_ssh_host(tmp_path_factory.mktemp("ssh-host"))
    yield f"qemu+ssh://{target}/system", env
    daemon.terminate()
    daemon.wait(timeout=30)


def libvirt_sh(out: Path, *args: str, append: str = "", uri: str = LIBVIRT_URI,
               env: dict | None = None) -> subprocess.CompletedProcess:
    env = {**(env or ENV), "LEANVM_ACCEL": "tcg", "LEANVM_APPEND": append, "LEANVM_STOP_TIMEOUT": "60"}
    return run([str(out / "libvirt.sh"), "--connect", uri, *args], capture_output=True, text=True,
               env=env, stdin=subprocess.DEVNULL, timeout=300)


def build_for_libvirt(root: Path, mini: Path, vms: dict) -> Path:
    out = build_cluster(root, mini / "mini.yaml", vms)
    made = doit(f"config={root / 'cluster.yaml'}", f"out={out}", "libvirt")
    assert made.returncode == 0, made.stderr
    return out


def prefix_of(out: Path) -> str:
    return re.search(r"^prefix=(\S+)$", (out / "libvirt" / "cluster.env").read_text(), re.M)[1]


def ours(out: Path) -> tuple[list[str], list[str], list[int]]:
    """This out/'s domains, networks (defined or running) and QEMU processes."""
    prefix = prefix_of(out)
    domains = [d for d in virsh("list", "--all", "--name").split() if d.startswith(prefix)]
    networks = [n for n in virsh("net-list", "--all", "--name").split() if n.startswith(prefix)]
    return domains, networks, processes(lambda cmd: f"guest={prefix}".encode() in cmd)


def remove_all(out: Path) -> None:
    """Whatever a failed test left in libvirt."""
    domains, networks, _ = ours(out)
    for domain in domains:
        subprocess.run(["virsh", "-c", LIBVIRT_URI, "destroy", domain], capture_output=True)
        subprocess.run(["virsh", "-c", LIBVIRT_URI, "undefine", domain], capture_output=True)
    for network in networks:
        subprocess.run(["virsh", "-c", LIBVIRT_URI, "net-destroy", network], capture_output=True)
        subprocess.run(["virsh", "-c", LIBVIRT_URI, "net-undefine", network], capture_output=True)


def ssh_port(out: Path, name: str) -> int:
    return int(re.search(r"^ssh_port=(\d+)$", (out / "state" / "vms" / f"{name}.env").read_text(), re.M)[1])


def test_domain_and_network_xml_validate_and_use_the_run_sh_files(mini: Path, root: Path):
    (root / "b.ign").write_text(json.dumps({"ignition": {"version": "3.3.0"}}))
    out = build_for_libvirt(root, mini, {"node-a": {"cluster_ip": "10.77.0.11", "forward": ["18080:80"]},
                                         "node-b": {"ignition": "b.ign"}})
    assert not list(out.glob("vms/*/domain.xml"))  # a domain's accelerator is the libvirt host's: define writes it
    files = [rendered_domain(out, "node-a"), rendered_domain(out, "node-b"), out / "libvirt" / "network.xml"]
    for path in files:
        check = subprocess.run(["virt-xml-validate", str(path)], capture_output=True, text=True)
        assert check.returncode == 0, check.stdout + check.stderr
    prefix = prefix_of(out)
    domain = ET.parse(files[0]).getroot()
    assert domain.findtext("name") == f"{prefix}-node-a"
    usr, rootfs, oem, config = domain.findall("devices/disk")
    assert usr.find("source").get("file") == str(next(out.glob("images/*/*/usr.img")))
    assert usr.find("readonly") is not None and usr.find("shareable") is not None
    assert [d.findtext("serial") for d in (usr, rootfs, oem, config)] == ["usr.readonly", "rootfs", "oem", "config-2"]
    assert rootfs.find("source").get("file") == str(out / "vms" / "node-a" / "rootfs.img")
    assert config.find("source").get("file") == str(out / "vms" / "node-a" / "config.iso")
    assert config.find("readonly") is not None and domain.find("devices/filesystem") is None
    assert domain.find("devices/serial/log").get("file") == str(out / "vms" / "node-a" / "console.log")
    args = [a.get("value") for a in domain.iter("{http://libvirt.org/schemas/domain/qemu/1.0}arg")]
    port = ssh_port(out, "node-a")
    assert f"hostfwd=tcp:127.0.0.1:{port}-:22,hostfwd=tcp:127.0.0.1:18080-:80" in args[1]
    cluster_mac = re.search(r"^cluster_mac=(\S+)$", (out / "state/vms/node-a.env").read_text(), re.M)[1]
    assert domain.find("devices/interface/mac").get("address") == cluster_mac
    assert domain.find("devices/interface/source").get("network") == f"{prefix}-cluster"
    assert "flatcar.first_boot" not in domain.findtext("os/cmdline")  # added by libvirt.sh start
    bundled = doit(f"config={root / 'cluster.yaml'}", f"out={out}", "bundle")
    assert bundled.returncode == 0, bundled.stderr
    listing = sh("tar", "-tzf", next(out.glob("bundles/*.tar.gz"))).decode().split()
    for name in ("libvirt.sh", "libvirt/network.xml", "libvirt/cluster.env"):
        assert any(entry.endswith(name) for entry in listing), (name, listing)
    b = ET.parse(files[1]).getroot()
    assert domain.find("sysinfo") is None
    assert b.find("sysinfo/entry").get("name") == "opt/org.flatcar-linux/config"
    assert b.find("sysinfo/entry").get("file") == str(out / "vms" / "node-b" / "ignition.json")


def test_errors_are_one_line_and_two_clusters_coexist(mini: Path, root: Path, libvirtd: None):
    first = build_for_libvirt(root / "one", mini, {"node-a": {}})
    second = build_for_libvirt(root / "two", mini, {"node-a": {}})
    try:
        unreachable = libvirt_sh(first, "status", uri="qemu+unix:///system?socket=/nonexistent/sock")
        assert unreachable.returncode == 2 and unreachable.stderr.count("\n") == 1, unreachable.stderr
        assert unreachable.stderr.startswith("leanvm: error: cannot reach libvirt at qemu+unix:///system")
        early = libvirt_sh(first, "start")
        assert early.returncode == 2 and early.stderr.count("\n") == 1
        assert "is not defined; run libvirt.sh define" in early.stderr
        # the same command without the wrapper: leanvm libvirt, as docs/reference.md names it
        leanvm = Path(sys.executable).parent / "leanvm"
        direct = run([str(leanvm), "libvirt", "--out", str(first), "--connect", LIBVIRT_URI, "status"],
                     capture_output=True, text=True, env=ENV, timeout=120)
        assert direct.returncode == 0, direct.stderr
        row = rf"^node-a\s+{prefix_of(first)}-node-a\s+undefined\s+127\.0\.0\.1:{ssh_port(first, 'node-a')}$"
        assert re.search(row, direct.stdout, re.M), direct.stdout
        for out in (first, second):
            defined = libvirt_sh(out, "define")
            assert defined.returncode == 0, defined.stderr
        # define keeps what it defined: here under TCG (LEANVM_ACCEL=tcg), a plain 'qemu' domain
        kept = ET.parse(first / "vms" / "node-a" / "domain.xml").getroot()
        live = ET.fromstring(virsh("dumpxml", f"{prefix_of(first)}-node-a"))
        assert kept.get("type") == live.get("type") == "qemu"
        assert prefix_of(first) != prefix_of(second)
        assert len(ours(first)[0]) == len(ours(second)[0]) == 1
        with socket.socket() as taken:  # node-a's ssh port, taken by someone else
            taken.bind(("127.0.0.1", ssh_port(first, "node-a")))
            taken.listen()
            busy = libvirt_sh(first, "start")
        assert busy.returncode == 2 and busy.stderr.count("\n") == 1, busy.stderr
        assert f"host port {ssh_port(first, 'node-a')} (127.0.0.1) is already in use" in busy.stderr
        assert virsh("domstate", f"{prefix_of(first)}-node-a").strip() == "shut off"  # nothing started
        assert ours(first)[2] == []
        # --dir: the out/ as it lies on the libvirt host (a bundle unpacked elsewhere)
        moved = libvirt_sh(first, "--dir", "/srv/leanvm/out", "define")
        assert moved.returncode == 0, moved.stderr
        sources = [d.find("source").get("file") for d in
                   ET.fromstring(virsh("dumpxml", f"{prefix_of(first)}-node-a")).findall("devices/disk")]
        assert sources[1:] == [f"/srv/leanvm/out/vms/node-a/{disk}" for disk in ("rootfs.img", "oem.img", "config.iso")]
        assert sources[0].startswith("/srv/leanvm/out/images/")
        for out in (first, second):
            gone = libvirt_sh(out, "undefine")
            assert gone.returncode == 0, gone.stderr
            assert ours(out) == ([], [], [])
    finally:
        remove_all(first)
        remove_all(second)


def assert_one_shared_usr_and_plain_next_boot(prefix: str) -> None:
    usr_disks = set()
    for name in ("node-a", "node-b"):
        live = ET.fromstring(virsh("dumpxml", f"{prefix}-{name}"))
        usr = live.find("devices/disk")
        assert usr.find("readonly") is not None and usr.find("shareable") is not None
        usr_disks.add(usr.find("source").get("file"))
        assert "flatcar.first_boot=1" in live.findtext("os/cmdline")
        # the next start is no first boot: the persistent definition has the plain command line
        inactive = ET.fromstring(virsh("dumpxml", "--inactive", f"{prefix}-{name}"))
        assert "first_boot" not in inactive.findtext("os/cmdline")
    assert len(usr_disks) == 1  # one squashfs for both


def test_two_vm_cluster_over_qemu_ssh_boots_pings_and_is_torn_down_cleanly(mini: Path, root: Path,
                                                                           remote: tuple[str, dict]):
    """The whole cycle through qemu+ssh://root@127.0.0.1:PORT/system: the remote-host path,
    first-boot check over ssh included (the other tests use qemu:///system)."""
    uri, env = remote
    (root / "b.ign").write_text(json.dumps({"ignition": {"version": "3.3.0"}}))
    out = build_for_libvirt(root, mini, {"node-a": {"cluster_ip": "10.77.0.11"},
                                         "node-b": {"cluster_ip": "10.77.0.12", "ignition": "b.ign"}})
    prefix = prefix_of(out)
    (usr_img,) = out.glob("images/*/*/usr.img")
    owner = (usr_img.stat().st_uid, usr_img.stat().st_gid, usr_img.stat().st_mode)
    try:
        up = libvirt_sh(out, "define", "start", append="leanvm.hold leanvm.ping=10.77.0.11,10.77.0.12",
                        uri=uri, env=env)
        assert up.returncode == 0, up.stderr
        started = re.findall(r"^(node-[ab]): started (\S+) \(tcg, first boot,", up.stdout, re.M)
        assert started == [("node-a", f"{prefix}-node-a"), ("node-b", f"{prefix}-node-b")], up.stdout
        again = libvirt_sh(out, "start", uri=uri, env=env)
        assert again.returncode == 2 and again.stderr.count("\n") == 1
        assert f"domain {prefix}-node-a (VM node-a) is already running" in again.stderr
        for name in ("node-a", "node-b"):
            console = wait_for_text(out / "vms" / name / "console.log", "leanvm: holding", 3 * BOOT_TIMEOUT)
            assert "leanvm: ping 10.77.0.11: ok" in console and "leanvm: ping 10.77.0.12: ok" in console
            assert "leanvm: usr writable: no" in console and "leanvm: first boot: yes" in console
        assert "leanvm: ignition: result written" in (out / "vms" / "node-b" / "console.log").read_text()
        mounts = run([str(out / "cluster.sh"), "ssh", "node-a", "--", "cat", "/proc/mounts"],
                     capture_output=True, text=True, timeout=120)
        assert re.search(r"^/dev/vda1 /usr squashfs ro[, ]", mounts.stdout, re.M), mounts.stdout + mounts.stderr
        assert_one_shared_usr_and_plain_next_boot(prefix)
        status = run([str(out / "cluster.sh"), "status"], capture_output=True, text=True, timeout=60).stdout
        assert re.search(r"^node-a\s+running \(libvirt\)", status, re.M), status
        down = libvirt_sh(out, "stop", uri=uri, env=env)
        assert down.returncode == 0, down.stderr
        assert "destroying" not in down.stdout  # both powered off on the ACPI button
        for name in ("node-a", "node-b"):
            assert wait_for_text(out / "vms" / name / "console.log", "leanvm: power button pressed", 5)
        gone = libvirt_sh(out, "undefine", uri=uri, env=env)
        assert gone.returncode == 0, gone.stderr
        assert ours(out) == ([], [], [])
        assert (usr_img.stat().st_uid, usr_img.stat().st_gid, usr_img.stat().st_mode) == owner  # as leanvm set it
        assert not Path("/sys/class/net", "lv" + prefix.removeprefix("leanvm-")).exists()
    finally:
        remove_all(out)


@pytest.mark.slow  # waits out the 20 s deadline: in CI's slow run
def test_a_libvirt_that_never_answers_is_one_line_not_a_hang(mini: Path, root: Path, tmp_path: Path):
    """A libvirtd that accepts and never answers (as one probing a broken /dev/kvm does): a
    real virsh against a real socket that stays silent."""
    out = build_for_libvirt(root, mini, {"node-a": {}})
    mute = tmp_path / "mute.sock"
    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind(str(mute))
        listener.listen()
        said = libvirt_sh(out, "define", uri=f"qemu+unix:///system?socket={mute}")
    assert said.returncode == 2 and said.stderr.count("\n") == 1, said.stderr
    assert "did not answer `virsh uri` within 20 s" in said.stderr and "/dev/kvm" in said.stderr, said.stderr
