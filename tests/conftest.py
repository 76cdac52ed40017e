import contextlib
import os
import shutil
import signal
from pathlib import Path

import pytest
from leanvm.proc import stop_gpg_agent
from leanvm_dev import minirelease
from support import (
    Keyring,
    Mirror,
    MirrorServer,
    Project,
    build_cluster,
    cluster_sh,
    copy_cluster,
    on_vm,
    qemu_pids,
    serve,
)


def pytest_configure(config: pytest.Config) -> None:
    """A pytest started where SIGINT or SIGHUP is ignored (from `cmd &` in a script, or
    nohup) would hand that on to every run.sh it starts, and sh cannot trap a signal it was
    started ignoring: the tests that interrupt a launcher need the default."""
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if signal.getsignal(signal.SIGHUP) == signal.SIG_IGN:
        signal.signal(signal.SIGHUP, signal.SIG_DFL)


def pytest_itemcollected(item: pytest.Item) -> None:
    """`vm`: every test that uses the mini release (directly or through a fixture), which is
    what boots a VM; `pytest -m "not vm"` is the tier that starts no QEMU. Under xdist
    (pyproject's addopts) the `vm` tests form one group, so they run one at a time on one
    worker, which builds the mini release once, while the other workers take the rest. (Set
    as each test is collected: xdist reads the group before this file's modifyitems runs.)"""
    if "mini" in getattr(item, "fixturenames", ()) or item.get_closest_marker("vm"):
        item.add_marker(pytest.mark.vm)
        item.add_marker(pytest.mark.xdist_group("vm"))


@pytest.hookimpl(tryfirst=True)
def pytest_xdist_auto_num_workers(config: pytest.Config) -> int:
    """pyproject's `-n auto`: three workers (one runs the VM tests); four for `-m "not vm"`,
    where no worker runs a VM and more of the tests wait on processes than use a core."""
    return 4 if config.getoption("markexpr").strip() == "not vm" else 3


def pytest_collection_finish(session: pytest.Session) -> None:
    """On an xdist worker, every `vm` test must carry xdist's group suffix: otherwise two
    workers would boot VMs at once, on the same derived ports."""
    if not getattr(session.config.option, "loadgroup", False):
        return
    ungrouped = [item.nodeid for item in session.items
                 if item.get_closest_marker("vm") and not item.nodeid.endswith("@vm")]
    if ungrouped:
        raise pytest.UsageError(f"xdist did not group the VM tests ({ungrouped[0]}): "
                                "install the pytest version pyproject.toml names")


@pytest.fixture(scope="session", autouse=True)
def nothing_left_running(tmp_path_factory: pytest.TempPathFactory):
    """The session-end check: no test left a QEMU or a vde_switch of its out/ running."""
    yield
    left = qemu_pids(tmp_path_factory.getbasetemp())
    for pid in left:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
    assert left == [], f"QEMU or vde_switch processes left running by the tests: {left}"


@pytest.fixture(scope="session")
def keyring(tmp_path_factory: pytest.TempPathFactory):
    home = tmp_path_factory.mktemp("gnupg")
    home.chmod(0o700)
    ring = Keyring(home)
    ring.generate("leanvm test signer <signer@leanvm.invalid>")
    ring.generate("someone else <other@leanvm.invalid>")
    yield ring
    stop_gpg_agent(home)


@pytest.fixture(scope="session")
def signer(keyring: Keyring) -> str:
    return keyring.fingerprint("signer@leanvm.invalid")


@pytest.fixture(scope="session")
def other(keyring: Keyring) -> str:
    return keyring.fingerprint("other@leanvm.invalid")


@pytest.fixture
def mirror(tmp_path: Path, keyring: Keyring, signer: str) -> Mirror:
    m = Mirror(tmp_path / "mirror", keyring, signer)
    m.add_version("100.0.0")
    return m


@pytest.fixture
def server(mirror: Mirror):
    srv = serve(mirror.root)
    yield srv
    srv.shutdown()
    srv.server_close()




@pytest.fixture
def project(tmp_path: Path, keyring: Keyring, signer: str, server: MirrorServer) -> Project:
    p = Project(tmp_path / "project", keyring, signer)
    p.root.mkdir()
    p.write_profile(server.url)
    p.write_cluster({"core1": {"ssh_port": 2222}})
    return p


@pytest.fixture
def copy_tree():
    def copy(src: Path, dst: Path) -> Path:
        shutil.copytree(src, dst, symlinks=True)
        return dst

    return copy


@pytest.fixture(scope="session")
def mini(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """leanvm's mini release (Debian kernel + busybox), built once per test session."""
    return minirelease.build(tmp_path_factory.mktemp("mini"))


@pytest.fixture(scope="session")
def ready_pair(mini: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Booted once, restored many times: the out/ of a cluster of two VMs, `one` (cloud-config,
    10.77.0.11) and `two` (keys through Ignition, 10.77.0.12), booted once in the session and
    saved, stopped, as snapshot `ready`; `one` holds /home/core/note ("kept"). Tests that need a
    booted VM but not a first boot take a copy of it (copy_of_ready) and restore it."""
    root = tmp_path_factory.mktemp("ready")
    (root / "two.ign").write_text('{"ignition": {"version": "3.3.0"}}')
    out = build_cluster(root, mini / "mini.yaml", {"one": {"cluster_ip": "10.77.0.11"},
                                                   "two": {"cluster_ip": "10.77.0.12", "ignition": "two.ign"}})
    try:
        up = cluster_sh(out, "up", "--wait")
        assert up.returncode == 0, up.stdout + up.stderr
        on_vm(out, "one", "echo kept >/home/core/note")
        taken = cluster_sh(out, "snapshot", "--stop", "ready")
        assert taken.returncode == 0, taken.stdout + taken.stderr
    finally:
        cluster_sh(out, "down")
    assert qemu_pids(out) == []
    return out


@pytest.fixture
def copy_of_ready(ready_pair: Path, tmp_path: Path) -> Path:
    """A copy of ready_pair's directory (its cluster file beside out/; sparse, every VM stopped)
    in this test's directory, whose out/ it returns: the same VMs and ports, so a test may change
    it at will; `cluster.sh restore ready` starts it."""
    return copy_cluster(ready_pair, tmp_path / "ready")


@pytest.fixture(autouse=True)
def own_host_registry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test has its own registry of leanvm out/ directories (identity.register), so
    that clusters of other tests and earlier runs do not move its auto ports."""
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "xdg-state"))


@pytest.fixture(autouse=True)
def no_stray_switches(tmp_path: Path):
    """Stop any cluster switch a test's VMs left running (e.g. after a timeout)."""
    yield
    for pidfile in tmp_path.rglob("net/switch.pid"):
        try:
            os.kill(int(pidfile.read_text().strip()), signal.SIGTERM)
        except (OSError, ValueError):
            pass
