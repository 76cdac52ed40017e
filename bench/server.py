"""A loopback HTTP server for the download benchmark: sendfile, Range, an optional cut."""

import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


class BenchServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, root: Path) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.root = root
        self.bytes_served = 0
        self.cut_next: int | None = None  # drop the next response after this many bytes
        self.lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/"

    def start(self) -> "BenchServer":
        threading.Thread(target=self.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        self.shutdown()
        self.server_close()


class _Handler(BaseHTTPRequestHandler):
    server: BenchServer

    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        path = self.server.root / self.path.lstrip("/")
        if not path.is_file():
            self.send_error(404)
            return
        size = path.stat().st_size
        start = 0
        rng = self.headers.get("Range", "")
        if rng.startswith("bytes=") and rng.endswith("-"):
            start = int(rng[6:-1])
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{size - 1}/{size}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(size - start))
        self.end_headers()
        self.wfile.flush()
        with self.server.lock:
            cut, self.server.cut_next = self.server.cut_next, None
        count = size - start if cut is None else min(cut, size - start)
        sent = 0
        with open(path, "rb") as f:
            try:
                while sent < count:
                    n = os.sendfile(self.connection.fileno(), f.fileno(), start + sent, count - sent)
                    if n == 0:
                        break
                    sent += n
            except (BrokenPipeError, ConnectionResetError):
                pass
        with self.server.lock:
            self.server.bytes_served += sent
        if cut is not None:
            self.close_connection = True
