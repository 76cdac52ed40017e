"""The README's main command: mini release -> 3-VM demo cluster (via doit) -> one real boot."""

import os
import sys
import time
from pathlib import Path

from . import minirelease
from .errors import LeanvmError, report
from .paths import CHECKOUT
from .proc import run

PROJECT = CHECKOUT
OUT = PROJECT / "out"
DEMO_CONFIG = PROJECT / "configs" / "demo.yaml"
KVM_TIMEOUT, TCG_TIMEOUT = 30, 180


def kvm_usable() -> bool:
    return os.access("/dev/kvm", os.R_OK | os.W_OK)


def boot(run_sh: Path, accel: str, timeout: float) -> str | None:
    """Boot non-interactively to power-off; the console text, or None if it timed out."""
    env = {**os.environ, "LEANVM_ACCEL": accel}
    try:
        result = run([run_sh], env=env, timeout=timeout)
    except LeanvmError:
        return None
    return result.stdout.decode(errors="replace")


def boot_with_fallback(run_sh: Path) -> tuple[str, str]:
    accel = os.environ.get("LEANVM_ACCEL", "auto")
    if accel == "auto":
        accel = "kvm" if kvm_usable() else "tcg"
    console = boot(run_sh, accel, KVM_TIMEOUT if accel == "kvm" else TCG_TIMEOUT)
    if (console is None or "leanvm: ready" not in console) and accel == "kvm":
        print("demo: the KVM boot failed or hung (nested virtualisation?); retrying with TCG", file=sys.stderr)
        accel, console = "tcg", boot(run_sh, "tcg", TCG_TIMEOUT)
    if console is None or "leanvm: ready" not in console:
        raise LeanvmError(f"{run_sh} did not boot to its 'leanvm: ready' marker", "see its console output above")
    return accel, console


def ssh_round_trip(run_sh: Path, accel: str) -> str:
    """Start the VM detached, run one command in it over ssh with the cluster key, stop it."""
    env = {**os.environ, "LEANVM_ACCEL": accel, "LEANVM_APPEND": "leanvm.hold"}
    cluster_sh = OUT / "cluster.sh"
    run([run_sh, "--detach"], env=env)
    try:
        deadline = time.monotonic() + (KVM_TIMEOUT if accel == "kvm" else TCG_TIMEOUT)
        while True:
            result = run([cluster_sh, "ssh", "demo1", "--", "grep ' /usr ' /proc/mounts"], check=False)
            if result.returncode == 0:
                return result.stdout.decode()
            if time.monotonic() > deadline:
                raise LeanvmError("demo1's sshd did not answer", f"see {run_sh.parent / 'console.log'}")
            time.sleep(2)
    finally:
        run([cluster_sh, "down"], env=env, check=False)


def main() -> int:
    try:
        print("demo: building the mini release (Debian kernel + busybox) ...", file=sys.stderr)
        minirelease.build(OUT / "minirelease")
        print("demo: building the 3-VM demo cluster with doit ...", file=sys.stderr)
        doit = run([sys.executable, "-m", "doit", "-f", PROJECT / "dodo.py", f"config={DEMO_CONFIG}"],
                   capture=False, check=False)
        if doit.returncode != 0:
            return doit.returncode
        run_sh = OUT / "vms" / "demo1" / "run.sh"
        print(f"demo: booting demo1 non-interactively ({run_sh}) ...", file=sys.stderr)
        accel, console = boot_with_fallback(run_sh)
        (run_sh.parent / "console.log").write_text(console)
        print("demo: starting demo1 in the background and running one command in it over ssh ...", file=sys.stderr)
        over_ssh = ssh_round_trip(run_sh, accel)
    except LeanvmError as e:
        return report(e)
    print("".join(line + "\n" for line in console.splitlines() if line.startswith("leanvm: ")), end="")
    print(f"\n$ out/cluster.sh ssh demo1 -- grep ' /usr ' /proc/mounts\n{over_ssh}", end="")
    relative = run_sh.relative_to(PROJECT)
    env = "LEANVM_ACCEL=tcg " if accel == "tcg" and os.environ.get("LEANVM_ACCEL", "auto") == "auto" else ""
    print(f"""
demo1 booted under {accel.upper()}: /usr is the shared read-only squashfs disk, / its own root disk.
Launchers: {OUT / 'vms'}/demo{{1,2,3}}/run.sh   (console log: {relative.parent / 'console.log'})
Start one interactively (a shell instead of power-off; Ctrl-a x quits QEMU):
    {env}LEANVM_APPEND=leanvm.shell {relative}
Start the whole cluster in the background, log in, stop it:
    {env}LEANVM_APPEND=leanvm.hold out/cluster.sh up --wait; out/cluster.sh status
    out/cluster.sh ssh demo1
    out/cluster.sh down
Show a QEMU command line:
    {relative} --print""")
    return 0


if __name__ == "__main__":
    sys.exit(main())
