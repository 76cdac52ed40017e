"""Daemons the tests start as root: libvirtd and virtlogd, and an ssh host (dropbear) for qemu+ssh://."""

import os
import shlex
import socket
import subprocess
import time
from pathlib import Path

from leanvm.vm.libvirt import domain_xml, prefix, read_values

from .procs import sh

LIBVIRT_URI = "qemu:///system"


def libvirt_answers() -> bool:
    return subprocess.run(["virsh", "-c", LIBVIRT_URI, "uri"], capture_output=True).returncode == 0


def start_libvirtd(work: Path) -> list[subprocess.Popen]:
    """virtlogd (it writes the console logs) and libvirtd, started here as root: there is no
    systemd to start them. Nothing is started if a libvirtd already answers.

    Both run under `tini -s`, a subreaper: libvirt daemonizes QEMU and waits for it to be
    gone, and this machine's pid 1 reaps orphans late, which leaves libvirtd waiting on
    zombies. libvirtd gets its own mount namespace in which /dev/kvm is unreadable: guests
    hang under this machine's nested KVM, and a KVM that looks usable but fails the probe
    makes libvirt probe QEMU again on every call (~20 s each). That is libvirt's side of
    LEANVM_ACCEL=tcg; `namespaces = []` keeps libvirt from moving that bind mount into
    each QEMU's private /dev."""
    if libvirt_answers():
        return []
    work.mkdir(parents=True, exist_ok=True)
    (work / "no-kvm").touch(mode=0)
    (work / "qemu.conf").write_text("namespaces = []\n")
    hide_kvm = f"mount --bind {shlex.quote(str(work / 'no-kvm'))} /dev/kvm && " if Path("/dev/kvm").exists() else ""
    libvirtd = (f"{hide_kvm}mount --bind {shlex.quote(str(work / 'qemu.conf'))} /etc/libvirt/qemu.conf && "
                "exec tini -s -- libvirtd")
    started = []
    for argv, sock in ((["tini", "-s", "--", "virtlogd"], "/run/libvirt/virtlogd-sock"),
                       (["unshare", "-m", "sh", "-c", libvirtd], "/run/libvirt/libvirt-sock")):
        Path(sock).unlink(missing_ok=True)  # left by a daemon that was killed
        started.append(subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL, start_new_session=True))
        deadline = time.monotonic() + 30
        while not Path(sock).exists():
            assert started[-1].poll() is None and time.monotonic() < deadline, f"{argv} did not start"
            time.sleep(0.1)
    deadline = time.monotonic() + 30
    while not libvirt_answers():
        assert time.monotonic() < deadline, "libvirtd does not answer on " + LIBVIRT_URI
        time.sleep(0.2)
    return started


def stop_daemons(started: list[subprocess.Popen]) -> None:
    for proc in reversed(started):
        proc.terminate()
        proc.wait(timeout=30)


def virsh(*args: str) -> str:
    return subprocess.run(["virsh", "-c", LIBVIRT_URI, "-q", *args], capture_output=True, text=True,
                          check=True).stdout


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_ssh_host(work: Path) -> tuple[subprocess.Popen, str, dict]:
    """This machine as a 'remote host' for qemu+ssh:// URIs: dropbear on 127.0.0.1, in its
    own mount namespace whose /root holds only the test key's authorized_keys (root's real
    home is not touched), and an `ssh` first in PATH that uses that key and its own
    known_hosts (virsh and libvirt.sh both run `ssh` from PATH).
    Returns the daemon, USER@HOST:PORT and the environment for the client side."""
    home, bin_dir = work / "root", work / "bin"
    (home / ".ssh").mkdir(parents=True, mode=0o700)
    bin_dir.mkdir()
    sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", work / "id")
    (home / ".ssh" / "authorized_keys").write_text((work / "id.pub").read_text())
    sh("dropbearkey", "-t", "ed25519", "-f", work / "host_key")
    (work / "ssh_config").write_text(f"Host *\n  IdentityFile {work / 'id'}\n  IdentitiesOnly yes\n"
                                     f"  UserKnownHostsFile {work / 'known_hosts'}\n"
                                     "  StrictHostKeyChecking accept-new\n  LogLevel ERROR\n")
    (bin_dir / "ssh").write_text(f"#!/bin/sh\nexec /usr/bin/ssh -F {shlex.quote(str(work / 'ssh_config'))} \"$@\"\n")
    (bin_dir / "ssh").chmod(0o755)
    port = free_port()
    daemon = (f"mount --bind {shlex.quote(str(home))} /root && exec dropbear -F -E -s "
              f"-p 127.0.0.1:{port} -r {shlex.quote(str(work / 'host_key'))} -P {shlex.quote(str(work / 'pid'))}")
    proc = subprocess.Popen(["unshare", "-m", "sh", "-c", daemon], stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 30
    while True:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                break
        assert proc.poll() is None and time.monotonic() < deadline, "dropbear did not start"
        time.sleep(0.1)
    return proc, f"root@127.0.0.1:{port}", {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}


def rendered_domain(out: Path, vm: str, accel: str = "kvm") -> Path:
    """VM `vm`'s libvirt domain as `leanvm libvirt define` renders it (with `accel`, which a
    define asks libvirt for), written beside out/ for virt-xml-validate: no libvirtd needed."""
    values = read_values(out, vm)
    path = out.parent / f"{vm}-domain.xml"
    path.write_text(domain_xml(vm, values, out, prefix(out), accel, values["kernel_args"]))
    return path
