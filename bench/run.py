#!/usr/bin/env python3
"""leanvm against what users would do instead: every figure a ratio or a count against a
baseline measured in the same run (median of several repetitions).

    .venv/bin/python bench/run.py          # full run (a few minutes)
    .venv/bin/python bench/run.py --smoke  # tiny sizes, one repetition (CI)

It uses the developer tools beside the package (pipeline/leanvm_dev: the mini release) and
the tests' support package (tests/support: the signed mirror, the doit runner), found
beside this file.
"""

import argparse
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import blake3
import yaml
from isal import igzip_threaded

# leanvm_dev (the mini release) and the tests' support package live beside the package, not
# in it: found here, so that `.venv/bin/python bench/run.py` runs as it is
sys.path[:0] = [str(Path(__file__).resolve().parent.parent / d) for d in ("pipeline", "tests")]

import membench
from leanvm.arch import Arch
from leanvm.proc import stop_gpg_agent
from leanvm.release import fetch
from leanvm.release.extract import extract_usr_disk
from leanvm_dev import minirelease
from support import DOIT_CWD, Keyring, Mirror, doit_argv, make_cpio_gz, make_squashfs, run, serve
from vmrun import accel_env, cluster_sh, down, qemu_rss, wait_console

HERE = Path(__file__).resolve().parent
PROJECT = HERE.parent

MiB = 1 << 20


@dataclass(frozen=True)
class Sizes:
    reps: int
    extract_mb: int
    noop_mb: tuple[int, int]
    vms: int
    boot_pad_mb: int  # 0: skip the boot benchmarks (6, 7, 8)
    scale: tuple[int, ...] = ()  # cluster sizes for the scale benchmark
    memory: tuple[int, ...] = ()  # cluster sizes for the memory benchmark
    settle_s: float = 15  # how long free page reporting gets to hand freed memory back
    capped_tcg_cache: bool = True  # section 9 also with LEANVM_TCG_CACHE=TCG_CACHE_MIB
    restore: tuple[int, ...] = ()  # cluster sizes for the restore benchmark
    restore_reps: int = 3


FULL = Sizes(reps=5, extract_mb=300, noop_mb=(100, 1000), vms=10, boot_pad_mb=150, scale=(1, 2, 4, 8),
             memory=(1, 2, 4, 8), restore=(1, 3))
SMOKE = Sizes(reps=1, extract_mb=8, noop_mb=(4, 16), vms=3, boot_pad_mb=0, scale=(), memory=(1,), settle_s=3,
              capped_tcg_cache=False, restore=(1,), restore_reps=1)


@dataclass
class Row:
    section: str
    what: str
    value: str
    baseline: str
    ratio: str
    goal: str = ""
    met: str = ""


SPREAD = 0.10  # repeat until the middle half of the times lies within 10% of the median


def median_seconds(action: Callable[[], object], reps: int) -> float:
    """The median time of `action`: `reps` runs, and more (up to 3x) while the spread of the
    middle half is above SPREAD, since one noisy run moves a small sample a lot."""
    times: list[float] = []
    while len(times) < reps or (len(times) < 3 * reps and spread(times) > SPREAD):
        start = time.perf_counter()
        action()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def spread(times: list[float]) -> float:
    if len(times) < 4:
        return 0.0
    quartiles = statistics.quantiles(times, n=4)
    return (quartiles[2] - quartiles[0]) / statistics.median(times)


def sh(cmd: str) -> None:
    subprocess.run(["sh", "-c", cmd], check=True)


def doit(cluster: Path, out: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(doit_argv(*args, f"config={cluster}", f"out={out}"), cwd=DOIT_CWD, capture_output=True,
                          text=True, check=True)


def verdict(ok: bool) -> str:
    return "yes" if ok else "NO"


# --- 1. extraction -------------------------------------------------------------------

def decode_only(image: Path) -> None:
    with igzip_threaded.open(image, "rb", threads=1, block_size=MiB) as f:
        while f.read(MiB):
            pass


def hash_only(path: Path) -> None:
    """BLAKE3 on one thread, block by block, as extraction hashes what it writes."""
    digest = blake3.blake3()
    with open(path, "rb") as f:
        while block := f.read(MiB):
            digest.update(block)


def write_only(dest: Path, size: int) -> None:
    """Write `size` bytes and fsync them, as extraction writes the partition."""
    block = os.urandom(MiB)
    with open(dest, "wb") as f:
        for _ in range(size // MiB):
            f.write(block)
        f.flush()
        os.fsync(f.fileno())


def bench_extract(work: Path, sizes: Sizes) -> list[Row]:
    image = work / "extract" / "image.cpio.gz"
    image.parent.mkdir(parents=True, exist_ok=True)
    if not image.exists():
        squash = make_squashfs(image.parent / "usr.squashfs", sizes.extract_mb * MiB)
        make_cpio_gz(image, {"usr.squashfs": squash})
        squash.unlink()
    out, scratch = image.parent / "extracted", image.parent / "scratch"
    q = f"'{image}'"
    t = {
        "leanvm": median_seconds(lambda: extract_usr_disk(image, "usr.squashfs", out), sizes.reps),
        "zlib": median_seconds(lambda: extract_usr_disk(image, "usr.squashfs", out, decoder="libarchive"),
                               sizes.reps),
        "zcat | cpio": median_seconds(lambda: sh(f"zcat {q} | cpio -i --quiet --to-stdout usr.squashfs > '{out}'"),
                                      sizes.reps),
        "pigz -dc | cpio": median_seconds(
            lambda: sh(f"pigz -dc {q} | cpio -i --quiet --to-stdout usr.squashfs > '{out}'"), sizes.reps),
    }
    extract_usr_disk(image, "usr.squashfs", out)
    parts = {"decode (ISA-L)": median_seconds(lambda: decode_only(image), sizes.reps),
             "blake3": median_seconds(lambda: hash_only(out), sizes.reps),
             "write + fsync": median_seconds(lambda: write_only(scratch, out.stat().st_size), sizes.reps)}
    scratch.unlink()
    slowest = max(parts, key=lambda name: parts[name])
    base, ours = t["zcat | cpio"], t["leanvm"]
    mb = image.stat().st_size / MiB
    return [
        Row("1 extract", f"leanvm extract ({mb:.0f} MiB image; ISA-L, threads)", f"{ours:.2f} s", f"{base:.2f} s",
            f"{ours / base:.2f}x", "<= 0.15x zcat|cpio", verdict(ours <= 0.15 * base)),
        Row("1 extract", f"leanvm vs its slowest part alone ({slowest}; "
            + ", ".join(f"{name} {sec:.2f} s" for name, sec in parts.items()) + ")",
            f"{ours:.2f} s", f"{parts[slowest]:.2f} s", f"{ours / parts[slowest]:.2f}x", "<= 1.2x",
            verdict(ours <= 1.2 * parts[slowest])),
        Row("1 extract", "leanvm with zlib (libarchive's own gzip filter)", f"{t['zlib']:.2f} s", f"{base:.2f} s",
            f"{t['zlib'] / base:.2f}x"),
        Row("1 extract", "pigz -dc | cpio", f"{t['pigz -dc | cpio']:.2f} s", f"{base:.2f} s",
            f"{t['pigz -dc | cpio'] / base:.2f}x"),
    ]


# --- 2. download ---------------------------------------------------------------------

def bench_download(work: Path, sizes: Sizes) -> list[Row]:
    image = work / "extract" / "image.cpio.gz"
    size = image.stat().st_size
    server = serve(image.parent)
    url, dest = server.url + image.name, work / "download" / "image.cpio.gz"
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        ours = median_seconds(lambda: fetch.download(url, dest), sizes.reps)
        curl = median_seconds(lambda: sh(f"curl -s -f -o '{dest}' '{url}'"), sizes.reps)
        server.bytes_served.clear()
        server.cut["/" + image.name] = size // 2
        fetch.download(url, dest)
        extra = server.served(image.name) - size
    finally:
        server.shutdown()
        server.server_close()
    assert dest.stat().st_size == size
    return [
        Row("2 download", f"leanvm throughput ({size / MiB:.0f} MiB, loopback)", f"{size / MiB / ours:.0f} MiB/s",
            f"{size / MiB / curl:.0f} MiB/s (curl -o)", f"{curl / ours:.2f}x", ">= 0.8x curl",
            verdict(curl / ours >= 0.8)),
        Row("2 download", "bytes re-sent after a cut at 50 %", f"{extra} B", f"{size} B file",
            f"{100 * extra / size:.2f} %", "< 5 %", verdict(extra < 0.05 * size)),
    ]


# --- 3, 4, 5. doit: no-op rebuild, adding a VM, disk use -------------------------------

def release_mirror(work: Path, usr_mb: int, keyring: Keyring, signer: str) -> Path:
    """A signed file:// mirror with a /usr of usr_mb MiB, and a profile for it."""
    root = work / f"release-{usr_mb}"
    if not (root / "profile.yaml").exists():
        shutil.rmtree(root, ignore_errors=True)
        Mirror(root / "mirror", keyring, signer).add_version("1.0.0", payload_size=usr_mb * MiB)
        key = keyring.export(root / "key.asc", signer)
        profile = {"base_url": (root / "mirror").as_uri() + "/", "version": "1.0.0", "kernel": "test_pxe.vmlinuz",
                   "image": "test_pxe_image.cpio.gz", "usr_member": "usr.squashfs", "signing_key": key.name,
                   "fingerprints": [signer], "kernel_args": "console=ttyS0"}
        (root / "profile.yaml").write_text(yaml.safe_dump(profile))
    return root / "profile.yaml"


def write_cluster(path: Path, profile: Path, names: list[str]) -> Path:
    doc = {"release": str(profile), "defaults": {"disk": "4G", "memory": 512}, "vms": {n: {} for n in names}}
    path.write_text(yaml.safe_dump(doc))
    return path


def du(path: Path) -> int:
    return int(subprocess.run(["du", "-s", "-B1", str(path)], capture_output=True, text=True, check=True)
               .stdout.split()[0])


def executed(result: subprocess.CompletedProcess) -> set[str]:
    return {line[3:] for line in result.stdout.splitlines() if line.startswith(".  ")}


def bench_doit(work: Path, sizes: Sizes) -> list[Row]:
    home = work / "gnupg"
    home.mkdir(mode=0o700, exist_ok=True)
    keyring = Keyring(home)
    signer = keyring.fingerprint("bench") if (home / "pubring.kbx").exists() else keyring.generate("bench")
    names = [f"vm{i:02d}" for i in range(1, sizes.vms + 1)]
    rows, noop = bench_noop(work, sizes, names, keyring, signer)
    profile = release_mirror(work, sizes.noop_mb[0], keyring, signer)
    rows += bench_add_vm(work, sizes, names, profile, noop)
    rows += bench_disk(work, names, profile)
    stop_gpg_agent(home)
    return rows


def bench_noop(work: Path, sizes: Sizes, names: list[str], keyring: Keyring, signer: str) -> tuple[list[Row], float]:
    """3. a no-op `doit` vs `doit list`, and with a bigger /usr; returns the small no-op time too."""
    rows, noop = [], {}
    for usr_mb in sizes.noop_mb:
        profile = release_mirror(work, usr_mb, keyring, signer)
        out = work / f"out-{usr_mb}"
        shutil.rmtree(out, ignore_errors=True)
        cluster = write_cluster(work / f"cluster-{usr_mb}.yaml", profile, names)
        doit(cluster, out)
        noop[usr_mb] = median_seconds(lambda c=cluster, o=out: doit(c, o), sizes.reps)
        listing = median_seconds(lambda c=cluster, o=out: doit(c, o, "list"), sizes.reps)
        rows.append(Row("3 no-op", f"no-op `doit`, {len(names)} VMs, {usr_mb} MiB /usr", f"{noop[usr_mb]:.2f} s",
                        f"{listing:.2f} s (doit list)", f"{noop[usr_mb] / listing:.2f}x", "<= 1.5x",
                        verdict(noop[usr_mb] <= 1.5 * listing)))
    small, big = sizes.noop_mb
    rows.append(Row("3 no-op", f"no-op time, {big} MiB vs {small} MiB /usr", f"{noop[big]:.2f} s",
                    f"{noop[small]:.2f} s", f"{noop[big] / noop[small]:.2f}x", "~1x (no re-hash)",
                    verdict(noop[big] <= 1.3 * noop[small])))
    return rows, noop[small]


def bench_add_vm(work: Path, sizes: Sizes, names: list[str], profile: Path, noop: float) -> list[Row]:
    """4. one more VM: which tasks run, and how long it takes."""
    small = sizes.noop_mb[0]
    out = work / f"out-{small}"
    add_times, ran = [], set()
    for rep in range(sizes.reps):
        doit(write_cluster(work / f"cluster-{small}.yaml", profile, names), out)  # back to the base cluster, untimed
        cluster = write_cluster(work / f"cluster-{small}.yaml", profile, [*names, f"extra{rep}"])
        start = time.perf_counter()
        result = doit(cluster, out)
        add_times.append(time.perf_counter() - start)
        ran = executed(result)
    add = statistics.median(add_times)
    own = {t for t in ran if t.endswith(f":extra{sizes.reps - 1}")}
    # its 3 tasks, plus the other VMs' config drives (their /etc/hosts now names it)
    expected = sorted(t.split(":")[0] for t in own) == ["configdrive", "launcher", "rootfs"] and all(
        t.startswith("configdrive:") for t in ran - own)
    return [Row("4 add VM", f"adding VM {len(names) + 1}: tasks executed",
                f"{len(ran)}: its {', '.join(sorted(t.split(':')[0] for t in own))}; "
                f"{len(ran - own)} other VMs' configdrive (/etc/hosts)",
                "3 + one config drive per other VM", "", "no other disk or launcher", verdict(expected)),
            Row("4 add VM", "adding a VM: wall time", f"{add:.2f} s", f"{noop:.2f} s (no-op)", f"{add / noop:.2f}x")]


def bench_disk(work: Path, names: list[str], profile: Path) -> list[Row]:
    """5. disk: leanvm out/ vs the 2016 starting point (own image per VM: two /usr copies + root)."""
    out = work / "out-disk"
    shutil.rmtree(out, ignore_errors=True)
    rows, usr_bytes, first, lean = [], 0, 0, 0
    for count in sorted({1, min(5, len(names)), len(names)}):
        doit(write_cluster(work / "cluster-disk.yaml", profile, names[:count]), out)
        usr = next(out.glob("images/*/*/usr.img"))
        usr_bytes = du(usr)
        lean = du(out)
        baseline = work / "baseline-2016"
        shutil.rmtree(baseline, ignore_errors=True)
        for name in names[:count]:
            (baseline / name).mkdir(parents=True)
            for copy in ("usr-a.img", "usr-b.img"):
                shutil.copyfile(usr, baseline / name / copy)
            sh(f"cp --sparse=always '{out}/vms/{name}/rootfs.img' '{baseline}/{name}/rootfs.img'")
        rows.append(Row("5 disk", f"du of out/ with {count} VM(s)", f"{lean / MiB:.1f} MiB",
                        f"{du(baseline) / MiB:.1f} MiB (2016 layout)", f"{du(baseline) / lean:.1f}x smaller"))
        first = first or lean
    marginal = (lean - first) / max(len(names) - 1, 1)
    rows.append(Row("5 disk", "marginal bytes per extra VM", f"{marginal / MiB:.2f} MiB",
                    f"{(2 * usr_bytes) / MiB:.1f} MiB (/usr twice)", f"{marginal / (2 * usr_bytes):.4f}x"))
    shutil.rmtree(work / "baseline-2016", ignore_errors=True)
    return rows


# --- 6. boot: squashfs disk vs PXE-style /usr in RAM ----------------------------------

MEASURE = """
import resource, subprocess, sys, time
start = time.monotonic(); mark = None
p = subprocess.Popen(sys.argv[1:], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE)
for line in p.stdout:
    if mark is None and b"leanvm: usr mounted" in line:
        mark = time.monotonic() - start
p.wait()
print(mark, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024)
"""


def pxe_args(out: Path, mini: Path, append: str = "") -> list[str]:
    """run.sh's extra QEMU arguments for a PXE-style boot: the image (usr.squashfs) appended
    to the initrd, and the kernel arguments that loop-mount it from RAM (plus `append`)."""
    images = next(p for p in out.glob("images/mini/*") if p.is_dir())  # not the .current-version record
    initrd = out / "pxe.initrd"
    image = next((mini / "mirror").glob(f"*/{minirelease.IMAGE}"))
    initrd.write_bytes((images / "initrd").read_bytes() + image.read_bytes())
    return ["-initrd", str(initrd), "-append", "mount.usr=/usr.squashfs mount.usrfstype=squashfs "
            f"mount.usrflags=ro root=LABEL=ROOT rootflags=rw console=ttyS0 {append}".rstrip()]


def boot_once(argv: list[str]) -> tuple[float, int]:
    out = run([sys.executable, "-c", MEASURE, *argv], capture_output=True, text=True, env=accel_env(),
              timeout=600, check=True).stdout.split()
    if out[0] == "None":
        raise RuntimeError(f"{argv[0]} never printed the 'usr mounted' marker")
    return float(out[0]), int(out[1])


def bench_boot(work: Path, sizes: Sizes) -> tuple[list[Row], int, float]:
    """The rows, the PXE-style boot's peak RSS and leanvm's boot time (for the later sections)."""
    mini = minirelease.build(work / "mini", pad_mb=sizes.boot_pad_mb)
    cluster = work / "boot.yaml"
    cluster.write_text(yaml.safe_dump({"release": str(mini / "mini.yaml"),
                                       "defaults": {"memory": 1024, "disk": "1G"}, "vms": {"boot": {}}}))
    out = work / "out-boot"
    doit(cluster, out)
    run_sh = out / "vms" / "boot" / "run.sh"
    images = next(p for p in out.glob("images/mini/*") if p.is_dir())  # not the .current-version record
    usr_size = (images / "usr.img").stat().st_size
    pxe_style = pxe_args(out, mini)
    lean, pxe = [], []
    for _ in range(max(sizes.reps - 2, 1)):
        lean.append(boot_once([str(run_sh)]))
        pxe.append(boot_once([str(run_sh), *pxe_style]))
    lean_t, pxe_t = statistics.median(t for t, _ in lean), statistics.median(t for t, _ in pxe)
    lean_rss, pxe_rss = statistics.median(r for _, r in lean), statistics.median(r for _, r in pxe)
    return [
        Row("6 boot", f"time to 'usr mounted' (TCG, /usr {usr_size / MiB:.0f} MiB)", f"{lean_t:.1f} s",
            f"{pxe_t:.1f} s (PXE-style)", f"{lean_t / pxe_t:.2f}x", "no slower", verdict(lean_t <= pxe_t * 1.05)),
        Row("6 boot", "QEMU peak RSS", f"{lean_rss / MiB:.0f} MiB", f"{pxe_rss / MiB:.0f} MiB (PXE-style)",
            f"{lean_rss / pxe_rss:.2f}x", f"lower by >= /usr ({usr_size / MiB:.0f} MiB)",
            verdict(pxe_rss - lean_rss >= usr_size)),
    ], pxe_rss, lean_t


def bench_arm64(work: Path, sizes: Sizes, amd64_boot: float) -> list[Row]:
    """An arm64 guest on this host: emulated (TCG), so reported without a goal."""
    mini = minirelease.build(work / "mini", pad_mb=sizes.boot_pad_mb, arch=Arch.ARM64)
    cluster = work / "boot-arm64.yaml"
    cluster.write_text(yaml.safe_dump({"release": str(mini / "mini-arm64.yaml"),
                                       "defaults": {"memory": 1024, "disk": "1G"}, "vms": {"arm": {}}}))
    out = work / "out-boot-arm64"
    doit(cluster, out)
    times = [boot_once([str(out / "vms" / "arm" / "run.sh")])[0] for _ in range(max(sizes.reps - 2, 1))]
    arm = statistics.median(times)
    return [Row("6 boot", "arm64 guest: time to 'usr mounted' (TCG on x86: emulation)", f"{arm:.1f} s",
                f"{amd64_boot:.1f} s (amd64 guest)", f"{arm / amd64_boot:.2f}x", "reported", "-")]


def bench_vms(work: Path, sizes: Sizes) -> list[Row]:
    rows, pxe_rss, amd64_boot = bench_boot(work, sizes)
    return (rows + bench_arm64(work, sizes, amd64_boot) + bench_scale(work, sizes, pxe_rss)
            + bench_balloon(work, sizes, pxe_rss))


# --- 7. scale: N VMs up at once; 8. host RAM of an idle VM, with and without free page reporting ---

def up_until(out: Path, names: list[str], append: str, marker: str) -> float:
    """Seconds from `cluster.sh up` until every VM printed `marker`."""
    start = time.monotonic()
    cluster_sh(out, "up", LEANVM_APPEND=append)
    wait_console(out, marker, names)
    return time.monotonic() - start


def bench_scale(work: Path, sizes: Sizes, pxe_rss: int) -> list[Row]:
    mini = minirelease.build(work / "mini", pad_mb=sizes.boot_pad_mb)
    rows, rss, ready = [], {}, {}
    for count in sizes.scale:
        names = [f"n{i}" for i in range(1, count + 1)]
        cluster = work / f"scale-{count}.yaml"
        cluster.write_text(yaml.safe_dump({"release": str(mini / "mini.yaml"),
                                           "defaults": {"memory": 512, "disk": "1G"}, "vms": {n: {} for n in names}}))
        out = work / f"out-scale-{count}"
        shutil.rmtree(out, ignore_errors=True)
        doit(cluster, out)
        try:
            ready[count] = up_until(out, names, "leanvm.hold", "holding (leanvm.hold)")
            time.sleep(5)
            rss[count] = qemu_rss(out)
        finally:
            down(out)
        one = min(sizes.scale)
        rows.append(Row("7 scale", f"{count} VM(s) up at once: all ready / host RSS of all QEMUs",
                        f"{ready[count]:.1f} s / {rss[count] / MiB:.0f} MiB",
                        f"{ready[one]:.1f} s / {rss[one] / MiB:.0f} MiB ({one} VM)",
                        f"{ready[count] / ready[one]:.1f}x / {rss[count] / rss[one]:.1f}x"))
    low, high = min(sizes.scale), max(sizes.scale)
    marginal = (rss[high] - rss[low]) / (high - low)
    rows.append(Row("7 scale", f"marginal host RSS per extra VM ({low} -> {high} VMs)", f"{marginal / MiB:.0f} MiB",
                    f"{pxe_rss / MiB:.0f} MiB (one PXE-style VM, peak)", f"{marginal / pxe_rss:.2f}x"))
    return rows


def fill_and_drop(out: Path, balloon: str, settle_s: float) -> tuple[int, int, int]:
    """Host RSS of the VM while its page cache holds all of /usr and `settle_s` after the
    guest dropped it, and how much the guest had cached (bytes)."""
    try:
        cluster_sh(out, "up", LEANVM_APPEND="leanvm.hold leanvm.fillcache", LEANVM_BALLOON=balloon)
        wait_console(out, "cache filled")
        time.sleep(3)  # the guest holds its cache for 20 s
        full = qemu_rss(out)
        cached = int(re.search(r"cache filled: (\d+) kB", (out / "vms/idle/console.log").read_text()).group(1))
        wait_console(out, "holding (leanvm.hold)")
        time.sleep(settle_s)  # free page reporting batches its reports every few seconds
        return full, qemu_rss(out), cached * 1024
    finally:
        down(out)


def bench_balloon(work: Path, sizes: Sizes, pxe_rss: int) -> list[Row]:
    """An idle VM's host RAM before and after the guest read all of /usr and dropped its page cache."""
    mini = minirelease.build(work / "mini", pad_mb=sizes.boot_pad_mb)
    cluster = work / "balloon.yaml"
    cluster.write_text(yaml.safe_dump({"release": str(mini / "mini.yaml"),
                                       "defaults": {"memory": 1024, "disk": "1G"}, "vms": {"idle": {}}}))
    out = work / "out-balloon"
    shutil.rmtree(out, ignore_errors=True)
    doit(cluster, out)
    (full_off, off, _), (full_on, on, cached) = (fill_and_drop(out, b, sizes.settle_s) for b in ("off", "on"))
    return [
        Row("8 idle RAM", f"free page reporting on: host RSS with the guest's cache full ({cached / MiB:.0f} MiB)"
            " -> after the guest dropped it", f"{full_on / MiB:.0f} -> {on / MiB:.0f} MiB",
            f"{full_off / MiB:.0f} -> {off / MiB:.0f} MiB (off)", f"{on / full_on:.2f}x",
            "falls by >= half the cache", verdict(full_on - on >= cached / 2)),
        Row("8 idle RAM", "idle VM after filling and dropping its page cache, free page reporting on",
            f"{on / MiB:.0f} MiB", f"{off / MiB:.0f} MiB (off)", f"{on / off:.2f}x", "lower", verdict(on < off)),
        Row("8 idle RAM", "the same VM vs the PXE-style boot's peak", f"{on / MiB:.0f} MiB",
            f"{pxe_rss / MiB:.0f} MiB (PXE-style)", f"{on / pxe_rss:.2f}x"),
    ]


# --- 9. memory: N idle VMs' host memory as PSS, KSM off and on, PXE-style beside ------------

PLOT = HERE / "memory.png"
MEMORY_PAD_MB = 16  # /usr padded by 16 MiB: a PXE-style 256 MiB VM runs out of memory at 64
TCG_CACHE_MIB = 32  # the capped series (16 doubled the mini VM's boot time here, 32 did not)


def memory_out(work: Path, mini: Path, count: int, kind: str) -> Path:
    names = [f"{kind[0]}{i}" for i in range(1, count + 1)]
    config = work / f"memory-{kind}-{count}.yaml"
    config.write_text(yaml.safe_dump({"release": str(mini / "mini.yaml"), "vms": {n: {} for n in names},
                                      "defaults": {"memory": membench.MEMORY_MIB, "disk": "1G"}}))
    out = work / f"out-memory-{kind}-{count}"
    shutil.rmtree(out, ignore_errors=True)
    doit(config, out)
    return out


def bench_memory(work: Path, sizes: Sizes, plot_to: Path | None = None) -> list[Row]:
    mini = minirelease.build(work / f"mini-{MEMORY_PAD_MB}", pad_mb=MEMORY_PAD_MB)
    kinds = {"": {}, f", LEANVM_TCG_CACHE={TCG_CACHE_MIB}": {"LEANVM_TCG_CACHE": str(TCG_CACHE_MIB)}}
    if not sizes.capped_tcg_cache:
        del kinds[f", LEANVM_TCG_CACHE={TCG_CACHE_MIB}"]
    off, on = {k: {} for k in kinds}, {k: {} for k in kinds}
    pxe, parts = {}, {}
    for count in sizes.memory:
        for kind, env in kinds.items():
            out = memory_out(work, mini, count, "lean")
            off[kind][count], on[kind][count], found = membench.measure(out, None, sizes.settle_s, env)
            parts = parts or found  # the breakdown of the smallest cluster's first VM, QEMU's cache size
        out = memory_out(work, mini, count, "pxe")
        pxe[count], _, _ = membench.measure(out, pxe_args(out, mini, membench.APPEND), sizes.settle_s, {})
    slope_pxe = membench.marginal(pxe)
    rows = []
    for kind in kinds:
        rows += [Row("9 memory", f"{n} idle VM(s){kind}: per VM PSS / RSS, KSM off; KSM on",
                     membench.per_vm(off[kind][n]) + "; " + membench.per_vm(on[kind][n]),
                     membench.per_vm(pxe[n]) + " (PXE-style, KSM off)", f"{off[kind][n].pss / pxe[n].pss:.2f}x")
                 for n in sizes.memory]
    for kind in kinds:
        slope_on, slope_off = membench.marginal(on[kind]), membench.marginal(off[kind])
        shown = ["-" if v is None else f"{v / MiB:.0f} MiB" for v in (slope_on, slope_off, slope_pxe)]
        rows.append(Row("9 memory", f"marginal host PSS per extra idle VM{kind}, KSM on (KSM off)",
                        f"{shown[0]} ({shown[1]})", f"{shown[2]} (PXE-style, KSM off)",
                        "-" if slope_on is None else f"{slope_on / slope_pxe:.2f}x",
                        f"<= {membench.MEMORY_MIB // 2} MiB (TCG, KSM on)",
                        "-" if slope_on is None else verdict(slope_on <= membench.MEMORY_MIB // 2 * MiB)))
    if len(kinds) > 1:
        one, capped = min(sizes.memory), list(kinds)[1]
        default_s, capped_s = off[""][one].boot_s, off[capped][one].boot_s
        rows.append(Row("9 memory", f"{one} VM(s), first boot to caches dropped{capped} (cost of the smaller cache)",
                        f"{capped_s:.1f} s", f"{default_s:.1f} s (QEMU's cache)", f"{capped_s / default_s:.2f}x"))
    rows.append(Row("9 memory", "one idle VM, host PSS: " + ", ".join(f"{k} {v / MiB:.0f} MiB" for k, v in
                                                                   parts.items()), "", "", ""))
    lines = {**{f"leanvm{kind}, KSM {state}": series[kind] for kind in kinds
                for state, series in (("off", off), ("on", on))}, "PXE-style, KSM off": pxe}
    drawn = membench.plot(plot_to or work / "memory.png", lines)
    rows.append(Row("9 memory", "plot: host memory against the number of VMs", drawn, "", ""))
    return rows


# --- 10. restore: a ready cluster from a snapshot, against booting it ---------------------

RESTORE_RAM_MIB = 256


def guest_used(out: Path, name: str) -> int:
    """The RAM the guest uses, in bytes: its RAM less what its kernel counts free (MemFree).
    That is programs, page cache and the kernel, including what the kernel reserved at boot
    (its code, page tables: RAM that MemTotal leaves out)."""
    meminfo = cluster_sh(out, "ssh", name, "--", "cat /proc/meminfo")
    fields = {line.split(":")[0]: int(line.split()[1]) for line in meminfo.splitlines() if ":" in line}
    return RESTORE_RAM_MIB * MiB - fields["MemFree"] * 1024


def bench_restore(work: Path, sizes: Sizes) -> list[Row]:
    """For each cluster size, `restore_reps` rounds of: the VMs reset, a cold up --wait (a first
    boot, what a CI job without a snapshot pays), snapshot --stop, restore --wait, down; the
    medians."""
    mini = minirelease.build(work / f"mini-{MEMORY_PAD_MB}", pad_mb=MEMORY_PAD_MB)  # section 9's build
    hold = {"LEANVM_APPEND": "leanvm.hold", "LEANVM_STOP_TIMEOUT": "60"}
    rows = []
    for count in sizes.restore:
        names = [f"r{i}" for i in range(1, count + 1)]
        cluster = work / f"restore-{count}.yaml"
        cluster.write_text(yaml.safe_dump({"release": str(mini / "mini.yaml"),
                                           "defaults": {"memory": RESTORE_RAM_MIB, "disk": "1G"},
                                           "vms": {n: {} for n in names}}))
        out = work / f"out-restore-{count}"
        shutil.rmtree(out, ignore_errors=True)
        doit(cluster, out)
        cold, restored, saved, paused, size, used = [], [], [], [], 0, 0
        try:
            for _ in range(sizes.restore_reps):
                shutil.rmtree(out / "snapshots" / "ready", ignore_errors=True)
                doit(cluster, out, *(f"reset:{n}" for n in names))  # a first boot each time, as a CI job's
                start = time.monotonic()
                cluster_sh(out, "up", "--wait", **hold)
                cold.append(time.monotonic() - start)
                used = sum(guest_used(out, n) for n in names)
                start = time.monotonic()
                said = cluster_sh(out, "snapshot", "--stop", "ready", **hold)
                saved.append(time.monotonic() - start)
                paused.append(float(re.search(r"paused ([0-9.]+) s", said).group(1)))
                size = sum(du(out / "snapshots" / "ready" / n / "memory") for n in names)
                start = time.monotonic()
                cluster_sh(out, "restore", "--wait", "ready", **hold, LEANVM_ACCEL="auto")  # as users run it
                restored.append(time.monotonic() - start)
                cluster_sh(out, "down", **hold)
        finally:
            cluster_sh(out, "down", **hold)
        cold_s, restored_s = statistics.median(cold), statistics.median(restored)
        paused_s, saved_s = statistics.median(paused), statistics.median(saved)
        each = f"median of {len(restored)}; restore {min(restored):.1f}-{max(restored):.1f} s"
        rows += [
            Row("10 restore", f"{count} VM(s): restore --wait / cold up --wait ({each})", f"{restored_s:.1f} s",
                f"{cold_s:.1f} s", f"{restored_s / cold_s:.2f}x", "<= 0.1x", verdict(restored_s <= 0.1 * cold_s)),
            Row("10 restore", f"{count} VM(s): snapshot's memory per VM / guest's used RAM (RAM - MemFree)",
                f"{size / count / MiB:.0f} MiB", f"{used / count / MiB:.0f} MiB", f"{size / used:.2f}x", "<= 1.1x",
                verdict(size <= 1.1 * used)),
            Row("10 restore", f"{count} VM(s): snapshot --stop: the VMs paused, per VM", f"{paused_s / count:.1f} s",
                "-", "-", "<= 2 s", verdict(paused_s / count <= 2)),
            Row("10 restore", f"{count} VM(s): snapshot --stop: the whole command (BLAKE3 of every file), per VM",
                f"{saved_s / count:.1f} s", "-", "-"),
        ]
    return rows


def table(rows: list[Row]) -> str:
    lines = ["| # | measured | leanvm | baseline | ratio | goal | met |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        cells = [r.section, r.what, r.value, r.baseline, r.ratio, r.goal, r.met]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines)


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    mem = int(Path("/proc/meminfo").read_text().split()[1]) // (1 << 20)
    return f"{platform.node() or 'host'}: {os.cpu_count()} cores ({cpu}), {mem} GiB RAM, {platform.platform()}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, one repetition")
    parser.add_argument("--work", type=Path, default=HERE / "work", help="scratch directory (several GB)")
    parser.add_argument("--skip", default="",
                        help="comma-separated sections to skip: extract,download,doit,boot,memory,restore")
    parser.add_argument("--publish", action="store_true",
                        help="also write the table into README.md and bench/RESULTS.md (between their markers)")
    args = parser.parse_args()
    sizes = SMOKE if args.smoke else FULL
    args.work.mkdir(parents=True, exist_ok=True)
    skip = set(filter(None, args.skip.split(",")))
    rows: list[Row] = []
    sections = [("extract", bench_extract), ("download", bench_download), ("doit", bench_doit), ("boot", bench_vms),
                ("memory", lambda work, sizes: bench_memory(work, sizes, PLOT if args.publish else None)),
                ("restore", bench_restore)]
    for name, bench in sections:
        if name in skip or (name == "download" and "extract" in skip) or (name == "boot" and not sizes.boot_pad_mb) \
                or (name == "memory" and not sizes.memory) or (name == "restore" and not sizes.restore):
            continue
        print(f"bench: {name} ...", file=sys.stderr)
        rows += bench(args.work, sizes)
    head = (f"Run on {time.strftime('%Y-%m-%d')}. Machine: {machine()}. "
            f"Repetitions: {sizes.reps} (median; section 10: {sizes.restore_reps}).")
    # the memory section has a table of its own, published on its own (it takes long to run)
    for marker, part in (("bench", [r for r in rows if r.section != "9 memory"]),
                         ("bench memory", [r for r in rows if r.section == "9 memory"])):
        if not part:
            continue
        print(f"{head}\n\n{table(part)}")
        if args.publish:
            for path in (HERE.parent / "README.md", HERE / "RESULTS.md"):
                publish(path, head, part, marker)
    return 0


def section_number(line: str) -> int:
    return int(line.split("|")[1].split()[0])


HEAD = re.compile(r"^Sections ([0-9, ]+): (Run on .*)$")


def publish(path: Path, head: str, rows: list[Row], marker: str) -> None:
    """Write `rows` into the table between `marker`'s begin and end comments in `path`: the
    rows of the sections this run measured replace those there, the other sections' rows stay
    (each section's figures come from one run; one head line per run says which sections it
    measured, when and where)."""
    begin, end = f"<!-- {marker}: generated by bench/run.py --publish -->", f"<!-- {marker}: end -->"
    text = path.read_text()
    start, stop = text.index(begin) + len(begin), text.index(end)
    old = text[start:stop].strip().splitlines()
    ran = {int(r.section.split()[0]) for r in rows}
    kept = [line for line in old if line.startswith("| ") and not line.startswith("| # |") and not
            line.startswith("|---") and section_number(line) not in ran]
    heads = [(sorted(ran), head)]
    for line in old:
        if match := HEAD.match(line):
            left = [n for n in map(int, match.group(1).split(", ")) if n not in ran]
            if left:
                heads.append((left, match.group(2)))
    said = "\n\n".join(f"Sections {', '.join(map(str, numbers))}: {run}" for numbers, run in sorted(heads))
    lines = table(rows).splitlines()
    body = sorted(kept + lines[2:], key=section_number)
    path.write_text(f"{text[:start]}\n{said}\n\n" + "\n".join(lines[:2] + body) + f"\n{text[stop:]}")


if __name__ == "__main__":
    sys.exit(main())
