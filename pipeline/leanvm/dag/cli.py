"""The `leanvm` command: leanvm's doit DAG, usable from any directory.

`leanvm [DOIT ARGS...]` is `doit` with leanvm's tasks; `leanvm libvirt VERB...` (define, start,
stop, status, undefine) drives an out/'s domains (`leanvm.vm.libvirtctl`), while a bare
`leanvm libvirt` is the doit task that writes them. Without `config=`, the cluster file is
./cluster.yaml (made from leanvm's example if there is none); without `out=`, the output
directory is `out/` beside that cluster file. Every doit verb and option works
(`leanvm list`, `leanvm -n 2`, `leanvm clean`, `leanvm bundle`, `leanvm reset:NAME`).
"""

import sys
from pathlib import Path

from leanvm.dag.doitenv import READ_ONLY_COMMANDS
from leanvm.errors import LeanvmError, interrupted, note, report
from leanvm.fsutil import write_atomic
from leanvm.resources import DEFAULT_CLUSTER


def _reads_only(args: list[str]) -> bool:
    """True if the doit command in `args` only reads (list, info, help, --help, ...)."""
    if any(a in ("--help", "-h", "--version") for a in args):
        return True
    words = [a for a in args if not a.startswith("-") and "=" not in a]
    return bool(words) and words[0] in READ_ONLY_COMMANDS


def _cluster_file_here(cwd: Path, args: list[str]) -> Path:
    """./cluster.yaml; without one, leanvm's example: copied there for a build (so that ./out
    belongs to a file of the user's, not to one inside the installed package), read in place
    for a command that only reads. A ./cluster.yml is named rather than passed over."""
    config = cwd / "cluster.yaml"
    if config.is_file():
        return config
    for other in (cwd / "cluster.yml", cwd / "Cluster.yaml"):
        if other.is_file():
            raise LeanvmError(f"no {config}, but there is {other}",
                              f"rename it to cluster.yaml, or pass config={other.name}")
    if _reads_only(args):
        note(f"no cluster.yaml in {cwd}: using leanvm's example cluster file {DEFAULT_CLUSTER}")
        return DEFAULT_CLUSTER
    write_atomic(config, DEFAULT_CLUSTER.read_bytes())
    note(f"no cluster.yaml in {cwd}: wrote leanvm's example there (three Flatcar stable VMs) and "
         f"build it into {cwd / 'out'}; edit {config} to change the VMs")
    return config


def default_args(args: list[str], cwd: Path) -> list[str]:
    """`args` plus config= and out= where they are not given."""
    given = {a.split("=", 1)[0]: a.split("=", 1)[1] for a in args if "=" in a and not a.startswith("-")}
    extra = []
    if "config" in given:
        config = (cwd / given["config"]).resolve()
    else:
        config = _cluster_file_here(cwd, args)
        extra.append(f"config={config}")
    if "out" not in given:  # beside the cluster file; for leanvm's own example, here
        extra.append(f"out={(cwd if config == DEFAULT_CLUSTER else config.parent) / 'out'}")
    return [*args, *extra]


def _libvirt_verbs(args: list[str]) -> bool:
    """True for `libvirt VERB...` or `libvirt --connect/--dir/--out/--help ...`, not the doit task."""
    from leanvm.vm.libvirtctl import VERBS

    options = ("--connect", "--dir", "--out", "--help", "-h")
    return args[:1] == ["libvirt"] and any(a in VERBS or a.split("=")[0] in options for a in args[1:])


def main(argv: list[str] | None = None) -> int:
    from doit.doit_cmd import DoitMain

    from leanvm.dag.loader import PackageLoader

    given = list(sys.argv[1:] if argv is None else argv)
    if _libvirt_verbs(given):
        from leanvm.vm import libvirtctl

        return libvirtctl.main(given[1:])
    try:
        args = default_args(given, Path.cwd())
        # no config files: a pyproject.toml where leanvm runs belongs to someone else's project
        status = DoitMain(PackageLoader(), config_filenames=()).run(args)
        return int(status or 0)  # (doit's clean returns None)
    except LeanvmError as e:
        return report(e)
    except KeyboardInterrupt:
        return interrupted()


if __name__ == "__main__":
    sys.exit(main())
