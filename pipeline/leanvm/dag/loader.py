"""leanvm's doit task loaders (doit's TaskLoader2 API).

doit asks a loader for its settings once it has parsed the command line's `config=` and
`out=`, then for the tasks, passing the command and its positional arguments. So the
settings put the lock and .doit.db in the out/ given, and the command decides what the
tasks may do (a `list` claims nothing, a `clean` is refused while VMs run).

- `DodoLoader`: plain `doit` in the checkout (pyproject.toml's [tool.doit] names it).
- `PackageLoader`: the `leanvm` command (leanvm.dag.cli).
"""

from typing import Any

from doit.cmd_base import DodoTaskLoader, NamespaceTaskLoader

from leanvm.dag import doitenv, tasks


class _Leanvm(NamespaceTaskLoader):
    def load_doit_config(self) -> dict[str, Any]:
        tasks.cluster_file()  # a bad cluster file fails here, before doit opens its database in out/
        return doitenv.doit_config(tasks.BUILD_TASKS)

    def load_tasks(self, cmd: Any, pos_args: list[str]) -> list[Any]:
        doitenv.begin(cmd.name, pos_args)
        # the one step before tasks are made: out/'s owner, the host's registry of out/s, the
        # VMs' identities, the versions `current` stands for (tasks.context; the tasks reuse it)
        tasks.context()
        loaded = super().load_tasks(cmd, pos_args)
        doitenv.check_info_names(cmd.name, pos_args, {task.name for task in loaded})
        return list(loaded)


class DodoLoader(_Leanvm, DodoTaskLoader):
    """The tasks of the dodo.py doit finds (-f, -d, -k as usual)."""

    def setup(self, opt_values: dict[str, Any]) -> None:
        doitenv.RUN.loader_in_use = True  # dodo.py refuses doit's default loader
        super().setup(opt_values)


class PackageLoader(_Leanvm):
    """The tasks of leanvm.dag.tasks, without a dodo.py."""

    def __init__(self) -> None:
        super().__init__()
        self.namespace = {name: getattr(tasks, name) for name in dir(tasks) if name.startswith("task_")}
