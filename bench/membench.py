"""Section 9 of the bench: host memory of N idle 256 MiB mini VMs as PSS (a page shared by k
QEMUs counts 1/k in each) and RSS, with KSM off and on, free page reporting on, after the
guests dropped their page caches; PXE-style VMs (/usr in the initramfs) beside them; a
breakdown of one VM; and a plot (matplotlib, the optional extra `bench`) when it is there."""

import os
import re
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

from support import run

MiB = 1 << 20
KSM = Path("/sys/kernel/mm/ksm")
MEMORY_MIB = 256
READY = "leanvm: meminfo:"


@dataclass(frozen=True)
class Sample:
    pss: int  # bytes, all VMs
    rss: int
    count: int


def pids(out: Path) -> list[int]:
    return [int(p.read_text()) for p in sorted(out.glob("vms/*/qemu.pid"))]


def rollup(pid: int, field: str) -> int:
    text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    return int(re.search(rf"^{field}:\s+(\d+) kB", text, re.M).group(1)) * 1024


def sample(out: Path) -> Sample:
    found = pids(out)
    return Sample(sum(rollup(p, "Pss") for p in found), sum(rollup(p, "Rss") for p in found), len(found))


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
    code = sum(pss for head, size, pss in maps if " rwxp " in head and size >= 64 * MiB)
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


def wait_console(out: Path, text: str, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    for log in sorted(out.glob("vms/*/console.log")):
        while text not in (console := log.read_text(errors="replace")):
            if "Kernel panic" in console:
                raise RuntimeError(f"{log}: the guest's kernel panicked")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{log}: no {text!r} within {timeout} s")
            time.sleep(0.5)


def env(**extra: str) -> dict[str, str]:
    return {**os.environ, "LEANVM_ACCEL": os.environ.get("LEANVM_ACCEL", "tcg"), **extra}


def up(out: Path, pxe: list[str] | None) -> None:
    append = "leanvm.hold leanvm.dropcaches"
    if pxe is None:
        run([out / "cluster.sh", "up"], check=True, capture_output=True, timeout=600,
            env=env(LEANVM_APPEND=append, LEANVM_BALLOON="on"))
    else:
        for run_sh in sorted(out.glob("vms/*/run.sh")):
            run([run_sh, "--detach", "-initrd", pxe[0], "-append", f"{pxe[1]} {append}"], check=True,
                capture_output=True, timeout=600, env=env(LEANVM_BALLOON="on"))
    wait_console(out, READY)
    time.sleep(15)  # free page reporting hands back what the guests freed, in batches


def measure(out: Path, pxe: list[str] | None) -> tuple[Sample, Sample | None, dict[str, int]]:
    """KSM off, then on (if this process may turn it on), and one VM's breakdown."""
    try:
        up(out, pxe)
        off = sample(out)
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
        run([out / "cluster.sh", "down"], check=True, capture_output=True, timeout=600,
            env=env(LEANVM_STOP_TIMEOUT="60"))


def per_vm(s: Sample | None) -> str:
    return "-" if s is None else f"{s.pss / s.count / MiB:.0f} / {s.rss / s.count / MiB:.0f} MiB"


def marginal(series: dict[int, Sample | None]) -> float | None:
    """Host PSS added per extra VM: the slope of a least-squares line through (N, PSS)."""
    points = [(n, s.pss) for n, s in series.items() if s is not None]
    if len(points) < 2:
        return None
    return statistics.linear_regression([n for n, _ in points], [p for _, p in points]).slope


def plot(path: Path, lean_off: dict, lean_on: dict, pxe: dict) -> str:
    try:
        import matplotlib
    except ImportError:
        return "not drawn: matplotlib missing (pip install -e '.[bench]')"
    matplotlib.use("Agg")
    from matplotlib import pyplot

    figure, axes = pyplot.subplots(figsize=(6, 4))
    for label, series, style in (("leanvm, KSM off", lean_off, "o-"), ("leanvm, KSM on", lean_on, "s-"),
                                 ("PXE-style, KSM off", pxe, "^--")):
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
