"""Snapshot and restore lose nothing: interrupted at any step (SIGINT to the terminal's
process group, or SIGKILL recovered by the next command), a VM named twice, a VM that an
earlier snapshot left paused. Each VM ends as it was before the command or as the command
meant to leave it, with its own disks never overwritten.

The moments are forced, not guessed: a QEMU stand-in (a gate around the real QEMU) holds
a VM's start from a snapshot until the test opens it, and the commands' own step files
(resumed, snapshots/.SNAP.part/) say where they are."""

import hashlib
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from leanvm.runtime.qmp import QMP
from support import ENV, HOLD, cluster_sh, copy_cluster, doit, finish, on_vm, processes, qemu_pids, run, sh, start

GATE = """#!/bin/sh
# QEMU for the tests: holds a start from a snapshot (-incoming) of VM NAME while $G/hold-NAME
# exists and --version while $G/hold-version does, saying so in $G/at-NAME / $G/at-version,
# until $G/go exists; fails such a start at once where $G/fail-NAME exists.
G='{gate}'
if [ "$1" = --version ]; then
  if [ -e "$G/hold-version" ]; then : >"$G/at-version"; while [ ! -e "$G/go" ]; do sleep 0.02; done; fi
  exec qemu-system-x86_64 --version
fi
name="" prev="" incoming=""
for arg; do
  [ "$prev" != -name ] || name=$arg
  [ "$arg" != -incoming ] || incoming=yes
  prev=$arg
done
if [ -n "$incoming" ] && [ -e "$G/hold-$name" ]; then
  : >"$G/at-$name"
  while [ ! -e "$G/go" ]; do sleep 0.02; done
fi
if [ -n "$incoming" ] && [ -e "$G/fail-$name" ]; then
  echo "qemu-system-x86_64: the test's gate: VM $name does not start" >&2
  exit 1
fi
exec qemu-system-x86_64 "$@"
"""


class Gate:
    def __init__(self, where: Path):
        self.dir = where
        where.mkdir()
        self.qemu = where / "qemu"
        self.qemu.write_text(GATE.format(gate=where))
        self.qemu.chmod(0o755)
        self.env = {**HOLD, "LEANVM_QEMU": str(self.qemu)}

    def hold(self, what: str) -> None:
        (self.dir / f"hold-{what}").touch()

    def fail(self, vm: str) -> None:
        (self.dir / f"fail-{vm}").touch()

    def wait_at(self, what: str, proc: subprocess.Popen, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while not (self.dir / f"at-{what}").exists():
            assert proc.poll() is None, finish(proc)
            assert time.monotonic() < deadline, f"nothing reached the gate at {what}"
            time.sleep(0.02)

    def open(self) -> None:
        (self.dir / "go").touch()


def digests(out: Path, vm: str) -> dict[str, str]:
    return {disk: hashlib.sha256((out / "vms" / vm / disk).read_bytes()).hexdigest()
            for disk in ("rootfs.img", "oem.img")}


def leftovers(out: Path) -> list[str]:
    """What an unfinished restore or snapshot leaves: *.restoring, *.before-restore,
    snapshots/.SNAP.part, snapshots/.restoring-SNAP."""
    found = [p for p in (out / "vms").glob("*/*") if p.name.endswith((".restoring", ".before-restore"))]
    found += [p for p in (out / "snapshots").glob(".*") if p.is_dir()]
    return sorted(str(p.relative_to(out)) for p in found)


def monitor_clients(out: Path) -> list[int]:
    """The runtime's monitor calls (hmp, save-memory) that cluster.sh started for out/, still there."""
    return processes(lambda cmd: b"leanvm-runtime.pyz" in cmd and str(out).encode() in cmd
                     and (b"\0hmp\0" in cmd or b"\0save-memory\0" in cmd))


def wait_until_stopped(out: Path, vm: str, timeout: float = 60) -> None:
    """Until VM's run.sh (or its keeper) has cleared up: its run.lock is free."""
    result = run(["flock", "-w", str(timeout), out / "vms" / vm / "run.lock", "true"], timeout=timeout + 10)
    assert result.returncode == 0, f"VM {vm}'s run.lock is still held after {timeout} s"


def interrupt(proc: subprocess.Popen, sig: signal.Signals = signal.SIGINT) -> tuple[int, str]:
    """`sig` to the command's whole process group (Ctrl-C at a terminal); its status and stderr."""
    os.killpg(proc.pid, sig)
    _, err = finish(proc, timeout=120)
    return proc.returncode, err.decode(errors="replace")


def one_line(err: str, *words: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def saved(ready_pair: Path, tmp_path_factory: pytest.TempPathFactory):
    """A copy of the session's cluster of two VMs with snapshot `ready` (conftest's ready_pair:
    VM one holds /home/core/note); between tests every VM is stopped and VM one's root disk
    holds /junk, written after the snapshot (so its disk differs)."""
    root = tmp_path_factory.mktemp("saved") / "ready"
    out = copy_cluster(ready_pair, root)
    try:
        (root / "junk").write_text("written after the snapshot\n")
        sh("debugfs", "-w", "-R", f"write {root / 'junk'} /junk", out / "vms" / "one" / "rootfs.img")
        yield out
    finally:
        cluster_sh(out, "down")
    assert qemu_pids(out) == []


@pytest.fixture
def stopped(saved: Path):
    """The saved cluster, every VM stopped again after the test, whatever it left."""
    yield saved
    down = cluster_sh(saved, "down")
    assert down.returncode == 0, down.stderr
    assert qemu_pids(saved / "vms") == []


def restore_alone(out: Path, env: dict) -> subprocess.Popen:
    return start([out / "vms" / "one" / "run.sh", "--restore", "ready"], env=env, stdin=subprocess.DEVNULL,
                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def restore_held_at_the_gate(out: Path, gate: Gate, *args: str) -> subprocess.Popen:
    """`cluster.sh restore ARGS` with VM one's start from the snapshot held at the gate, once
    it is there (its disks swapped, QEMU not yet loading)."""
    gate.hold("one")
    proc = start([out / "cluster.sh", "restore", *args], env=gate.env, stdin=subprocess.DEVNULL,
                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    gate.wait_at("one", proc)
    return proc


@pytest.mark.parametrize("moment", ["before-the-swap", "during-the-load"])
def test_run_sh_restore_interrupted_before_it_is_kept_leaves_the_vm_as_it_was(stopped: Path, tmp_path: Path,
                                                                               moment: str):
    out = stopped
    before = digests(out, "one")
    gate = Gate(tmp_path / "gate")
    gate.hold("version" if moment == "before-the-swap" else "one")
    proc = restore_alone(out, gate.env)
    gate.wait_at("version" if moment == "before-the-swap" else "one", proc)
    if moment == "during-the-load":
        assert (out / "vms" / "one" / "rootfs.img.before-restore").exists()  # swapped: the moment is real
    status, err = interrupt(proc)
    assert status != 0, err
    wait_until_stopped(out, "one")
    assert digests(out, "one") == before and leftovers(out) == []
    if moment == "during-the-load":
        assert status == 130
        one_line(err, "VM one: its restore from snapshot ready ended before it was kept",
                 "its own disks are as they were")


def test_run_sh_restore_interrupted_after_cont_keeps_the_restore(stopped: Path):
    out = stopped
    before = digests(out, "one")
    proc = restore_alone(out, HOLD)
    deadline = time.monotonic() + 120
    while not (out / "vms" / "one" / "resumed").exists():
        assert proc.poll() is None and time.monotonic() < deadline, finish(proc)
        time.sleep(0.02)
    status, err = interrupt(proc)
    assert status == 130, err
    wait_until_stopped(out, "one")
    # the restore was kept (the VM ran the snapshot), then Ctrl-C stopped it: the snapshot's disks
    assert digests(out, "one") != before and leftovers(out) == []
    assert not (out / "vms" / "one" / "restored").exists()


def test_run_sh_restore_killed_during_the_load_is_undone_by_its_keeper(stopped: Path, tmp_path: Path):
    out = stopped
    before = digests(out, "one")
    gate = Gate(tmp_path / "gate")
    gate.hold("one")
    proc = restore_alone(out, gate.env)
    gate.wait_at("one", proc)
    os.kill(proc.pid, signal.SIGKILL)  # run.sh alone: its keeper clears up
    finish(proc)
    wait_until_stopped(out, "one")
    assert digests(out, "one") == before and leftovers(out) == []


def test_a_vm_whose_restore_was_killed_gets_its_own_disks_back_first(stopped: Path):
    """A *.before-restore that a SIGKILL left (here: by hand, as the killed swap leaves it) is
    put back by the next command, in one line, before anything else."""
    vm = stopped / "vms" / "one"
    before = digests(stopped, "one")
    os.rename(vm / "rootfs.img", vm / "rootfs.img.before-restore")
    (vm / "rootfs.img").write_bytes(b"the snapshot's copy\n")
    (vm / "oem.img.restoring").write_bytes(b"a copy not yet swapped in\n")
    up = cluster_sh(stopped, "up", "--wait", "one")
    assert up.returncode == 0, up.stdout + up.stderr
    assert "VM one: its own disks were put back (a restore of it had been interrupted)" in up.stderr
    assert leftovers(stopped) == []
    down = cluster_sh(stopped, "down")
    assert down.returncode == 0, down.stderr
    after = digests(stopped, "one")
    assert after["oem.img"] == before["oem.img"]  # the root disk ran a boot since


def test_a_vm_named_twice_is_refused_before_anything_changes(stopped: Path):
    out = stopped
    before = digests(out, "one")
    for args in (["restore", "--wait", "60", "one", "one", "ready"], ["restore", "one", "two", "one", "ready"]):
        result = cluster_sh(out, *args)
        one_line(result.stderr, "restore: VM one is named twice", "name each VM once")
    result = cluster_sh(out, "snapshot", "one", "one", "again")
    one_line(result.stderr, "snapshot: VM one is named twice")
    assert digests(out, "one") == before and leftovers(out) == []
    assert not (out / "snapshots" / "again").exists()


def test_cluster_restore_where_one_vm_fails_gives_every_vm_its_disks_back(stopped: Path, tmp_path: Path):
    out = stopped
    before = {vm: digests(out, vm) for vm in ("one", "two")}
    gate = Gate(tmp_path / "gate")
    gate.fail("two")
    result = cluster_sh(out, "restore", "--wait", "60", "ready", env=gate.env)
    one_line(result.stderr, "restore ready: VM two did not start from the snapshot", "the test's gate",
             "every VM's disks are as they were before")
    for vm in ("one", "two"):
        wait_until_stopped(out, vm)
    assert {vm: digests(out, vm) for vm in ("one", "two")} == before  # one had run the snapshot: undone too
    assert leftovers(out) == [] and qemu_pids(out / "vms") == []


def test_cluster_restore_interrupted_during_the_load_ends_restored(stopped: Path, tmp_path: Path):
    out = stopped
    gate = Gate(tmp_path / "gate")
    proc = restore_held_at_the_gate(out, gate, "ready")
    os.killpg(proc.pid, signal.SIGINT)
    gate.open()  # the VMs' restores run to their end, then all of them are kept
    _, err = finish(proc, timeout=120)
    assert proc.returncode == 130, err
    assert "restore ready interrupted once every VM was restored: they run" in err.decode()
    assert leftovers(out) == []
    assert on_vm(out, "one", "cat /home/core/note") == "kept\n"
    assert "No such file" in on_vm(out, "one", "ls /junk 2>&1 || true")


def test_cluster_restore_killed_during_the_load_ends_as_it_was(stopped: Path, tmp_path: Path):
    out = stopped
    before = digests(out, "one")
    gate = Gate(tmp_path / "gate")
    proc = restore_held_at_the_gate(out, gate, "ready")
    os.killpg(proc.pid, signal.SIGKILL)
    finish(proc)
    gate.open()  # the VMs come up, but nobody keeps their restore: it is undone when they stop
    down = cluster_sh(out, "down")
    assert down.returncode == 0, down.stderr
    for vm in ("one", "two"):
        wait_until_stopped(out, vm)
    assert digests(out, "one") == before and leftovers(out) == []
    status = cluster_sh(out, "status")  # the killed command's .restoring-ready is gone too
    assert status.returncode == 0 and leftovers(out) == []


def test_three_failed_restores_in_a_row_each_fail_the_same_way(stopped: Path):
    """A memory file QEMU cannot load (its digest updated, so every check passes), three
    times at once after each other; QEMU ends before the launcher sees it running."""
    out = stopped
    copy = out / "snapshots" / "bad"
    sh("cp", "-a", "--reflink=auto", out / "snapshots" / "ready", copy)
    (copy / "manifest").write_text((copy / "manifest").read_text().replace("snapshot=ready", "snapshot=bad"))
    (copy / "one" / "memory").write_bytes(b"not a migration stream\n")
    (copy / "B3SUMS").write_bytes(sh("sh", "-c", "find . -type f ! -name B3SUMS ! -name '.*' | sed 's|^./||' | "
                                     "sort | xargs b3sum", cwd=copy))
    before = digests(out, "one")
    for _ in range(3):
        failed = cluster_sh(out, "restore", "one", "bad")
        line = one_line(failed.stderr, "restore bad: VM one did not start from the snapshot",
                        "QEMU could not load snapshot bad", "every VM's disks are as they were")
        assert "qemu-system" in line, line  # QEMU's own words
    assert digests(out, "one") == before and leftovers(out) == []


def test_a_failed_load_says_the_same_when_qemu_ends_late(stopped: Path, tmp_path: Path):
    """The same memory file, QEMU held at the gate until the launcher waits on it."""
    out = stopped
    copy = out / "snapshots" / "bad2"
    sh("cp", "-a", "--reflink=auto", out / "snapshots" / "ready", copy)
    (copy / "one" / "memory").write_bytes(b"not a migration stream\n")
    (copy / "B3SUMS").write_bytes(sh("sh", "-c", "find . -type f ! -name B3SUMS ! -name '.*' | sed 's|^./||' | "
                                     "sort | xargs b3sum", cwd=copy))
    gate = Gate(tmp_path / "gate")
    before = digests(out, "one")
    proc = restore_held_at_the_gate(out, gate, "one", "bad2")
    time.sleep(0.5)  # not a guess at a moment: any wait here is "after the launcher saw it start"
    gate.open()
    _, err = finish(proc, timeout=120)
    assert proc.returncode == 1
    one_line(err.decode(), "QEMU could not load snapshot bad2", "qemu-system")
    assert digests(out, "one") == before and leftovers(out) == []


def test_snapshot_interrupted_or_killed_leaves_the_vms_running_and_nothing_half_made(stopped: Path):
    out = stopped
    restored = cluster_sh(out, "restore", "--wait", "120", "ready")  # booted once: the snapshot's VMs
    assert restored.returncode == 0, restored.stdout + restored.stderr
    for sig, name in ((signal.SIGINT, "cut"), (signal.SIGKILL, "killed")):
        proc = start([out / "cluster.sh", "snapshot", name], env=HOLD, stdin=subprocess.DEVNULL,
                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        memory = out / "snapshots" / f".{name}.part" / "one" / "memory"
        deadline = time.monotonic() + 60
        while not memory.exists():  # its own step: VM one's migration has begun
            assert proc.poll() is None and time.monotonic() < deadline, finish(proc)
            time.sleep(0.01)
        status, err = interrupt(proc, sig)
        if sig == signal.SIGINT:
            assert status == 130, err
            one_line(err, f"snapshot {name} interrupted: the VMs run on as before and nothing was kept")
        else:
            recovered = cluster_sh(out, "status")  # the next command
            assert recovered.returncode == 0, recovered.stderr
            one_line(recovered.stderr, f"snapshot {name} had been interrupted", "VMs one two resumed")
        assert leftovers(out) == [] and monitor_clients(out) == []
        assert not (out / "snapshots" / name).exists()
        for vm in ("one", "two"):
            assert on_vm(out, vm, "echo up") == "up\n"  # running, not paused
    again = cluster_sh(out, "snapshot", "again")
    assert again.returncode == 0, again.stderr
    assert all((out / "snapshots" / "again" / vm / "memory").stat().st_size > 1 << 20 for vm in ("one", "two"))


def test_a_vm_left_paused_by_an_earlier_migration_is_resumed_and_saved(stopped: Path, tmp_path: Path):
    out = stopped
    restored = cluster_sh(out, "restore", "--wait", "120", "one", "ready")
    assert restored.returncode == 0, restored.stdout + restored.stderr
    # what an interrupted snapshot leaves once its migration completes: "paused (postmigrate)"
    with QMP(out / "vms" / "one" / "qmp.sock", timeout=60) as qmp:
        qmp.execute("migrate", {"uri": "exec:cat >/dev/null"})
        while qmp.execute("query-migrate")["status"] != "completed":
            time.sleep(0.05)
        assert qmp.execute("query-status")["status"] == "postmigrate"
    taken = cluster_sh(out, "snapshot", "one", "later")
    assert taken.returncode == 0, taken.stderr
    one_line(taken.stderr, "VM one was left paused (postmigrate) by an interrupted snapshot: resumed it first")
    assert (out / "snapshots" / "later" / "one" / "memory").stat().st_size > 1 << 20
    assert on_vm(out, "one", "echo up") == "up\n"
    assert cluster_sh(out, "down").returncode == 0
    back = cluster_sh(out, "restore", "--wait", "120", "later")
    assert back.returncode == 0, back.stdout + back.stderr
    assert on_vm(out, "one", "cat /home/core/note") == "kept\n"


def test_snapshot_messages_are_one_line_each(stopped: Path, tmp_path: Path):
    out = stopped
    forgot = cluster_sh(out, "snapshot", "one")
    one_line(forgot.stderr, "'one' is a VM's name; give the snapshot's name last")
    nosuch = run([out / "vms" / "one" / "run.sh", "--restore", "nosuch"], capture_output=True, text=True,
                 env=ENV, timeout=60, stdin=subprocess.DEVNULL)
    one_line(nosuch.stderr, "no snapshot nosuch in", "cluster.sh snapshot nosuch")
    detached = run([out / "vms" / "one" / "run.sh", "--detach", "--restore", "nosuch"], capture_output=True,
                   text=True, env=ENV, timeout=60, stdin=subprocess.DEVNULL)
    one_line(detached.stderr, "no snapshot nosuch in")
    copy = out / "snapshots" / "partial"
    sh("cp", "-a", "--reflink=auto", out / "snapshots" / "ready", copy)
    (copy / "one" / "oem.img").unlink()
    missing = cluster_sh(out, "restore", "partial")
    one_line(missing.stderr, "partial/one/oem.img is missing", "take a new one")
    (copy / "B3SUMS").unlink()
    no_sums = cluster_sh(out, "restore", "partial")
    one_line(no_sums.stderr, "snapshot partial has no B3SUMS", "take a new one")
    assert leftovers(out) == []
    bad = doit("bundle", "snapshot=../x", f"config={out.parent / 'cluster.yaml'}", f"out={out}")
    assert bad.returncode != 0
    one_line(bad.stderr, "snapshot='../x' is not a snapshot name")
