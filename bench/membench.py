"""Section 9 of the bench: host memory of N idle 256 MiB mini VMs as PSS (a page shared by k
QEMUs counts 1/k in each) and RSS, with KSM off and on, free page reporting on, after the
guests dropped their page caches; PXE-style VMs (/usr in the initramfs) beside them; a
breakdown of one VM; and a plot (matplotlib, the optional extra `bench`) when it is there."""

import os
import re
import statistics
import time
from dataclasses import dataclass, replace
from pathlib import Path

from support import process_memory, run
from vmrun import accel_env, cluster_sh, down, pids, wait_console

MiB = 1 << 20
KSM = Path("/sys/kernel/mm/ksm")
MEMORY_MIB = 256
READY = "leanvm: meminfo:"
APPEND = "leanvm.hold leanvm.dropcaches"  # the mini release drops its caches and prints meminfo


@dataclass(frozen=True)
class Sample:
    pss: int  # bytes, all VMs
    rss: int
    count: int
    boot_s: float = 0  # from starting the VMs until every guest printed its meminfo


def sample(out: Path) -> Sample:
    found = pids(out)
    return Sample(sum(process_memory(p, "Pss") for p in found), sum(process_memory(p, "Rss") for p in found),
                  len(found))


def mappings(pid: int) -> list[tuple[str, int, int]]:
    """(header, size, pss) in bytes of each mapping of process `pid`."""
    result, header, size = [], "", 0
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        if re.match(r"^[0-9a-f]+-[0-9a-f]+ ", line):
            header = line
        elif line.startswith("Size:"):
            size = int(line.split()[1]) * 1024
        elif line.startswith("Pss:"):
            result.append((header, size, int(line.split()[1]) * 1024))
    return result


def breakdown(pid: int, console: Path) -> dict[str, int]:
    """One VM's host PSS split into guest RAM and QEMU's own (the TCG code cache apart), and
    the guest's own view of its RAM from the meminfo line the mini release prints."""
    maps = mappings(pid)
    guest = sum(pss for _, size, pss in maps if size == MEMORY_MIB * MiB)
    code = sum(pss for head, size, pss in maps if " rwxp " in head and size >= MiB)
    line = next(ln for ln in console.read_text(errors="replace").splitlines() if READY in ln)
    kb = {k: int(v) * 1024 for k, v in re.findall(r"(\w+): (\d+)", line)}
    cache = kb["Cached"] + kb["Buffers"]
    return {"guest RAM on the host": guest, "TCG code cache": code,
            "rest of QEMU": sum(pss for *_, pss in maps) - guest - code,
            "guest: used": kb["MemTotal"] - kb["MemFree"] - cache, "guest: page cache": cache,
            "guest: free": kb["MemFree"]}


def ksm_writable() -> bool:
    return os.access(KSM / "run", os.W_OK)


def ksm_set(**values: str) -> dict[str, str]:
    """Write KSM settings; returns the old values."""
    old = {k: (KSM / k).read_text().strip() for k in values}
    for key, value in values.items():
        (KSM / key).write_text(value)
    return old


def ksm_settle(timeout: float = 300) -> None:
    """Wait for KSM to scan all memory three more times, so that what it merges has settled."""
    start = int((KSM / "full_scans").read_text())
    deadline = time.monotonic() + timeout
    while int((KSM / "full_scans").read_text()) < start + 3:
        if time.monotonic() > deadline:
            raise RuntimeError(f"KSM did not finish 3 scans within {timeout} s")
        time.sleep(1)


def up(out: Path, pxe: list[str] | None, settle_s: float, env: dict[str, str]) -> float:
    """Start out/'s VMs (PXE-style with run.sh's extra QEMU arguments `pxe`), wait until every
    guest dropped its caches (the seconds that took), then `settle_s` for free page reporting."""
    start = time.monotonic()
    if pxe is None:
        cluster_sh(out, "up", LEANVM_APPEND=APPEND, LEANVM_BALLOON="on", **env)
    else:
        for run_sh in sorted(out.glob("vms/*/run.sh")):
            run([run_sh, "--detach", *pxe], check=True, capture_output=True, timeout=600,
                env=accel_env(LEANVM_BALLOON="on", **env))
    wait_console(out, READY)
    boot_s = time.monotonic() - start
    time.sleep(settle_s)
    return boot_s


def measure(out: Path, pxe: list[str] | None, settle_s: float,
            env: dict[str, str]) -> tuple[Sample, Sample | None, dict[str, int]]:
    """KSM off, then on (if this process may turn it on), and one VM's breakdown; `env` for
    the launchers (LEANVM_TCG_CACHE)."""
    try:
        boot_s = up(out, pxe, settle_s, env)
        off = replace(sample(out), boot_s=boot_s)
        parts = breakdown(pids(out)[0], next(out.glob("vms/*/console.log")))
        on = None
        if ksm_writable():
            old = ksm_set(pages_to_scan="5000", sleep_millisecs="10", run="1")
            try:
                ksm_settle()
                on = sample(out)
            finally:
                ksm_set(run="2")  # unmerge before the next measurement
                ksm_set(**old)
        return off, on, parts
    finally:
        down(out)


def per_vm(s: Sample | None) -> str:
    return "-" if s is None else f"{s.pss / s.count / MiB:.0f} / {s.rss / s.count / MiB:.0f} MiB"


def marginal(series: dict[int, Sample | None]) -> float | None:
    """Host PSS added per extra VM: the slope of a least-squares line through (N, PSS)."""
    points = [(n, s.pss) for n, s in series.items() if s is not None]
    if len(points) < 2:
        return None
    return statistics.linear_regression([n for n, _ in points], [p for _, p in points]).slope


def plot(path: Path, lines: dict[str, dict[int, Sample | None]]) -> str:
    """Draw each series of `lines` (label -> {N: sample}); PXE-style ones dashed."""
    try:
        import matplotlib
    except ImportError:
        return "not drawn: matplotlib missing (pip install -e '.[bench]')"
    matplotlib.use("Agg")
    from matplotlib import pyplot

    figure, axes = pyplot.subplots(figsize=(6, 4))
    for (label, series), marker in zip(lines.items(), "os^vD", strict=False):
        style = f"{marker}{'--' if label.startswith('PXE') else '-'}"
        points = [(n, s.pss / MiB) for n, s in sorted(series.items()) if s is not None]
        if points:
            axes.plot(*zip(*points, strict=True), style, label=label)
    axes.set_xlabel(f"idle VMs ({MEMORY_MIB} MiB each, TCG)")
    axes.set_ylabel("host memory of all QEMUs, PSS (MiB)")
    axes.set_title("leanvm: host memory against the number of VMs")
    axes.grid(True, alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    pyplot.close(figure)
    return str(path.relative_to(Path.cwd()) if path.is_relative_to(Path.cwd()) else path)
