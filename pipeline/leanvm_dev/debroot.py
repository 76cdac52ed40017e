"""Debian binaries for the mini release, of the host's arch or another one.

For the host's arch the parts are the host's own files (root `/`). For another arch (arm64
on an x86 host) they are Debian's packages of that arch, downloaded with apt (after
`dpkg --add-architecture`) and unpacked into a root of their own, with the shared libraries
they need. Either way the libraries a binary loads are found by reading its ELF headers
(readelf), not by running it: a foreign binary cannot run here.
"""

import os
import shutil
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from leanvm import host
from leanvm.arch import Arch
from leanvm.errors import LeanvmError
from leanvm.proc import run

TRIPLETS = {Arch.AMD64: "x86_64-linux-gnu", Arch.ARM64: "aarch64-linux-gnu"}


@dataclass(frozen=True)
class Root:
    """Where a release's binaries come from: `/` or an unpacked set of Debian packages."""

    path: Path
    arch: Arch

    @property
    def triplet(self) -> str:
        return TRIPLETS[self.arch]

    def file(self, path: Path) -> Path:
        """`path` (absolute, as on a Debian system) inside this root."""
        return self.path / path.relative_to("/")


@cache
def host_arch() -> Arch:
    """This host's arch, as leanvm.host names it (the rule run.sh uses)."""
    return Arch(host.host_arch())


def apt_name(package: str, arch: Arch) -> str:
    return package if arch is host_arch() else f"{package}:{arch}"


def add_architecture(arch: Arch) -> None:
    """Let apt download packages of `arch` (dpkg --add-architecture, then apt-get update)."""
    if arch is host_arch():
        return
    known = run(["dpkg", "--print-foreign-architectures"]).stdout.decode().split()
    if arch.value not in known:
        run(["dpkg", "--add-architecture", arch.value])
        run(["apt-get", "update", "-q"])


def _library_dependencies(package: str, arch: Arch) -> list[str]:
    """The library packages (libfoo, zlib1g) `package` depends on (the first of each alternative)."""
    out = run(["apt-cache", "depends", "--important", apt_name(package, arch)]).stdout.decode()
    found = []
    for line in out.splitlines():
        words = line.strip().removeprefix("|").split()
        if len(words) == 2 and words[0] in ("Depends:", "PreDepends:"):
            name = words[1].split(":")[0]
            if "lib" in name and not name.startswith("<"):
                found.append(name)
    return found


def with_libraries(packages: list[str], arch: Arch) -> list[str]:
    """`packages` and, recursively, the library packages they depend on."""
    seen: list[str] = []
    todo = list(packages)
    while todo:
        package = todo.pop()
        if package not in seen:
            seen.append(package)
            todo.extend(_library_dependencies(package, arch))
    return sorted(seen)


def unpacked(packages: list[str], arch: Arch, cache: Path) -> Root:
    """A root holding `packages` of `arch` and their libraries (made once per package set)."""
    if arch is host_arch():
        return Root(Path("/"), arch)
    add_architecture(arch)
    wanted = with_libraries(packages, arch)
    done = cache / "root.ready"
    if not done.exists() or done.read_text().split() != wanted:
        shutil.rmtree(cache, ignore_errors=True)
        (cache / "deb").mkdir(parents=True)
        run(["apt-get", "download", *(apt_name(p, arch) for p in wanted)], cwd=cache / "deb")
        for deb in sorted((cache / "deb").glob("*.deb")):
            run(["dpkg-deb", "-x", deb, cache / "root"])
        shutil.rmtree(cache / "deb")
        done.write_text("\n".join(wanted) + "\n")
    return Root(cache / "root", arch)


# --- shared libraries, from the ELF headers -------------------------------------------

def _elf_needs(binary: Path) -> tuple[str | None, list[str]]:
    """The program interpreter and the NEEDED sonames of an ELF file."""
    text = run(["readelf", "--wide", "--program-headers", "--dynamic", binary]).stdout.decode()
    interpreter = None
    needed = []
    for line in text.splitlines():
        if "Requesting program interpreter:" in line:
            interpreter = line.split(":", 1)[1].strip().rstrip("]").strip()
        elif "(NEEDED)" in line:
            needed.append(line.split("[", 1)[1].rstrip("]"))
    return interpreter, needed


def real_path(root: Root, path: Path) -> Path:
    """`path` inside `root` with its symlinks followed inside the root (an absolute link
    target is the root's, not the host's)."""
    for _ in range(40):
        if not path.is_symlink():
            return path
        target = Path(os.readlink(path))
        path = root.file(target) if target.is_absolute() else path.parent / target
    raise LeanvmError(f"{path}: too many levels of symbolic links", "check the unpacked packages")


def _find_library(root: Root, soname: str) -> Path:
    for directory in (f"lib/{root.triplet}", f"usr/lib/{root.triplet}", "lib", "usr/lib"):
        candidate = root.path / directory / soname
        if candidate.exists() or candidate.is_symlink():
            return candidate
    raise LeanvmError(f"{soname}: not found in {root.path}", "add the package that holds it")


def shared_libraries(root: Root, binary: Path) -> dict[str, Path]:
    """Every shared library `binary` loads, directly or not, and its dynamic loader: the place
    each goes in a tree (the loader where the binary asks for it, the rest in lib/TRIPLET),
    mapped to its real file in `root`. A static binary needs none."""
    interpreter, todo = _elf_needs(binary)
    found: dict[str, Path] = {}
    if interpreter:
        found[interpreter.lstrip("/")] = real_path(root, root.file(Path(interpreter)))
    while todo:
        soname = todo.pop()
        place = f"lib/{root.triplet}/{soname}"
        if place in found:
            continue
        library = real_path(root, _find_library(root, soname))
        found[place] = library
        todo.extend(_elf_needs(library)[1])
    return found
