"""What a cluster file and a release profile describe, as frozen dataclasses (`load.py`
makes them; nothing here reads a file)."""

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from leanvm.arch import Arch


@dataclass(frozen=True)
class Release:
    name: str
    path: Path
    base_url: str
    version: str
    version_file: str | None
    version_key: str | None
    kernel: str
    initrd: str | None
    image: str
    usr_member: str
    signature_suffix: str
    signing_key: Path
    fingerprints: tuple[str, ...]
    kernel_args: str
    ignition_fw_cfg: str | None = None
    first_boot_args: str | None = None  # kernel args for boots whose root has no Ignition result
    arch: Arch = Arch.AMD64
    # The Ignition specs the release's own Ignition accepts, by the release's major version
    # ("default" for any other): (major, specs), specs None for an Ignition that writes no
    # /etc/.ignition-result.json (every boot would be a first boot).
    ignition_specs: tuple[tuple[str, tuple[str, ...] | None], ...] = ()


# Every Ignition spec version there is (coreos/ignition config/ and Flatcar's 2.x fork, which
# adds 2.4.0), in order: what a range in a profile's ignition_specs spans.
IGNITION_SPECS = ("2.0.0", "2.1.0", "2.2.0", "2.3.0", "2.4.0",
                  "3.0.0", "3.1.0", "3.2.0", "3.3.0", "3.4.0", "3.5.0", "3.6.0")
# Flatcar stable's (Ignition 2.24: 3.0.0-3.5.0; 2.x translated by Flatcar's patch): the
# default of a profile that gives no ignition_specs.
DEFAULT_IGNITION_SPECS = ("2.0.0", "2.1.0", "2.2.0", "2.3.0", "2.4.0", "3.0.0", "3.1.0", "3.2.0", "3.3.0",
                          "3.4.0", "3.5.0")


def accepted_specs(release: Release, version: str) -> tuple[str, ...] | None:
    """The Ignition specs release `release` at `version` accepts (None: its Ignition writes no
    result file), from the profile's entry for the version's major number, else its default."""
    table = dict(release.ignition_specs)
    major = version.split(".", 1)[0]
    return table[major] if major in table else table.get("default", DEFAULT_IGNITION_SPECS)


def spec_ranges(specs: tuple[str, ...]) -> str:
    """'3.0.0-3.3.0' for the specs from 3.0.0 to 3.3.0 (runs of IGNITION_SPECS, comma-separated)."""
    runs: list[list[str]] = []
    for spec in IGNITION_SPECS:
        if spec not in specs:
            continue
        if runs and IGNITION_SPECS.index(runs[-1][-1]) == IGNITION_SPECS.index(spec) - 1 \
                and runs[-1][-1][0] == spec[0]:
            runs[-1].append(spec)
        else:
            runs.append([spec])
    return ", ".join(run[0] if len(run) == 1 else f"{run[0]}-{run[-1]}" for run in runs)


@dataclass(frozen=True)
class VM:
    """A VM as its cluster file asks for it. Its identity (ports, MACs, cluster address) is
    not here: the DAG assigns it and keeps it beside the VMs (leanvm.dag.tasks.Context)."""

    name: str
    memory: int
    cpus: int
    disk_size: int  # bytes of the sparse root disk (the cluster file's `disk`)
    user_data: Path | None
    ssh_authorized_keys: tuple[str, ...]
    release: Release  # the cluster's, or the VM's own `release` (e.g. an arm64 VM among amd64 ones)
    given_ssh_port: int | None = None  # the file's `ssh_port`, if it gives one
    given_cluster_ip: str | None = None  # the file's `cluster_ip` (no prefix), if it gives one
    forward: tuple[tuple[int, int], ...] = ()  # the `forward` key: extra (host, guest) TCP ports
    ignition: Path | None = None
    kernel_args: str = ""  # appended after the release profile's kernel_args
    # the user_data and Ignition files as read and checked here, once: the config drive uses them as parsed
    user_data_text: str | None = None
    user_data_doc: dict[str, Any] | None = field(default=None, compare=False, hash=False)  # None: a '#!' script
    ignition_doc: dict[str, Any] | None = field(default=None, compare=False, hash=False)  # None: Butane (built later)

    @property
    def cluster_ip_given(self) -> bool:  # the cluster file gives the address
        return self.given_cluster_ip is not None


def kernel_args(vm: VM) -> str:
    """VM vm's kernel command line: its release profile's arguments, then the VM's own."""
    return " ".join(filter(None, (vm.release.kernel_args, vm.kernel_args)))


@dataclass(frozen=True)
class Cluster:
    path: Path
    release: Release  # the cluster file's `release`: every VM's unless it names its own
    vms: tuple[VM, ...]
    subnet: str = "10.77.0.0/24"

    @property
    def releases(self) -> tuple[Release, ...]:
        """Every release a VM of the cluster runs, the cluster's own first."""
        found = {self.release.name: self.release}
        for vm in self.vms:
            found.setdefault(vm.release.name, vm.release)
        return tuple(found.values())

