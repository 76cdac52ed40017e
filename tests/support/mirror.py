"""A release mirror like Flatcar's: real squashfs in a real cpio.gz, signed with a throw-away GPG
key, served over loopback HTTP with Range (and faults on request)."""

import os
import shutil
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from .procs import sh

KERNEL = "test_pxe.vmlinuz"
IMAGE = "test_pxe_image.cpio.gz"


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
