"""A tiny run of the benchmark script: it must run end to end and print its table (no timings asserted)."""

import os
import sys
from pathlib import Path

from support import PROJECT, run


def test_bench_smoke_prints_every_section(tmp_path: Path):
    env = {**os.environ, "PYTHONPATH": f"{PROJECT / 'pipeline'}:{PROJECT / 'tests'}"}  # as bench/run.py says
    result = run([sys.executable, str(PROJECT / "bench" / "run.py"), "--smoke", "--work", str(tmp_path)],
                 capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr
    rows = [line for line in result.stdout.splitlines() if line.startswith("| ") and "---" not in line]
    sections = {row.split("|")[1].strip() for row in rows[1:]}
    assert sections == {"1 extract", "2 download", "3 no-op", "4 add VM", "5 disk"}
    assert "| 4 add VM | adding VM 4: tasks executed | 6: its configdrive, launcher, rootfs; 3 other" in result.stdout
    # goals that are counts do not depend on the machine's speed: they must hold even here
    counted = [row for row in rows if "tasks executed" in row or "bytes re-sent" in row]
    assert len(counted) == 2
    for row in counted:
        assert row.rstrip(" |").endswith("yes"), row
