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
    from doit.cmd_base import ModuleTaskLoader
    from doit.doit_cmd import DoitMain

    args = default_args(list(sys.argv[1:] if argv is None else argv), Path.cwd())
    sys.argv = [sys.argv[0], *args]  # doitenv reads the command line as doit does
    from leanvm import errors
    from leanvm.dag import tasks

    errors.command = "leanvm"

    class Loader(ModuleTaskLoader):
        """leanvm's tasks; their doit settings (lock, database in out/) are read only once
        doit has parsed the command line's `out=`."""

        def load_doit_config(self) -> dict:
            return tasks.doit_config()

    members = {name: getattr(tasks, name) for name in dir(tasks) if name.startswith("task_")}
    return DoitMain(Loader(members)).run(args)


if __name__ == "__main__":
    sys.exit(main())
