"""Kernel modules: which module files a set of modules needs, in load order (as mkosi's kmod.py)."""

from collections.abc import Iterable
from pathlib import Path

from leanvm.errors import LeanvmError


def keep_only(modules: Path, needed: list[str]) -> None:
    keep = {modules / m for m in needed}
    for ko in modules.rglob("*.ko*"):
        if ko not in keep:
            ko.unlink()


def _module_name(path: str) -> str:
    return Path(path).name.split(".ko")[0].replace("-", "_")


def _read_deps(modules: Path) -> dict[str, tuple[str, list[str]]]:
    """modules.dep: module name -> (its file, the modules it depends on)."""
    deps: dict[str, tuple[str, list[str]]] = {}
    for line in (modules / "modules.dep").read_text().splitlines():
        path, _, rest = line.partition(":")
        deps[_module_name(path)] = (path, [_module_name(p) for p in rest.split()])
    return deps


def _read_softdeps(modules: Path) -> dict[str, list[str]]:
    """modules.softdep's `pre:` lists, each name resolved through modules.alias."""
    aliases: dict[str, list[str]] = {}
    for line in (modules / "modules.alias").read_text().splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[0] == "alias":
            aliases.setdefault(parts[1], []).append(parts[2].replace("-", "_"))
    softdeps: dict[str, list[str]] = {}
    softdep_file = modules / "modules.softdep"
    for line in softdep_file.read_text().splitlines() if softdep_file.exists() else []:
        words = line.split()
        if len(words) > 3 and words[0] == "softdep" and "pre:" in words:
            pre = words[words.index("pre:") + 1:]
            pre = pre[: pre.index("post:")] if "post:" in pre else pre
            softdeps[words[1].replace("-", "_")] = [m for name in pre for m in aliases.get(name, [name])]
    return softdeps


def resolve_modules(modules: Path, wanted: Iterable[str]) -> list[str]:
    """Module files (relative to `modules`) in load order: dependencies first.

    Follows modules.dep, and the `pre:` soft dependencies of modules.softdep through
    modules.alias (ext4 needs crc32c that way). Built-in modules need no file.
    """
    deps, softdeps = _read_deps(modules), _read_softdeps(modules)
    builtin = {_module_name(p) for p in (modules / "modules.builtin").read_text().split()}
    order: list[str] = []

    def visit(name: str, trail: tuple[str, ...]) -> None:
        name = name.replace("-", "_")
        if name in builtin or deps.get(name, ("",))[0] in order or name in trail:
            return
        if name not in deps:
            raise LeanvmError(f"{modules}: no module {name}", "the kernel package lacks it")
        for dep in softdeps.get(name, []) + deps[name][1]:
            if dep in deps or dep in builtin:
                visit(dep, (*trail, name))
        order.append(deps[name][0])

    for name in wanted:
        visit(name, ())
    return order
