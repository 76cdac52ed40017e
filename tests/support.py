"""Shared test support: real parts (a signed mirror like Flatcar's served over loopback HTTP
with Range, GPG keys), running doit, building and booting clusters, waiting for console text.
Test modules import from here, never from each other."""

import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import yaml
from leanvm.proc import stop_session

PROJECT = Path(__file__).resolve().parent.parent
KERNEL = "test_pxe.vmlinuz"
IMAGE = "test_pxe_image.cpio.gz"


def sh(*argv: str | Path, cwd: Path | None = None, input: bytes | None = None) -> bytes:
    return subprocess.run([str(a) for a in argv], cwd=cwd, input=input, check=True, capture_output=True).stdout


def run(args: list, *, timeout: float, input: bytes | str | None = None, capture_output: bool = False,
        check: bool = False, **popen: object) -> subprocess.CompletedProcess:
    """subprocess.run in a session of its own: a timeout stops the whole session (a run.sh and
    its QEMU, a cluster.sh and its ssh probes), not only the direct child."""
    if capture_output:
        popen.update(stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    if input is not None:
        popen["stdin"] = subprocess.PIPE
    with subprocess.Popen([str(a) for a in args], start_new_session=True, **popen) as proc:
        try:
            stdout, stderr = proc.communicate(input, timeout=timeout)
        except subprocess.TimeoutExpired:
            stop_session(proc)
            raise
    result = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
    if check:
        result.check_returncode()
    return result


def start(args: list, **popen: object) -> subprocess.Popen:
    """subprocess.Popen in a session of its own; end it with finish() (or stop_session)."""
    return subprocess.Popen([str(a) for a in args], start_new_session=True, **popen)


def finish(proc: subprocess.Popen, input: bytes | None = None, timeout: float = 60) -> tuple:
    """communicate() with a started process; if it does not end in time, its whole session
    is stopped and the timeout raised."""
    try:
        return proc.communicate(input, timeout=timeout)
    except subprocess.TimeoutExpired:
        stop_session(proc)
        raise


# --- GPG ---------------------------------------------------------------------------

@dataclass
class Keyring:
    home: Path

    def gpg(self, *args: str | Path) -> bytes:
        return sh("gpg", "--homedir", self.home, "--batch", "--yes", "--pinentry-mode", "loopback",
                  "--passphrase", "", *args)

    def generate(self, uid: str) -> str:
        self.gpg("--quick-gen-key", uid, "ed25519", "sign", "0")
        return self.fingerprint(uid)

    def fingerprint(self, uid: str) -> str:
        listing = self.gpg("--with-colons", "--list-keys", uid).decode()
        return next(line.split(":")[9] for line in listing.splitlines() if line.startswith("fpr:"))

    def export(self, dest: Path, *fingerprints: str) -> Path:
        dest.write_bytes(self.gpg("--armor", "--export", *fingerprints))
        return dest

    def sign(self, path: Path, fingerprint: str, sig: Path | None = None) -> None:
        self.gpg("--local-user", fingerprint, "--detach-sign", "--output", sig or f"{path}.sig", path)


# --- mirror --------------------------------------------------------------------------

def usr_partition(usr_img: Path) -> bytes:
    """The bytes of usr.img's one partition, found through its GPT (read by sfdisk)."""
    (part,) = json.loads(sh("sfdisk", "--json", usr_img))["partitiontable"]["partitions"]
    with open(usr_img, "rb") as f:
        f.seek(part["start"] * 512)
        return f.read(part["size"] * 512)


def make_squashfs(dest: Path, payload_size: int = 200_000) -> Path:
    tree = dest.parent / "usr-tree"
    (tree / "lib").mkdir(parents=True, exist_ok=True)
    (tree / "lib" / "os-release").write_text("ID=leanvm-test\nVERSION_ID=1\n")
    (tree / "share").mkdir(exist_ok=True)
    with open(tree / "share" / "payload", "wb") as f:
        for offset in range(0, payload_size, 1 << 20):
            f.write(os.urandom(min(1 << 20, payload_size - offset)))
    sh("mksquashfs", tree, dest, "-noappend", "-quiet", "-all-root", "-noI", "-noD", "-noF")
    shutil.rmtree(tree)
    return dest


def make_cpio_gz(dest: Path, members: dict[str, Path | bytes]) -> Path:
    """A gzip'd newc cpio made by the real cpio and gzip tools."""
    stage = dest.parent / f"{dest.name}.stage"
    stage.mkdir()
    for name, content in members.items():
        target = stage / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, Path):
            shutil.copyfile(content, target)
        else:
            target.write_bytes(content)
    names = sorted(str(p.relative_to(stage)) for p in stage.rglob("*"))
    archive = sh("cpio", "--quiet", "-o", "-H", "newc", cwd=stage, input="\n".join(names).encode() + b"\n")
    dest.write_bytes(sh("gzip", "-c", "-n", "-1", input=archive))
    shutil.rmtree(stage)
    return dest


@dataclass
class Mirror:
    root: Path
    keyring: Keyring
    fingerprint: str
    versions: list[str] = field(default_factory=list)

    def add_version(self, version: str, current: bool = True, payload_size: int = 200_000) -> Path:
        vdir = self.root / version
        vdir.mkdir(parents=True)
        (vdir / KERNEL).write_bytes(b"KERNEL " + version.encode() + os.urandom(100_000))
        squash = make_squashfs(vdir / "usr.squashfs.src", payload_size)
        make_cpio_gz(vdir / IMAGE, {"etc/os-release": b"ID=test\n", "usr.squashfs": squash})
        for name in (KERNEL, IMAGE):
            self.keyring.sign(vdir / name, self.fingerprint)
        if current:
            (self.root / "current").mkdir(exist_ok=True)
            (self.root / "current" / "version.txt").write_text(f"TEST_BUILD=1\nTEST_VERSION={version}\n")
        self.versions.append(version)
        return vdir

    def squashfs(self, version: str) -> Path:
        return self.root / version / "usr.squashfs.src"


# --- HTTP server -------------------------------------------------------------------

class MirrorServer(ThreadingHTTPServer):
    """Serves a directory with Range support, counting bytes; faults on request."""

    daemon_threads = True

    def __init__(self, root: Path) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.root = root
        self.bytes_served: dict[str, int] = {}
        self.requests: list[str] = []
        self.fail_next = 0  # answer this many requests with 500
        self.cut: dict[str, int] = {}  # path -> cut the next response after N bytes
        self.honour_range = True
        self.redirect: dict[str, str] = {}  # path -> answer 302 to this path
        self.stall: dict[str, tuple[int, threading.Event, float]] = {}  # path -> (after N bytes, until, max s)
        self.lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/"

    def served(self, name: str) -> int:
        return sum(n for path, n in self.bytes_served.items() if path.endswith("/" + name))


class _Handler(BaseHTTPRequestHandler):
    server: MirrorServer

    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        srv = self.server
        with srv.lock:
            srv.requests.append(self.path)
            if srv.fail_next > 0:
                srv.fail_next -= 1
                self.send_error(500)
                return
            cut = srv.cut.pop(self.path, None)
            stall = srv.stall.pop(self.path, None)
            target = srv.redirect.get(self.path)
        if target:
            self.send_response(302)
            self.send_header("Location", target)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        path = srv.root / self.path.lstrip("/")
        if not path.is_file():
            self.send_error(404)
            return
        start, length = self._send_headers(path.stat().st_size)
        if cut is not None:
            length = min(length, cut)
            self.close_connection = True
        if stall is not None:
            length = min(length, stall[0])
        sent = self._sendfile(path, start, length)
        if stall is not None:
            stall[1].wait(stall[2])  # then drop the connection: the client must resume
            self.close_connection = True
        with srv.lock:
            srv.bytes_served[self.path] = srv.bytes_served.get(self.path, 0) + sent

    def _send_headers(self, size: int) -> tuple[int, int]:
        """200, or 206 for an open-ended Range the server honours; returns (offset, length) to send."""
        start = 0
        rng = self.headers.get("Range")
        if rng and self.server.honour_range and rng.startswith("bytes=") and rng.endswith("-"):
            start = int(rng[6:-1])
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{size - 1}/{size}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(size - start))
        self.end_headers()
        self.wfile.flush()
        return start, size - start

    def _sendfile(self, path: Path, start: int, length: int) -> int:
        """The kernel copies file to socket (fast enough for the download benchmark); returns bytes sent."""
        sent = 0
        with open(path, "rb") as f:
            try:
                while sent < length:
                    n = os.sendfile(self.connection.fileno(), f.fileno(), start + sent, length - sent)
                    if n == 0:
                        break
                    sent += n
            except (BrokenPipeError, ConnectionResetError):
                pass
        return sent


def newc(members: list[tuple[str, bytes, int]], declared: dict[str, int] | None = None) -> bytes:
    """A hand-made newc cpio, for archives no well-behaved tool writes (hostile names, lying sizes)."""
    out = b""
    for ino, (name, data, mode) in enumerate([*members, ("TRAILER!!!", b"", 0)], start=1):
        size = (declared or {}).get(name, len(data))
        fields = [ino, mode, 0, 0, 1, 0, size, 0, 0, 0, 0, len(name) + 1, 0]
        header = b"070701" + b"".join(b"%08X" % f for f in fields) + name.encode() + b"\0"
        out += header + b"\0" * (-len(header) % 4) + data + b"\0" * (-len(data) % 4)
    return out


def serve(root: Path) -> MirrorServer:
    server = MirrorServer(root)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


# --- doit ----------------------------------------------------------------------------

@dataclass
class DoitResult:
    returncode: int
    stdout: str
    stderr: str

    @property
    def executed(self) -> set[str]:
        return {line[3:].strip() for line in self.stdout.splitlines() if line.startswith(".  ")}


def doit(*args: str, env: dict | None = None, timeout: float = 300) -> DoitResult:
    proc = run([sys.executable, "-m", "doit", "-f", PROJECT / "dodo.py", *args],
               capture_output=True, text=True, env={**os.environ, **(env or {})}, timeout=timeout)
    return DoitResult(proc.returncode, proc.stdout, proc.stderr)


# --- booting and watching VMs --------------------------------------------------------

BOOT_TIMEOUT = 90
ENV = {**os.environ, "LEANVM_ACCEL": "tcg"}  # TCG: guests hang under nested KVM here


@dataclass
class Project:
    """A config directory (cluster file, profile, key) and an out/ directory."""

    root: Path
    keyring: Keyring
    signer: str

    @property
    def out(self) -> Path:
        return self.root / "out"

    @property
    def cluster_file(self) -> Path:
        return self.root / "cluster.yaml"

    @property
    def profile_file(self) -> Path:
        return self.root / "releases" / "test.yaml"

    def write_profile(self, base_url: str, **overrides: object) -> None:
        self.profile_file.parent.mkdir(exist_ok=True)
        key = self.keyring.export(self.root / "signing-key.asc", self.signer)
        profile = {
            "base_url": base_url,
            "version": "current",
            "version_file": "version.txt",
            "version_key": "TEST_VERSION",
            "kernel": KERNEL,
            "image": IMAGE,
            "usr_member": "usr.squashfs",
            "signing_key": f"../{key.name}",
            "fingerprints": [self.signer],
            "kernel_args": "mount.usr=/dev/vda mount.usrfstype=squashfs root=/dev/vdb console=ttyS0",
            **overrides,
        }
        self.profile_file.write_text(yaml.safe_dump(profile))

    def write_cluster(self, vms: dict, **extra: object) -> None:
        doc = {"release": "test", "defaults": {"disk": "64M", "memory": 256}, "vms": vms, **extra}
        self.cluster_file.write_text(yaml.safe_dump(doc))

    def doit(self, *args: str, out: Path | None = None, **kw: object) -> DoitResult:
        return doit(*args, f"config={self.cluster_file}", f"out={out or self.out}", **kw)

    def images(self, version: str = "100.0.0") -> Path:
        return self.out / "images" / "test" / version

    def vm(self, name: str) -> Path:
        return self.out / "vms" / name


QUIT = b"\x01cquit\n"  # -nographic: Ctrl-a c switches stdio to the monitor


def processes(match: Callable[[bytes], bool]) -> list[int]:
    """Pids of the processes whose command line (NUL-separated bytes) matches."""
    pids = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            cmdline = (proc / "cmdline").read_bytes()
        except OSError:
            continue
        if match(cmdline):
            pids.append(int(proc.name))
    return pids


def switch_processes(out: Path) -> list[int]:
    return processes(lambda cmd: cmd.startswith(b"vde_switch") and str(out / "net").encode() in cmd)


def printed(run_sh: Path, env: dict | None = None) -> list[str]:
    """The QEMU argv that `run.sh --print` shows (after its comment and its `cd DIR &&`)."""
    out = subprocess.run([str(run_sh), "--print"], capture_output=True, text=True, check=True,
                         env={**os.environ, **(env or {})})
    words = shlex.split(out.stdout, comments=True)
    assert words[0] == "cd" and words[2] == "&&", words
    return words[3:]


def paths_in(argv: list[str]) -> list[Path]:
    paths = []
    for flag, value in zip(argv, argv[1:], strict=False):
        if flag in ("-kernel", "-initrd", "-pidfile"):
            paths.append(Path(value))
        for key in ("file", "path"):
            match = re.search(rf"(?:^|,){key}=((?:[^,]|,,)+)", value)
            if match and flag in ("-drive", "-fsdev"):
                paths.append(Path(match.group(1).replace(",,", ",")))
    return paths


def qemu_pids(out: Path) -> list[int]:
    """QEMUs and switches of `out` still running."""
    return processes(lambda cmd: str(out).encode() in cmd and (b"qemu-system" in cmd or b"vde_switch" in cmd))


def wait_for_text(path: Path, text: str, timeout: float = BOOT_TIMEOUT, proc: subprocess.Popen | None = None) -> str:
    """The file's text once it holds `text`; fails early if `proc` (the VM's launcher) ended."""
    deadline = time.monotonic() + timeout
    content = ""
    while time.monotonic() < deadline:
        content = path.read_text(errors="replace") if path.exists() else ""
        if text in content:
            return content
        assert proc is None or proc.poll() is None, content[-3000:]
        time.sleep(0.2)
    raise AssertionError(f"{text!r} not in {path}:\n{content[-3000:]}")




def build_cluster(root: Path, profile: Path, vms: dict, **extra: object) -> Path:
    """A cluster file (small VMs, plus alpha.yaml user_data beside it) built by doit into root/out."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "alpha.yaml").write_text("#cloud-config\nhostname: alpha-from-user-data\n")
    cluster = {"release": str(profile), "defaults": {"memory": 256, "disk": "128M"}, "vms": vms, **extra}
    (root / "cluster.yaml").write_text(yaml.safe_dump(cluster))
    result = doit(f"config={root / 'cluster.yaml'}", f"out={root / 'out'}")
    assert result.returncode == 0, result.stderr
    return root / "out"


def boot(run_sh: Path, append: str = "") -> str:
    """Boot to power-off; the serial console text."""
    proc = run([run_sh], stdin=subprocess.DEVNULL, capture_output=True, timeout=BOOT_TIMEOUT,
               env={**ENV, "LEANVM_APPEND": append})
    console = proc.stdout.decode(errors="replace")
    assert proc.returncode == 0, console[-2000:] + proc.stderr.decode()
    assert "leanvm: ready" in console, console[-3000:]
    return console


def marker(console: str, name: str) -> str:
    match = re.search(rf"^leanvm: {name}: (.*?)\r?$", console, re.M)
    assert match, f"no '{name}' marker in:\n{console[-3000:]}"
    return match.group(1)


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
