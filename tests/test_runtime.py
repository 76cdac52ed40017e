"""The runtime out/ carries (out/leanvm-runtime.pyz): standard library only, QMP spoken to a
real QEMU that runs no guest (-machine none: tens of milliseconds), the zipapp run by the
host's python3 with a bare environment, and `cluster.sh monitor` on a running VM."""

import ast
import subprocess
import sys
import time
from pathlib import Path

import pytest
from leanvm.runtime.qmp import QMP, QMPError
from leanvm.ship import runtime
from support import doit, run

BARE = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}


def test_the_runtime_imports_only_the_standard_library_and_itself():
    packed = {f"leanvm.{m.removesuffix('.py').replace('/', '.')}".removesuffix(".__init__") for m in runtime.MODULES}
    assert {p.name for p in (runtime.PACKAGE / "runtime").glob("*.py")} <= {Path(m).name for m in runtime.MODULES}
    wrong = []
    for module in runtime.MODULES:
        for node in ast.walk(ast.parse((runtime.PACKAGE / module).read_text())):
            names = [node.module] if isinstance(node, ast.ImportFrom) and node.module else (
                [a.name for a in node.names] if isinstance(node, ast.Import) else [])
            for name in names:
                top = name.split(".")[0]
                if not (top in sys.stdlib_module_names or top == "__future__" or name in packed):
                    wrong.append(f"{module} imports {name}")
    assert wrong == []


@pytest.fixture
def bare_qemu(tmp_path: Path):
    """A real QEMU with no machine and no guest, its QMP socket at tmp_path/.../qmp.sock (a path
    longer than a unix socket's 108 bytes: reached from its directory)."""
    vm = tmp_path / "out" / "vms" / ("v" * 90)
    vm.mkdir(parents=True)
    (vm / "run.sh").write_text("#!/bin/sh\n")
    proc = subprocess.Popen(["qemu-system-x86_64", "-machine", "none", "-nodefaults", "-display", "none", "-S",
                             "-qmp", "unix:qmp.sock,server=on,wait=off"], cwd=vm, stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 30
    while not (vm / "qmp.sock").exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.01)
    yield vm
    proc.kill()
    proc.wait()


def test_qmp_commands_errors_and_events_against_a_real_qemu(bare_qemu: Path):
    assert len(str(bare_qemu / "qmp.sock")) > 108
    with QMP(bare_qemu / "qmp.sock", timeout=10) as qmp:
        assert qmp.execute("query-status")["status"] == "prelaunch"
        assert qmp.hmp("info status") == "VM status: paused (prelaunch)\r\n"
        with pytest.raises(QMPError, match="^nosuch: The command nosuch has not been found$"):
            qmp.execute("nosuch")
        qmp.execute("quit")
        assert qmp.wait_event("SHUTDOWN")["data"]["reason"] == "host-qmp-quit"
        with pytest.raises(QMPError, match="^QEMU closed its QMP socket$"):
            qmp.execute("query-status")


def test_a_silent_socket_is_an_error_within_the_deadline(tmp_path: Path):
    import socket

    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(tmp_path / "mute.sock"))
    listener.listen()
    started = time.monotonic()
    with pytest.raises(QMPError, match="did not answer on its QMP socket in time"):
        QMP(tmp_path / "mute.sock", timeout=0.3)
    assert time.monotonic() - started < 5
    listener.close()


def test_the_zipapp_is_reproducible_and_runs_monitor_with_a_bare_environment(bare_qemu: Path, tmp_path: Path):
    pyz, again = tmp_path / "a.pyz", tmp_path / "b.pyz"
    runtime.write(pyz)
    runtime.write(again)
    assert pyz.read_bytes() == again.read_bytes()
    out, name = bare_qemu.parent.parent, bare_qemu.name

    def monitor(*args: str, stdin: str = "") -> subprocess.CompletedProcess:
        return run(["/usr/bin/python3", pyz, "cluster", out, "cluster.sh", "monitor", *args], capture_output=True,
                   text=True, timeout=60,
                   env=BARE, input=stdin)

    answered = monitor(name, "info", "status")
    assert answered.returncode == 0 and answered.stdout == "VM status: paused (prelaunch)\n", answered.stderr
    piped = monitor(name, stdin="info status\n\ninfo version\n")
    assert piped.returncode == 0 and piped.stdout.startswith("VM status: paused (prelaunch)\n"), piped.stderr
    assert len(piped.stdout.splitlines()) == 2
    nosuch = monitor("nosuch", "info status")
    assert nosuch.returncode == 1 and nosuch.stderr == f"cluster.sh: no VM named 'nosuch' in {out / 'vms'}\n"
    (out / "vms" / "off").mkdir()
    (out / "vms" / "off" / "run.sh").write_text("#!/bin/sh\n")
    off = monitor("off", "info status")
    assert off.returncode == 1
    assert off.stderr == f"cluster.sh: VM off is not running: start it with {out / 'cluster.sh'} up off\n"


def test_a_copied_out_runs_every_verb_with_a_bare_environment(copy_of_ready: Path):
    """out/ copied elsewhere, run with only PATH and HOME set (env -i): the host's python3 runs
    the runtime, never the venv. restore --wait, ssh, monitor, snapshot, down, then up --wait
    (under LEANVM_ACCEL's default: on this machine KVM fails, and up falls back to TCG; the mini
    release powers off once ready unless held, so the VMs' kernel_args hold them, not the
    environment)."""
    out = copy_of_ready
    bare = {**BARE, "HOME": str(Path.home())}

    def verb(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        return run([out / "cluster.sh", *args], capture_output=True, text=True, env=bare, timeout=timeout)

    assert (out / "leanvm-runtime.pyz").is_file() and (out / "leanvm-runtime.pyz").stat().st_size < 128 << 10
    assert not (out / "lib.sh").exists()
    try:
        restored = verb("restore", "--wait", "120", "ready")
        assert restored.returncode == 0 and "every VM answers ssh" in restored.stdout, restored.stdout + restored.stderr
        assert (out / "vms" / "one" / "qmp.sock").is_socket()
        assert not [p for p in (out / "vms" / "one").iterdir() if p.is_fifo()]
        note = verb("ssh", "one", "--", "cat", "/home/core/note")
        assert note.returncode == 0 and note.stdout == "kept\n", note.stderr
        status = verb("monitor", "one", "info status")
        assert status.returncode == 0 and status.stdout == "VM status: running\n", status.stderr
        taken = verb("snapshot", "again")
        assert taken.returncode == 0 and taken.stdout.startswith("snapshot again: one two saved in "), taken.stderr
        assert verb("down").returncode == 0
        cluster = out.parent / "cluster.yaml"
        cluster.write_text(cluster.read_text().replace("defaults:\n", "defaults:\n  kernel_args: leanvm.hold\n"))
        rebuilt = doit(f"config={cluster}", f"out={out}")
        assert rebuilt.returncode == 0, rebuilt.stderr
        assert "leanvm.hold" in (out / "state" / "vms" / "one.env").read_text()
        up = verb("up", "--wait", "240", timeout=400)
        assert up.returncode == 0 and "every VM answers ssh" in up.stdout, up.stdout + up.stderr
    finally:
        down = verb("down")
    assert down.returncode == 0, down.stderr
    assert not (out / "vms" / "one" / "qmp.sock").exists()
    stopped = verb("monitor", "one", "info status")
    assert stopped.returncode == 1 and stopped.stderr.count("\n") == 1 and "VM one is not running" in stopped.stderr
