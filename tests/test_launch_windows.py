"""Every place where a launcher or cluster verb waits on a QEMU that may already have ended,
forced in both orders by a QEMU stand-in (a gate around the real QEMU, its CPUs stopped: the
VMs run, they do not boot), never by a sleep:

- start in the foreground: run.sh waits for its own child, so an exit is never missed (the
  tests of test_launcher_lifetime start and stop such VMs);
- start detached: QEMU ends before `run.sh --detach` sees it running, or at once after;
- resume (a restore): QEMU ends before or after it loaded the snapshot
  (test_snapshot_safety: a failed load, early and late, and three in a row);
- the relaunch after a guest reboot: `cluster.sh down` while run.sh is between two launches;
- stop: `cluster.sh down` while a killed QEMU's run.sh is still clearing up;
- snapshot --stop: each VM is paused before it is saved, so its guest cannot power off
  meanwhile, and a QEMU that ends during the save never reports `Migration status:
  completed`: the snapshot fails and the other VMs are resumed (test_snapshot_safety).
"""

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from support import ENV, build_cluster, cluster_sh, qemu_pids, run

STAND_IN = """#!/bin/sh
# QEMU for the tests: start N (counted in $G/starts) does what $G/start-N says:
#   fail    one error line, exit 1 at once
#   hold    wait until $G/go exists (saying so in $G/at-N), then run
# and otherwise runs the real QEMU with its CPUs stopped.
G='{gate}'
[ "$1" != --version ] || exec qemu-system-x86_64 --version
n=$(($(cat "$G/starts" 2>/dev/null || echo 0) + 1))
echo "$n" >"$G/starts"
case $(cat "$G/start-$n" 2>/dev/null) in
  fail) echo "qemu-system-x86_64: the test's QEMU fails start $n" >&2; exit 1 ;;
  hold) : >"$G/at-$n"; while [ ! -e "$G/go" ]; do sleep 0.02; done ;;
esac
exec qemu-system-x86_64 "$@" -S
"""


class StandIn:
    def __init__(self, where: Path):
        self.dir = where
        where.mkdir()
        qemu = where / "qemu"
        qemu.write_text(STAND_IN.format(gate=where))
        qemu.chmod(0o755)
        self.env = {**ENV, "LEANVM_QEMU": str(qemu), "LEANVM_STOP_TIMEOUT": "2"}

    def plan(self, start: int, what: str) -> None:
        (self.dir / f"start-{start}").write_text(what)

    def wait_at(self, start: int, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while not (self.dir / f"at-{start}").exists():
            assert time.monotonic() < deadline, f"start {start} never reached the gate"
            time.sleep(0.02)

    def open(self) -> None:
        (self.dir / "go").touch()


@pytest.fixture
def one(mini: Path, tmp_path: Path):
    out = build_cluster(tmp_path, mini / "mini.yaml", {"one": {}})
    yield out
    cluster_sh(out, "down", env={**ENV, "LEANVM_STOP_TIMEOUT": "1"})
    assert qemu_pids(out) == []


def launcher_free(vm: Path, timeout: float = 30) -> bool:
    """True once no run.sh holds the VM's run.lock (within timeout seconds)."""
    return run(["flock", "-w", str(timeout), vm / "run.lock", "true"], timeout=timeout + 10).returncode == 0


def detach(vm: Path, env: dict) -> subprocess.CompletedProcess:
    return run([vm / "run.sh", "--detach"], capture_output=True, text=True, env=env, timeout=120,
               stdin=subprocess.DEVNULL)


def test_a_detached_start_whose_qemu_ends_at_once_says_why_every_time(one: Path, tmp_path: Path):
    vm = one / "vms" / "one"
    qemu = StandIn(tmp_path / "gate")
    for start in (1, 2, 3):
        qemu.plan(start, "fail")
    for start in (1, 2, 3):  # one at once after the other: each fails the same way
        result = detach(vm, qemu.env)
        assert result.returncode == 1
        assert result.stderr == (f"run.sh: VM one: QEMU ended at once: qemu-system-x86_64: the test's QEMU fails "
                                 f"start {start}; see {vm / 'run.log'}\n")
        assert launcher_free(vm, timeout=0)
    assert qemu_pids(one) == []


def test_a_detached_vm_whose_qemu_ends_at_once_after_it_started_can_start_again_at_once(one: Path, tmp_path: Path):
    vm = one / "vms" / "one"
    qemu = StandIn(tmp_path / "gate")
    for _ in range(3):
        started = detach(vm, qemu.env)
        assert started.returncode == 0, started.stderr
        os.kill(int((vm / "qemu.pid").read_text()), signal.SIGKILL)  # its run.sh clears up now
    again = detach(vm, qemu.env)
    assert again.returncode == 0, again.stderr
    assert len(qemu_pids(one / "vms")) == 1


def test_down_while_run_sh_is_between_two_launches_stops_the_vm_for_good(one: Path, tmp_path: Path):
    vm = one / "vms" / "one"
    qemu = StandIn(tmp_path / "gate")
    qemu.plan(2, "hold")  # run.sh's relaunch is held until down has begun to force the stop
    up = cluster_sh(one, "up", env=qemu.env)
    assert up.returncode == 0, up.stdout + up.stderr
    # start 1 ends as a guest reboot ends QEMU (-no-reboot): a reset, here asked on the monitor
    reset = cluster_sh(one, "monitor", "one", "system_reset", env=qemu.env)
    assert reset.returncode == 0, reset.stderr
    qemu.wait_at(2)
    down = subprocess.Popen([one / "cluster.sh", "down"], env=qemu.env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.monotonic() + 60
    while not (vm / "forced-stop").exists():
        assert down.poll() is None, down.communicate()
        assert time.monotonic() < deadline, "down never forced the stop"
        time.sleep(0.02)
    qemu.open()  # the relaunched QEMU starts now, after down decided to stop the VM
    stdout, stderr = down.communicate(timeout=120)
    assert down.returncode == 0, stdout + stderr
    assert "one: did not power off within 2s; stopping QEMU" in stdout and "one: stopped" in stdout
    assert launcher_free(vm, timeout=0)
    assert qemu_pids(one) == []
    assert "was stopped by force" in (vm / "run.log").read_text()


def test_down_right_after_a_qemu_was_killed_waits_for_its_launcher(one: Path, tmp_path: Path):
    vm = one / "vms" / "one"
    qemu = StandIn(tmp_path / "gate")
    up = cluster_sh(one, "up", env=qemu.env)
    assert up.returncode == 0, up.stdout + up.stderr
    os.kill(int((vm / "qemu.pid").read_text()), signal.SIGKILL)
    down = cluster_sh(one, "down", env=qemu.env)
    assert down.returncode == 0 and "one: stopped" in down.stdout, down.stdout + down.stderr
    assert launcher_free(vm, timeout=0)
    assert not [p.name for p in vm.iterdir() if p.name in ("qmp.sock", "qemu.pid")]
    assert not (one / "net" / "switch.pid").exists()
    again = cluster_sh(one, "up", env=qemu.env)
    assert again.returncode == 0 and "one: started" in again.stdout, again.stdout + again.stderr
