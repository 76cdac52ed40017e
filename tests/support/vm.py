"""Building, booting and watching VMs: console markers, QEMU processes, the printed command line."""

import json
import os
import re
import shlex
import subprocess
import time
from pathlib import Path

import yaml

from .doit import doit
from .procs import processes, run, sh

BOOT_TIMEOUT = 90
ENV = {**os.environ, "LEANVM_ACCEL": "tcg"}  # TCG: guests hang under nested KVM here
QUIT = b"\x01cquit\n"  # -nographic: Ctrl-a c switches stdio to the monitor


def usr_partition(usr_img: Path) -> bytes:
    """The bytes of usr.img's one partition, found through its GPT (read by sfdisk)."""
    (part,) = json.loads(sh("sfdisk", "--json", usr_img))["partitiontable"]["partitions"]
    with open(usr_img, "rb") as f:
        f.seek(part["start"] * 512)
        return f.read(part["size"] * 512)


def switch_processes(out: Path) -> list[int]:
    return processes(lambda cmd: cmd.startswith(b"vde_switch") and str(out / "net").encode() in cmd)


def printed(run_sh: Path, env: dict | None = None) -> list[str]:
    """The QEMU argv that `run.sh --print` shows (after its comment, `mkdir -p DIR && cd DIR &&`
    and the start of the cluster switch)."""
    out = subprocess.run([str(run_sh), "--print"], capture_output=True, text=True, check=True,
                         env={**os.environ, **(env or {})})
    words = shlex.split(out.stdout, comments=True)
    assert words[:2] == ["mkdir", "-p"] and words[3:5] == ["&&", "cd"] and words[6] == "&&", words
    last = len(words) - 1 - words[::-1].index("&&")
    return words[last + 1:]


def paths_in(argv: list[str]) -> list[Path]:
    paths = []
    for flag, value in zip(argv, argv[1:], strict=False):
        if flag in ("-kernel", "-initrd", "-pidfile"):
            paths.append(Path(value))
        for key in ("file", "path"):
            match = re.search(rf"(?:^|,){key}=((?:[^,]|,,)+)", value)
            if match and flag == "-drive":
                paths.append(Path(match.group(1).replace(",,", ",")))
    return paths


def qemu_pids(out: Path) -> list[int]:
    """QEMUs and switches of `out` still running."""
    return processes(lambda cmd: str(out).encode() in cmd and (b"qemu-system" in cmd or b"vde_switch" in cmd))


def wait_for_text(path: Path, text: str, timeout: float = BOOT_TIMEOUT, proc: subprocess.Popen | None = None) -> str:
    """The file's text once it holds `text`; fails early if `proc` (the VM's launcher) ended
    or the guest's kernel panicked."""
    deadline = time.monotonic() + timeout
    content = ""
    while time.monotonic() < deadline:
        content = path.read_text(errors="replace") if path.exists() else ""
        if text in content:
            return content
        assert proc is None or proc.poll() is None, content[-3000:]
        assert "Kernel panic" not in content, f"{path}: the guest's kernel panicked:\n{content[-3000:]}"
        time.sleep(0.2)
    raise AssertionError(f"{text!r} not in {path}:\n{content[-3000:]}")


def process_memory(pid: int, field: str) -> int:
    """Bytes of process `pid`'s memory by /proc/PID/smaps_rollup's `field` (Rss, Pss, ...)."""
    text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    match = re.search(rf"^{field}:\s+(\d+) kB", text, re.M)
    assert match, f"no {field} in /proc/{pid}/smaps_rollup"
    return int(match.group(1)) * 1024


def build_cluster(root: Path, profile: Path, vms: dict, **extra: object) -> Path:
    """A cluster file (small VMs, plus alpha.yaml user_data beside it) built by doit into root/out."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "alpha.yaml").write_text("#cloud-config\nhostname: alpha-from-user-data\n")
    cluster = {"release": str(profile), "defaults": {"memory": 256, "disk": "128M"}, "vms": vms, **extra}
    (root / "cluster.yaml").write_text(yaml.safe_dump(cluster))
    result = doit(f"config={root / 'cluster.yaml'}", f"out={root / 'out'}")
    assert result.returncode == 0, result.stderr
    return root / "out"


def copy_cluster(out: Path, root: Path) -> Path:
    """A copy, at root, of the directory holding out/ and its cluster file (sparse, with the
    out/'s record of its cluster file moved along); the copy's out/."""
    sh("cp", "-a", "--sparse=always", "--reflink=auto", out.parent, root)
    (root / "out" / "state" / "cluster-file").write_text(str(root / "cluster.yaml"))
    return root / "out"


def boot(run_sh: Path, append: str = "") -> str:
    """Boot to power-off; the serial console text."""
    proc = run([run_sh], stdin=subprocess.DEVNULL, capture_output=True, timeout=BOOT_TIMEOUT,
               env={**ENV, "LEANVM_APPEND": append})
    console = proc.stdout.decode(errors="replace")
    assert proc.returncode == 0, console[-2000:] + proc.stderr.decode()
    assert "leanvm: ready" in console, console[-3000:]
    return console


def marker(console: str, name: str) -> str:
    match = re.search(rf"^leanvm: {name}: (.*?)\r?$", console, re.M)
    assert match, f"no '{name}' marker in:\n{console[-3000:]}"
    return match.group(1)


HOLD = {**ENV, "LEANVM_APPEND": "leanvm.hold", "LEANVM_STOP_TIMEOUT": "60"}  # VMs that stay up for ssh


def cluster_sh(out: Path, *args: str, env: dict = HOLD, timeout: float = 400) -> subprocess.CompletedProcess:
    """out/cluster.sh ARGS, with the mini release's VMs held up (leanvm.hold)."""
    return run([out / "cluster.sh", *args], capture_output=True, text=True, env=env, stdin=subprocess.DEVNULL,
               timeout=timeout)


def on_vm(out: Path, vm: str, command: str) -> str:
    """What `command` prints, run in VM `vm` over `cluster.sh ssh`."""
    result = cluster_sh(out, "ssh", vm, "--", command)
    assert result.returncode == 0, result.stderr
    return result.stdout
