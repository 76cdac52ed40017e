"""A tiny run of the benchmark script: it must run end to end and print its table (no timings asserted)."""

import os
import re
import sys
from pathlib import Path

import pytest
from support import PROJECT, run


@pytest.mark.slow  # ~70 s: in CI's slow run (the main suite stays under its 10 minutes)
@pytest.mark.vm  # boots the mini release through the bench
def test_bench_smoke_prints_every_section(tmp_path: Path):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # run as a user runs it
    result = run([sys.executable, str(PROJECT / "bench" / "run.py"), "--smoke", "--work", str(tmp_path)],
                 capture_output=True, text=True, timeout=480, env=env)
    assert result.returncode == 0, result.stderr
    rows = [line for line in result.stdout.splitlines() if line.startswith("| ") and not line.startswith("| # |")]
    sections = {row.split("|")[1].strip() for row in rows}
    assert sections == {"1 extract", "2 download", "3 no-op", "4 add VM", "5 disk", "9 memory", "10 restore"}
    assert "| 4 add VM | adding VM 4: tasks executed | 6: its configdrive, launcher, rootfs; 3 other" in result.stdout
    # goals that are counts do not depend on the machine's speed: they must hold even here
    counted = [row for row in rows if "tasks executed" in row or "bytes re-sent" in row]
    assert len(counted) == 2
    for row in counted:
        assert row.rstrip(" |").endswith("yes"), row

    # the memory section measured real QEMUs (one lean VM, one PXE-style VM) and drew the plot
    cells = {row.split(" | ")[1]: row.split(" | ")[2:] for row in rows if row.startswith("| 9 memory")}
    lean, pxe = cells["1 idle VM(s): per VM PSS / RSS, KSM off; KSM on"][:2]
    ksm = r"\d+ / \d+ MiB" if os.access("/sys/kernel/mm/ksm/run", os.W_OK) else "-"
    assert re.fullmatch(rf"\d+ / \d+ MiB; {ksm}", lean), lean
    assert re.fullmatch(r"\d+ / \d+ MiB \(PXE-style, KSM off\)", pxe), pxe
    for pss, rss in re.findall(r"(\d+) / (\d+) MiB", lean + pxe):
        assert 64 <= int(pss) <= int(rss) <= 1024, (lean, pxe)  # a 256 MiB guest and its QEMU
    breakdown = next(what for what in cells if what.startswith("one idle VM, host PSS:"))
    parts = dict(part.rsplit(" ", 2)[:2] for part in breakdown.removeprefix("one idle VM, host PSS: ").split(", "))
    assert set(parts) == {"guest RAM on the host", "TCG code cache", "rest of QEMU", "guest: used",
                          "guest: page cache", "guest: free"}, breakdown
    assert int(parts["guest RAM on the host"]) > 0 and int(parts["guest: free"]) > 0, breakdown
    plot = Path(cells["plot: host memory against the number of VMs"][0])
    assert plot == tmp_path / "memory.png"
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
