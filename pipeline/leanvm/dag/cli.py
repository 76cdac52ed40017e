"""The `leanvm` command: leanvm's doit DAG, usable from any directory.

`leanvm [DOIT ARGS...]` is `doit` with leanvm's tasks. Without `config=`, the cluster file is
./cluster.yaml if there is one, else leanvm's own configs/cluster.yaml; without `out=`, the
output directory is `out/` beside that cluster file. Every doit verb and option works
(`leanvm list`, `leanvm -n 2`, `leanvm clean`, `leanvm bundle`, `leanvm reset:NAME`).
"""

import sys
from pathlib import Path

from leanvm.resources import DEFAULT_CLUSTER


def default_args(args: list[str], cwd: Path) -> list[str]:
    """`args` plus config= and out= where they are not given."""
    given = {a.split("=", 1)[0]: a.split("=", 1)[1] for a in args if "=" in a and not a.startswith("-")}
    extra = []
    if "config" in given:
        config = (cwd / given["config"]).resolve()
    else:
        config = cwd / "cluster.yaml" if (cwd / "cluster.yaml").is_file() else DEFAULT_CLUSTER
        extra.append(f"config={config}")
    if "out" not in given:  # beside the cluster file; for leanvm's own example, here
        extra.append(f"out={(cwd if config == DEFAULT_CLUSTER else config.parent) / 'out'}")
    return [*args, *extra]


def main(argv: list[str] | None = None) -> int:
    from doit.doit_cmd import DoitMain

    from leanvm import errors
    from leanvm.dag.loader import PackageLoader

    errors.command = "leanvm"
    args = default_args(list(sys.argv[1:] if argv is None else argv), Path.cwd())
    # no config files: a pyproject.toml where leanvm runs belongs to someone else's project
    return DoitMain(PackageLoader(), config_filenames=()).run(args)


if __name__ == "__main__":
    sys.exit(main())
