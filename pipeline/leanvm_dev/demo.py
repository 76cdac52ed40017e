"""The README's main command: mini release -> 3-VM demo cluster (via doit) -> one real boot.

    python -m leanvm_dev.demo [--arch amd64|arm64]   # arm64: into out/arm64, under TCG here
"""

import argparse
import os
import sys
import time
from pathlib import Path

from leanvm.arch import Arch
from leanvm.errors import LeanvmError, report
from leanvm.host import resolve_accel
from leanvm.proc import run

from leanvm_dev import CHECKOUT, minirelease

PROJECT = CHECKOUT
OUT = PROJECT / "out"
# out/ holds one cluster: the arm64 demo has its own, inside it
DEMOS = {Arch.AMD64: (PROJECT / "configs" / "demo.yaml", OUT),
         Arch.ARM64: (PROJECT / "configs" / "demo-arm64.yaml", OUT / "arm64")}
KVM_TIMEOUT, TCG_TIMEOUT = 30, 180
READY = "leanvm: ready"


def kvm_usable(arch: Arch) -> bool:
    """What LEANVM_ACCEL=auto picks for a guest of `arch` is KVM (leanvm.host's resolve_accel)."""
    return resolve_accel("auto", arch.value) == "kvm"


def boot(run_sh: Path, accel: str, timeout: float) -> tuple[str, str]:
    """Boot non-interactively to power-off: the console text and, if the boot did not reach
    READY, why. A boot that outlives `timeout` is stopped with all it started (proc.run)."""
    env = {**os.environ, "LEANVM_ACCEL": accel}
    try:
        result = run([run_sh], env=env, timeout=timeout, check=False)
    except LeanvmError:
        return "", f"hung (nothing reached '{READY}' within {timeout} s)"
    console = result.stdout.decode(errors="replace")
    if READY in console:
        return console, ""
    errors = result.stderr.decode(errors="replace").strip().splitlines()
    return console, f"failed ({errors[-1] if errors else f'exit code {result.returncode}'})"


def boot_with_fallback(run_sh: Path, arch: Arch) -> tuple[str, str]:
    """Boot under KVM when it looks usable, else TCG; a KVM that hangs or fails (nested
    virtualisation does both) is stopped, said in one line, and TCG used instead."""
    accel = os.environ.get("LEANVM_ACCEL", "auto")
    if accel == "auto":
        accel = "kvm" if kvm_usable(arch) else "tcg"
    console, problem = boot(run_sh, accel, KVM_TIMEOUT if accel == "kvm" else TCG_TIMEOUT)
    if problem and accel == "kvm":
        print(f"demo: KVM {problem}: booting under TCG instead (LEANVM_ACCEL=tcg sh pipeline/demo.sh "
              "skips the KVM try)", file=sys.stderr)
        accel = "tcg"
        console, problem = boot(run_sh, accel, TCG_TIMEOUT)
    (run_sh.parent / "console.log").write_text(console)
    if problem:
        raise LeanvmError(f"{run_sh} {problem} under {accel.upper()}",
                          f"see its console in {run_sh.parent / 'console.log'}")
    return accel, console


def ssh_round_trip(run_sh: Path, accel: str) -> str:
    """Start the VM detached, run one command in it over ssh with the cluster key, stop it."""
    env = {**os.environ, "LEANVM_ACCEL": accel, "LEANVM_APPEND": "leanvm.hold"}
    cluster_sh = run_sh.parents[2] / "cluster.sh"
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sh pipeline/demo.sh", description="leanvm's offline demo")
    parser.add_argument("--arch", type=Arch, choices=list(Arch), default=Arch.AMD64)
    arch = parser.parse_args(argv).arch
    config, out = DEMOS[arch]
    try:
        print(f"demo: building the {arch} mini release (Debian kernel + busybox) ...", file=sys.stderr)
        minirelease.build(OUT / "minirelease", arch=arch)
        print("demo: building the 3-VM demo cluster with doit ...", file=sys.stderr)
        doit = run([sys.executable, "-m", "doit", f"config={config}", f"out={out}"],  # in the checkout, as the
                   cwd=PROJECT, capture=False, check=False)                             # README says
        if doit.returncode != 0:
            return doit.returncode
        run_sh = out / "vms" / "demo1" / "run.sh"
        print(f"demo: booting demo1 non-interactively ({run_sh}) ...", file=sys.stderr)
        accel, console = boot_with_fallback(run_sh, arch)
        print("demo: starting demo1 in the background and running one command in it over ssh ...", file=sys.stderr)
        over_ssh = ssh_round_trip(run_sh, accel)
    except LeanvmError as e:
        return report(e)
    print("".join(line + "\n" for line in console.splitlines() if line.startswith("leanvm: ")), end="")
    cluster_sh = (out / "cluster.sh").relative_to(PROJECT)
    print(f"\n$ {cluster_sh} ssh demo1 -- grep ' /usr ' /proc/mounts\n{over_ssh}", end="")
    relative = run_sh.relative_to(PROJECT)
    fell_back = accel == "tcg" and kvm_usable(arch) and os.environ.get("LEANVM_ACCEL", "auto") == "auto"
    env = "LEANVM_ACCEL=tcg " if fell_back else ""
    print(f"""
demo1 booted under {accel.upper()}: /usr is the shared read-only squashfs disk, / its own root disk.
Launchers: {out / 'vms'}/demo{{1,2,3}}/run.sh   (console log: {relative.parent / 'console.log'})
Start one interactively (a shell instead of power-off; Ctrl-a x quits QEMU):
    {env}LEANVM_APPEND=leanvm.shell {relative}
Start the whole cluster in the background, log in, stop it:
    {env}LEANVM_APPEND=leanvm.hold {cluster_sh} up --wait; {cluster_sh} status
    {cluster_sh} ssh demo1
    {cluster_sh} down
Show a QEMU command line:
    {relative} --print""")
    return 0


if __name__ == "__main__":
    sys.exit(main())
