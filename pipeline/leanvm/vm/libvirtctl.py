"""`leanvm libvirt [--out OUT] [--connect URI] [--dir DIR] VERB...`: an out/'s cluster as
libvirt domains, driven through virsh (out/libvirt.sh only calls this).

Each domain is rendered at each define and start from the VM's values file (`libvirt.py`),
with the accelerator chosen then: KVM where the libvirt host offers it for the VM's arch,
else TCG (LEANVM_ACCEL=kvm|tcg decides instead). Whether a start is a first boot is the
runtime's first-boot rule (leanvm.runtime.firstboot), its debugfs run where the root disk is
(over ssh for a remote libvirt), so the rule has one home. Every virsh call has a deadline:
a libvirtd that keeps probing a broken /dev/kvm hangs its callers, and this says so in one line instead of hanging too.
"""

import argparse
import os
import shlex
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from leanvm.errors import LeanvmError, interrupted, report
from leanvm.fsutil import write_atomic
from leanvm.host import port_in_use
from leanvm.proc import Timeout, run
from leanvm.runtime import firstboot
from leanvm.runtime.power import power_off, stop_timeout
from leanvm.runtime.vmfiles import vm_names
from leanvm.state.layout import Layout
from leanvm.state.vmstate import running_pid
from leanvm.vm.libvirt import domain_xml, prefix, read_values

VIRSH_DEADLINE_S = 60


class Said:
    """What virsh said: its exit status and output, as text."""

    def __init__(self, returncode: int, stdout: str, stderr: str) -> None:
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr

REACH_DEADLINE_S = 20
BROKEN_KVM_HINT = ("a libvirtd that keeps probing a broken /dev/kvm hangs like this: start libvirtd where it "
                   "cannot see /dev/kvm (README, 'A host whose KVM is there but broken') and use LEANVM_ACCEL=tcg")
USAGE = """Run an out/'s VMs as libvirt domains named PREFIX-NAME on an isolated network; verbs run in order:
  define    define the network and every domain (rendered from out/state/vms/NAME.env, with the
            accelerator chosen now; kept as out/vms/NAME/domain.xml)
  start     start the network and every domain; a VM whose root disk has no Ignition result
            starts with its first-boot arguments (once), every VM with LEANVM_APPEND
  stop      ACPI power-off, pressed every 5 s; domains still up after LEANVM_STOP_TIMEOUT
            seconds (60) are destroyed, and the network stops
  status    each VM's domain, state and ssh port
  undefine  undefine every domain and the network (they must be stopped)
Environment: LEANVM_ACCEL=auto|kvm|tcg (auto: KVM where the libvirt host offers it for the VM's arch).
The console: virsh console PREFIX-NAME, logged to out/vms/NAME/console.log."""
VERBS = ("define", "start", "stop", "status", "undefine")


@dataclass(frozen=True)
class Libvirt:
    """One out/ and the libvirt it runs in."""

    layout: Layout
    host_dir: Path  # where out/ lies on the libvirt host (--dir)
    connect: str | None

    @property
    def prefix(self) -> str:
        return prefix(self.layout.out)

    @property
    def network(self) -> str:
        return f"{self.prefix}-cluster"

    def domain(self, vm: str) -> str:
        return f"{self.prefix}-{vm}"

    def virsh(self, *args: str, deadline: float = VIRSH_DEADLINE_S) -> Said:
        argv = ["virsh", *(["--connect", self.connect] if self.connect else []), "-q", *args]
        try:
            result = run(argv, check=False, timeout=deadline)
        except Timeout:
            raise LeanvmError(f"libvirt{self.at} did not answer `virsh {args[0]}` within {deadline:.0f} s",
                              BROKEN_KVM_HINT) from None
        return Said(result.returncode, result.stdout.decode(errors="replace"), result.stderr.decode(errors="replace"))

    def ok(self, *args: str) -> bool:
        return self.virsh(*args).returncode == 0

    def must(self, what: str, *args: str) -> str:
        """virsh ARGS's output; on failure one line: `what` and virsh's last error."""
        result = self.virsh(*args)
        if result.returncode != 0:
            said = result.stderr.strip() or result.stdout.strip()
            errors = [line.removeprefix("error: ") for line in said.splitlines() if line.startswith("error: ")]
            raise LeanvmError(f"{what}: {errors[-1] if errors else said}")
        return result.stdout

    @property
    def at(self) -> str:
        """' at URI' for messages, when --connect named one."""
        return f" at {self.connect}" if self.connect else ""

    def remote_host(self) -> str:
        """The host of a remote URI (qemu+ssh://[USER@]HOST[:PORT]/...); empty if local."""
        uri = self.virsh("uri").stdout.strip()
        return uri.split("://", 1)[1].split("/", 1)[0] if "://" in uri else ""

    # --- this out/'s VMs ------------------------------------------------------------
    def vms(self) -> list[str]:
        """The VMs of this out/ (a retired VM, whose run.sh is gone, is left out) that have a
        values file to render their domain from."""
        return [vm for vm in vm_names(self.layout.out) if self.layout.values(vm).is_file()]

    def active_vms(self) -> list[str]:
        running = set(self.virsh("list", "--name").stdout.split())
        return [vm for vm in self.vms() if self.domain(vm) in running]

    def network_active(self) -> bool:
        return self.network in self.virsh("net-list", "--name").stdout.split()

    def accel(self, values: dict[str, str]) -> str:
        chosen = os.environ.get("LEANVM_ACCEL") or "auto"
        if chosen in ("kvm", "tcg"):
            return chosen
        if chosen != "auto":
            raise LeanvmError(f"LEANVM_ACCEL must be auto, kvm or tcg, not '{chosen}'", "unset it for auto")
        offers_kvm = self.ok("domcapabilities", "--virttype", "kvm", "--arch", values["cpu_arch"])
        return "kvm" if offers_kvm else "tcg"

    def define_domain(self, vm: str, values: dict[str, str], accel: str, cmdline: str) -> None:
        """Define VM `vm`'s domain, and keep what was defined in out/vms/NAME/domain.xml."""
        xml = domain_xml(vm, values, self.host_dir, self.prefix, accel, cmdline)
        with tempfile.NamedTemporaryFile("w", suffix=".xml", prefix=f"leanvm-{vm}-") as f:
            f.write(xml)
            f.flush()
            self.must(f"cannot define {self.domain(vm)}", "define", f.name)
        write_atomic(self.layout.domain_xml(vm), xml.encode())

    def first_boot(self, vm: str, values: dict[str, str]) -> bool:
        """The first-boot rule on the VM's root disk, read where the libvirt host has it."""
        if not values["first_boot_args"]:
            return False
        disk = Layout(self.host_dir).root_disk(vm)
        host = self.remote_host()
        if not host:
            return firstboot.decide(disk).first
        name, _, port = host.rpartition(":") if ":" in host else (host, "", "22")

        def remote_debugfs(requests: bytes, path: str) -> tuple[str, str]:
            # (ssh joins its words into one command line for the remote shell: the disk is quoted)
            argv = ["ssh", "-o", "BatchMode=yes", "-p", port, name, "DEBUGFS_PAGER=__none__", "debugfs", "-c",
                    "-f", "-", shlex.quote(path)]
            result = run(argv, input=requests, check=False, timeout=VIRSH_DEADLINE_S)
            return result.stdout.decode(errors="replace"), result.stderr.decode(errors="replace")

        try:
            return firstboot.decide(disk, print_only=True, debugfs=remote_debugfs).first
        except LeanvmError as e:
            raise LeanvmError(f"{e.message} on {host}",
                              "check that debugfs is installed there (apt-get install e2fsprogs)") from None


def _values(lv: Libvirt, vm: str) -> dict[str, str]:
    return read_values(lv.layout.out, vm)


# --- the verbs ----------------------------------------------------------------------------

def define(lv: Libvirt) -> None:
    if not lv.ok("net-info", lv.network):
        lv.must(f"cannot define network {lv.network}", "net-define", str(lv.layout.libvirt / "network.xml"))
    for vm in lv.vms():
        values = _values(lv, vm)
        accel = lv.accel(values)
        lv.define_domain(vm, values, accel, values["kernel_args"])
        print(f"{vm}: defined as {lv.domain(vm)} ({accel})")


def _check_startable(lv: Libvirt) -> None:
    """Before anything starts: every domain defined and stopped, no run.sh QEMU, free ports."""
    local = not lv.remote_host()
    for vm in lv.vms():
        state = lv.virsh("domstate", lv.domain(vm))
        if state.returncode != 0:
            raise LeanvmError(f"domain {lv.domain(vm)} (VM {vm}) is not defined", "run libvirt.sh define")
        if state.stdout.strip() != "shut off":
            raise LeanvmError(f"domain {lv.domain(vm)} (VM {vm}) is already {state.stdout.strip()}",
                              "stop it first (libvirt.sh stop)")
        if not local:
            continue
        if (pid := running_pid(lv.layout.vm(vm))) is not None:
            raise LeanvmError(f"VM {vm} runs from run.sh (pid {pid})", "stop it first (cluster.sh down)")
        for port in _values(lv, vm)["host_ports"].split():
            if port_in_use(int(port)):
                raise LeanvmError(f"VM {vm}: host port {port} (127.0.0.1) is already in use",
                                  "stop what uses it or change the VM's ports")


def start(lv: Libvirt) -> None:
    if not lv.vms():
        raise LeanvmError(f"no VMs in {lv.layout.vms}", "run doit libvirt")
    _check_startable(lv)
    if not lv.network_active():
        lv.must(f"cannot start network {lv.network}", "net-start", lv.network)
    append = os.environ.get("LEANVM_APPEND", "")
    for vm in lv.vms():
        values = _values(lv, vm)
        accel = lv.accel(values)
        args, rule = values["kernel_args"], "not a first boot"
        if lv.first_boot(vm, values):
            args, rule = f"{args} {values['first_boot_args']}", "first boot"
        # this boot's command line, then the plain one again for the next start (virsh, virt-manager)
        lv.define_domain(vm, values, accel, f"{args} {append}".strip())
        lv.must(f"cannot start {lv.domain(vm)}", "start", lv.domain(vm))
        lv.define_domain(vm, values, accel, values["kernel_args"])
        print(f"{vm}: started {lv.domain(vm)} ({accel}, {rule}, ssh 127.0.0.1:{values['ssh_port']})")


def stop(lv: Libvirt) -> None:
    timeout = stop_timeout()

    def press(active: list[str], _count: int) -> None:
        for vm in active:
            lv.virsh("shutdown", "--mode", "acpi", lv.domain(vm))

    for vm in power_off(lv.active_vms, press, timeout):
        print(f"{vm}: did not power off within {timeout}s; destroying {lv.domain(vm)}")
        lv.virsh("destroy", lv.domain(vm))
    if active := lv.active_vms():
        raise LeanvmError(f"cannot stop: {' '.join(active)}", "see virsh list")
    if lv.network_active():
        lv.must(f"cannot stop network {lv.network}", "net-destroy", lv.network)
    for vm in lv.vms():
        print(f"{vm}: stopped")


def status(lv: Libvirt) -> None:
    print(f"{'VM':<20} {'DOMAIN':<36} {'STATE':<10} SSH")
    for vm in lv.vms():
        state = lv.virsh("domstate", lv.domain(vm))
        said = state.stdout.strip() if state.returncode == 0 else "undefined"
        print(f"{vm:<20} {lv.domain(vm):<36} {said:<10} 127.0.0.1:{_values(lv, vm)['ssh_port']}")


def undefine(lv: Libvirt) -> None:
    if active := lv.active_vms():
        raise LeanvmError(f"domains still run ({' '.join(active)})", "libvirt.sh stop first")
    for vm in lv.vms():
        if lv.ok("dominfo", lv.domain(vm)):
            lv.must(f"cannot undefine {lv.domain(vm)}", "undefine", lv.domain(vm))
            print(f"{vm}: undefined {lv.domain(vm)}")
    if lv.network_active():
        lv.must(f"cannot stop network {lv.network}", "net-destroy", lv.network)
    if lv.ok("net-info", lv.network):
        lv.must(f"cannot undefine network {lv.network}", "net-undefine", lv.network)


RUN: dict[str, Callable[[Libvirt], None]] = {
    "define": define, "start": start, "stop": stop, "status": status, "undefine": undefine}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="leanvm libvirt", description=USAGE,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("out"), help="the out/ directory (default: ./out)")
    parser.add_argument("--connect", metavar="URI", default=os.environ.get("LIBVIRT_DEFAULT_URI") or None,
                        help="the libvirt to use (default: LIBVIRT_DEFAULT_URI, else virsh's default), "
                             "e.g. qemu:///system or qemu+ssh://HOST/system")
    parser.add_argument("--dir", metavar="DIR", help="where this out/ is on the libvirt host (default: the same "
                        "path as here); a remote host needs this out/ (a bundle) unpacked there")
    parser.add_argument("verbs", nargs="+", metavar="VERB", help=" ".join(VERBS))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        unknown = [v for v in args.verbs if v not in RUN]
        if unknown:
            raise LeanvmError(f"unknown verb '{unknown[0]}'", f"verbs: {' '.join(VERBS)}")
        out = args.out.resolve()
        if not (out / "libvirt" / "network.xml").is_file():
            raise LeanvmError(f"{out}/libvirt/network.xml is missing", "run doit libvirt")
        if args.dir is not None and not args.dir.startswith("/"):
            raise LeanvmError(f"--dir must be an absolute path, not '{args.dir}'")
        lv = Libvirt(Layout(out), Path(args.dir.rstrip("/") or "/") if args.dir else out, args.connect)
        reach = lv.virsh("uri", deadline=REACH_DEADLINE_S)
        if reach.returncode != 0:
            raise LeanvmError(f"cannot reach libvirt{lv.at}", "is libvirtd running? or pass --connect URI")
        for verb in args.verbs:
            RUN[verb](lv)
    except LeanvmError as e:
        return report(e)
    except KeyboardInterrupt:
        return interrupted()
    return 0


if __name__ == "__main__":
    sys.exit(main())
